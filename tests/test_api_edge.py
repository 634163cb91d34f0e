"""Bad input at both listeners: 400 naming the field, 415 for bodies not declared JSON,
503 naming an unusable destination; never a 500 or an exception name in a body.

The module has a system of its own: a test replaces the configuration, and the last two
stop a service and NATS.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import msgspec
import pytest
from harness import System, running_system
from nats.aio.msg import Msg

from virtbackup.contracts.subjects import InventoryCmd, JobCmd
from virtbackup.runtime.ports import free_port
from virtbackup.testing.libvirtd import ensure_libvirtd
from virtbackup.testing.nats import connect

#: What a Python exception's name looks like in a message.
EXCEPTION_NAME = re.compile(r"\b\w*(?:Error|Exception)\b|Traceback")


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    ensure_libvirtd()
    data = tmp_path_factory.mktemp("edge")
    repo = data / "repo"
    repo.mkdir(mode=0o700)
    with running_system(data, orchestrators=1) as system:
        closed = free_port()
        cfg = {
            "servers": [{"id": "local", "name": "This host", "host": ""}],
            "destinations": [
                {"id": "fs", "name": "fs", "driverId": "filesystem", "params": {"path": str(repo)}},
                {"id": "dead-sftp", "name": "dead", "driverId": "sftp",
                 "params": {"host": "127.0.0.1", "port": closed, "username": "u",
                            "password": "p", "basePath": "/b"}},
                {"id": "dead-s3", "name": "dead", "driverId": "s3",
                 "params": {"endpoint": f"127.0.0.1:{closed}", "bucket": "bucket",
                            "accessKey": "a", "secretKey": "s", "secure": False}},
            ],
            "backupDestinationId": "fs",
        }  # fmt: skip
        resp = httpx.post(
            f"{system.url}/config", json=cfg, headers=system.auth(), verify=False, timeout=15
        )
        assert resp.status_code == 200, resp.text
        yield system


@pytest.fixture
async def agent(edge: System) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=edge.url, headers=edge.auth(), verify=False, timeout=30
    ) as client:
        yield client


@pytest.fixture
async def hypersdk(edge: System) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=edge.hypersdk_url, headers=edge.auth(), timeout=30
    ) as client:
        yield client


def message_of(resp: httpx.Response) -> str:
    """An error's message: ``{"error": ...}``, or ``{"detail": ..., "code": ...}`` on the
    admin families (``/api/v1/admin``, ``/api/v1/task``: ``errors.error_body``)."""
    body = resp.json()
    if resp.request.url.path.startswith(("/api/v1/admin/", "/api/v1/task/")):
        assert set(body) == {"detail", "code"}, body
        return str(body["detail"])
    return str(body["error"])


def refused(resp: httpx.Response, status: int, *words: str) -> None:
    """``resp`` is ``status`` with ``{"error": ...}`` naming ``words``, no exception name."""
    assert resp.status_code == status, resp.text
    message = message_of(resp)
    assert not EXCEPTION_NAME.search(message), message
    for word in words:
        assert word in message, (word, message)


async def test_bad_vm_names_are_400_naming_the_field(
    agent: httpx.AsyncClient, hypersdk: httpx.AsyncClient
) -> None:
    for name in ("a\x00b", "a\nb", "a/b", "", "x" * 248):
        for route, extra in (("cleanup", {}), ("actions", {"action": "start"}), ("backup", {})):
            resp = await agent.post(f"/servers/local/{route}", json={"vmName": name, **extra})
            refused(resp, 400, "vmName")
        for route in ("shutdown", "poweroff", "remove-cdrom"):
            refused(await hypersdk.post(f"/vms/{route}", json={"vm_path": f"local/{name}"}), 400)
    refused(await agent.post("/servers/local/cleanup", json={"vmName": "a\x00b"}), 400, "NUL")
    refused(await hypersdk.get("/vms/info", params={"vm_path": "local/a\x00b"}), 400, "vm_path")
    refused(await hypersdk.get("/vms/info", params={"vm_path": "local/a\x01b"}), 400, "vm_path")
    refused(await hypersdk.get("/vms/info", params={"server_id": "lo cal", "vm_path": "a"}), 400)
    refused(await agent.get("/servers/bad%20id/vms"), 400, "serverId")
    # A well-formed name of no VM: 404, on both listeners.
    refused(await agent.post("/servers/local/cleanup", json={"vmName": "no-such-vm"}), 404)
    refused(await hypersdk.post("/vms/poweroff", json={"vm_path": "local/no-such-vm"}), 404)


#: Every POST route of both listeners with a body it accepts (its API document's fields),
#: for ``test_every_body_refuses_unknown_fields``. A new POST route must be added here.
XML = "vms/web1/2026-01-30T12-00-00/domain.xml"
AGENT_POSTS: dict[str, dict[str, object]] = {
    "/sftp/test": {"host": "127.0.0.1", "port": 1, "username": "u", "password": "p",
                   "basePath": "/b"},
    "/oauth/google": {"refreshToken": "r", "accessToken": "a", "scope": "s",
                      "accountEmail": "a@example.com", "expiresAt": 1775707200000},
    "/oauth/google/clear": {},
    "/servers/{server_id}/refresh": {},
    "/servers/{server_id}/test": {},
    "/servers/{server_id}/actions": {"action": "start", "vmName": "no-such-vm"},
    "/servers/{server_id}/cleanup": {"vmName": "no-such-vm"},
    "/servers/{server_id}/backup": {"vmName": "no-such-vm", "destinationId": "fs",
                                    "fresh": False, "driverId": "filesystem",
                                    "driverParams": {}, "alsoDestinationIds": []},
    "/servers/{server_id}/restore/precheck": {"xmlPath": XML, "destinationId": "fs"},
    "/servers/{server_id}/restore/start": {"xmlPath": XML, "decision": "define",
                                           "destinationId": "fs", "driverId": "filesystem"},
    "/restore/sanity": {"xmlPath": XML, "timestamp": "2026-01-30T12-00-00",
                        "destinationId": "fs"},
    "/restore/exports": {"xmlPath": XML, "disk": "vda", "destinationId": "fs",
                         "ttlSeconds": 60},
    "/jobs/{job_id}/cancel": {},
    "/api/v1/destinations/{destination_id}/prune": {
        "vmName": "no-such-vm", "serverId": "local", "keepLast": 1, "keepHourly": 1,
        "keepDaily": 1, "keepWeekly": 1, "keepMonthly": 1, "keepYearly": 1, "keepAll": False,
        "dryRun": True},
    "/api/v1/destinations/{destination_id}/gc": {"graceSeconds": 0, "dryRun": True},
    "/api/v1/destinations/{destination_id}/copy": {"targetDestinationId": "fs",
                                                   "vmName": "no-such-vm", "serverId": "local",
                                                   "timestamp": "2026-01-30T12-00-00"},
    "/api/v1/destinations/{destination_id}/verify": {"mode": "sample", "samplePercent": 5,
                                                     "outdatedAfterDays": 1, "serverId": "local",
                                                     "vmName": "no-such-vm"},
    "/api/v1/migrations": {"serverId": "local", "vmName": "no-such-vm",
                           "targetServerId": "no-such-server", "targetVmName": "x",
                           "targetDirectory": "/var/tmp/x", "storagePool": "p",
                           "maxDowntimeSeconds": 5, "maxPasses": 2,
                           "shutdownTimeoutSeconds": 1, "forceShutdown": True,
                           "startOnTarget": False, "replace": False,
                           "networkMapping": {"default": "default"},
                           "viaDestinationId": "fs",
                           "targetLibvirtUri": "qemu+ssh://root@no-such-host/system",
                           "removeSource": False, "removeSourceDisks": False},
    "/ntfyme/test": {"token": "tk_none"},
    # Remote agents (backend_agents): the agent routes answer the admin's token 403.
    "/api/v1/agent/registration-tokens": {"expiresInSeconds": 60},
    "/api/v1/agent/register": {"registrationToken": "vbreg_none", "hostname": "h", "os": "linux",
                               "arch": "amd64", "agentVersion": "1"},
    "/api/v1/heartbeat": {"status": "online", "agentVersion": "1", "configHash": "",
                          "load": [0.1], "discoveredDomains": []},
    "/api/v1/agent/heartbeat": {"status": "online"},
    "/api/v1/agent/lease": {},
    "/api/v1/jobs/{job_id}/status": {"status": "reading", "message": "m", "bytesRead": 1,
                                     "output": [{"line": "l", "level": "info"}]},
    "/api/v1/agents/{agent_id}/actions": {"action": "activate"},
    # backupagent-api.md (controllers/backupagent.py): bak_ keys only, the token is 403.
    "/api/v1/agent/jobs/start": {"vmName": "no-such-vm", "serverId": "local", "targetId": "fs",
                                 "scheduleId": "s"},
    "/api/v1/agent/jobs/{job_id}/status": {
        "status": "reading", "readSize": 1, "storedSize": 1, "dumpSize": 1, "compressedSize": 1,
        "uploadPath": "p", "durationMs": 1, "errorMessage": "e", "errorCode": "E"},
    "/api/v1/agent/jobs/{job_id}/verification": {
        "status": "passed", "containerId": "c", "restoreDurationMs": 1,
        "checks": [{"checkType": "boot", "checkName": "n", "status": "passed",
                    "expectedValue": "1", "actualValue": "1", "deltaPct": 0.0}]},
    "/api/v1/agent/jobs/{job_id}/logs": {"logs": [{"level": "info", "message": "m",
                                                   "timestamp": "2026-04-09T02:00:01.000Z"}]},
    "/api/v1/agent/schema-snapshot": {"vmName": "no-such-vm", "serverId": "local",
                                      "snapshot": "<domain/>"},
    "/api/v1/agent/anomaly": {"type": "size_anomaly", "severity": "info", "title": "t",
                              "description": "d"},
}  # fmt: skip
#: Backup plans (backend-api.md's projects, pipelines, pipeline chains).
PLAN_RUN: dict[str, object] = {
    "vms": ["local/no-such-vm"], "source_ref": "full", "agent_id": "a", "dry_run": True,
    "execution_mode": "online", "offline_cached_only": False,
}  # fmt: skip
AGENT_POSTS |= {
    "/api/v1/projects/import": {"path": "no-such-project.yaml"},
    "/api/v1/projects/{project_id}/reload": {},
    **{f"/api/v1/pipelines/{{pipeline_db_id}}/{verb}": PLAN_RUN
       for verb in ("run-selection", "dry-run-preview", "eligible-agents")},
    **{f"/api/v1/pipeline-chains/{{chain_db_id}}/{verb}": PLAN_RUN
       for verb in ("run", "dry-run-preview", "eligible-agents")},
    "/api/v1/vault/connections": {"id": "edge", "name": "n", "kind": "sftp",
                                  "host": "127.0.0.1", "port": 1, "username": "u",
                                  "password": "p", "privateKey": "", "hostKey": "",
                                  "basePath": "/b", "saveOnFailure": False},
    "/api/v1/vault/connections/{connection_id}/test": {},
    # backend-api.md (controllers/backend_jobs.py, backend_system.py)
    "/api/v1/jobs/clear-queue": {},
    "/api/v1/jobs/flush-history": {"olderThan": "2000-01-01T00:00:00Z"},
    "/api/v1/jobs/{job_id}/cancel": {},
    "/api/v1/jobs/{job_id}/rerun": {},
    "/api/v1/jobs/{job_id}/artifacts": {"name": "a.txt", "mediaType": "text/plain",
                                        "content": "x"},
    "/api/v1/jobs/{job_id}/tests": {"tests": [{"check": "c", "status": "passed", "disk": "vda",
                                               "point": "p", "detail": "d", "data": {}}]},
    "/api/v1/update/check": {},
    "/api/v1/update/apply": {},
    "/api/v1/update/rollback": {},
    "/api/v1/server/restart": {},
    # agents-backend-api.md's scheduled tasks (controllers/task_schedulers.py)
    "/api/v1/task/schedulers": {"id": "edge-task", "name": "n", "description": "d",
                                "schedule": "0 2 * * *", "timezone": "UTC", "enabled": False,
                                "jobTemplate": {"vmPath": "local/no-such-vm",
                                                "source": {"type": "libvirt",
                                                           "serverId": "local"},
                                                "destination": {"type": "backup",
                                                                "destinationId": "fs"},
                                                "options": {"fresh": False}}},
    "/api/v1/task/schedulers/{schedule_id}/run": {},
    # the HyperSDK listener's webhooks on this listener too (controllers/webhooks_api.py)
    "/api/v1/webhooks": {"url": "http://127.0.0.1:1/hook", "events": ["job.failed"],
                         "enabled": False, "timeout": 5, "retry_count": 0,
                         "headers": {"X-A": "b"}, "secret": "s"},
    "/api/v1/webhooks/test": {"url": "http://127.0.0.1:1/hook", "event": "test"},
    # agents-backend-api.md: sessions, users, roles, API tokens (test_identity.py)
    "/api/v1/admin/auth/login": {"username": "nobody", "password": "wrong password",
                                 "captcha_id": "", "captcha_code": ""},
    "/api/v1/admin/auth/token/refresh": {"refresh_token": "not-a-token"},
    "/api/v1/admin/auth/logout": {},
    "/api/v1/admin/sys/users": {"username": "edge", "password": "x", "nickname": "n",
                                "email": "e", "roles": ["no-such-role"], "enabled": True},
    "/api/v1/admin/sys/users/{user_id}/tokens": {"name": "t", "permissions": ["jobs:read"],
                                                 "expires_in_seconds": 60},
    "/api/v1/admin/sys/roles": {"name": "edge", "description": "d",
                                "permissions": ["no-such-permission"]},
}  # fmt: skip
#: POST routes whose answer is 501 by design (the deployment's job, backend-api.md).
NOT_IMPLEMENTED = {"/api/v1/update/apply", "/api/v1/update/rollback", "/api/v1/server/restart"}
HYPERSDK_JOB: dict[str, object] = {
    "vm_path": "local/no-such-vm",
    "source": {"type": "libvirt"},
    "destination": {"type": "backup", "destination_id": "fs"},
    "options": {},
}
HYPERSDK_POSTS: dict[str, dict[str, object]] = {
    **{f"/vms/{route}": {"vcenter_url": "", "username": "u", "password": "p",
                         "vm_path": "local/no-such-vm"}
       for route in ("shutdown", "poweroff", "remove-cdrom")},
    "/jobs/submit": HYPERSDK_JOB,
    "/jobs/query": {"all": True, "job_ids": [], "status": "running", "limit": 1},
    "/jobs/cancel": {"job_ids": ["no-such-job"], "status": "running"},
    "/schedules": {"id": "edge", "name": "n", "description": "d", "schedule": "0 2 * * *",
                   "timezone": "UTC", "enabled": False, "job_template": HYPERSDK_JOB},
    **{f"/schedules/{{schedule_id}}/{verb}": {} for verb in ("enable", "disable", "trigger")},
}  # fmt: skip
HYPERSDK_POSTS |= {
    "/webhooks": {"url": "http://127.0.0.1:1/hook", "events": ["job.failed"], "enabled": False,
                  "timeout": 5, "retry_count": 0, "headers": {"X-A": "b"}, "secret": "s"},
    "/webhooks/test": {"url": "http://127.0.0.1:1/hook", "event": "test"},
}  # fmt: skip


async def test_every_post_route_is_walked(
    agent: httpx.AsyncClient, hypersdk: httpx.AsyncClient
) -> None:
    for client, table in ((agent, {**AGENT_POSTS, "/config": {}}), (hypersdk, HYPERSDK_POSTS)):
        doc = (await client.get("/schema/openapi.json")).json()
        posts = {path for path, item in doc["paths"].items() if "post" in item}
        assert posts == set(table), posts ^ set(table)


def _concrete(path: str) -> str:
    path = path.replace("{server_id}", "local").replace("{job_id}", "no-such-job")
    path = path.replace("{schedule_id}", "no-such-schedule")
    path = path.replace("{project_id}", "no-such-project")
    path = path.replace("{pipeline_db_id}", "no.such").replace("{chain_db_id}", "no.such")
    path = path.replace("{agent_id}", "no-agent")
    path = path.replace("{connection_id}", "no-such-connection").replace("{user_id}", "999999")
    return path.replace("{destination_id}", "no-such-destination")


@pytest.mark.parametrize("listener", ["agent", "hypersdk"])
async def test_every_body_refuses_unknown_fields(
    listener: str, agent: httpx.AsyncClient, hypersdk: httpx.AsyncClient
) -> None:
    """Every documented field is accepted (the answer is never a 400 naming it); one
    unknown field more is a 400 naming it, and nothing happens."""
    client, table = (agent, AGENT_POSTS) if listener == "agent" else (hypersdk, HYPERSDK_POSTS)
    jobs_before = (await agent.get("/jobs")).json()
    for path, body in table.items():
        resp = await client.post(_concrete(path), json=body)
        # 502: a test delivery to a closed port (the receiver's failure, named).
        assert (
            resp.status_code < 500
            or (path.endswith("/webhooks/test") and resp.status_code == 502)
            or (path in NOT_IMPLEMENTED and resp.status_code == 501)
        ), (path, resp.text)
        if resp.status_code == 400:
            message = message_of(resp)
            assert not any(f"`{field}`" in message for field in body), (path, message)
        for typo in ("bogusField", "vmname", "target_directory"):
            resp = await client.post(_concrete(path), json={**body, typo: "x"})
            refused(resp, 400, typo)
    if listener == "agent":
        config_before = (await agent.get("/config")).json()
        resp = await agent.post("/config", json={**config_before, "bogusField": 1})
        refused(resp, 400, "bogusField")
        assert (await agent.get("/config")).json() == config_before
    jobs_after = (await agent.get("/jobs")).json()
    assert len(jobs_after) == len(jobs_before)


async def test_errors_quote_a_clients_value_only_so_far(
    agent: httpx.AsyncClient, hypersdk: httpx.AsyncClient
) -> None:
    """Wherever an error quotes what the client sent, it quotes at most 200 characters
    and ``...``: a 500 KB value never makes a 500 KB answer."""
    huge = "vms/" + "a" * 500_000 + "/2026-01-30T12-00-00/domain.xml"
    long_id = "d" * 100_000
    point = {"xmlPath": XML}
    for path, body in (
        ("/servers/local/restore/precheck", {"xmlPath": huge}),
        ("/servers/local/restore/start", {"xmlPath": huge, "decision": "define"}),
        ("/restore/sanity", {"xmlPath": huge}),
        ("/restore/exports", {"xmlPath": huge, "disk": "vda"}),
        ("/restore/sanity", {**point, "destinationId": long_id}),
        ("/servers/local/backup", {"vmName": "x", "destinationId": long_id}),
        ("/servers/local/backup", {"vmName": "x", "driverId": long_id}),
        ("/servers/local/restore/start", {**point, "decision": "define", "driverId": long_id}),
    ):
        resp = await agent.post(path, json=body)
        assert 400 <= resp.status_code < 500, (path, resp.status_code)
        assert len(resp.content) < 2000, (path, resp.text[:300])
        assert "..." in resp.json()["error"], (path, resp.text[:300])
    for resp in (
        await agent.get("/jobs/" + "j" * 50_000),
        await agent.delete("/restore/exports/" + "e" * 50_000),
        await agent.get("/no/such/" + "p" * 50_000),
        await hypersdk.get("/no/such/" + "p" * 50_000),
    ):
        assert 400 <= resp.status_code < 500, resp.status_code
        assert len(resp.content) < 2000, resp.text[:300]
    # No destination named: the message does not speak of "this destination".
    resp = await agent.post("/restore/sanity", json={"xmlPath": "vms/x/not-a-time/domain.xml"})
    refused(resp, 400, "xmlPath", "timestamp")
    assert "this destination" not in resp.json()["error"]
    resp = await agent.post("/restore/sanity", json={"xmlPath": "/etc/passwd"})
    refused(resp, 400, "xmlPath", "vms/<vm>/<timestamp>/domain.xml")
    assert "this destination" not in resp.json()["error"]


async def test_services_refuse_bad_names_at_their_bus_edge(edge: System) -> None:
    nc = await connect(edge.nats)
    try:
        for subject in (InventoryCmd.CLEANUP, InventoryCmd.VM_INFO):
            body = json.dumps({"serverId": "local", "vmName": "a\x00b"}).encode()
            reply = json.loads((await nc.request(subject, body, timeout=10)).data)
            assert reply["error"]["code"] == "bad_request", reply
            assert "vmName" in reply["error"]["message"]
        body = json.dumps({"serverId": "local", "vmName": "a\nb"}).encode()
        reply = json.loads((await nc.request(JobCmd.BACKUP, body, timeout=10)).data)
        assert reply["error"]["code"] == "bad_request", reply
    finally:
        await nc.drain()


async def test_deep_json_and_invalid_utf8_are_400(
    agent: httpx.AsyncClient, hypersdk: httpx.AsyncClient
) -> None:
    before = (await agent.get("/config")).json()
    deep = b"[" * 50_000 + b"]" * 50_000
    deep_object = b'{"vmName":' * 65 + b'"x"' + b"}" * 65
    json_type = {"content-type": "application/json"}
    for body in (deep, deep_object):
        for route in ("/config", "/servers/local/backup", "/sftp/test"):
            refused(await agent.post(route, content=body, headers=json_type), 400, "deeper")
        refused(await hypersdk.post("/vms/shutdown", content=body, headers=json_type), 400)
    bad_utf8 = b'{"vmName":"a\xff\xfeb"}'
    refused(
        await agent.post("/servers/local/cleanup", content=bad_utf8, headers=json_type),
        400,
        "UTF-8",
    )
    refused(await hypersdk.post("/vms/poweroff", content=bad_utf8, headers=json_type), 400)
    assert (await agent.get("/config")).json() == before
    # 64 levels are fine (two objects, then 62 arrays): the handler gets the request.
    ok_depth = b'{"vmName":"no-such-vm","driverParams":{"x":' + b"[" * 62 + b"]" * 62 + b"}}"
    resp = await agent.post("/servers/local/backup", content=ok_depth, headers=json_type)
    refused(resp, 404)


async def test_last_event_id_out_of_range_is_400(agent: httpx.AsyncClient) -> None:
    for value in ("99999999999999999999999999", "-1", "abc"):
        refused(await agent.get("/events", headers={"Last-Event-ID": value}), 400, "Last-Event-ID")


async def test_unusable_destination_is_503_naming_it(agent: httpx.AsyncClient) -> None:
    started = time.monotonic()
    for dest in ("dead-sftp", "dead-s3"):
        resp = await agent.get("/restore/entries", params={"destinationId": dest})
        refused(resp, 503, dest)
    assert time.monotonic() - started < 60
    assert (await agent.get("/restore/entries", params={"destinationId": "fs"})).json() == []
    refused(await agent.get("/restore/entries", params={"destinationId": "nope"}), 404, "nope")


async def test_an_unreadable_host_key_is_400_naming_it(agent: httpx.AsyncClient) -> None:
    body = {"host": "127.0.0.1", "port": 1, "username": "u", "password": "p", "hostKey": "junk"}
    resp = await agent.post("/sftp/test", json=body)
    assert resp.status_code == 400, resp.text
    assert "hostKey" in resp.json()["error"]


async def test_bodies_must_be_declared_json(
    agent: httpx.AsyncClient, hypersdk: httpx.AsyncClient
) -> None:
    before = (await agent.get("/config")).json()
    replacement = json.dumps({"servers": []})
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "text/yaml", None):
        headers = {"content-type": content_type} if content_type else {}
        resp = await agent.post("/config", content=replacement, headers=headers)
        refused(resp, 415, "application/json")
        backup = json.dumps({"vmName": "web1"})
        resp = await agent.post("/servers/local/backup", content=backup, headers=headers)
        refused(resp, 415)
        resp = await hypersdk.post(
            "/vms/shutdown", content='{"vm_path":"local/x"}', headers=headers
        )
        refused(resp, 415)
    assert (await agent.get("/config")).json() == before
    assert (await agent.get("/jobs")).json() == []
    # JSON by any of its names is decoded; a POST without a body needs no type.
    for content_type in ("application/json; charset=utf-8", "application/vnd.api+json"):
        resp = await agent.post(
            "/servers/local/cleanup",
            content='{"vmName":"no-such-vm"}',
            headers={"content-type": content_type},
        )
        refused(resp, 404)
    assert (await agent.post("/servers/local/refresh")).status_code == 200


async def test_options_lists_every_method_of_a_path(agent: httpx.AsyncClient) -> None:
    resp = await agent.options("/config")
    assert resp.status_code == 204
    assert resp.headers["allow"] == "GET, OPTIONS, POST"
    resp = await agent.options("/servers/local/backup")
    assert resp.headers["allow"] == "OPTIONS, POST"


async def test_documents_describe_bodies_and_errors(
    agent: httpx.AsyncClient, hypersdk: httpx.AsyncClient
) -> None:
    doc = (await agent.get("/schema/openapi.json")).json()
    for path, schema in (
        ("/config", "AgentConfig"),
        ("/sftp/test", "SftpParams"),
        ("/oauth/google", "GoogleTokensBody"),
    ):
        body = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        assert body["schema"] == {"$ref": f"#/components/schemas/{schema}"}
    assert "refreshToken" in doc["components"]["schemas"]["GoogleTokensBody"]["required"]
    assert "servers" in doc["components"]["schemas"]["AgentConfig"]["properties"]
    error_body = {"$ref": "#/components/schemas/ErrorBody"}
    for document in (doc, (await hypersdk.get("/schema/openapi.json")).json()):
        assert document["components"]["schemas"]["ErrorBody"]["required"] == ["error"]
        for path, item in document["paths"].items():
            for method, operation in item.items():
                responses = operation["responses"]
                assert {"400", "401", "500", "503"} <= set(responses)
                if method == "post":
                    assert {"413", "415"} <= set(responses)
                assert "403" in responses  # a role without the route's permission
                # agents-backend-api.md's routes answer {"detail", "code"}
                wanted = error_body
                if path.startswith(("/api/v1/admin/", "/api/v1/task/")):
                    wanted = {"$ref": "#/components/schemas/DetailCodeBody"}
                for status, response in responses.items():
                    if status >= "400" and not (status == "503" and path == "/health"):
                        content = response["content"]["application/json"]
                        assert content["schema"] == wanted, (status, operation)
    hs = (await hypersdk.get("/schema/openapi.json")).json()
    assert "503" in hs["paths"]["/health"]["get"]["responses"]


async def test_internal_faults_are_logged_not_echoed(
    edge: System, agent: httpx.AsyncClient
) -> None:
    """A command answered ``internal`` (here by a stand-in for the orchestrator): the
    client gets a generic message with a request id; the log has the detail."""
    edge.stop("job-orchestrator")
    nc = await connect(edge.nats)
    try:
        fault = {"error": {"code": "internal", "message": "KeyError: 'secret-detail'"}}

        async def answer(msg: Msg) -> None:
            await msg.respond(msgspec.json.encode(fault))

        await nc.subscribe(JobCmd.GET, cb=answer)
        await nc.flush()
        resp = await agent.get("/jobs/some-job")
        assert resp.status_code == 500
        message = resp.json()["error"]
        assert "secret-detail" not in message and not EXCEPTION_NAME.search(message)
        request_id = resp.headers["x-request-id"]
        assert message == f"internal error (request id {request_id})"
        log = edge.data_dir / "gateway.log"
        deadline = time.monotonic() + 10
        while request_id not in log.read_text():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        line = next(x for x in log.read_text().splitlines() if request_id in x)
        assert "secret-detail" in line
    finally:
        await nc.drain()


async def test_hypersdk_health_is_503_while_the_bus_is_down(
    edge: System, agent: httpx.AsyncClient, hypersdk: httpx.AsyncClient
) -> None:
    resp = await hypersdk.get("/health")
    assert resp.status_code == 200 and resp.json() == {"status": "ok"}
    edge.nats.stop()
    deadline = time.monotonic() + 20
    while (resp := await hypersdk.get("/health")).status_code != 503:
        assert time.monotonic() < deadline, resp.text
        await asyncio.sleep(0.2)
    assert resp.json() == {"status": "degraded"}
    assert (await agent.get("/health")).status_code == 503
