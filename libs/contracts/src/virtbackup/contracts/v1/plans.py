"""Backup plans (backend-api.md's projects and pipelines) and plan chains (pipeline chains).

A **project** is one YAML document (``ProjectSpec``, camelCase keys like ``agent.yaml``)
holding plans (``pipelines``) and chains (``chains``). The gateway parses it strictly
(unknown keys, tabs, duplicate keys and wrong types are 400s naming the line); the
job-orchestrator checks it against the configuration and the inventory (servers,
destinations, VMs, cron expressions) and keeps it in ``VB_PLANS`` (key
``project.<id>``). A plan is addressed as ``<projectId>.<pipelineId>`` (its
``pipelineDbId``), a chain as ``<projectId>.<chainId>`` (its ``chainDbId``).

The run, preview and resolution messages are snake_case (``Snake``), as backend-api.md
writes the run payload (``source_ref``, ``agent_id``, ``dry_run``, ``execution_mode``,
``offline_cached_only``).
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec

from virtbackup.contracts.v1.common import Message, ServerId
from virtbackup.contracts.v1.config import RetentionPolicy, Strict
from virtbackup.contracts.v1.schedules import Snake

#: A project, plan or chain id: a KV key part and one URL segment, no dots (a
#: ``pipelineDbId`` is ``<projectId>.<pipelineId>``).
PLAN_ID_PATTERN: Final = r"^[A-Za-z0-9_-]{1,64}(?![\s\S])"
PlanId = Annotated[str, msgspec.Meta(pattern=PLAN_ID_PATTERN)]
#: A VM name or a glob (``*``, ``?``, ``[...]``) over the server's VM names.
VmPattern = Annotated[
    str, msgspec.Meta(min_length=1, max_length=247, pattern=r"^[^\x00-\x1f\x7f/]+(?![\s\S])")
]
DestinationRef = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
#: Seconds an inventory cache may be old for ``execution_mode: offline_cached``.
DEFAULT_CACHE_MAX_AGE_SECONDS: Final = 900
#: An icon given in the YAML (inline ``<svg ...>`` text or a ``data:image/png;base64,``
#: or ``data:image/svg+xml;base64,`` URI), at most 64 KiB.
ICON_MAX_LENGTH: Final = 65536


# -- the YAML document ------------------------------------------------------------------


class VmSelector(Strict, kw_only=True):
    """VMs of one server: ``vm`` is a name or a glob (at least one VM must match)."""

    server: ServerId
    vm: VmPattern


class PlanSchedule(Strict, kw_only=True):
    """When the plan runs by itself: a cron expression (5 fields, 6 with seconds last,
    or ``@daily``) read in ``timezone`` (IANA). Run by the orchestrator's scheduler
    (``VB_SCHEDULES``, exactly once per due time across replicas)."""

    cron: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    timezone: str = "UTC"
    enabled: bool = True


class PlanOptions(Strict, kw_only=True):
    """``cacheMaxAgeSeconds``: how old the inventory's cache may be for an
    ``offline_cached`` run or preview (seconds, default 900)."""

    cache_max_age_seconds: Annotated[int, msgspec.Meta(ge=1, le=30 * 86400)] = (
        DEFAULT_CACHE_MAX_AGE_SECONDS
    )


class PipelineSpec(Strict, kw_only=True):
    """A backup plan: VMs, a destination, an optional schedule, retention and options.
    ``retention`` (issue 14's keep rules) is applied by a prune after each
    run-selection of the plan (scheduled runs follow the destination's own policy)."""

    id: PlanId
    name: str = ""
    description: str = ""
    vms: Annotated[list[VmSelector], msgspec.Meta(min_length=1, max_length=1000)]
    destination: DestinationRef
    schedule: PlanSchedule | None = None
    retention: RetentionPolicy | None = None
    options: PlanOptions = msgspec.field(default_factory=PlanOptions)


class BackupStep(Strict, kw_only=True, tag="backup", tag_field="type"):
    """Back up the VMs of plan ``pipeline`` (of the same project). ``destinations``:
    where to (default: the plan's destination); more than one are written from one read
    of each VM (``BackupRequest.also_destination_ids``)."""

    pipeline: PlanId
    destinations: list[DestinationRef] = msgspec.field(default_factory=list)


class VerifyStep(Strict, kw_only=True, tag="verify", tag_field="type"):
    """Verify the points the chain's backup step made (issue 14's verify job), in
    ``destination`` (default: every destination the backup step wrote)."""

    mode: Literal["full", "sample"] = "full"
    sample_percent: Annotated[int, msgspec.Meta(ge=1, le=100)] | None = None
    destination: DestinationRef | None = None


class CopyStep(Strict, kw_only=True, tag="copy", tag_field="type"):
    """Copy each VM's newest point from ``destination`` to ``target`` (the copy job,
    ``CopyRequest``)."""

    destination: DestinationRef
    target: DestinationRef


ChainStep = BackupStep | VerifyStep | CopyStep


class ChainSpec(Strict, kw_only=True):
    """Steps run in order, each once the previous one's jobs have all succeeded; the
    first must be a backup."""

    id: PlanId
    name: str = ""
    description: str = ""
    steps: Annotated[list[ChainStep], msgspec.Meta(min_length=1, max_length=50)]


class ProjectSpec(Strict, kw_only=True):
    """The YAML document ``POST /api/v1/projects/import`` takes."""

    id: PlanId
    name: str = ""
    description: str = ""
    icon: Annotated[str, msgspec.Meta(max_length=ICON_MAX_LENGTH)] | None = None
    pipelines: list[PipelineSpec] = msgspec.field(default_factory=list)
    chains: list[ChainSpec] = msgspec.field(default_factory=list)


# -- records and commands -----------------------------------------------------------------


class ProjectSource(Snake, frozen=True, kw_only=True):
    """Where a project came from: ``kind`` ``inline`` (the YAML was posted; ``reload``
    checks it again against the current configuration and inventory) or ``path`` (a file
    under the gateway's projects directory; ``reload`` reads it again)."""

    kind: Literal["inline", "path"]
    path: str | None = None
    yaml: str


class Project(Snake, frozen=True, kw_only=True):
    """A project as ``VB_PLANS`` keeps it (key ``project.<id>``). ``schedule_ids``: the
    schedules (``VB_SCHEDULES``) its plans' schedules run as."""

    id: str
    name: str
    description: str = ""
    spec: ProjectSpec
    source: ProjectSource
    schedule_ids: list[str] = msgspec.field(default_factory=list)
    imported_at: str
    updated_at: str


class ProjectImportRequest(Snake, frozen=True, kw_only=True):
    """Store a parsed project. ``lines``: the YAML line of each JSON path (``$.pipelines
    [0].destination`` -> 12) so that a refusal names the line. ``replace``: an import of
    an existing id replaces it (``reload``; a plain import of a taken id is a 409)."""

    spec: ProjectSpec
    source: ProjectSource
    lines: dict[str, int] = msgspec.field(default_factory=dict)
    replace: bool = False


class ProjectRef(Snake, frozen=True, kw_only=True):
    id: str


class ProjectList(Snake, frozen=True, kw_only=True):
    projects: list[Project]


ExecutionMode = Literal["online", "offline_cached"]


class RunOptions(Snake, frozen=True, kw_only=True):
    """backend-api.md's run payload (run-selection, chain run, previews).

    ``vms``: for run-selection, the ``<server>/<vm>`` names to run (default: all of the
    plan's). ``source_ref``: the timestamp of a restore point of the VM to build on, or
    ``full`` to force a full read (a point that does not exist or is another VM's is a
    400). ``agent_id``: pin to an eligible agent (else 400). ``dry_run``: answer the
    preview, create nothing. ``execution_mode`` ``offline_cached``: resolve from the
    inventory's cache and the known checkpoints without asking the hosts (refused, 400,
    when the cache is older than the plan's ``cacheMaxAgeSeconds``).
    ``offline_cached_only``: a preview lists only the VMs that can be resolved so."""

    vms: list[str] | None = None
    source_ref: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] | None = None
    agent_id: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] | None = None
    dry_run: bool = False
    execution_mode: ExecutionMode = "online"
    offline_cached_only: bool = False


