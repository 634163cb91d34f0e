"""NATS subject names.

Subjects read broad to narrow:

* ``vb.cmd.<aggregate>.<verb>``: commands, answered with request/reply. Imperative.
* ``vb.evt.<aggregate>.<event>[.<id>]``: events, stored in the ``VB_EVENTS`` stream.
  Past-tense facts; the event ``type`` is ``<aggregate>.<event>``.
* ``vb.work.transfer``: transfer units, in the ``VB_WORK`` work-queue stream.
"""

from __future__ import annotations

from typing import Final

ROOT: Final = "vb"
CMD_ROOT: Final = "vb.cmd"
EVT_ROOT: Final = "vb.evt"
WORK_ROOT: Final = "vb.work"

EVENTS_ALL: Final = "vb.evt.>"
WORK_ALL: Final = "vb.work.>"
WORK_TRANSFER: Final = "vb.work.transfer"
WORK_TRANSFER_ALL: Final = "vb.work.transfer.>"
#: Units of a job pinned to one transfer worker (a plan run's ``agent_id``):
#: ``vb.work.pinned.<worker>.<job>``, read by that worker's own consumer only.
WORK_PINNED: Final = "vb.work.pinned"
WORK_PINNED_ALL: Final = "vb.work.pinned.>"
#: Deliveries the notifier owes (``VB_NOTIFY``): one subject per webhook, one for ntfy.
NOTIFY_ROOT: Final = "vb.notify"
NOTIFY_ALL: Final = "vb.notify.>"
NOTIFY_NTFY: Final = "vb.notify.ntfy"
#: Job output logs (``VB_JOB_LOGS``): one ``v1.jobctl.LogLine`` per message.
LOG_ROOT: Final = "vb.log"
JOB_LOGS_ALL: Final = "vb.log.job.>"
#: The audit trail (``VB_AUDIT``), written by the gateway only: ``vb.audit.opera`` the
#: operation log (``v1.audit.OperaRecord``, one per mutating request), ``vb.audit.login``
#: login attempts.
AUDIT_ROOT: Final = "vb.audit"
AUDIT_ALL: Final = "vb.audit.>"
AUDIT_OPERA: Final = "vb.audit.opera"
AUDIT_LOGIN: Final = "vb.audit.login"


def notify_webhook(webhook_id: str) -> str:
    """Subject of the deliveries owed to one webhook."""
    _check_token(webhook_id)
    return f"{NOTIFY_ROOT}.webhook.{webhook_id}"


def job_log(job_id: str) -> str:
    """Subject of a job's output lines (``vb.log.job.<job id>``)."""
    _check_token(job_id)
    return f"{LOG_ROOT}.job.{job_id}"


def work_transfer(job_id: str) -> str:
    """Subject of a job's transfer units (purged by job when a job is cancelled)."""
    _check_token(job_id)
    return f"{WORK_TRANSFER}.{job_id}"


def work_pinned(worker: str, job_id: str) -> str:
    """Subject of a job's transfer units pinned to the transfer worker ``worker`` (its
    ``VB_WORKERS`` key); ``worker`` ``*`` gives the filter of the job's pinned units on
    any worker (to purge them)."""
    if worker != "*":
        _check_token(worker)
    _check_token(job_id)
    return f"{WORK_PINNED}.{worker}.{job_id}"


# The five services. Their names are also the NATS queue groups they answer commands in.
GATEWAY: Final = "gateway"
INVENTORY: Final = "inventory"
JOB_ORCHESTRATOR: Final = "job-orchestrator"
TRANSFER_WORKER: Final = "transfer-worker"
NOTIFIER: Final = "notifier"
SERVICES: Final = (GATEWAY, INVENTORY, JOB_ORCHESTRATOR, TRANSFER_WORKER, NOTIFIER)


def command(aggregate: str, verb: str) -> str:
    """Subject of a command: ``vb.cmd.<aggregate>.<verb>``."""
    _check_token(aggregate)
    _check_token(verb)
    return f"{CMD_ROOT}.{aggregate}.{verb}"


def ping(service: str) -> str:
    """Subject every instance of ``service`` answers a liveness ping on."""
    return command(service, "ping")


def event(event_type: str, key: str | None = None) -> str:
    """Subject of an event of ``event_type`` (``<aggregate>.<event>``), narrowed by ``key``."""
    parts = event_type.split(".")
    if len(parts) != 2:
        raise ValueError(f"event type must be '<aggregate>.<event>', got {event_type!r}")
    for part in parts:
        _check_token(part)
    subject = f"{EVT_ROOT}.{event_type}"
    if key is not None:
        _check_token(key)
        subject = f"{subject}.{key}"
    return subject


