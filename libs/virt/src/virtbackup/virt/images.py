"""Disk image metadata from ``qemu-img info --output=json -U`` on the hypervisor host.

``-U`` (force share) lets ``qemu-img`` read the header of an image that a running QEMU
holds open. Caveat, from QEMU's design: a *running* QEMU keeps new persistent bitmaps in
memory and writes them to the qcow2 file only when it closes the image, so the bitmap
list read here is authoritative only for an image no QEMU has open. For running domains
:mod:`virtbackup.virt.checkpoints` asks libvirt instead.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from virtbackup.virt.errors import CommandFailed
from virtbackup.virt.host import Host


@dataclass(frozen=True, slots=True)
class Bitmap:
    """A persistent dirty bitmap stored in a qcow2 image.

    ``flags`` as qemu-img reports them: ``auto`` (recording), ``in-use`` (the image was not
    closed cleanly while the bitmap was loaded: its content cannot be trusted).
    """

    name: str
    flags: tuple[str, ...]
    granularity: int

    @property
    def in_use(self) -> bool:
        """True when the bitmap is marked inconsistent (``in-use`` on a closed image)."""
        return "in-use" in self.flags


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """One image of a backing chain."""

    filename: str
    format: str
    virtual_size: int
    actual_size: int | None
    backing_filename: str | None
    backing_format: str | None
    bitmaps: tuple[Bitmap, ...]
    #: qcow2 only: the cluster size in bytes and the ``compat`` level (``1.1``).
    cluster_size: int | None = None
    compat: str | None = None


def parse_image_info(data: Mapping[str, Any]) -> ImageInfo:
    """Build an :class:`ImageInfo` from one object of ``qemu-img info --output=json``."""
    specific = data.get("format-specific") or {}
    raw_bitmaps = (specific.get("data") or {}).get("bitmaps") or []
    bitmaps = tuple(
        Bitmap(
            name=str(b["name"]),
            flags=tuple(str(f) for f in b.get("flags", [])),
            granularity=int(b.get("granularity", 0)),
        )
        for b in raw_bitmaps
    )
    backing = data.get("full-backing-filename") or data.get("backing-filename")
    actual = data.get("actual-size")
    return ImageInfo(
        filename=str(data["filename"]),
        format=str(data["format"]),
        virtual_size=int(data["virtual-size"]),
        actual_size=int(actual) if actual is not None else None,
        backing_filename=str(backing) if backing else None,
        backing_format=str(data["backing-filename-format"])
        if data.get("backing-filename-format")
        else None,
        bitmaps=bitmaps,
        cluster_size=int(data["cluster-size"]) if data.get("cluster-size") else None,
        compat=str(specific["data"]["compat"])
        if isinstance(specific.get("data"), dict) and specific["data"].get("compat")
        else None,
    )


async def image_chain(host: Host, path: str, *, timeout: float = 30.0) -> list[ImageInfo]:
    """The image at ``path`` followed by its backing files (top first).

    Raises :class:`CommandFailed` when ``qemu-img`` cannot open the image.
    """
    result = await host.run(
        ["qemu-img", "info", "-U", "--output=json", "--backing-chain", path], timeout=timeout
    )
    result.check()
    try:
        data = json.loads(result.stdout)
    except json.JSONDecodeError as exc:
        raise CommandFailed(f"qemu-img info returned invalid JSON for {path}: {exc}") from exc
    items = data if isinstance(data, list) else [data]
    return [parse_image_info(item) for item in items]


async def image_info(host: Host, path: str, *, timeout: float = 30.0) -> ImageInfo:
    """The top image at ``path`` (format, virtual size, backing file, bitmaps)."""
    return (await image_chain(host, path, timeout=timeout))[0]
