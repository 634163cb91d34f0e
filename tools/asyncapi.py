"""Generate the AsyncAPI document of the bus (``docs/asyncapi.json``) from the services'
FastStream brokers: ``python tools/asyncapi.py [-o PATH]`` (``task asyncapi``).

Each service's broker is built as the service builds it, with its command handlers
registered (``ServiceSpec.register`` and the ping every service answers), never
connected. What the services publish outside FastStream's subscribers (events stored in
``VB_EVENTS``, transfer units in ``VB_WORK``) is declared here as publishers of the
service that publishes it, so that the document lists every subject of the bus.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
from pathlib import Path
from typing import Any

from faststream.nats import NatsBroker
from faststream.specification import AsyncAPI
from opentelemetry.sdk.trace import TracerProvider

from virtbackup.contracts import subjects
from virtbackup.contracts.subjects import EventType
from virtbackup.runtime import __version__
from virtbackup.runtime.broker import make_broker
from virtbackup.runtime.bus import Bus
from virtbackup.runtime.service import ServiceContext, ServiceSpec, register_ping
from virtbackup.runtime.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "docs" / "asyncapi.json"

#: The module holding each service's ``SPEC``.
SPECS = {
    subjects.GATEWAY: "virtbackup.gateway.server",
    subjects.INVENTORY: "virtbackup.inventory.service",
    subjects.JOB_ORCHESTRATOR: "virtbackup.job_orchestrator.service",
    subjects.TRANSFER_WORKER: "virtbackup.transfer_worker.service",
    subjects.NOTIFIER: "virtbackup.notifier.service",
}

#: Schedule events (published by the job-orchestrator's scheduler).
SCHEDULE_EVENTS = ("schedule.triggered", "schedule.completed", "schedule.failed")

#: Events each service stores in ``VB_EVENTS`` (subject ``vb.evt.<type>.<key>``).
ANOMALY_EVENTS = (
    (EventType.ANOMALY_RAISED, "An anomaly was recorded; payload: Anomaly; key: its id."),
    (EventType.VM_DEFINITION_DRIFT, "A VM's definition changed since its last backup; "
     "payload: the schema_drift Anomaly (changes); key: its id."),
)  # fmt: skip
EVENTS: dict[str, tuple[tuple[str, str], ...]] = {
    subjects.GATEWAY: ((EventType.CONFIG_CHANGED, "The configuration changed."), *ANOMALY_EVENTS),
    subjects.INVENTORY: ((EventType.VM_LIFECYCLE, "A libvirt domain event; key: server id."),),
    subjects.JOB_ORCHESTRATOR: (
        (EventType.JOB_CREATED, "A job was created; payload: the Job; key: job id."),
        (EventType.JOB_UPDATED, "A job's state or progress changed; payload: the Job."),
        (EventType.JOB_FINISHED, "A job reached its final state; payload: the Job."),
        (EventType.JOB_CANCELED, "A job was cancelled; payload: the Job."),
        (EventType.JOB_FAILURE, "A job failed; payload: JobFailure."),
        *(
            (event, "A schedule run: {schedule_id, name, job_ids, skipped, message}.")
            for event in SCHEDULE_EVENTS
        ),
        *ANOMALY_EVENTS,
    ),
    subjects.TRANSFER_WORKER: (
        (EventType.UNIT_DONE, "A transfer unit ended; payload: UnitResult."),
    ),
    subjects.NOTIFIER: (
        (EventType.NOTIFY_GAVE_UP, "A webhook delivery or notification was given up."),
    ),
}


def _declare_publishers(service: str, broker: NatsBroker) -> None:
    for event_type, description in EVENTS.get(service, ()):
        subject = f"{subjects.event(event_type)}.{{key}}"
        broker.publisher(
            subject,
            title=f"{subject}:{service}",
            description=f"Event envelope {{type: {event_type!r}, payload, id, time, source}} "
            f"stored in VB_EVENTS. {description}",
        )
    if service == subjects.GATEWAY:
        broker.publisher(
            subjects.AUDIT_OPERA,
            title=f"{subjects.AUDIT_OPERA}:{service}",
            description="An OperaRecord (one mutating API request: actor, route, target, "
            "status, request id) stored in VB_AUDIT.",
        )
    if service == subjects.JOB_ORCHESTRATOR:
        subject = f"{subjects.WORK_TRANSFER}.{{job_id}}"
        broker.publisher(
            subject,
            title=f"{subject}:{service}",
            description="A TransferUnit in the VB_WORK work queue, pulled by the transfer "
            "workers' durable consumer.",
        )


async def _broker_of(service: str, settings: Settings) -> NatsBroker:
    spec: ServiceSpec = importlib.import_module(SPECS[service]).SPEC
    broker = make_broker(settings, service, TracerProvider())
    ctx = ServiceContext(
        name=service, settings=settings, bus=Bus(broker, service), tracer_provider=TracerProvider()
    )
    register_ping(ctx)
    if spec.register:
        await spec.register(ctx)
    _declare_publishers(service, broker)
    return broker


async def build() -> dict[str, Any]:
    """The AsyncAPI 3.0 document of every service's broker."""
    settings = Settings(nats_url="nats://nats:4222", instance="asyncapi")
    brokers = [await _broker_of(service, settings) for service in SPECS]
    spec = AsyncAPI(
        *brokers,
        title="VirtBackup bus",
        version=__version__,
        description="Commands (request/reply on vb.cmd.<aggregate>.<verb>), events "
        "(vb.evt.<aggregate>.<event>.<key> in the VB_EVENTS stream) and transfer units "
        "(vb.work.transfer.<job id> in VB_WORK).",
        schema_version="3.0.0",
    )
    document: dict[str, Any] = json.loads(spec.to_specification().to_json())
    return document


def render(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    args.output.write_text(render(asyncio.run(build())))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
