"""A simulated fleet: 1,000 servers of 10 VMs on libvirt's test driver, and its history.

SIMULATION: every server is a *simulated server* (``uri`` ``test:///<file>.xml``):
libvirt's test driver, run inside the inventory's own process from a driver XML file
written here (one per server, ``--vms`` domains each). Its VMs can be listed, started
and stopped, but there is no QEMU and no disk behind them: the inventory refuses every
operation that would read or write one (a backup of such a VM fails at once, saying so;
``--no-run`` checks that it does). What is measured is the control plane: the
inventory, the gateway, the bus, the job store and the orchestrator's scheduling, never a
data path. With ``--run`` (the default) the system runs with the *simulated transfer*
(``VIRTBACKUP_SIMULATE_TRANSFER_SECONDS``, for benchmarks only): a backup of a simulated
VM waits that many seconds instead of reading a disk and ends ``success`` marked
``simulated``, and the whole fleet is backed up once (``bench/fleet_run.py``).

Runs its own system (``tests/harness.running_system``: a NATS server and every service
as a process, one orchestrator, one worker), never ``virtbackup up``, then:

* posts a configuration with ``--servers`` simulated servers;
* the first full refresh: seconds from the ``POST /config`` until every server's VM list
  (``GET /servers/{id}/vms``) holds its ``--vms`` VMs (the inventory connects to every
  server and reads every domain);
* a forced full refresh: ``POST /servers/{id}/refresh`` of every server, ``--parallel``
  requests at a time, and its seconds;
* the listing routes' latency with that fleet: ``GET /config`` (every server), ``GET
  /servers/{id}/vms`` (one server's VMs, ``--reps`` servers drawn at random), the whole
  fleet's VMs read server by server (``--parallel`` at a time), the HyperSDK
  ``GET /vms/list?server_id=`` (one server's VMs with CPUs, memory and disks);
* the plan of a nightly backup of all of them: a project with one plan whose VMs are
  ``vm: "*"`` on every server, imported (every glob resolved, one schedule per selector),
  and its dry-run preview from the inventory's cache and online, with their seconds;
* the fleet's history: ``--jobs`` finished backup jobs of the fleet's VMs written into
  ``VB_JOBS`` (as ``bench/jobs.py`` does), then ``GET /jobs`` (the newest 1,000) and a
  submit (``POST /servers/{id}/backup`` of a simulated VM: 200, then the job fails with
  the simulated server's refusal, or with ``--run`` succeeds simulated) timed ``--reps``
  times each;
* with ``--run``: the nightly run of every VM under ``--max-per-server`` and
  ``--max-per-destination`` over ``--destinations`` destinations (``bench/fleet_run.py``:
  time until every job ended, jobs/s, the most jobs at once per server and destination,
  queue wait, the orchestrator's and gateway's RSS and CPU);
* the inventory's, gateway's and orchestrator's resident memory (``VmRSS`` and its peak
  ``VmHWM``) and threads after each stage.

    .venv/bin/python bench/fleet.py [--servers 1000] [--vms 10] [--jobs 10000] [--json PATH]
        [--no-run] [--simulate-seconds 5] [--max-per-server 4] [--max-per-destination 64]
        [--destinations 5] [--assume-backup-minutes 10]

Prints a table and writes ``bench/results/fleet.json`` (not kept in git). About 2-4 min
at the defaults on the 2-core machine of the README's figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import httpx
import msgspec
import nats

if __package__ in (None, ""):  # run as a script: bench/ and tests/ as run.py does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from harness import System, api_client, running_system, wait_job

from bench import fleet_run
from bench.measure import memory, read_stat
from bench.run import machine
from virtbackup.contracts.v1.jobs import Job
from virtbackup.runtime.bus import new_id

MiB = 1 << 20


def server_id(n: int) -> str:
    return f"sim-{n:04d}"


def vm_name(server: int, n: int) -> str:
    """Unique across the fleet: a destination keeps a VM's points under its name alone."""
    return f"vm-{server:04d}-{n:02d}"


