"""Blobs: how a chunk, a manifest or the domain XML is stored.

A blob is one codec byte then the payload: ``0`` stored as is, ``1`` zstd. In an
encrypted repository the whole (codec byte + payload) is sealed with the data key,
the object's identity (chunk id or key) as associated data. Compression is kept only
when it saves space. The codec releases the GIL (zstd, AEAD), so blobs are encoded on
worker threads.
"""

from __future__ import annotations

import threading
from typing import Final

import zstandard

from virtbackup.repository.crypto import Sealer

RAW: Final = 0
ZSTD: Final = 1
#: Level 1: about 1.5x the speed of level 3 for 5-10% more bytes (bench/stages.py).
ZSTD_LEVEL: Final = 1

_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    comp: zstandard.ZstdCompressor | None = getattr(_local, "comp", None)
    if comp is None:
        comp = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        _local.comp = comp
    return comp


def _decompressor() -> zstandard.ZstdDecompressor:
    dec: zstandard.ZstdDecompressor | None = getattr(_local, "dec", None)
    if dec is None:
        dec = zstandard.ZstdDecompressor()
        _local.dec = dec
    return dec


class BlobError(Exception):
    """A blob that cannot be decoded: corrupt, truncated, or of an unknown codec."""


def compress_body(data: bytes | bytearray | memoryview) -> bytes:
    """The unsealed blob of ``data``: codec byte + payload (zstd when smaller). The same
    for every repository, so a chunk stored in several is compressed once."""
    compressed = _compressor().compress(data)
    return bytes([ZSTD]) + compressed if len(compressed) < len(data) else bytes([RAW]) + data


def encode_blob(data: bytes | bytearray | memoryview, sealer: Sealer | None, aad: bytes) -> bytes:
    body = compress_body(data)
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
