"""Stage benchmark: how fast each stage of VirtBackup's data path can go on this machine.

Like ``proxmox-backup-client benchmark``: every stage a backup or restore needs is timed
alone, so that an end-to-end result can be compared with the slowest stage it needs.

    cd /work/main && uv run python bench/stages.py [--json out.json] [--only hash,zstd]

Stages (``--only`` takes these group names):

* ``zero``: zero detection as the transfer worker does it (``units.ZeroCheck.is_zero``), and
  ``bytearray == bytes`` for comparison;
* ``hash``: BLAKE3 as ``Repository.chunk_id`` (``max_threads=1``), SHA-256 for comparison;
* ``zstd``: ``codec.encode_blob`` (zstd level 3) on random, text and binary chunks, and
  ``codec.decode_blob``;
* ``codecs``: the compression a repository may choose (zstd levels 1, -1, -3, -5) and
  lz4 (block, when the ``lz4`` package is installed) for comparison, one thread, in MB
  per CPU second (the thread's own CPU time: steady on a loaded machine), compression
  and decompression, on random, text and binary chunks; then what each would cost on
  the benchmark VM's content (``bench/run.py``: 2 GiB in ``content.DEFAULT_MIX``):
  compression CPU seconds and stored MB of a full backup;
* ``crypto``: ``Sealer.seal`` with AES-256-GCM and ChaCha20-Poly1305;
* ``encode``: ``Repository.chunk_id`` + ``Repository.encode_chunk`` on a mix of the three
  kinds, plain and encrypted;
* ``nbd``: reading a 1 GiB qcow2 image of mixed content served by ``qemu-nbd`` on loopback
  with ``NbdClient.readinto`` / ``NbdPool.readinto`` in chunk-sized reads, and ``nbdcopy``;
* ``fs``: ``FilesystemDriver.put`` of chunk-sized blobs (with fsync);
* ``partial``: the worker's CPU for the chunks an incremental reads in part, replayed in
  memory on the benchmark's workload (``bench/run.py``: the 4 GiB disk's layout, its 200
  scattered 1 MiB writes, 64 KiB granules, chunks of ``--chunk-size``): per chunk,
  decode and check the parent, fill the gaps, hash, then compress the whole chunk (one
  zstd frame, format 1) or, framed (format 2: one record per 256 KiB), only its dirty
  frames, copying the parent's records for the others; CPU seconds of one thread, and
  the bytes each stores, for the incremental and for the full backup before it. The
  peer's two rounds of writes come first, as in ``bench/run.py``.

CPU stages run each measurement ``--runs`` times for ``--seconds`` after a warm-up of
``--warmup`` seconds, on one thread and on a pool of ``--threads`` threads (default
``os.cpu_count()``) that all run the stage at once: a pool that does not go faster than
one thread means the stage holds the GIL. MB/s are 10^6 bytes per second of input
(for decompression: of output), the median of the runs. ``cpu`` is the process's CPU
time over wall time (2.0 = two cores busy).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import resource
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

import blake3
import zstandard

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import content
from virtbackup.nbd import NbdClient, NbdPool
from virtbackup.repository import crypto
from virtbackup.repository.codec import (
    FRAME_SIZE,
    compress_body,
    compress_framed,
    decode_blob,
    decode_blob_into,
    encode_blob,
    framed_records,
)
from virtbackup.repository.format import DEFAULT_CHUNK_SIZE, DEFAULT_COMPRESSION_LEVEL, chunk_key
from virtbackup.repository.repository import Repository
from virtbackup.runtime.ports import free_port
from virtbackup.storage.filesystem import FilesystemDriver
from virtbackup.transfer_worker.units import CHUNKS_IN_FLIGHT, ZeroCheck, clean_frames

T = TypeVar("T")

GROUPS: Final = ("zero", "hash", "zstd", "codecs", "crypto", "encode", "nbd", "fs", "partial")
#: zstd levels the ``codecs`` group compares (1: the default; negative: zstd's fast ones).
CODEC_LEVELS: Final = (1, -1, -3, -5)
#: The benchmark VM's content (``bench/run.py``: ``--content-mib 2048``).
BENCH_CONTENT: Final = 2 * content.GiB
MB: Final = 1_000_000
#: Associated data as long as a chunk id (what ``encode_chunk`` passes).
AAD: Final = b"0" * 64
#: Passphrase of the benchmark's throw-away encrypted repository.
BENCH_PASSPHRASE: Final = "bench"  # noqa: S105 - a temporary repository


@dataclass
class Config:
    chunk_size: int = DEFAULT_CHUNK_SIZE
    seconds: float = 0.4
    warmup: float = 0.2
    runs: int = 3
    threads: int = os.cpu_count() or 1
    buffers: int = 8
    nbd_size: int = content.GiB
    nbd_runs: int = 3
    nbd_depth: int = CHUNKS_IN_FLIGHT
    fs_depth: int = CHUNKS_IN_FLIGHT
    tmpdir: str | None = None
    groups: tuple[str, ...] = GROUPS


@dataclass
class Result:
    """One line of the table."""

    group: str
    stage: str
    data: str
    threads: int
    mb_per_s: float
    runs_mb_per_s: list[float]
    #: Process CPU seconds per wall second during the runs (median).
    cpu: float
    #: Stored bytes / input bytes, where the stage changes the size.
    ratio: float | None = None
    #: The NBD server's CPU seconds per wall second (median), for the NBD lines.
    server_cpu: float | None = None
    note: str = ""


@dataclass
class Report:
    machine: dict[str, Any]
    parameters: dict[str, Any]
    results: list[Result] = field(default_factory=list)
    seconds: float = 0.0
    group_seconds: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    #: Lines printed after the table (the ``codecs`` group's estimates).
    notes: list[str] = field(default_factory=list)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- timing


@dataclass
class _Run:
    bytes: int
    wall: float
    cpu: float
    server_cpu: float | None = None

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.wall / MB if self.wall > 0 else 0.0


def _spin(
    op: Callable[[T], object], items: Sequence[T], size: int, start: int, seconds: float
) -> int:
    """Run ``op`` over ``items`` (round robin from ``start``) for ``seconds``; bytes done."""
    done = 0
    i = start
    deadline = time.perf_counter() + seconds
    while True:
        op(items[i % len(items)])
        done += size
        i += 1
        if time.perf_counter() >= deadline:
            return done


def _parallel(
    op: Callable[[T], object], items: Sequence[T], size: int, threads: int, seconds: float
) -> _Run:
    """``threads`` threads run ``op`` at once for ``seconds``; aggregate bytes and wall time."""
    cpu0 = time.process_time()
    if threads == 1:
        t0 = time.perf_counter()
        done = _spin(op, items, size, 0, seconds)
        wall = time.perf_counter() - t0
        return _Run(done, wall, (time.process_time() - cpu0) / wall)
    barrier = threading.Barrier(threads)
    spans: list[tuple[float, float, int]] = [(0.0, 0.0, 0)] * threads
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            barrier.wait()
            t0 = time.perf_counter()
            done = _spin(op, items, size, index * len(items) // threads, seconds)
            spans[index] = (t0, time.perf_counter(), done)
        except BaseException as exc:
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    if errors:
        raise errors[0]
    wall = max(s[1] for s in spans) - min(s[0] for s in spans)
    return _Run(sum(s[2] for s in spans), wall, (time.process_time() - cpu0) / wall)


def _result(
    group: str,
    stage: str,
    data: str,
    threads: int,
    runs: Sequence[_Run],
    ratio: float | None = None,
    note: str = "",
) -> Result:
    speeds = [r.mb_per_s for r in runs]
    server = [r.server_cpu for r in runs if r.server_cpu is not None]
    return Result(
        group=group,
        stage=stage,
        data=data,
        threads=threads,
        mb_per_s=round(statistics.median(speeds), 1),
        runs_mb_per_s=[round(s, 1) for s in speeds],
        cpu=round(statistics.median(r.cpu for r in runs), 2),
        ratio=None if ratio is None else round(ratio, 4),
        server_cpu=round(statistics.median(server), 2) if server else None,
        note=note,
    )


def _cpu_stage(
    cfg: Config,
    report: Report,
    group: str,
    stage: str,
    data: str,
    op: Callable[[T], object],
    items: Sequence[T],
    *,
    ratio: float | None = None,
    pool: bool = True,
    note: str = "",
) -> None:
    """Measure ``op`` on one thread and (if ``pool``) on ``cfg.threads`` threads.

    The runs of the two alternate, so that load from other processes hits both alike and
    their ratio (does the pool scale?) stays meaningful on a busy machine.
    """
    counts = [1] + ([cfg.threads] if pool and cfg.threads > 1 else [])
    runs: dict[int, list[_Run]] = {n: [] for n in counts}
    for threads in counts:
        _parallel(op, items, cfg.chunk_size, threads, cfg.warmup)
    for _ in range(cfg.runs):
        for threads in counts:
            runs[threads].append(_parallel(op, items, cfg.chunk_size, threads, cfg.seconds))
    for threads in counts:
        result = _result(group, stage, data, threads, runs[threads], ratio, note)
        report.results.append(result)
        _say(_row(result))


# --------------------------------------------------------------------------- data


_CORPUS: dict[tuple[content.Kind, int, int], bytes] = {}


def _chunks(kind: content.Kind, cfg: Config) -> list[bytearray]:
    """``cfg.buffers`` distinct chunks of ``kind`` (fresh copies of a cached corpus)."""
    size = cfg.chunk_size
    key = (kind, size, cfg.buffers)
    if key not in _CORPUS:
        _CORPUS[key] = content.make(kind, size * cfg.buffers, seed=1)
    data = _CORPUS[key]
    return [bytearray(data[i * size : (i + 1) * size]) for i in range(cfg.buffers)]


# --------------------------------------------------------------------------- CPU stages


def bench_zero(cfg: Config, report: Report) -> None:
    zero = ZeroCheck()
    zeros = [bytearray(cfg.chunk_size) for _ in range(2)]
    last = bytearray(cfg.chunk_size)
    last[-1] = 1
    data = _chunks("random", cfg)[:2]
    stage = "zero check (worker ZeroCheck.is_zero)"
    _cpu_stage(cfg, report, "zero", stage, "zero", zero.is_zero, zeros)
    _cpu_stage(cfg, report, "zero", stage, "last byte set", zero.is_zero, [last], pool=False)
    _cpu_stage(cfg, report, "zero", stage, "random", zero.is_zero, data, pool=False)
    reference = memoryview(bytes(cfg.chunk_size))

    def equal(buf: bytearray) -> bool:
        # bytearray on the left: bytearray's comparison is one memcmp; memoryview's
        # (what ZeroCheck.is_zero uses) compares item by item.
        return buf == reference[: len(buf)]

    stage = "zero check (bytearray == memoryview)"
    _cpu_stage(cfg, report, "zero", stage, "zero", equal, zeros, note="a possible fix")


def bench_hash(cfg: Config, report: Report) -> None:
    items = _chunks("random", cfg)

    def b3(buf: bytearray) -> str:
        return blake3.blake3(buf, max_threads=1).hexdigest()

    def sha(buf: bytearray) -> str:
        return hashlib.sha256(buf).hexdigest()

    _cpu_stage(cfg, report, "hash", "BLAKE3 (max_threads=1)", "random", b3, items)
    _cpu_stage(cfg, report, "hash", "SHA-256 (hashlib)", "random", sha, items)


def bench_zstd(cfg: Config, report: Report) -> None:
    for kind in ("random", "text", "binary"):
        items = _chunks(kind, cfg)
        blobs = [encode_blob(b, None, b"") for b in items]
        ratio = sum(len(b) for b in blobs) / (len(items) * cfg.chunk_size)

        def enc(buf: bytearray) -> bytes:
            return encode_blob(buf, None, b"")

        def dec(blob: bytes) -> bytes:
            return decode_blob(blob, None, b"")

        _cpu_stage(
            cfg,
            report,
            "zstd",
            "compress (encode_blob, zstd level 1)",
            kind,
            enc,
            items,
            ratio=ratio,
        )
        _cpu_stage(cfg, report, "zstd", "decompress (decode_blob)", kind, dec, blobs, ratio=ratio)
    # For comparison: a faster level on the compressible kinds (one thread).
    mixed = _chunks("text", cfg)[:4] + _chunks("binary", cfg)[:4]
    for level in (1, -1):
        compressor = zstandard.ZstdCompressor(level=level)
        ratio = sum(len(compressor.compress(b)) for b in mixed) / (len(mixed) * cfg.chunk_size)
        stage = f"compress (zstd level {level}, comparison)"
        _cpu_stage(
            cfg,
            report,
            "zstd",
            stage,
            "text+binary",
            compressor.compress,
            mixed,
            ratio=ratio,
            pool=False,
        )


def _per_cpu_second(
    op: Callable[[T], object], items: Sequence[T], size: int, seconds: float
) -> float:
    """MB of input ``op`` goes through per second of this thread's CPU time (at least
    one call, then until ``seconds`` of CPU time are spent)."""
    done = 0
    start = time.thread_time()
    while True:
        op(items[(done // size) % len(items)])
        done += size
        spent = time.thread_time() - start
        if spent >= seconds:
            return done / spent / MB


Codec = tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]


def _codecs(size: int) -> dict[str, Codec]:
    """Name -> (compress, decompress) of each codec compared (one thread's objects)."""
    found: dict[str, Codec] = {}
    dec = zstandard.ZstdDecompressor()
    for level in CODEC_LEVELS:
        comp = zstandard.ZstdCompressor(level=level)

        def unzstd(blob: bytes, dec: zstandard.ZstdDecompressor = dec) -> bytes:
            return dec.decompress(blob, max_output_size=size)

        found[f"zstd {level}"] = (comp.compress, unzstd)
    try:
        import lz4.block  # type: ignore[import-not-found,unused-ignore]  # optional
    except ImportError:
        return found

    def lz4_compress(data: bytes) -> bytes:
        return bytes(lz4.block.compress(data, store_size=False))

    def lz4_decompress(blob: bytes) -> bytes:
        return bytes(lz4.block.decompress(blob, uncompressed_size=size))

    found["lz4 (block)"] = (lz4_compress, lz4_decompress)
    return found


def bench_codecs(cfg: Config, report: Report) -> None:
    """Each codec on each kind of chunk; then its cost on the benchmark VM's content."""
    codecs = _codecs(cfg.chunk_size)
    if not any(name.startswith("lz4") for name in codecs):
        report.skipped.append("codecs: lz4 not installed (pip install lz4), not compared")
        _say(report.skipped[-1])
    kinds: tuple[content.Kind, ...] = ("random", "text", "binary")
    chunks = {kind: [bytes(b) for b in _chunks(kind, cfg)] for kind in kinds}
    share = {k: v / sum(content.DEFAULT_MIX.values()) for k, v in content.DEFAULT_MIX.items()}
    for name, (compress, decompress) in codecs.items():
        cpu_s, stored = 0.0, 0.0
        for kind in kinds:
            items = chunks[kind]
            blobs = [compress(b) for b in items]
            # As ``compress_body``: a blob no smaller than its chunk is kept as it is.
            ratio = sum(min(len(b), cfg.chunk_size) + 1 for b in blobs) / (
                len(items) * cfg.chunk_size
            )
            packed = [b for b in blobs if len(b) < cfg.chunk_size]
            rates: dict[str, list[float]] = {"compress": [], "decompress": []}
            _per_cpu_second(compress, items, cfg.chunk_size, cfg.warmup)
            for _ in range(cfg.runs):
                rates["compress"].append(
                    _per_cpu_second(compress, items, cfg.chunk_size, cfg.seconds)
                )
                if packed:
                    rates["decompress"].append(
                        _per_cpu_second(decompress, packed, cfg.chunk_size, cfg.seconds)
                    )
            for what, speeds in rates.items():
                if not speeds:
                    continue
                result = Result(
                    group="codecs",
                    stage=f"{what} {name} (per CPU second)",
                    data=kind,
                    threads=1,
                    mb_per_s=round(statistics.median(speeds), 1),
                    runs_mb_per_s=[round(x, 1) for x in speeds],
                    cpu=1.0,
                    ratio=round(ratio, 4),
                )
                report.results.append(result)
                _say(_row(result))
            mb = BENCH_CONTENT * share[kind] / MB
            cpu_s += mb / statistics.median(rates["compress"])
            stored += mb * ratio
        default = " (the default)" if name == f"zstd {DEFAULT_COMPRESSION_LEVEL}" else ""
        report.notes.append(
            f"{name + default:<22} the benchmark VM's full backup: compression"
            f" {cpu_s:5.2f} CPU s, stored {stored:6.0f} MB (zeros not stored)"
        )
        _say(report.notes[-1])


def bench_crypto(cfg: Config, report: Report) -> None:
    items = [bytes(b) for b in _chunks("random", cfg)]
    for cipher in crypto.CIPHERS:
        sealer = crypto.Sealer(cipher, os.urandom(32))

        def seal(buf: bytes, sealer: crypto.Sealer = sealer) -> bytes:
            return sealer.seal(buf, AAD)

        _cpu_stage(cfg, report, "crypto", f"seal {cipher}", "random", seal, items)


def bench_encode(cfg: Config, report: Report, scratch: Path) -> None:
    mixed = [b for kind in ("random", "text", "binary") for b in _chunks(kind, cfg)]

    async def open_repos() -> tuple[Repository, Repository, list[FilesystemDriver]]:
        plain_driver = FilesystemDriver(scratch / "repo-plain")
        sealed_driver = FilesystemDriver(scratch / "repo-aes")
        plain = await Repository.open_or_create(plain_driver, chunk_size=cfg.chunk_size)
        sealed = await Repository.open_or_create(
            sealed_driver, passphrase=BENCH_PASSPHRASE, chunk_size=cfg.chunk_size
        )
        return plain, sealed, [plain_driver, sealed_driver]

    async def close(drivers: Sequence[FilesystemDriver]) -> None:
        for driver in drivers:
            await driver.close()

    plain, sealed, drivers = asyncio.run(open_repos())
    try:
        for label, repo in (("plain", plain), ("aes-256-gcm", sealed)):

            def encode(buf: bytearray, repo: Repository = repo) -> bytes:
                return repo.encode_chunk(repo.chunk_id(buf), buf)

            stored = sum(len(encode(b)) for b in mixed)
            ratio = stored / (len(mixed) * cfg.chunk_size)
            stage = f"chunk_id + encode_chunk ({label})"
            _cpu_stage(cfg, report, "encode", stage, "mixed", encode, mixed, ratio=ratio)
    finally:
        asyncio.run(close(drivers))


# --------------------------------------------------------------------------- NBD


@contextlib.contextmanager
def qemu_nbd(image: Path, export: str = "bench") -> Iterator[tuple[int, int]]:
    """Serve ``image`` read-only with ``qemu-nbd`` on 127.0.0.1 (multi-conn); yields
    ``(port, pid)``."""
    port = free_port()
    proc = subprocess.Popen(
        [
            "qemu-nbd",
            "--read-only",
            "--persistent",
            "--shared=16",
            "--format=qcow2",
            "--bind=127.0.0.1",
            f"--port={port}",
            f"--export-name={export}",
            str(image),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"qemu-nbd exited with {proc.returncode}: {err}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("qemu-nbd did not listen within 30 s")
            time.sleep(0.05)
        yield port, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        if proc.stderr:
            proc.stderr.close()


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _read_export(
    reader: NbdClient | NbdPool, size: int, chunk: int, depth: int, fresh: bool
) -> None:
    """Read ``[0, size)`` in ``chunk``-sized reads, ``depth`` reads in flight; a new buffer
    for every read when ``fresh`` (as the worker does), else one buffer per reader."""
    position = 0

    async def runner() -> None:
        nonlocal position
        buf = bytearray(chunk)
        while position < size:
            offset = position
            position += chunk
            n = min(chunk, size - offset)
            if fresh:
                await reader.readinto(offset, bytearray(n))
            else:
                await reader.readinto(offset, memoryview(buf)[:n])

    await asyncio.gather(*(runner() for _ in range(depth)))


async def _timed_reads(
    port: int, pid: int, connections: int, cfg: Config, fresh: bool, size: int
) -> list[_Run]:
    reader: NbdClient | NbdPool
    if connections == 1:
        reader = await NbdClient.connect(host="127.0.0.1", port=port, export="bench")
    else:
        reader = await NbdPool.connect(connections, host="127.0.0.1", port=port, export="bench")
    runs = []
    try:
        await _read_export(
            reader, min(size, 64 * content.MiB), cfg.chunk_size, cfg.nbd_depth, fresh
        )
        for _ in range(cfg.nbd_runs):
            cpu0, server0 = time.process_time(), process_cpu(pid)
            t0 = time.perf_counter()
            await _read_export(reader, size, cfg.chunk_size, cfg.nbd_depth, fresh)
            wall = time.perf_counter() - t0
            cpu, server = time.process_time() - cpu0, process_cpu(pid) - server0
            runs.append(_Run(size, wall, cpu / wall, server / wall))
    finally:
        await reader.disconnect()
    return runs


def _nbdcopy(port: int, pid: int, size: int, cfg: Config, extra: Sequence[str]) -> list[_Run]:
    uri = f"nbd://127.0.0.1:{port}/bench"
    command = ["nbdcopy", *extra, uri, "null:"]
    runs = []
    for _ in range(cfg.nbd_runs):
        before, server0 = resource.getrusage(resource.RUSAGE_CHILDREN), process_cpu(pid)
        t0 = time.perf_counter()
        subprocess.run(command, check=True, timeout=300)
        wall = time.perf_counter() - t0
        after, server = resource.getrusage(resource.RUSAGE_CHILDREN), process_cpu(pid) - server0
        cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        runs.append(_Run(size, wall, cpu / wall, server / wall))
    return runs


def bench_nbd(cfg: Config, report: Report, scratch: Path) -> None:
    if shutil.which("qemu-nbd") is None or shutil.which("qemu-io") is None:
        report.skipped.append("nbd: qemu-nbd or qemu-io not installed (apt-get install qemu-utils)")
        _say(report.skipped[-1])
        return
    image = scratch / "nbd.qcow2"
    t0 = time.perf_counter()
    content.create_mixed_image(image, cfg.nbd_size, cfg.nbd_size, seed=2, segment=64 * content.MiB)
    made = time.perf_counter() - t0
    _say(f"  (made a {cfg.nbd_size / content.GiB:g} GiB mixed qcow2 in {made:.1f} s)")
    size = cfg.nbd_size
    depth = cfg.nbd_depth
    try:
        with qemu_nbd(image) as (port, pid):
            for connections, fresh in ((1, True), (2, True), (4, True), (1, False)):
                kind = "NbdClient" if connections == 1 else f"NbdPool({connections})"
                runs = asyncio.run(_timed_reads(port, pid, connections, cfg, fresh, size))
                buffers = "new buffer per read" if fresh else "reused buffers"
                result = _result(
                    "nbd",
                    f"{kind}.readinto {cfg.chunk_size // content.MiB} MiB x{depth}",
                    "mixed qcow2",
                    connections,
                    runs,
                    note=f"{connections} connection(s), {buffers}",
                )
                report.results.append(result)
                _say(_row(result))
            if shutil.which("nbdcopy") is None:
                report.skipped.append("nbdcopy: not installed (apt-get install libnbd-bin)")
                return
            for extra, connections in ((["--connections=1"], 1), ([], 4)):
                runs = _nbdcopy(port, pid, size, cfg, extra)
                result = _result(
                    "nbd",
                    "nbdcopy to null: " + " ".join(extra),
                    "mixed qcow2",
                    connections,
                    runs,
                    note="libnbd, C; cpu = the child's",
                )
                report.results.append(result)
                _say(_row(result))
    finally:
        image.unlink(missing_ok=True)


# --------------------------------------------------------------------------- filesystem


async def _puts(
    driver: FilesystemDriver, blobs: Sequence[bytes], depth: int, seconds: float
) -> tuple[_Run, list[str]]:
    keys: list[str] = []
    done = 0
    deadline = time.perf_counter() + seconds

    async def runner(index: int) -> None:
        nonlocal done
        i = index
        while time.perf_counter() < deadline:
            key = chunk_key(secrets.token_hex(32))
            keys.append(key)
            await driver.put(key, blobs[i % len(blobs)])
            done += len(blobs[i % len(blobs)])
            i += 1

    cpu0 = time.process_time()
    t0 = time.perf_counter()
    await asyncio.gather(*(runner(i) for i in range(depth)))
    wall = time.perf_counter() - t0
    return _Run(done, wall, (time.process_time() - cpu0) / wall), keys


def bench_fs(cfg: Config, report: Report, scratch: Path) -> None:
    blobs = [bytes(b) for b in _chunks("random", cfg)]

    async def measure(fsync: bool, depth: int) -> list[_Run]:
        driver = FilesystemDriver(scratch / "fs", fsync=fsync)
        try:
            _, keys = await _puts(driver, blobs, depth, cfg.warmup)
            await driver.delete_many(keys)
            runs = []
            for _ in range(cfg.runs):
                run, keys = await _puts(driver, blobs, depth, cfg.seconds)
                runs.append(run)
                await driver.delete_many(keys)
            return runs
        finally:
            await driver.close()

    for fsync, depth in ((True, 1), (True, cfg.fs_depth), (False, cfg.fs_depth)):
        runs = asyncio.run(measure(fsync, depth))
        stage = f"FilesystemDriver.put {'with' if fsync else 'without'} fsync"
        result = _result("fs", stage, "random", depth, runs, note=f"{depth} put(s) in flight")
        report.results.append(result)
        _say(_row(result))
    shutil.rmtree(scratch / "fs", ignore_errors=True)


# --------------------------------------------------------------------------- report


HEADER: Final = (
    f"{'stage':<44} {'data':<14} {'thr':>3} {'MB/s':>7} {'min-max':>13}"
    f" {'cpu':>5} {'srv':>5} {'ratio':>6}"
)


#: The benchmark VM (``bench/run.py`` defaults): disk, content, scattered writes.
BENCH_DISK: Final = 4 * content.GiB
BENCH_WRITES: Final = 200 * content.MiB
GRANULE: Final = 64 * 1024


@dataclass
class _PartChunk:
    parent: bytes | None
    child: bytes
    ranges: list[tuple[int, int]]


#: The guest writes' content seeds before VirtBackup's full backup in one repetition of
#: ``bench/run.py`` (virtnbdbackup's incremental, then virtnbdbackup ``-z``'s, at the same
#: offsets), and of the writes before VirtBackup's incremental (2 workers, repetition 0).
PEER_WRITE_SEEDS: Final = (1, 2)
VB_WRITE_SEED: Final = 12


def _write_into(
    state: dict[int, bytearray], offsets: Sequence[int], chunk: int, content_seed: int
) -> None:
    """``peer.guest_writes`` replayed on the disk's chunks (absent: all zero)."""
    from bench import peer

    kinds: tuple[content.Kind, ...] = ("text", "binary", "random")
    per_kind = (len(offsets) // len(kinds) + 1) * peer.WRITE_SIZE
    readers = {
        k: content.Reader(
            content.stream(k, per_kind, seed=content_seed, skip=content_seed * per_kind)
        )
        for k in kinds
    }
    for number, offset in enumerate(offsets):
        data = b"".join(readers[kinds[number % len(kinds)]].take(peer.WRITE_SIZE))
        for index in range(offset // chunk, (offset + len(data) - 1) // chunk + 1):
            buf = state.get(index)
            if buf is None:
                buf = state[index] = bytearray(chunk)
            lo, hi = max(offset, index * chunk), min(offset + len(data), (index + 1) * chunk)
            buf[lo - index * chunk : hi - index * chunk] = data[lo - offset : hi - offset]


def _bench_chunks(chunk: int) -> tuple[list[bytes], list[_PartChunk]]:
    """The benchmark VM's non-zero chunks at VirtBackup's full backup and the chunks its
    scattered writes then touch (parent, child, dirty ranges rounded to the bitmap's
    granules), as one repetition of ``bench/run.py`` makes them (seed 0): the layout, the
    peer's two rounds of writes (:data:`PEER_WRITE_SEEDS`), then VirtBackup's
    (:data:`VB_WRITE_SEED`), all at the same offsets. Every chunk the writes touch has
    data by VirtBackup's incremental: the peer's rounds wrote there first."""
    from bench import peer  # libvirt's module: imported for this group only

    offsets = peer.write_offsets(BENCH_DISK, BENCH_WRITES, peer.WRITE_SIZE, seed=0)
    dirty: dict[int, list[tuple[int, int]]] = {}
    for offset in offsets:
        start = offset // GRANULE * GRANULE
        end = -(-(offset + peer.WRITE_SIZE) // GRANULE) * GRANULE
        for index in range(start // chunk, (end - 1) // chunk + 1):
            lo, hi = max(start, index * chunk), min(end, (index + 1) * chunk)
            dirty.setdefault(index, []).append((lo - index * chunk, hi - lo))
    state: dict[int, bytearray] = {}
    by_kind: dict[content.Kind, list[content.Segment]] = {}
    for seg in content.mixed_layout(BENCH_DISK, BENCH_CONTENT, seed=0):
        by_kind.setdefault(seg.kind, []).append(seg)
    for kind, segs in by_kind.items():
        segs.sort(key=lambda s: s.skip)
        total = sum(seg.length for seg in segs)
        reader = content.Reader(content.stream(kind, total, seed=0, skip=segs[0].skip))
        for seg in segs:
            disk = bytearray(b"".join(reader.take(seg.length)))
            for pos in range(0, seg.length, chunk):
                if kind != "zero":
                    state[(seg.offset + pos) // chunk] = disk[pos : pos + chunk]
    for seed in PEER_WRITE_SEEDS:
        _write_into(state, offsets, chunk, seed)
    full = [bytes(state[i]) for i in sorted(state)]
    parents = {i: bytes(state[i]) if i in state else None for i in dirty}
    _write_into(state, offsets, chunk, VB_WRITE_SEED)
    parts = [
        _PartChunk(parents[index], bytes(state[index]), _merged(dirty[index]))
        for index in sorted(dirty)
    ]
    return [c for c in full if c != bytes(len(c))], parts


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, n in sorted(ranges):
        if out and start <= out[-1][0] + out[-1][1]:
            prev = out[-1]
            out[-1] = (prev[0], max(prev[0] + prev[1], start + n) - prev[0])
        else:
            out.append((start, n))
    return out


@dataclass
class _Cost:
    steps: dict[str, float]
    stored: int


_STEPS: Final = ("decode parent", "verify parent", "fill gaps", "hash", "compress")


def _partial_cpu(parts: list[_PartChunk], framed: bool) -> list[_Cost]:
    """One thread's CPU seconds per step for each of ``parts`` as the worker does it
    (``codec.compress_framed`` with the parent's records for the frames no dirty range
    touches, as ``units.read_in_part`` gives them, or ``codec.compress_body`` of the
    whole chunk, as a format-1 repository does), and the bytes its blob takes."""
    blobs = [
        b""
        if p.parent is None
        else compress_framed(p.parent, 1)
        if framed
        else compress_body(p.parent, 1)
        for p in parts
    ]
    out = bytearray(max(len(p.child) for p in parts))
    parent = bytearray(len(out))
    costs = []
    for part, blob in zip(parts, blobs, strict=True):
        length = len(part.child)
        view = memoryview(out)[:length]
        t0 = time.thread_time()
        if part.parent is not None:
            decode_blob_into(blob, None, b"", parent)
            t1 = time.thread_time()
            blake3.blake3(memoryview(parent)[:length], max_threads=1).digest()
            t2 = time.thread_time()
        else:
            t1 = t2 = t0
        view[:] = part.child  # the gaps from the parent, the ranges from the export
        t3 = time.thread_time()
        blake3.blake3(view, max_threads=1).digest()
        t4 = time.thread_time()
        if framed:
            if part.parent is not None:
                _, records = framed_records(blob)
                stored = len(compress_framed(view, 1, records, clean_frames(part.ranges, length)))
            else:
                stored = len(compress_framed(view, 1))
        else:
            stored = len(compress_body(view, 1))
        t5 = time.thread_time()
        spent = (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)
        costs.append(_Cost(dict(zip(_STEPS, spent, strict=True)), stored))
    return costs


def bench_partial(cfg: Config, report: Report) -> None:
    """The incremental's chunks read in part, one frame (format 1) against framed
    (format 2, ``codec.FRAME_SIZE`` frames), interleaved runs."""
    full, parts = _bench_chunks(cfg.chunk_size)
    with_parent = [i for i, p in enumerate(parts) if p.parent is not None]
    frames = sum(len(clean_frames(parts[i].ranges, len(parts[i].child))) for i in with_parent)
    total = sum(-(-len(parts[i].child) // FRAME_SIZE) for i in with_parent)
    kib = FRAME_SIZE >> 10
    _say(
        f"partial: {len(parts)} chunks touched, {len(with_parent)} with a parent that is not"
        f" all zero; framed, {frames} of their {total} frames of {kib} KiB are copied from"
        " the parent"
    )
    runs: dict[bool, list[list[_Cost]]] = {False: [], True: []}
    for _ in range(cfg.runs):
        for framed in (False, True):
            runs[framed].append(_partial_cpu(parts, framed))
    for subset, chosen in (("all", range(len(parts))), ("with a parent", with_parent)):
        if not chosen:
            continue
        for framed in (False, True):
            name = f"framed ({kib} KiB)" if framed else "one frame (format 1)"
            med = {
                step: statistics.median(
                    sum(run[i].steps[step] for i in chosen) for run in runs[framed]
                )
                for step in _STEPS
            }
            stored = sum(runs[framed][0][i].stored for i in chosen)
            report.notes.append(
                f"{name:<22} {len(chosen):3d} chunks ({subset}): {sum(med.values()):5.2f} CPU s ("
                + ", ".join(f"{k} {v:.3f}" for k, v in med.items())
                + f"); stored {stored / MB:6.1f} MB"
            )
            _say(report.notes[-1])
    one = sum(len(compress_body(c, 1)) for c in full)
    framed_size = sum(len(compress_framed(c, 1)) for c in full)
    report.notes.append(
        f"full backup before it ({len(full)} chunks): stored {one / MB:.1f} MB in one frame,"
        f" {framed_size / MB:.1f} MB framed"
    )
    _say(report.notes[-1])


def _speed(value: float) -> str:
    return f"{value:.0f}" if value < 1e6 else f"{value:.0e}"


def _row(r: Result) -> str:
    spread = f"{_speed(min(r.runs_mb_per_s))}-{_speed(max(r.runs_mb_per_s))}"
    ratio = f"{r.ratio:.3f}" if r.ratio is not None else ""
    server = f"{r.server_cpu:.2f}" if r.server_cpu is not None else ""
    return (
        f"{r.stage:<44} {r.data:<14} {r.threads:>3} {_speed(r.mb_per_s):>7}"
        f" {spread:>13} {r.cpu:>5.2f} {server:>5} {ratio:>6}"
    ).rstrip()


def table(report: Report) -> str:
    lines = [HEADER, "-" * len(HEADER)]
    group = ""
    for r in report.results:
        if group and r.group != group:
            lines.append("")
        group = r.group
        lines.append(_row(r))
    if report.notes:
        lines += ["", *report.notes]
    lines += [f"skipped: {s}" for s in report.skipped]
    return "\n".join(lines)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _tool_version(*command: str) -> str:
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    return out.splitlines()[0] if out else "?"


def machine_info() -> dict[str, Any]:
    """What the numbers depend on: CPU, cores, load, library and tool versions."""
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "cpu_count": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "kernel": platform.release(),
        "python": platform.python_version(),
        "blake3": _version("blake3"),
        "zstandard": _version("zstandard"),
        "cryptography": _version("cryptography"),
        "qemu-nbd": _tool_version("qemu-nbd", "--version"),
        "nbdcopy": _tool_version("nbdcopy", "--version"),
    }


def run(cfg: Config) -> Report:
    """Run the selected stage groups and return the report."""
    started = time.perf_counter()
    report = Report(machine=machine_info(), parameters=asdict(cfg))
    _say(HEADER)
    scratch = Path(tempfile.mkdtemp(prefix="vb-stages-", dir=cfg.tmpdir))
    scratch.chmod(0o755)
    try:
        steps: dict[str, Callable[[], None]] = {
            "zero": lambda: bench_zero(cfg, report),
            "hash": lambda: bench_hash(cfg, report),
            "zstd": lambda: bench_zstd(cfg, report),
            "codecs": lambda: bench_codecs(cfg, report),
            "crypto": lambda: bench_crypto(cfg, report),
            "encode": lambda: bench_encode(cfg, report, scratch),
            "nbd": lambda: bench_nbd(cfg, report, scratch),
            "fs": lambda: bench_fs(cfg, report, scratch),
            "partial": lambda: bench_partial(cfg, report),
        }
        for group in GROUPS:
            if group in cfg.groups:
                t0 = time.perf_counter()
                steps[group]()
                report.group_seconds[group] = round(time.perf_counter() - t0, 1)
                _say(f"  ({group}: {report.group_seconds[group]} s)")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report.machine["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    report.seconds = round(time.perf_counter() - started, 1)
    return report


def parse_size(text: str) -> int:
    """``4194304``, ``4M``, ``4MiB``, ``1G``, ``512K`` (binary units)."""
    units = {"": 1, "K": content.KiB, "M": content.MiB, "G": content.GiB}
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    suffix = value[-1] if value and value[-1] in "KMG" else ""
    number = value[: len(value) - len(suffix)]
    size = int(float(number) * units[suffix])
    if size <= 0:
        raise argparse.ArgumentTypeError(f"not a positive size: {text!r}")
    return size


def main(argv: Sequence[str] | None = None) -> int:
    defaults = Config()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--chunk-size", type=parse_size, default=defaults.chunk_size, help="default 4M"
    )
    parser.add_argument("--seconds", type=float, default=defaults.seconds, help="per run")
    parser.add_argument("--warmup", type=float, default=defaults.warmup, help="seconds")
    parser.add_argument("--runs", type=int, default=defaults.runs, help="median of this many")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="pool size")
    parser.add_argument(
        "--buffers", type=int, default=defaults.buffers, help="distinct chunks per kind"
    )
    parser.add_argument("--nbd-size", type=parse_size, default=defaults.nbd_size, help="image size")
    parser.add_argument(
        "--nbd-runs", type=int, default=defaults.nbd_runs, help="full reads per line"
    )
    parser.add_argument("--nbd-depth", type=int, default=defaults.nbd_depth, help="reads in flight")
    parser.add_argument("--fs-depth", type=int, default=defaults.fs_depth, help="puts in flight")
    parser.add_argument("--tmpdir", default=None, help="scratch directory (default: $TMPDIR)")
    parser.add_argument("--only", default=",".join(GROUPS), help=f"groups: {','.join(GROUPS)}")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    groups = tuple(g.strip() for g in args.only.split(",") if g.strip())
    unknown = set(groups) - set(GROUPS)
    if unknown:
        parser.error(f"unknown groups {sorted(unknown)} (known: {', '.join(GROUPS)})")
    cfg = Config(
        chunk_size=args.chunk_size,
        seconds=args.seconds,
        warmup=args.warmup,
        runs=args.runs,
        threads=args.threads,
        buffers=args.buffers,
        nbd_size=args.nbd_size,
        nbd_runs=args.nbd_runs,
        nbd_depth=args.nbd_depth,
        fs_depth=args.fs_depth,
        tmpdir=args.tmpdir,
        groups=groups,
    )
    report = run(cfg)
    info = report.machine
    print(
        f"\n{info['cpu']}, {info['cpu_count']} cores, load {info['load_average']}"
        f" -> {info['load_average_after']}; chunk {cfg.chunk_size} B;"
        f" median of {cfg.runs} x {cfg.seconds} s; {report.seconds} s in all\n"
    )
    print(table(report))
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
