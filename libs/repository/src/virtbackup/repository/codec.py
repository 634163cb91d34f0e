"""Blobs: how a chunk, a manifest or the domain XML is stored.

A blob is one codec byte then the payload: ``0`` stored as is, ``1`` zstd, ``2`` framed
(a chunk as one record per 256 KiB of its plaintext, each stored as is or as one zstd frame:
:func:`compress_framed`; repositories of format 2). In an
encrypted repository the whole (codec byte + payload) is sealed with the data key,
the object's identity (chunk id or key) as associated data. Compression is kept only
when it saves space. The codec releases the GIL (zstd, AEAD), so blobs are encoded on
worker threads.

The zstd level is the repository's (``compressionLevel`` in ``repository.json``, 1
unless chosen otherwise at creation): a zstd frame decodes the same whatever level
made it, so readers decode every repository's blobs alike.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Container, Sequence
from typing import Final

import zstandard

from virtbackup.repository.crypto import Sealer
from virtbackup.repository.format import DEFAULT_COMPRESSION_LEVEL

RAW: Final = 0
ZSTD: Final = 1
#: A chunk as records of ``FRAME_SIZE`` bytes of plaintext each (the last may be
#: shorter): ``2 || log2(frame size) (u8) || n (u32 LE) || n x record length (u32 LE)
#: || records``, each record one codec byte (``RAW`` or ``ZSTD``) then its payload.
FRAMED: Final = 2
#: Plaintext bytes per record of a framed blob (1 MiB): a chunk read in part keeps its
#: parent's records for the frames it did not read and compresses only the others. A
#: 1 MiB write at an offset aligned to nothing touches 5 frames of 256 KiB (1.25 MiB
#: compressed again) against 2 of 1 MiB (2 MiB) or the whole 4 MiB chunk; on the
#: benchmark's text and binaries zstd 1 stores within +-2% of one frame per 4 MiB, at
#: the same CPU per byte (``bench/README.md``, "Framed chunks").
FRAME_SIZE: Final = 1 << 18
_FRAMED_HEAD: Final = struct.Struct("<BBI")
#: Records per blob at most (a 64 MiB chunk of 256 KiB frames has 256).
_MAX_FRAMES: Final = 1 << 16
#: The longest plaintext :func:`decode_blob` makes of a framed blob when its caller gives
#: no ``size_hint`` (a chunk's is its repository's chunk size): a blob of a few hundred
#: KiB can claim 65,536 records of 64 MiB, and the output is allocated before decoding.
_MAX_FRAMED_PLAINTEXT: Final = 64 << 20
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


_ZSTD_BYTE = bytes([ZSTD])
_RAW_BYTE = bytes([RAW])


def compress_record(
    data: bytes | bytearray | memoryview, level: int
) -> tuple[bytes, bytes | bytearray | memoryview]:
    """One record of a framed blob as ``(codec byte, payload)``: zstd at ``level`` when
    smaller, else ``data`` itself. Two pieces, not one: the blob joins them once
    (concatenating them here copied every record a second time, holding the GIL)."""
    compressed = _compressor(level).compress(data)
    if len(compressed) < len(data):
        return _ZSTD_BYTE, compressed
    return _RAW_BYTE, data


def compress_framed(
    data: bytes | bytearray | memoryview,
    level: int = ZSTD_LEVEL,
    parent: Sequence[bytes | memoryview] = (),
    keep: Container[int] = (),
) -> bytes:
    """The unsealed framed blob of ``data`` (codec ``FRAMED``): one record per
    ``FRAME_SIZE`` bytes, each zstd at ``level`` when smaller, else as is.

    ``parent`` and ``keep``: the records of a chunk of the same length whose plaintext
    equals ``data`` in the frames whose indices are in ``keep`` (:func:`framed_records`
    of a blob checked against its id): those records are copied as they are, not
    compressed again. The caller vouches for that equality; the result is a blob of
    ``data`` only if it holds. ``ValueError`` when ``parent`` has not one record per
    frame of ``data``.
    """
    view = memoryview(data)
    count = -(-len(view) // FRAME_SIZE)
    if keep and len(parent) != count:
        raise ValueError(f"parent has {len(parent)} records, the chunk {count} frames")
    pieces: list[bytes | bytearray | memoryview] = []
    lengths: list[int] = []
    for i in range(count):
        if i in keep:
            pieces.append(parent[i])
            lengths.append(len(parent[i]))
        else:
            codec, payload = compress_record(view[i * FRAME_SIZE : (i + 1) * FRAME_SIZE], level)
            pieces += (codec, payload)
            lengths.append(1 + len(payload))
    head = _FRAMED_HEAD.pack(FRAMED, FRAME_SIZE.bit_length() - 1, count)
    return b"".join([head, struct.pack(f"<{count}I", *lengths), *pieces])


def framed_records(body: bytes | memoryview) -> tuple[int, list[memoryview]]:
    """``(frame size, records)`` of an unsealed framed body (codec ``FRAMED``), each
    record a view of ``body`` (codec byte + payload). ``BlobError`` when the header is
    malformed or the record lengths do not add up to the body's length."""
    view = memoryview(body)
    if len(view) < _FRAMED_HEAD.size or view[0] != FRAMED:
        raise BlobError("not a framed blob")
    _, shift, count = _FRAMED_HEAD.unpack_from(view)
    if not 12 <= shift <= 26 or count > _MAX_FRAMES:
        raise BlobError(f"framed blob: bad header (frame 2^{shift} bytes, {count} records)")
    start = _FRAMED_HEAD.size + 4 * count
    if len(view) < start:
        raise BlobError("framed blob: truncated record table")
    lengths = struct.unpack_from(f"<{count}I", view, _FRAMED_HEAD.size)
    if start + sum(lengths) != len(view) or 0 in lengths:
        raise BlobError("framed blob: record lengths do not add up to the blob")
    records = []
    for length in lengths:
        records.append(view[start : start + length])
        start += length
    return 1 << shift, records


