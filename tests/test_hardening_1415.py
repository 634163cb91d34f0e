"""Findings of a fresh look at issues 14 and 15 (restore point lifecycle, the HyperSDK
API), each a test that failed before its fix. One system for the module, no VM.
"""

from __future__ import annotations

import re
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from harness import System, running_system

from virtbackup.testing.libvirtd import ensure_libvirtd


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    ensure_libvirtd()
    data = tmp_path_factory.mktemp("hardening")
    repo = data / "repo"
    repo.mkdir(mode=0o700)
    with running_system(data, orchestrators=1) as system:
        cfg = {
            "servers": [{"id": "local", "name": "This host", "host": ""}],
            "destinations": [
                {"id": "fs", "name": "fs", "driverId": "filesystem", "params": {"path": str(repo)}}
            ],
            "backupDestinationId": "fs",
        }
        resp = httpx.post(
            f"{system.url}/config", json=cfg, headers=system.auth(), verify=False, timeout=15
        )
        assert resp.status_code == 200, resp.text
        yield system


@pytest.fixture
async def api(system: System) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=system.url, headers=system.auth(), verify=False, timeout=30
    ) as client:
        yield client


@pytest.fixture
async def hyper(system: System) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=system.hypersdk_url, headers=system.auth(), timeout=30
    ) as client:
        yield client


def refused(resp: httpx.Response, status: int, *words: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body: dict[str, Any] = resp.json()
    for word in words:
        assert word in body["error"], (word, body)
    return body


def _concrete(path: str) -> str:
    for name, value in (
        ("{server_id}", "local"),
        ("{destination_id}", "fs"),
        ("{point_id}", "fs~eA~2026-01-01T00-00-00"),
        ("{name}", "log"),
    ):
        path = path.replace(name, value)
    return re.sub(r"\{[a-z_]+\}", "no-such-thing", path)


async def test_unknown_query_parameters_are_400_naming_them(
    api: httpx.AsyncClient, hyper: httpx.AsyncClient
) -> None:
    """Every GET of /api/v1 and of the HyperSDK listener: a query parameter the route
    does not declare is a 400 naming it, never a listing of everything."""
    resp = await api.get("/api/v1/restore-points", params={"vmname": "x"})
    refused(resp, 400, "vmname", "vmName")
    assert (await api.get("/api/v1/restore-points", params={"vmName": "x"})).status_code == 200
    checked = 0
    for client, prefix in ((api, "/api/v1/"), (hyper, "/")):
        doc = (await client.get("/schema/openapi.json")).json()
        for path, item in doc["paths"].items():
            if not path.startswith(prefix):
                continue
            for method in ("get", "delete"):
                if method not in item:
                    continue
                url = _concrete(path)
                resp = await client.request(method.upper(), url, params={"bogusFilter": "1"})
                refused(resp, 400, "bogusFilter")
                checked += 1
    assert checked > 30
    refused(await hyper.get("/jobs/x", params={"jobid": "1"}), 400, "jobid")


async def test_a_metrics_port_of_a_gateway_listener_is_refused(
    api: httpx.AsyncClient, system: System
) -> None:
    cfg = (await api.get("/config")).json()
    bad = {**cfg, "metrics": {"enabled": True, "port": system.agent_port}}
    refused(await api.post("/config", json=bad), 400, "metrics.port", "agent API")
    assert (await api.get("/config")).json() == cfg


async def test_a_metrics_port_that_cannot_bind_never_stops_the_gateway(
    api: httpx.AsyncClient, hyper: httpx.AsyncClient, system: System
) -> None:
    """A port taken by another process: the gateway starts without that listener and
    the HyperSDK listener's /metrics says why (503 naming the port)."""
    cfg = (await api.get("/config")).json()
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        posted = {**cfg, "metrics": {"enabled": True, "port": port}}
        assert (await api.post("/config", json=posted)).status_code == 200
        system.stop("gateway")
        system.start("gateway")
        system.wait_ready()
        resp = await hyper.get("/metrics")
        refused(resp, 503, str(port), "metrics.port")
        assert (await hyper.get("/status")).status_code == 200
        log = (system.data_dir / "gateway.log").read_text()
        assert "could not start" in log
    finally:
        taken.close()
        assert (await api.post("/config", json=cfg)).status_code == 200
    assert (await hyper.get("/metrics")).status_code == 200
