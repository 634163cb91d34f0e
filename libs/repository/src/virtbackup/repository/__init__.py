"""The repository format (see docs/repository-format.md), on top of any storage driver."""