def write_driver_xml(path: Path, server: int, vms: int) -> None:
    """A libvirt test driver file: a host of 8 CPUs and 64 GiB with ``vms`` running
    domains (1 vCPU, 512 MiB, one 8 GiB virtio disk whose file does not exist)."""
    domains = []
    for n in range(vms):
        name = escape(vm_name(server, n))
        domains.append(
            f'<domain type="test"><name>{name}</name>'
            f"<uuid>{uuid.uuid5(uuid.NAMESPACE_URL, f'{server}/{n}')}</uuid>"
            '<memory unit="MiB">512</memory><vcpu>1</vcpu>'
            '<os><type arch="x86_64">hvm</type></os><devices>'
            '<disk type="file" device="disk"><driver name="qemu" type="qcow2"/>'
            f'<source file="/sim/{server_id(server)}/{name}.qcow2"/>'
            '<target dev="vda" bus="virtio"/></disk></devices></domain>'
        )
    path.write_text(
        "<node><cpu><nodes>1</nodes><sockets>1</sockets><cores>8</cores><threads>1</threads>"
        "<active>8</active><mhz>2000</mhz><model>simulated</model></cpu>"
        f"<memory>67108864</memory>{''.join(domains)}</node>\n"
    )
    path.chmod(0o600)


def fleet_config(directory: Path, servers: int, vms: int, repo: Path) -> dict[str, Any]:
    """Write the servers' driver files into ``directory``; the configuration naming them."""
    entries = []
    for n in range(servers):
        xml = directory / f"{server_id(n)}.xml"
        write_driver_xml(xml, n, vms)
        entries.append({"id": server_id(n), "name": f"Simulated {n}", "uri": f"test://{xml}"})
    return {
        "servers": entries,
        "destinations": [
            {"id": "fs", "name": "Local", "driverId": "filesystem", "params": {"path": str(repo)}}
        ],
        "backupDestinationId": "fs",
    }


def process_memory(system: System) -> dict[str, dict[str, float]]:
    """RSS and peak RSS (MiB) and threads of the inventory, gateway and orchestrator."""
    out: dict[str, dict[str, float]] = {}
    for name in ("inventory", "gateway", "job-orchestrator"):
        proc = system.procs.get(name)
        if proc is None:
            continue
        rss, hwm = memory(proc.pid)
        threads = 0
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("Threads:"):
                    threads = int(line.split()[1])
        except OSError:
            pass
        out[name] = {
            "rss_mib": round(rss / MiB, 1),
            "peak_rss_mib": round(hwm / MiB, 1),
            "threads": threads,
        }
    return out


def summary(values: list[float]) -> dict[str, float]:
    """Milliseconds: median, p95, p99 and max of ``values`` (seconds)."""
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]

    return {
        "n": len(ordered),
        "median_ms": round(statistics.median(ordered) * 1000, 1),
        "p95_ms": round(pick(0.95) * 1000, 1),
        "p99_ms": round(pick(0.99) * 1000, 1),
        "max_ms": round(ordered[-1] * 1000, 1),
    }


async def bounded(parallel: int, calls: list[Callable[[], Awaitable[None]]]) -> float:
    """Run ``calls``, ``parallel`` at a time; returns the seconds it took."""
    queue: asyncio.Queue[Callable[[], Awaitable[None]]] = asyncio.Queue()
    for call in calls:
        queue.put_nowait(call)

    async def worker() -> None:
        while not queue.empty():
            await queue.get_nowait()()

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(parallel)))
    return time.monotonic() - started


async def timed(reps: int, call: Callable[[], Awaitable[httpx.Response]]) -> list[float]:
    out = []
    for _ in range(reps):
        started = time.monotonic()
        resp = await call()
        out.append(time.monotonic() - started)
        assert resp.status_code == 200, resp.text[:500]
    return out


async def list_all(api: httpx.AsyncClient, servers: int, vms: int, parallel: int) -> float:
    """Seconds to read every server's VM list, asserting each holds ``vms`` VMs."""

    def one(n: int) -> Callable[[], Awaitable[None]]:
        async def call() -> None:
            resp = await api.get(f"/servers/{server_id(n)}/vms")
            assert resp.status_code == 200, resp.text[:500]
            assert len(resp.json()) == vms, (server_id(n), resp.text[:500])

        return call

    return await bounded(parallel, [one(n) for n in range(servers)])


async def first_refresh(
    api: httpx.AsyncClient, servers: int, vms: int, parallel: int, timeout: float
) -> float:
    """Seconds from now until every server lists its ``vms`` VMs (a server not connected
    yet answers 503 or an empty list: asked again)."""
    started = time.monotonic()
    pending = set(range(servers))
    while pending:
        assert time.monotonic() - started < timeout, f"{len(pending)} servers not listed"
        done: set[int] = set()

        def one(n: int, done: set[int] = done) -> Callable[[], Awaitable[None]]:
            async def call() -> None:
                resp = await api.get(f"/servers/{server_id(n)}/vms")
                if resp.status_code == 200 and len(resp.json()) == vms:
                    done.add(n)

            return call

        await bounded(parallel, [one(n) for n in sorted(pending)])
        pending -= done
        if pending:
            await asyncio.sleep(0.2)
    return time.monotonic() - started


