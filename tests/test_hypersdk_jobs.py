"""The HyperSDK API's jobs and schedules, over HTTP on its own listener, on a real system.

Real nats-server, libvirtd and QEMU with small VMs, two job-orchestrator replicas, one
transfer worker. The system runs in debug mode with a hold: every job waits ``HOLD``
seconds before it commits, which leaves the time to cancel it or to trigger its schedule
again while it runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import System, local_config, running_system
from nats.aio.client import Client
from nats.aio.msg import Msg

from virtbackup.testing.nats import connect
from virtbackup.testing.receiver import Receiver
from virtbackup.testing.vms import SmallVm, create_vm, guest_write, remove_vm, vm_directory
from virtbackup.virt import Connection

pytestmark = pytest.mark.libvirt

MiB = 1 << 20
HOLD = 3.0
PREFIX = f"vbt-hsj-{os.getpid()}"
WEB = [f"{PREFIX}-web-1", f"{PREFIX}-web-2"]
DB = f"{PREFIX}-db"
#: Longer than a scheduler tick (1 s) on every replica.
TICK_WAIT = 2.5
#: Jobs (and schedules) the gateway asks the job-orchestrator for in one request.
LIST_PAGE = 2
#: The most schedules the module's system keeps.
MAX_SCHEDULES = 12


@pytest.fixture(scope="module")
def hs_system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    with running_system(
        tmp_path_factory.mktemp("hsjobs"),
        workers=1,
        orchestrators=2,
        VIRTBACKUP_DEBUG="1",
        VIRTBACKUP_DEBUG_HOLDS=json.dumps({"before:committing": HOLD}),
        # Schedules firing every 5 s run within a test; the default minimum is 5 minutes.
        VIRTBACKUP_SCHEDULE_MIN_INTERVAL="5",
        # The gateway reads job listings 2 at a time (500 by default): every listing of
        # this module crosses pages.
        VIRTBACKUP_JOB_LIST_PAGE=str(LIST_PAGE),
        VIRTBACKUP_MAX_SCHEDULES=str(MAX_SCHEDULES),
    ) as system:
        yield system


@pytest.fixture(scope="module")
async def vms(conn: Connection) -> AsyncIterator[list[SmallVm]]:
    directory = vm_directory()
    made = [await create_vm(conn, name, directory, [64 * MiB]) for name in [*WEB, DB]]
    for vm in made:  # data for the backups to read (a new image has none allocated)
        await guest_write(conn, vm.name, "vda", 0, 4 * MiB, pattern=0xAB)
    try:
        yield made
    finally:
        for vm in made[:-1]:
            await remove_vm(conn, vm.name)
        await remove_vm(conn, made[-1].name, delete_directory=directory)


@pytest.fixture(scope="module")
async def hs(
    hs_system: System, vms: list[SmallVm], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[httpx.AsyncClient]:
    repo: Path = tmp_path_factory.mktemp("hsrepo")
    async with httpx.AsyncClient(
        base_url=hs_system.url, headers=hs_system.auth(), verify=False, timeout=30
    ) as api:
        assert (await api.post("/config", json=local_config(repo))).status_code == 200
    async with httpx.AsyncClient(
        base_url=hs_system.hypersdk_url, headers=hs_system.auth(), timeout=60
    ) as client:
        yield client


@pytest.fixture
async def events(hs_system: System) -> AsyncIterator[list[dict[str, Any]]]:
    """Every schedule event published while the test runs (subject and envelope)."""
    nc: Client = await connect(hs_system.nats)
    seen: list[dict[str, Any]] = []

    async def on(msg: Msg) -> None:
        seen.append({"subject": msg.subject, **json.loads(msg.data)})

    await nc.subscribe("vb.evt.schedule.>", cb=on)
    try:
        yield seen
    finally:
        await nc.drain()


def definition(vm_path: str, **extra: Any) -> dict[str, Any]:
    return {
        "vm_path": vm_path,
        "source": {"type": "libvirt", "server_id": "local"},
        "destination": {"type": "backup", "destination_id": "fs"},
        **extra,
    }


async def wait_status(
    hs: httpx.AsyncClient, job_id: str, statuses: set[str], timeout: float = 45
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        resp = await hs.get(f"/jobs/{job_id}")
        assert resp.status_code == 200, resp.text
        job: dict[str, Any] = resp.json()
        if job["status"] in statuses:
            return job
        assert time.monotonic() < deadline, job
        await asyncio.sleep(0.2)


async def wait_schedule(
    hs: httpx.AsyncClient, schedule_id: str, ready: Any, timeout: float = 45
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        resp = await hs.get(f"/schedules/{schedule_id}")
        assert resp.status_code == 200, resp.text
        found: dict[str, Any] = resp.json()
        if ready(found):
            return found
        assert time.monotonic() < deadline, found
        await asyncio.sleep(0.2)


async def job_count(hs: httpx.AsyncClient) -> int:
    total: int = (await hs.post("/jobs/query", json={"all": True})).json()["total"]
    return total


async def test_submit_and_query_a_backup_and_a_glob(
    hs: httpx.AsyncClient, hs_system: System
) -> None:
    resp = await hs.post("/jobs/submit", json=definition(f"local/{WEB[0]}"))
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["message"] == "job submitted successfully"
    job_id = body["job_id"]
    assert body["job_ids"] == [job_id]

    got = (await hs.get(f"/jobs/{job_id}")).json()
    assert got["definition"]["id"] == job_id
    assert got["definition"]["vm_path"] == f"local/{WEB[0]}"
    assert got["definition"]["destination"] == {"type": "backup", "destination_id": "fs"}
    assert got["status"] in {"pending", "running"}
    assert set(got["progress"]) == {"stage", "percent_complete", "current_bytes", "total_bytes"}
    done = await wait_status(hs, job_id, {"completed", "failed", "cancelled"})
    assert done["status"] == "completed", done
    assert done["progress"]["percent_complete"] == 100
    assert 4 * MiB <= done["progress"]["total_bytes"] <= 64 * MiB
    assert done["progress"]["current_bytes"] == done["progress"]["total_bytes"]
    assert done["error"] is None

    # The same job on the agent API.
    async with httpx.AsyncClient(
        base_url=hs_system.url, headers=hs_system.auth(), verify=False, timeout=30
    ) as api:
        agent = (await api.get(f"/jobs/{job_id}")).json()
    assert agent["state"] == "success" and agent["vmName"] == WEB[0]

    glob = await hs.post("/jobs/submit", json=definition(f"local/{PREFIX}-web-*"))
    assert glob.status_code == 201, glob.text
    ids = glob.json()["job_ids"]
    assert len(ids) == 2 and glob.json()["job_id"] == ids[0]
    other = await hs.post(
        "/jobs/submit",
        json={"vm_path": f"*/{PREFIX}-db*", "source": {"type": "libvirt"}, "destination": {}},
    )
    assert other.status_code == 201, other.text
    assert len(other.json()["job_ids"]) == 1
    ids += other.json()["job_ids"]

    queried = (await hs.post("/jobs/query", json={"job_ids": ids})).json()
    assert queried["total"] == 3
    assert sorted(j["definition"]["vm_path"] for j in queried["jobs"]) == sorted(
        f"local/{n}" for n in [DB, *WEB]
    )
    for one in ids:
        assert (await wait_status(hs, one, {"completed", "failed"}))["status"] == "completed"
    completed = (await hs.post("/jobs/query", json={"status": "completed", "limit": 50})).json()
    assert {job_id, *ids} <= {j["definition"]["id"] for j in completed["jobs"]}
    # total is how many match, limit aside: the jobs listed are at most limit.
    every = (await hs.post("/jobs/query", json={"all": True})).json()
    limited = (await hs.post("/jobs/query", json={"all": True, "limit": 2})).json()
    assert len(limited["jobs"]) == 2 and limited["total"] == every["total"] >= 4
    done = (await hs.post("/jobs/query", json={"status": "completed", "limit": 1})).json()
    assert len(done["jobs"]) == 1 and done["total"] == completed["total"] >= 4
    some = (await hs.post("/jobs/query", json={"job_ids": ids, "limit": 1})).json()
    assert len(some["jobs"]) == 1 and some["total"] == 3
    assert (await hs.post("/jobs/query", json={"status": "bogus"})).status_code == 400
    assert (await hs.get("/jobs/nope")).status_code == 404


async def test_cancel_by_ids_and_by_status(hs: httpx.AsyncClient) -> None:
    neither = await hs.post("/jobs/cancel", json={})
    assert neither.status_code == 400 and "job_ids" in neither.json()["error"]
    finished = await hs.post("/jobs/cancel", json={"status": "completed"})
    assert finished.status_code == 400
    unknown = await hs.post("/jobs/cancel", json={"job_ids": ["0" * 24]})
    assert unknown.status_code == 404

    one = (await hs.post("/jobs/submit", json=definition(f"local/{WEB[0]}"))).json()["job_id"]
    cancelled = await hs.post("/jobs/cancel", json={"job_ids": [one]})
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["count"] == 1
    assert cancelled.json()["message"] == "jobs cancelled successfully"
    assert (await wait_status(hs, one, {"completed", "failed", "cancelled"}))[
        "status"
    ] == "cancelled"

    ids = (await hs.post("/jobs/submit", json=definition(f"local/{PREFIX}-web-*"))).json()[
        "job_ids"
    ]
    for job_id in ids:  # both hold before committing for HOLD seconds
        await wait_status(hs, job_id, {"running"})
    by_status = await hs.post("/jobs/cancel", json={"status": "running"})
    assert by_status.status_code == 200, by_status.text
    assert by_status.json()["count"] == 2
    assert sorted(by_status.json()["job_ids"]) == sorted(ids)
    for job_id in ids:
        assert (await wait_status(hs, job_id, {"completed", "failed", "cancelled"}))[
            "status"
        ] == "cancelled"
    again = await hs.post("/jobs/cancel", json={"job_ids": ids})
    assert again.json()["count"] == 0


async def stored_job_states(system: System) -> dict[str, str]:
    """Every job record of ``VB_JOBS`` (id -> state), read from the bucket itself."""
    nc: Client = await connect(system.nats)
    try:
        kv = await nc.jetstream().key_value("VB_JOBS")
        states: dict[str, str] = {}
        for key in await kv.keys():
            entry = await kv.get(key)
            if entry.value:
                record = json.loads(entry.value)
                states[record["id"]] = record["state"]
        return states
    finally:
        await nc.drain()


async def test_listings_see_every_job_across_pages(
    hs: httpx.AsyncClient, hs_system: System
) -> None:
    """Query, /status and a cancel by status see every matching job, not only the first
    page the job-orchestrator answers (``LIST_PAGE`` jobs here)."""
    ids = (await hs.post("/jobs/submit", json=definition(f"local/{PREFIX}-*"))).json()["job_ids"]
    assert len(ids) == 3 > LIST_PAGE
    for job_id in ids:  # all three hold before committing for HOLD seconds
        await wait_status(hs, job_id, {"running"})
    by_status = await hs.post("/jobs/cancel", json={"status": "running"})
    assert by_status.status_code == 200, by_status.text
    assert sorted(by_status.json()["job_ids"]) == sorted(ids)
    for job_id in ids:
        await wait_status(hs, job_id, {"completed", "failed", "cancelled"})

    stored = await stored_job_states(hs_system)
    assert len(stored) > LIST_PAGE
    every = (await hs.post("/jobs/query", json={"all": True})).json()
    assert every["total"] == len(stored)
    newest_first = [j["definition"]["id"] for j in every["jobs"]]
    assert newest_first == sorted(stored, reverse=True)
    cancelled = (await hs.post("/jobs/query", json={"status": "cancelled"})).json()
    assert {j["definition"]["id"] for j in cancelled["jobs"]} == {
        i for i, state in stored.items() if state == "canceled"
    }
    assert len(cancelled["jobs"]) > LIST_PAGE
    limited = (await hs.post("/jobs/query", json={"all": True, "limit": LIST_PAGE + 1})).json()
    assert [j["definition"]["id"] for j in limited["jobs"]] == newest_first[: LIST_PAGE + 1]
    status = (await hs.get("/status")).json()
    assert status["total_jobs"] == len(stored)
    assert status["completed_jobs"] == sum(1 for s in stored.values() if s == "success")


async def test_bad_input_creates_nothing(hs: httpx.AsyncClient) -> None:
    jobs_before = await job_count(hs)
    schedules_before = (await hs.get("/schedules")).json()["total"]

    async def refused(path: str, body: dict[str, Any], status: int, needle: str) -> None:
        resp = await hs.post(path, json=body)
        assert resp.status_code == status, (body, resp.text)
        assert needle in resp.json()["error"], (body, resp.text)

    vsphere = {"type": "vsphere", "vcenter_url": "vc.example.com", "username": "u"}
    await refused("/jobs/submit", {**definition(WEB[0]), "source": vsphere}, 400, "vSphere")
    kvm = {"type": "kvm", "libvirt_uri": "qemu+ssh://h/system"}
    await refused("/jobs/submit", {**definition(WEB[0]), "destination": kvm}, 400, "migration")
    await refused("/jobs/submit", definition("local/nothing-like-this-*"), 404, "matches no VM")
    await refused("/jobs/submit", definition("*/nothing-like-this-*"), 404, "matches no VM")
    await refused(
        "/jobs/submit",
        {"vm_path": f"ghost/{WEB[0]}", "source": {"type": "libvirt"}},
        404,
        "server 'ghost' not found",
    )
    await refused(
        "/jobs/submit",
        {**definition(WEB[0]), "destination": {"type": "backup", "destination_id": "nope"}},
        404,
        "destination 'nope' not found",
    )
    await refused("/jobs/submit", definition(f"local/{WEB[0]}", extra=1), 400, "extra")

    def sched(**over: Any) -> dict[str, Any]:
        return {
            "id": f"bad-{os.getpid()}",
            "schedule": "0 2 * * *",
            "job_template": definition(f"local/{PREFIX}-web-*"),
            **over,
        }

    await refused("/schedules", sched(schedule="61 * * * *"), 400, "minute field '61'")
    # More often than the minimum interval (5 s here, 5 minutes by default): refused.
    await refused("/schedules", sched(schedule="* * * * * */2"), 400, "at least 5 seconds apart")
    await refused("/schedules", sched(schedule="* * * * * 0,1"), 400, "1 second apart")
    await refused("/schedules", sched(schedule="* * *"), 400, "3 fields")
    await refused("/schedules", sched(timezone="Mars/Olympus"), 400, "timezone")
    await refused(
        "/schedules", sched(job_template=definition("local/none-such-*")), 404, "matches no VM"
    )
    await refused(
        "/schedules",
        sched(job_template={"vm_path": "ghost/x", "source": {"type": "libvirt"}}),
        404,
        "server 'ghost' not found",
    )
    await refused(
        "/schedules",
        sched(job_template=definition(WEB[0], destination={"destination_id": "nope"})),
        404,
        "destination 'nope' not found",
    )
    # The template's fields are named within the schedule.
    await refused(
        "/schedules",
        sched(job_template={"vm_path": WEB[0], "source": {"type": "vsphere"}}),
        400,
        "job_template.source.type",
    )
    await refused("/schedules", sched(id="a b"), 400, "id")
    assert await job_count(hs) == jobs_before
    assert (await hs.get("/schedules")).json()["total"] == schedules_before
    assert (await hs.get(f"/schedules/bad-{os.getpid()}")).status_code == 404


async def test_a_triggered_schedule_runs_a_backup_and_skips_while_running(
    hs: httpx.AsyncClient, events: list[dict[str, Any]]
) -> None:
    schedule_id = f"nightly-{os.getpid()}"
    created = await hs.post(
        "/schedules",
        json={
            "id": schedule_id,
            "name": "Nightly",
            "schedule": "0 2 * * *",
            "timezone": "Europe/Berlin",
            "job_template": definition(f"local/{DB}"),
        },
    )
    assert created.status_code == 201, created.text
    schedule = created.json()["schedule"]
    assert created.json()["message"] == "schedule created successfully"
    # 02:00 in Berlin is 01:00 UTC in winter, 00:00 UTC in summer.
    assert schedule["next_run"][11:19] in {"01:00:00", "00:00:00"}, schedule
    assert schedule["run_count"] == 0 and schedule["last_run"] is None

    first = await hs.post(f"/schedules/{schedule_id}/trigger")
    assert first.status_code == 200, first.text
    assert first.json()["message"] == "schedule triggered successfully"
    (job_id,) = first.json()["job_ids"]
    second = await hs.post(f"/schedules/{schedule_id}/trigger")  # the backup holds: skipped
    assert second.status_code == 200, second.text
    assert second.json()["skipped"] is True and "still going" in second.json()["message"]

    done = await wait_schedule(hs, schedule_id, lambda s: s["last_status"] != "running")
    assert done["last_status"] == "success", done
    assert done["run_count"] == 1 and done["skipped_runs"] == 1
    assert done["successful_runs"] == 1 and done["last_job_ids"] == [job_id]
    assert (await hs.get(f"/jobs/{job_id}")).json()["status"] == "completed"

    for _ in range(50):  # the completion event follows the record's last write
        if len(events) >= 3:
            break
        await asyncio.sleep(0.1)
    mine = [e for e in events if e["payload"]["schedule_id"] == schedule_id]
    assert [(e["type"], e["payload"]["skipped"]) for e in mine] == [
        ("schedule.triggered", False),
        ("schedule.completed", True),
        ("schedule.completed", False),
    ]
    assert mine[0]["subject"] == f"vb.evt.schedule.triggered.{schedule_id}"
    assert mine[0]["payload"]["job_ids"] == [job_id]
    assert mine[0]["payload"]["name"] == "Nightly"
    assert mine[2]["payload"]["job_ids"] == [job_id]

    stats = (await hs.get("/schedules/stats")).json()
    assert stats["total_runs"] >= 1 and stats["skipped_runs"] >= 1
    assert stats["successful_runs"] >= 1 and stats["total_schedules"] >= 1

    listed = (await hs.get("/schedules")).json()
    assert schedule_id in [s["id"] for s in listed["schedules"]]
    assert listed["total"] == len(listed["schedules"]) and listed["timestamp"]
    put = await hs.put(
        f"/schedules/{schedule_id}", json={"name": "Renamed", "schedule": "0 3 * * *"}
    )
    assert put.status_code == 200 and put.json()["message"] == "schedule updated successfully"
    assert (
        await hs.put(f"/schedules/{schedule_id}", json={"schedule": "0 2 * *"})
    ).status_code == 400
    too_often = await hs.put(f"/schedules/{schedule_id}", json={"schedule": "* * * * * */3"})
    assert too_often.status_code == 400 and "schedule" in too_often.json()["error"]
    assert (await hs.post(f"/schedules/{schedule_id}/disable")).json() == {
        "message": "schedule disabled successfully"
    }
    off = (await hs.get(f"/schedules/{schedule_id}")).json()
    assert off["enabled"] is False and off["next_run"] is None and off["name"] == "Renamed"
    assert (await hs.post(f"/schedules/{schedule_id}/enable")).status_code == 200
    on = (await hs.get(f"/schedules/{schedule_id}")).json()
    assert on["enabled"] is True and on["next_run"][11:19] in {"02:00:00", "01:00:00"}
    assert (await hs.delete(f"/schedules/{schedule_id}")).json() == {
        "message": "schedule deleted successfully"
    }
    assert (await hs.get(f"/schedules/{schedule_id}")).status_code == 404
    assert (await hs.post(f"/schedules/{schedule_id}/trigger")).status_code == 404


async def test_a_due_run_fires_once_with_two_replicas(
    hs: httpx.AsyncClient, events: list[dict[str, Any]]
) -> None:
    schedule_id = f"every5s-{os.getpid()}"
    jobs_before = await job_count(hs)
    created = await hs.post(
        "/schedules",
        json={
            "id": schedule_id,
            "schedule": "* * * * * */5",  # every 5 seconds (croniter: seconds last)
            "job_template": definition(f"local/{WEB[1]}"),
        },
    )
    assert created.status_code == 201, created.text
    fired = await wait_schedule(hs, schedule_id, lambda s: s["run_count"] >= 1, timeout=15)
    assert (await hs.post(f"/schedules/{schedule_id}/disable")).status_code == 200
    done = await wait_schedule(hs, schedule_id, lambda s: s["last_status"] != "running")
    assert done["run_count"] == 1, done
    assert done["skipped_runs"] == 0 and done["last_status"] == "success", done
    assert done["last_run"] == fired["last_run"]
    assert await job_count(hs) == jobs_before + 1
    await asyncio.sleep(1)
    mine = [e["type"] for e in events if e["payload"]["schedule_id"] == schedule_id]
    assert mine == ["schedule.triggered", "schedule.completed"], mine
    await hs.delete(f"/schedules/{schedule_id}")


def iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def test_a_run_missed_while_down_is_caught_up_once(
    hs: httpx.AsyncClient, hs_system: System
) -> None:
    """Both orchestrators stop; two daily schedules come due meanwhile, one 3 minutes
    ago (within the 12 h catch-up window: it runs once at start) and one 13 hours ago
    (outside it: counted as missed, not run)."""
    now = datetime.now(UTC)
    runs = {
        f"recent-{os.getpid()}": (now - timedelta(minutes=3)).replace(second=0, microsecond=0),
        f"stale-{os.getpid()}": (now - timedelta(hours=13)).replace(second=0, microsecond=0),
    }
    for schedule_id, at in runs.items():
        created = await hs.post(
            "/schedules",
            json={
                "id": schedule_id,
                "schedule": f"{at.minute} {at.hour} * * *",
                "enabled": False,
                "job_template": definition(f"local/{DB}"),
            },
        )
        assert created.status_code == 201, created.text
    jobs_before = await job_count(hs)
    hs_system.stop("job-orchestrator")
    hs_system.stop("job-orchestrator-2")
    # What the records would say had the orchestrators stopped before these times.
    nc = await connect(hs_system.nats)
    try:
        kv = await nc.jetstream().key_value("VB_SCHEDULES")
        for schedule_id, at in runs.items():
            entry = await kv.get(schedule_id)
            assert entry.value is not None
            record = {**json.loads(entry.value), "enabled": True, "next_run": iso(at)}
            await kv.put(schedule_id, json.dumps(record).encode())
    finally:
        await nc.drain()
    hs_system.start("job-orchestrator")
    hs_system.start("job-orchestrator-2")
    hs_system.wait_ready()

    recent_id, stale_id = runs
    caught = await wait_schedule(
        hs, recent_id, lambda s: s["last_status"] in {"success", "failure"}
    )
    assert caught["last_status"] == "success", caught
    assert caught["run_count"] == 1 and caught["missed_runs"] == 0
    assert caught["next_run"] == iso(runs[recent_id] + timedelta(days=1))
    stale = await wait_schedule(hs, stale_id, lambda s: s["missed_runs"] == 1)
    assert stale["run_count"] == 0 and stale["last_run"] is None
    assert stale["next_run"] == iso(runs[stale_id] + timedelta(days=1))
    assert "not caught up" in stale["last_message"]
    await asyncio.sleep(TICK_WAIT)
    assert await job_count(hs) == jobs_before + 1
    assert (await hs.get(f"/schedules/{recent_id}")).json()["run_count"] == 1
    for schedule_id in runs:
        assert (await hs.delete(f"/schedules/{schedule_id}")).status_code == 200


async def test_a_run_that_cannot_start_is_failed_and_reported(
    hs: httpx.AsyncClient, conn: Connection, events: list[dict[str, Any]]
) -> None:
    """The VM of a schedule is gone by its run: the run fails (``schedule.failed``,
    ``failed_runs``) and the trigger answers 404 naming the VM."""
    directory = vm_directory()
    gone = f"{PREFIX}-gone"
    await create_vm(conn, gone, directory, [16 * MiB], start=False)
    schedule_id = f"gone-{os.getpid()}"
    try:
        created = await hs.post(
            "/schedules",
            json={"id": schedule_id, "schedule": "@daily", "job_template": definition(gone)},
        )
        assert created.status_code == 201, created.text
    finally:
        await remove_vm(conn, gone, delete_directory=directory)
    resp = await hs.post(f"/schedules/{schedule_id}/trigger")
    assert resp.status_code == 404 and gone in resp.json()["error"], resp.text
    failed = (await hs.get(f"/schedules/{schedule_id}")).json()
    assert failed["last_status"] == "failure" and failed["failed_runs"] == 1, failed
    assert failed["run_count"] == 1 and gone in failed["last_message"]
    for _ in range(50):
        if any(e["type"] == "schedule.failed" for e in events):
            break
        await asyncio.sleep(0.1)
    mine = [e for e in events if e["payload"]["schedule_id"] == schedule_id]
    assert [e["type"] for e in mine] == ["schedule.failed"]
    assert gone in mine[0]["payload"]["message"]
    assert (await hs.delete(f"/schedules/{schedule_id}")).status_code == 200


async def test_a_scheduled_backup_that_fails_fails_the_run_and_notifies(
    hs: httpx.AsyncClient,
    hs_system: System,
    events: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    """The run's job is created and runs, but the backup itself fails (its destination's
    disk is not mounted): the run ends ``failure`` (``failed_runs``, ``last_job_ids``,
    ``last_message``), ``schedule.failed`` names the job, and ntfy (the local stand-in)
    gets a notification of the failed job and one of the failed run."""
    schedule_id = f"failing-{os.getpid()}"
    async with (
        Receiver() as rx,
        httpx.AsyncClient(
            base_url=hs_system.url, headers=hs_system.auth(), verify=False, timeout=30
        ) as api,
    ):
        original = (await api.get("/config")).json()
        cfg = json.loads(json.dumps(original))
        unmounted = tmp_path / "not-mounted" / "backups"  # its parent does not exist
        cfg["destinations"].append(
            {"id": "unmounted", "driverId": "filesystem", "params": {"path": str(unmounted)}}
        )
        cfg["ntfy"] = {"serverUrl": f"{rx.url}/ntfy", "topic": "vb-sched"}
        assert (await api.post("/config", json=cfg)).status_code == 200
        try:
            created = await hs.post(
                "/schedules",
                json={
                    "id": schedule_id,
                    "name": "to nowhere",
                    "schedule": "@daily",
                    "job_template": definition(
                        f"local/{WEB[0]}",
                        destination={"type": "backup", "destination_id": "unmounted"},
                    ),
                },
            )
            assert created.status_code == 201, created.text
            assert (await hs.post(f"/schedules/{schedule_id}/trigger")).status_code == 200
            done = await wait_schedule(
                hs, schedule_id, lambda s: s["last_status"] not in (None, "running")
            )
            assert done["last_status"] == "failure", done
            assert (done["run_count"], done["failed_runs"], done["successful_runs"]) == (1, 1, 0)
            (job_id,) = done["last_job_ids"]
            job = (await hs.get(f"/jobs/{job_id}")).json()
            assert job["status"] == "failed" and "does not exist" in job["error"], job
            assert "1 of 1" in done["last_message"] or "failed" in done["last_message"], done
            stats = (await hs.get("/schedules/stats")).json()
            assert stats["failed_runs"] >= 1
            for _ in range(50):
                if any(e["type"] == "schedule.failed" for e in events):
                    break
                await asyncio.sleep(0.1)
            mine = [e for e in events if e["payload"]["schedule_id"] == schedule_id]
            assert [e["type"] for e in mine] == ["schedule.triggered", "schedule.failed"]
            assert mine[1]["payload"]["job_ids"] == [job_id]
            notes = [r.json() for r in await rx.wait_for("/ntfy/", 2, timeout=20)]
            titles = [n["title"] for n in notes]
            assert any("schedule to nowhere failed" in t for t in titles), titles
            assert any(WEB[0] in t and "failed" in t for t in titles), titles
            assert all(n["topic"] == "vb-sched" and n["priority"] == 4 for n in notes), notes
        finally:
            await hs.delete(f"/schedules/{schedule_id}")
            assert (await api.post("/config", json=original)).status_code == 200


async def test_schedules_are_listed_across_pages_up_to_their_cap(hs: httpx.AsyncClient) -> None:
    """Every schedule came back in one bus reply: past about 1 MiB of them (a few hundred
    with long descriptions) ``GET /schedules`` was a 503 for everyone, and nothing capped
    how many could be made. Now the listing pages (here 2 a request) and one more than
    ``VIRTBACKUP_MAX_SCHEDULES`` is a 409 saying so."""
    before = (await hs.get("/schedules")).json()["schedules"]
    made = [f"cap-{os.getpid()}-{i:02d}" for i in range(MAX_SCHEDULES - len(before))]
    try:
        for schedule_id in made:
            body = {
                "id": schedule_id,
                "schedule": "0 4 * * *",
                "enabled": False,
                "description": "d" * 2000,
                "job_template": definition(f"local/{DB}"),
            }
            resp = await hs.post("/schedules", json=body)
            assert resp.status_code == 201, resp.text
        listed = (await hs.get("/schedules")).json()
        ids = [s["id"] for s in listed["schedules"]]
        assert ids == sorted(ids) and len(ids) == len(set(ids)) == MAX_SCHEDULES
        assert set(made) <= set(ids) and listed["total"] == MAX_SCHEDULES
        one_more = {
            "id": f"cap-{os.getpid()}-over",
            "schedule": "0 4 * * *",
            "job_template": definition(f"local/{DB}"),
        }
        resp = await hs.post("/schedules", json=one_more)
        assert resp.status_code == 409, resp.text
        assert "VIRTBACKUP_MAX_SCHEDULES" in resp.json()["error"]
        assert (await hs.get(f"/schedules/cap-{os.getpid()}-over")).status_code == 404
    finally:
        for schedule_id in made:
            await hs.delete(f"/schedules/{schedule_id}")
