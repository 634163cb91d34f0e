"""The prune selection against known timestamp sets, with the outcomes of Proxmox Backup
Server's prune rules (the sets and expected outcomes of its ``tests/prune.rs``, plus
protected points, ISO weeks around New Year and rules that keep nothing)."""

from __future__ import annotations

import pytest

from virtbackup.contracts.v1.retention import KeepRules as Keep
from virtbackup.repository.retention import Candidate, parse_timestamp, select

HOURLY = [
    "2019-11-15T09-39-15",
    "2019-11-15T10-49-15",
    "2019-11-15T10-59-15",
    "2019-11-15T11-39-15",
    "2019-11-15T11-49-15",
    "2019-11-15T11-59-15",
]
SIMPLE2 = [
    "2018-11-15T11-59-15",
    "2019-11-15T11-59-15",
    "2019-11-21T11-59-15",
    "2019-11-22T11-59-15",
    "2019-11-29T11-59-15",
    "2019-12-01T11-59-15",
    "2019-12-02T11-59-15",
    "2019-12-03T11-59-15",
    "2019-12-04T11-59-15",
]
SIMPLE = [
    "2019-12-02T11-59-15",
    "2019-12-03T11-59-15",
    "2019-12-04T11-59-15",
    "2019-12-04T12-59-15",
]
#: Around New Year: 2024-12-30 and 2025-01-02 are in ISO week 2025/01, 2024-12-29 in 2024/52.
NEW_YEAR = [
    "2024-12-28T10-00-00",
    "2024-12-29T10-00-00",
    "2024-12-30T10-00-00",
    "2025-01-02T10-00-00",
]

# (points, keep rules, the points kept)
CASES: list[tuple[list[str], Keep, set[str]]] = [
    # PBS test_prune_hourly
    (
        HOURLY,
        Keep(keep_hourly=3),
        {"2019-11-15T09-39-15", "2019-11-15T10-59-15", "2019-11-15T11-59-15"},
    ),
    (HOURLY, Keep(keep_hourly=2), {"2019-11-15T10-59-15", "2019-11-15T11-59-15"}),
    # PBS test_prune_simple2
    (SIMPLE2, Keep(keep_daily=1), {"2019-12-04T11-59-15"}),
    (SIMPLE2, Keep(keep_last=1, keep_daily=1), {"2019-12-03T11-59-15", "2019-12-04T11-59-15"}),
    (SIMPLE2, Keep(keep_daily=1, keep_weekly=1), {"2019-12-01T11-59-15", "2019-12-04T11-59-15"}),
    (
        SIMPLE2,
        Keep(keep_daily=1, keep_weekly=1, keep_monthly=1),
        {"2019-11-22T11-59-15", "2019-12-01T11-59-15", "2019-12-04T11-59-15"},
    ),
    (SIMPLE2, Keep(keep_monthly=1, keep_yearly=1), {"2018-11-15T11-59-15", "2019-12-04T11-59-15"}),
    # PBS test_prune_simple
    (SIMPLE, Keep(keep_last=4), set(SIMPLE)),
    (SIMPLE, Keep(keep_last=3), set(SIMPLE[1:])),
    (SIMPLE, Keep(keep_last=2), set(SIMPLE[2:])),
    (SIMPLE, Keep(keep_last=1), {"2019-12-04T12-59-15"}),
    (SIMPLE, Keep(keep_last=0), set()),
    (SIMPLE, Keep(keep_last=2, keep_daily=2), set(SIMPLE)),
    (SIMPLE, Keep(keep_daily=3), set(SIMPLE) - {"2019-12-04T11-59-15"}),
    (SIMPLE, Keep(keep_daily=2), {"2019-12-03T11-59-15", "2019-12-04T12-59-15"}),
    (SIMPLE, Keep(keep_weekly=5), {"2019-12-04T12-59-15"}),
    (SIMPLE, Keep(keep_daily=1, keep_weekly=5), {"2019-12-04T12-59-15"}),
    (SIMPLE, Keep(keep_monthly=6), {"2019-12-04T12-59-15"}),
    (SIMPLE, Keep(keep_yearly=7), {"2019-12-04T12-59-15"}),
    (SIMPLE, Keep(keep_weekly=5, keep_monthly=6, keep_yearly=7), {"2019-12-04T12-59-15"}),
    # ISO weeks: 2025-01-02 and 2024-12-30 share week 2025/01; 2024-12-29 and -28 week 2024/52.
    (NEW_YEAR, Keep(keep_weekly=2), {"2025-01-02T10-00-00", "2024-12-29T10-00-00"}),
    # The calendar year is not the ISO year: keepYearly buckets by the calendar.
    (NEW_YEAR, Keep(keep_yearly=2), {"2025-01-02T10-00-00", "2024-12-30T10-00-00"}),
    # No rule at all: nothing is kept (callers refuse such a policy unless acknowledged).
    (SIMPLE, Keep(), set()),
]


