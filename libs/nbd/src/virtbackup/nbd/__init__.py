"""Asyncio NBD client: newstyle handshake, structured replies, block status, pipelining.

Typical use by a backup worker::

    async with await NbdClient.connect_uri(
        "nbd://host:10809/vda", meta_contexts=["base:allocation"]
    ) as nbd:
        for ext in await nbd.block_status():
            if not ext.is_zero:
                buf = bytearray(ext.length)
                await nbd.readinto(ext.offset, buf)

:class:`NbdPool` offers the same commands over several connections.
"""

from __future__ import annotations

from .client import NbdClient, ReadableBuffer, WritableBuffer
from .errors import (
    NbdCommandError,
    NbdConnectionError,
    NbdError,
    NbdHandshakeError,
    NbdProtocolError,
    NbdUnsupportedError,
)
from .export import BlockSize, ExportInfo
from .extents import Extent, coalesce
from .pool import NbdPool
from .protocol import (
    BASE_ALLOCATION,
    DIRTY_BITMAP_PREFIX,
    STATE_DIRTY,
    STATE_HOLE,
    STATE_ZERO,
    TransmissionFlag,
)
from .uri import NbdUri

__all__ = [
    "BASE_ALLOCATION",
    "DIRTY_BITMAP_PREFIX",
    "STATE_DIRTY",
    "STATE_HOLE",
    "STATE_ZERO",
    "BlockSize",
    "ExportInfo",
    "Extent",
    "NbdClient",
    "NbdCommandError",
    "NbdConnectionError",
    "NbdError",
    "NbdHandshakeError",
    "NbdPool",
    "NbdProtocolError",
    "NbdUnsupportedError",
    "NbdUri",
    "ReadableBuffer",
    "TransmissionFlag",
    "WritableBuffer",
    "coalesce",
]