class PlanRunRequest(Snake, frozen=True, kw_only=True):
    """Run, preview or resolve plan ``pipeline_db_id`` or chain ``chain_db_id`` (one)."""

    pipeline_db_id: str | None = None
    chain_db_id: str | None = None
    options: RunOptions = msgspec.field(default_factory=RunOptions)


class PlanTargets(Snake, frozen=True, kw_only=True):
    """The VMs a run would back up now (``<server>/<vm>``, sorted)."""

    vms: list[str] = msgspec.field(default_factory=list)


class PreviewDisk(Snake, frozen=True, kw_only=True):
    """One disk: ``mode`` full or incremental; ``estimated_bytes`` what the run would read
    (incremental: the checkpoint's dirty size as libvirt reports it; full: the disk's
    capacity, an upper bound; ``None`` when unknown, e.g. offline); ``reason`` why full."""

    target: str
    mode: Literal["full", "incremental"]
    capacity: int = 0
    estimated_bytes: int | None = None
    reason: str = ""


class PreviewDestination(Snake, frozen=True, kw_only=True):
    """What one destination of a backup writing to several would get: ``incremental`` on
    its newest point (``parent_timestamp``) when that point has the checkpoint the read
    starts from, else ``full``; ``estimated_bytes`` what it is sent (``None`` unknown)."""

    destination_id: str
    mode: Literal["full", "incremental"]
    parent_timestamp: str | None = None
    estimated_bytes: int | None = None
    reason: str = ""


