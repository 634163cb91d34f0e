"""Restarts keep state; agent.yaml is imported; services stop cleanly; traces cross the bus."""

from __future__ import annotations

import secrets
import signal
from collections.abc import Callable

import httpx
import pytest
import yaml
from harness import MODULES, System

from virtbackup.testing.points import write_point

CONFIG = {
    "destinations": [
        {"id": "fs1", "name": "Local", "driverId": "filesystem", "params": {"path": "/srv/vb"}}
    ],
    "backupDestinationId": "fs1",
    "servers": [{"id": "s1", "name": "S1", "host": "127.0.0.1", "port": 2, "password": "pw-1"}],
}


def _client(system: System) -> httpx.Client:
    return httpx.Client(base_url=system.url, headers=system.auth(), verify=False, timeout=15)


def test_config_survives_restart_of_gateway_and_of_nats(
    make_system: Callable[..., System],
) -> None:
    system = make_system()
    with _client(system) as api:
        assert api.post("/config", json=CONFIG).status_code == 200
        before = api.get("/config").json()
    assert before["servers"][0]["password"] == "********"

    # The gateway restarts: the configuration is read back from the bucket.
    system.stop("gateway")
    (system.data_dir / "agent.yaml").unlink()  # the bucket, not the file, is the source
    system.start("gateway")
    system.wait_ready()
    with _client(system) as api:
        assert api.get("/config").json() == before
    assert (
        yaml.safe_load((system.data_dir / "agent.yaml").read_text())["servers"][0]["password"]
        == "pw-1"
    )

    # NATS restarts (same store): every service reconnects and the state is still there.
    system.restart_nats()
    system.wait_ready(timeout=60)
    with _client(system) as api:
        assert api.get("/config").json() == before


def test_jobs_token_and_certificate_survive_a_full_restart(
    make_system: Callable[..., System],
) -> None:
    system = make_system(start=False)
    system.token = ""  # let the gateway make its own token
    system.start_all_with_own_token()
    token = (system.data_dir / "agent-token").read_text().strip()
    assert len(token) >= 32
    assert (system.data_dir / "agent-token").stat().st_mode & 0o777 == 0o600
    cert = (system.data_dir / "tls" / "agent.crt").read_bytes()
    with _client(system) as api:
        job = api.get("/jobs").json()
    assert job == []

    import asyncio

    repo = system.data_dir / "repo"
    repo.mkdir(mode=0o700)
    point = asyncio.run(write_point(repo, "keep"))
    cfg = {
        "destinations": [
            {"id": "fs", "name": "fs", "driverId": "filesystem", "params": {"path": str(repo)}}
        ],
        "backupDestinationId": "fs",
    }
    with _client(system) as api:
        assert api.post("/config", json=cfg).status_code == 200
        started = api.post("/restore/sanity", json={"xmlPath": point})
        assert started.status_code == 200, started.text
    job_id: str = started.json()["jobId"]
    system.stop_all()
    system.restart_nats()
    system.start_all_with_own_token()
    assert (system.data_dir / "agent-token").read_text().strip() == token
    assert (system.data_dir / "tls" / "agent.crt").read_bytes() == cert
    with _client(system) as api:
        got = api.get(f"/jobs/{job_id}")
    assert got.status_code == 200
    assert got.json()["vmName"] == "keep"


def test_agent_yaml_is_imported_on_first_start(make_system: Callable[..., System]) -> None:
    system = make_system(start=False)
    (system.data_dir / "agent.yaml").write_text(
        yaml.safe_dump(
            {
                **CONFIG,
                "backup": {"gdrive": {"expiresAt": "2026-02-06T12:00:00Z"}},
                "listenAll": False,
            }
        )
    )
    system.start_all()
    with _client(system) as api:
        cfg = api.get("/config").json()
    assert cfg["backupDestinationId"] == "fs1"
    assert cfg["servers"][0]["host"] == "127.0.0.1"
    assert cfg["servers"][0]["password"] == "********"
    assert cfg["backup"]["gdrive"]["expiresAt"] == "2026-02-06T12:00:00Z"


def test_invalid_agent_yaml_stops_the_gateway_with_the_field_named(
    make_system: Callable[..., System],
) -> None:
    system = make_system(start=False)
    (system.data_dir / "agent.yaml").write_text("servers:\n  - id: s1\n    colour: blue\n")
    proc = system.start("gateway")
    assert proc.wait(30) != 0
    log = (system.data_dir / "gateway.log").read_text()
    assert "unknown field `colour`" in log
    assert "$.servers[0]" in log


@pytest.mark.parametrize("name", list(MODULES))
def test_each_service_stops_cleanly_on_sigterm(system: System, name: str) -> None:
    proc = system.procs[name]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    system.start(name)
    system.wait_ready()


def test_a_trace_started_by_the_client_continues_in_every_service(system: System) -> None:
    trace_id = secrets.token_hex(16)
    parent = secrets.token_hex(8)
    with _client(system) as api:
        resp = api.get("/api/v1/services", headers={"traceparent": f"00-{trace_id}-{parent}-01"})
    assert resp.status_code == 200
    services = resp.json()
    assert {s["service"] for s in services} == set(MODULES)
    for service in services:
        assert service["ok"], service
        assert service["traceId"] == trace_id, service
