"""Fixtures every test package shares (a real nats-server per test, ...)."""

pytest_plugins = ["virtbackup.testing.fixtures"]
