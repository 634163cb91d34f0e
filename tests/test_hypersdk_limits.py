"""The HyperSDK listener's limits and refusals found by a fresh trial of issue 15, each a
test that failed before its fix: sizes, headers, tokens, messages. One system, no VM."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from harness import System, running_system
from prometheus_client.parser import text_string_to_metric_families


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    with running_system(tmp_path_factory.mktemp("trial15"), orchestrators=1) as system:
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


async def test_metrics_name_their_charset_once(hyper: httpx.AsyncClient) -> None:
    """It was ``text/plain; version=0.0.4; charset=utf-8; charset=utf-8``."""
    resp = await hyper.get("/metrics")
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    names = {family.name for family in text_string_to_metric_families(resp.text)}
    assert "hypersdk_build_info" in names


@pytest.mark.parametrize(
    ("headers", "where"),
    [({"X-Team": "ops\n"}, "headers"), ({"X-Team\n": "ops"}, "headers")],
)
async def test_a_webhook_header_ending_in_a_newline_is_refused(
    hyper: httpx.AsyncClient, headers: dict[str, str], where: str
) -> None:
    """A final newline passed the pattern (``$``); the webhook was added and every
    delivery then failed at the HTTP client ("Illegal header value")."""
    before = (await hyper.get("/webhooks")).json()["webhooks"]
    body = {"url": "http://127.0.0.1:9/hook", "events": ["job.failed"], "headers": headers}
    refused(await hyper.post("/webhooks", json=body), 400, where)
    assert (await hyper.get("/webhooks")).json()["webhooks"] == before


async def test_an_ntfy_token_with_a_control_character_is_refused(
    api: httpx.AsyncClient,
) -> None:
    """``POST /config`` took ``"ntfymeToken": "tk_...\\n"`` (every notification then
    failed), and ``/ntfyme/test`` answered 200 with the token echoed in its error."""
    cfg = (await api.get("/config")).json()
    bad = {**cfg, "ntfymeToken": "tk_abc\n"}
    refused(await api.post("/config", json=bad), 400, "ntfymeToken")
    assert (await api.get("/config")).json() == cfg
    resp = await api.post("/ntfyme/test", json={"token": "tk_a\r\nX-Evil: 1"})
    body = refused(resp, 400, "token")
    assert "X-Evil" not in body["error"]


@pytest.mark.parametrize(("field", "size"), [("description", 2001), ("name", 201)])
async def test_schedule_text_fields_are_bounded(
    hyper: httpx.AsyncClient, field: str, size: int
) -> None:
    """Two schedules with a 600 KB description made ``GET /schedules`` a 503 for
    everyone (the orchestrator's list no longer fits in one NATS message)."""
    body = {
        "id": "t15-long",
        "schedule": "0 2 * * *",
        "job_template": {"vm_path": "local/web1", "source": {"type": "libvirt"}},
        field: "x" * size,
    }
    refused(await hyper.post("/schedules", json=body), 400, field)
    refused(await hyper.put("/schedules/t15-long", json={field: "x" * size}), 400, field)
    assert (await hyper.get("/schedules/t15-long")).status_code == 404


async def test_a_job_without_a_source_says_source_is_required(
    hyper: httpx.AsyncClient,
) -> None:
    """It said ``source.type: 'None' is not a source type``."""
    body = refused(
        await hyper.post("/jobs/submit", json={"vm_path": "local/web1"}),
        400,
        "source.type is required",
    )
    assert "None" not in body["error"]


@pytest.mark.parametrize("path", ["/jobs/submit", "/jobs/query", "/webhooks", "/schedules"])
async def test_a_missing_body_is_said_in_words(hyper: httpx.AsyncClient, path: str) -> None:
    """It was ``invalid request: 'data' - at `$```."""
    resp = await hyper.post(path, headers={"content-type": "application/json"})
    body = refused(resp, 400, "no body", "JSON object")
    assert "'data'" not in body["error"]


async def test_webhooks_beyond_one_nats_message_are_a_400(hyper: httpx.AsyncClient) -> None:
    """Each webhook may carry 32 headers of 2 KiB: the 17th such add failed as a 500
    (the stored list no longer fit in one NATS message)."""
    before = len((await hyper.get("/webhooks")).json()["webhooks"])
    big = {
        "url": "http://127.0.0.1:9/big",
        "events": ["job.failed"],
        "headers": {f"X-Pad-{i}": "v" * 2000 for i in range(32)},
    }
    added = 0
    try:
        for _ in range(20):
            resp = await hyper.post("/webhooks", json=big)
            if resp.status_code != 201:
                break
            added += 1
        refused(resp, 400, "headers", "bytes")
        assert 0 < added < 20
        listed = await hyper.get("/webhooks")
        assert listed.status_code == 200 and listed.json()["total"] == before + added
    finally:
        for _ in range(added):
            assert (await hyper.delete(f"/webhooks/{before}")).status_code == 200
