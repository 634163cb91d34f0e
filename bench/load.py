"""Load held: 100 SSE and 100 WebSocket clients while jobs run, ``/health`` timed.

Runs its own system (``tests/harness.running_system``: a NATS server and every service
as a process, one orchestrator, one transfer worker), never ``virtbackup up``; then

* connects ``--sse`` clients to the agent API's ``GET /events`` (server-sent events) and
  ``--ws`` clients to the HyperSDK listener's ``/ws`` (WebSocket, the token in the
  ``virtbackup.bearer.`` subprotocol), every one reading and counting what it receives;
* runs jobs the whole time: a sanity check (``POST /restore/sanity``: a real job that
  reads a small restore point, written here with ``virtbackup.testing.points``) every
  ``--job-interval`` seconds, so every client gets job events and log lines;
* times ``GET /health`` on the HyperSDK listener, one request every ``--health-interval``
  seconds for ``--seconds`` seconds (p50, p99, max; the target: p99 < 50 ms), from a
  process of its own (the clients' streams keep this one's event loop busy);
* samples the gateway's resident memory (``VmRSS``) every second, and its peak
  (``VmHWM``) at the end, against the same gateway before any client connected;
* has the gateway watch its own event loop (``VIRTBACKUP_LOOP_WATCH_MS``, see
  ``virtbackup.gateway.loop_watch``) and reports, over the timed window, its longest
  late wake-up (``lag_max_ms``, wall clock), the most CPU its loop spent without yielding
  (``stall_cpu_max_ms``: what the gateway itself caused, whatever else runs on the
  machine) and its longest garbage collection.

Every client must have received something, every job must succeed and no client may
have been dropped, or the run fails.

    .venv/bin/python bench/load.py [--sse 100] [--ws 100] [--seconds 60] [--json PATH]
        [--gateway-log PATH]   # keep the gateway's log (its loop records, slow callbacks)

Prints a table and writes ``bench/results/load.json`` (not kept in git). About 1.5 min.
"""

from __future__ import annotations

import argparse
import asyncio
import calendar
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import websockets

if __package__ in (None, ""):  # run as a script: bench/ and tests/ as run.py does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from harness import System, api_client, running_system, wait_job

from bench.measure import memory, read_stat
from bench.run import machine
from virtbackup.gateway.loop_watch import REPORT_SECONDS
from virtbackup.testing.points import write_point

MiB = 1 << 20
#: The gateway's loop watch threshold (ms): its samples later than this are counted.
LOOP_WATCH_MS = "10"


class Counts:
    """What the clients received, and those that ended before they were told to."""

    def __init__(self, sse: int, ws: int) -> None:
        self.sse = [0] * sse
        self.ws = [0] * ws
        self.connected = 0
        self.dropped: list[str] = []


async def sse_client(system: System, n: int, counts: Counts, ready: asyncio.Event) -> None:
    """Read ``/events`` until cancelled, counting the events."""
    try:
        async with (
            # No read timeout: an idle stream between events is normal.
            httpx.AsyncClient(verify=False, timeout=httpx.Timeout(30, read=None)) as client,
            client.stream("GET", f"{system.url}/events", headers=system.auth()) as resp,
        ):
            assert resp.status_code == 200, resp.status_code
            counts.connected += 1
            ready.set()
            async for line in resp.aiter_lines():
                if line.startswith("event:"):
                    counts.sse[n] += 1
        counts.dropped.append(f"sse {n}: the stream ended")
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        counts.dropped.append(f"sse {n}: {exc!r}")


async def ws_client(system: System, n: int, counts: Counts, ready: asyncio.Event) -> None:
    """Read ``/ws`` until cancelled, counting the messages."""
    url = f"ws://127.0.0.1:{system.hypersdk_port}/ws"
    protocols: Any = ["virtbackup.v1", f"virtbackup.bearer.{system.token}"]
    try:
        async with websockets.connect(url, subprotocols=protocols, open_timeout=60) as sock:
            counts.connected += 1
            ready.set()
            async for _ in sock:
                counts.ws[n] += 1
        counts.dropped.append(f"ws {n}: the socket closed")
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        counts.dropped.append(f"ws {n}: {exc!r}")


