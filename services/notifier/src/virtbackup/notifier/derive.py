"""From bus events to webhook events and notifications.

The HyperSDK document's webhook events are derived from the job-orchestrator's job events
and the schedule events, without renaming either:

==========================  ==============================================================
webhook event               source event
==========================  ==============================================================
``job.submitted``           ``job.created``
``job.started``             ``job.updated`` entering phase ``preparing`` (once per job)
``job.progress``            ``job.updated`` of a running job past ``preparing``; at most
                            one per job every :data:`PROGRESS_INTERVAL` seconds
``job.completed``           ``job.finished`` with state ``success``
``job.failed``              ``job.finished`` with state ``failure``
``schedule.triggered``      ``schedule.triggered``
``schedule.completed``      ``schedule.completed``
``schedule.failed``         ``schedule.failed``
==========================  ==============================================================

Notifications (ntfy) come from ``job.finished`` (``error`` for a failure, ``warning`` for
a cancel, ``info`` for a success), the schedule events (``error`` for a failed run) and
``anomaly.raised`` (severity ``critical`` is ``error``, ``warning`` and ``info`` as they
are; field ``type`` is the anomaly's: ``size_anomaly``, ``schema_drift``,
``restore_failure``).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import msgspec

from virtbackup.contracts.subjects import EventType
from virtbackup.contracts.v1.events import Event
from virtbackup.contracts.v1.hypersdk_jobs import job_view
from virtbackup.contracts.v1.jobs import Job
from virtbackup.contracts.v1.webhooks import Notification

#: Seconds between two ``job.progress`` deliveries of one job (to every webhook).
PROGRESS_INTERVAL: Final = 5.0
#: ``job.progress`` events older than this (seconds) when the notifier reads them (after
#: a long outage) are not delivered: they describe a past state.
PROGRESS_MAX_AGE: Final = 60.0

SCHEDULE_EVENTS: Final = ("schedule.triggered", "schedule.completed", "schedule.failed")


@dataclass(frozen=True)
class JobEnd:
    """What a job's final state becomes: its event name (the webhook event where
    ``webhook``, and the notification's ``event`` field), the notification's severity,
    the verb of its title, its message when the job has none, and its tags."""

    event: str
    severity: Literal["info", "warning", "error"]
    verb: str
    default_message: str
    tags: tuple[str, ...]
    #: The HyperSDK document has a webhook event for it (none for a cancel).
    webhook: bool


#: A ``job.finished`` event by the job's ``state``: the one mapping both webhooks and
#: notifications use.
JOB_ENDS: Final[dict[str, JobEnd]] = {
    "success": JobEnd(
        "job.completed", "info", "completed", "completed", ("white_check_mark",), webhook=True
    ),
    "failure": JobEnd(
        "job.failed", "error", "failed", "the job failed", ("rotating_light",), webhook=True
    ),
    "canceled": JobEnd(
        "job.canceled", "warning", "cancelled", "cancelled", ("warning",), webhook=False
    ),
}


@dataclass(frozen=True)
class Derived:
    """One webhook event: its name, the ``data`` of its body, and ``key``: what makes it
    unique (the job id for once-per-job events, the source event id otherwise), from
    which each webhook's delivery id is made."""

    name: str
    data: dict[str, Any]
    key: str


def job_data(payload: dict[str, Any]) -> dict[str, Any] | None:
    """``data`` of a ``job.*`` webhook: ``{"job": <view>}``, the job exactly as ``GET
    /jobs/{id}`` of the HyperSDK API shows it (``contracts.v1.hypersdk_jobs.job_view``),
    from a job event's payload (a ``contracts.v1.jobs.Job``); ``None`` for a payload
    that is no job."""
    try:
        job = msgspec.convert(payload, Job)
    except msgspec.ValidationError:
        return None
    return {"job": job_view(job)}


