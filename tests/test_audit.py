"""The operation log, the server monitor and the scheduled tasks (issue 17), against a
real system: NATS, every service, libvirt for one small VM.

* every mutating request on both listeners is in ``/api/v1/admin/log/opera-logs`` with
  its actor, route template, target, status and request id; GETs are not; no body,
  query string or header reaches ``VB_AUDIT``; deleting an entry works and is itself
  an entry; filters and pages;
* ``/api/v1/admin/monitor/server`` has numbers for every service's host and NATS;
* ``/api/v1/task/schedulers`` are the HyperSDK listener's ``/schedules``.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from harness import System, local_config, running_system, wait_job

from virtbackup.contracts import subjects
from virtbackup.contracts.streams import AUDIT
from virtbackup.testing.libvirtd import ensure_libvirtd
from virtbackup.testing.nats import connect
from virtbackup.testing.vms import create_vm, remove_vm, vm_directory
from virtbackup.virt import Connection

PID = os.getpid()
LOGS = "/api/v1/admin/log/opera-logs"
TASKS = "/api/v1/task/schedulers"
VM = f"vbtest-audit-{PID}"
MiB = 1 << 20


@pytest.fixture(scope="module")
def audit_system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    ensure_libvirtd()
    data = tmp_path_factory.mktemp("audit")
    repo = data / "repo"
    repo.mkdir(mode=0o700)
    with running_system(data, workers=1, orchestrators=1) as system:
        resp = httpx.post(
            f"{system.url}/config",
            json=local_config(repo),
            headers=system.auth(),
            verify=False,
            timeout=15,
        )
        assert resp.status_code == 200, resp.text
        yield system


@pytest.fixture
async def api(audit_system: System) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=audit_system.url, headers=audit_system.auth(), verify=False, timeout=30
    ) as client:
        yield client


@pytest.fixture
async def hs(audit_system: System) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=audit_system.hypersdk_url, headers=audit_system.auth(), timeout=30
    ) as client:
        yield client


def rid(label: str) -> str:
    return f"audit-{PID}-{label}-{time.monotonic_ns()}"


async def entry(api: httpx.AsyncClient, request_id: str, timeout: float = 15) -> dict[str, Any]:
    """The operation log entry of ``request_id`` (written asynchronously: waited for)."""
    deadline = time.monotonic() + timeout
    while True:
        resp = await api.get(LOGS, params={"size": 1000})
        assert resp.status_code == 200, resp.text
        found: list[dict[str, Any]] = [
            i for i in resp.json()["items"] if i["requestId"] == request_id
        ]
        if found:
            assert len(found) == 1, found
            return found[0]
        assert time.monotonic() < deadline, f"no entry for {request_id}"
        await asyncio.sleep(0.2)


def detail_error(resp: httpx.Response, status: int, code: str, *words: str) -> None:
    """``resp`` is ``status`` in the admin format ``{"detail", "code"}`` naming ``words``."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"detail", "code"}, body
    assert body["code"] == code, body
    for word in words:
        assert word in body["detail"], (word, body)


async def test_a_mutation_on_each_listener_is_logged_and_gets_are_not(
    api: httpx.AsyncClient, hs: httpx.AsyncClient
) -> None:
    on_api = rid("api")
    resp = await api.post("/servers/local/refresh", headers={"x-request-id": on_api})
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-request-id"] == on_api
    on_hs = rid("hs")
    missing = f"no-such-{PID}"
    resp = await hs.post(f"/schedules/{missing}/trigger", headers={"x-request-id": on_hs})
    assert resp.status_code == 404, resp.text
    assert resp.headers["x-request-id"] == on_hs
    read = rid("get")
    resp = await api.get("/jobs", headers={"x-request-id": read})
    assert resp.status_code == 200 and resp.headers["x-request-id"] == read

    ok = await entry(api, on_api)
    assert ok["actor"] == "token" and ok["listener"] == "api"
    assert ok["method"] == "POST" and ok["route"] == "/servers/{server_id}/refresh"
    assert ok["path"] == "/servers/local/refresh" and ok["target"] == {"server_id": "local"}
    assert ok["status"] == 200 and ok["success"] is True
    assert ok["clientAddress"] == "127.0.0.1" and ok["durationMs"] >= 0
    assert isinstance(ok["id"], int) and ok["time"].endswith("Z")
    failed = await entry(api, on_hs)
    assert failed["listener"] == "hypersdk" and failed["actor"] == "token"
    assert failed["route"] == "/schedules/{schedule_id}/trigger"
    assert failed["target"] == {"schedule_id": missing}
    assert failed["status"] == 404 and failed["success"] is False
    # Records are stored in order: the GET, made before the POSTs were read back, has none.
    items = (await api.get(LOGS, params={"size": 1000})).json()["items"]
    assert all(i["requestId"] != read for i in items)
    assert all(i["method"] in {"POST", "PUT", "PATCH", "DELETE"} for i in items)


