"""The fleet's nightly run (``bench/fleet.py --run``): every VM of the fleet backed up
through the orchestrator under per-server and per-destination limits.

SIMULATED TRANSFER: the system runs with ``VIRTBACKUP_SIMULATE_TRANSFER_SECONDS`` set
(for benchmarks only): a backup of a VM on a simulated server goes through the real
orchestrator path (job record, queue, admission slots, lease, phases, events, final
state) but waits that many seconds instead of reading a disk, and ends ``success``
marked ``result.simulated``; no restore point is made, nothing is written. What is
measured is the control plane's scheduling of the night, not a data path.

The run: one schedule per last two digits of the server numbers (``jobTemplate.vmPath``
``sim-*07/*``: up to 100 schedules, each a hundredth of the fleet; the servers ending in
digit ``d`` back up to destination ``d % --destinations``), all triggered now, one
after the other (``POST /api/v1/task/schedulers/{id}/run``); then, from the job records
(``VB_JOBS``, read directly, not through the gateway): the seconds until every job
ended, jobs/s, the most jobs that held one server and one destination at once (from
their ``startedAt`` and ``finishedAt``, which lie inside the time the job held its
slots) against the limits, the queue wait (``startedAt - createdAt``), and every job's
final state; and the orchestrator's and gateway's RSS and CPU seconds over the run.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import msgspec
import nats
from harness import System

from bench.measure import memory, read_stat
from virtbackup.contracts.v1.jobs import Job

MiB = 1 << 20
TERMINAL = {"success", "failure", "canceled"}


def destination_ids(count: int) -> list[str]:
    """``fs`` (the fleet's usual destination) and ``fs-1`` ... ``fs-<count-1>``."""
    return ["fs", *(f"fs-{n}" for n in range(1, count))]


def destinations(count: int, base: Path) -> list[dict[str, Any]]:
    """The configuration's destinations: filesystem repositories under ``base``."""
    out = []
    for dest in destination_ids(count):
        path = base if dest == "fs" else base.with_name(f"{base.name}-{dest}")
        path.mkdir(mode=0o700, exist_ok=True)
        params = {"path": str(path)}
        out.append({"id": dest, "name": dest, "driverId": "filesystem", "params": params})
    return out


def schedule_globs(servers: int, count: int) -> list[tuple[str, str]]:
    """The run's schedules: ``(vmPath, destination)`` pairs, one per last two digits of
    the server numbers in use (``sim-*07/*``: at most 100 schedules, each about a
    hundredth of the fleet, so that no trigger creates thousands of jobs in one bus
    request), the servers ending in digit ``d`` going to destination ``d % count``."""
    ids = destination_ids(count)
    endings = sorted({n % 100 for n in range(servers)})
    return [(f"sim-*{e:02d}/*", ids[(e % 10) % count]) for e in endings]


def env(args: Any) -> dict[str, str]:
    """The system's settings for the run."""
    return {
        "VIRTBACKUP_SIMULATE_TRANSFER_SECONDS": str(args.simulate_seconds),
        "VIRTBACKUP_MAX_JOBS_PER_SERVER": str(args.max_per_server),
        "VIRTBACKUP_MAX_JOBS_PER_DESTINATION": str(args.max_per_destination),
    }


def parse(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def most_at_once(intervals: Iterable[tuple[float, float]]) -> int:
    """The most intervals ``[start, end)`` that overlap at one moment (an end at the very
    moment of a start counts as before it: the slot was given back)."""
    events = sorted([(e, -1) for _, e in intervals] + [(s, 1) for s, _ in intervals])
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for name, pid in pids.items():
        stat = read_stat(pid)
        out[name] = stat.own / ticks if stat else 0.0
    return out


async def read_jobs(system: System, ids: list[str]) -> dict[str, Job]:
    """The records of ``ids`` in ``VB_JOBS`` (those present)."""
    nc = await nats.connect(**system.nats.connect_options())
    try:
        kv = await nc.jetstream().key_value("VB_JOBS")
        out: dict[str, Job] = {}
        for first in range(0, len(ids), 500):
            batch = ids[first : first + 500]
            entries = await asyncio.gather(*(kv.get(i) for i in batch), return_exceptions=True)
            for entry in entries:
                if isinstance(entry, BaseException) or entry.value is None:
                    continue
                job = msgspec.json.decode(entry.value, type=Job)
                out[job.id] = job
        return out
    finally:
        await nc.drain()


async def wait_all_ended(system: System, ids: list[str], timeout: float) -> float:
    """Wait (bounded) until every job of ``ids`` has ended, looking at the oldest jobs
    not seen ended yet (jobs end roughly in submit order); the seconds waited."""
    started = time.monotonic()
    nc = await nats.connect(**system.nats.connect_options())
    try:
        kv = await nc.jetstream().key_value("VB_JOBS")
        pending = list(ids)
        said = started
        while pending:
            if time.monotonic() - said >= 10:  # a sign of life, every 10 s
                said = time.monotonic()
                print(
                    f"  {len(ids) - len(pending)} of {len(ids)} jobs ended after "
                    f"{said - started:.0f} s",
                    flush=True,
                )
            assert time.monotonic() - started < timeout, f"{len(pending)} jobs still going"
            head = pending[:200]
            entries = await asyncio.gather(*(kv.get(i) for i in head), return_exceptions=True)
            ended = {
                i
                for i, e in zip(head, entries, strict=True)
                if not isinstance(e, BaseException)
                and e.value is not None
                and msgspec.json.decode(e.value, type=Job).state in TERMINAL
            }
            pending = [i for i in pending if i not in ended]
            if pending and len(ended) < len(head):
                await asyncio.sleep(1.0)
        return time.monotonic() - started
    finally:
        await nc.drain()


async def nightly_run(api: httpx.AsyncClient, system: System, args: Any) -> dict[str, Any]:
    """Trigger the whole fleet's backup and measure it (see the module)."""
    count = args.destinations
    pids = {n: system.procs[n].pid for n in ("job-orchestrator", "gateway")}
    schedules: list[tuple[str, str]] = []
    for glob, dest in schedule_globs(args.servers, count):
        body = {
            "name": f"nightly {glob} to {dest}",
            "schedule": "0 2 * * *",
            "timezone": "UTC",
            "jobTemplate": {
                "vmPath": glob,
                "source": {"type": "libvirt"},
                "destination": {"type": "backup", "destinationId": dest},
            },
        }
        resp = await api.post("/api/v1/task/schedulers", json=body)
        assert resp.status_code == 201, resp.text[:500]
        schedules.append((resp.json()["id"], dest))
    cpu_before = cpu_seconds(pids)
    began = time.time()
    ids: list[str] = []
    trigger_s: list[float] = []
    print(f"triggering {len(schedules)} schedules", flush=True)
    for schedule_id, _dest in schedules:
        started = time.monotonic()
        resp = await api.post(f"/api/v1/task/schedulers/{schedule_id}/run", json={}, timeout=600)
        trigger_s.append(round(time.monotonic() - started, 2))
        assert resp.status_code == 200, resp.text[:500]
        run = resp.json()
        assert not run["skipped"], run
        ids.extend(run["jobIds"])
        if len(trigger_s) % 10 == 0:
            print(
                f"  {len(trigger_s)} triggered, {len(ids)} jobs, {time.time() - began:.1f} s "
                f"(last trigger {trigger_s[-1]} s)",
                flush=True,
            )
    expected = args.servers * args.vms
    assert len(ids) == expected, (len(ids), expected)
    await wait_all_ended(system, ids, args.run_timeout)
    cpu_after = cpu_seconds(pids)
    rss = {n: round(memory(pid)[0] / MiB, 1) for n, pid in pids.items()}
    peak = {n: round(memory(pid)[1] / MiB, 1) for n, pid in pids.items()}
    jobs = await read_jobs(system, ids)
    states: dict[str, int] = defaultdict(int)
    for job in jobs.values():
        states[job.state] += 1
    simulated = sum(1 for j in jobs.values() if j.result.get("simulated") is True)
    failures: dict[str, int] = defaultdict(int)
    for job in jobs.values():
        if job.state != "success":
            failures[f"{job.state}: {job.message[:300]}"] += 1
    by_server: dict[str, list[tuple[float, float]]] = defaultdict(list)
    by_dest: dict[str, list[tuple[float, float]]] = defaultdict(list)
    waits: list[float] = []
    for job in jobs.values():
        if not (job.started_at and job.finished_at):
            continue
        span = (parse(job.started_at), parse(job.finished_at))
        by_server[job.server_id or ""].append(span)
        by_dest[job.destination_id or ""].append(span)
        waits.append(span[0] - parse(job.created_at))
    first_created = min(parse(j.created_at) for j in jobs.values())
    last_finished = max(parse(j.finished_at) for j in jobs.values() if j.finished_at)
    all_spans = [s for spans in by_dest.values() for s in spans]
    wall = last_finished - began
    limit_concurrency = min(args.servers * args.max_per_server, count * args.max_per_destination)
    ideal = math.ceil(expected / limit_concurrency) * args.simulate_seconds
    real_window_h = math.ceil(expected / limit_concurrency) * args.assume_backup_minutes / 60
    return {
        "simulated_transfer": (
            f"SIMULATED: VIRTBACKUP_SIMULATE_TRANSFER_SECONDS={args.simulate_seconds:g}: "
            "each backup waits instead of reading a disk; no restore point, nothing written"
        ),
        "jobs": expected,
        "destinations": count,
        "limits": {
            "per_server": args.max_per_server,
            "per_destination": args.max_per_destination,
            "at_once_at_most": limit_concurrency,
        },
        "schedules": len(schedules),
        "trigger_s": {
            "total": round(sum(trigger_s), 2),
            "max": max(trigger_s),
            "median": sorted(trigger_s)[len(trigger_s) // 2],
        },
        "submitted_s": round(max(parse(j.created_at) for j in jobs.values()) - began, 2),
        "all_ended_s": round(wall, 2),
        "first_submit_to_last_end_s": round(last_finished - first_created, 2),
        "jobs_per_s": round(expected / wall, 1),
        "ideal_s_at_limits": ideal,
        "states": dict(states),
        "all_succeeded": states.get("success", 0) == expected,
        "failures": dict(sorted(failures.items(), key=lambda kv: -kv[1])[:5]),
        "simulated": simulated,
        "max_per_server_seen": max((most_at_once(v) for v in by_server.values()), default=0),
        "max_per_destination_seen": max((most_at_once(v) for v in by_dest.values()), default=0),
        "max_at_once_seen": most_at_once(all_spans),
        "queue_wait_s": {
            "p50": round(percentile(waits, 0.5), 2),
            "p99": round(percentile(waits, 0.99), 2),
            "max": round(max(waits), 2),
        },
        "cpu_s": {n: round(cpu_after[n] - cpu_before[n], 1) for n in pids},
        "rss_mib_end": rss,
        "peak_rss_mib": peak,
        "nightly_window_extrapolated_h": {
            "assumed_backup_minutes": args.assume_backup_minutes,
            "hours": round(real_window_h, 2),
            "note": (
                "EXTRAPOLATED, not measured: the jobs in waves of "
                f"{limit_concurrency} at once (the limits), each taking the assumed "
                "minutes of a real backup"
            ),
        },
    }


def report(run: dict[str, Any]) -> None:
    print(f"\nnightly run of {run['jobs']} backups ({run['simulated_transfer']})")
    print(f"limits: {run['limits']}, {run['destinations']} destinations")
    print(
        f"{run['schedules']} schedules triggered, s: {run['trigger_s']}; "
        f"every job submitted after {run['submitted_s']} s"
    )
    print(
        f"every job ended after {run['all_ended_s']} s ({run['jobs_per_s']} jobs/s; "
        f"{run['ideal_s_at_limits']} s if only the limits held them back)"
    )
    print(f"states: {run['states']} (simulated: {run['simulated']})")
    for message, n in run["failures"].items():
        print(f"  {n} x {message}")
    print(
        f"most at once: {run['max_per_server_seen']} per server "
        f"(limit {run['limits']['per_server']}), {run['max_per_destination_seen']} per "
        f"destination (limit {run['limits']['per_destination']}), {run['max_at_once_seen']} "
        "in all"
    )
    print(f"queue wait: {run['queue_wait_s']}")
    print(f"CPU s: {run['cpu_s']}; RSS MiB at the end: {run['rss_mib_end']}")
    window = run["nightly_window_extrapolated_h"]
    print(
        f"nightly window at {window['assumed_backup_minutes']} min a backup: "
        f"{window['hours']} h ({window['note']})"
    )