class PreviewVm(Snake, frozen=True, kw_only=True):
    """What a run would do for one VM: ``parent_timestamp`` / ``parent_checkpoint`` the
    restore point and libvirt checkpoint it builds on (``None`` for a full);
    ``estimated_bytes`` the disks' sum (``None`` if one is unknown); ``cached``: resolved
    from the inventory's cache only; ``problems``: why it could not be resolved."""

    server_id: str
    vm_name: str
    destination_id: str
    mode: Literal["full", "incremental"]
    parent_timestamp: str | None = None
    parent_checkpoint: str | None = None
    disks: list[PreviewDisk] = msgspec.field(default_factory=list)
    estimated_bytes: int | None = None
    cached: bool = False
    problems: list[str] = msgspec.field(default_factory=list)
    #: A chain's backup step writing to several destinations: each one (the first is
    #: ``destination_id``). ``estimated_bytes`` above is then what the one read takes:
    #: every disk's capacity when one destination needs a full read.
    destinations: list[PreviewDestination] = msgspec.field(default_factory=list)


class Preview(Snake, frozen=True, kw_only=True):
    """``dry-run-preview``: per VM of the plan (or of the chain's backup step)."""

    pipeline_db_id: str | None = None
    chain_db_id: str | None = None
    execution_mode: ExecutionMode = "online"
    vms: list[PreviewVm] = msgspec.field(default_factory=list)
    estimated_bytes: int | None = None


class PointRefInfo(Snake, frozen=True, kw_only=True):
    timestamp: str
    checkpoint: str | None = None
    kind: str = "full"


class VmSourceRefs(Snake, frozen=True, kw_only=True):
    """The restore points of the VM in the destination (newest last; ``latest``: the one a
    run builds on) and the libvirt checkpoints of the VM (``chain_intact``: the newest one
    may be built on)."""

    server_id: str
    vm_name: str
    destination_id: str
    points: list[PointRefInfo] = msgspec.field(default_factory=list)
    latest: str | None = None
    checkpoints: list[str] = msgspec.field(default_factory=list)
    chain_intact: bool = False
    problems: list[str] = msgspec.field(default_factory=list)


class SourceRefs(Snake, frozen=True, kw_only=True):
    vms: list[VmSourceRefs] = msgspec.field(default_factory=list)


class EligibleAgent(Snake, frozen=True, kw_only=True):
    """An agent that could run the plan: ``kind`` ``transfer-worker`` (a live worker of
    ``VB_WORKERS``) or ``remote`` (a registered remote agent)."""

    id: str
    kind: Literal["transfer-worker", "remote"]
    version: str = ""
    last_seen: str = ""
    busy_units: int = 0
    eligible: bool = True
    reason: str = ""


class EligibleAgents(Snake, frozen=True, kw_only=True):
    agents: list[EligibleAgent] = msgspec.field(default_factory=list)


StepState = Literal["pending", "running", "success", "failure", "skipped"]


class StepRun(Snake, frozen=True, kw_only=True):
    type: Literal["backup", "verify", "copy", "prune"]
    state: StepState = "pending"
    job_ids: list[str] = msgspec.field(default_factory=list)
    message: str = ""
    #: A prune step's VMs handled so far (it prunes one VM at a time).
    done: int = 0


class PlanRun(Snake, frozen=True, kw_only=True):
    """A run of a plan or chain (``VB_PLANS`` key ``run.<id>``): its steps in order, each
    with the jobs it created (each job's ``params.planRunId`` is this id). ``state``
    ``running`` until every step ended; a failed step fails the run and skips the rest.
    Advanced by any orchestrator replica with compare-and-swap."""

    id: str
    pipeline_db_id: str | None = None
    chain_db_id: str | None = None
    state: Literal["running", "success", "failure"] = "running"
    targets: list[str] = msgspec.field(default_factory=list)
    steps: list[StepRun] = msgspec.field(default_factory=list)
    options: RunOptions = msgspec.field(default_factory=RunOptions)
    message: str = ""
    created_at: str
    updated_at: str
    claimed_at: str | None = None
    #: The replica (and claim) that started the running step.
    claimed_by: str | None = None


class PlanRunResult(Snake, frozen=True, kw_only=True):
    """What a run did: the run and its first jobs, or the preview (``dry_run``)."""

    run_id: str | None = None
    job_ids: list[str] = msgspec.field(default_factory=list)
    dry_run: bool = False
    preview: Preview | None = None
    run: PlanRun | None = None


class PlanRunRef(Snake, frozen=True, kw_only=True):
    id: str


# -- inventory: a checkpoint's dirty size -------------------------------------------------


class CheckpointSizeRequest(Message, frozen=True, kw_only=True):
    """How many bytes of each disk were written since ``checkpoint`` (libvirt's
    ``VIR_DOMAIN_CHECKPOINT_XML_SIZE``; the domain must be running). Reads no data."""

    server_id: ServerId
    vm_name: str
    checkpoint: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class DiskDirtySize(Message, frozen=True, kw_only=True):
    """``size``: bytes dirtied since the checkpoint; ``None`` when the disk has no usable
    bitmap (missing or inconsistent, or the disk is not part of the checkpoint)."""

    target: str
    size: int | None = None


class CheckpointSize(Message, frozen=True, kw_only=True):
    checkpoint: str
    disks: list[DiskDirtySize] = msgspec.field(default_factory=list)