async def write_history(system: System, servers: int, vms: int, count: int) -> float:
    """``count`` finished backup jobs of the fleet's VMs in ``VB_JOBS``; their seconds."""
    nc = await nats.connect(**system.nats.connect_options())
    try:
        kv = await nc.jetstream().key_value("VB_JOBS")
        started = time.monotonic()
        for first in range(0, count, 500):
            batch = []
            for n in range(first, min(first + 500, count)):
                job = Job(
                    id=new_id(), type="backup", state="success", phase="finished",
                    message=f"simulated full backup {n}", server_id=server_id(n % servers),
                    vm_name=vm_name(n % servers, (n // servers) % vms), destination_id="fs",
                    created_at="2026-01-01T00:00:00Z", updated_at="2026-01-01T00:00:00Z",
                    finished_at="2026-01-01T00:00:00Z", total_units=16, completed_units=16,
                    bytes_transferred=1 << 30,
                )  # fmt: skip
                batch.append(kv.put(job.id, msgspec.json.encode(job)))
            await asyncio.gather(*batch)
        return time.monotonic() - started
    finally:
        await nc.drain()


def fleet_project(servers: int) -> str:
    """A project whose one plan selects every VM of every server (``vm: "*"``, a glob per
    server), nightly at 01:00 UTC, into ``fs``."""
    selectors = "\n".join(f'      - {{server: {server_id(n)}, vm: "*"}}' for n in range(servers))
    return (
        "id: fleet\nname: The whole fleet\npipelines:\n  - id: all\n    vms:\n"
        f"{selectors}\n    destination: fs\n"
        '    schedule: {cron: "0 1 * * *", timezone: UTC}\n'
        "    options: {cacheMaxAgeSeconds: 3600}\n"
    )


async def plan_fleet(
    api: httpx.AsyncClient, servers: int, vms: int, timeout: float
) -> dict[str, Any]:
    """Plan a nightly backup of every VM: the project's import (every glob resolved, one
    schedule per selector) and the plan's dry-run preview, from the inventory's cache
    (``offline_cached``) and online (each VM's disks asked): per step its seconds and
    HTTP status, and the error when it failed (a step that takes longer than
    ``timeout`` seconds is recorded as ``timed out``, and the previews are skipped when
    the import failed)."""
    out: dict[str, Any] = {"vms": servers * vms, "selectors": servers}

    async def step(name: str, path: str, body: dict[str, Any]) -> httpx.Response | None:
        started = time.monotonic()
        try:
            resp = await api.post(path, json=body, timeout=timeout)
        except httpx.TimeoutException:
            out[name] = {"s": round(time.monotonic() - started, 2), "status": "timed out"}
            return None
        out[name] = {"s": round(time.monotonic() - started, 2), "status": resp.status_code}
        if resp.status_code >= 300:
            out[name]["error"] = resp.text[:300]
        return resp

    resp = await step("import", "/api/v1/projects/import", {"yaml": fleet_project(servers)})
    if resp is None or resp.status_code != 201:
        return out
    out["import"]["schedules"] = len(resp.json()["schedule_ids"])
    preview = "/api/v1/pipelines/fleet.all/dry-run-preview"
    for mode in ("offline_cached", "online"):
        body = {"execution_mode": mode} if mode != "online" else {}
        resp = await step(f"preview_{mode}", preview, body)
        if resp is not None and resp.status_code == 200:
            assert len(resp.json()["vms"]) == servers * vms, resp.text[:300]
            out[f"preview_{mode}"]["bytes"] = len(resp.content)
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="vbbench-fleet-", dir="/var/tmp"))
    work.chmod(0o700)
    result: dict[str, Any] = {
        "simulation": "libvirt test driver (test:///<file>.xml) in the inventory's process: "
        "no QEMU, no disks; control plane only",
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "servers": args.servers,
        "vms_per_server": args.vms,
        "memory": {},
    }
    try:
        drivers, repo, data = work / "drivers", work / "repo", work / "system"
        for d in (drivers, repo, data):
            d.mkdir(mode=0o700)
        config = fleet_config(drivers, args.servers, args.vms, repo)
        settings: dict[str, str] = {}
        if args.run:  # the simulated transfer and the limits of the nightly run
            config["destinations"] = fleet_run.destinations(args.destinations, repo)
            settings = fleet_run.env(args)
            result["settings"] = settings
        with running_system(data, workers=1, orchestrators=1, **settings) as system:
            result["memory"]["idle"] = process_memory(system)
            async with api_client(system, timeout=120) as api:
                inventory_pid = system.procs["inventory"].pid
                cpu_before = read_stat(inventory_pid)
                resp = await api.post("/config", json=config)
                assert resp.status_code == 200, resp.text[:500]
                posted = time.monotonic()
                took = await first_refresh(api, args.servers, args.vms, args.parallel, args.timeout)
                result["first_refresh_s"] = round(took, 2)
                result["config_to_listed_s"] = round(time.monotonic() - posted, 2)
                result["memory"]["fleet_listed"] = process_memory(system)
                cpu_after = read_stat(inventory_pid)
                if cpu_before and cpu_after:
                    ticks = os.sysconf("SC_CLK_TCK")
                    result["first_refresh_inventory_cpu_s"] = round(
                        (cpu_after.own - cpu_before.own) / ticks, 1
                    )
                print(f"first full refresh: {took:.1f} s", flush=True)
                if args.only_run:  # straight to the nightly run (measuring the run alone)
                    result["run"] = await fleet_run.nightly_run(api, system, args)
                    result["memory"]["after_run"] = process_memory(system)
                    result["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
                    return result

                def refresh(n: int) -> Callable[[], Awaitable[None]]:
                    async def call() -> None:
                        resp = await api.post(f"/servers/{server_id(n)}/refresh")
                        assert resp.status_code == 200, resp.text[:500]

                    return call

                took = await bounded(args.parallel, [refresh(n) for n in range(args.servers)])
                result["forced_refresh_s"] = round(took, 2)
                print(f"forced full refresh: {took:.1f} s", flush=True)
                result["list_all_vms_s"] = round(
                    await list_all(api, args.servers, args.vms, args.parallel), 2
                )
                rng = random.Random(0)  # noqa: S311 - which servers to ask, not a secret
                picks = [rng.randrange(args.servers) for _ in range(args.reps)]
                it = iter(picks)
                latency = {
                    "GET /config": summary(await timed(args.reps, lambda: api.get("/config"))),
                    "GET /servers/{id}/vms": summary(
                        await timed(
                            args.reps, lambda: api.get(f"/servers/{server_id(next(it))}/vms")
                        )
                    ),
                }
                async with httpx.AsyncClient(
                    base_url=system.hypersdk_url, headers=system.auth(), timeout=120
                ) as hyper:
                    it = iter(picks)
                    latency["GET /vms/list?server_id= (HyperSDK)"] = summary(
                        await timed(
                            args.reps,
                            lambda: hyper.get(
                                "/vms/list", params={"server_id": server_id(next(it))}
                            ),
                        )
                    )
                result["memory"]["after_listing"] = process_memory(system)

                written = await write_history(system, args.servers, args.vms, args.jobs)
                result["history"] = {"jobs": args.jobs, "write_s": round(written, 2)}
                deadline = time.monotonic() + 120
                while len((await api.get("/jobs")).json()) < min(args.jobs, 1000):
                    assert time.monotonic() < deadline, "the job index did not fill"
                    await asyncio.sleep(0.2)
                sizes: list[int] = []

                async def get_jobs() -> httpx.Response:
                    resp = await api.get("/jobs")
                    sizes.append(len(resp.content))
                    return resp

                latency["GET /jobs (newest 1000)"] = summary(await timed(args.reps, get_jobs))
                result["history"]["get_jobs_bytes"] = sizes[0]
                job_ids: list[str] = []

                async def submit() -> httpx.Response:
                    n = len(job_ids)
                    body = {
                        "vmName": vm_name(n % args.servers, n % args.vms),
                        "destinationId": "fs",
                    }
                    resp = await api.post(
                        f"/servers/{server_id(n % args.servers)}/backup", json=body
                    )
                    if resp.status_code == 200:
                        job_ids.append(resp.json()["jobId"])
                    return resp

                latency["submit (POST /servers/{id}/backup)"] = summary(
                    await timed(min(args.reps, 20), submit)
                )
                job = await wait_job(api, job_ids[0], timeout=60)
                if args.run:  # the simulated transfer: success, saying so
                    assert job["state"] == "success" and job["result"]["simulated"], job
                    result["simulated_backup"] = job["message"]
                else:
                    assert job["state"] == "failure" and "simulated" in job["message"], job
                    result["simulated_backup_refused"] = job["message"]
                for job_id in job_ids[1:]:
                    await wait_job(api, job_id, timeout=60)
                result["latency"] = latency
                result["memory"]["after_history"] = process_memory(system)
                result["plan"] = await plan_fleet(api, args.servers, args.vms, args.plan_timeout)
                result["memory"]["after_plan"] = process_memory(system)
                print(f"plan: {result['plan']}", flush=True)
                if args.run:
                    result["run"] = await fleet_run.nightly_run(api, system, args)
                    result["memory"]["after_run"] = process_memory(system)
                result["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        if args.keep_logs is not None:  # the services' logs, for a look after the run
            args.keep_logs.mkdir(mode=0o700, parents=True, exist_ok=True)
            for log in (work / "system").glob("*.log"):
                shutil.copy(log, args.keep_logs / log.name)
        shutil.rmtree(work, ignore_errors=True)
    return result


def report(result: dict[str, Any]) -> None:
    print(
        f"\n{result['servers']} simulated servers x {result['vms_per_server']} VMs "
        f"(SIMULATION: {result['simulation']}), {result['date']}"
    )
    print(f"first full refresh (POST /config until every server lists its VMs): "
          f"{result['first_refresh_s']} s")  # fmt: skip
    print(f"inventory CPU during it: {result.get('first_refresh_inventory_cpu_s')} s")
    if "latency" not in result:  # --only-run
        print(f"machine load average at the end: {result['load_average_end']}")
        fleet_run.report(result["run"])
        return
    print(f"forced full refresh (POST /servers/{{id}}/refresh of every server): "
          f"{result['forced_refresh_s']} s")  # fmt: skip
    print(f"every server's VMs read through GET /servers/{{id}}/vms: {result['list_all_vms_s']} s")
    plan = result["plan"]
    print(f"plan of every VM ({plan['vms']} VMs, {plan['selectors']} selectors):")
    for name in ("import", "preview_offline_cached", "preview_online"):
        if name in plan:
            print(f"  {name}: {plan[name]}")
    print(f"history: {result['history']['jobs']} finished jobs written into VB_JOBS")
    print(f"machine load average at the end: {result['load_average_end']}")
    if "run" in result:
        fleet_run.report(result["run"])
    print("\n| request | n | median | p95 | p99 | max |\n|---|---|---|---|---|---|")
    for name, s in result["latency"].items():
        print(
            f"| {name} | {s['n']} | {s['median_ms']} ms | {s['p95_ms']} ms | {s['p99_ms']} ms "
            f"| {s['max_ms']} ms |"
        )
    print("\n| when | process | RSS MiB | peak RSS MiB | threads |\n|---|---|---|---|---|")
    for when, procs in result["memory"].items():
        for name, m in procs.items():
            print(f"| {when} | {name} | {m['rss_mib']} | {m['peak_rss_mib']} | {m['threads']} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", type=int, default=1000)
    parser.add_argument("--vms", type=int, default=10, help="VMs per server")
    parser.add_argument("--jobs", type=int, default=10_000, help="finished jobs written")
    parser.add_argument("--reps", type=int, default=50, help="requests timed per route")
    parser.add_argument("--parallel", type=int, default=32, help="requests in flight")
    parser.add_argument("--timeout", type=float, default=300, help="first refresh bound (s)")
    parser.add_argument("--plan-timeout", type=float, default=240, help="per plan step (s)")
    parser.add_argument(
        "--run",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="back up every VM once, with the simulated transfer (--no-run: plan only)",
    )
    parser.add_argument(
        "--only-run",
        action="store_true",
        help="after the first refresh, only the nightly run (no listings, history or plan)",
    )
    parser.add_argument(
        "--keep-logs", type=Path, default=None, help="copy the services' logs here at the end"
    )
    parser.add_argument("--simulate-seconds", type=float, default=5.0, help="per backup")
    parser.add_argument("--max-per-server", type=int, default=4)
    parser.add_argument("--max-per-destination", type=int, default=64)
    parser.add_argument("--destinations", type=int, default=5, choices=range(1, 11))
    parser.add_argument(
        "--assume-backup-minutes",
        type=float,
        default=10.0,
        help="a real backup's minutes, for the extrapolated nightly window",
    )
    parser.add_argument("--run-timeout", type=float, default=1800, help="run bound (s)")
    parser.add_argument(
        "--json", type=Path, default=Path(__file__).parent / "results" / "fleet.json"
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("note: not root; the system's services run as this user", file=sys.stderr)
    result = asyncio.run(run(args))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
