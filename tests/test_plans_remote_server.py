"""Plans of a remote agent's server, against the real system (NATS, every service, the
gateway over HTTPS): the agent as ``eligible-agents`` shows it and a run pinned to it
(backend-api.md: a deactivated agent leases nothing); a scheduled plan of its server,
and that schedule across a refused reload; ``version-resolve`` of a bad ``source_ref``;
a chain copying a destination onto itself; the agent's output lines in the job's log.
The agent is registered over the API and speaks with its key (heartbeat, lease, status);
no agent process and no VM are needed (a remote agent's VMs are named, not looked up)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import System, running_system, wait_job

VM = f"vbt-pin-{os.getpid()}"
PLAN = f"""\
id: pins
pipelines:
  - id: site2
    vms:
      - {{server: site2, vm: {VM}}}
    destination: fs
"""


@pytest.fixture(scope="module")
def sysm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    with running_system(tmp_path_factory.mktemp("pins"), workers=1, orchestrators=1) as system:
        yield system


@pytest.fixture(scope="module")
async def setup(sysm: System, repo_dir: Path) -> AsyncIterator[dict[str, Any]]:
    """The admin's client, the agent (id, key) named by server ``site2``, the plan."""
    async with httpx.AsyncClient(
        base_url=sysm.url, headers=sysm.auth(), verify=False, timeout=60
    ) as api:
        resp = await api.post("/api/v1/agent/registration-tokens", json={})
        assert resp.status_code == 201, resp.text
        body = {
            "registrationToken": resp.json()["token"],
            "hostname": "kvm-site2",
            "os": "linux",
            "arch": "amd64",
            "agentVersion": "0.1.0",
        }
        resp = await api.post("/api/v1/agent/register", json=body, headers={"Authorization": ""})
        assert resp.status_code == 201, resp.text
        agent = resp.json()
        key = {"Authorization": f"Bearer {agent['apiKey']}"}
        beat = await api.post("/api/v1/heartbeat", json={"agentVersion": "0.1.7"}, headers=key)
        assert beat.status_code == 200, beat.text
        cfg = {
            "servers": [
                {"id": "local", "name": "This host", "host": ""},
                {"id": "site2", "name": "Site 2", "host": "", "agentId": agent["agentId"],
                 "agentDestinationIds": ["fs"]},
            ],
            "destinations": [
                {"id": "fs", "driverId": "filesystem", "params": {"path": str(repo_dir)}}
            ],
            "backupDestinationId": "fs",
        }  # fmt: skip
        resp = await api.post("/config", json=cfg)
        assert resp.status_code == 200, resp.text
        resp = await api.post("/api/v1/projects/import", json={"yaml": PLAN})
        assert resp.status_code == 201, resp.text
        yield {"api": api, "agent": agent["agentId"], "key": key}


async def remote_of(api: httpx.AsyncClient, agent_id: str) -> dict[str, Any]:
    resp = await api.post("/api/v1/pipelines/pins.site2/eligible-agents")
    assert resp.status_code == 200, resp.text
    found: dict[str, Any] = {a["id"]: a for a in resp.json()["agents"]}[agent_id]
    return found


