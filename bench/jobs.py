"""The control plane with a long history: 10,000 finished jobs in ``VB_JOBS``.

Starts ``virtbackup up`` (two job-orchestrator replicas), writes ``--jobs`` finished
jobs straight into the bucket, then times through the HTTPS API:

* ``GET /jobs`` (the newest 1,000: the agent API's list), answered from the
  orchestrators' in-memory index;
* a submit (``POST /restore/sanity`` of a small restore point), which takes the VM's
  lock and the job's lease by compare-and-swap and lists nothing;
* for comparison, what listing cost before the index: every key read one by one, as
  ``JobStore.list()`` did on each list and on each submit.

    .venv/bin/python bench/jobs.py [--jobs 10000] [--reps 20]

Prints a table and writes ``bench/results/jobs.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import nats

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.run import machine
from bench.vb import VirtBackup
from virtbackup.contracts.v1.jobs import Job
from virtbackup.runtime.bus import new_id
from virtbackup.testing.points import write_point


async def write_history(options: dict[str, str], count: int) -> float:
    """``count`` finished backup jobs in ``VB_JOBS``; returns the seconds it took."""
    nc = await nats.connect(**options)
    try:
        kv = await nc.jetstream().key_value("VB_JOBS")
        started = time.monotonic()
        for first in range(0, count, 500):
            batch = []
            for n in range(first, min(first + 500, count)):
                job = Job(
                    id=new_id(), type="backup", state="success", phase="finished",
                    message=f"full backup {n}", server_id="local", vm_name=f"vm-{n % 50}",
                    destination_id="bench", created_at="2026-01-01T00:00:00Z",
                    updated_at="2026-01-01T00:00:00Z", finished_at="2026-01-01T00:00:00Z",
                    total_units=16, completed_units=16, bytes_transferred=1 << 30,
                )  # fmt: skip
                batch.append(kv.put(job.id, msgspec.json.encode(job)))
            await asyncio.gather(*batch)
        return time.monotonic() - started
    finally:
        await nc.drain()


async def list_key_by_key(options: dict[str, str]) -> float:
    """What ``JobStore.list()`` did before the index: every key, one get each."""
    nc = await nats.connect(**options)
    try:
        kv = await nc.jetstream().key_value("VB_JOBS")
        started = time.monotonic()
        for key in await kv.keys():
            await kv.get(key)
        return time.monotonic() - started
    finally:
        await nc.drain()


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median_ms": round(statistics.median(ordered) * 1000, 1),
        "p95_ms": round(ordered[max(0, int(len(ordered) * 0.95) - 1)] * 1000, 1),
        "max_ms": round(ordered[-1] * 1000, 1),
    }


async def amain(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="vb-bench-jobs-") as tmp:
        work = Path(tmp)
        repo = work / "repo"
        repo.mkdir()
        with VirtBackup(1, work) as vb:
            written = await write_history(vb.nats_options(), args.jobs)
            async with vb.client() as api:
                cfg = {
                    "servers": [{"id": "local", "name": "bench", "host": ""}],
                    "destinations": [
                        {"id": "bench", "driverId": "filesystem", "params": {"path": str(repo)}}
                    ],
                    "backupDestinationId": "bench",
                }
                (await api.post("/config", json=cfg)).raise_for_status()
                xml_path = await write_point(repo, "bench-vm", chunks=1)
                # Until both replicas' indexes hold the history.
                deadline = time.monotonic() + 60
                while len((await api.get("/jobs")).json()) < min(args.jobs, 1000):
                    assert time.monotonic() < deadline, "the job index did not fill"
                    await asyncio.sleep(0.2)
                lists, submits, sizes = [], [], []
                for _ in range(args.reps):
                    started = time.monotonic()
                    resp = await api.get("/jobs")
                    lists.append(time.monotonic() - started)
                    resp.raise_for_status()
                    sizes.append(len(resp.content))
                for _ in range(args.reps):
                    started = time.monotonic()
                    resp = await api.post("/restore/sanity", json={"xmlPath": xml_path})
                    submits.append(time.monotonic() - started)
                    resp.raise_for_status()
            old = await list_key_by_key(vb.nats_options())
    result: dict[str, Any] = {
        "machine": machine(),
        "jobs": args.jobs,
        "write_seconds": round(written, 2),
        "get_jobs": summary(lists) | {"bytes": sizes[0]},
        "submit": summary(submits),
        "key_by_key_list_ms": round(old * 1000, 1),
    }
    out = Path(__file__).parent / "results" / "jobs.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"{args.jobs} finished jobs in VB_JOBS, {args.reps} requests each (2 orchestrators)")
    print("| request | median | p95 | max |")
    print("|---|---|---|---|")
    for name, key in (("GET /jobs (newest 1000)", "get_jobs"), ("submit (sanity)", "submit")):
        s = result[key]
        print(f"| {name} | {s['median_ms']} ms | {s['p95_ms']} ms | {s['max_ms']} ms |")
    print(f"before the index, one list read every key: {result['key_by_key_list_ms']} ms")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--reps", type=int, default=20)
    return asyncio.run(amain(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