async def test_actors_registration_agents_and_no_credential(
    audit_system: System, api: httpx.AsyncClient
) -> None:
    """A remote agent's key is ``agent:<id>``; a successful registration (its credential
    is in the body) is ``registration-token``; a request refused by authentication, or
    a registration refused, is not an operation."""
    token = (await api.post("/api/v1/agent/registration-tokens", json={})).json()["token"]
    registering = rid("register")
    body = {"registrationToken": token, "hostname": "h", "os": "linux", "arch": "amd64",
            "agentVersion": "1"}  # fmt: skip
    async with httpx.AsyncClient(base_url=audit_system.url, verify=False, timeout=30) as bare:
        resp = await bare.post(
            "/api/v1/agent/register", json=body, headers={"x-request-id": registering}
        )
        assert resp.status_code == 201, resp.text
        agent_id, key = resp.json()["agentId"], resp.json()["apiKey"]
        # A heartbeat is telemetry, not an entry, unless it is refused (a bad body here).
        beating, bad_beat = rid("beat"), rid("bad-beat")
        resp = await bare.post(
            "/api/v1/agent/heartbeat",
            json={"status": "online"},
            headers={"Authorization": f"Bearer {key}", "x-request-id": beating},
        )
        assert resp.status_code == 200, resp.text
        resp = await bare.post(
            "/api/v1/agent/heartbeat",
            json={"status": 5},
            headers={"Authorization": f"Bearer {key}", "x-request-id": bad_beat},
        )
        assert resp.status_code == 400, resp.text
        refused = [rid("reused"), rid("wrong-token"), rid("no-token")]
        reused = await bare.post(
            "/api/v1/agent/register", json=body, headers={"x-request-id": refused[0]}
        )
        assert reused.status_code == 401
        wrong = {"Authorization": "Bearer wrong", "x-request-id": refused[1]}
        assert (await bare.post("/servers/local/refresh", headers=wrong)).status_code == 401
        none = {"x-request-id": refused[2]}
        assert (await bare.delete(f"{LOGS}/1", headers=none)).status_code == 401
    assert (await entry(api, registering))["actor"] == "registration-token"
    beat = await entry(api, bad_beat)
    assert beat["actor"] == f"agent:{agent_id}" and beat["route"] == "/api/v1/agent/heartbeat"
    assert beat["status"] == 400 and beat["success"] is False
    last = rid("after-refused")
    await api.post("/servers/local/refresh", headers={"x-request-id": last})
    await entry(api, last)
    items = (await api.get(LOGS, params={"size": 1000})).json()["items"]
    assert not {i["requestId"] for i in items} & {*refused, beating}
    assert key not in json.dumps(items) and token not in json.dumps(items)


async def test_an_agents_empty_lease_poll_is_not_an_entry(
    audit_system: System, api: httpx.AsyncClient
) -> None:
    """A lease answered ``assigned: false`` changed nothing: an agent polls every few
    seconds, and each poll was an entry kept for a year (the #17 trial's one agent made
    two thirds of the log's entries). A refused heartbeat still is one."""
    token = (await api.post("/api/v1/agent/registration-tokens", json={})).json()["token"]
    body = {"registrationToken": token, "hostname": "h", "os": "linux", "arch": "amd64",
            "agentVersion": "1"}  # fmt: skip
    async with httpx.AsyncClient(base_url=audit_system.url, verify=False, timeout=30) as bare:
        resp = await bare.post("/api/v1/agent/register", json=body)
        assert resp.status_code == 201, resp.text
        key = resp.json()["apiKey"]
        polling, beating = rid("lease"), rid("beat-after-lease")
        resp = await bare.post(
            "/api/v1/agent/lease",
            json={},
            headers={"Authorization": f"Bearer {key}", "x-request-id": polling},
        )
        assert resp.status_code == 200 and resp.json()["assigned"] is False, resp.text
        resp = await bare.post(
            "/api/v1/agent/heartbeat",
            json={"status": 5},
            headers={"Authorization": f"Bearer {key}", "x-request-id": beating},
        )
        assert resp.status_code == 400, resp.text
    await entry(api, beating)  # records are stored in order: the lease's would be before
    items = (await api.get(LOGS, params={"size": 1000})).json()["items"]
    assert all(i["requestId"] != polling for i in items)


