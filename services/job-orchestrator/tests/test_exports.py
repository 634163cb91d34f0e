"""What a live export record has become: expired, abandoned by its worker, never taken."""

from __future__ import annotations

import datetime as dt

from virtbackup.contracts.v1.exports import InstantExport
from virtbackup.job_orchestrator.exports import START_GRACE_SECONDS, current

NOW = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)


def record(**changes: object) -> InstantExport:
    fields: dict[str, object] = {
        "id": "e1",
        "state": "active",
        "xml_path": "vms/vm1/2026-11-30T11-00-00/domain.xml",
        "vm_name": "vm1",
        "timestamp": "2026-11-30T11-00-00",
        "disk": "vda",
        "destination_id": "fs",
        "created_at": "2026-11-30T11:59:00.000Z",
        "expires_at": "2026-11-30T13:00:00.000Z",
        "worker": "host-42",
        "worker_started_at": "2026-11-30T10:00:00.000Z",
    }
    fields.update(changes)
    return InstantExport(**fields)  # type: ignore[arg-type]


def test_a_live_export_served_by_a_live_worker_stays_as_it_is() -> None:
    assert current(record(), NOW, worker_alive=True) is None
    assert current(record(state="stopping"), NOW, worker_alive=True) is None


def test_a_live_export_past_its_lifetime_has_expired() -> None:
    found = current(record(expires_at="2026-11-30T11:59:59.000Z"), NOW, worker_alive=True)
    assert found is not None and found.state == "expired" and found.ended_at


def test_an_export_whose_worker_is_gone_has_failed_naming_it() -> None:
    found = current(record(), NOW, worker_alive=False)
    assert found is not None and found.state == "failed"
    assert "host-42" in found.message


def test_a_starting_export_no_worker_took_has_failed() -> None:
    young = (NOW - dt.timedelta(seconds=5)).isoformat().replace("+00:00", "Z")
    old = (NOW - dt.timedelta(seconds=START_GRACE_SECONDS + 1)).isoformat().replace("+00:00", "Z")
    assert current(record(state="starting", worker="", created_at=young), NOW, False) is None
    found = current(record(state="starting", worker="", created_at=old), NOW, False)
    assert found is not None and found.state == "failed"


def test_an_ended_export_never_changes() -> None:
    for state in ("stopped", "expired", "failed"):
        gone = record(state=state, expires_at="2026-11-30T11:00:00.000Z")
        assert current(gone, NOW, worker_alive=False) is None


def test_an_ended_export_leaves_the_list_when_the_bucket_drops_it() -> None:
    """``VB_EXPORTS`` keeps a record 2 days after its last change; the index's watch is
    not told when one ages out, so the list drops it by the same rule."""
    from virtbackup.contracts.buckets import EXPORT_RECORD_SECONDS
    from virtbackup.job_orchestrator.exports import ExportIndex, ExportStore, expired_from_bucket

    def ago(seconds: float) -> str:
        return (NOW - dt.timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")

    day = 24 * 3600.0
    ended_recently = record(state="stopped", ended_at=ago(EXPORT_RECORD_SECONDS - 60))
    ended_long_ago = record(state="stopped", ended_at=ago(EXPORT_RECORD_SECONDS + 60))
    assert not expired_from_bucket(ended_recently, NOW)
    assert expired_from_bucket(ended_long_ago, NOW)
    # A record that never ended changed last at the latest when its life ended.
    assert not expired_from_bucket(record(created_at=ago(EXPORT_RECORD_SECONDS)), NOW)
    assert expired_from_bucket(record(created_at=ago(EXPORT_RECORD_SECONDS + day + 60)), NOW)

    index = ExportIndex.__new__(ExportIndex)
    now = dt.datetime.now(dt.UTC)
    old = (now - dt.timedelta(seconds=EXPORT_RECORD_SECONDS + 60)).isoformat()
    index.records = {
        "old": record(id="old", state="expired", ended_at=old.replace("+00:00", "Z")),
        "new": record(id="new", state="expired", ended_at=now.isoformat().replace("+00:00", "Z")),
    }
    store = ExportStore(None, None, index)  # type: ignore[arg-type]
    assert [r.id for r in store.all()] == ["new"]
    assert list(index.records) == ["new"]
