"""Benchmark content: random, text and binary data taken from this system, zeros, and
disk images filled with a mix of them.

Every generator is deterministic for a given ``seed`` and machine (random data is an
AES-CTR key stream, text and binaries are files read in sorted path order), so that two
tools benchmarked in the same run see the same bytes. The corpora repeat when a size
asks for more than the system has.

Kinds:

* ``random``: incompressible, no duplicates (like encrypted or already compressed data);
* ``text``: C headers, documentation, Python and Perl sources (compresses about 4-5x);
* ``binary``: ELF executables and libraries from ``/usr/bin`` and ``/usr/lib`` (about 2-3x);
* ``zero``: zero bytes, written as data (allocated: a backup has to read them).
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

Kind = Literal["random", "text", "binary", "zero"]
KINDS: Final[tuple[Kind, ...]] = ("random", "text", "binary", "zero")

KiB: Final = 1024
MiB: Final = 1024 * KiB
GiB: Final = 1024 * MiB

#: Pieces the generators yield (and the size of one qemu-io write when filling images).
PIECE: Final = 4 * MiB

TEXT_ROOTS: Final = ("/usr/include", "/usr/share/doc", "/usr/lib/python3", "/usr/share/perl")
TEXT_SUFFIXES: Final = frozenset(
    {"", ".h", ".hpp", ".hh", ".def", ".inc", ".txt", ".md", ".rst", ".html", ".py", ".pm"}
)
BINARY_ROOTS: Final = ("/usr/bin", "/usr/lib")
ELF_MAGIC: Final = b"\x7fELF"


def _walk(root: str) -> Iterator[Path]:
    """Regular files under ``root`` (symlinks not followed), in sorted path order."""
    for directory, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            path = Path(directory, name)
            if path.is_file() and not path.is_symlink():
                yield path


def text_files() -> Iterator[Path]:
    """Plain-text files of this system (headers, docs, sources), compressed ones excluded."""
    for root in TEXT_ROOTS:
        for path in _walk(root):
            if path.suffix in TEXT_SUFFIXES and path.stat().st_size > 0:
                yield path


def binary_files() -> Iterator[Path]:
    """ELF executables and shared libraries of this system."""
    for root in BINARY_ROOTS:
        for path in _walk(root):
            try:
                with path.open("rb") as fh:
                    if fh.read(4) == ELF_MAGIC:
                        yield path
            except OSError:
                continue


def _random_stream(seed: int) -> Iterator[bytes]:
    key = hashlib.sha256(f"virtbackup bench {seed}".encode()).digest()
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    zeros = bytes(PIECE)
    while True:
        yield encryptor.update(zeros)


def _file_stream(paths: Sequence[Path] | None, kind: Kind) -> Iterator[bytes]:
    listed = list(paths) if paths is not None else None
    while True:
        found = False
        source: Iterable[Path] = (
            listed if listed is not None else (text_files() if kind == "text" else binary_files())
        )
        for path in source:
            try:
                data = path.read_bytes()
            except OSError:
                continue
            if data:
                found = True
                yield data
        if not found:
            raise RuntimeError(f"no {kind} files found on this system")


def stream(kind: Kind, size: int, *, seed: int = 0, skip: int = 0) -> Iterator[bytes]:
    """Pieces of at most :data:`PIECE` bytes, ``size`` bytes in all, of ``kind``.

    ``skip`` drops that many bytes of the (infinite) corpus first, so that several
    segments of one kind get different content.
    """
    if kind == "zero":
        zeros = bytes(PIECE)
        left = size
        while left > 0:
            n = min(PIECE, left)
            yield zeros[:n]
            left -= n
        return
    source = _random_stream(seed) if kind == "random" else _file_stream(None, kind)
    pending = bytearray()
    to_skip = skip
    left = size
    for data in source:
        if to_skip:
            dropped = min(to_skip, len(data))
            data = data[dropped:]
            to_skip -= dropped
            if not data:
                continue
        pending += data
        while len(pending) >= PIECE and left > 0:
            n = min(PIECE, left)
            yield bytes(pending[:n])
            del pending[:n]
            left -= n
        if left <= 0:
            return
        if len(pending) >= left:
            yield bytes(pending[:left])
            return


def make(kind: Kind, size: int, *, seed: int = 0, skip: int = 0) -> bytes:
    """``size`` bytes of ``kind`` (see :func:`stream`)."""
    return b"".join(stream(kind, size, seed=seed, skip=skip))


# --------------------------------------------------------------------------- images


@dataclass(frozen=True, slots=True)
class Segment:
    """``length`` bytes of ``kind`` at ``offset`` of a disk; ``skip`` selects the content."""

    offset: int
    length: int
    kind: Kind
    skip: int = 0


#: Default share of each kind in a mixed image's content.
DEFAULT_MIX: Final[dict[Kind, float]] = {
    "binary": 0.3125,
    "text": 0.1875,
    "random": 0.3125,
    "zero": 0.1875,
}


def mixed_layout(
    disk_size: int,
    content_size: int,
    *,
    segment: int = 64 * MiB,
    mix: dict[Kind, float] | None = None,
    seed: int = 0,
) -> list[Segment]:
    """Segments of ``segment`` bytes filling ``content_size`` bytes of a ``disk_size`` disk.

    The disk is cut into slots of ``segment`` bytes; ``content_size / segment`` of them,
    picked at random (``seed``), get a segment whose kind follows ``mix`` (shares of the
    content, default :data:`DEFAULT_MIX`); the other slots stay unallocated. Segments of
    one kind continue each other's corpus (no repeated content between them).
    """
    if content_size > disk_size:
        raise ValueError("content_size is larger than the disk")
    rng = random.Random(seed)  # noqa: S311 - a reproducible layout, not a secret
    slots = disk_size // segment
    count = min(slots, max(1, content_size // segment))
    shares = mix or DEFAULT_MIX
    total = sum(shares.values())
    kinds: list[Kind] = []
    for kind, share in shares.items():
        kinds += [kind] * round(count * share / total)
    kinds = (kinds + [KINDS[i % len(KINDS)] for i in range(count)])[:count]
    rng.shuffle(kinds)
    chosen = sorted(rng.sample(range(slots), count))
    consumed: dict[Kind, int] = {}
    segments = []
    for slot, kind in zip(chosen, kinds, strict=True):
        segments.append(Segment(slot * segment, segment, kind, consumed.get(kind, 0)))
        consumed[kind] = consumed.get(kind, 0) + segment
    return segments


def fill_image(
    image: Path,
    segments: Sequence[Segment],
    *,
    fmt: str = "qcow2",
    seed: int = 0,
    scratch: Path | None = None,
) -> int:
    """Write ``segments`` into an existing (not running) ``image`` with ``qemu-io``, as a
    guest would (zero segments as written zeros, so they are allocated). Returns the
    number of bytes written.

    The image is fsynced at the end. Each corpus is read once, in order: segments of a
    kind are written in ``skip`` order from one stream (their ``skip`` values must follow
    each other, as :func:`mixed_layout` makes them).
    """
    written = 0
    by_kind: dict[Kind, list[Segment]] = {}
    for seg in segments:
        by_kind.setdefault(seg.kind, []).append(seg)
    with tempfile.TemporaryDirectory(prefix="vb-fill-", dir=scratch) as tmp:
        source = Path(tmp, "piece")
        for kind, segs in by_kind.items():
            segs = sorted(segs, key=lambda s: s.skip)
            if kind == "zero":
                _qemu_io(image, fmt, [f"write -q -P 0 {s.offset} {s.length}" for s in segs])
                written += sum(s.length for s in segs)
                continue
            total = sum(s.length for s in segs)
            reader = Reader(stream(kind, total, seed=seed, skip=segs[0].skip))
            for seg in segs:
                # One source file per segment: qemu-io reads it whole into its buffer.
                with source.open("wb") as fh:
                    for piece in reader.take(seg.length):
                        fh.write(piece)
                _qemu_io(image, fmt, [f"write -q -s {source} {seg.offset} {seg.length}"])
                written += seg.length
    # Write the image back now: a later benchmark must not compete with its writeback.
    fd = os.open(image, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return written


class Reader:
    """Takes exact byte counts from a stream of pieces."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self._pieces = pieces
        self._left = b""

    def take(self, size: int) -> Iterator[bytes]:
        while size > 0:
            if not self._left:
                self._left = next(self._pieces)
            piece, self._left = self._left[:size], self._left[size:]
            size -= len(piece)
            yield piece


def _qemu_io(image: Path, fmt: str, commands: Sequence[str]) -> None:
    args = ["qemu-io", "-f", fmt]
    for command in commands:
        args += ["-c", command]
    result = subprocess.run(
        [*args, str(image)], capture_output=True, text=True, timeout=600, check=False
    )
    if result.returncode != 0 or "error" in (result.stdout + result.stderr).lower():
        raise RuntimeError(f"qemu-io {commands}: {result.stdout}{result.stderr}")


def create_mixed_image(
    image: Path,
    disk_size: int,
    content_size: int,
    *,
    fmt: str = "qcow2",
    seed: int = 0,
    segment: int = 64 * MiB,
) -> list[Segment]:
    """Create ``image`` (``qemu-img create``) and fill it with a :func:`mixed_layout`."""
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", fmt, str(image), str(disk_size)],
        check=True,
        timeout=60,
    )
    segments = mixed_layout(disk_size, content_size, segment=segment, seed=seed)
    fill_image(image, segments, fmt=fmt, seed=seed, scratch=image.parent)
    return segments