async def test_a_write_refused_for_want_of_a_permission_is_logged(
    audit_system: System, api: httpx.AsyncClient
) -> None:
    """A viewer posting the configuration (agent listener) or a schedule (HyperSDK
    listener) is refused with 403 by the authorisation, and the attempt is an entry with
    the viewer as actor (found by the #17 trial: such refusals were not recorded, only
    those of the handlers)."""
    name = f"audit-viewer-{PID}"
    resp = await api.post(
        "/api/v1/admin/sys/users",
        json={"username": name, "password": "a viewer's passphrase", "roles": ["viewer"]},
    )
    assert resp.status_code == 201, resp.text
    resp = await api.post(
        "/api/v1/admin/auth/login", json={"username": name, "password": "a viewer's passphrase"}
    )
    assert resp.status_code == 200, resp.text
    viewer = {"Authorization": f"Bearer {resp.json()['access_token']}"}
    on_api, on_hs = rid("refused-api"), rid("refused-hs")
    resp = await api.post("/config", json={}, headers={**viewer, "x-request-id": on_api})
    assert resp.status_code == 403, resp.text
    assert resp.json() == {"error": "forbidden: POST /config needs permission config:write"}
    assert resp.headers["x-request-id"] == on_api
    async with httpx.AsyncClient(base_url=audit_system.hypersdk_url, timeout=30) as hs:
        resp = await hs.post("/schedules", json={}, headers={**viewer, "x-request-id": on_hs})
    assert resp.status_code == 403, resp.text
    for request_id, listener, path in (
        (on_api, "api", "/config"),
        (on_hs, "hypersdk", "/schedules"),
    ):
        got = await entry(api, request_id)
        assert got["actor"] == name and got["listener"] == listener, got
        assert got["method"] == "POST" and got["path"] == path and got["route"] == "", got
        assert got["status"] == 403 and got["success"] is False, got


async def test_a_request_id_is_made_when_the_clients_is_unusable(api: httpx.AsyncClient) -> None:
    for sent in ("has space", "x" * 200, "a;b"):
        resp = await api.post("/servers/local/refresh", headers={"x-request-id": sent})
        assert resp.status_code == 200
        made = resp.headers["x-request-id"]
        assert made != sent and len(made) == 32 and int(made, 16) >= 0
    resp = await api.post("/servers/local/refresh")
    assert len(resp.headers["x-request-id"]) == 32
    assert (await entry(api, resp.headers["x-request-id"]))["status"] == 200


async def test_no_body_query_or_header_reaches_the_log(
    audit_system: System, api: httpx.AsyncClient, hs: httpx.AsyncClient
) -> None:
    secret = f"hunter2-{PID}-body"
    in_query = f"qs-{PID}-secret"
    request_id = rid("secret")
    resp = await hs.post(
        f"/vms/shutdown?api_key={in_query}",
        json={"vm_path": "local/no-such-vm", "username": "root", "password": secret},
        headers={"x-request-id": request_id, "x-custom-secret": secret},
    )
    assert resp.status_code == 404, resp.text
    logged = await entry(api, request_id)
    assert logged["path"] == "/vms/shutdown" and logged["status"] == 404
    # Neither the listing nor anything stored in VB_AUDIT holds the secrets.
    listing = (await api.get(LOGS, params={"size": 1000})).text
    assert secret not in listing and in_query not in listing
    nc = await connect(audit_system.nats)
    try:
        js = nc.jetstream()
        info = await js.stream_info(AUDIT.name)
        assert info.config.deny_purge is True and not info.config.deny_delete
        sub = await js.subscribe(subjects.AUDIT_ALL, stream=AUDIT.name, ordered_consumer=True)
        stored = []
        while True:
            msg = await sub.next_msg(timeout=5)
            stored.append(msg.data)
            if msg.metadata.num_pending == 0:
                break
        await sub.unsubscribe()
    finally:
        await nc.drain()
    assert any(request_id.encode() in data for data in stored)
    assert not any(secret.encode() in d or in_query.encode() in d for d in stored)