@dataclass
class Deriver:
    """Turns events into webhook events; remembers (in memory, bounded) which jobs have
    started and when each job's progress was last sent."""

    started: OrderedDict[str, None] = field(default_factory=OrderedDict)
    progress_sent: OrderedDict[str, float] = field(default_factory=OrderedDict)
    remember: int = 10_000

    def _mark(self, memory: OrderedDict[str, Any], key: str, value: Any) -> None:
        memory[key] = value
        memory.move_to_end(key)
        while len(memory) > self.remember:
            memory.popitem(last=False)

    def webhook_events(self, event: Event, *, age: float = 0.0) -> list[Derived]:
        """The webhook events ``event`` stands for (usually none or one). ``age``: seconds
        since the event was stored."""
        payload = event.payload
        if event.type in SCHEDULE_EVENTS:
            return [Derived(event.type, dict(payload), event.id)]
        job_id = str(payload.get("id", ""))
        if not job_id:
            return []
        data = job_data(payload)
        if data is None:
            return []
        if event.type == EventType.JOB_CREATED:
            return [Derived("job.submitted", data, job_id)]
        if event.type == EventType.JOB_FINISHED:
            self.progress_sent.pop(job_id, None)
            end = JOB_ENDS.get(str(payload.get("state")))
            return [Derived(end.event, data, job_id)] if end and end.webhook else []
        if event.type != EventType.JOB_UPDATED or payload.get("state") != "running":
            return []
        if payload.get("phase") == "preparing":
            if job_id in self.started:
                return []
            self._mark(self.started, job_id, None)
            return [Derived("job.started", data, job_id)]
        if age > PROGRESS_MAX_AGE:
            return []
        now = time.monotonic()
        last = self.progress_sent.get(job_id)
        if last is not None and now - last < PROGRESS_INTERVAL:
            return []
        self._mark(self.progress_sent, job_id, now)
        return [Derived("job.progress", data, event.id)]


_ANOMALY_SEVERITY: Final[dict[str, Literal["info", "warning", "error"]]] = {
    "info": "info",
    "warning": "warning",
    "critical": "error",
}


def notification(event: Event) -> Notification | None:
    """The notification ``event`` stands for, if any (matchers then decide if it is
    sent): a job's end, a schedule run's trigger, end or failure, or an anomaly."""
    payload = event.payload
    if event.type == EventType.ANOMALY_RAISED:
        vm = str(payload.get("vmName") or "")
        return Notification(
            severity=_ANOMALY_SEVERITY.get(str(payload.get("severity")), "warning"),
            fields={
                "event": event.type,
                "type": str(payload.get("type") or ""),
                "server_id": str(payload.get("serverId") or ""),
                "vm_name": vm,
                "destination_id": str(payload.get("destinationId") or ""),
                "schedule": "",
            },
            title=f"VirtBackup: {payload.get('title') or 'anomaly'}",
            message=str(payload.get("description") or payload.get("title") or ""),
            tags=["warning"],
        )
    if event.type == EventType.JOB_FINISHED:
        end = JOB_ENDS.get(str(payload.get("state")))
        if end is None:
            return None
        job_type = str(payload.get("type", "job"))
        vm = payload.get("vmName") or ""
        what = f"{job_type} of {vm}" if vm else f"{job_type} job {payload.get('id', '')}"
        return Notification(
            severity=end.severity,
            fields={
                "event": end.event,
                "type": job_type,
                "server_id": str(payload.get("serverId") or ""),
                "vm_name": str(vm),
                "destination_id": str(payload.get("destinationId") or ""),
                "schedule": "",
            },
            title=f"VirtBackup: {what} {end.verb}",
            message=str(payload.get("message") or "") or end.default_message,
            tags=list(end.tags),
        )
    if event.type in SCHEDULE_EVENTS:
        name = str(payload.get("name") or payload.get("schedule_id") or "")
        verb = event.type.split(".", 1)[1]
        fields = {
            "event": event.type,
            "type": "schedule",
            "server_id": "",
            "vm_name": "",
            "destination_id": "",
            "schedule": name,
        }
        message = str(payload.get("message") or "")
        jobs = payload.get("job_ids") or []
        if not message:
            message = f"jobs: {', '.join(map(str, jobs))}" if jobs else verb
        return Notification(
            severity="error" if event.type == "schedule.failed" else "info",
            fields=fields,
            title=f"VirtBackup: schedule {name} {verb}",
            message=message,
            tags=["rotating_light"] if event.type == "schedule.failed" else [],
        )
    return None
