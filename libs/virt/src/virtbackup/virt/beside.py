"""Names of temporary files built beside their final path, for any VM name.

A restore builds ``<path>.vbrestore-<job>`` next to each disk and state file. A disk
named after a long VM name (libvirt accepts names up to 247 bytes, e.g.
``<name>-vda.qcow2``) plus that suffix can exceed NAME_MAX (255 bytes), and the file
could not be created. Such a name is shortened the same way every time (another
replica, or a later cleanup, finds the same file), and keeps the suffix that tells
whose temporary it is.
"""

from __future__ import annotations

import hashlib
import posixpath
from typing import Final

#: The longest file name (one path component) of Linux file systems, in bytes.
NAME_MAX: Final = 255
HASH_DIGITS: Final = 12


def beside(path: str, suffix: str, *, reserve: int = 0) -> str:
    """``<path><suffix>`` when its last component fits NAME_MAX with ``reserve`` bytes to
    spare (for a further suffix such as ``.pid``); else the base name is cut to whole
    characters and ``~`` plus :data:`HASH_DIGITS` hex digits of the SHA-256 of the whole
    base name are put before ``suffix``. Deterministic; the result always ends in
    ``suffix``. ValueError when ``suffix`` alone leaves no room."""
    directory, base = posixpath.split(path)
    room = NAME_MAX - reserve - len(suffix.encode())
    raw = base.encode("utf-8", "surrogateescape")
    if len(raw) <= room:
        return f"{path}{suffix}"
    keep = room - 1 - HASH_DIGITS
    if keep < 1:
        raise ValueError(f"suffix {suffix!r} leaves no room for a file name")
    cut = raw[:keep].decode("utf-8", "ignore")
    digest = hashlib.sha256(raw).hexdigest()[:HASH_DIGITS]
    return posixpath.join(directory, f"{cut}~{digest}{suffix}")
