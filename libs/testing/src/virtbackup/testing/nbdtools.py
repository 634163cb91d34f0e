"""Looking at NBD exports with libnbd's tools (``nbdinfo``, ``nbdcopy``), independently of
our own NBD client."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MapExtent", "nbd_copy", "nbd_info", "nbd_map"]


@dataclass(frozen=True, slots=True)
class MapExtent:
    """One line of ``nbdinfo --map``: ``type`` is the numeric flags, ``description`` e.g.
    ``data``, ``hole,zero``, ``dirty``, ``clean``."""

    offset: int
    length: int
    type: int
    description: str


def nbd_map(uri: str, context: str | None = None, *, timeout: float = 60.0) -> list[MapExtent]:
    """``nbdinfo --map[=CONTEXT] URI``, parsed (``base:allocation`` by default)."""
    opt = f"--map={context}" if context else "--map"
    out = subprocess.run(
        ["nbdinfo", opt, uri], check=True, capture_output=True, text=True, timeout=timeout
    ).stdout
    extents: list[MapExtent] = []
    for line in out.splitlines():
        parts = line.split(None, 3)
        if len(parts) >= 3:
            extents.append(
                MapExtent(int(parts[0]), int(parts[1]), int(parts[2]), (parts[3:] or [""])[0])
            )
    return extents


def nbd_info(uri: str, *, timeout: float = 60.0) -> dict[str, object]:
    """``nbdinfo --json URI``: the export's properties (``export-size``,
    ``can_multi_conn``, ``contexts``, ...)."""
    out = subprocess.run(
        ["nbdinfo", "--json", uri], check=True, capture_output=True, text=True, timeout=timeout
    ).stdout
    data = json.loads(out)
    exports = data.get("exports") or [{}]
    return dict(exports[0])


def nbd_copy(uri: str, destination: Path, *, timeout: float = 120.0) -> Path:
    """Copy an NBD export to a raw file with ``nbdcopy`` (sparse where the export is)."""
    subprocess.run(["nbdcopy", uri, str(destination)], check=True, timeout=timeout)
    return destination
