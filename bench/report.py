"""The benchmark's tables: medians of each step, ratios against the peer, the targets of
the performance issue with met / not met, and CPU seconds and memory per step.

Ratios are the peer's over VirtBackup's (time, or bytes): above 1, VirtBackup is faster or
stores less. MB/s is the step's VM data (``data_bytes``) per second, 1 MB = 10^6 bytes.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

MB: Final = 1_000_000
MiB: Final = 1 << 20
GB: Final = 1_000_000_000

VB: Final = "virtbackup"
PEER: Final = "virtnbdbackup"
PEER_Z: Final = "virtnbdbackup -z"

# The targets of issue 13 (they hold for the cold run).
FULL_RATIO: Final = 2.5
INCREMENTAL_RATIO: Final = 1.5
RESTORE_RATIO: Final = 3.0
PARALLEL_SCALING: Final = 1.5
#: "No VM starved": the slowest VM's job takes at most this many times the median job.
STARVED_FACTOR: Final = 2.0
CLONE_FRACTION: Final = 0.05
WORKER_RSS: Final = 300 * MiB

Row = dict[str, Any]


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


@dataclass
class Steps:
    """The results of one cache mode, looked up by tool, step and workers."""

    rows: list[Row]

    def pick(self, tool: str, step: str, workers: int | None = None) -> list[Row]:
        return [
            r for r in self.rows
            if r["tool"] == tool and r["step"] == step
            and (workers is None or r["workers"] in (None, workers))
        ]  # fmt: skip

    def median(
        self, tool: str, step: str, key: str | Callable[[Row], float | None],
        workers: int | None = None,
    ) -> float | None:  # fmt: skip
        rows = self.pick(tool, step, workers)
        get: Callable[[Row], float | None] = key if callable(key) else (lambda r: r.get(key))
        return _median([get(r) for r in rows])


def _fmt_s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


def _fmt_rate(data: float | None, seconds: float | None) -> str:
    if not data or not seconds:
        return "-"
    return f"{data / MB / seconds:.0f}"


def _ratio(peer: float | None, ours: float | None) -> float | None:
    if peer is None or ours is None or ours <= 0:
        return None
    return peer / ours


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _verdict(ok: bool | None) -> str:
    return "" if ok is None else ("met" if ok else "NOT MET")


def table(rows: list[Row], info: dict[str, Any], cache: str) -> tuple[str, dict[str, Any]]:
    """The text tables of one cache mode, and the same as data (for the JSON)."""
    steps = Steps(rows)
    settings = info["settings"]
    target_workers = settings["target_workers"]
    workers_list: list[int] = settings["workers"]
    lines: list[Row] = []

    def line(label: str, ours: str, theirs: str, our_rate: str = "-", their_rate: str = "-",
             ratio: str = "-", target: str = "", ok: bool | None = None) -> None:  # fmt: skip
        lines.append({
            "step": label, "virtbackup": ours, "virtnbdbackup": theirs,
            "virtbackup_MBps": our_rate, "virtnbdbackup_MBps": their_rate, "ratio": ratio,
            "target": target, "met": ok,
        })  # fmt: skip

    def timed(label: str, step: str, workers: int, target: float | None) -> None:
        ours = steps.median(VB, step, "seconds", workers)
        theirs = steps.median(PEER, step, "seconds")
        data = steps.median(VB, step, "data_bytes", workers)
        ratio = _ratio(theirs, ours)
        ok = None if target is None or ratio is None else ratio >= target
        line(
            label, _fmt_s(ours), _fmt_s(theirs), _fmt_rate(data, ours),
            _fmt_rate(data, theirs), _fmt_ratio(ratio),
            f">= {target:g}x" if target is not None else "", ok,
        )  # fmt: skip

    for workers in workers_list:
        if steps.pick(VB, "full", workers):
            target = FULL_RATIO if workers == target_workers else None
            plural = "s" if workers > 1 else ""
            timed(f"full backup ({workers} worker{plural})", "full", workers, target)
    if steps.pick(PEER_Z, "full"):
        ours = steps.median(VB, "full", "seconds", target_workers)
        theirs = steps.median(PEER_Z, "full", "seconds")
        data = steps.median(PEER_Z, "full", "data_bytes")
        line("  against virtnbdbackup -z", _fmt_s(ours), _fmt_s(theirs), _fmt_rate(data, ours),
             _fmt_rate(data, theirs), _fmt_ratio(_ratio(theirs, ours)))  # fmt: skip
    writes = info.get("writes") or {}
    if steps.pick(VB, "incremental"):
        count = writes.get("count", settings["writes"])
        size = settings["write_size"] // 1024
        timed(f"incremental ({count} x {size} KiB scattered)", "incremental",
              target_workers, INCREMENTAL_RATIO)  # fmt: skip
    if steps.pick(VB, "zero"):
        timed("0-byte incremental (fixed cost)", "zero", target_workers, None)
    if steps.pick(VB, "restore"):
        timed("restore of the latest point", "restore", target_workers, RESTORE_RATIO)
        same = all(r["identical"] for r in steps.pick(VB, "restore") + steps.pick(PEER, "restore"))
        line("  restored images identical (qemu-img compare)", "yes" if same else "NO", "",
             ok=same)  # fmt: skip
    parallel = [
        r["step"] for r in rows if r["step"].startswith("parallel-") and r["step"] != "parallel-1"
    ]
    if parallel:
        many = parallel[0]
        count = many.split("-")[1]
        timed(f"{count} VMs at once (all of them)", many, target_workers, None)
        scaling: dict[str, float | None] = {}
        starved: dict[str, float | None] = {}
        for tool in (VB, PEER):
            solo = steps.median(tool, "parallel-1", lambda r: r["data_bytes"] / r["seconds"])
            both = steps.median(tool, many, lambda r: r["data_bytes"] / r["seconds"])
            scaling[tool] = _ratio(both, solo)
            starved[tool] = steps.median(
                tool, many,
                lambda r: max(r["per_vm_seconds"]) / statistics.median(r["per_vm_seconds"]),
            )  # fmt: skip
        ok = None if scaling[VB] is None else scaling[VB] >= PARALLEL_SCALING
        line("  total MB/s over one VM's alone", _fmt_ratio(scaling[VB]),
             _fmt_ratio(scaling[PEER]), target=f">= {PARALLEL_SCALING:g}x", ok=ok)  # fmt: skip
        ok = None if starved[VB] is None else starved[VB] <= STARVED_FACTOR
        line("  slowest VM's job over the median's", _fmt_ratio(starved[VB]),
             _fmt_ratio(starved[PEER]), target=f"<= {STARVED_FACTOR:g}x (no VM starved)",
             ok=ok)  # fmt: skip
    if steps.pick(VB, "clone"):
        fraction = steps.median(VB, "clone", "new_fraction", target_workers)
        seconds = steps.median(VB, "clone", "seconds", target_workers)
        ok = None if fraction is None else fraction <= CLONE_FRACTION
        line("clone of the same template: new bytes", "-" if fraction is None else
             f"{fraction:.2%}", "100% (no dedup)", _fmt_rate(
                 steps.median(VB, "clone", "data_bytes", target_workers), seconds),
             target=f"<= {CLONE_FRACTION:.0%} of the first VM's", ok=ok)  # fmt: skip
    stored_lines: list[tuple[str, tuple[str, ...]]] = [("stored: full backup", ("full",))]
    if steps.pick(VB, "incremental") or steps.pick(VB, "zero"):
        stored_lines.append(("stored: full + incrementals", ("full", "incremental", "zero")))
    for label, names in stored_lines:
        if not steps.pick(VB, "full"):
            break

        def chain(tool: str, names: tuple[str, ...] = names) -> float | None:
            parts = [steps.median(tool, n, "stored_bytes", target_workers if tool == VB else None)
                     for n in names if steps.pick(tool, n)]  # fmt: skip
            return None if not parts or None in parts else sum(p for p in parts if p is not None)

        ours, plain, packed = chain(VB), chain(PEER), chain(PEER_Z)
        ok = None if ours is None or packed is None else ours <= packed
        peer_text = "-" if plain is None else f"{plain / MB:.0f}MB"
        if packed is not None:
            peer_text += f" (-z {packed / MB:.0f}MB)"
        line(label, "-" if ours is None else f"{ours / MB:.0f}MB", peer_text,
             ratio=_fmt_ratio(_ratio(packed if packed is not None else plain, ours)),
             target="<= the peer's -z" if packed is not None else "", ok=ok)  # fmt: skip
    peaks = [max(r["worker_peak_rss"].values(), default=0) for r in rows if r["tool"] == VB]
    if peaks:
        peak = max(peaks)
        line("transfer-worker peak RSS (any step)", f"{peak / MiB:.0f}MiB", "",
             target=f"< {WORKER_RSS // MiB} MiB", ok=peak < WORKER_RSS)  # fmt: skip

    cpu_lines = _cpu_lines(steps, target_workers)
    text = _render(lines, cpu_lines, info, cache)
    retried = sum(r.get("tls_retries") or 0 for r in rows)
    if retried:
        text += (
            f"\n{retried} VirtBackup job(s) run again after a failed TLS handshake (another"
            " VirtBackup on this machine rewrote /etc/pki/qemu)"
        )
    return text, {"lines": lines, "cpu": cpu_lines}


def _cpu_lines(steps: Steps, workers: int) -> list[Row]:
    out: list[Row] = []
    order = ("full", "clone", "incremental", "zero", "restore", "parallel-1")
    names = sorted({r["step"] for r in steps.rows}, key=lambda s: (*order, s).index(s))
    for step in names:
        for tool in (VB, PEER, PEER_Z):
            rows = steps.pick(tool, step, workers if tool == VB else None)
            if not rows:
                continue
            data = _median([r["data_bytes"] for r in rows]) or 0
            total = _median([r["cpu_total"] for r in rows]) or 0.0
            parts = {g: _median([r["cpu"][g] for r in rows]) or 0.0 for g in rows[0]["cpu"]}
            rss = max((max(r["worker_peak_rss"].values(), default=0) for r in rows), default=0)
            tool_rss = max(
                (v for r in rows for k, v in r["peak_rss"].items()
                 if tool != VB and k.startswith("virtnbd")),
                default=0,
            )  # fmt: skip
            out.append({
                "step": step, "tool": tool, "cpu_s": round(total, 2),
                "cpu_s_per_GB": round(total / (data / GB), 2) if data else None,
                "tool_s": round(parts.get("tool", 0.0), 2),
                "qemu_s": round(parts.get("qemu", 0.0), 2),
                "qemu_nbd_s": round(parts.get("qemu-nbd", 0.0), 2),
                "libvirtd_s": round(_median([r["libvirtd_cpu"] for r in rows]) or 0.0, 2),
                "peak_rss_MiB": round((rss or tool_rss) / MiB),
            })  # fmt: skip
    return out


def _render(lines: list[Row], cpu: list[Row], info: dict[str, Any], cache: str) -> str:
    m, s = info["machine"], info["settings"]
    vm = info.get("vm") or {}
    head = [
        f"{cache.upper()} run: "
        + ("page cache dropped before every timed step" if cache == "cold"
           else "page cache kept (image read once before each full backup)")
        + f"; VM disks cache='{s['disk_cache']}'",
        f"{m['cpus']} CPUs ({m['cpu']}), {m['memory_gib']} GiB, Linux {m['kernel']};"
        f" load {s['load_before']} -> {m['load']}",
        f"virtnbdbackup {info['versions'].get('virtnbdbackup')};"
        f" chunk size {s['chunk_size'] // 1024} KiB;"
        f" {','.join(map(str, s['workers']))} transfer worker(s);"
        f" median of {s['reps']} rep(s); {s['seconds']:.0f} s in all",
    ]  # fmt: skip
    if vm:
        head.append(
            f"main VM: {vm['disk_bytes'] / 2**30:g} GiB disk, {vm['content_bytes'] / MB:.0f} MB"
            " of content"
        )
    w = info.get("writes")
    if w:
        head.append(
            f"guest writes: {w['count']} x {s['write_size'] // 1024} KiB at"
            f" {s['write_align'] // 1024} KiB-aligned offsets; touch chunks {w['chunks_touched']}, "
            f"{w['granules_touched_64k']} granules of 64 KiB"
        )
    widths = (44, 12, 22, 8, 9, 7, 24)
    header = ("", "VirtBackup", "virtnbdbackup", "VB MB/s", "peer MB/s", "ratio", "target")
    out = [*head, ""]
    out.append(_cols(header, widths) + "  result")
    out.append("-" * (sum(widths) + len(widths) + 8))
    for row in lines:
        cells = (row["step"], row["virtbackup"], row["virtnbdbackup"], row["virtbackup_MBps"],
                 row["virtnbdbackup_MBps"], row["ratio"], row["target"])  # fmt: skip
        out.append(_cols(cells, widths) + "  " + _verdict(row["met"]))
    out += ["", "CPU seconds (tool processes + QEMU's NBD server + qemu-nbd) and peak memory:"]
    cw = (14, 18, 8, 9, 8, 8, 9, 9, 9)
    out.append(_cols(("step", "tool", "CPU s", "CPU s/GB", "tool", "qemu", "qemu-nbd",
                      "libvirtd", "peak MiB"), cw))  # fmt: skip
    for row in cpu:
        per_gb = "-" if row["cpu_s_per_GB"] is None else f"{row['cpu_s_per_GB']:.2f}"
        out.append(_cols((row["step"], row["tool"], f"{row['cpu_s']:.2f}", per_gb,
                          f"{row['tool_s']:.2f}", f"{row['qemu_s']:.2f}",
                          f"{row['qemu_nbd_s']:.2f}", f"{row['libvirtd_s']:.2f}",
                          str(row["peak_rss_MiB"] or "-")), cw))  # fmt: skip
    return "\n".join(out)


def _cols(cells: Sequence[str], widths: Sequence[int]) -> str:
    first, *rest = cells
    return f"{first:<{widths[0]}}" + "".join(
        f" {c:>{w}}" for c, w in zip(rest, widths[1:], strict=True)
    )