async def test_a_deactivated_agent_is_not_eligible_and_no_run_is_pinned_to_it(
    setup: dict[str, Any],
) -> None:
    api, agent_id = setup["api"], setup["agent"]
    shown = await remote_of(api, agent_id)
    # The gateway's record of the agent: its version and last heartbeat, not blanks.
    assert shown["eligible"] is True and shown["state"] == "active", shown
    assert shown["version"] == "0.1.7" and shown["last_seen"].endswith("Z"), shown

    resp = await api.post(f"/api/v1/agents/{agent_id}/actions", json={"action": "deactivate"})
    assert resp.status_code == 200, resp.text
    shown = await remote_of(api, agent_id)
    assert shown["eligible"] is False and shown["state"] == "deactivated", shown
    assert "deactivated" in shown["reason"], shown
    pinned = {"agent_id": agent_id}
    for path in (
        "/api/v1/pipelines/pins.site2/run-selection",
        "/api/v1/pipelines/pins.site2/dry-run-preview",
    ):
        resp = await api.post(path, json=pinned)
        assert resp.status_code == 400, (path, resp.text)
        assert "deactivated" in resp.text and "$.agent_id" in resp.text, (path, resp.text)
    jobs = (await api.get("/api/v1/jobs")).json()
    assert jobs["total"] == 0, jobs  # nothing was created for it

    resp = await api.post(f"/api/v1/agents/{agent_id}/actions", json={"action": "activate"})
    assert resp.status_code == 200, resp.text
    assert (await remote_of(api, agent_id))["eligible"] is True
    resp = await api.post(
        "/api/v1/pipelines/pins.site2/run-selection", json={**pinned, "dry_run": True}
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["dry_run"] is True and resp.json()["job_ids"] == []


async def test_a_scheduled_plan_of_an_agents_server_imports(
    setup: dict[str, Any], sysm: System
) -> None:
    """A plan's schedule is a schedule of the HyperSDK API's kind; for a server of a
    remote agent its VMs are named, not looked up in the inventory (which does not reach
    that host), and a VM glob there is a 400 naming the agent."""
    api = setup["api"]
    timed = PLAN.replace("id: pins", "id: nightly2") + "    schedule: {cron: '0 3 * * *'}\n"
    resp = await api.post("/api/v1/projects/import", json={"yaml": timed})
    assert resp.status_code == 201, resp.text
    (sid,) = resp.json()["schedule_ids"]
    async with httpx.AsyncClient(base_url=sysm.hypersdk_url, headers=sysm.auth()) as hyper:
        schedule = await hyper.get(f"/schedules/{sid}")
        assert schedule.status_code == 200, schedule.text
        assert schedule.json()["job_template"]["vm_path"] == f"site2/{VM}", schedule.text
        body = {
            "name": "glob",
            "schedule": "0 4 * * *",
            "job_template": {
                "vm_path": "site2/vbt-*",
                "source": {"type": "libvirt", "server_id": "site2"},
                "destination": {"type": "backup", "destination_id": "fs"},
            },
        }
        resp = await hyper.post("/schedules", json=body)
        assert resp.status_code == 400, resp.text
        assert "remote agent" in resp.text and "not by a glob" in resp.text, resp.text


async def test_a_refused_reload_keeps_the_plans_schedule(
    setup: dict[str, Any], sysm: System
) -> None:
    """A schedule whose runs come too close is a 400 naming its line on import and on
    reload, and a refused reload changes nothing: the plan's schedule still runs."""
    api = setup["api"]
    source = sysm.data_dir / "projects" / "timed.yaml"
    source.parent.mkdir(mode=0o700, exist_ok=True)
    good = PLAN.replace("id: pins", "id: timed") + "    schedule: {cron: '0 3 * * *'}\n"
    source.write_text(good)
    resp = await api.post("/api/v1/projects/import", json={"path": "timed.yaml"})
    assert resp.status_code == 201, resp.text
    (sid,) = resp.json()["schedule_ids"]
    source.write_text(good.replace("0 3 * * *", "*/2 * * * *"))
    expected = "line 7: schedule: '*/2 * * * *' runs 2 minutes apart"
    resp = await api.post("/api/v1/projects/timed/reload")
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"].startswith(expected), resp.text
    assert resp.json()["error"].endswith("- at `$.pipelines[0].schedule.cron`"), resp.text
    async with httpx.AsyncClient(base_url=sysm.hypersdk_url, headers=sysm.auth()) as hyper:
        schedule = await hyper.get(f"/schedules/{sid}")
        assert schedule.status_code == 200, schedule.text
        assert "0 3 * * *" in schedule.text
    project = (await api.get("/api/v1/projects/timed")).json()
    assert project["schedule_ids"] == [sid], project
    resp = await api.post(
        "/api/v1/projects/import", json={"yaml": source.read_text().replace("timed", "fast")}
    )
    assert resp.status_code == 400 and resp.json()["error"].startswith(expected), resp.text
    assert (await api.get("/api/v1/projects/fast")).status_code == 404


async def test_version_resolve_refuses_a_source_ref_before_it_streams(
    setup: dict[str, Any],
) -> None:
    """A ``source_ref`` that is no point of the plan's VM is a 400 naming it, as the
    preview's is, not a stream of errors; ``full`` streams."""
    api = setup["api"]
    url = "/api/v1/pipelines/pins.site2/version-resolve"
    resp = await api.get(url, params={"source_ref": "2020-01-01T00-00-00"})
    assert resp.status_code == 400, resp.text
    assert "is not a restore point" in resp.text and "$.source_ref" in resp.text, resp.text
    preview = await api.post(
        "/api/v1/pipelines/pins.site2/dry-run-preview", json={"source_ref": "2020-01-01T00-00-00"}
    )
    assert preview.status_code == 400 and preview.json() == resp.json(), preview.text
    async with api.stream("GET", url, params={"source_ref": "full"}) as stream:
        assert stream.status_code == 200
        text = (await stream.aread()).decode()
    assert "event: resolve.vm" in text and "event: resolve.done" in text, text
    assert "resolve.error" not in text, text


async def test_an_agents_output_lines_stay_one_line_each(setup: dict[str, Any]) -> None:
    """An agent's output line goes to the job's log as one line: a line break in it
    cannot forge another line (a ``[control]`` one, say), and a ``ts`` that is not a
    time is a 400 naming it."""
    api, key = setup["api"], setup["key"]
    resp = await api.post("/servers/site2/backup", json={"vmName": VM})
    assert resp.status_code == 200, resp.text
    job_id = resp.json()["jobId"]
    deadline = time.monotonic() + 30
    while True:
        lease = (await api.post("/api/v1/agent/lease", json={}, headers=key)).json()
        if lease["assigned"]:
            break
        assert time.monotonic() < deadline, lease
        await asyncio.sleep(0.2)
    assert lease["job"]["id"] == job_id, lease
    status = f"/api/v1/jobs/{job_id}/status"
    forged = "2026-01-01T00:00:00.000Z WARN  [control] job cancelled by user"
    # Short enough for the field's length limit: refused for what it is.
    bad = {"status": "reading", "output": [{"line": "x", "ts": "now\n2026-01-01 [control] x"}]}
    resp = await api.post(status, json=bad, headers=key)
    assert resp.status_code == 400 and "$.output[0].ts" in resp.text, resp.text
    body = {"status": "reading", "output": [{"line": f"read vda\n{forged}\rmore"}]}
    resp = await api.post(status, json=body, headers=key)
    assert resp.status_code == 200, resp.text
    resp = await api.post(status, json={"status": "failed", "errorMessage": "test"}, headers=key)
    assert resp.status_code == 200, resp.text
    ended = await wait_job(api, job_id)
    assert ended["state"] == "failure", ended
    deadline = time.monotonic() + 20
    while True:
        log = (await api.get(f"/api/v1/jobs/{job_id}/artifacts/output.log")).text
        if "read vda" in log:
            break
        assert time.monotonic() < deadline, log
        await asyncio.sleep(0.2)
    lines = log.splitlines()
    assert not [line for line in lines if line.startswith("2026-01-01")], log
    (mine,) = [line for line in lines if "read vda" in line]
    assert "[agent " in mine and mine.endswith(f"read vda {forged} more"), mine


async def test_a_chain_copying_a_destination_onto_itself_is_refused(
    setup: dict[str, Any],
) -> None:
    """A copy step's target must be another destination than its source: a 400 naming
    the line at import, not a chain whose copy step fails at every run."""
    chain = PLAN.replace("id: pins", "id: selfcopy") + (
        "chains:\n"
        "  - id: c\n"
        "    steps:\n"
        "      - {type: backup, pipeline: site2}\n"
        "      - {type: copy, destination: fs, target: fs}\n"
    )
    resp = await setup["api"].post("/api/v1/projects/import", json={"yaml": chain})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"].startswith("line 11: destination 'fs' is the copy's source")
    assert resp.json()["error"].endswith("- at `$.chains[0].steps[1].target`"), resp.text
    assert (await setup["api"].get("/api/v1/projects/selfcopy")).status_code == 404


async def test_an_agent_completes_only_after_its_commit(setup: dict[str, Any]) -> None:
    """``completed`` before the ``committing`` report was answered ``commit`` is a 409
    that changes nothing (a cancel may win until then); after it, the job succeeds."""
    api, key = setup["api"], setup["key"]
    resp = await api.post("/servers/site2/backup", json={"vmName": VM})
    assert resp.status_code == 200, resp.text
    job_id = resp.json()["jobId"]
    deadline = time.monotonic() + 30
    while not (await api.post("/api/v1/agent/lease", json={}, headers=key)).json()["assigned"]:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.2)
    status = f"/api/v1/jobs/{job_id}/status"
    done = {"status": "completed", "message": "committed", "timestamp": "2026-11-30T01-02-03"}
    resp = await api.post(status, json=done, headers=key)
    assert resp.status_code == 409 and "committing" in resp.text, resp.text
    await asyncio.sleep(1)  # the runner polls: it must not have taken the report
    job = (await api.get(f"/api/v1/jobs/{job_id}")).json()
    assert job["status"] == "running", job
    resp = await api.post(status, json={"status": "committing"}, headers=key)
    assert resp.status_code == 200 and resp.json()["commit"] is True, resp.text
    resp = await api.post(status, json=done, headers=key)
    assert resp.status_code == 200, resp.text
    deadline = time.monotonic() + 20
    while (job := (await api.get(f"/api/v1/jobs/{job_id}")).json())["status"] == "running":
        assert time.monotonic() < deadline, job
        await asyncio.sleep(0.2)
    assert job["status"] == "succeeded", job


async def test_clear_queue_cancels_a_job_its_agent_has_not_leased(setup: dict[str, Any]) -> None:
    """A remote agent's job that its agent has not leased yet is queued in all but name:
    ``clear-queue`` cancels it with the documented mutation, and the agent then leases
    nothing."""
    api, key = setup["api"], setup["key"]
    resp = await api.post("/servers/site2/backup", json={"vmName": VM})
    assert resp.status_code == 200, resp.text
    job_id = resp.json()["jobId"]
    cleared = await api.post("/api/v1/jobs/clear-queue")
    assert cleared.status_code == 200, cleared.text
    assert job_id in cleared.json()["cancelled"], cleared.json()
    ended = await wait_job(api, job_id)
    assert ended["state"] == "canceled", ended
    view = (await api.get(f"/api/v1/jobs/{job_id}")).json()
    assert view["status"] == "failed" and view["error"] == "cancelled by user", view
    lease = (await api.post("/api/v1/agent/lease", json={}, headers=key)).json()
    assert lease["assigned"] is False, lease
