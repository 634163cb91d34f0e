"""Planning one read for several destinations (``fanout.FanOut``): which chunks go to
which destinations, in which units, and what each destination's manifest becomes."""

from __future__ import annotations

from virtbackup.contracts.v1.inventory import Extent
from virtbackup.contracts.v1.jobs import Job
from virtbackup.contracts.v1.work import ChunkRef, DestinationResult, UnitResult
from virtbackup.job_orchestrator.fanout import FanOut, parent_of, summary, written_destinations
from virtbackup.job_orchestrator.planner import DiskPlan, build_manifest, plan_disk
from virtbackup.repository.records import DiskManifest

MiB = 1 << 20
CHUNK = 4 * MiB
SIZE = 8 * CHUNK


def _disk(parent: DiskManifest | None, dirty: list[Extent] | None) -> DiskPlan:
    return plan_disk(
        target="vda",
        path="/x.qcow2",
        fmt="qcow2",
        size=SIZE,
        chunk_size=CHUNK,
        nbd_url="nbd+unix:///vda",
        allocation=[Extent(0, 6 * CHUNK, 0), Extent(6 * CHUNK, 2 * CHUNK, 3)],
        dirty=dirty,
        parent=parent,
        partial_max_fraction=0.5,
    )


def test_an_incremental_and_a_full_destination_share_one_read() -> None:
    parent = DiskManifest(
        target="vda", size=SIZE, chunk_size=CHUNK, format="qcow2", source_path="/x.qcow2",
        chunks=[f"p{i}" for i in range(6)] + [None, None],
    )  # fmt: skip
    dirty = [
        Extent(0, 64 * 1024, 1),
        Extent(64 * 1024, 3 * CHUNK, 0),
        Extent(3 * CHUNK + 64 * 1024, CHUNK, 1),
    ]
    inc = _disk(parent, dirty)
    full = _disk(None, dirty)
    fan = FanOut("j", ["a", "b"], {"a": [inc], "b": [full]})
    # Chunks 0, 3, 4 are dirty (both destinations), 1, 2, 5 only the full one reads.
    by_dests = {tuple([u.destination_id, *u.also_destination_ids]): u for u in fan.units}
    assert by_dests[("a", "b")].indices == [0, 3, 4]
    assert by_dests[("b",)].indices == [1, 2, 5]
    assert fan.chunks_read == 6  # each chunk read once
    # Only the own destination's units read in part (its parent chunks).
    assert [p.index for p in by_dests[("a", "b")].partial] == [0, 4]
    assert by_dests[("b",)].partial == []

    for unit in fan.units:
        fan.on_result(
            UnitResult(
                job_id="j", unit=unit.unit, kind="backup", disk="vda", worker="w", ok=True,
                destinations=[
                    DestinationResult(
                        destination_id=d, ok=True,
                        chunks=[ChunkRef(index=i, id=f"{d}{i}") for i in unit.indices],
                    )
                    for d in [unit.destination_id, *unit.also_destination_ids]
                ],
            )
        )  # fmt: skip
    a = build_manifest(inc, fan.results["a"]["vda"])
    b = build_manifest(full, fan.results["b"]["vda"])
    assert a.chunks == ["a0", "p1", "p2", "a3", "a4", "p5", None, None]
    assert b.chunks == ["b0", "b1", "b2", "b3", "b4", "b5", None, None]
    assert fan.alive() == ["a", "b"]


def test_a_destination_failing_in_one_unit_is_failed() -> None:
    full = _disk(None, None)
    fan = FanOut("j", ["a", "b", "c"], {d: [full] for d in "abc"})
    assert len(fan.units) == 1 and fan.units[0].also_destination_ids == ["b", "c"]
    fan.on_result(
        UnitResult(
            job_id="j", unit=0, kind="backup", disk="vda", worker="w", ok=True,
            destinations=[
                DestinationResult(destination_id="a", ok=True),
                DestinationResult(destination_id="b", ok=False, error="disk full"),
                DestinationResult(destination_id="c", ok=True),
            ],
        )
    )  # fmt: skip
    assert fan.alive() == ["a", "c"]
    assert fan.failed == {"b": "disk full"}
    text = summary(
        ["a", "b", "c"], {"a": {"timestamp": "t1"}, "c": {"timestamp": "t1"}}, fan.failed
    )
    assert text == "committed in a (t1), c (t1); failed in b: disk full"


def test_recorded_parents_and_written_destinations() -> None:
    job = Job(
        id="j", type="backup", state="running", created_at="", updated_at="",
        destination_id="a", params={"alsoDestinationIds": ["b", "c"]},
        result={"parentTimestamp": "t0", "destinations": {"b": {"parentTimestamp": None}}},
    )  # fmt: skip
    assert written_destinations(job) == ["a", "b", "c"]
    assert parent_of(job, "a") == (True, "t0")
    assert parent_of(job, "b") == (True, None)  # full read there
    assert parent_of(job, "c") == (False, None)  # not recorded yet
    copy = Job(
        id="k", type="copy", state="running", created_at="", updated_at="",
        destination_id="a", params={"targetDestinationId": "z"},
    )  # fmt: skip
    assert written_destinations(copy) == ["z"]