@pytest.mark.parametrize(("points", "keep", "kept"), CASES)
def test_selection_keeps_what_pbs_keeps(points: list[str], keep: Keep, kept: set[str]) -> None:
    decisions = select([Candidate(key=ts, timestamp=ts) for ts in points], keep)
    assert {d.candidate.key for d in decisions if d.keep} == kept
    assert [d.candidate.timestamp for d in decisions] == sorted(points, reverse=True)
    for d in decisions:
        assert (d.reason is not None) == d.keep


def test_reasons_name_the_rule_that_keeps() -> None:
    decisions = select(
        [Candidate(key=ts, timestamp=ts) for ts in SIMPLE2],
        Keep(keep_last=1, keep_daily=1, keep_monthly=2),
    )
    reasons = {d.candidate.key: d.reason for d in decisions if d.keep}
    assert reasons == {
        "2019-12-04T11-59-15": "keepLast",
        "2019-12-03T11-59-15": "keepDaily",
        # December is covered by the points kept before: the months are 2019-11, 2018-11.
        "2019-11-29T11-59-15": "keepMonthly",
        "2018-11-15T11-59-15": "keepMonthly",
    }


def test_protected_points_are_kept_and_not_counted() -> None:
    points = [
        Candidate(key=ts, timestamp=ts, protected=ts == "2019-12-04T12-59-15") for ts in SIMPLE
    ]
    decisions = {d.candidate.key: d for d in select(points, Keep(keep_last=1))}
    # The newest is protected: kept as such, and keepLast 1 keeps the next one too.
    assert decisions["2019-12-04T12-59-15"].reason == "protected"
    assert decisions["2019-12-04T11-59-15"].reason == "keepLast"
    assert not decisions["2019-12-03T11-59-15"].keep
    # A protected point takes no bucket: keepDaily 1 still keeps a point of its day.
    decisions = {d.candidate.key: d for d in select(points, Keep(keep_daily=1))}
    assert decisions["2019-12-04T11-59-15"].reason == "keepDaily"
    # Even a policy that keeps nothing keeps protected points.
    kept = [d.candidate.key for d in select(points, Keep(keep_last=0)) if d.keep]
    assert kept == ["2019-12-04T12-59-15"]


def test_buckets_are_utc_and_fractional_seconds_read() -> None:
    assert parse_timestamp("2026-01-30T23-59-59").hour == 23
    assert parse_timestamp("2026-01-30T23-59-59.5").microsecond == 500000
    # Two points a second apart across UTC midnight are two days.
    points = [
        Candidate(key=ts, timestamp=ts) for ts in ("2026-01-30T23-59-59", "2026-01-31T00-00-00")
    ]
    assert all(d.keep for d in select(points, Keep(keep_daily=2)))
    with pytest.raises(ValueError, match="does not match format"):
        parse_timestamp("2026-01-30 23:59:59")