def rss_mib(system: System) -> tuple[float, float]:
    rss, hwm = memory(system.procs["gateway"].pid)
    return round(rss / MiB, 1), round(hwm / MiB, 1)


def loop_records(log_path: Path, since: float) -> dict[str, Any]:
    """The gateway's ``event loop`` records (``loop_watch``) whose whole period came after
    ``since`` (a ``time.time()``), summed up: the worst of each figure and the count."""
    lag = cpu = 0.0
    gc_max = [0.0, 0.0, 0.0]
    gc_cpu = [0.0, 0.0, 0.0]
    gc_runs = [0, 0, 0]
    stalls = records = 0
    for line in log_path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            if rec.get("msg") != "event loop":
                continue
            logged = calendar.timegm(time.strptime(rec["ts"][:19], "%Y-%m-%dT%H:%M:%S"))
            if logged - REPORT_SECONDS < since - 1:  # its period began before ``since``
                continue
            records += 1
            lag, cpu = max(lag, rec["lag_max_ms"]), max(cpu, rec["stall_cpu_max_ms"])
            stalls += rec["stalls"]
            gc_max = [max(a, b) for a, b in zip(gc_max, rec["gc_max_ms"], strict=True)]
            gc_cpu = [max(a, b) for a, b in zip(gc_cpu, rec["gc_cpu_max_ms"], strict=True)]
            gc_runs = [a + b for a, b in zip(gc_runs, rec["gc_runs"], strict=True)]
    return {
        "records": records,
        "lag_max_ms": lag,
        "stall_cpu_max_ms": cpu,
        f"stalls_over_{LOOP_WATCH_MS}_ms": stalls,
        "gc_max_ms_by_generation": gc_max,
        "gc_cpu_max_ms_by_generation": gc_cpu,
        "gc_runs_by_generation": gc_runs,
    }


def percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="vbbench-load-", dir="/var/tmp"))
    work.chmod(0o700)
    result: dict[str, Any] = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "sse_clients": args.sse,
        "ws_clients": args.ws,
        "seconds": args.seconds,
    }
    try:
        repo, data = work / "repo", work / "system"
        repo.mkdir(mode=0o700)
        data.mkdir(mode=0o700)
        config = {
            "servers": [{"id": "local", "name": "This host", "host": ""}],
            "destinations": [
                {"id": "fs", "name": "Local", "driverId": "filesystem",
                 "params": {"path": str(repo)}}
            ],
            "backupDestinationId": "fs",
        }  # fmt: skip
        xml_path = await write_point(repo, "load-vm", chunks=1)
        with running_system(
            data, workers=1, orchestrators=1, VIRTBACKUP_LOOP_WATCH_MS=LOOP_WATCH_MS
        ) as system:
            gateway_log = data / "gateway.log"
            print(f"gateway pid {system.procs['gateway'].pid}", flush=True)
            async with api_client(system, config, timeout=60) as api:
                result["gateway_rss_before_mib"] = rss_mib(system)[0]
                counts = Counts(args.sse, args.ws)
                ready = asyncio.Event()
                started = time.monotonic()
                clients = [
                    asyncio.create_task(sse_client(system, n, counts, ready))
                    for n in range(args.sse)
                ] + [
                    asyncio.create_task(ws_client(system, n, counts, ready)) for n in range(args.ws)
                ]
                deadline = time.monotonic() + 120
                while counts.connected < args.sse + args.ws:
                    assert not counts.dropped, counts.dropped[:5]
                    assert time.monotonic() < deadline, f"{counts.connected} clients connected"
                    await asyncio.sleep(0.1)
                result["connect_all_s"] = round(time.monotonic() - started, 2)
                print(f"{counts.connected} clients connected in {result['connect_all_s']} s",
                      flush=True)  # fmt: skip

                job_ids: list[str] = []
                stop = asyncio.Event()

                async def jobs() -> None:
                    while not stop.is_set():
                        resp = await api.post("/restore/sanity", json={"xmlPath": xml_path})
                        assert resp.status_code == 200, resp.text
                        job_ids.append(resp.json()["jobId"])
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(stop.wait(), args.job_interval)

                rss_samples: list[float] = []

                async def sample_rss() -> None:
                    while not stop.is_set():
                        rss_samples.append(rss_mib(system)[0])
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(stop.wait(), 1.0)

                background = [asyncio.create_task(jobs()), asyncio.create_task(sample_rss())]
                gateway_pid = system.procs["gateway"].pid
                cpu_before, wall_before = read_stat(gateway_pid), time.monotonic()
                timed_from = time.time()
                # Timed from a process of its own: this one's event loop is busy with the
                # clients' streams, and its delays are no part of the gateway's answer.
                sampler = await asyncio.create_subprocess_exec(
                    sys.executable, __file__, "--sample-health", system.hypersdk_url,
                    "--seconds", str(args.seconds), "--health-interval", str(args.health_interval),
                    env={**os.environ, "VB_BENCH_TOKEN": system.token},
                    stdout=asyncio.subprocess.PIPE,
                )  # fmt: skip
                out, _ = await sampler.communicate()
                assert sampler.returncode == 0, out[-2000:]
                sampled = json.loads(out)
                latencies: list[float] = sampled["latencies"]
                statuses: dict[str, int] = sampled["statuses"]
                cpu_after, wall = read_stat(gateway_pid), time.monotonic() - wall_before
                result["gateway_loop"] = loop_records(gateway_log, timed_from)
                stop.set()
                await asyncio.gather(*background)
                ticks = os.sysconf("SC_CLK_TCK")
                gateway_cpu = (
                    (cpu_after.own - cpu_before.own) / ticks if cpu_after and cpu_before else 0.0
                )
                finished = [await wait_job(api, job_id, timeout=120) for job_id in job_ids]
                # The last jobs' events reach the clients before they are counted.
                await asyncio.sleep(1.0)
                dropped = list(counts.dropped)
                for task in clients:
                    task.cancel()
                await asyncio.gather(*clients, return_exceptions=True)
                rss, hwm = rss_mib(system)
                if args.gateway_log:
                    shutil.copyfile(gateway_log, args.gateway_log)
                ordered = sorted(latencies)
                result |= {
                    "health": {
                        "n": len(ordered),
                        "statuses": statuses,
                        "p50_ms": round(statistics.median(ordered) * 1000, 2),
                        "p99_ms": round(percentile(ordered, 0.99) * 1000, 2),
                        "max_ms": round(ordered[-1] * 1000, 2),
                        "target_p99_ms": 50,
                        "met": percentile(ordered, 0.99) < 0.050,
                    },
                    "jobs": {
                        "submitted": len(job_ids),
                        "succeeded": sum(j["state"] == "success" for j in finished),
                    },
                    "received": {
                        "sse_events_min": min(counts.sse, default=0),
                        "sse_events_total": sum(counts.sse),
                        "ws_messages_min": min(counts.ws, default=0),
                        "ws_messages_total": sum(counts.ws),
                    },
                    "dropped": dropped,
                    # The gateway's CPU seconds over the timed minute, and over its seconds
                    # (1.0: one core busy all the time; it is one process, one event loop).
                    "gateway_cpu": {
                        "seconds": round(gateway_cpu, 1),
                        "of_one_core": round(gateway_cpu / wall, 2),
                    },
                    "load_average_end": [round(x, 2) for x in os.getloadavg()],
                    "gateway_rss_mib": {
                        "before_clients": result.pop("gateway_rss_before_mib"),
                        "max_sampled_under_load": max(rss_samples, default=rss),
                        "end": rss,
                        "peak_vmhwm": hwm,
                    },
                }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def report(result: dict[str, Any]) -> None:
    h, j, r, m = result["health"], result["jobs"], result["received"], result["gateway_rss_mib"]
    print(
        f"\n{result['sse_clients']} SSE + {result['ws_clients']} WebSocket clients, "
        f"{result['seconds']} s, {result['date']}"
    )
    print("| figure | value |\n|---|---|")
    print(f"| GET /health (HyperSDK), {h['n']} requests | p50 {h['p50_ms']} ms, p99 "
          f"{h['p99_ms']} ms, max {h['max_ms']} ms ({'met' if h['met'] else 'NOT MET'}: "
          "p99 < 50 ms) |")  # fmt: skip
    print(
        f"| jobs run meanwhile (sanity checks) | {j['succeeded']} of {j['submitted']} succeeded |"
    )
    print(
        f"| SSE events received | {r['sse_events_total']} (each client >= {r['sse_events_min']}) |"
    )
    print(f"| WebSocket messages received | {r['ws_messages_total']} "
          f"(each client >= {r['ws_messages_min']}) |")  # fmt: skip
    print(f"| gateway RSS | {m['before_clients']} MiB before the clients, at most "
          f"{m['max_sampled_under_load']} MiB under load, "
          f"peak {m['peak_vmhwm']} MiB |")  # fmt: skip
    c = result["gateway_cpu"]
    print(f"| gateway CPU while timed | {c['seconds']} s ({c['of_one_core']} of one core) |")
    g = result["gateway_loop"]
    print(f"| gateway event loop ({g['records']} periods of {REPORT_SECONDS:g} s) | latest wake-up "
          f"{g['lag_max_ms']} ms late, most CPU without yielding {g['stall_cpu_max_ms']} ms, "
          f"longest GC {max(g['gc_max_ms_by_generation'])} ms "
          f"({max(g['gc_cpu_max_ms_by_generation'])} ms CPU) |")  # fmt: skip
    print(f"| clients dropped | {len(result['dropped'])} |")
    print(f"| machine load average at the end | {result['load_average_end']} |")


