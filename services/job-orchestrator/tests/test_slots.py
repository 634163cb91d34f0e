"""The line of admission control (``slots.compute_line``) and what each job holds
(``slots.job_slots``): pure functions of the job index and the settings."""

from __future__ import annotations

from typing import Any

from virtbackup.contracts.v1.jobs import Job, JobState, JobType
from virtbackup.job_orchestrator.slots import Slot, compute_line, job_slots
from virtbackup.runtime.settings import Settings

NOW = "2026-11-30T00:00:00.000Z"


def job(
    job_id: str,
    type: JobType = "backup",
    state: JobState = "queued",
    server: str | None = "s1",
    dest: str | None = "d1",
    **params: Any,
) -> Job:
    return Job(
        id=job_id,
        type=type,
        state=state,
        server_id=server,
        vm_name="vm",
        destination_id=dest,
        params=params,
        created_at=NOW,
        updated_at=NOW,
    )


def limits(server: int, dest: int) -> Settings:
    return Settings(max_jobs_per_server=server, max_jobs_per_destination=dest)


def test_one_at_a_time_on_a_server_in_submit_order() -> None:
    jobs = [job("03"), job("01"), job("02")]
    line = compute_line(jobs, limits(1, 0), set())
    assert line.admitted == {"01"}
    assert set(line.blocked) == {"02", "03"}
    # 01 is admitted (starting: shown as running); 02 is before 03 in line.
    assert line.blocked["02"].message() == (
        "waiting for a slot on server s1: 1 job running (VIRTBACKUP_MAX_JOBS_PER_SERVER=1)"
    )
    assert line.blocked["03"].message() == (
        "waiting for a slot on server s1: 1 job running, 1 waiting before this one "
        "(VIRTBACKUP_MAX_JOBS_PER_SERVER=1)"
    )


def test_running_and_taking_jobs_hold_their_slots() -> None:
    running = job("01", state="running")
    line = compute_line([running, job("02"), job("03")], limits(2, 0), set())
    assert line.admitted == {"02"}
    blocked = line.blocked["03"]
    assert (blocked.slot, blocked.running, blocked.ahead) == (Slot("server", "s1"), 2, 0)
    # A queued job of this replica that took its slots counts as running.
    line = compute_line([running, job("02"), job("03")], limits(2, 0), {"02"})
    assert line.admitted == set()
    assert line.blocked["03"].running == 2
    assert line.blocked["03"].message() == (
        "waiting for a slot on server s1: 2 jobs running (VIRTBACKUP_MAX_JOBS_PER_SERVER=2)"
    )


def test_a_job_waiting_for_its_server_does_not_hold_back_a_shared_destination() -> None:
    jobs = [
        job("00", state="running", server="s1"),
        job("01", server="s1"),  # first in line: keeps its place on s1 and d1
        job("02", server="s1"),  # waits for s1 only
        job("03", server="s2"),
        job("04", server="s3"),
    ]
    line = compute_line(jobs, limits(1, 3), set())
    assert line.admitted == {"03"}
    assert line.blocked["01"].slot == line.blocked["02"].slot == Slot("server", "s1")
    blocked = line.blocked["04"]
    assert (blocked.slot, blocked.running, blocked.ahead) == (Slot("destination", "d1"), 2, 1)


def test_the_first_in_line_is_not_overtaken_on_its_server() -> None:
    # 01 waits for d1 (full); 02 (same server, another destination) would take the
    # server's last slot and could do so again and again: it waits behind 01.
    jobs = [
        job("00", state="running", server="s9", dest="d1"),
        job("01", server="s1", dest="d1"),
        job("02", server="s1", dest="d2"),
    ]
    line = compute_line(jobs, limits(1, 1), set())
    assert line.admitted == set()
    assert line.blocked["01"].slot == Slot("destination", "d1")
    assert line.blocked["02"].slot == Slot("server", "s1")


def test_ended_jobs_and_jobs_without_slots_do_not_count() -> None:
    jobs = [
        job("00", state="success"),
        job("01", state="failure"),
        job("02", type="gc", server=None),
        job("03", migrationJobId="m1"),
        job("04"),
    ]
    assert compute_line(jobs, limits(1, 1), set()).admitted == {"04"}


def test_what_each_job_holds() -> None:
    both = limits(4, 8)
    assert job_slots(job("1", "backup", dest="d1", alsoDestinationIds=["d2"]), both) == (
        Slot("server", "s1"),
        Slot("destination", "d1"),
        Slot("destination", "d2"),
    )
    assert job_slots(job("2", "restore"), both) == (Slot("server", "s1"), Slot("destination", "d1"))
    migration = job("3", "migration", dest=None, targetServerId="s2", viaDestinationId="d3")
    assert job_slots(migration, both) == (
        Slot("server", "s1"),
        Slot("server", "s2"),
        Slot("destination", "d3"),
    )
    # A migration's own jobs run under its slots.
    assert job_slots(job("4", "backup", migrationJobId="3"), both) == ()
    assert job_slots(job("5", "verify", server=None), both) == (Slot("destination", "d1"),)
    assert job_slots(job("6", "sanity"), both) == (Slot("destination", "d1"),)
    copy = job("7", "copy", targetDestinationId="d2")
    assert job_slots(copy, both) == (Slot("destination", "d1"), Slot("destination", "d2"))
    assert job_slots(job("8", "gc", server=None), both) == ()
    assert job_slots(job("9", "prune", server=None), both) == ()
    # 0: no limit of that kind.
    assert job_slots(job("a", "restore"), limits(0, 8)) == (Slot("destination", "d1"),)
    assert job_slots(job("b", "restore"), limits(4, 0)) == (Slot("server", "s1"),)
    assert Slot("server", "kvm/1").key == "slots.srv.a3ZtLzE"
    assert Slot("destination", "fs").key == "slots.dst.ZnM"
