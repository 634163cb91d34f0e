"""Cron expressions, time zones and job definitions as the scheduler reads them (no
server needed: these are pure functions)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from virtbackup.job_orchestrator.definitions import (
    check_destination,
    check_options,
    check_source,
    split_path,
)
from virtbackup.job_orchestrator.schedules import (
    check_cron,
    latest_at_or_before,
    next_after,
    zone,
)
from virtbackup.runtime.errors import BadRequest


@pytest.mark.parametrize(
    "expr", ["0 2 * * *", "*/15 * * * *", "0 0 * * 0", "* * * * * */5", "@daily"]
)
def test_cron_expressions_accepted(expr: str) -> None:
    check_cron(expr)


@pytest.mark.parametrize(
    ("expr", "needle"),
    [
        ("61 * * * *", "not a valid cron expression"),
        ("* * *", "has 3 fields"),
        ("0 2 * * * * 2030", "has 7 fields"),
        ("", "has 0 fields"),
        ("a b c d e", "not a valid cron expression"),
        ("0 0 30 2 *", "never matches a date"),
        ("0 0 31 4 *", "never matches a date"),
    ],
)
def test_bad_cron_expressions_name_the_field(expr: str, needle: str) -> None:
    with pytest.raises(BadRequest, match=needle) as caught:
        check_cron(expr)
    assert str(caught.value).startswith("schedule:")


def test_unknown_time_zone_is_a_bad_request() -> None:
    with pytest.raises(BadRequest, match="timezone"):
        zone("Mars/Olympus")
    with pytest.raises(BadRequest, match="timezone"):
        zone("../etc/passwd")
    assert zone("Europe/Berlin").key == "Europe/Berlin"


def test_times_are_read_in_the_schedule_time_zone_across_dst() -> None:
    winter = datetime(2026, 1, 10, 12, 0, tzinfo=UTC)
    summer = datetime(2026, 7, 10, 12, 0, tzinfo=UTC)
    assert next_after("0 2 * * *", "Europe/Berlin", winter) == datetime(2026, 1, 11, 1, tzinfo=UTC)
    assert next_after("0 2 * * *", "Europe/Berlin", summer) == datetime(2026, 7, 11, 0, tzinfo=UTC)
    assert next_after("0 2 * * *", "UTC", winter) == datetime(2026, 1, 11, 2, tzinfo=UTC)
    on_time = datetime(2026, 1, 11, 2, 0, tzinfo=UTC)
    assert latest_at_or_before("0 2 * * *", "UTC", on_time) == on_time
    assert next_after("0 2 * * *", "UTC", on_time) == datetime(2026, 1, 12, 2, tzinfo=UTC)


def test_sources_destinations_and_options() -> None:
    assert check_source({"type": "libvirt", "server_id": "kvm2"}) == "kvm2"
    assert check_source({"type": "libvirt"}) is None
    with pytest.raises(BadRequest, match="no vSphere driver"):
        check_source({"type": "vsphere", "vcenter_url": "vc"})
    with pytest.raises(BadRequest, match="no vSphere driver"):
        check_source({"vcenter_url": "vc", "username": "u"})
    with pytest.raises(BadRequest, match=r"source\.type"):
        check_source({"type": "hyperv"})
    with pytest.raises(BadRequest, match=r"source\.password"):
        check_source({"type": "libvirt", "password": "x"})
    assert check_destination({"type": "backup", "destination_id": "fs"}) == "fs"
    assert check_destination({}) is None
    with pytest.raises(BadRequest, match="not built"):
        check_destination({"type": "kvm", "libvirt_uri": "qemu+ssh://h/system"})
    assert check_options({}) is False
    with pytest.raises(BadRequest, match=r"options\.conversion_method"):
        check_options({"conversion_method": "vddk"})


def test_vm_paths() -> None:
    assert split_path("local/web-*", None) == ("local", "web-*")
    assert split_path("*/db*", None) == ("*", "db*")
    assert split_path("web1", "local") == ("local", "web1")
    assert split_path("*/web1", "local") == ("local", "web1")
    with pytest.raises(BadRequest, match=r"is not source\.server_id"):
        split_path("other/web1", "local")
    with pytest.raises(BadRequest, match="vm_path"):
        split_path("web1", None)
    with pytest.raises(BadRequest, match="vm_path is required"):
        split_path("", "local")
    with pytest.raises(BadRequest, match="invalid VM name"):
        split_path("local/a\nb", None)
