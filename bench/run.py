"""The benchmark: VirtBackup against virtnbdbackup on the same VMs, in one run.

On a VM with a 4 GiB qcow2 disk (``cache='none'``, like production hosts) holding about
2 GiB of mixed content (binaries, text, random data, written zeros), each repetition runs,
for virtnbdbackup and then VirtBackup (through its HTTP API, to a new local repository):

* ``full``: a full backup;
* ``clone`` (VirtBackup): a second VM cloned from the same image, backed up into the same
  repository after the first: the new bytes it stores;
* ``incremental``: 200 guest writes of 1 MiB at page-aligned offsets aligned to no chunk
  size (the same offsets for both tools, from ``--seed``), then an incremental backup;
* ``zero``: an incremental with nothing written since the last one (a job's fixed cost);
* ``restore``: a restore of the latest point to a new image, checked against the VM's
  disk with ``qemu-img compare``;
* ``parallel``: four more VMs (1 GiB disks, 512 MiB of content each) backed up at once,
  against one of them alone: total throughput and each VM's job duration.

The peer is also run with ``-z`` (lz4) for the stored bytes (full, incremental, 0-byte).
By default the page cache is dropped before every timed step of both tools (``cold``);
``--warm`` keeps it (each full backup then starts with the VM's image read once). Each
step's CPU seconds (the tool's processes, QEMU's NBD server, ``qemu-nbd``) and the
transfer workers' peak memory are read from ``/proc`` (``bench/measure.py``).

It prints the medians as a table with the issue's targets and writes everything as JSON.
Run it with ``python3 dev.py bench`` (``task bench``), or for a subset::

    .venv/bin/python bench/run.py --reps 1 --steps full,incremental [--warm] [--chunk-size 1M]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import measure, peer, report, vb
from bench.measure import Monitor, Usage
from virtbackup.repository.format import check_chunk_size
from virtbackup.virt import Connection, open_connection

MiB: Final = 1 << 20
GiB: Final = 1 << 30
T = TypeVar("T")

STEPS: Final = ("full", "clone", "incremental", "zero", "restore", "parallel")
#: ``virtbackup up``'s number of transfer workers (``--workers`` there).
DEFAULT_WORKERS: Final = 2
#: How often a VirtBackup job that failed on a TLS handshake is run again.
TLS_RETRIES: Final = 2
VB: Final = "virtbackup"
PEER: Final = "virtnbdbackup"
PEER_Z: Final = "virtnbdbackup -z"


@dataclass
class StepResult:
    """One timed step of one tool."""

    tool: str
    step: str
    rep: int
    #: ``cold`` (page cache dropped before the step) or ``warm``.
    cache: str
    #: VirtBackup's number of transfer-worker processes.
    workers: int | None
    seconds: float
    #: The VM data the step is about: the content for full backups and restores, the
    #: bytes written for an incremental, 0 for the 0-byte incremental.
    data_bytes: int
    #: Bytes the step added to the destination (file sizes); a restore: None.
    stored_bytes: int | None
    usage: Usage
    #: A restore: whether ``qemu-img compare`` found the images identical.
    identical: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def parse_size(text: str) -> int:
    """``4M``, ``512K``, ``1MiB``, ``4194304`` -> bytes."""
    found = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)(i?[bB])?\s*", text)
    if not found:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    unit = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[found.group(2).lower()]
    return int(found.group(1)) * unit


def chunk_size_arg(text: str) -> int:
    """A ``--chunk-size`` the repository accepts (``format.check_chunk_size``)."""
    try:
        return check_chunk_size(parse_size(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def steps_arg(text: str) -> tuple[str, ...]:
    wanted = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in wanted if s not in STEPS]
    if unknown or not wanted:
        raise argparse.ArgumentTypeError(f"--steps: from {', '.join(STEPS)}; got {unknown}")
    return wanted


def workers_arg(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(sorted({int(s) for s in text.split(",") if s.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError("--workers: numbers, e.g. 1,2") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("--workers: numbers of at least 1, e.g. 1,2")
    return counts


def machine() -> dict[str, Any]:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "kernel": os.uname().release,
        "memory_gib": round(memory / GiB, 1),
        "kvm": os.path.exists("/dev/kvm"),
        "load": [round(x, 2) for x in os.getloadavg()],
    }


def _versions() -> dict[str, str | None]:
    def first_line(argv: list[str]) -> str | None:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        except OSError:
            return None
        return (
            (out.stdout or out.stderr).strip().splitlines()[0] if out.stdout or out.stderr else None
        )

    return {
        "virtnbdbackup": peer.peer_version(),
        "qemu": first_line(["qemu-img", "--version"]),
        "libvirt": first_line(["libvirtd", "--version"]),
    }


class Bench:
    """One run: the VMs, the work directory, the monitor, the results."""

    def __init__(self, args: argparse.Namespace, conn: Connection, workdir: Path) -> None:
        self.args = args
        self.conn = conn
        self.workdir = workdir
        self.monitor = Monitor(str(workdir) + "/", interval=args.interval)
        self.results: list[StepResult] = []
        self.vm: peer.PreparedVm | None = None
        self.small: list[peer.PreparedVm] = []
        self.writes: peer.GuestWrites | None = None
        self.failures: list[str] = []
        #: Whether VirtBackup's restore has replaced the main VM's disk since it was made
        #: (``remake_vm``), and the content seeds of the guest writes the peer's chains made
        #: in the current repetition (replayed on a remade VM before VirtBackup's chain).
        self.vm_replaced = False
        self.peer_seeds: list[int] = []

    # ---------------------------------------------------------------- helpers

    def wants(self, *steps: str) -> bool:
        return any(s in self.args.steps for s in steps)

    @property
    def chain(self) -> bool:
        """Whether the main VM's backup chain runs (any step but ``parallel``)."""
        return self.wants("full", "clone", "incremental", "zero", "restore")

    async def before(self, cache: str, images: tuple[Path, ...] = ()) -> None:
        """Before a timed step: cold, drop the page cache; warm, read the images once (before
        a full backup, as the bench did before cold runs) and write back dirty pages."""
        if cache == "cold":
            await asyncio.to_thread(measure.drop_caches)
            return
        for image in images:
            await asyncio.to_thread(peer.warm_image, image)
        await asyncio.to_thread(measure.settle)

    async def timed(self, work: Awaitable[T], qemu: tuple[int | None, ...] = ()) -> tuple[T, Usage]:
        window = self.monitor.begin(qemu)
        try:
            result = await work
        except BaseException:
            window.end()
            raise
        return result, window.end()

    async def vb_timed(
        self,
        cache: str,
        job: Callable[[], Awaitable[T]],
        qemu: tuple[int | None, ...] = (),
        images: tuple[Path, ...] = (),
    ) -> tuple[T, Usage, int]:
        """:meth:`before`, then a timed VirtBackup job: (its result, usage, retries). A job
        that failed on the NBD export's TLS handshake (:attr:`vb.JobFailed.tls`: another
        VirtBackup installation on this machine rewrote the host's certificates) is
        run again, at most :data:`TLS_RETRIES` times; the retries are recorded."""
        for attempt in range(TLS_RETRIES + 1):
            await self.before(cache, images)
            try:
                result, usage = await self.timed(job(), qemu)
            except vb.JobFailed as exc:
                if not exc.tls or attempt == TLS_RETRIES:
                    raise
                print(f"  retrying after a TLS failure: {exc}", flush=True)
                continue
            return result, usage, attempt
        raise AssertionError("unreachable")

    def record(self, result: StepResult) -> None:
        self.results.append(result)
        u = result.usage
        rss = max(u.worker_peak_rss.values(), default=0)
        print(
            f"  {result.cache} rep {result.rep + 1} {result.tool:<17}"
            f"{f' ({result.workers}w)' if result.workers else '':<5} {result.step:<12}"
            f" {result.seconds:7.2f} s  cpu {u.cpu_total:6.2f} s"
            + (f"  stored {result.stored_bytes / 1e6:7.1f} MB" if result.stored_bytes else "")
            + (f"  worker rss {rss / MiB:.0f} MiB" if rss else "")
            + ("" if result.identical is None else f"  identical={result.identical}"),
            flush=True,
        )

    async def guest_writes(self, vm: peer.PreparedVm, content_seed: int) -> peer.GuestWrites:
        """The scattered writes: same offsets every time (``--seed``), new content (a
        rewrite of the bytes already there would let a deduplicating tool skip them)."""
        writes = await peer.guest_writes(
            self.conn,
            vm,
            self.args.writes * self.args.write_size,
            size=self.args.write_size,
            offsets_seed=self.args.seed,
            content_seed=content_seed,
        )
        self.writes = writes
        return writes

    # ---------------------------------------------------------------- the peer

    async def peer_chain(self, rep: int, cache: str, compress: bool) -> None:
        assert self.vm is not None
        vm, tool = self.vm, PEER_Z if compress else PEER
        backup = self.workdir / f"peer{'-z' if compress else ''}-{cache}-{rep}"
        restored = self.workdir / f"{backup.name}-restore"
        qemu = (peer.qemu_pid(vm.name),)

        def result(step: str, run: peer.PeerRun, usage: Usage, data: int) -> StepResult:
            return StepResult(
                tool=tool, step=step, rep=rep, cache=cache, workers=None, seconds=run.seconds,
                data_bytes=data, stored_bytes=run.bytes_stored, usage=usage,
                extra={"data_extents_bytes": run.data_bytes},
            )  # fmt: skip

        await peer.remove_checkpoints(self.conn, vm.name)
        try:
            await self.before(cache, (vm.image,))
            run, usage = await self.timed(
                peer.peer_backup(vm.name, backup, "full", compress=compress), qemu
            )
            self.record(result("full", run, usage, vm.content_bytes))
            if self.wants("incremental"):
                seed = 100 * rep + 1 + int(compress)
                writes = await self.guest_writes(vm, content_seed=seed)
                self.peer_seeds.append(seed)
                await self.before(cache)
                run, usage = await self.timed(
                    peer.peer_backup(vm.name, backup, "inc", compress=compress), qemu
                )
                self.record(result("incremental", run, usage, writes.bytes))
            if self.wants("zero"):
                await self.before(cache)
                run, usage = await self.timed(
                    peer.peer_backup(vm.name, backup, "inc", compress=compress), qemu
                )
                self.record(result("zero", run, usage, 0))
            if self.wants("restore") and not compress:
                await self.before(cache)
                run, usage = await self.timed(peer.peer_restore(backup, restored))
                if run.image is None:
                    raise peer.PeerError(f"virtnbdrestore left no image in {restored}")
                same, said = await asyncio.to_thread(peer.compare_images, vm.image, run.image)
                step = result("restore", run, usage, vm.content_bytes)
                step.stored_bytes, step.identical = None, same
                step.extra["compare"] = said
                self.record(step)
                if not same:
                    self.failures.append(f"{tool} restore ({cache}, rep {rep + 1}): {said}")
        finally:
            await peer.remove_checkpoints(self.conn, vm.name, prefix=peer.PEER_CHECKPOINT_PREFIX)
            shutil.rmtree(backup, ignore_errors=True)
            shutil.rmtree(restored, ignore_errors=True)
            (self.workdir / f"{restored.name}.log").unlink(missing_ok=True)

    # ---------------------------------------------------------------- VirtBackup

    async def vb_chain(self, rep: int, cache: str, workers: int) -> None:
        assert self.vm is not None
        vm = self.vm
        repo = self.workdir / f"vb-repo-{cache}-{workers}-{rep}"
        shutil.rmtree(repo, ignore_errors=True)
        await vb.create_repository(repo, self.args.chunk_size, self.args.compression_level)
        await peer.remove_checkpoints(self.conn, vm.name)
        qemu = (peer.qemu_pid(vm.name),)

        def result(step: str, seconds: float, usage: Usage, data: int, stored: int | None,
                   job: dict[str, Any] | None, retries: int) -> StepResult:  # fmt: skip
            extra = {}
            if job:
                extra = {
                    "bytes_read": job.get("bytesTransferred"),
                    "seen_seconds": job.get("seenSeconds"),
                }
            if retries:
                extra["tls_retries"] = retries
            return StepResult(
                tool=VB, step=step, rep=rep, cache=cache, workers=workers, seconds=seconds,
                data_bytes=data, stored_bytes=stored, usage=usage, extra=extra,
            )  # fmt: skip

        try:
            with vb.VirtBackup(workers, self.workdir) as system:
                async with system.client() as api:
                    await vb.configure(api, {"bench": repo})
                    stored = peer.stored_bytes(repo)

                    def backup() -> Awaitable[tuple[float, dict[str, Any]]]:
                        return vb.backup(api, vm.name, "bench")

                    (seconds, job), usage, retries = await self.vb_timed(
                        cache, backup, qemu, (vm.image,)
                    )
                    full_stored = peer.stored_bytes(repo) - stored
                    self.record(
                        result("full", seconds, usage, vm.content_bytes, full_stored, job, retries)
                    )
                    if self.wants("clone"):
                        await self.clone(rep, cache, workers, api, repo, full_stored)
                    if self.wants("incremental"):
                        writes = await self.guest_writes(vm, content_seed=100 * rep + 10 + workers)
                        stored = peer.stored_bytes(repo)
                        (seconds, job), usage, retries = await self.vb_timed(cache, backup, qemu)
                        added = peer.stored_bytes(repo) - stored
                        self.record(
                            result("incremental", seconds, usage, writes.bytes, added, job, retries)
                        )
                    if self.wants("zero"):
                        stored = peer.stored_bytes(repo)
                        (seconds, job), usage, retries = await self.vb_timed(cache, backup, qemu)
                        added = peer.stored_bytes(repo) - stored
                        self.record(result("zero", seconds, usage, 0, added, job, retries))
                    if self.wants("restore"):
                        await self.vb_restore(rep, cache, workers, api, result)
        finally:
            shutil.rmtree(repo, ignore_errors=True)
            await peer.remove_checkpoints(self.conn, vm.name)

    async def vb_restore(self, rep: int, cache: str, workers: int, api: Any, result: Any) -> None:
        assert self.vm is not None
        vm = self.vm
        reference = self.workdir / f"reference-{cache}-{workers}-{rep}.qcow2"
        await asyncio.to_thread(
            subprocess.run,
            ["qemu-img", "convert", "-U", "-O", "qcow2", str(vm.image), str(reference)],
            check=True,
        )
        try:
            await vb.vm_action(api, vm.name, "forceOff")
            entry = await vb.latest_point(api, vm.name, "bench")
            (seconds, job), usage, retries = await self.vb_timed(
                cache, lambda: vb.restore(api, entry, "bench")
            )
            same, said = await asyncio.to_thread(peer.compare_images, reference, vm.image)
        finally:
            reference.unlink(missing_ok=True)
        step: StepResult = result("restore", seconds, usage, vm.content_bytes, None, job, retries)
        step.identical = same
        step.extra["compare"] = said
        self.record(step)
        self.vm_replaced = True
        if not same:
            self.failures.append(f"VirtBackup restore ({cache}, rep {rep + 1}): {said}")
        await vb.vm_action(api, vm.name, "start")

    async def clone(
        self, rep: int, cache: str, workers: int, api: Any, repo: Path, first_stored: int
    ) -> None:
        """A VM cloned from the same image, backed up after the first into its repository."""
        assert self.vm is not None
        name = f"{self.vm.name}-clone"
        twin = await peer.clone_vm(self.conn, self.vm, name, base=self.workdir)
        try:
            stored = peer.stored_bytes(repo)
            (seconds, job), usage, retries = await self.vb_timed(
                cache,
                lambda: vb.backup(api, twin.name, "bench"),
                (peer.qemu_pid(twin.name),),
                (twin.image,),
            )
            added = peer.stored_bytes(repo) - stored
        finally:
            await peer.remove_prepared_vm(self.conn, twin)
        self.record(StepResult(
            tool=VB, step="clone", rep=rep, cache=cache, workers=workers, seconds=seconds,
            data_bytes=twin.content_bytes, stored_bytes=added, usage=usage,
            extra={"bytes_read": job.get("bytesTransferred"), "first_vm_stored": first_stored,
                   "new_fraction": added / first_stored if first_stored else None,
                   "tls_retries": retries},
        ))  # fmt: skip

    # ---------------------------------------------------------------- several VMs at once

    async def parallel(self, rep: int, cache: str) -> None:
        vms = self.small
        names = [v.name for v in vms]
        qemus = tuple(peer.qemu_pid(n) for n in names)
        content = sum(v.content_bytes for v in vms)
        workers = self.target_workers
        for name in names:
            await peer.remove_checkpoints(self.conn, name)
        # The peer: one VM alone, then all at once (one process per VM, as it runs).
        dirs = [self.workdir / f"peer-par-{cache}-{rep}-{i}" for i in range(len(vms))]
        solo_dir = self.workdir / f"peer-par-{cache}-{rep}-solo"
        try:
            await self.before(cache, (vms[0].image,))
            run, usage = await self.timed(peer.peer_backup(names[0], solo_dir, "full"), qemus[:1])
            self.record(StepResult(
                tool=PEER, step="parallel-1", rep=rep, cache=cache, workers=None,
                seconds=run.seconds, data_bytes=vms[0].content_bytes,
                stored_bytes=run.bytes_stored, usage=usage,
            ))  # fmt: skip
            await self.before(cache, tuple(v.image for v in vms))
            started = time.monotonic()
            runs, usage = await self.timed(
                asyncio.gather(
                    *(peer.peer_backup(n, d, "full") for n, d in zip(names, dirs, strict=True))
                ),
                qemus,
            )
            self.record(StepResult(
                tool=PEER, step=f"parallel-{len(vms)}", rep=rep, cache=cache, workers=None,
                seconds=time.monotonic() - started, data_bytes=content,
                stored_bytes=sum(r.bytes_stored for r in runs), usage=usage,
                extra={"per_vm_seconds": [round(r.seconds, 3) for r in runs]},
            ))  # fmt: skip
        finally:
            for path in (solo_dir, *dirs):
                shutil.rmtree(path, ignore_errors=True)
            for name in names:
                await peer.remove_checkpoints(self.conn, name)
        # VirtBackup: one VM alone into one repository, then all at once into another.
        repos = {"solo": self.workdir / f"vb-par-{cache}-{rep}-solo"}
        try:
            await vb.create_repository(
                repos["solo"], self.args.chunk_size, self.args.compression_level
            )
            with vb.VirtBackup(workers, self.workdir) as system:
                async with system.client() as api:
                    await vb.configure(api, repos)
                    (seconds, _), usage, retries = await self.vb_timed(
                        cache, lambda: vb.backup(api, names[0], "solo"), qemus[:1], (vms[0].image,)
                    )
                    self.record(StepResult(
                        tool=VB, step="parallel-1", rep=rep, cache=cache, workers=workers,
                        seconds=seconds, data_bytes=vms[0].content_bytes,
                        stored_bytes=peer.stored_bytes(repos["solo"]), usage=usage,
                        extra={"tls_retries": retries},
                    ))  # fmt: skip
                    for attempt in range(TLS_RETRIES + 1):
                        # Each attempt: no checkpoint (all full backups), a new repository.
                        for name in names:
                            await peer.remove_checkpoints(self.conn, name)
                        multi = self.workdir / f"vb-par-{cache}-{rep}-multi-{attempt}"
                        repos["multi"] = multi
                        await vb.create_repository(
                            multi, self.args.chunk_size, self.args.compression_level
                        )
                        await vb.configure(api, repos)
                        await self.before(cache, tuple(v.image for v in vms))
                        started = time.monotonic()
                        try:
                            per_vm, usage = await self.timed(
                                vb.backups_at_once(api, names, "multi"), qemus
                            )
                        except vb.JobFailed as exc:
                            if not exc.tls or attempt == TLS_RETRIES:
                                raise
                            print(f"  retrying after a TLS failure: {exc}", flush=True)
                            continue
                        break
                    self.record(StepResult(
                        tool=VB, step=f"parallel-{len(vms)}", rep=rep, cache=cache,
                        workers=workers, seconds=time.monotonic() - started, data_bytes=content,
                        stored_bytes=peer.stored_bytes(multi), usage=usage,
                        extra={"per_vm_seconds": [round(s, 3) for s in per_vm],
                               "tls_retries": attempt},
                    ))  # fmt: skip
        finally:
            for path in self.workdir.glob(f"vb-par-{cache}-{rep}-*"):
                shutil.rmtree(path, ignore_errors=True)
            for name in names:
                await peer.remove_checkpoints(self.conn, name)

    @property
    def target_workers(self) -> int:
        counts: tuple[int, ...] = self.args.workers
        return DEFAULT_WORKERS if DEFAULT_WORKERS in counts else max(counts)

    # ---------------------------------------------------------------- the run

    async def prepare(self) -> None:
        args = self.args
        if self.chain:
            self.vm = await peer.prepare_vm(
                self.conn, args.vm_name, disk_size=args.disk_gib * GiB,
                content_size=args.content_mib * MiB, base=self.workdir, seed=args.seed,
                cache=args.disk_cache,
            )  # fmt: skip
            print(f"prepared {self.vm.name} in {self.vm.seconds:.0f} s", flush=True)
        if self.wants("parallel"):
            for i in range(args.parallel_vms):
                small = await peer.prepare_vm(
                    self.conn, f"{args.vm_name}-p{i}", disk_size=args.parallel_disk_mib * MiB,
                    content_size=args.parallel_content_mib * MiB, base=self.workdir,
                    seed=args.seed, variant=i + 1, cache=args.disk_cache,
                )  # fmt: skip
                self.small.append(small)
            print(f"prepared {len(self.small)} small VMs", flush=True)
        if args.warmup:
            # The first read of a new VM's disk costs its QEMU about twice the CPU of the
            # next ones (bench/PEER.md, pitfall 5): one untimed copy per VM, so that
            # whichever tool goes first does not pay for it.
            for vm in ([self.vm] if self.vm else []) + self.small:
                out = self.workdir / f"warmup-{vm.name}"
                await peer.peer_backup(vm.name, out, "copy")
                shutil.rmtree(out, ignore_errors=True)
            print("warm-up copies done", flush=True)

    async def remake_vm(self) -> None:
        """Make the main VM again (same name, size, content and seed) when VirtBackup's
        restore has replaced its disk, then replay the guest writes the peer's chains made
        in this repetition. Every chain must read the disk as ``prepare_vm`` lays it out:
        a restored disk is another workload (its all-zero chunks are holes, so a backup
        reads 19% less, and virtnbdbackup's full backup took 9 s on it against 5 s on the
        original, 2026-12-01), and the first three-repetition run after restores became
        this fast compared each repetition after the first on it."""
        if not self.vm_replaced or self.vm is None:
            return
        args = self.args
        await peer.remove_prepared_vm(self.conn, self.vm)
        self.vm = await peer.prepare_vm(
            self.conn, args.vm_name, disk_size=args.disk_gib * GiB,
            content_size=args.content_mib * MiB, base=self.workdir, seed=args.seed,
            cache=args.disk_cache,
        )  # fmt: skip
        if args.warmup:
            out = self.workdir / f"warmup-{self.vm.name}"
            await peer.peer_backup(self.vm.name, out, "copy")
            shutil.rmtree(out, ignore_errors=True)
        for seed in self.peer_seeds:
            await self.guest_writes(self.vm, content_seed=seed)
        self.vm_replaced = False
        print(f"remade {self.vm.name} (its disk was restored over) in {self.vm.seconds:.0f} s")

    async def cleanup(self) -> None:
        """Remove the VMs, on a new connection if libvirtd was restarted meanwhile (another
        user of this machine); a VM that cannot be removed is named, the others still go."""
        self.monitor.close()
        conn = self.conn
        if conn.closed_reason is not None:
            conn = await open_connection()
        try:
            for vm in [*self.small, *([self.vm] if self.vm else [])]:
                try:
                    await peer.remove_prepared_vm(conn, vm)
                except Exception as exc:  # report it, and remove the others
                    print(f"could not remove VM {vm.name}: {exc}", file=sys.stderr)
        finally:
            if conn is not self.conn:
                await conn.close()

    async def run(self) -> None:
        args = self.args
        for rep in range(args.reps):
            for cache in args.cache_modes:
                if self.chain:
                    self.peer_seeds = []
                    await self.remake_vm()
                    await self.peer_chain(rep, cache, compress=False)
                    if args.peer_z and self.wants("full", "incremental", "zero"):
                        await self.peer_chain(rep, cache, compress=True)
                    for workers in args.workers:
                        await self.remake_vm()
                        await self.vb_chain(rep, cache, workers)
                if self.wants("parallel"):
                    await self.parallel(rep, cache)
            print(f"repetition {rep + 1}/{args.reps} done", flush=True)


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(asdict(value))
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return round(value, 4)
    return value


