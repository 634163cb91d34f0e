"""Backup plans and chains (backend-api.md's projects, pipelines and pipeline chains) end
to end: real NATS, libvirt with two small VMs, a filesystem destination.

A project with one plan over both VMs (a glob) and a chain (backup, then verify) is
imported; bad YAML and plans naming what does not exist are 400s naming the line and
store nothing; the preview says full, then after a run and guest writes incremental with
a byte estimate within 10% of what the run reads; run-selection and the chain run.
The tests in this module build on each other, in order.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import System, local_config, running_system, wait_job

from virtbackup.testing.vms import SmallVm, create_vm, guest_write, remove_vm, vm_directory
from virtbackup.virt import Connection

pytestmark = pytest.mark.libvirt

MiB = 1 << 20
PID = os.getpid()
VM_A = f"vbt-plan-a-{PID}"
VM_B = f"vbt-plan-b-{PID}"
GLOB = f"vbt-plan-?-{PID}"
PROJECT = f"p{PID}"
PLAN = f"{PROJECT}.both"
CHAIN = f"{PROJECT}.safe"

YAML = f"""\
id: {PROJECT}
name: Plans test
pipelines:
  - id: both
    vms:
      - server: local
        vm: "{GLOB}"
    destination: fs
    schedule:
      cron: "0 3 1 1 *"
      timezone: Europe/Berlin
    retention:
      keepLast: 5
chains:
  - id: safe
    steps:
      - type: backup
        pipeline: both
      - type: verify
        mode: full
