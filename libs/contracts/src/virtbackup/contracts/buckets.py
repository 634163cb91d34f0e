"""JetStream key-value bucket definitions.

State lives in these buckets. Updates that race use compare-and-swap on the revision.
"""

from __future__ import annotations

import base64
from typing import Final

import msgspec


class BucketSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What a key-value bucket must look like."""

    name: str
    history: int = 1
    ttl_seconds: float = 0.0
    description: str = ""


JOBS: Final = BucketSpec(name="VB_JOBS", history=5, description="Jobs by id.")
CONFIG: Final = BucketSpec(
    name="VB_CONFIG", history=10, description="The agent configuration (key 'agent')."
)
INVENTORY: Final = BucketSpec(name="VB_INVENTORY", description="VM cache per server.")
SCHEDULES: Final = BucketSpec(name="VB_SCHEDULES", description="Schedules by id.")
WEBHOOKS: Final = BucketSpec(name="VB_WEBHOOKS", description="Webhooks.")
#: Users, roles, API tokens' SHA-256, sessions, login lockouts and the sealed JWT
#: signing key (``gateway.identity_store``). Owned by the gateway.
USERS: Final = BucketSpec(name="VB_USERS", description="Users and roles.")
VAULT: Final = BucketSpec(name="VB_VAULT", description="Encrypted credentials.")
WORKERS: Final = BucketSpec(
    name="VB_WORKERS", ttl_seconds=30.0, description="Live workers; entries expire."
)

#: Seconds a job's lease lives without renewal: when the orchestrator instance holding
#: it dies, another takes the job over this long after its last renewal.
LEASE_SECONDS: Final = 10.0
LOCKS: Final = BucketSpec(
    name="VB_LOCKS",
    description="Per-VM locks: key vm.<server>.<vm>, value the id of the job holding it.",
)


def vm_lock_key(server_id: str, vm_name: str) -> str:
    """``vm.<server>.<vm>``: the key of a VM's lock in ``VB_LOCKS``, each part base64url
    (no padding) so that any VM name is a valid key. The value is JSON naming the job
    that holds it (``{"jobId": ..., "jobType": ..., "takenAt": ...}``); the lock counts
    while that job is active in ``VB_JOBS``."""

    def enc(text: str) -> str:
        return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=") or "_"

    return f"vm.{enc(server_id)}.{enc(vm_name)}"


LEASES: Final = BucketSpec(
    name="VB_LEASES",
    ttl_seconds=LEASE_SECONDS,
    description="Job leases: key = job id, value = the holding orchestrator; entries expire.",
)

#: Seconds a record of ``VB_EXPORTS`` is kept after its last change: longer than any
#: export lives (24 h), so an export's record outlives it, and ended ones go by themselves.
EXPORT_RECORD_SECONDS: Final = 2 * 24 * 3600.0
EXPORTS: Final = BucketSpec(
    name="VB_EXPORTS",
    ttl_seconds=EXPORT_RECORD_SECONDS,
    description="Instant-access exports of restore points: key = export id.",
)

PLANS: Final = BucketSpec(
    name="VB_PLANS",
    description="Backup plans: project.<id> (a project's plans and chains), run.<id> (runs).",
)
#: Remote agents (``virtbackup agent``): key ``agent.<id>`` (the record, its API key
#: only as SHA-256), ``key.<sha256 hex>`` (the agent id a key belongs to) and
#: ``regtoken.<sha256 hex>`` (a one-time registration token). Owned by the gateway.
AGENTS: Final = BucketSpec(name="VB_AGENTS", history=1, description="Remote agents.")
#: What jobs produced beyond their record: artifacts agents posted (``art.<job>.<name>``)
#: and verification results they reported (``checks.<job>``); gone with the job.
JOB_FILES: Final = BucketSpec(
    name="VB_JOB_FILES",
    description="Job artifacts and test results posted by agents: art.<job>.<name>, checks.<job>.",
)

#: Anomalies and domain definitions (backupagent-api.md's anomaly and schema-snapshot):
#: ``anomaly.<id>`` (an :class:`~virtbackup.contracts.v1.anomalies.Anomaly`),
#: ``def.<server>.<vm>`` (base64url parts: the definition of the VM's last backup, a
#: ``DefinitionRecord``) and ``snap.<id>`` (a definition an agent posted). Written by the
#: gateway (agents' reports) and the job-orchestrator (checks after each backup).
ANOMALIES: Final = BucketSpec(
    name="VB_ANOMALIES",
    description="Anomalies (anomaly.<id>), backed-up definitions (def.<server>.<vm>), snapshots.",
)

CONFIG_KEY: Final = "agent"

ALL: Final = (
    JOBS,
    CONFIG,
    INVENTORY,
    SCHEDULES,
    WEBHOOKS,
    USERS,
    VAULT,
    WORKERS,
    LOCKS,
    LEASES,
    EXPORTS,
    PLANS,
    AGENTS,
    JOB_FILES,
    ANOMALIES,
)