async def test_deleting_an_entry_works_and_is_itself_logged(
    audit_system: System, api: httpx.AsyncClient
) -> None:
    made = rid("victim")
    assert (await api.post("/servers/local/refresh", headers={"x-request-id": made})).is_success
    victim = await entry(api, made)
    deleting = rid("delete")
    resp = await api.delete(f"{LOGS}/{victim['id']}", headers={"x-request-id": deleting})
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"id": victim["id"], "deleted": True}
    record = await entry(api, deleting)
    assert record["method"] == "DELETE" and record["route"] == f"{LOGS}/{{log_id}}"
    assert record["target"] == {"log_id": str(victim["id"])} and record["status"] == 200
    items = (await api.get(LOGS, params={"size": 1000})).json()["items"]
    assert all(i["id"] != victim["id"] for i in items)
    # Gone already; not an id; another kind of audit entry (a login attempt's).
    detail_error(await api.delete(f"{LOGS}/{victim['id']}"), 404, "NOT_FOUND", str(victim["id"]))
    detail_error(await api.delete(f"{LOGS}/abc"), 400, "BAD_REQUEST", "`id`")
    detail_error(await api.delete(f"{LOGS}/0"), 400, "BAD_REQUEST", "`id`")
    nc = await connect(audit_system.nats)
    try:
        ack = await nc.jetstream().publish(subjects.AUDIT_LOGIN, b'{"user": "x"}')
    finally:
        await nc.drain()
    detail_error(await api.delete(f"{LOGS}/{ack.seq}"), 404, "NOT_FOUND")


async def test_pages_and_filters(api: httpx.AsyncClient, hs: httpx.AsyncClient) -> None:
    since = datetime.now(UTC).isoformat()
    await asyncio.sleep(0.01)
    ok_ids = [rid(f"ok{i}") for i in range(3)]
    bad_ids = [rid(f"bad{i}") for i in range(2)]
    for request_id in ok_ids:
        resp = await api.post("/servers/local/refresh", headers={"x-request-id": request_id})
        assert resp.status_code == 200
    for request_id in bad_ids:
        resp = await hs.post(f"/schedules/no-{PID}/trigger", headers={"x-request-id": request_id})
        assert resp.status_code == 404
    await entry(api, bad_ids[-1])

    window = (await api.get(LOGS, params={"since": since})).json()
    assert window["total"] == 5 and window["total_pages"] == 1, window
    assert [i["requestId"] for i in window["items"]] == [*ok_ids, *bad_ids][::-1]
    seqs = [i["id"] for i in window["items"]]
    assert seqs == sorted(seqs, reverse=True)
    first = (await api.get(LOGS, params={"since": since, "size": 2})).json()
    second = (await api.get(LOGS, params={"since": since, "size": 2, "page": 2})).json()
    last = (await api.get(LOGS, params={"since": since, "size": 2, "page": 3})).json()
    assert [p["page"] for p in (first, second, last)] == [1, 2, 3]
    assert first["total_pages"] == 3 and len(last["items"]) == 1
    paged = [i["id"] for page in (first, second, last) for i in page["items"]]
    assert paged == seqs and first["total"] == 5

    def ids(resp: httpx.Response) -> list[str]:
        assert resp.status_code == 200, resp.text
        return [i["requestId"] for i in resp.json()["items"]]

    failures = await api.get(LOGS, params={"since": since, "outcome": "failure"})
    assert ids(failures) == bad_ids[::-1]
    assert ids(await api.get(LOGS, params={"since": since, "status": 404})) == bad_ids[::-1]
    by_route = await api.get(LOGS, params={"since": since, "route": "/servers/"})
    assert ids(by_route) == ok_ids[::-1]
    by_method = await api.get(LOGS, params={"since": since, "method": "post"})
    assert len(ids(by_method)) == 5
    assert ids(await api.get(LOGS, params={"since": since, "actor": "someone-else"})) == []
    until = (await api.get(LOGS, params={"until": since, "size": 1000})).json()["items"]
    assert not {i["requestId"] for i in until} & {*ok_ids, *bad_ids}

    for params, field in (
        ({"method": "GET"}, "method"),
        ({"size": 0}, "size"),
        ({"size": 1001}, "size"),
        ({"page": 0}, "page"),
        ({"since": "yesterday"}, "since"),
        ({"outcome": "maybe"}, "outcome"),
        ({"status": "abc"}, "status"),
        ({"actr": "token"}, "actr"),
    ):
        detail_error(await api.get(LOGS, params=params), 400, "BAD_REQUEST", field)


