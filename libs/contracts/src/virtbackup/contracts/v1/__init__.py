"""Version 1 of the VirtBackup message schemas.

All messages are frozen, keyword-only ``msgspec.Struct`` s. Fields are camelCase on the
wire (as in the agent API) and snake_case in Python.
"""