def _rows(results: list[StepResult]) -> Iterator[dict[str, Any]]:
    for r in results:
        yield {
            "tool": r.tool, "step": r.step, "rep": r.rep, "cache": r.cache,
            "workers": r.workers, "seconds": r.seconds, "data_bytes": r.data_bytes,
            "stored_bytes": r.stored_bytes, "identical": r.identical,
            "cpu": r.usage.cpu, "cpu_total": r.usage.cpu_total,
            "cpu_by_process": r.usage.cpu_by_process, "libvirtd_cpu": r.usage.libvirtd_cpu,
            "worker_peak_rss": r.usage.worker_peak_rss, "peak_rss": r.usage.peak_rss,
            **r.extra,
        }  # fmt: skip


async def amain(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("the benchmark needs root (libvirt, QEMU, drop_caches)", file=sys.stderr)
        return 2
    peer.install_peer()
    workdir = Path(tempfile.mkdtemp(prefix="vb-bench-", dir=args.workdir))
    workdir.chmod(0o755)
    started = time.monotonic()
    load_before = machine()["load"]
    conn = await open_connection()
    bench = Bench(args, conn, workdir)
    try:
        await bench.prepare()
        await bench.run()
    finally:
        try:
            await bench.cleanup()
            await conn.close()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    settings = {
        "steps": list(args.steps), "reps": args.reps, "cache": list(args.cache_modes),
        "workers": list(args.workers), "target_workers": bench.target_workers,
        "chunk_size": args.chunk_size or vb.default_chunk_size(),
        "chunk_size_set": args.chunk_size is not None,
        "compression_level": args.compression_level,
        "disk_cache": args.disk_cache, "seed": args.seed, "writes": args.writes,
        "write_size": args.write_size, "write_align": peer.WRITE_ALIGN,
        "peer_z": args.peer_z, "parallel_vms": args.parallel_vms, "warmup": args.warmup,
        "interval": args.interval, "seconds": round(time.monotonic() - started, 1),
        "load_before": load_before,
    }  # fmt: skip
    vm = None
    if bench.vm is not None:
        vm = {"disk_bytes": bench.vm.disk_size, "content_bytes": bench.vm.content_bytes}
    small = [{"disk_bytes": s.disk_size, "content_bytes": s.content_bytes} for s in bench.small]
    writes = None
    if bench.writes is not None:
        w = bench.writes
        writes = {
            "count": len(w.extents), "bytes": w.bytes,
            "chunks_touched": {f"{c >> 20}M": w.chunks_touched(c) for c in (MiB, 2 * MiB, 4 * MiB)},
            "granules_touched_64k": w.chunks_touched(64 * 1024),
        }  # fmt: skip
    info = {"machine": machine(), "versions": _versions(), "settings": settings,
            "vm": vm, "parallel_vms": small, "writes": writes}  # fmt: skip
    rows = list(_rows(bench.results))
    tables = {}
    for cache in args.cache_modes:
        text, table = report.table([r for r in rows if r["cache"] == cache], info, cache)
        print()
        print(text)
        tables[cache] = table
    for failure in bench.failures:
        print(f"RESTORE DIFFERS: {failure}")
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            json.dumps(_jsonable({**info, "tables": tables, "results": rows}), indent=2) + "\n"
        )
        print(f"\nwritten: {out}")
    return 1 if bench.failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=3, help="repetitions (medians; default 3)")
    parser.add_argument(
        "--steps", type=steps_arg, default=STEPS,
        help=f"comma-separated, from {','.join(STEPS)} (default all); the full backup runs "
        "whenever a step of the main VM's chain is asked for",
    )  # fmt: skip
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--warm", dest="cache_modes", action="store_const", const=("warm",),
        help="keep the page cache between steps (read the image once before a full backup, "
        "write back dirty pages): the bench's behaviour before cold runs",
    )  # fmt: skip
    group.add_argument(
        "--cold-and-warm", dest="cache_modes", action="store_const", const=("cold", "warm"),
        help="both, one after the other in each repetition (a table each)",
    )  # fmt: skip
    parser.set_defaults(cache_modes=("cold",))
    parser.add_argument(
        "--workers", type=workers_arg, default=(DEFAULT_WORKERS,),
        help=f"VirtBackup's transfer workers, e.g. 1,2 (default {DEFAULT_WORKERS}, as "
        "`virtbackup up`); the targets are read at the default",
    )  # fmt: skip
    parser.add_argument(
        "--chunk-size", type=chunk_size_arg, default=None,
        help="create VirtBackup's repositories with this chunk size (1M, 2M, 4M...; "
        "default: the repository's default)",
    )  # fmt: skip
    parser.add_argument(
        "--compression-level", type=int, default=None,
        help="create VirtBackup's repositories with this zstd level (-7 to 19, e.g. -3; "
        "default: the repository's default, 1)",
    )  # fmt: skip
    parser.add_argument("--vm-name", default=f"vb-bench-{os.getpid()}")
    parser.add_argument("--disk-gib", type=int, default=4)
    parser.add_argument("--content-mib", type=int, default=2048)
    parser.add_argument(
        "--disk-cache", default=peer.DISK_CACHE,
        help="the VMs' <driver cache=...> (default none, like production hosts)",
    )  # fmt: skip
    parser.add_argument("--writes", type=int, default=200, help="scattered guest writes")
    parser.add_argument("--write-size", type=parse_size, default=peer.WRITE_SIZE)
    parser.add_argument("--seed", type=int, default=0, help="content and write offsets")
    parser.add_argument("--parallel-vms", type=int, default=4)
    parser.add_argument("--parallel-disk-mib", type=int, default=1024)
    parser.add_argument("--parallel-content-mib", type=int, default=512)
    parser.add_argument(
        "--no-peer-z", dest="peer_z", action="store_false",
        help="skip virtnbdbackup -z (its stored bytes are a target)",
    )  # fmt: skip
    parser.add_argument(
        "--no-warmup", dest="warmup", action="store_false",
        help="skip the untimed first read of each new VM (virtnbdbackup -l copy)",
    )  # fmt: skip
    parser.add_argument("--interval", type=float, default=0.1, help="/proc sampling, seconds")
    parser.add_argument("--workdir", default="/var/tmp")
    parser.add_argument("--json", default="bench/results/latest.json")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.parallel_vms < 1 or args.writes < 1:
        parser.error("--reps, --parallel-vms and --writes must be at least 1")
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