def sample_health(url: str, seconds: float, interval: float) -> int:
    """``GET {url}/health`` every ``interval`` seconds for ``seconds``; prints the
    latencies (seconds) and the status counts as JSON (the token from ``VB_BENCH_TOKEN``)."""
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    headers = {"Authorization": f"Bearer {os.environ['VB_BENCH_TOKEN']}"}
    with httpx.Client(base_url=url, timeout=30, headers=headers) as client:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.monotonic()
            resp = client.get("/health")
            latencies.append(time.monotonic() - t0)
            statuses[str(resp.status_code)] = statuses.get(str(resp.status_code), 0) + 1
            time.sleep(max(0.0, interval - (time.monotonic() - t0)))
    print(json.dumps({"latencies": latencies, "statuses": statuses}))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample-health", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--sse", type=int, default=100, help="SSE clients on /events")
    parser.add_argument("--ws", type=int, default=100, help="WebSocket clients on /ws")
    parser.add_argument("--seconds", type=float, default=60, help="how long /health is timed")
    parser.add_argument("--health-interval", type=float, default=0.05)
    parser.add_argument("--job-interval", type=float, default=1.0)
    parser.add_argument(
        "--json", type=Path, default=Path(__file__).parent / "results" / "load.json"
    )
    parser.add_argument("--gateway-log", type=Path, help="copy the gateway's log here")
    args = parser.parse_args()
    if args.sample_health:
        return sample_health(args.sample_health, args.seconds, args.health_interval)
    result = asyncio.run(run(args))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    report(result)
    r, j = result["received"], result["jobs"]
    ok = (
        not result["dropped"]
        and j["succeeded"] == j["submitted"] > 0
        and (not result["sse_clients"] or r["sse_events_min"] > 0)
        and (not result["ws_clients"] or r["ws_messages_min"] > 0)
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
