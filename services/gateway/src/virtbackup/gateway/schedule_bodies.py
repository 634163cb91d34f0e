"""A schedule's fields as the two APIs that make schedules take them, declared once: the
HyperSDK listener's ``/schedules`` (snake_case, ``hypersdk_jobs``) and the admin API's
``/api/v1/task/schedulers`` (camelCase, ``controllers.task_schedulers``). Each API
subclasses these with its key style and its own ``job_template`` (the HyperSDK
document's free-form ``source``/``destination``/``options`` objects, or the admin API's
typed camelCase template); both become the same ``ScheduleCreate``/``ScheduleUpdate``
for the job-orchestrator, which checks them (cron, time zone, template).
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from virtbackup.contracts.v1.schedules import JobDefinition, ScheduleCreate, ScheduleUpdate
from virtbackup.gateway.bodies import SnakeBody

#: Bounds of a schedule's text fields (a 400 naming the field beyond them): every
#: schedule travels in the one reply of the orchestrator's list (NATS: 1 MiB at most),
#: so a few schedules with a description of a body's size (1 MiB) made ``GET
#: /schedules`` answer 503 for everyone.
ScheduleName = Annotated[str, msgspec.Meta(max_length=200)]
ScheduleDescription = Annotated[str, msgspec.Meta(max_length=2000)]
CronText = Annotated[str, msgspec.Meta(max_length=200)]
ZoneName = Annotated[str, msgspec.Meta(max_length=64)]


class ScheduleFields(SnakeBody, kw_only=True):
    """A new schedule: ``schedule`` a cron expression (5 fields, 6 with seconds last, or
    ``@daily`` and the like), ``timezone`` an IANA name, ``id`` made when empty."""

    id: str = ""
    name: ScheduleName = ""
    description: ScheduleDescription = ""
    schedule: CronText
    timezone: ZoneName = "UTC"
    enabled: bool = True

    def create_request(self, template: JobDefinition) -> ScheduleCreate:
        """The orchestrator's create request, with ``template`` as the job template."""
        return ScheduleCreate(
            id=self.id,
            name=self.name,
            description=self.description,
            schedule=self.schedule,
            timezone=self.timezone,
            enabled=self.enabled,
            job_template=template,
        )


class ScheduleFieldChanges(SnakeBody, kw_only=True):
    """A change of a schedule: only the fields given (not ``None``) replace its own."""

    name: ScheduleName | None = None
    description: ScheduleDescription | None = None
    schedule: CronText | None = None
    timezone: ZoneName | None = None
    enabled: bool | None = None

    def update_request(self, schedule_id: str, template: JobDefinition | None) -> ScheduleUpdate:
        """The orchestrator's update request of ``schedule_id`` (``template`` ``None``:
        the job template stays)."""
        return ScheduleUpdate(
            id=schedule_id,
            name=self.name,
            description=self.description,
            schedule=self.schedule,
            timezone=self.timezone,
            enabled=self.enabled,
            job_template=template,
        )
