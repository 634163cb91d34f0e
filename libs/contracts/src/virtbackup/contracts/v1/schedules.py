"""Job definitions of the HyperSDK API, schedules (``VB_SCHEDULES``) and their events.

Unlike the other bus messages these are snake_case on the wire and in the bucket: they
are what the HyperSDK API document shows (``hypersdk-api.md``), passed through as they
are. A job definition is checked and expanded by the job-orchestrator
(``JobCmd.SUBMIT``); a schedule's record is changed only with compare-and-swap on its
revision, which is how exactly one orchestrator replica starts each run.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

import msgspec

from virtbackup.contracts.v1.common import Message
from virtbackup.contracts.v1.readable import described

#: A schedule id: a KV key and a subject token (``vb.evt.schedule.<event>.<id>``).
SCHEDULE_ID_PATTERN: Final = described(
    r"^[A-Za-z0-9_-]{1,64}(?![\s\S])", "a schedule id (1 to 64 letters, digits, '_' or '-')"
)
ScheduleId = Annotated[str, msgspec.Meta(pattern=SCHEDULE_ID_PATTERN)]

#: What a schedule's last run did: ``running`` until all its jobs have finished.
RunStatus = Literal["running", "success", "failure", "skipped"]


class Snake(Message, frozen=True, kw_only=True, rename=None):
    """A bus message in snake_case (the HyperSDK document's spelling)."""


class JobDefinition(Snake, frozen=True, kw_only=True):
    """``POST /jobs/submit``'s body and a schedule's ``job_template``.

    ``vm_path`` is ``<server>/<vm>`` (or a VM name with ``source.server_id``); either
    part may be a glob (``*``, ``?``, ``[...]``) that expands to one job per VM.
    ``source`` is ``{"type": "libvirt", "server_id": ...}``; ``destination`` is
    ``{"type": "backup", "destination_id": ...}`` (the default backup destination when
    ``destination_id`` is left out); ``options`` may hold ``fresh`` (bool, debug mode
    only, as the agent API's). The orchestrator refuses anything else with a 400 naming
    the field (vSphere sources, ``kvm`` destinations until migrations exist)."""

    vm_path: str
    source: dict[str, Any] = msgspec.field(default_factory=dict)
    destination: dict[str, Any] = msgspec.field(default_factory=dict)
    options: dict[str, Any] = msgspec.field(default_factory=dict)


class JobSubmitRequest(Snake, frozen=True, kw_only=True):
    """Submit one backup job per VM the definition names."""

    definition: JobDefinition


class JobTarget(Snake, frozen=True, kw_only=True):
    server_id: str
    vm_name: str


class JobSubmitResult(Snake, frozen=True, kw_only=True):
    """The jobs created (in ``targets`` order), the VMs the definition expanded to, and
    for a glob the VMs whose job could not be created (``errors``: one line each, e.g. a
    VM with a backup already running)."""

    job_ids: list[str] = msgspec.field(default_factory=list)
    targets: list[JobTarget] = msgspec.field(default_factory=list)
    errors: list[str] = msgspec.field(default_factory=list)


class Schedule(Snake, frozen=True, kw_only=True):
    """A schedule as ``VB_SCHEDULES`` keeps it (key: its id) and the API shows it.

    ``schedule`` is a cron expression of 5 fields (minute hour day month weekday), or 6
    with seconds last (croniter's form), or a macro such as ``@daily``; it is read in
    ``timezone`` (an IANA name). Times are UTC ISO-8601. ``next_run`` is None while the
    schedule is disabled. ``run_count`` counts runs started (manual triggers included);
    ``skipped_runs`` runs not started because the previous one was still going;
    ``successful_runs``/``failed_runs`` runs finished. ``last_job_ids`` are the jobs of
    the last run started; ``last_status`` what it did."""

    id: str
    name: str = ""
    description: str = ""
    schedule: str
    timezone: str = "UTC"
    enabled: bool = True
    job_template: JobDefinition
    created_at: str
    updated_at: str
    last_run: str | None = None
    next_run: str | None = None
    run_count: int = 0
    skipped_runs: int = 0
    missed_runs: int = 0
    successful_runs: int = 0
    failed_runs: int = 0
    last_status: RunStatus | None = None
    last_job_ids: list[str] = msgspec.field(default_factory=list)
    last_message: str = ""


class ScheduleCreate(Snake, frozen=True, kw_only=True):
    """``POST /schedules``: ``id`` is generated when empty; 409 when taken."""

    id: str = ""
    name: str = ""
    description: str = ""
    schedule: str
    timezone: str = "UTC"
    enabled: bool = True
    job_template: JobDefinition


class ScheduleUpdate(Snake, frozen=True, kw_only=True):
    """``PUT /schedules/{id}`` (and enable/disable): the fields given replace the
    schedule's; None leaves one as it is."""

    id: str
    name: str | None = None
    description: str | None = None
    schedule: str | None = None
    timezone: str | None = None
    enabled: bool | None = None
    job_template: JobDefinition | None = None


class ScheduleRef(Snake, frozen=True, kw_only=True):
    id: str


class ScheduleListRequest(Snake, frozen=True, kw_only=True):
    """``vb.cmd.schedule.list``: schedules by id, those after ``after`` (``""``: from the
    first), at most ``limit`` of them (0: every one; a reply larger than the bus carries
    is refused, so callers page: see ``SCHEDULE_LIST_PAGE``)."""

    after: str = ""
    limit: int = msgspec.field(default=0)


#: Schedules the gateway asks for in one request: the largest schedule the APIs take
#: (2 KB description, a job template) times this stays well under the bus's 1 MiB.
SCHEDULE_LIST_PAGE: Final = 100


class ScheduleList(Snake, frozen=True, kw_only=True):
    """Schedules by id; ``more`` when a ``limit`` cut the list (ask again ``after`` the
    last one)."""

    schedules: list[Schedule]
    more: bool = False


class ScheduleStats(Snake, frozen=True, kw_only=True):
    """``GET /schedules/stats``: counts over every schedule (runs as in ``Schedule``)."""

    total_schedules: int
    enabled_schedules: int
    disabled_schedules: int
    total_runs: int
    successful_runs: int
    failed_runs: int
    skipped_runs: int
    missed_runs: int
    running_schedules: int


class ScheduleRun(Snake, frozen=True, kw_only=True):
    """What ``trigger`` did: started jobs, or skipped (the previous run still going)."""

    job_ids: list[str] = msgspec.field(default_factory=list)
    skipped: bool = False
    message: str = ""


class ScheduleEvent(Snake, frozen=True, kw_only=True):
    """Payload of ``schedule.triggered``, ``schedule.completed`` and ``schedule.failed``
    (subject ``vb.evt.schedule.<event>.<schedule id>``). ``skipped``: the run was not
    started because the previous one was still going (sent as ``schedule.completed``)."""

    schedule_id: str
    name: str
    job_ids: list[str] = msgspec.field(default_factory=list)
    skipped: bool = False
    message: str = ""
