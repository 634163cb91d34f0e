"""Restore point ids: ``<destinationId>~<base64url(vm name)>~<timestamp>``, round trip and
what a malformed one is told."""

from __future__ import annotations

import pytest

from virtbackup.contracts.v1.points import parse_point_id, point_id


@pytest.mark.parametrize("vm", ["web1", "db ☃ prod", "a/b", "..", "x" * 200])
@pytest.mark.parametrize("ts", ["2026-01-30T12-00-00", "2024-02-29T23-59-59.123456"])
def test_an_id_round_trips(vm: str, ts: str) -> None:
    assert parse_point_id(point_id("fs-1", vm, ts)) == ("fs-1", vm, ts)


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("nonsense", "<destinationId>~<vm>~<timestamp>"),
        ("fs~!!~2026-01-30T12-00-00", "base64url"),
        ("../x~d2Vi~2026-01-30T12-00-00", "destination"),
        ("fs~d2Vi~2026-01-30", "not a timestamp"),
        ("fs~d2Vi~2026-13-40T12-00-00", "not a valid date and time"),
        ("fs~d2Vi~2025-02-29T12-00-00", "not a valid date and time"),
        ("fs~d2Vi~2026-01-30T24-00-00", "not a valid date and time"),
    ],
)
def test_a_malformed_id_is_told_what_is_wrong(value: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_point_id(value)
