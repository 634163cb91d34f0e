"""Names of temporary files built beside their final path: moved to
:mod:`virtbackup.virt.beside` (a remote agent's restores name them the same way)."""

from __future__ import annotations

from virtbackup.virt.beside import HASH_DIGITS, NAME_MAX, beside

__all__ = ["HASH_DIGITS", "NAME_MAX", "beside"]