"""


@pytest.fixture(scope="module")
def projects_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("projects")


@pytest.fixture(scope="module")
def sysm(tmp_path_factory: pytest.TempPathFactory, projects_dir: Path) -> Iterator[System]:
    data = tmp_path_factory.mktemp("plans")
    env = {"VIRTBACKUP_PROJECTS_DIR": str(projects_dir)}
    # Two orchestrator replicas: both advance the runs, compare-and-swap decides.
    with running_system(data, workers=1, orchestrators=2, **env) as system:
        yield system


@pytest.fixture(scope="module")
async def vms(conn: Connection) -> AsyncIterator[list[SmallVm]]:
    directory = vm_directory()
    made = [await create_vm(conn, name, directory, [64 * MiB]) for name in (VM_A, VM_B)]
    try:
        yield made
    finally:
        await remove_vm(conn, VM_A)
        await remove_vm(conn, VM_B, delete_directory=directory)


@pytest.fixture(scope="module")
async def api(sysm: System, repo_dir: Path, vms: list[SmallVm]) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=sysm.url, headers=sysm.auth(), verify=False, timeout=120
    ) as client:
        assert (await client.post("/config", json=local_config(repo_dir))).status_code == 200
        yield client


async def import_yaml(api: httpx.AsyncClient, text: str) -> httpx.Response:
    return await api.post("/api/v1/projects/import", json={"yaml": text})


async def run_ok(api: httpx.AsyncClient, body: dict[str, Any] | None = None) -> dict[str, Any]:
    resp = await api.post(f"/api/v1/pipelines/{PLAN}/run-selection", json=body or {})
    assert resp.status_code == 200, resp.text
    out: dict[str, Any] = resp.json()
    assert len(out["job_ids"]) == len((body or {}).get("vms") or [VM_A, VM_B])
    for job_id in out["job_ids"]:
        job = await wait_job(api, job_id)
        assert job["state"] == "success", job
    return out


async def preview(api: httpx.AsyncClient, **body: Any) -> dict[str, dict[str, Any]]:
    resp = await api.post(f"/api/v1/pipelines/{PLAN}/dry-run-preview", json=body)
    assert resp.status_code == 200, resp.text
    return {vm["vm_name"]: vm for vm in resp.json()["vms"]}


async def wait_run(api: httpx.AsyncClient, run_id: str, timeout: float = 150) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        resp = await api.get(f"/api/v1/plan-runs/{run_id}")
        assert resp.status_code == 200, resp.text
        run: dict[str, Any] = resp.json()
        if run["state"] != "running":
            return run
        assert time.monotonic() < deadline, run
        await asyncio.sleep(0.3)


BAD = [
    ("unknown key", YAML.replace("    destination: fs", "    destination: fs\n    dest: x"), 9),
    ("tab", YAML.replace("      - server: local", "\t- server: local"), 6),
    ("duplicate key", YAML.replace("name: Plans test", "name: a\nname: b"), 3),
    ("wrong type", YAML.replace("keepLast: 5", "keepLast: five"), 13),
    ("unknown server", YAML.replace("server: local", "server: elsewhere"), 6),
    ("unknown destination", YAML.replace("destination: fs", "destination: nowhere"), 8),
    ("no VM matches", YAML.replace(GLOB, f"nothing-{PID}-*"), 7),
    ("unknown plan in a chain", YAML.replace("pipeline: both", "pipeline: other"), 18),
    ("bad cron", YAML.replace("0 3 1 1 *", "0 3 30 2 *"), 10),
    ("bad time zone", YAML.replace("Europe/Berlin", "Mars/Olympus"), 11),
    (
        "destination twice",
        YAML.replace("pipeline: both", "pipeline: both\n        destinations: [fs, fs]"),
        19,
    ),
]


@pytest.mark.parametrize(("case", "text", "line"), BAD, ids=[b[0] for b in BAD])
async def test_bad_projects_are_400s_naming_the_line_and_store_nothing(
    api: httpx.AsyncClient, case: str, text: str, line: int
) -> None:
    resp = await import_yaml(api, text)
    assert resp.status_code == 400, (case, resp.text)
    assert resp.json()["error"].startswith(f"line {line}:"), (case, resp.text)
    listed = await api.get("/api/v1/projects")
    assert listed.status_code == 200
    assert listed.json() == []
    assert (await api.get(f"/api/v1/projects/{PROJECT}")).status_code == 404


async def test_a_body_names_yaml_or_path(api: httpx.AsyncClient) -> None:
    both = await api.post("/api/v1/projects/import", json={"yaml": YAML, "path": "x.yaml"})
    assert both.status_code == 400
    escape = await api.post("/api/v1/projects/import", json={"path": "../agent.yaml"})
    assert escape.status_code == 400
    assert "$.path" in escape.json()["error"]
    typo = await api.post("/api/v1/projects/import", json={"yml": YAML})
    assert typo.status_code == 400


async def test_import_a_project_with_a_plan_and_a_chain(
    api: httpx.AsyncClient, sysm: System
) -> None:
    resp = await import_yaml(api, YAML)
    assert resp.status_code == 201, resp.text
    project = resp.json()
    assert project["id"] == PROJECT
    assert [p["pipeline_db_id"] for p in project["pipelines"]] == [PLAN]
    assert [c["chain_db_id"] for c in project["chains"]] == [CHAIN]
    assert len(project["schedule_ids"]) == 1  # the plan's one VM selector
    listed = (await api.get("/api/v1/projects")).json()
    assert [p["id"] for p in listed] == [PROJECT]
    again = await import_yaml(api, YAML)
    assert again.status_code == 409
    icon = await api.get(f"/api/v1/projects/{PROJECT}/icon")
    assert icon.status_code == 200
    assert icon.headers["content-type"].startswith("image/svg+xml")
    assert icon.content.startswith(b"<svg")
    assert "sandbox" in icon.headers["content-security-policy"]
    # The plan's schedule is one of the scheduler's (exactly once across replicas).
    (sid,) = project["schedule_ids"]
    async with httpx.AsyncClient(base_url=sysm.hypersdk_url, headers=sysm.auth()) as hyper:
        schedule = await hyper.get(f"/schedules/{sid}")
        assert schedule.status_code == 200, schedule.text
        assert schedule.text.count("0 3 1 1 *") == 1 and "Europe/Berlin" in schedule.text
        assert f"local/{GLOB}" in schedule.text
    reload = await api.post(f"/api/v1/projects/{PROJECT}/reload")
    assert reload.status_code == 200, reload.text
    assert reload.json()["schedule_ids"] == project["schedule_ids"]


async def test_eligible_agents_and_bad_run_payloads(api: httpx.AsyncClient) -> None:
    resp = await api.post(f"/api/v1/pipelines/{PLAN}/eligible-agents")
    assert resp.status_code == 200, resp.text
    agents = resp.json()["agents"]
    assert agents and all(a["kind"] == "transfer-worker" for a in agents)
    bad_agent = await api.post(
        f"/api/v1/pipelines/{PLAN}/run-selection", json={"agent_id": "no-such-agent"}
    )
    assert bad_agent.status_code == 400
    assert "$.agent_id" in bad_agent.json()["error"]
    bad_ref = await api.post(
        f"/api/v1/pipelines/{PLAN}/run-selection", json={"source_ref": "2001-01-01T00-00-00"}
    )
    assert bad_ref.status_code == 400
    assert "$.source_ref" in bad_ref.json()["error"]
    bad_vm = await api.post(
        f"/api/v1/pipelines/{PLAN}/run-selection", json={"vms": ["local/not-in-plan"]}
    )
    assert bad_vm.status_code == 400
    unknown = await api.post("/api/v1/pipelines/nope.nope/run-selection", json={})
    assert unknown.status_code == 404
    jobs = (await api.get("/jobs")).json()
    assert jobs == []  # none of the refused runs created a job


async def test_preview_says_full_then_incremental_within_ten_percent(
    api: httpx.AsyncClient, conn: Connection
) -> None:
    first = await preview(api)
    assert set(first) == {VM_A, VM_B}
    for vm in first.values():
        assert vm["mode"] == "full"
        assert vm["parent_timestamp"] is None
        assert vm["disks"][0]["reason"] == "no restore point yet"
    # Nothing to build on yet: no VM can be resolved from the cache alone.
    assert await preview(api, execution_mode="offline_cached", offline_cached_only=True) == {}
    dry = await api.post(f"/api/v1/pipelines/{PLAN}/run-selection", json={"dry_run": True})
    assert dry.status_code == 200
    assert dry.json()["dry_run"] is True and dry.json()["job_ids"] == []
    await run_ok(api)

    await guest_write(conn, VM_A, "vda", 0, 4 * MiB, pattern=0x11)
    await guest_write(conn, VM_B, "vda", 8 * MiB, 8 * MiB, pattern=0x22)
    await guest_write(conn, VM_B, "vda", 40 * MiB, 1 * MiB, pattern=0x33)
    refs = await api.get(f"/api/v1/pipelines/{PLAN}/source-refs")
    assert refs.status_code == 200
    by_vm = {v["vm_name"]: v for v in refs.json()["vms"]}
    second = await preview(api)
    for name in (VM_A, VM_B):
        vm = second[name]
        assert vm["mode"] == "incremental", vm
        assert vm["parent_timestamp"] == by_vm[name]["latest"]
        assert vm["parent_checkpoint"] in by_vm[name]["checkpoints"]
    assert second[VM_A]["estimated_bytes"] >= 4 * MiB
    assert second[VM_B]["estimated_bytes"] >= 9 * MiB

    # Another VM's point as source_ref is a 400 (when the two points' seconds differ).
    if by_vm[VM_B]["latest"] != by_vm[VM_A]["latest"]:
        other = await api.post(
            f"/api/v1/pipelines/{PLAN}/run-selection",
            json={"vms": [f"local/{VM_A}"], "source_ref": by_vm[VM_B]["latest"]},
        )
        assert other.status_code == 400, other.text
        assert "$.source_ref" in other.json()["error"]

    out = await run_ok(api)
    for job_id in out["job_ids"]:
        job = (await api.get(f"/jobs/{job_id}")).json()
        estimate = second[job["vmName"]]["estimated_bytes"]
        read = job["bytesTransferred"]
        assert abs(read - estimate) <= 0.1 * estimate, (job["vmName"], read, estimate)
        assert job["params"]["planRunId"] == out["run_id"]
    run = await wait_run(api, out["run_id"])
    assert run["state"] == "success", run
    assert [s["type"] for s in run["steps"]] == ["backup", "prune"]
    # The prune of each VM applies the plan's keep rules (all of them, as KeepRules).
    prunes = [(await api.get(f"/jobs/{j}")).json() for j in run["steps"][1]["job_ids"]]
    assert len(prunes) == 2 and all(p["params"].get("keepLast") == 5 for p in prunes), prunes


async def test_run_on_a_named_point_and_full(api: httpx.AsyncClient) -> None:
    refs = (await api.get(f"/api/v1/pipelines/{PLAN}/source-refs")).json()
    vm_a = next(v for v in refs["vms"] if v["vm_name"] == VM_A)
    assert len(vm_a["points"]) == 2
    oldest = vm_a["points"][0]["timestamp"]
    out = await run_ok(api, {"vms": [f"local/{VM_A}"], "source_ref": oldest})
    job = (await api.get(f"/jobs/{out['job_ids'][0]}")).json()
    assert job["result"]["parentTimestamp"] == oldest
    agents = await api.post(f"/api/v1/pipelines/{PLAN}/eligible-agents")
    agent_id = agents.json()["agents"][0]["id"]
    out = await run_ok(api, {"vms": [f"local/{VM_A}"], "source_ref": "full", "agent_id": agent_id})
    job = (await api.get(f"/jobs/{out['job_ids'][0]}")).json()
    assert job["result"]["parentTimestamp"] is None
    assert job["params"]["pinnedAgentId"] == agent_id


async def test_chain_backs_up_then_verifies(api: httpx.AsyncClient) -> None:
    pre = await api.post(f"/api/v1/pipeline-chains/{CHAIN}/dry-run-preview", json={})
    assert pre.status_code == 200
    assert {v["vm_name"] for v in pre.json()["vms"]} == {VM_A, VM_B}
    agents = await api.post(f"/api/v1/pipeline-chains/{CHAIN}/eligible-agents")
    assert agents.status_code == 200 and agents.json()["agents"]
    assert (await api.get(f"/api/v1/pipeline-chains/{CHAIN}/source-refs")).status_code == 200
    resp = await api.post(f"/api/v1/pipeline-chains/{CHAIN}/run", json={})
    assert resp.status_code == 200, resp.text
    run = await wait_run(api, resp.json()["run_id"])
    assert run["state"] == "success", run
    backup, verify = run["steps"]
    assert backup["type"] == "backup" and len(backup["job_ids"]) == 2
    assert verify["type"] == "verify" and len(verify["job_ids"]) == 2
    for job_id in verify["job_ids"]:
        job = (await api.get(f"/jobs/{job_id}")).json()
        assert job["type"] == "verify" and job["state"] == "success", job
    # Each step ran once, though both replicas advance the run.
    every = (await api.get("/jobs")).json()
    assert sorted(j["id"] for j in every if j["type"] == "verify") == sorted(verify["job_ids"])


async def test_version_resolve_streams_each_vm(api: httpx.AsyncClient) -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    async with api.stream("GET", f"/api/v1/pipelines/{PLAN}/version-resolve") as resp:
        assert resp.status_code == 200
        event = ""
        async for line in resp.aiter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                events.append((event, json.loads(line.split(":", 1)[1])))
                if event == "resolve.done":
                    break
    kinds = [e for e, _ in events]
    assert kinds[0] == "resolve.start" and kinds[-1] == "resolve.done"
    assert kinds.count("resolve.vm") == 2 and kinds.count("resolve.disk") == 2
    assert all(d["mode"] == "incremental" for e, d in events if e == "resolve.vm")


async def test_offline_cached_resolves_from_the_cache_or_refuses_an_old_one(
    api: httpx.AsyncClient,
) -> None:
    cached = await preview(api, execution_mode="offline_cached")
    assert set(cached) == {VM_A, VM_B}
    assert all(v["cached"] and v["mode"] == "incremental" for v in cached.values())
    strict = YAML.replace(f"id: {PROJECT}", f"id: {PROJECT}-old").replace(
        "      keepLast: 5", "      keepLast: 5\n    options:\n      cacheMaxAgeSeconds: 1"
    )
    assert (await import_yaml(api, strict)).status_code == 201
    await asyncio.sleep(1.5)
    old = await api.post(
        f"/api/v1/pipelines/{PROJECT}-old.both/dry-run-preview",
        json={"execution_mode": "offline_cached"},
    )
    assert old.status_code == 400
    assert "offline_cached refused" in old.json()["error"]
    assert (await api.delete(f"/api/v1/projects/{PROJECT}-old")).status_code == 200


async def test_delete_removes_the_project(api: httpx.AsyncClient, sysm: System) -> None:
    sid = (await api.get(f"/api/v1/projects/{PROJECT}")).json()["schedule_ids"][0]
    assert (await api.delete(f"/api/v1/projects/{PROJECT}")).status_code == 200
    async with httpx.AsyncClient(base_url=sysm.hypersdk_url, headers=sysm.auth()) as hyper:
        assert (await hyper.get(f"/schedules/{sid}")).status_code == 404
    assert (await api.get(f"/api/v1/projects/{PROJECT}")).status_code == 404
    assert (await api.post(f"/api/v1/pipelines/{PLAN}/dry-run-preview", json={})).status_code == 404
    assert (await api.get("/api/v1/projects")).json() == []


async def test_a_project_file_is_imported_and_reloaded(
    api: httpx.AsyncClient, projects_dir: Path
) -> None:
    """A ``path`` project is read from the projects directory; ``reload`` reads the file
    again, and a file that became bad is a 400 naming its line that changes nothing."""
    text = YAML.replace(f"id: {PROJECT}", f"id: {PROJECT}-file")
    source = projects_dir / "nightly.yaml"
    source.write_text(text)
    resp = await api.post("/api/v1/projects/import", json={"path": "nightly.yaml"})
    assert resp.status_code == 201, resp.text
    assert resp.json()["source"] == {"kind": "path", "path": "nightly.yaml"}
    source.write_text(text.replace("keepLast: 5", "keepLast: 9"))
    reloaded = await api.post(f"/api/v1/projects/{PROJECT}-file/reload")
    assert reloaded.status_code == 200, reloaded.text
    assert reloaded.json()["pipelines"][0]["retention"]["keepLast"] == 9
    source.write_text(text.replace("keepLast: 5", "keepLast: 9\n    bogus: 1"))
    bad = await api.post(f"/api/v1/projects/{PROJECT}-file/reload")
    assert bad.status_code == 400
    assert bad.json()["error"].startswith("line 14: unknown key 'bogus'")
    kept = (await api.get(f"/api/v1/projects/{PROJECT}-file")).json()
    assert kept["pipelines"][0]["retention"]["keepLast"] == 9
    assert (await api.delete(f"/api/v1/projects/{PROJECT}-file")).status_code == 200