def event_type_of(subject: str) -> str:
    """The event type (``<aggregate>.<event>``) carried on an event subject."""
    parts = subject.split(".")
    if len(parts) < 4 or parts[0] != ROOT or parts[1] != "evt":
        raise ValueError(f"not an event subject: {subject!r}")
    return f"{parts[2]}.{parts[3]}"


def _check_token(token: str) -> None:
    if not token or any(c in token for c in " .*>\t\r\n"):
        raise ValueError(f"invalid subject token {token!r}")


class JobCmd:
    """Commands answered by the job-orchestrator."""

    LIST: Final = command("job", "list")
    #: How many jobs are in each state (``v1.jobs.JobCounts``), without listing them.
    COUNTS: Final = command("job", "counts")
    GET: Final = command("job", "get")
    CANCEL: Final = command("job", "cancel")
    BACKUP: Final = command("job", "backup")
    RESTORE: Final = command("job", "restore")
    SANITY: Final = command("job", "sanity")
    RESTORE_ENTRIES: Final = command("job", "restore-entries")
    RESTORE_PRECHECK: Final = command("job", "restore-precheck")
    # Restore points as resources, and prune (``v1.points``).
    POINTS: Final = command("job", "points")
    POINT_GET: Final = command("job", "point-get")
    POINT_UPDATE: Final = command("job", "point-update")
    POINT_DELETE: Final = command("job", "point-delete")
    PRUNE: Final = command("job", "prune")
    PRUNE_PLAN: Final = command("job", "prune-plan")
    GC: Final = command("job", "gc")
    VERIFY: Final = command("job", "verify")
    STATS: Final = command("job", "stats")
    # The HyperSDK API's job definitions (``v1.schedules.JobSubmitRequest``).
    SUBMIT: Final = command("job", "submit")
    # Remote agents (``v1.agents``): the gateway leases a queued backup to an agent and
    # passes on what the agent reports about it.
    AGENT_LEASE: Final = command("job", "agent-lease")
    AGENT_STATUS: Final = command("job", "agent-status")
    #: Copy a restore point to another destination (``v1.jobs.CopyRequest``).
    COPY: Final = command("job", "copy")


#: The copy job's request subject (``JobCmd.COPY``), by the name plan chains use.
JOB_COPY: Final = JobCmd.COPY


class JobCtlCmd:
    """Job control (backend-api.md; ``v1.jobctl``), answered by the job-orchestrator."""

    QUERY: Final = command("job", "query")
    DELETE: Final = command("job", "delete")
    CLEAR_QUEUE: Final = command("job", "clear-queue")
    FLUSH: Final = command("job", "flush-history")
    RERUN: Final = command("job", "rerun")
    ARTIFACTS: Final = command("job", "artifacts")
    ARTIFACT_GET: Final = command("job", "artifact-get")
    ARTIFACT_PUT: Final = command("job", "artifact-put")
    CHECKS: Final = command("job", "checks")
    CHECKS_PUT: Final = command("job", "checks-put")


class ScheduleCmd:
    """Schedules (``v1.schedules``), answered by the job-orchestrator."""

    LIST: Final = command("schedule", "list")
    GET: Final = command("schedule", "get")
    CREATE: Final = command("schedule", "create")
    UPDATE: Final = command("schedule", "update")
    DELETE: Final = command("schedule", "delete")
    TRIGGER: Final = command("schedule", "trigger")
    STATS: Final = command("schedule", "stats")


class ExportCmd:
    """Instant-access exports of restore points, answered by the job-orchestrator."""

    CREATE: Final = command("export", "create")
    LIST: Final = command("export", "list")
    STOP: Final = command("export", "stop")


class WorkerCmd:
    """Commands answered by one transfer worker (any, in the ``transfer-worker`` queue)."""

    SERVE_EXPORT: Final = command("worker", "serve-export")


class VaultCmd:
    """The vault's credentials for the services that use them, answered by the gateway
    (the only holder of the vault key). One subject per use, so that the NATS
    permissions decide who may ask for what: the inventory asks for SSH logins only,
    the job-orchestrator and the transfer workers for destinations only."""

    OPEN_SSH: Final = command("vault", "open-ssh")
    OPEN_DESTINATION: Final = command("vault", "open-destination")


