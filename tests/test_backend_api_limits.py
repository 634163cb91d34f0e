"""backend-api.md routes under hostile or racing input: each answer is a 4xx naming what
was wrong, never a 500 (a stack exhausted by nesting, a bus message over NATS's payload
limit, a lost compare-and-swap), against a real system of its own.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from harness import System, running_system, wait_job

from virtbackup.gateway.plans_yaml import MAX_PIPELINES, MAX_PROJECT_BYTES, MAX_YAML_DEPTH

#: Seconds a backup waits for its agent's lease before it fails (``agent_lease_wait``).
LEASE_WAIT = 3


@pytest.fixture(scope="module")
def sysm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    with running_system(
        tmp_path_factory.mktemp("limits"),
        workers=1,
        orchestrators=1,
        VIRTBACKUP_AGENT_LEASE_WAIT=str(LEASE_WAIT),
    ) as system:
        yield system


@pytest.fixture
async def api(sysm: System) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=sysm.url, headers=sysm.auth(), verify=False, timeout=60
    ) as client:
        yield client


def _pipeline(index: int) -> str:
    return (
        f"  - id: p{index}\n"
        "    vms:\n"
        "      - server: local\n"
        f"        vm: vm-{index}\n"
        "    destination: fs\n"
    )


async def test_hostile_projects_are_400_naming_the_limit(api: httpx.AsyncClient) -> None:
    # ~2 KB nested 1000 deep: was a RecursionError (500).
    deep = "id: deep\nx: " + "[" * 1000 + "]" * 1000 + "\n"
    resp = await api.post("/api/v1/projects/import", json={"yaml": deep})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"].startswith("line 2:")
    assert f"deeper than {MAX_YAML_DEPTH}" in resp.json()["error"]

    # 3000 pipelines (~250 KB, under the body limit): was NATS's MaxPayloadError (500).
    many = "id: many\npipelines:\n" + "".join(_pipeline(i) for i in range(3000))
    resp = await api.post("/api/v1/projects/import", json={"yaml": many})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert "3000 pipelines" in error and str(MAX_PIPELINES) in error and "$.pipelines" in error

    # Few pipelines but a large parsed form: the message would not fit the bus either.
    big = "id: big\ndescription: " + "d" * 400_000 + "\npipelines:\n" + _pipeline(0)
    resp = await api.post("/api/v1/projects/import", json={"yaml": big})
    assert resp.status_code == 400, resp.text
    assert str(MAX_PROJECT_BYTES) in resp.json()["error"]

    resp = await api.get("/api/v1/projects")
    assert resp.status_code == 200, resp.text
    assert not any(p["id"] in {"deep", "many", "big"} for p in resp.json())


async def test_racing_registrations_with_one_token_lose_with_401(
    sysm: System, api: httpx.AsyncClient
) -> None:
    body = {"hostname": "kvm-race", "os": "linux", "arch": "amd64", "agentVersion": "0.1.0"}
    async with httpx.AsyncClient(base_url=sysm.url, verify=False, timeout=60) as anon:
        for _ in range(3):
            resp = await api.post(
                "/api/v1/agent/registration-tokens", json={"expiresInSeconds": 600}
            )
            assert resp.status_code == 201, resp.text
            token = resp.json()["token"]
            answers = await asyncio.gather(
                *(
                    anon.post("/api/v1/agent/register", json={**body, "registrationToken": token})
                    for _ in range(10)
                )
            )
            codes = sorted(a.status_code for a in answers)
            assert codes == [201] + [401] * 9, [a.text for a in answers]


async def _register(sysm: System, api: httpx.AsyncClient) -> str:
    resp = await api.post("/api/v1/agent/registration-tokens", json={"expiresInSeconds": 600})
    assert resp.status_code == 201, resp.text
    body = {
        "registrationToken": resp.json()["token"],
        "hostname": "kvm-refs",
        "os": "linux",
        "arch": "amd64",
        "agentVersion": "0.1.0",
    }
    async with httpx.AsyncClient(base_url=sysm.url, verify=False, timeout=60) as anon:
        resp = await anon.post("/api/v1/agent/register", json=body)
    assert resp.status_code == 201, resp.text
    agent_id: str = resp.json()["agentId"]
    return agent_id


def _config(sysm: System, agent_id: str | None) -> dict[str, object]:
    repo = sysm.data_dir / "refs-repo"
    repo.mkdir(mode=0o700, exist_ok=True)
    remote: dict[str, object] = {"id": "site2", "name": "Site 2", "host": ""}
    if agent_id is not None:
        remote |= {"agentId": agent_id, "agentDestinationIds": ["fs"]}
    return {
        "servers": [{"id": "local", "name": "This host", "host": ""}, remote],
        "destinations": [{"id": "fs", "driverId": "filesystem", "params": {"path": str(repo)}}],
        "backupDestinationId": "fs",
    }


async def test_servers_name_only_registered_agents(sysm: System, api: httpx.AsyncClient) -> None:
    agent_id = await _register(sysm, api)
    # An agent that does not exist: its backups would wait forever for a lease.
    resp = await api.post("/config", json=_config(sysm, "no-such-agent"))
    assert resp.status_code == 400, resp.text
    assert "$.servers[1].agentId" in resp.json()["error"]
    assert not any(s.get("agentId") for s in (await api.get("/config")).json()["servers"])

    resp = await api.post("/config", json=_config(sysm, agent_id))
    assert resp.status_code == 200, resp.text
    # Named by a server: not removed (409 naming the server), still there.
    resp = await api.delete(f"/api/v1/agents/{agent_id}")
    assert resp.status_code == 409 and "site2" in resp.json()["error"], resp.text
    assert (await api.get(f"/api/v1/agents/{agent_id}")).status_code == 200

    resp = await api.post("/config", json=_config(sysm, None))
    assert resp.status_code == 200, resp.text
    assert (await api.delete(f"/api/v1/agents/{agent_id}")).status_code == 200
    # Removed: naming it again is refused.
    resp = await api.post("/config", json=_config(sysm, agent_id))
    assert resp.status_code == 400 and "agentId" in resp.json()["error"], resp.text


async def test_a_backup_no_agent_leases_fails_naming_it(
    sysm: System, api: httpx.AsyncClient
) -> None:
    # A registered agent that never asks for work (stopped, or cut off).
    agent_id = await _register(sysm, api)
    resp = await api.post("/config", json=_config(sysm, agent_id))
    assert resp.status_code == 200, resp.text
    vm = f"vbt-nolease-{os.getpid()}"
    resp = await api.post("/servers/site2/backup", json={"vmName": vm, "destinationId": "fs"})
    assert resp.status_code == 200, resp.text
    job = await wait_job(api, resp.json()["jobId"], timeout=LEASE_WAIT + 30)
    assert job["state"] == "failure", job
    assert agent_id in job["message"] and "did not lease" in job["message"], job
    # The VM is free again: its next backup is accepted (not a 409 for a held lock).
    resp = await api.post("/servers/site2/backup", json={"vmName": vm, "destinationId": "fs"})
    assert resp.status_code == 200, resp.text
    await wait_job(api, resp.json()["jobId"], timeout=LEASE_WAIT + 30)


async def test_deactivating_cancels_jobs_queued_for_the_agent(
    sysm: System, api: httpx.AsyncClient
) -> None:
    agent_id = await _register(sysm, api)
    resp = await api.post("/config", json=_config(sysm, agent_id))
    assert resp.status_code == 200, resp.text
    vm = f"vbt-queued-{os.getpid()}"
    resp = await api.post("/servers/site2/backup", json={"vmName": vm, "destinationId": "fs"})
    assert resp.status_code == 200, resp.text
    job_id = resp.json()["jobId"]
    # Not leased yet (the agent never asks): deactivation cancels it all the same.
    resp = await api.post(f"/api/v1/agents/{agent_id}/actions", json={"action": "deactivate"})
    assert resp.status_code == 200, resp.text
    assert job_id in resp.json()["cancelledJobIds"], resp.json()
    job = await wait_job(api, job_id, timeout=30)
    assert job["state"] == "canceled", job
    view = (await api.get(f"/api/v1/jobs/{job_id}")).json()
    assert view["status"] == "failed" and view["error"] == "cancelled by user", view


async def test_not_found_quotes_a_long_id_only_so_far(api: httpx.AsyncClient) -> None:
    long_id = "a" * 5000
    for path in (
        f"/api/v1/agents/{long_id}",
        f"/api/v1/plan-runs/{long_id}",
        f"/api/v1/projects/{long_id}",
    ):
        resp = await api.get(path)
        assert resp.status_code in (400, 404), (path, resp.text)
        assert len(resp.text) < 600 and long_id not in resp.text, (path, resp.text[:300])
