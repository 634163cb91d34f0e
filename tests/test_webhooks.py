"""Webhooks (HyperSDK API) and ntfy notifications, end to end.

Real parts: nats-server, the gateway, the job-orchestrator, a transfer worker and the
notifier as processes; real sanity jobs of restore points written with the repository
library (one sound, one with its chunks removed, which fails); a real HTTP receiver on
loopback (``virtbackup.testing.receiver``). ntfy's servers cannot be reached from here:
the same receiver stands in for ntfy's publish API.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import msgspec
import pytest
from harness import System, local_config, wait_job

from virtbackup.contracts.v1.events import Event
from virtbackup.runtime.clock import utcnow_iso
from virtbackup.runtime.nats_server import start_nats_server
from virtbackup.runtime.ports import free_port
from virtbackup.testing.nats import connect
from virtbackup.testing.points import write_point
from virtbackup.testing.receiver import Receiver

SERVICES = ("gateway", "job-orchestrator", "transfer-worker", "notifier")
SECRET = "whsec-test-5f1c"
AUTH_HEADER = "Bearer hook-token-9a7e"
NTFY_TOKEN = "tk_ntfytesttoken31"


@pytest.fixture(scope="module")
def hooks_system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    data = tmp_path_factory.mktemp("hooks")
    system = System(
        data_dir=data,
        nats=start_nats_server(data / "nats", auth=True),
        agent_port=free_port(),
        # A killed notifier's deliveries come back to the next one after 3 s.
        extra_env={"VIRTBACKUP_NOTIFIER_ACK_WAIT": "3"},
    )
    try:
        for name in SERVICES:
            system.start(name)
        system.wait_ready()
        yield system
    finally:
        system.stop_all()
        system.nats.stop()


@pytest.fixture(scope="module")
async def rx() -> AsyncIterator[Receiver]:
    async with Receiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
async def points(hooks_system: System, rx: Receiver) -> dict[str, Any]:
    """A sound point (``good``) and one whose chunks are gone (``bad``), and the config."""
    repo, broken = hooks_system.data_dir / "repo", hooks_system.data_dir / "broken"
    repo.mkdir(mode=0o700)
    broken.mkdir(mode=0o700)
    good = await write_point(repo, vm="vm1")
    bad = await write_point(broken, vm="vm2")
    shutil.rmtree(broken / "VirtBackup" / "chunks")
    cfg = local_config(repo)
    cfg["destinations"].append(
        {"id": "broken", "driverId": "filesystem", "params": {"path": str(broken)}}
    )
    cfg["ntfymeToken"] = NTFY_TOKEN
    cfg["ntfy"] = {"serverUrl": f"{rx.url}/ntfy", "topic": "vb-alerts"}
    async with _agent(hooks_system) as api:
        resp = await api.post("/config", json=cfg)
        assert resp.status_code == 200, resp.text
    return {"good": good, "bad": bad, "config": cfg}


def _agent(system: System) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=system.url, headers=system.auth(), verify=False, timeout=30)


@pytest.fixture
async def sdk(hooks_system: System, points: dict[str, Any]) -> AsyncIterator[httpx.AsyncClient]:
    """The HyperSDK listener; every webhook a test added is deleted afterwards."""
    async with httpx.AsyncClient(
        base_url=hooks_system.hypersdk_url, headers=hooks_system.auth(), timeout=30
    ) as client:
        yield client
        while (await client.get("/webhooks")).json()["total"]:
            assert (await client.delete("/webhooks/0")).status_code == 200


async def add_hook(
    sdk: httpx.AsyncClient, rx: Receiver, path: str, **fields: Any
) -> dict[str, Any]:
    body = {"url": f"{rx.url}{path}", "events": ["job.completed"], **fields}
    resp = await sdk.post("/webhooks", json=body)
    assert resp.status_code == 201, resp.text
    hook: dict[str, Any] = resp.json()["webhook"]
    return hook


async def run_sanity(system: System, xml_path: str, destination: str = "fs") -> dict[str, Any]:
    async with _agent(system) as api:
        resp = await api.post(
            "/restore/sanity", json={"xmlPath": xml_path, "destinationId": destination}
        )
        assert resp.status_code == 200, resp.text
        return await wait_job(api, resp.json()["jobId"], timeout=45)


def signed(req: Any) -> bool:
    expected = "sha256=" + hmac.new(SECRET.encode(), req.body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(req.headers.get("x-virtbackup-signature", ""), expected)


async def test_job_completed_reaches_the_webhook_signed(
    hooks_system: System, sdk: httpx.AsyncClient, rx: Receiver, points: dict[str, Any]
) -> None:
    spy = await connect(hooks_system.nats)  # what crosses the bus (admin may listen)
    seen: list[bytes] = []

    async def keep(msg: Any) -> None:
        seen.append(msg.data)

    await spy.subscribe("vb.cmd.notify.webhooks-add", cb=keep)
    await spy.flush()
    hook = await add_hook(
        sdk,
        rx,
        "/signed",
        events=["job.submitted", "job.started", "job.completed"],
        secret=SECRET,
        headers={"Authorization": AUTH_HEADER, "X-Team": "ops"},
        retry_count=2,
        timeout=10,
    )
    assert hook["headers"] == {"Authorization": "********", "X-Team": "********"}
    await spy.drain()
    assert seen and all(SECRET.encode() not in m and b"hook-token" not in m for m in seen)
    assert b"vbsec:v1:" in seen[0]
    assert hook["has_secret"] is True and "secret" not in hook

    job = await run_sanity(hooks_system, points["good"])
    assert job["state"] == "success", job
    got = await rx.wait_for("/signed", 3, timeout=15)
    by_event = {r.json()["event"]: r for r in got}
    assert set(by_event) == {"job.submitted", "job.started", "job.completed"}
    done = by_event["job.completed"]
    body = done.json()
    assert body["data"]["job"]["definition"]["id"] == job["id"]
    assert body["data"]["job"]["status"] == "completed"
    assert signed(done), done.headers
    assert done.headers["x-virtbackup-delivery"] == body["delivery_id"]
    assert done.headers["x-virtbackup-event"] == "job.completed"
    assert done.headers["authorization"] == AUTH_HEADER and done.headers["x-team"] == "ops"
    assert len({r.headers["x-virtbackup-delivery"] for r in got}) == 3
    assert got[0].json()["event"] == "job.submitted"  # in order, one at a time

    listed = await sdk.get("/webhooks")
    assert listed.status_code == 200
    view = listed.json()
    assert view["total"] == 1 and set(view) == {"webhooks", "total", "timestamp"}
    assert view["webhooks"][0]["last_status"]["state"] == "delivered"
    assert SECRET not in listed.text and "hook-token" not in listed.text

    # At rest the secret and the credential header are sealed (the admin user reads).
    nc = await connect(hooks_system.nats)
    try:
        kv = await nc.jetstream().key_value("VB_WEBHOOKS")
        raw = (await kv.get("webhooks")).value or b""
    finally:
        await nc.drain()
    assert b"vbsec:v1:" in raw and SECRET.encode() not in raw and b"hook-token" not in raw


async def test_a_failing_receiver_is_retried_then_left_alone(
    hooks_system: System, sdk: httpx.AsyncClient, rx: Receiver, points: dict[str, Any]
) -> None:
    rx.script("/flaky", 500, "close", 200)
    rx.script("/dead", 503)
    await add_hook(sdk, rx, "/flaky", retry_count=4, timeout=5)
    await add_hook(sdk, rx, "/dead", retry_count=1, timeout=5)
    assert (await run_sanity(hooks_system, points["good"]))["state"] == "success"

    flaky = await rx.wait_for("/flaky", 3, timeout=20)
    assert len({r.headers["x-virtbackup-delivery"] for r in flaky}) == 1
    assert flaky[1].at - flaky[0].at >= 0.9 and flaky[2].at - flaky[1].at >= 1.9  # backoff
    dead = await rx.wait_for("/dead", 2, timeout=20)
    await asyncio.sleep(4.5)  # the next retry would have come by now
    assert len(rx.to("/flaky")) == 3 and len(rx.to("/dead")) == 2 == len(dead)

    hooks = {h["url"]: h for h in (await sdk.get("/webhooks")).json()["webhooks"]}
    gave_up = hooks[f"{rx.url}/dead"]["last_status"]
    assert gave_up["state"] == "failed" and gave_up["attempts"] == 2
    assert gave_up["http_status"] == 503
    ok = hooks[f"{rx.url}/flaky"]["last_status"]
    assert ok["state"] == "delivered" and ok["attempts"] == 3
    log = (hooks_system.data_dir / "notifier.log").read_text()
    assert "webhook delivery given up after 2 attempts" in log


async def test_a_hanging_receiver_does_not_delay_another_webhook(
    hooks_system: System, sdk: httpx.AsyncClient, rx: Receiver, points: dict[str, Any]
) -> None:
    rx.script("/hang", "hang")
    await add_hook(sdk, rx, "/hang", timeout=30, retry_count=0)
    await add_hook(sdk, rx, "/fast")
    job = await run_sanity(hooks_system, points["good"])
    finished = time.monotonic()
    fast = await rx.wait_for("/fast", 1, timeout=10)
    assert fast[0].json()["data"]["job"]["definition"]["id"] == job["id"]
    assert fast[0].at - finished < 5
    assert len(rx.to("/hang")) == 1  # still hanging on its first attempt


async def test_pending_deliveries_survive_a_sigkilled_notifier(
    hooks_system: System, sdk: httpx.AsyncClient, rx: Receiver, points: dict[str, Any]
) -> None:
    rx.script("/inflight", "hang", 200)
    await add_hook(sdk, rx, "/inflight", timeout=30, retry_count=0)
    await add_hook(sdk, rx, "/later")
    first = await run_sanity(hooks_system, points["good"])
    hanging = (await rx.wait_for("/inflight", 1, timeout=10))[0]
    await rx.wait_for("/later", 1, timeout=10)
    # SIGKILL while a delivery is in flight (its receiver hangs) ...
    hooks_system.procs["notifier"].kill()
    hooks_system.procs.pop("notifier").wait(5)
    # ... and a job ends while no notifier runs: its events wait in VB_EVENTS.
    second = await run_sanity(hooks_system, points["good"])
    await asyncio.sleep(1)
    assert len(rx.to("/later")) == 1
    hooks_system.start("notifier")
    hooks_system.wait_ready()

    later = await rx.wait_for("/later", 2, timeout=20)
    assert later[1].json()["data"]["job"]["definition"]["id"] == second["id"]
    inflight = await rx.wait_for("/inflight", 3, timeout=20)
    # The delivery in flight came again, with its delivery id, then the next one.
    assert inflight[1].headers["x-virtbackup-delivery"] == hanging.headers["x-virtbackup-delivery"]
    assert inflight[1].json()["data"]["job"]["definition"]["id"] == first["id"]
    assert inflight[2].json()["data"]["job"]["definition"]["id"] == second["id"]
    await asyncio.sleep(2)
    assert len(rx.to("/inflight")) == 3 and len(rx.to("/later")) == 2


async def test_webhooks_test_route(
    sdk: httpx.AsyncClient, rx: Receiver, points: dict[str, Any]
) -> None:
    resp = await sdk.post("/webhooks/test", json={"url": f"{rx.url}/probe", "event": "test"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["message"] == "test webhook sent"
    got = rx.to("/probe")
    assert len(got) == 1 and got[0].headers["x-virtbackup-event"] == "test"
    assert "x-virtbackup-signature" not in got[0].headers

    # The URL of a configured webhook: signed with its secret, with its headers.
    await add_hook(sdk, rx, "/probe-signed", secret=SECRET, headers={"X-Team": "ops"})
    resp = await sdk.post("/webhooks/test", json={"url": f"{rx.url}/probe-signed"})
    assert resp.status_code == 200, resp.text
    (req,) = rx.to("/probe-signed")
    assert signed(req) and req.headers["x-team"] == "ops"
    assert req.json()["event"] == "test"

    rx.script("/probe-down", 500)
    resp = await sdk.post("/webhooks/test", json={"url": f"{rx.url}/probe-down"})
    assert resp.status_code == 502 and "answered 500" in resp.json()["error"]
    assert len(rx.to("/probe-down")) == 1  # a test is not retried


async def test_ntfy_test_and_a_failed_job_notification(
    hooks_system: System, sdk: httpx.AsyncClient, rx: Receiver, points: dict[str, Any]
) -> None:
    async with _agent(hooks_system) as api:
        resp = await api.post("/ntfyme/test")
        assert resp.status_code == 200, resp.text
        assert resp.json() == {
            "success": True,
            "message": "Test notification delivered.",
            "statusCode": 200,
        }
        (test,) = rx.to("/ntfy/")
        assert test.headers["authorization"] == f"Bearer {NTFY_TOKEN}"
        assert test.json()["topic"] == "vb-alerts"
        resp = await api.post("/ntfyme/test", json={"token": "tk_other"})
        assert resp.status_code == 200
        assert rx.to("/ntfy/")[-1].headers["authorization"] == "Bearer tk_other"
        rx.script("/ntfy/", 403)
        try:
            resp = await api.post("/ntfyme/test")
        finally:
            rx.script("/ntfy/", 200)
        assert resp.status_code == 200
        assert resp.json()["success"] is False and resp.json()["statusCode"] == 403
        assert "ntfy answered 403" in resp.json()["error"]
        # The token is a secret of the configuration: never shown, sealed at rest also
        # in the gateway's copy for the notifier (which may not read VB_CONFIG).
        assert NTFY_TOKEN not in (await api.get("/config")).text
    nc = await connect(hooks_system.nats)
    try:
        kv = await nc.jetstream().key_value("VB_WEBHOOKS")
        raw = (await kv.get("ntfy")).value or b""
    finally:
        await nc.drain()
    assert b'"ntfymeToken":"vbsec:v1:' in raw and NTFY_TOKEN.encode() not in raw
    assert b'"topic":"vb-alerts"' in raw

    sent = len(rx.to("/ntfy/"))
    ok = await run_sanity(hooks_system, points["good"])
    failed = await run_sanity(hooks_system, points["bad"], destination="broken")
    assert ok["state"] == "success" and failed["state"] == "failure", failed
    got = await rx.wait_for("/ntfy/", sent + 1, timeout=15)
    note = got[sent].json()
    assert got[sent].headers["authorization"] == f"Bearer {NTFY_TOKEN}"
    assert note["topic"] == "vb-alerts" and note["priority"] == 4
    assert "vm2" in note["title"] and "failed" in note["title"]
    assert note["message"] == failed["message"]
    await asyncio.sleep(1.5)
    assert len(rx.to("/ntfy/")) == sent + 1  # no matcher: errors only, not the success


async def test_a_matcher_chooses_what_notifies(
    hooks_system: System, rx: Receiver, points: dict[str, Any]
) -> None:
    cfg = json.loads(json.dumps(points["config"]))
    cfg["ntfy"]["matchers"] = [
        {"name": "sanity-ok", "matchSeverity": ["info"], "matchField": ["exact:type=sanity"]}
    ]
    async with _agent(hooks_system) as api:
        assert (await api.post("/config", json=cfg)).status_code == 200
        try:
            sent = len(rx.to("/ntfy/"))
            await run_sanity(hooks_system, points["bad"], destination="broken")
            ok = await run_sanity(hooks_system, points["good"])
            got = await rx.wait_for("/ntfy/", sent + 1, timeout=15)
            await asyncio.sleep(1.5)
            assert len(rx.to("/ntfy/")) == sent + 1  # the failure matches no matcher now
            assert "completed" in got[sent].json()["title"]
            assert ok["vmName"] in got[sent].json()["title"]
        finally:
            assert (await api.post("/config", json=points["config"])).status_code == 200


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"url": "ftp://example.com/x", "events": ["job.failed"]}, "http:// or https://"),
        ({"url": "file:///etc/passwd", "events": ["job.failed"]}, "http:// or https://"),
        ({"url": "http://", "events": ["job.failed"]}, "with a host"),
        ({"url": "http://alice:pw@h/x", "events": ["job.failed"]}, "user or password"),
        ({"url": "https://token@h/x", "events": ["job.failed"]}, "user or password"),
        ({"url": "http://h/x", "events": ["job.exploded"]}, "events"),
        ({"url": "http://h/x", "events": []}, "events"),
        ({"url": "http://h/x", "events": ["job.failed"], "retry_count": 99}, "retry_count"),
        ({"url": "http://h/x", "events": ["job.failed"], "timeout": 0}, "timeout"),
        ({"url": "http://h/x", "events": ["job.failed"], "colour": "red"}, "colour"),
        (
            {"url": "http://h/x", "events": ["job.failed"], "headers": {"Content-Type": "x"}},
            "Content-Type",
        ),
        (
            {"url": "http://h/x", "events": ["job.failed"], "headers": {"X-A": "a\nb"}},
            "headers",
        ),
    ],
)
async def test_bad_webhooks_are_refused_and_change_nothing(
    sdk: httpx.AsyncClient, body: dict[str, Any], needle: str
) -> None:
    before = (await sdk.get("/webhooks")).json()["total"]
    resp = await sdk.post("/webhooks", json=body)
    assert resp.status_code == 400, resp.text
    assert needle in resp.json()["error"], resp.json()
    assert (await sdk.get("/webhooks")).json()["total"] == before


async def test_job_failed_carries_the_job_as_get_jobs_shows_it(
    hooks_system: System, sdk: httpx.AsyncClient, rx: Receiver, points: dict[str, Any]
) -> None:
    await add_hook(sdk, rx, "/failed-shape", events=["job.failed", "job.submitted"])
    failed = await run_sanity(hooks_system, points["bad"], destination="broken")
    assert failed["state"] == "failure", failed
    got = await rx.wait_for("/failed-shape", 2, timeout=15)
    by_event = {r.json()["event"]: r.json() for r in got}
    shown = (await sdk.get(f"/jobs/{failed['id']}")).json()
    # One shape: the webhook's data.job is GET /jobs/{id}, key for key.
    assert by_event["job.failed"]["data"]["job"] == shown
    assert set(by_event["job.submitted"]["data"]["job"]) == set(shown)
    assert shown["status"] == "failed" and shown["error"] == failed["message"]


async def test_bad_indexes_tests_and_settings(
    hooks_system: System, sdk: httpx.AsyncClient, rx: Receiver, points: dict[str, Any]
) -> None:
    await add_hook(sdk, rx, "/kept")
    for index, status in (("1", 404), ("99", 404), ("-1", 400), ("abc", 400)):
        resp = await sdk.delete(f"/webhooks/{index}")
        assert resp.status_code == status, (index, resp.text)
        assert "index" in resp.json()["error"]
    assert (await sdk.get("/webhooks")).json()["total"] == 1
    resp = await sdk.post("/webhooks/test", json={"url": "gopher://h/"})
    assert resp.status_code == 400 and "url" in resp.json()["error"]
    # Only the document's events (and "test"): anything else is a 400 naming the event,
    # and nothing is sent.
    for event in ("job.exploded", "JOB.FAILED", "x" * 64):
        resp = await sdk.post("/webhooks/test", json={"url": f"{rx.url}/ev", "event": event})
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert error.startswith("event:") and "job.failed" in error, error
    assert rx.to("/ev") == []
    resp = await sdk.post("/webhooks/test", json={"url": f"{rx.url}/ev", "event": "job.failed"})
    assert resp.status_code == 200, resp.text
    assert [r.headers["x-virtbackup-event"] for r in rx.to("/ev")] == ["job.failed"]
    # A header name that is not one: said in words, not as a regex.
    resp = await sdk.post(
        "/webhooks", json={"url": f"{rx.url}/h", "events": ["job.failed"], "headers": {"A B": "x"}}
    )
    assert resp.status_code == 400 and "a header name" in resp.json()["error"], resp.text
    assert "regex" not in resp.json()["error"]
    async with httpx.AsyncClient(base_url=hooks_system.hypersdk_url) as anonymous:
        assert (await anonymous.get("/webhooks")).status_code == 401
        assert (await anonymous.post("/webhooks", json={})).status_code == 401

    async with _agent(hooks_system) as api:
        resp = await api.post("/ntfyme/test", json={"tokn": "x"})
        assert resp.status_code == 400 and "tokn" in resp.json()["error"]
        for matcher, needle in (
            ({"name": "m", "matchField": ["exact:colour=red"]}, "matchers[0].matchField[0]"),
            ({"name": "m", "matchField": ["regex:vm_name=("]}, "invalid regex"),
            ({"name": "m", "matchSeverity": ["fatal"]}, "matchSeverity"),
            ({"name": "m", "mode": "some"}, "mode"),
        ):
            cfg = json.loads(json.dumps(points["config"]))
            cfg["ntfy"]["matchers"] = [matcher]
            resp = await api.post("/config", json=cfg)
            assert resp.status_code == 400, resp.text
            assert needle in resp.json()["error"], resp.json()
        cfg = json.loads(json.dumps(points["config"]))
        cfg["ntfy"]["serverUrl"] = "ftp://ntfy.example"
        resp = await api.post("/config", json=cfg)
        assert resp.status_code == 400 and "serverUrl" in resp.json()["error"]
        stored = (await api.get("/config")).json()
        assert stored["ntfy"]["matchers"] == []


async def test_schedule_events_reach_webhooks_and_a_failed_run_notifies(
    hooks_system: System, sdk: httpx.AsyncClient, rx: Receiver, points: dict[str, Any]
) -> None:
    """The schedule events as the orchestrator publishes them (``vb.evt.schedule.<event>
    .<schedule id>``, a snake_case payload), stored here by the admin user."""
    await add_hook(
        sdk,
        rx,
        "/schedules",
        events=["schedule.triggered", "schedule.completed", "schedule.failed"],
    )
    sent = len(rx.to("/ntfy/"))
    nc = await connect(hooks_system.nats)
    try:
        js = nc.jetstream()
        for kind, message in (
            ("triggered", ""),
            ("completed", "1 job completed"),
            ("failed", "1 of 2 jobs failed"),
        ):
            event = Event(
                type=f"schedule.{kind}",
                payload={
                    "schedule_id": "s1",
                    "name": "nightly",
                    "job_ids": ["j1", "j2"],
                    "skipped": False,
                    "message": message,
                },
                id=f"sched-{kind}-{time.time_ns()}",
                time=utcnow_iso(),
                source="job-orchestrator",
            )
            await js.publish(
                f"vb.evt.schedule.{kind}.s1", msgspec.json.encode(event), stream="VB_EVENTS"
            )
    finally:
        await nc.drain()
    got = await rx.wait_for("/schedules", 3, timeout=15)
    assert [r.json()["event"] for r in got] == [
        "schedule.triggered",
        "schedule.completed",
        "schedule.failed",
    ]
    assert got[2].json()["data"]["job_ids"] == ["j1", "j2"]
    notes = await rx.wait_for("/ntfy/", sent + 1, timeout=15)
    await asyncio.sleep(1.5)
    assert len(rx.to("/ntfy/")) == sent + 1  # only the failed run (severity error)
    assert "nightly" in notes[sent].json()["title"] and "failed" in notes[sent].json()["title"]
    assert notes[sent].json()["message"] == "1 of 2 jobs failed"


async def test_an_ntfy_server_that_fails_is_tried_three_times_then_given_up(
    hooks_system: System, rx: Receiver, points: dict[str, Any]
) -> None:
    sent = len(rx.to("/ntfy/"))
    rx.script("/ntfy/", *([200] * sent), 500)
    try:
        failed = await run_sanity(hooks_system, points["bad"], destination="broken")
        assert failed["state"] == "failure"
        got = await rx.wait_for("/ntfy/", sent + 3, timeout=15)
        await asyncio.sleep(2.5)
        assert len(rx.to("/ntfy/")) == sent + 3
        assert len({r.body for r in got[sent:]}) == 1  # the same notification each time
    finally:
        rx.script("/ntfy/", 200)
    log = (hooks_system.data_dir / "notifier.log").read_text()
    assert "ntfy notification given up after 3 attempts" in log


async def test_every_service_logs_json_lines_only(
    hooks_system: System, sdk: httpx.AsyncClient, rx: Receiver, points: dict[str, Any]
) -> None:
    """FastStream's own lines (a subscriber waiting, a message received) used to come out
    as colourised plain text between the JSON lines; now everything is one JSON object a
    line, through the same formatter."""
    await add_hook(sdk, rx, "/log-check", events=["job.completed"])
    assert (await run_sanity(hooks_system, points["good"]))["state"] == "success"
    await rx.wait_for("/log-check", 1, timeout=15)
    for name in SERVICES:
        lines = (hooks_system.data_dir / f"{name}.log").read_text().splitlines()
        assert lines, name
        for line in lines:
            record = json.loads(line)  # fails on a plain-text line
            assert record["service"] and record["msg"] is not None, (name, line)
