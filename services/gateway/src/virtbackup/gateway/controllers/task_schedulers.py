"""Scheduled tasks (agents-backend-api.md's ``/api/v1/task/schedulers``).

The very schedules of the HyperSDK listener's ``/schedules`` (``VB_SCHEDULES``, kept and
run by the job-orchestrator through ``ScheduleCmd``; ``hypersdk_jobs``), in this
document's shape: camelCase, errors ``{"detail": ..., "code": ...}``. A schedule made
here shows there and the other way round.

* ``GET``: ``{"items": [schedule...], "total"}``.
* ``POST``: create (201, the schedule): ``name``, ``description``, ``schedule`` (a cron
  expression: 5 fields, 6 with seconds last, or ``@daily`` and the like), ``timezone``
  (IANA, default UTC), ``enabled`` (default true), ``jobTemplate``
  (``{"vmPath": "<server>/<vm glob>", "source": {"type": "libvirt", "serverId"},
  "destination": {"type": "backup", "destinationId"}, "options": {"fresh"}}``) and an
  optional ``id`` (made when left out; 409 when taken).
* ``PUT /{id}``: the fields given replace the schedule's (checked as on create).
* ``DELETE /{id}``: deletes it (jobs it started go on).
* ``POST /{id}/run``: runs it now (409 while disabled): ``{"jobIds", "skipped",
  "message"}``; ``skipped`` when its previous run is still going.

Bad input is a 400 naming the field as written here (``jobTemplate.vmPath``); an
unknown schedule a 404.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
from litestar import Controller, delete, get, post, put

from virtbackup.contracts.subjects import ScheduleCmd
from virtbackup.contracts.v1.common import Empty
from virtbackup.contracts.v1.schedules import (
    JobDefinition,
    Schedule,
    ScheduleRef,
    ScheduleRun,
)
from virtbackup.gateway.bodies import Body, NoBody
from virtbackup.gateway.errors import responses
from virtbackup.gateway.job_listing import all_schedules
from virtbackup.gateway.schedule_bodies import ScheduleFieldChanges, ScheduleFields
from virtbackup.gateway.state import Gateway
from virtbackup.runtime import timeouts
from virtbackup.runtime.errors import BadRequest


class TaskSource(Body, kw_only=True):
    type: str = "libvirt"
    server_id: str | None = None


class TaskDestination(Body, kw_only=True):
    type: str = "backup"
    destination_id: str | None = None


class TaskOptions(Body, kw_only=True):
    fresh: bool = False


class TaskTemplate(Body, kw_only=True):
    """What each run submits (the HyperSDK API's ``job_template``)."""

    vm_path: str
    source: TaskSource | None = None
    destination: TaskDestination | None = None
    options: TaskOptions | None = None

    def definition(self) -> JobDefinition:
        def snake(part: Body | None) -> dict[str, Any]:
            if part is None:
                return {}
            return {
                name: value
                for name in part.__struct_fields__
                if (value := getattr(part, name)) is not None
            }

        return JobDefinition(
            vm_path=self.vm_path,
            source=snake(self.source),
            destination=snake(self.destination),
            options=snake(self.options),
        )


class TaskBody(ScheduleFields, kw_only=True, rename="camel"):
    """``POST`` (camelCase: ``jobTemplate``)."""

    job_template: TaskTemplate


class TaskChange(ScheduleFieldChanges, kw_only=True, rename="camel"):
    """``PUT /{id}`` (camelCase)."""

    job_template: TaskTemplate | None = None


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _camel_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {_camel(str(k)): _camel_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_camel_keys(v) for v in value]
    return value


def task_view(schedule: Schedule) -> dict[str, Any]:
    """A schedule in this document's shape (camelCase keys, the template's too)."""
    out = _camel_keys(msgspec.to_builtins(schedule))
    assert isinstance(out, dict)
    return out


#: The orchestrator names fields as the HyperSDK API writes them: said here as written
#: here (``job_template.vm_path`` -> ``jobTemplate.vmPath``).
_SNAKE_FIELD = re.compile(r"\b(job_template|vm_path|server_id|destination_id)\b")


def _here(exc: BadRequest) -> BadRequest:
    return BadRequest(_SNAKE_FIELD.sub(lambda m: _camel(m.group(1)), exc.message))


class TaskSchedulersController(Controller):
    path = "/api/v1/task/schedulers"

    async def _send(self, gw: Gateway, subject: str, request: msgspec.Struct) -> Any:
        kind: type[Any] = ScheduleRun if subject == ScheduleCmd.TRIGGER else Schedule
        try:
            return await gw.bus.request(subject, request, kind, timeout=timeouts.JOB_COMMAND)
        except BadRequest as exc:
            raise _here(exc) from None

    @get()
    async def list_tasks(self, gw: Gateway) -> dict[str, Any]:
        """Every schedule: ``{"items", "total"}``."""
        listed = await all_schedules(gw)
        return {"items": [task_view(s) for s in listed], "total": len(listed)}

    @post(status_code=201, responses=responses(404, 409))
    async def create_task(self, gw: Gateway, data: TaskBody) -> dict[str, Any]:
        """Create a schedule (checked first: nothing is made on a 400 or 404)."""
        request = data.create_request(data.job_template.definition())
        return task_view(await self._send(gw, ScheduleCmd.CREATE, request))

    @put("/{schedule_id:str}", responses=responses(404, 409))
    async def update_task(self, gw: Gateway, schedule_id: str, data: TaskChange) -> dict[str, Any]:
        """Change the fields given (checked as on create)."""
        template = data.job_template.definition() if data.job_template else None
        request = data.update_request(schedule_id, template)
        return task_view(await self._send(gw, ScheduleCmd.UPDATE, request))

    @delete("/{schedule_id:str}", status_code=200, responses=responses(404))
    async def delete_task(self, gw: Gateway, schedule_id: str) -> dict[str, Any]:
        """Delete a schedule (jobs it started go on)."""
        await gw.bus.request(ScheduleCmd.DELETE, ScheduleRef(id=schedule_id), Empty)
        return {"id": schedule_id, "deleted": True}

    @post("/{schedule_id:str}/run", status_code=200, responses=responses(404, 409))
    async def run_task(
        self, gw: Gateway, schedule_id: str, data: NoBody | None = None
    ) -> dict[str, Any]:
        """Run the schedule now: ``{"jobIds", "skipped", "message"}``."""
        run: ScheduleRun = await self._send(gw, ScheduleCmd.TRIGGER, ScheduleRef(id=schedule_id))
        message = run.message if run.skipped else "schedule run started"
        return {"jobIds": run.job_ids, "skipped": run.skipped, "message": message}
