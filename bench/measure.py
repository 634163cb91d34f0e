"""What the benchmark measures on the host: the page cache's state before a step, and the
CPU time and memory of the processes a step involves, read from ``/proc`` (Linux, root).

CPU of a step (:meth:`Monitor.begin` ... :meth:`Window.end`), in three groups:

* ``tool``: every process below the benchmark's own (the benchmark itself excluded): for
  VirtBackup the ``virtbackup up`` launcher, its nats-server and service processes, and
  their children (``qemu-img``, ...); for the peer the ``virtnbdbackup`` /
  ``virtnbdrestore`` processes and their children. It is the change, between the two
  ends of the step, of ``utime + stime + cutime + cstime`` summed over the live
  processes of the tree, plus the benchmark's own ``cutime + cstime`` (the peer's
  processes, reaped when they exit). A process that exits during the step counts through
  its parent's ``cutime`` once reaped: nothing is missed and nothing counted twice.
* ``qemu-nbd``: ``qemu-nbd`` processes with an argument under the benchmark's work
  directory that are not in the tree: both tools' restores start ``qemu-nbd --fork``,
  whose server process is re-parented to init. Sampled every ``interval`` (0.1 s): the
  CPU of its last 0.1 s before it exits can be missed.
* ``qemu``: the QEMU processes of the VMs given to :meth:`Monitor.begin` (the NBD server
  of a backup), their change between the two ends.

``libvirtd`` (backup jobs, checkpoints) is read too but kept apart: on this machine it
serves other users' VMs as well.

Memory: the peak resident set (``VmHWM``, reset at the start of the step through
``/proc/PID/clear_refs``) of every transfer-worker process, and the largest ``VmRSS``
sampled every ``interval`` of every process of the tree.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

TICK: Final = os.sysconf("SC_CLK_TCK")
PROC: Final = Path("/proc")
#: How the transfer workers are recognised: ``python -m virtbackup.transfer_worker``.
WORKER_MODULE: Final = "virtbackup.transfer_worker"


def drop_caches() -> None:
    """``sync; echo 3 > /proc/sys/vm/drop_caches``: write back dirty pages, then drop the
    page cache, dentries and inodes (root only; ``PermissionError`` otherwise)."""
    os.sync()
    (PROC / "sys/vm/drop_caches").write_text("3\n")


def settle() -> None:
    """Write back dirty pages (``sync``) without dropping anything: the warm mode."""
    os.sync()


@dataclass(frozen=True, slots=True)
class Stat:
    """The fields of ``/proc/PID/stat`` used here; times in clock ticks."""

    pid: int
    ppid: int
    comm: str
    starttime: int
    own: int
    children: int

    @property
    def total(self) -> int:
        return self.own + self.children


def read_stat(pid: int) -> Stat | None:
    """``/proc/PID/stat``, or None if the process is gone."""
    try:
        raw = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    head, _, tail = raw.rpartition(")")
    fields = tail.split()
    comm = head.partition("(")[2]
    return Stat(
        pid=pid,
        ppid=int(fields[1]),
        comm=comm,
        starttime=int(fields[19]),
        own=int(fields[11]) + int(fields[12]),
        children=int(fields[13]) + int(fields[14]),
    )


def cmdline(pid: int) -> list[str]:
    """The process's arguments ([] if it is gone or a zombie)."""
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def memory(pid: int) -> tuple[int, int]:
    """(``VmRSS``, ``VmHWM``) in bytes; (0, 0) if the process is gone."""
    rss = hwm = 0
    try:
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, hwm


def reset_peak(pid: int) -> bool:
    """Reset the process's ``VmHWM`` to its current RSS (``echo 5 > clear_refs``)."""
    try:
        (PROC / str(pid) / "clear_refs").write_text("5\n")
    except OSError:
        return False
    return True


