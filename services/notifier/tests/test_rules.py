"""The notifier's pure rules: derived events, progress rate limit, matchers, signatures."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import msgspec
import pytest

from virtbackup.contracts.v1.config import ConfigError, NtfySettings, decode_config
from virtbackup.contracts.v1.events import Event
from virtbackup.contracts.v1.hypersdk_jobs import job_view
from virtbackup.contracts.v1.jobs import Job
from virtbackup.contracts.v1.webhooks import Webhook, webhook_view
from virtbackup.notifier import derive
from virtbackup.notifier.delivery import delivery_id, request_headers, signature
from virtbackup.notifier.ntfy import should_notify


def job_event(kind: str, **job: Any) -> Event:
    payload = {
        "id": "j1", "type": "backup", "state": "running", "phase": "preparing",
        "createdAt": "2026-11-30T10:00:00Z", "updatedAt": "2026-11-30T10:00:01Z", **job,
    }  # fmt: skip
    return Event(type=kind, payload=payload, id=f"e-{kind}-{job}", time="t", source="test")


def test_job_events_map_to_the_documents_names() -> None:
    d = derive.Deriver()
    assert [x.name for x in d.webhook_events(job_event("job.created", state="queued"))] == [
        "job.submitted"
    ]
    started = job_event("job.updated", startedAt="s")
    assert [x.name for x in d.webhook_events(started)] == ["job.started"]
    assert d.webhook_events(started) == []  # a later message in preparing: not again
    done = job_event("job.finished", state="success", phase="finished")
    assert [x.name for x in d.webhook_events(done)] == ["job.completed"]
    failed = job_event("job.finished", state="failure", message="boom")
    (item,) = d.webhook_events(failed)
    assert item.name == "job.failed" and item.data["job"]["error"] == "boom"
    # data.job is the job exactly as GET /jobs/{id} of the HyperSDK API shows it.
    assert item.data == {"job": job_view(msgspec.convert(failed.payload, Job))}
    assert set(item.data["job"]) == {
        "definition", "status", "progress", "message", "created_at", "started_at",
        "completed_at", "error",
    }  # fmt: skip
    assert item.data["job"]["definition"]["source"] == {"type": "libvirt", "server_id": None}
    assert d.webhook_events(job_event("job.finished", state="failure", id=None)) == []
    assert d.webhook_events(job_event("job.finished", state="canceled")) == []
    assert d.webhook_events(job_event("unit.done")) == []


def test_progress_is_rate_limited_per_job() -> None:
    d = derive.Deriver()
    first = d.webhook_events(job_event("job.updated", phase="transferring", completedUnits=1))
    second = d.webhook_events(job_event("job.updated", phase="transferring", completedUnits=2))
    other = d.webhook_events(job_event("job.updated", id="j2", phase="transferring"))
    assert [x.name for x in first] == ["job.progress"] and second == []
    assert [x.name for x in other] == ["job.progress"]
    stale = job_event("job.updated", id="j3", phase="transferring")
    assert d.webhook_events(stale, age=derive.PROGRESS_MAX_AGE + 1) == []


def ntfy(**fields: Any) -> NtfySettings:
    return msgspec.convert({"topic": "t", **fields}, NtfySettings)


def test_matchers_in_the_manner_of_pbs() -> None:
    failed = derive.notification(job_event("job.finished", state="failure", vmName="web-1"))
    ok = derive.notification(job_event("job.finished", state="success", vmName="db-1"))
    assert failed is not None and ok is not None
    assert should_notify(ntfy(), failed) and not should_notify(ntfy(), ok)
    assert not should_notify(ntfy(topic=""), failed)
    web = ntfy(matchers=[{"name": "web", "matchField": ["regex:vm_name=^web-"]}])
    assert should_notify(web, failed) and not should_notify(web, ok)
    any_ = ntfy(
        matchers=[
            {
                "name": "a",
                "mode": "any",
                "matchSeverity": ["error"],
                "matchField": ["exact:vm_name=db-1"],
            }
        ]
    )
    assert should_notify(any_, failed) and should_notify(any_, ok)
    inverted = ntfy(matchers=[{"name": "i", "matchSeverity": ["error"], "invertMatch": True}])
    assert not should_notify(inverted, failed) and should_notify(inverted, ok)


def test_anomalies_are_notifications_matchers_can_pick() -> None:
    def anomaly(severity: str, kind: str) -> Event:
        payload = {
            "id": "a1", "type": kind, "severity": severity, "title": "Backup small",
            "description": "45% of usual", "vmName": "web-1", "serverId": "local",
        }  # fmt: skip
        return Event(type="anomaly.raised", payload=payload, id="e", time="t", source="test")

    critical = derive.notification(anomaly("critical", "restore_failure"))
    small = derive.notification(anomaly("warning", "size_anomaly"))
    assert critical is not None and small is not None
    assert (critical.severity, small.severity) == ("error", "warning")
    assert small.fields["type"] == "size_anomaly" and small.fields["vm_name"] == "web-1"
    assert small.message == "45% of usual"
    # Without matchers only errors go out; a matcher can take size anomalies.
    assert should_notify(ntfy(), critical) and not should_notify(ntfy(), small)
    sizes = ntfy(matchers=[{"name": "s", "matchField": ["exact:type=size_anomaly"]}])
    assert should_notify(sizes, small) and not should_notify(sizes, critical)


@pytest.mark.parametrize(
    ("matcher", "needle"),
    [
        ({"name": "m", "matchField": ["exact:colour=red"]}, "unknown field 'colour'"),
        ({"name": "m", "matchField": ["regex:vm_name=(("]}, "invalid regex"),
        ({"name": "m", "matchField": ["glob:vm_name=x"]}, "matchField"),
        ({"name": "m", "matchSeverity": ["fatal"]}, "matchSeverity"),
    ],
)
def test_bad_matchers_are_named(matcher: dict[str, Any], needle: str) -> None:
    with pytest.raises((ConfigError, msgspec.ValidationError)) as info:
        decode_config({"ntfy": {"topic": "t", "matchers": [matcher]}})
    assert needle in str(info.value)
    with pytest.raises(ConfigError, match="duplicate matcher"):
        decode_config({"ntfy": {"matchers": [{"name": "a"}, {"name": "a"}]}})


def test_signature_and_masking() -> None:
    hook = Webhook(
        id="h",
        url="http://x/",
        events=["job.failed"],
        secret="k",
        headers={"Authorization": "Bearer t", "X-Api-Key": "v", "X-Team": "ops"},
    )
    body = b'{"event":"job.failed"}'
    headers = request_headers(hook, "job.failed", "d1", body)
    expected = hmac.new(b"k", body, hashlib.sha256).hexdigest()
    assert headers["X-VirtBackup-Signature"] == signature("k", body) == f"sha256={expected}"
    assert headers["X-VirtBackup-Delivery"] == "d1" and headers["Authorization"] == "Bearer t"
    view = webhook_view(hook, None)
    assert view.headers == {
        "Authorization": "********",
        "X-Api-Key": "********",
        "X-Team": "********",
    }
    assert b'"k"' not in msgspec.json.encode(view) and view.has_secret
    assert delivery_id("h", "job.failed", "j1") == delivery_id("h", "job.failed", "j1")
    assert delivery_id("h", "job.failed", "j1") != delivery_id("h2", "job.failed", "j1")


@pytest.mark.parametrize(
    ("state", "event", "severity", "title", "message", "tags"),
    [
        ("success", "job.completed", "info", "backup of web-1 completed", "completed",
         ["white_check_mark"]),
        ("failure", "job.failed", "error", "backup of web-1 failed", "the job failed",
         ["rotating_light"]),
        ("canceled", "job.canceled", "warning", "backup of web-1 cancelled", "cancelled",
         ["warning"]),
    ],
)  # fmt: skip
def test_a_jobs_end_is_one_notification_per_state(
    state: str, event: str, severity: str, title: str, message: str, tags: list[str]
) -> None:
    found = derive.notification(
        job_event("job.finished", state=state, vmName="web-1", serverId="s1", destinationId="d")
    )
    assert found is not None
    assert (found.severity, found.title, found.message, found.tags) == (
        severity, f"VirtBackup: {title}", message, tags,
    )  # fmt: skip
    assert found.fields == {
        "event": event, "type": "backup", "server_id": "s1", "vm_name": "web-1",
        "destination_id": "d", "schedule": "",
    }  # fmt: skip
    said = derive.notification(job_event("job.finished", state=state, message="why"))
    assert (
        said is not None
        and said.message == "why"
        and said.title.endswith(" job j1 " + title.split()[-1])
    )
    assert derive.notification(job_event("job.finished", state="running")) is None