async def test_the_monitor_has_numbers_for_every_service_and_nats(
    audit_system: System, api: httpx.AsyncClient
) -> None:
    read = rid("monitor")
    resp = await api.get("/api/v1/admin/monitor/server", headers={"x-request-id": read})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    services = {s["service"]: s for s in body["services"]}
    assert set(services) == set(subjects.SERVICES)
    for name, service in services.items():
        assert service["replicas"] >= 1, name
        for instance in service["instances"]:
            host = instance["host"]
            assert host["cpuCount"] >= 1 and 0 <= host["cpuPercent"] <= 100, host
            assert host["memoryTotal"] > host["memoryAvailable"] > 0, host
            assert host["diskTotal"] >= host["diskUsed"] > 0 and host["diskFree"] > 0, host
            assert host["load1"] >= 0 and host["uptimeSeconds"] > 0, host
            assert host["processRss"] > 0, host
    assert len(body["hosts"]) == 1  # every service runs on this machine
    on_host = {i["service"] for i in body["hosts"][0]["instances"]}
    assert on_host == set(subjects.SERVICES)
    nats = body["nats"]
    assert nats["connected"] is True and nats["version"].count(".") == 2
    assert nats["connections"] >= len(subjects.SERVICES)
    assert nats["connectionsSource"] == "instances" and nats["server"] is None  # no URL
    assert nats["jetstream"]["enabled"] is True
    assert nats["jetstream"]["account"]["streams"] >= 4
    assert nats["jetstream"]["account"]["storage"] > 0
    streams = {s["stream"]: s for s in nats["jetstream"]["streams"]}
    assert streams[AUDIT.name]["exists"] and streams[AUDIT.name]["messages"] >= 0
    assert body["workers"]["count"] == 1
    detail_error(await api.get("/api/v1/admin/monitor/redis"), 404, "NOT_FOUND")
    # Reading is not an operation.
    later = rid("after-monitor")
    await api.post("/servers/local/refresh", headers={"x-request-id": later})
    await entry(api, later)
    items = (await api.get(LOGS, params={"size": 1000})).json()["items"]
    assert all(i["requestId"] != read for i in items)


@pytest.fixture(scope="module")
async def vm(conn: Connection, audit_system: System) -> AsyncIterator[str]:
    directory = vm_directory()
    await create_vm(conn, VM, directory, [16 * MiB])
    try:
        yield VM
    finally:
        await remove_vm(conn, VM, delete_directory=directory)