def children(pid: int) -> list[int]:
    """Direct children of every thread of ``pid``."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in (PROC / str(pid) / "task").iterdir():
            with contextlib.suppress(OSError):
                found += [int(c) for c in (task / "children").read_text().split()]
    return found


def descendants(root: int) -> list[int]:
    """Every process below ``root`` (not ``root`` itself)."""
    found: list[int] = []
    todo = children(root)
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children(pid)
    return found


def pids_named(comm: str) -> list[int]:
    """PIDs whose ``comm`` is ``comm``."""
    found = []
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            stat = read_stat(int(entry.name))
            if stat is not None and stat.comm == comm:
                found.append(stat.pid)
    return found


def label(pid: int, stat: Stat | None = None) -> str:
    """A short name: the module of ``python -m MODULE`` (``transfer_worker``), else comm."""
    args = cmdline(pid)
    if "-m" in args[:-1]:
        return args[args.index("-m") + 1].removeprefix("virtbackup.")
    if args and Path(args[0]).name.startswith("python") and len(args) > 1:
        return Path(args[1]).name
    stat = stat or read_stat(pid)
    return stat.comm if stat else str(pid)


@dataclass
class Usage:
    """What one step cost: CPU seconds by group and by process, peak memory."""

    seconds: float
    #: ``tool``, ``qemu``, ``qemu-nbd`` (see the module's docstring).
    cpu: dict[str, float]
    #: CPU seconds of the tree's processes by :func:`label` (``reaped`` is the benchmark's
    #: ``cutime + cstime``: children that ended during the step).
    cpu_by_process: dict[str, float]
    #: libvirtd's CPU seconds meanwhile (shared with the machine's other VMs).
    libvirtd_cpu: float
    #: Peak RSS of each transfer worker (``transfer_worker[PID]``) in bytes.
    worker_peak_rss: dict[str, int]
    #: Largest sampled RSS of any process of the tree (label -> bytes).
    peak_rss: dict[str, int]

    @property
    def cpu_total(self) -> float:
        return sum(self.cpu.values())


@dataclass
class _Orphan:
    first: int
    last: int


@dataclass
class Window:
    """A step being measured; :meth:`end` returns its :class:`Usage`."""

    monitor: Monitor
    started: float
    tree_start: dict[tuple[int, int], Stat]
    own_children_start: int
    qemu_start: dict[int, int]
    libvirtd_start: dict[int, int]
    workers: dict[int, bool]
    labels: dict[tuple[int, int], str] = field(default_factory=dict)
    #: ``qemu-nbd`` processes serving files under the prefix, seen during the step.
    servers: set[tuple[int, int]] = field(default_factory=set)
    orphans: dict[tuple[int, int], _Orphan] = field(default_factory=dict)
    peak_rss: dict[str, int] = field(default_factory=dict)

    def end(self) -> Usage:
        seconds = time.monotonic() - self.started
        self.monitor._sample(self)  # the orphans' last values
        self.monitor._close(self)
        me = read_stat(os.getpid())
        own_children = me.children if me else self.own_children_start
        tree_end = self.monitor._tree()
        by_process: dict[str, float] = {
            "reaped": (own_children - self.own_children_start) / TICK,
        }
        for key, stat in tree_end.items():
            before = self.tree_start.get(key)
            delta = stat.total - (before.total if before else 0)
            name = label(stat.pid, stat)
            by_process[name] = by_process.get(name, 0.0) + delta / TICK
        for key, stat in self.tree_start.items():
            if key not in tree_end:  # ended during the step: its parent's cutime has it
                name = self.labels.get(key, stat.comm)
                by_process[name] = by_process.get(name, 0.0) - stat.total / TICK
        tool = sum(by_process.values())
        qemu = 0
        for pid, first in self.qemu_start.items():
            now = read_stat(pid)
            if now is not None:
                qemu += now.total - first
        orphans = sum(o.last - o.first for o in self.orphans.values())
        libvirtd = 0
        for pid, first in self.libvirtd_start.items():
            now = read_stat(pid)
            if now is not None:
                libvirtd += now.total - first
        worker_peaks: dict[str, int] = {}
        for pid, was_reset in self.workers.items():
            rss, hwm = memory(pid)
            sampled = self.peak_rss.get(f"transfer_worker[{pid}]", 0)
            worker_peaks[f"transfer_worker[{pid}]"] = max(hwm if was_reset else 0, rss, sampled)
        return Usage(
            seconds=seconds,
            cpu={"tool": tool, "qemu": qemu / TICK, "qemu-nbd": orphans / TICK},
            cpu_by_process={k: round(v, 3) for k, v in by_process.items() if v},
            libvirtd_cpu=libvirtd / TICK,
            worker_peak_rss=worker_peaks,
            peak_rss=dict(self.peak_rss),
        )


class Monitor:
    """Samples ``/proc`` every ``interval`` seconds in a thread while a :class:`Window` is
    open. ``prefix``: ``qemu-nbd`` processes with an argument starting with it are the
    tools' restore servers (see the module's docstring)."""

    def __init__(self, prefix: str, interval: float = 0.1) -> None:
        self.prefix = prefix
        self.interval = interval
        self._lock = threading.Lock()
        self._window: Window | None = None
        self._wake = threading.Event()
        self._stop = False
        self._seen: set[int] = set()  # PIDs of the previous sample
        self._sampling = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="bench-monitor", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(5)

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _tree(self) -> dict[tuple[int, int], Stat]:
        tree: dict[tuple[int, int], Stat] = {}
        for pid in descendants(os.getpid()):
            stat = read_stat(pid)
            if stat is not None:
                tree[(pid, stat.starttime)] = stat
        return tree

    def begin(self, qemu_pids: Iterable[int | None] = ()) -> Window:
        """Start measuring a step; ``qemu_pids``: the QEMU processes of the VMs it reads."""
        tree = self._tree()
        workers: dict[int, bool] = {}
        for stat in tree.values():
            if WORKER_MODULE in cmdline(stat.pid):
                workers[stat.pid] = reset_peak(stat.pid)
        qemu = {}
        for pid in qemu_pids:
            found = read_stat(pid) if pid else None
            if found is not None:
                qemu[found.pid] = found.total
        libvirtd = {}
        for pid in pids_named("libvirtd"):
            found = read_stat(pid)
            if found is not None:
                libvirtd[pid] = found.total
        labels = {key: label(stat.pid, stat) for key, stat in tree.items()}
        me = read_stat(os.getpid())
        window = Window(
            monitor=self,
            started=time.monotonic(),
            tree_start=tree,
            own_children_start=me.children if me else 0,
            qemu_start=qemu,
            libvirtd_start=libvirtd,
            workers=workers,
            labels=labels,
        )
        # qemu-nbd processes already running are not this step's.
        self._seen = set(self._pids())
        with self._lock:
            self._window = window
        self._wake.set()
        return window

    def _close(self, window: Window) -> None:
        with self._lock:
            if self._window is window:
                self._window = None

    @staticmethod
    def _pids() -> Iterator[int]:
        for entry in PROC.iterdir():
            if entry.name.isdigit():
                yield int(entry.name)

    def _sample(self, window: Window) -> None:
        with self._sampling:
            tree = set(descendants(os.getpid()))
            pids = set(self._pids())
            for pid in pids - self._seen:
                stat = read_stat(pid)
                if stat is None or stat.comm != "qemu-nbd":
                    continue
                args = cmdline(pid)
                if any(a.startswith(self.prefix) or f"={self.prefix}" in a for a in args):
                    window.servers.add((pid, stat.starttime))
            self._seen = pids
            # A server counts once it has left the tree (``--fork``: re-parented to init);
            # while in the tree, the tree counts it.
            for pid, start in window.servers:
                if pid in tree:
                    continue
                stat = read_stat(pid)
                if stat is not None and stat.starttime == start:
                    orphan = window.orphans.setdefault((pid, start), _Orphan(0, 0))
                    orphan.last = stat.total
            for pid in tree:
                rss, _ = memory(pid)
                if not rss:
                    continue
                name = label(pid)
                if name == WORKER_MODULE.removeprefix("virtbackup."):
                    name = f"{name}[{pid}]"
                window.peak_rss[name] = max(window.peak_rss.get(name, 0), rss)

    def _run(self) -> None:
        while not self._stop:
            with self._lock:
                window = self._window
            if window is None:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            with contextlib.suppress(Exception):
                self._sample(window)
            time.sleep(self.interval)
