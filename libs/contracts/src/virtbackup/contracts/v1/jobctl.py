"""Job control (backend-api.md's ``/api/v1/jobs``): queries, deletes, reruns, agent
reports, artifacts, verification results and the job output log.

The job output log (Proxmox Backup Server's task log) travels on
``vb.log.job.<job id>`` (stream ``VB_JOB_LOGS``), one ``LogLine`` per message.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

import msgspec

from virtbackup.contracts.v1.common import Message
from virtbackup.contracts.v1.jobs import Job, JobState, JobType
from virtbackup.contracts.v1.readable import described

#: The backend API's job status vocabulary. A cancelled job is ``failed`` with the error
#: ``cancelled by user`` (backend-api.md's terminal mutation).
BackendStatus = Literal["queued", "running", "succeeded", "failed"]
LogLevel = Literal["info", "warn", "error"]

#: The exact output line a user cancel appends (backend-api.md).
CANCEL_LINE: Final = "[control] job cancelled by user"
#: The exact error a cancelled job shows in backend views.
CANCEL_ERROR: Final = "cancelled by user"

#: Longest output line kept (longer lines are cut, ending with ``...``).
LINE_MAX: Final = 4096
#: Most lines one status report may carry (backupagent-api.md's log batch).
LINES_PER_REPORT: Final = 100
#: Largest artifact an agent may post, in bytes (decoded).
ARTIFACT_MAX_BYTES: Final = 256 * 1024
#: Largest piece of an artifact one ``ArtifactGetRequest`` answers (a NATS message is
#: at most 1 MiB; base64 grows it by a third).
ARTIFACT_PIECE_BYTES: Final = 512 * 1024
#: What an artifact name may be: one path segment of letters, digits, ``._-``.
ARTIFACT_NAME_PATTERN: Final = described(
    r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}(?![\s\S])",
    "an artifact name (1 to 128 letters, digits, '.', '_', '-', starting with a letter or digit)",
)
ArtifactName = Annotated[str, msgspec.Meta(pattern=ARTIFACT_NAME_PATTERN)]
MediaType = Annotated[
    str,
    msgspec.Meta(
        max_length=127,
        pattern=described(
            r"^[a-z0-9][a-z0-9.+-]*/[a-z0-9][a-z0-9.+-]*$",
            "a media type in lower case (type/subtype, e.g. text/plain)",
        ),
    ),
]
Line = Annotated[str, msgspec.Meta(max_length=LINE_MAX)]


class LogLine(msgspec.Struct, frozen=True, kw_only=True):
    """One line of a job's output log, as stored on ``vb.log.job.<id>``:
    ``{"ts": ISO-8601 UTC, "level": "info|warn|error", "line": str}``."""

    ts: str
    level: LogLevel = "info"
    line: str


class JobQuery(Message, frozen=True, kw_only=True):
    """Jobs newest first (by creation), filtered, one page of them.

    ``status`` is the backend vocabulary (``failed`` covers failed and cancelled jobs),
    ``state`` the agent API's; ``since``/``until`` bound ``createdAt`` (ISO-8601,
    inclusive/exclusive). Pagination is by offset: ``offset`` jobs are skipped, at most
    ``limit`` returned; ``total`` counts every match."""

    status: BackendStatus | None = None
    state: JobState | None = None
    type: JobType | None = None
    server_id: str | None = None
    vm_name: str | None = None
    destination_id: str | None = None
    since: str | None = None
    until: str | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 100
    offset: Annotated[int, msgspec.Meta(ge=0)] = 0


class JobPage(Message, frozen=True, kw_only=True):
    jobs: list[Job]
    total: int
    limit: int
    offset: int


class JobRef(Message, frozen=True, kw_only=True):
    id: str


class FlushRequest(Message, frozen=True, kw_only=True):
    """Remove finished jobs (their logs and artifacts too); with ``older_than`` (ISO-8601)
    only those that finished before it."""

    older_than: str | None = None


class Flushed(Message, frozen=True, kw_only=True):
    removed: int
    ids: list[str]


class ClearQueueRequest(Message, frozen=True, kw_only=True):
    """Cancel every queued job (no fields)."""


class ClearedQueue(Message, frozen=True, kw_only=True):
    """The queued jobs a clear-queue cancelled (running ones are left alone)."""

    cancelled: list[str]


class Rerun(Message, frozen=True, kw_only=True):
    job: Job
    rerun_of: str


class ArtifactInfo(Message, frozen=True, kw_only=True):
    name: str
    size: int
    media_type: str
    #: ``job`` (made by VirtBackup from the job and its restore point) or ``agent``.
    source: Literal["job", "agent"] = "job"


class ArtifactList(Message, frozen=True, kw_only=True):
    artifacts: list[ArtifactInfo]


class ArtifactGetRequest(Message, frozen=True, kw_only=True):
    id: str
    name: str
    offset: int = 0


class ArtifactPiece(Message, frozen=True, kw_only=True):
    """``length`` bytes of the artifact from ``offset`` (base64 in ``data``);
    ``size`` is the whole artifact's."""

    name: str
    media_type: str
    size: int
    offset: int
    data: bytes


class ArtifactPutRequest(Message, frozen=True, kw_only=True):
    id: str
    name: ArtifactName
    media_type: MediaType = "application/octet-stream"
    data: bytes


class CheckOutcome(Message, frozen=True, kw_only=True):
    """One verification result: a check (``sanity``, ``verify`` or an agent's own name),
    what it looked at (``disk``, a point), whether it passed, and details."""

    check: str
    status: Literal["passed", "failed", "skipped"]
    disk: str | None = None
    point: str | None = None
    detail: str = ""
    data: dict[str, Any] = msgspec.field(default_factory=dict)
    source: Literal["job", "agent"] = "agent"
    reported_at: str | None = None


class CheckList(Message, frozen=True, kw_only=True):
    tests: list[CheckOutcome]


class ChecksPutRequest(Message, frozen=True, kw_only=True):
    """``verification``: a restore verification of a backup (backupagent-api.md), which
    comes after the backup ended: taken for a job that ended in success too."""

    id: str
    tests: list[CheckOutcome]
    verification: bool = False