class EventType:
    """Event types (the ``type`` of an event envelope and the SSE ``event:`` name)."""

    JOB_CREATED: Final = "job.created"
    JOB_UPDATED: Final = "job.updated"
    JOB_CANCELED: Final = "job.canceled"
    JOB_FINISHED: Final = "job.finished"
    #: A line of a job's output log, as ``/events`` sends it (from ``VB_JOB_LOGS``, not
    #: stored in ``VB_EVENTS``).
    JOB_LOG: Final = "job.log"
    JOB_FAILURE: Final = "agent.job_failure"
    VM_LIFECYCLE: Final = "vm.lifecycle"
    CONFIG_CHANGED: Final = "config.changed"
    UNIT_DONE: Final = "unit.done"
    JOB_PROGRESS: Final = "job.progress"
    SERVICE_STARTED: Final = "service.started"
    SCHEDULE_TRIGGERED: Final = "schedule.triggered"
    SCHEDULE_COMPLETED: Final = "schedule.completed"
    SCHEDULE_FAILED: Final = "schedule.failed"
    #: A webhook delivery or notification the notifier gave up on (``notify`` aggregate).
    NOTIFY_GAVE_UP: Final = "notify.gave_up"
    #: An anomaly was recorded in ``VB_ANOMALIES`` (posted by a remote agent, or raised by
    #: VirtBackup: a backup's size far from its history, a definition drift); key = its id.
    ANOMALY_RAISED: Final = "anomaly.raised"
    #: A VM's domain definition differs from the one of its last backup (disks added,
    #: removed or resized, memory or vCPUs changed); key = the anomaly's id.
    VM_DEFINITION_DRIFT: Final = "vm.definition_drift"


class NotifyCmd:
    """Webhooks and notifications, answered by the notifier (``v1.webhooks``)."""

    WEBHOOKS_LIST: Final = command("notify", "webhooks-list")
    WEBHOOKS_ADD: Final = command("notify", "webhooks-add")
    WEBHOOKS_DELETE: Final = command("notify", "webhooks-delete")
    WEBHOOKS_TEST: Final = command("notify", "webhooks-test")
    NTFY_TEST: Final = command("notify", "ntfy-test")


class InventoryCmd:
    """Commands answered by the inventory service."""

    SERVERS: Final = command("inventory", "servers")
    VMS: Final = command("inventory", "vms")
    REFRESH: Final = command("inventory", "refresh")
    TEST_SSH: Final = command("inventory", "test-ssh")
    ACTION: Final = command("inventory", "action")
    CLEANUP: Final = command("inventory", "cleanup")
    VM_INFO: Final = command("inventory", "vm-info")
    REMOVE_CDROM: Final = command("inventory", "remove-cdrom")
    DOMAIN_XML: Final = command("inventory", "domain-xml")
    DISKS: Final = command("inventory", "disks")
    # The disks of several VMs of one server (``VmsDisksRequest``): a plan's preview.
    DISKS_MANY: Final = command("inventory", "disks-many")
    CHECKPOINTS: Final = command("inventory", "checkpoints")
    CHECKPOINT_FORGET: Final = command("inventory", "checkpoint-forget")
    BACKUP_BEGIN: Final = command("inventory", "backup-begin")
    BACKUP_END: Final = command("inventory", "backup-end")
    RESTORE_PRECHECK: Final = command("inventory", "restore-precheck")
    RESTORE_PREPARE: Final = command("inventory", "restore-prepare")
    RESTORE_FINISH: Final = command("inventory", "restore-finish")
    # Per-VM state files (NVRAM, TPM state): see ``v1.state``.
    STATE_SNAPSHOT: Final = command("inventory", "state-snapshot")
    STATE_READ: Final = command("inventory", "state-read")
    STATE_RELEASE: Final = command("inventory", "state-release")
    STATE_PREPARE: Final = command("inventory", "state-prepare")
    STATE_WRITE: Final = command("inventory", "state-write")
    # A checkpoint's dirty size per disk, without reading data (``v1.plans``).
    CHECKPOINT_SIZE: Final = command("inventory", "checkpoint-size")
    # The libvirt networks of a server (a migration's ``network_mapping``).
    NETWORKS: Final = command("inventory", "networks")
    # Undefine a migrated VM's source (and delete its disk images), for its migration.
    VM_REMOVE: Final = command("inventory", "vm-remove")


class PlanCmd:
    """Backup plans and plan chains (``v1.plans``), answered by the job-orchestrator."""

    IMPORT: Final = command("plan", "import")
    LIST: Final = command("plan", "list")
    GET: Final = command("plan", "get")
    DELETE: Final = command("plan", "delete")
    RUN: Final = command("plan", "run")
    PREVIEW: Final = command("plan", "preview")
    SOURCE_REFS: Final = command("plan", "source-refs")
    ELIGIBLE_AGENTS: Final = command("plan", "eligible-agents")
    RUN_GET: Final = command("plan", "run-get")
    TARGETS: Final = command("plan", "targets")