async def test_scheduled_tasks_are_the_hypersdk_schedules(
    vm: str, api: httpx.AsyncClient, hs: httpx.AsyncClient
) -> None:
    task_id = f"task-{PID}"
    body = {
        "id": task_id,
        "name": "nightly",
        "schedule": "0 2 * * *",
        "timezone": "Europe/Berlin",
        "jobTemplate": {
            "vmPath": f"local/{vm}",
            "source": {"type": "libvirt", "serverId": "local"},
            "destination": {"type": "backup", "destinationId": "fs"},
        },
    }
    created = await api.post(TASKS, json=body)
    assert created.status_code == 201, created.text
    task = created.json()
    assert task["id"] == task_id and task["nextRun"] and task["enabled"] is True
    assert task["jobTemplate"]["vmPath"] == f"local/{vm}"
    assert task["jobTemplate"]["destination"] == {"type": "backup", "destinationId": "fs"}
    there = (await hs.get(f"/schedules/{task_id}")).json()
    assert there["name"] == "nightly" and there["timezone"] == "Europe/Berlin"
    assert there["job_template"]["source"] == {"type": "libvirt", "server_id": "local"}

    changed = await api.put(f"{TASKS}/{task_id}", json={"name": "renamed", "enabled": False})
    assert changed.status_code == 200, changed.text
    assert changed.json()["name"] == "renamed" and changed.json()["nextRun"] is None
    assert (await hs.get(f"/schedules/{task_id}")).json()["enabled"] is False
    # Made on the other listener: shows here.
    assert (await hs.put(f"/schedules/{task_id}", json={"description": "from hs"})).is_success
    listed = (await api.get(TASKS)).json()
    mine = [t for t in listed["items"] if t["id"] == task_id]
    assert listed["total"] == len(listed["items"]) and mine[0]["description"] == "from hs"

    detail_error(await api.post(f"{TASKS}/{task_id}/run"), 409, "CONFLICT")  # disabled
    assert (await api.put(f"{TASKS}/{task_id}", json={"enabled": True})).is_success
    run = await api.post(f"{TASKS}/{task_id}/run")
    assert run.status_code == 200, run.text
    job_ids = run.json()["jobIds"]
    assert len(job_ids) == 1 and run.json()["skipped"] is False
    after = (await hs.get(f"/schedules/{task_id}")).json()
    assert after["run_count"] == 1 and after["last_job_ids"] == job_ids
    job = await wait_job(api, job_ids[0])
    assert job["vmName"] == vm, job

    deleted = await api.delete(f"{TASKS}/{task_id}")
    assert deleted.status_code == 200 and deleted.json() == {"id": task_id, "deleted": True}
    assert (await hs.get(f"/schedules/{task_id}")).status_code == 404
    detail_error(await api.delete(f"{TASKS}/{task_id}"), 404, "NOT_FOUND", task_id)
    detail_error(await api.post(f"{TASKS}/{task_id}/run"), 404, "NOT_FOUND")
    detail_error(await api.put(f"{TASKS}/{task_id}", json={"name": "x"}), 404, "NOT_FOUND")

    # Every change above is in the operation log under its route template.
    routes = {
        (i["method"], i["route"], i["status"])
        for i in (await api.get(LOGS, params={"size": 1000})).json()["items"]
        if i["target"].get("schedule_id") == task_id or i["path"] == TASKS
    }
    assert {
        ("POST", TASKS, 201),
        ("PUT", f"{TASKS}/{{schedule_id}}", 200),
        ("PUT", "/schedules/{schedule_id}", 200),
        ("POST", f"{TASKS}/{{schedule_id}}/run", 409),
        ("POST", f"{TASKS}/{{schedule_id}}/run", 200),
        ("DELETE", f"{TASKS}/{{schedule_id}}", 200),
        ("DELETE", f"{TASKS}/{{schedule_id}}", 404),
    } <= routes, routes


async def test_bad_scheduled_tasks_are_400_naming_the_field(
    vm: str, api: httpx.AsyncClient, hs: httpx.AsyncClient
) -> None:
    good: dict[str, Any] = {
        "schedule": "@daily",
        "jobTemplate": {"vmPath": f"local/{vm}", "source": {"serverId": "local"}},
    }
    before = (await hs.get("/schedules")).json()["total"]
    for change, field in (
        ({"schedule": "not a cron"}, "schedule"),
        ({"schedule": 5}, "schedule"),
        ({"timezone": "Mars/Olympus"}, "timezone"),
        ({"enabled": "yes"}, "enabled"),
        ({"jobTemplate": {"vmPath": f"local/{vm}", "vm_path": "x"}}, "vm_path"),
        ({"jobTemplate": {"vmPath": f"local/{vm}", "source": {"type": "vsphere"}}}, "source"),
        ({"jobTemplate": {}}, "vmPath"),
        ({"bogusField": 1}, "bogusField"),
    ):
        resp = await api.post(TASKS, json={**good, **change})
        detail_error(resp, 400, "BAD_REQUEST", field)
        assert "job_template" not in resp.json()["detail"]
    missing = dict(good)
    del missing["schedule"]
    detail_error(await api.post(TASKS, json=missing), 400, "BAD_REQUEST", "schedule")
    detail_error(
        await api.post(TASKS, content=json.dumps(good), headers={"content-type": "text/plain"}),
        415,
        "UNSUPPORTED_MEDIA_TYPE",
    )
    assert (await hs.get("/schedules")).json()["total"] == before


async def test_the_admin_routes_are_documented_with_their_error_format(
    api: httpx.AsyncClient,
) -> None:
    doc = (await api.get("/schema/openapi.json")).json()
    detail = {"$ref": "#/components/schemas/DetailCodeBody"}
    for path in (LOGS, f"{LOGS}/{{log_id}}", "/api/v1/admin/monitor/server", TASKS):
        for operation in doc["paths"][path].values():
            for status, response in operation["responses"].items():
                if int(status) >= 400:
                    assert response["content"]["application/json"]["schema"] == detail
