"""The HyperSDK listener's ``/schedules`` bodies (snake_case) and the admin API's
``/api/v1/task/schedulers`` bodies (camelCase) are one declaration of a schedule's
fields: the same fields, each API's key style, unknown keys refused by both."""

from __future__ import annotations

import msgspec
import pytest

from virtbackup.gateway.bodies import decode_body
from virtbackup.gateway.controllers.task_schedulers import TaskBody, TaskChange
from virtbackup.gateway.hypersdk_jobs import ScheduleBody, ScheduleChange
from virtbackup.runtime.errors import BadRequest


def wire_names(kind: type[msgspec.Struct]) -> set[str]:
    return set(kind.__struct_encode_fields__)


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


@pytest.mark.parametrize(
    ("snake", "camel_kind"), [(ScheduleBody, TaskBody), (ScheduleChange, TaskChange)]
)
def test_both_apis_take_the_same_fields_in_their_own_style(
    snake: type[msgspec.Struct], camel_kind: type[msgspec.Struct]
) -> None:
    assert snake.__struct_fields__ == camel_kind.__struct_fields__
    assert wire_names(snake) == set(snake.__struct_fields__)
    assert wire_names(camel_kind) == {camel(n) for n in snake.__struct_fields__}
    assert "jobTemplate" in wire_names(camel_kind) and "job_template" in wire_names(snake)


def test_each_body_becomes_the_same_create_request() -> None:
    hyper = decode_body(
        b'{"id": "n1", "schedule": "0 2 * * *", "timezone": "Europe/Paris",'
        b' "job_template": {"vm_path": "local/web-*", "source": {"type": "libvirt"},'
        b' "destination": {"type": "backup", "destination_id": "fs"}}}',
        ScheduleBody,
    )
    task = decode_body(
        b'{"id": "n1", "schedule": "0 2 * * *", "timezone": "Europe/Paris",'
        b' "jobTemplate": {"vmPath": "local/web-*", "source": {"type": "libvirt"},'
        b' "destination": {"type": "backup", "destinationId": "fs"}}}',
        TaskBody,
    )
    made = hyper.create_request(hyper.job_template.definition())
    assert made == task.create_request(task.job_template.definition())
    assert made.timezone == "Europe/Paris" and made.enabled is True
    with pytest.raises(BadRequest, match="job_template"):
        decode_body(b'{"schedule": "0 2 * * *", "job_template": {"vmPath": "a/b"}}', TaskBody)
    change = decode_body(b'{"enabled": false}', TaskChange).update_request("n1", None)
    assert change.enabled is False and change.schedule is None and change.id == "n1"
