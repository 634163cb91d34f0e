"""Blobs: how a chunk, a manifest or the domain XML is stored.

A blob is one codec byte then the payload: ``0`` stored as is, ``1`` zstd. In an
encrypted repository the whole (codec byte + payload) is sealed with the data key,
the object's identity (chunk id or key) as associated data. Compression is kept only
when it saves space. The codec releases the GIL (zstd, AEAD), so blobs are encoded on
worker threads.

The zstd level is the repository's (``compressionLevel`` in ``repository.json``, 1
unless chosen otherwise at creation): a zstd frame decodes the same whatever level
made it, so readers decode every repository's blobs alike.
"""

from __future__ import annotations

import threading
from typing import Final

import zstandard

from virtbackup.repository.crypto import Sealer
from virtbackup.repository.format import DEFAULT_COMPRESSION_LEVEL

RAW: Final = 0
ZSTD: Final = 1
#: The default level: about 1.5x the speed of level 3 for 5-10% more bytes, and the
#: fastest whose bytes stay within the peer's on the benchmark (``bench/stages.py``,
#: ``--only codecs``).
ZSTD_LEVEL: Final = DEFAULT_COMPRESSION_LEVEL

_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    """This thread's compressor for ``level`` (a ``ZstdCompressor`` is not thread-safe)."""
    comps: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "comps", None)
    if comps is None:
        comps = _local.comps = {}
    comp = comps.get(level)
    if comp is None:
        comp = comps[level] = zstandard.ZstdCompressor(level=level)
    return comp


def _decompressor() -> zstandard.ZstdDecompressor:
    dec: zstandard.ZstdDecompressor | None = getattr(_local, "dec", None)
    if dec is None:
        dec = zstandard.ZstdDecompressor()
        _local.dec = dec
    return dec


class BlobError(Exception):
    """A blob that cannot be decoded: corrupt, truncated, or of an unknown codec."""


def compress_body(data: bytes | bytearray | memoryview, level: int = ZSTD_LEVEL) -> bytes:
    """The unsealed blob of ``data``: codec byte + payload (zstd at ``level`` when
    smaller, else the bytes as they are). The same for every repository of that level,
    so a chunk stored in several is compressed once per level."""
    compressed = _compressor(level).compress(data)
    return bytes([ZSTD]) + compressed if len(compressed) < len(data) else bytes([RAW]) + data


def encode_blob(
    data: bytes | bytearray | memoryview,
    sealer: Sealer | None,
    aad: bytes,
    level: int = ZSTD_LEVEL,
) -> bytes:
    """The blob of ``data``: :func:`compress_body` at ``level``, sealed with ``aad`` as
    associated data when ``sealer`` is given."""
    body = compress_body(data, level)
    return sealer.seal(body, aad) if sealer else body


def decode_blob(blob: bytes, sealer: Sealer | None, aad: bytes, size_hint: int = 0) -> bytes:
    body = sealer.open(blob, aad) if sealer else blob
    if not body:
        raise BlobError("empty blob")
    codec, payload = body[0], memoryview(body)[1:]
    if codec == RAW:
        return bytes(payload)
    if codec == ZSTD:
        try:
            return _decompressor().decompress(payload, max_output_size=size_hint)
        except zstandard.ZstdError as exc:
            raise BlobError(f"corrupt zstd payload: {exc}") from None
    raise BlobError(f"unknown codec {codec}")


def decode_blob_into(blob: bytes, sealer: Sealer | None, aad: bytes, out: bytearray) -> int:
    """:func:`decode_blob` into ``out`` (a reused buffer): the plaintext is written at its
    start and its length returned, so a caller that keeps its buffers (a transfer
    worker's pool) holds no second copy of every chunk. ``BlobError`` for a blob that
    does not decode or whose plaintext is longer than ``out``."""
    body = sealer.open(blob, aad) if sealer else blob
    if not body:
        raise BlobError("empty blob")
    codec, payload = body[0], memoryview(body)[1:]
    view = memoryview(out)
    if codec == RAW:
        if len(payload) > len(view):
            raise BlobError(f"plaintext of {len(payload)} bytes, more than {len(view)}")
        view[: len(payload)] = payload
        return len(payload)
    if codec != ZSTD:
        raise BlobError(f"unknown codec {codec}")
    size = 0
    try:
        with _decompressor().stream_reader(payload, read_across_frames=True) as reader:
            while size < len(view):
                got = reader.readinto(view[size:])
                if not got:
                    return size
                size += got
            if reader.read(1):
                raise BlobError(f"plaintext longer than {len(view)} bytes")
    except zstandard.ZstdError as exc:
        raise BlobError(f"corrupt zstd payload: {exc}") from None
    return size