def _decode_record(record: memoryview, out: memoryview, last: bool) -> int:
    """Decode one record into ``out`` (its frame's place, ``frame size`` bytes or less for
    the last): the bytes written; ``BlobError`` unless it fills ``out`` (any length from 1
    for the last record)."""
    codec, payload = record[0], record[1:]
    if codec == RAW:
        size = len(payload)
        if size > len(out):
            raise BlobError(f"record of {size} bytes, longer than its frame ({len(out)})")
        out[:size] = payload
    elif codec == ZSTD:
        size = _zstd_into(payload, out, record=True)
    else:
        raise BlobError(f"unknown record codec {codec}")
    if size == 0 or (size < len(out) and not last):
        raise BlobError(f"record of {size} bytes in a frame of {len(out)}")
    return size


def _decode_framed_into(body: bytes | memoryview, out: memoryview) -> int:
    frame, records = framed_records(body)
    size = 0
    for index, record in enumerate(records):
        slot = out[size : size + frame]
        if not slot:
            raise BlobError(f"plaintext longer than {len(out)} bytes")
        size += _decode_record(record, slot, last=index == len(records) - 1)
    return size


def decode_blob(blob: bytes, sealer: Sealer | None, aad: bytes, size_hint: int = 0) -> bytes:
    """The plaintext of ``blob`` (opened with ``sealer`` and ``aad`` when given).
    ``size_hint``: the most bytes the plaintext may have (a chunk's: its repository's
    chunk size; 0: unknown). ``BlobError`` for a blob that does not decode, a framed
    one whose records claim more than ``size_hint`` (64 MiB without it), or a zstd one
    whose frame header claims more than ``size_hint`` (when given), said before anything
    is allocated for them."""
    body = sealer.open(blob, aad) if sealer else blob
    if not body:
        raise BlobError("empty blob")
    codec, payload = body[0], memoryview(body)[1:]
    if codec == FRAMED:
        frame, records = framed_records(body)
        limit = size_hint or _MAX_FRAMED_PLAINTEXT
        if frame * (len(records) - 1) >= limit:
            raise BlobError(
                f"framed blob of {len(records)} records of {frame} bytes is longer than"
                f" {limit} bytes"
            )
        out = bytearray(min(frame * len(records), limit))
        size = _decode_framed_into(body, memoryview(out))
        del out[size:]
        return bytes(out)
    if codec == RAW:
        return bytes(payload)
    if codec == ZSTD:
        try:
            # ``decompress`` allocates the size a frame's header claims, whatever
            # ``max_output_size`` says: 16 KiB of RLE blocks claiming 512 MiB made 512
            # MiB, and a claim of 1 TiB a MemoryError (not a damaged chunk).
            claimed = zstandard.frame_content_size(payload)
            if size_hint and claimed > size_hint:
                raise BlobError(f"zstd frame of {claimed} bytes, longer than {size_hint} bytes")
            if not size_hint:
                return _decompressor().decompress(payload)
        except zstandard.ZstdError as exc:
            raise BlobError(f"corrupt zstd payload: {exc}") from None
        # As decode_blob_into reads it (every frame): ``decompress`` reads the first
        # frame only, so a chunk's frame followed by another passed verify and failed
        # the restore, and a chunk in two frames was quarantined though it restored.
        out = bytearray(size_hint)
        size = _zstd_into(payload, memoryview(out))
        del out[size:]
        return bytes(out)
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
    if codec == FRAMED:
        return _decode_framed_into(body, view)
    if codec == RAW:
        if len(payload) > len(view):
            raise BlobError(f"plaintext of {len(payload)} bytes, more than {len(view)}")
        view[: len(payload)] = payload
        return len(payload)
    if codec != ZSTD:
        raise BlobError(f"unknown codec {codec}")
    return _zstd_into(payload, view)


def _zstd_into(payload: memoryview, view: memoryview, *, record: bool = False) -> int:
    """Decode a zstd payload (one frame, or several read one after the other) into
    ``view``: its length; ``BlobError`` when it does not decode or is longer than
    ``view``. The one reading of a zstd blob, so that every reader (restore, verify,
    copy) agrees on what a blob holds. ``record``: a framed blob's record, one zstd
    frame only (what follows it makes the record longer than its frame)."""
    what = "record" if record else "payload"
    size = 0
    try:
        with _decompressor().stream_reader(payload, read_across_frames=not record) as reader:
            while size < len(view):
                got = reader.readinto(view[size:])
                if not got:
                    return size
                size += got
            if reader.read(1):
                raise BlobError(
                    f"record longer than a frame ({len(view)} bytes)"
                    if record
                    else f"plaintext longer than {len(view)} bytes"
                )
    except zstandard.ZstdError as exc:
        raise BlobError(f"corrupt zstd {what}: {exc}") from None
    return size
