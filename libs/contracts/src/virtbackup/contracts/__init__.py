"""VirtBackup bus contracts.

Every subject name, stream and key-value bucket definition and every message schema
lives here. This package performs no I/O and depends on msgspec only, so that every
service (and any external subscriber) can import it without pulling in a runtime.
"""

from __future__ import annotations

SCHEMA_VERSION = "v1"
