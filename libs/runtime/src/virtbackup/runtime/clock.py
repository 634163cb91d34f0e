"""Time stamps as the wire carries them."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow_iso() -> str:
    """Now, as ISO-8601 UTC with milliseconds and a ``Z``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
