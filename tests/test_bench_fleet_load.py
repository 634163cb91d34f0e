"""Smoke test of the fleet and load benchmarks (``bench/fleet.py``, ``bench/load.py``):
with tiny numbers, each script runs its own system to the end and writes figures that
say what they should. Not a timed test: the figures themselves are the README's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start_script(script: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / script), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 240) -> str:
    """The script's stdout once it exited 0 (its output in the assertion otherwise)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    return out


def test_the_fleet_and_load_benchmarks_run_with_small_numbers(tmp_path: Path) -> None:
    """Both at once (each its own system), to keep the suite's wall time down."""
    fleet_json, load_json = tmp_path / "fleet.json", tmp_path / "load.json"
    fleet = start_script(
        "fleet.py", "--servers", "4", "--vms", "3", "--jobs", "60", "--reps", "3",
        "--simulate-seconds", "0.5", "--max-per-server", "1", "--max-per-destination", "2",
        "--destinations", "2", "--json", str(fleet_json),
    )  # fmt: skip
    load = start_script(
        "load.py", "--sse", "2", "--ws", "2", "--seconds", "3", "--job-interval", "0.5",
        "--json", str(load_json),
    )  # fmt: skip
    fleet_out, _ = finish(fleet), finish(load)

    result = json.loads(fleet_json.read_text())
    assert (result["servers"], result["vms_per_server"]) == (4, 3)
    assert "no QEMU" in result["simulation"]
    assert 0 < result["first_refresh_s"] < 120 and result["forced_refresh_s"] > 0
    # With the simulated transfer on (--run), a backup of a simulated VM succeeds, saying so.
    assert "simulated backup" in result["simulated_backup"]
    assert result["history"]["jobs"] == 60 and result["history"]["get_jobs_bytes"] > 0
    assert {"GET /config", "GET /servers/{id}/vms", "GET /jobs (newest 1000)"} <= set(
        result["latency"]
    )
    assert result["memory"]["fleet_listed"]["inventory"]["rss_mib"] > 0
    plan = result["plan"]  # every VM of the fleet planned, previewed both ways
    assert (plan["import"]["status"], plan["import"]["schedules"]) == (201, 4), plan
    assert plan["preview_offline_cached"]["status"] == plan["preview_online"]["status"] == 200
    assert "| GET /jobs (newest 1000) | 3 |" in fleet_out
    run = result["run"]  # every VM backed up once, simulated, within the limits
    assert run["jobs"] == 12 and run["states"] == {"success": 12} and run["simulated"] == 12
    assert run["max_per_server_seen"] == 1 and 1 <= run["max_per_destination_seen"] <= 2, run
    assert 0 <= run["queue_wait_s"]["p50"] <= run["queue_wait_s"]["p99"]
    assert run["all_ended_s"] >= 1.5 and run["cpu_s"]["job-orchestrator"] > 0, run
    assert "SIMULATED" in run["simulated_transfer"] and "nightly window" in fleet_out

    result = json.loads(load_json.read_text())
    assert result["dropped"] == []
    assert result["jobs"]["succeeded"] == result["jobs"]["submitted"] > 0
    assert result["received"]["sse_events_min"] > 0 and result["received"]["ws_messages_min"] > 0
    health = result["health"]
    assert health["n"] > 10 and health["statuses"] == {"200": health["n"]}
    assert 0 < health["p50_ms"] <= health["p99_ms"] <= health["max_ms"]
    assert result["gateway_rss_mib"]["end"] > 0 and result["gateway_cpu"]["seconds"] >= 0
