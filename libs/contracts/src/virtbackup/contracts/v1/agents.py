"""Remote agents: what the gateway asks the job-orchestrator for an agent.

A backup of a VM on a server whose configuration names an ``agentId`` is not run over
the bus: the job waits (phase ``preparing``) until that agent leases it
(``JobCmd.AGENT_LEASE``), and the agent's reports (``JobCmd.AGENT_STATUS``) move it on.
The destination's parameters never travel on the bus: the gateway adds them to the
HTTPS lease answer itself.
"""

from __future__ import annotations

from typing import Any, Final, Literal

import msgspec

from virtbackup.contracts.v1.common import Message
from virtbackup.contracts.v1.jobs import JobState

#: Stages an agent reports (backupagent-api.md's, for VMs), in the order a backup goes;
#: a restore goes ``reading`` (planning, reading the point), ``writing`` (the disks),
#: ``committing`` (moving them into place, defining the domain).
ReportStage = Literal[
    "snapshotting",
    "reading",
    "hashing",
    "compressing",
    "encrypting",
    "uploading",
    "writing",
    "committing",
    "completed",
    "failed",
]
#: The stages an agent reports (``ReportStage``) and ``leased``, where each job starts.
AgentStage = Literal["leased", ReportStage]
#: Stages that end the agent's work on a job.
FINAL_STAGES: Final = frozenset({"completed", "failed"})


class AgentLeaseRequest(Message, frozen=True, kw_only=True):
    """Give ``agent_id`` the oldest backup queued for it, if any."""

    agent_id: str


class AgentLease(Message, frozen=True, kw_only=True):
    """``assigned``: a job was leased (its id, VM, server and destination follow);
    else ``message`` says why not."""

    assigned: bool
    message: str = ""
    job_id: str | None = None
    job_type: str | None = None
    server_id: str | None = None
    vm_name: str | None = None
    destination_id: str | None = None
    #: Debug only: the next backup is a full read.
    fresh: bool = False
    #: A restore's choices (``xmlPath``, ``decision``, ``vmName``, ``targetDirectory``,
    #: ``storagePool``, ``start``: the job's ``params``); empty for a backup.
    params: dict[str, Any] = msgspec.field(default_factory=dict)


class AgentStatusRequest(Message, frozen=True, kw_only=True):
    """What agent ``agent_id`` reports about job ``job_id`` (leased to it).

    ``stage``: where it is; ``committing`` asks to commit (answered ``commit: true``
    unless a cancel came first: from then on a cancel is refused), ``completed`` /
    ``failed`` end the job (``error`` says why it failed). Sizes are bytes:
    ``bytes_read`` from the VM's disks, ``bytes_written`` to the destination,
    ``total_bytes`` to read in all. ``timestamp``/``checkpoint``/``parent_timestamp``:
    the restore point being made, as a backup job's ``result`` records them (``None``:
    unchanged; ``""``: none, e.g. the parent of a full read)."""

    agent_id: str
    job_id: str
    stage: AgentStage
    message: str = ""
    error: str = ""
    bytes_read: int | None = None
    bytes_written: int | None = None
    total_bytes: int | None = None
    chunks_done: int | None = None
    chunks_total: int | None = None
    timestamp: str | None = None
    checkpoint: str | None = None
    parent_timestamp: str | None = None
    #: How long the stage being left took, as the agent measured it (backupagent-api's
    #: ``durationMs``; ``None``: the orchestrator's clock decides).
    duration_ms: int | None = None
    #: Where the restore point went (backupagent-api's ``uploadPath``).
    upload_path: str | None = None


class AgentStatusReply(Message, frozen=True, kw_only=True):
    """``cancel``: stop and end the libvirt job, dropping its checkpoint (the job was
    cancelled or has ended); ``commit``: the agent may write its restore point."""

    cancel: bool
    commit: bool = False
    state: JobState
