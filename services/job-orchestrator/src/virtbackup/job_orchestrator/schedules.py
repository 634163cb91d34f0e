"""Schedules: their commands (``vb.cmd.schedule.*``) and the scheduler.

Schedules live in ``VB_SCHEDULES`` (key: the schedule's id, value: ``v1.schedules.
Schedule`` as JSON). Every replica of the orchestrator runs the scheduler, which looks at
every schedule once a second; every change to a record is a compare-and-swap on its
revision, and that is what makes a run start exactly once:

* a due run is **claimed** by writing the schedule with its ``next_run`` moved on (and
  ``run_count`` up): of two replicas that see the same due run, one write succeeds, the
  other finds the revision changed and, on reading again, nothing due;
* a run whose previous run is still going (``last_status`` ``running`` and one of
  ``last_job_ids`` queued or running) is **skipped**: counted in ``skipped_runs`` and
  reported as ``schedule.completed`` with ``skipped: true``;
* when every job of a run has finished, the replica whose write marks the run
  ``success`` or ``failure`` publishes ``schedule.completed`` or ``schedule.failed``.

**Catch-up after downtime**: a run that came due while no orchestrator ran is started
once when one starts, if its latest missed time is at most ``CATCH_UP_SECONDS`` (12 h)
ago; several missed runs make one run. Older ones are not caught up: they are counted in
``missed_runs`` and the schedule waits for its next time (a nightly backup missed by a
short outage runs the same morning; one missed by days waits for the next night).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

import msgspec
from croniter import croniter
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from virtbackup.contracts import buckets
from virtbackup.contracts.subjects import EventType, ScheduleCmd
from virtbackup.contracts.v1.common import Empty, shown
from virtbackup.contracts.v1.jobs import ACTIVE_STATES
from virtbackup.contracts.v1.schedules import (
    SCHEDULE_ID_PATTERN,
    JobDefinition,
    RunStatus,
    Schedule,
    ScheduleCreate,
    ScheduleEvent,
    ScheduleList,
    ScheduleListRequest,
    ScheduleRef,
    ScheduleRun,
    ScheduleStats,
    ScheduleUpdate,
)
from virtbackup.job_orchestrator.definitions import expand, submit
from virtbackup.job_orchestrator.jobctx import JobContext
from virtbackup.runtime.bus import new_id
from virtbackup.runtime.commands import Commands
from virtbackup.runtime.errors import BadRequest, Conflict, NotFound, ServiceError, Unavailable

log = logging.getLogger(__name__)
schedule_commands: Commands[JobContext] = Commands()

#: How often each replica looks for due runs, in seconds.
TICK_SECONDS: Final = 1.0
#: How late a missed run may still be started (see the module's docstring), in seconds.
CATCH_UP_SECONDS: Final = 12 * 3600.0
#: A run claimed this long ago whose jobs were never recorded (its replica died between
#: the claim and the submit) is ended as failed, in seconds.
STUCK_CLAIM_SECONDS: Final = 120.0
MAX_CAS_ATTEMPTS: Final = 50
_ID = re.compile(SCHEDULE_ID_PATTERN)
_decoder = msgspec.json.Decoder(Schedule)
_encoder = msgspec.json.Encoder()


# -- cron and time ------------------------------------------------------------------------


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


#: Names in the time zone database that are no place's zone: the host's own zone under
#: another name, tzcode's rule template and placeholder.
_NOT_ZONES: Final = frozenset({"localtime", "posixrules", "Factory"})


@functools.cache
def _zones() -> frozenset[str]:
    return frozenset(available_timezones()) - _NOT_ZONES


def zone(name: str) -> ZoneInfo:
    """The IANA time zone ``name``, written exactly as the database does (``UTC``,
    ``Europe/Berlin``: case matters, as in the database's file names); ``BadRequest``
    naming ``timezone`` for any other name (``utc``, ``localtime``, ``right/UTC``,
    a path), suggesting the canonical spelling when only the case differs."""
    zones = _zones()
    if name not in zones:
        same = sorted(z for z in zones if z.lower() == name.lower())
        hint = f" (did you mean {shown(same[0])}?)" if same else ""
        raise BadRequest(f"timezone: {shown(name)} is not an IANA time zone name{hint}")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise BadRequest(f"timezone: {shown(name)} is not an IANA time zone") from None


#: What each field of a cron expression holds, in order (croniter's, seconds last).
CRON_FIELDS: Final = (
    ("minute", "0-59"),
    ("hour", "0-23"),
    ("day of month", "1-31"),
    ("month", "1-12 or jan-dec"),
    ("day of week", "0-7 (0 and 7 are Sunday) or sun-sat"),
    ("second", "0-59"),
)
_FIELD_FORMS: Final = "a value, a range (1-5), a list (1,15), a step (*/15, 1-30/5) or *"


def _bad_field(fields: list[str]) -> str | None:
    """The first field of an expression croniter refuses, in words; ``None`` when each
    field alone is fine (then their combination is what is wrong)."""
    for index, (name, values) in enumerate(CRON_FIELDS[: len(fields)]):
        probe = ["*"] * len(fields)
        probe[index] = fields[index]
        try:
            croniter(" ".join(probe))
        except (ValueError, KeyError):
            return (
                f"its {name} field {shown(fields[index])} is not valid: expected {values}, "
                f"as {_FIELD_FORMS}"
            )
    return None


def check_cron(expr: str) -> None:
    """``BadRequest`` naming ``schedule`` unless ``expr`` is a cron expression of 5
    fields (minute hour day month weekday, 0-7: 0 and 7 are Sunday), 6 (seconds last) or
    a macro (``@daily``), separated by spaces, with no whitespace around it, that matches
    some date (``0 0 30 2 *`` never does). The message says which field is
    wrong and what it may hold, never croniter's own wording."""
    if expr != expr.strip() or any(c in expr for c in "\t\r\n\v\f"):
        raise BadRequest(
            f"schedule: {shown(expr)} has leading or trailing whitespace or a tab or line"
            " break: write its fields separated by spaces only"
        )
    fields = expr.split()
    if not expr.startswith("@") and len(fields) not in {5, 6}:
        raise BadRequest(
            f"schedule: {shown(expr)} has {len(fields)} fields; write 5 (minute hour day "
            "month weekday), or 6 with seconds last"
        )
    try:
        croniter(expr)
    except (ValueError, KeyError):
        if expr.startswith("@"):
            why = "it is no known macro: use @yearly, @monthly, @weekly, @daily or @hourly"
        else:
            why = _bad_field(fields) or "its fields do not combine into a schedule"
        raise BadRequest(f"schedule: {shown(expr)} is not a valid cron expression: {why}") from None
    try:  # valid, but a date that never comes (30 February) would fail every next run
        croniter(expr, datetime.now(UTC)).get_next(datetime)
    except (ValueError, KeyError):
        raise BadRequest(
            f"schedule: {shown(expr)} never matches a date (such as 30 February): "
            "choose a day that exists in the months given"
        ) from None


#: How many runs ahead ``check_interval`` looks (enough to see every gap of a pattern
#: that repeats within a year: cron fields repeat per day, month and year).
INTERVAL_LOOKAHEAD: Final = 1000


def check_interval(expr: str, tz: str, minimum: float, start: datetime | None = None) -> None:
    """``BadRequest`` naming ``schedule`` when two runs of ``expr`` (a valid expression,
    read in ``tz``) come less than ``minimum`` seconds apart; 0 allows any interval. The
    next ``INTERVAL_LOOKAHEAD`` runs from ``start`` (default now) are looked at."""
    if minimum <= 0:
        return
    it = croniter(expr, (start or datetime.now(UTC)).astimezone(zone(tz)))
    # In UTC: aware times of one zone subtract as wall-clock times (a DST change would
    # make the two 02:00 runs of an autumn night 0 s apart instead of an hour).
    previous = it.get_next(datetime).astimezone(UTC)
    for _ in range(INTERVAL_LOOKAHEAD):
        current = it.get_next(datetime).astimezone(UTC)
        gap = (current - previous).total_seconds()
        if gap < minimum:
            raise BadRequest(
                f"schedule: {shown(expr)} runs {_duration(gap)} apart (e.g. at "
                f"{iso(previous)} and {iso(current)}); runs must be at least "
                f"{_duration(minimum)} apart (VIRTBACKUP_SCHEDULE_MIN_INTERVAL)"
            )
        previous = current


def _duration(seconds: float) -> str:
    if seconds >= 60 and seconds % 60 == 0:
        minutes = int(seconds // 60)
        return f"{minutes} minute{'s' if minutes != 1 else ''}"
    whole = int(seconds)
    return f"{whole} second{'s' if whole != 1 else ''}"


def next_after(expr: str, tz: str, moment: datetime) -> datetime:
    """The first time of ``expr`` (read in ``tz``) strictly after ``moment``, in UTC."""
    it = croniter(expr, moment.astimezone(zone(tz)))
    return it.get_next(datetime).astimezone(UTC)


def latest_at_or_before(expr: str, tz: str, moment: datetime) -> datetime:
    """The last time of ``expr`` (read in ``tz``) at or before ``moment``, in UTC."""
    it = croniter(expr, (moment + timedelta(microseconds=1)).astimezone(zone(tz)))
    return it.get_prev(datetime).astimezone(UTC)


# -- the bucket ---------------------------------------------------------------------------


class ScheduleStore:
    """``VB_SCHEDULES`` with compare-and-swap updates (as ``store.JobStore``)."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def get(self, schedule_id: str) -> tuple[Schedule, int]:
        """The schedule and its revision; ``NotFound`` for an unknown or malformed id."""
        if not _ID.match(schedule_id):
            raise NotFound(f"schedule {shown(schedule_id)} not found")
        try:
            entry = await self.kv.get(schedule_id)
        except KeyNotFoundError:
            raise NotFound(f"schedule {shown(schedule_id)} not found") from None
        if entry.value is None:
            raise NotFound(f"schedule {shown(schedule_id)} not found")
        return _decoder.decode(entry.value), entry.revision or 0

    async def all(self) -> list[tuple[Schedule, int]]:
        from virtbackup.runtime.kv import keys

        out = []
        for key in await keys(self.kv):
            with contextlib.suppress(NotFound):  # deleted in between
                out.append(await self.get(key))
        return out

    async def page(self, after: str, limit: int) -> tuple[list[Schedule], bool]:
        """Schedules with ids after ``after`` in id order, at most ``limit`` (0: all);
        and whether more follow."""
        from virtbackup.runtime.kv import keys

        ids = sorted(k for k in await keys(self.kv) if k > after)
        more = bool(limit) and len(ids) > limit
        out = []
        for key in ids[:limit] if limit else ids:
            with contextlib.suppress(NotFound):  # deleted in between
                out.append((await self.get(key))[0])
        return out, more

    async def count(self) -> int:
        from virtbackup.runtime.kv import keys

        return len(await keys(self.kv))

    async def create(self, schedule: Schedule) -> None:
        """``Conflict`` when the id is taken."""
        try:
            await self.kv.create(schedule.id, _encoder.encode(schedule))
        except KeyWrongLastSequenceError:
            raise Conflict(f"schedule {shown(schedule.id)} already exists") from None

    async def write(self, schedule: Schedule, revision: int) -> bool:
        """Write if the record is still at ``revision``; False when another write came."""
        try:
            await self.kv.update(schedule.id, _encoder.encode(schedule), last=revision)
        except KeyWrongLastSequenceError:
            return False
        return True

    async def update(self, schedule_id: str, change: Callable[[Schedule], Schedule]) -> Schedule:
        for _ in range(MAX_CAS_ATTEMPTS):
            schedule, revision = await self.get(schedule_id)
            updated = change(schedule)
            if updated is schedule or await self.write(updated, revision):
                return updated
        raise Unavailable(f"schedule {schedule_id}: too many concurrent updates; try again")


def store_of(jc: JobContext) -> ScheduleStore:
    return ScheduleStore(jc.ctx.bucket(buckets.SCHEDULES))


def now_utc() -> datetime:
    return datetime.now(UTC)


def planned(schedule: Schedule, moment: datetime) -> str | None:
    """The ``next_run`` of ``schedule`` as it is now: None while disabled."""
    if not schedule.enabled:
        return None
    return iso(next_after(schedule.schedule, schedule.timezone, moment))


async def publish(jc: JobContext, event_type: str, schedule: Schedule, **fields: object) -> None:
    payload = ScheduleEvent(schedule_id=schedule.id, name=schedule.name, **fields)  # type: ignore[arg-type]
    try:
        await jc.bus.publish_event(event_type, payload, key=schedule.id)
    except Unavailable:
        log.warning("schedule %s: its %s event was not stored", schedule.id, event_type)


# -- commands -----------------------------------------------------------------------------


#: The fields of a job definition, as ``expand``'s messages name them first.
_TEMPLATE_FIELDS = ("vm_path", "source", "destination", "options", "name", "id")


async def check_template(jc: JobContext, template: JobDefinition) -> None:
    """``BadRequest``/``NotFound`` for a template no run could start (``expand``), its
    message naming the field within the schedule (``job_template.source.type``)."""
    try:
        await expand(jc, template)
    except (BadRequest, NotFound) as exc:
        text = exc.message
        if text.startswith(_TEMPLATE_FIELDS):
            text = f"job_template.{text}"
        else:
            text = f"job_template: {text}"
        raise type(exc)(text) from None


@schedule_commands.handler(ScheduleCmd.LIST, ScheduleListRequest)
async def list_schedules(jc: JobContext, req: ScheduleListRequest) -> ScheduleList:
    """Schedules by id after ``req.after``, at most ``req.limit`` (0: all)."""
    if req.limit < 0:
        raise BadRequest(f"limit: {req.limit} is negative (0 means no limit)")
    page, more = await store_of(jc).page(req.after, req.limit)
    return ScheduleList(schedules=page, more=more)


@schedule_commands.handler(ScheduleCmd.GET, ScheduleRef)
async def get_schedule(jc: JobContext, req: ScheduleRef) -> Schedule:
    return (await store_of(jc).get(req.id))[0]


@schedule_commands.handler(ScheduleCmd.CREATE, ScheduleCreate)
async def create_schedule(jc: JobContext, req: ScheduleCreate) -> Schedule:
    """Check everything (id, cron, time zone, the job template against the configuration
    and the inventory), then store; nothing is stored when a check fails. ``Conflict``
    when the id is taken."""
    schedule_id = req.id or new_id("s")
    if not _ID.match(schedule_id):
        raise BadRequest(f"id: {shown(schedule_id)}: 1 to 64 letters, digits, '_' or '-'")
    check_cron(req.schedule)
    zone(req.timezone)
    check_interval(req.schedule, req.timezone, jc.settings.schedule_min_interval)
    await check_template(jc, req.job_template)
    if await store_of(jc).count() >= jc.settings.max_schedules:
        raise Conflict(
            f"there are already {jc.settings.max_schedules} schedules, the most this "
            "installation keeps (VIRTBACKUP_MAX_SCHEDULES): delete one, or let one "
            "schedule cover many VMs with a glob in vm_path"
        )
    now = now_utc()
    schedule = Schedule(
        id=schedule_id,
        name=req.name or schedule_id,
        description=req.description,
        schedule=req.schedule,
        timezone=req.timezone,
        enabled=req.enabled,
        job_template=req.job_template,
        created_at=iso(now),
        updated_at=iso(now),
    )
    schedule = msgspec.structs.replace(schedule, next_run=planned(schedule, now))
    await store_of(jc).create(schedule)
    return schedule


@schedule_commands.handler(ScheduleCmd.UPDATE, ScheduleUpdate)
async def update_schedule(jc: JobContext, req: ScheduleUpdate) -> Schedule:
    """Replace the fields given (checked as ``create`` checks them); ``next_run`` is
    planned again from now when the expression, the time zone or ``enabled`` change."""
    if req.schedule is not None:
        check_cron(req.schedule)
    if req.timezone is not None:
        zone(req.timezone)
    if req.schedule is not None:
        tz = req.timezone or "UTC"
        check_interval(req.schedule, tz, jc.settings.schedule_min_interval)
    if req.job_template is not None:
        await check_template(jc, req.job_template)
    await store_of(jc).get(req.id)  # 404 before anything else
    changes = {
        f: getattr(req, f)
        for f in ("name", "description", "schedule", "timezone", "enabled", "job_template")
        if getattr(req, f) is not None
    }

    def change(schedule: Schedule) -> Schedule:
        now = now_utc()
        updated = msgspec.structs.replace(schedule, updated_at=iso(now), **changes)
        if (updated.schedule, updated.timezone, updated.enabled) != (
            schedule.schedule,
            schedule.timezone,
            schedule.enabled,
        ):
            updated = msgspec.structs.replace(updated, next_run=planned(updated, now))
        return updated

    return await store_of(jc).update(req.id, change)


@schedule_commands.handler(ScheduleCmd.DELETE, ScheduleRef)
async def delete_schedule(jc: JobContext, req: ScheduleRef) -> Empty:
    """Delete the schedule (its running jobs go on); ``NotFound`` when unknown."""
    store = store_of(jc)
    await store.get(req.id)
    await store.kv.delete(req.id)
    return Empty()


@schedule_commands.handler(ScheduleCmd.STATS, Empty)
async def schedule_stats(jc: JobContext, _: Empty) -> ScheduleStats:
    schedules = [s for s, _ in await store_of(jc).all()]
    enabled = sum(1 for s in schedules if s.enabled)
    return ScheduleStats(
        total_schedules=len(schedules),
        enabled_schedules=enabled,
        disabled_schedules=len(schedules) - enabled,
        total_runs=sum(s.run_count for s in schedules),
        successful_runs=sum(s.successful_runs for s in schedules),
        failed_runs=sum(s.failed_runs for s in schedules),
        skipped_runs=sum(s.skipped_runs for s in schedules),
        missed_runs=sum(s.missed_runs for s in schedules),
        running_schedules=sum(1 for s in schedules if s.last_status == "running"),
    )


@schedule_commands.handler(ScheduleCmd.TRIGGER, ScheduleRef)
async def trigger_schedule(jc: JobContext, req: ScheduleRef) -> ScheduleRun:
    """Run the schedule now (its ``next_run`` stays). ``Conflict`` (409) naming the state
    when it is disabled: a disabled schedule runs nothing until enabled. Skipped when its
    previous run is still going; the error of a run whose jobs cannot be created (e.g.
    its VMs are gone) is raised after the run is recorded as failed."""
    run = await fire(jc, req.id, manual=True)
    assert run is not None
    return run


# -- runs ---------------------------------------------------------------------------------


def outcome(jc: JobContext, schedule: Schedule, now: datetime) -> tuple[RunStatus, str] | None:
    """How the schedule's running run ended, or None while it is still going."""
    age = (now - parse_iso(schedule.last_run)).total_seconds() if schedule.last_run else 1e9
    if not schedule.last_job_ids:
        if age < STUCK_CLAIM_SECONDS:
            return None
        return "failure", "the run's jobs were never created (its orchestrator stopped)"
    jobs = jc.jobs.jobs
    failed: list[str] = []
    for job_id in schedule.last_job_ids:
        job = jobs.get(job_id)
        if job is None:
            if age < STUCK_CLAIM_SECONDS:  # created by another replica, not indexed yet
                return None
            failed.append(f"{job_id}: gone")
        elif job.state in ACTIVE_STATES:
            return None
        elif job.state != "success":
            failed.append(f"{job_id} ({job.vm_name}): {job.state}: {job.message}")
    if failed:
        return (
            "failure",
            f"{len(failed)} of {len(schedule.last_job_ids)} jobs did not succeed: "
            + ("; ".join(failed)),
        )
    return "success", f"{len(schedule.last_job_ids)} jobs succeeded"


async def settle(jc: JobContext, schedule: Schedule, revision: int, now: datetime) -> bool:
    """End a running run whose jobs have all finished; the replica whose write does it
    publishes ``schedule.completed`` or ``schedule.failed``. True when the record
    changed (by this replica or another)."""
    if schedule.last_status != "running":
        return False
    ended = outcome(jc, schedule, now)
    if ended is None:
        return False
    status, message = ended
    done = msgspec.structs.replace(
        schedule,
        last_status=status,
        last_message=message,
        successful_runs=schedule.successful_runs + (status == "success"),
        failed_runs=schedule.failed_runs + (status == "failure"),
    )
    if await store_of(jc).write(done, revision):
        event = EventType.SCHEDULE_COMPLETED if status == "success" else EventType.SCHEDULE_FAILED
        await publish(jc, event, done, job_ids=done.last_job_ids, message=message)
    return True


async def fire(jc: JobContext, schedule_id: str, *, manual: bool) -> ScheduleRun | None:
    """Start a run of the schedule if it is due (``manual``: now, whatever its time).
    None when another replica took the due run (or it is not due any more)."""
    store = store_of(jc)
    for _ in range(MAX_CAS_ATTEMPTS):
        schedule, revision = await store.get(schedule_id)
        now = now_utc()
        if schedule.last_status == "running" and await settle(jc, schedule, revision, now):
            continue  # the previous run just ended: read again
        next_run = schedule.next_run
        if manual and not schedule.enabled:
            raise Conflict(
                f"schedule {shown(schedule_id)} is disabled (enabled: false): enable it"
                f" first (POST /schedules/{schedule_id}/enable), then trigger it"
            )
        if not manual:
            if not (schedule.enabled and next_run and parse_iso(next_run) <= now):
                return None
            next_run = planned(schedule, now)
            due = max(
                latest_at_or_before(schedule.schedule, schedule.timezone, now),
                parse_iso(schedule.next_run or iso(now)),
            )
            late = (now - due).total_seconds()
            if late > CATCH_UP_SECONDS:
                message = f"missed the run due at {iso(due)} ({late:.0f} s ago): not caught up"
                missed = msgspec.structs.replace(
                    schedule,
                    next_run=next_run,
                    missed_runs=schedule.missed_runs + 1,
                    last_message=message,
                )
                if await store.write(missed, revision):
                    log.warning("schedule %s: %s", schedule_id, message)
                    return None
                continue
        if schedule.last_status == "running":
            message = (
                "skipped: the previous run (jobs "
                f"{', '.join(schedule.last_job_ids) or 'being created'}) is still going"
            )
            skipped = msgspec.structs.replace(
                schedule,
                next_run=next_run,
                skipped_runs=schedule.skipped_runs + 1,
                last_message=message,
            )
            if not await store.write(skipped, revision):
                continue
            await publish(
                jc,
                EventType.SCHEDULE_COMPLETED,
                skipped,
                job_ids=schedule.last_job_ids,
                skipped=True,
                message=message,
            )
            return ScheduleRun(job_ids=[], skipped=True, message=message)
        claimed = msgspec.structs.replace(
            schedule,
            next_run=next_run,
            last_run=iso(now),
            run_count=schedule.run_count + 1,
            last_status="running",
            last_job_ids=[],
            last_message="",
        )
        if not await store.write(claimed, revision):
            continue
        return await start_run(jc, claimed)
    raise Unavailable(f"schedule {schedule_id}: too many concurrent updates; try again")


async def start_run(jc: JobContext, schedule: Schedule) -> ScheduleRun:
    """Create the jobs of a claimed run and record them (or the run's failure)."""
    store = store_of(jc)
    claim = schedule.last_run

    def ours(current: Schedule) -> bool:
        return current.last_run == claim and current.last_status == "running"

    try:
        result = await submit(jc, schedule.job_template)
    except ServiceError as exc:
        message = f"the run's jobs could not be created: {exc}"

        def failed(current: Schedule) -> Schedule:
            if not ours(current):
                return current
            return msgspec.structs.replace(
                current,
                last_status="failure",
                last_message=message,
                failed_runs=current.failed_runs + 1,
            )

        with contextlib.suppress(NotFound):  # deleted meanwhile
            recorded = await store.update(schedule.id, failed)
            await publish(jc, EventType.SCHEDULE_FAILED, recorded, message=message)
        raise
    message = "; ".join(result.errors)

    def started(current: Schedule) -> Schedule:
        if not ours(current):
            return current
        return msgspec.structs.replace(current, last_job_ids=result.job_ids, last_message=message)

    with contextlib.suppress(NotFound):
        await store.update(schedule.id, started)
    await publish(
        jc, EventType.SCHEDULE_TRIGGERED, schedule, job_ids=result.job_ids, message=message
    )
    return ScheduleRun(job_ids=result.job_ids, message=message)


async def tick(jc: JobContext) -> None:
    """One look at every schedule: end finished runs, start due ones."""
    for schedule, revision in await store_of(jc).all():
        try:
            now = now_utc()
            if await settle(jc, schedule, revision, now):
                schedule, revision = await store_of(jc).get(schedule.id)
            if schedule.enabled and schedule.next_run and parse_iso(schedule.next_run) <= now:
                await fire(jc, schedule.id, manual=False)
        except ServiceError as exc:  # a failed run is recorded and published by start_run
            log.warning("schedule %s: %s", schedule.id, exc)


async def run_scheduler(jc: JobContext) -> None:
    """The scheduler of this replica: ``tick`` at every whole ``TICK_SECONDS`` of the
    clock until it stops. Every replica ticks at the same moments, so a run due at a
    whole second starts within milliseconds of it, and replicas that race for it do
    race (the claim's compare-and-set decides)."""
    stopping = jc.ctx.stopping
    while not stopping.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), TICK_SECONDS - time.time() % TICK_SECONDS)
        if stopping.is_set():
            return
        try:
            await tick(jc)
        except Exception:
            log.exception("scheduler tick failed")
