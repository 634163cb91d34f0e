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
    check_interval,
    latest_at_or_before,
    next_after,
    zone,
)
from virtbackup.runtime.errors import BadRequest


@pytest.mark.parametrize(
    "expr", ["0 2 * * *", "*/15 * * * *", "0 0 * * 0", "0 0 * * 7", "* * * * * */5", "@daily"]
)
def test_cron_expressions_accepted(expr: str) -> None:
    check_cron(expr)


@pytest.mark.parametrize(
    ("expr", "needle"),
    [
        ("61 * * * *", "its minute field '61' is not valid: expected 0-59"),
        ("* * *", "has 3 fields"),
        ("0 2 * * * * 2030", "has 7 fields"),
        ("", "has 0 fields"),
        ("a b c d e", "its minute field 'a' is not valid"),
        ("0 25 * * *", "its hour field '25' is not valid: expected 0-23"),
        ("0 0 1 13 *", "its month field '13' is not valid: expected 1-12 or jan-dec"),
        ("0 0 * * 9", "its day of week field '9' is not valid"),
        ("* * * * * 61", "its second field '61' is not valid"),
        ("@sometimes", "no known macro: use @yearly"),
        ("0 0 30 2 *", "never matches a date"),
        ("0 0 31 4 *", "never matches a date"),
        ("0 2 * * *\n", "leading or trailing whitespace"),
        (" 0 2 * * *", "leading or trailing whitespace"),
        ("0\t2 * * *", "a tab or line break"),
        ("0 0 * * 8", r"expected 0-7 \(0 and 7 are Sunday\)"),
    ],
)
def test_bad_cron_expressions_name_the_field(expr: str, needle: str) -> None:
    with pytest.raises(BadRequest, match=needle) as caught:
        check_cron(expr)
    message = str(caught.value)
    assert message.startswith("schedule:")
    # Plain words, not croniter's ("[61 * * * *] is not acceptable, out of range").
    assert "acceptable" not in message and "[" not in message, message


@pytest.mark.parametrize(
    ("expr", "minimum", "refused"),
    [
        ("*/15 * * * *", 300, False),
        ("0 2 * * *", 300, False),
        ("*/5 * * * *", 300, False),
        ("* * * * *", 300, True),
        ("*/2 * * * *", 300, True),
        ("0,1 2 * * *", 300, True),  # two runs a minute apart once a day
        ("59 23 * * *", 300, False),
        ("0,59 0,23 * * *", 300, True),  # 23:59 then 00:00 the next day
        ("* * * * * */30", 300, True),
        ("* * * * * */30", 0, False),  # 0 allows any interval
        ("* * * * *", 60, False),
    ],
)
def test_schedules_firing_more_often_than_the_minimum_are_refused(
    expr: str, minimum: float, refused: bool
) -> None:
    start = datetime(2026, 1, 10, 12, 0, tzinfo=UTC)
    if not refused:
        check_interval(expr, "UTC", minimum, start)
        # Across both DST changes of a year (the autumn night has 02:00 twice, an hour
        # apart in real time): still allowed.
        check_interval(expr, "Europe/Berlin", minimum, start)
        return
    with pytest.raises(BadRequest, match=r"^schedule: .* apart .*at least") as caught:
        check_interval(expr, "Europe/Berlin", minimum, start)
    assert "VIRTBACKUP_SCHEDULE_MIN_INTERVAL" in str(caught.value)


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
    with pytest.raises(BadRequest, match=r"source\.type is required"):
        check_source({})
    with pytest.raises(BadRequest, match=r"source\.password"):
        check_source({"type": "libvirt", "password": "x"})
    assert check_destination({"type": "backup", "destination_id": "fs"}) == "fs"
    assert check_destination({}) is None
    with pytest.raises(BadRequest, match="not as a schedule"):
        check_destination({"type": "kvm", "libvirt_uri": "qemu+ssh://h/system"})
    assert check_options({}, debug=False) is False
    with pytest.raises(BadRequest, match=r"options\.conversion_method"):
        check_options({"conversion_method": "vddk"}, debug=False)
    # fresh: honoured in debug mode, refused (never silently ignored) otherwise.
    assert check_options({"fresh": True}, debug=True) is True
    assert check_options({"fresh": False}, debug=False) is False
    with pytest.raises(BadRequest, match=r"options\.fresh: true is honoured in debug mode"):
        check_options({"fresh": True}, debug=False)


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


@pytest.mark.parametrize("name", ["UTC", "Europe/Berlin", "America/Argentina/Buenos_Aires"])
def test_canonical_time_zones_are_accepted(name: str) -> None:
    assert zone(name).key == name


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("utc", "did you mean 'UTC'"),
        ("europe/berlin", "did you mean 'Europe/Berlin'"),
        ("localtime", ""),
        ("posixrules", ""),
        ("Factory", ""),
        ("right/UTC", ""),
        ("posix/UTC", ""),
        ("../etc/passwd", ""),
        ("Mars/Olympus", ""),
    ],
)
def test_only_canonical_time_zone_names_are_accepted(name: str, hint: str) -> None:
    with pytest.raises(BadRequest, match=r"timezone: .* is not an IANA time zone name") as caught:
        zone(name)
    assert hint in str(caught.value)
