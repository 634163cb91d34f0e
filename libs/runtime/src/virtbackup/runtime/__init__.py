"""Shared runtime of the VirtBackup services (imported, never run)."""

from __future__ import annotations

__version__ = "0.1.0"
