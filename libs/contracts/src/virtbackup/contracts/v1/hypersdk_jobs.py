"""A job as the HyperSDK API shows it: one builder for ``GET /jobs/{id}``,
``/jobs/query``, the ``jobs`` and ``job_update`` messages of ``/ws`` and the ``data.job``
of every ``job.*`` webhook, so that a client sees one shape wherever a job appears.

The view (snake_case, as the document writes it)::

    {"definition": {"id", "type", "vm_path", "source": {"type", "server_id"},
                    "destination": {"type"?, "destination_id"}},
     "status": "pending" | "running" | "completed" | "failed" | "cancelled",
     "progress": {"stage", "percent_complete", "current_bytes", "total_bytes"},
     "message", "created_at", "started_at", "completed_at", "error"}

``status`` is the document's name of the job's state (``queued`` -> ``pending``,
``success`` -> ``completed``, ``failure`` -> ``failed``, ``canceled`` -> ``cancelled``);
``stage`` the job's phase (a migration's: ``copying``, ``syncing``, ``cutover``,
``starting``, ``completed``; its ``destination`` is ``{"type": "kvm", "server_id"}``,
with ``via_destination_id`` when it goes through a backup destination);
``percent_complete`` 0-100 (100 only once it succeeded), from
bytes when the total is known, else from units; bytes are of the VM's disks read so far
and in all (``total_bytes`` 0 until known); times are ISO 8601 UTC or ``None``;
``error`` is the message of a failed job, else ``None``.

``vm_path`` is ``<server>/<vm>``; a job of a selection of restore points (prune,
verify) that names only one of them has ``*`` for the other (``*/web1``: that VM's
points of every server); a job of no VM (garbage collection) has ``""`` and
``server_id`` ``None``.
"""

from __future__ import annotations

from typing import Any, Final

from virtbackup.contracts.v1.jobs import Job, JobState

#: The HyperSDK document's job status for each VirtBackup job state.
STATUS: Final[dict[JobState, str]] = {
    "queued": "pending",
    "running": "running",
    "success": "completed",
    "failure": "failed",
    "canceled": "cancelled",
}


def _selection(job: Job) -> tuple[str | None, str | None]:
    """The server and VM a job is of: its own fields, else (prune, verify: a selection of
    a destination's points) the ``serverId``/``vmName`` of its params."""
    server = job.server_id or job.params.get("serverId")
    vm = job.vm_name or job.params.get("vmName")
    return (
        server if isinstance(server, str) and server else None,
        vm if isinstance(vm, str) and vm else None,
    )


def job_view(job: Job) -> dict[str, Any]:
    """``job`` in the HyperSDK shape (see the module docstring)."""
    server_id, vm_name = _selection(job)
    vm_path = f"{server_id or '*'}/{vm_name or '*'}" if server_id or vm_name else ""
    destination: dict[str, Any] = {"destination_id": job.destination_id}
    if job.type == "backup":
        destination = {"type": "backup", **destination}
    stage: Any = job.phase
    if job.type == "migration":
        # A migration's stages: copying, syncing, cutover, starting, completed.
        destination = {"type": "kvm", "server_id": job.params.get("targetServerId")}
        if via := job.params.get("viaDestinationId"):  # through a backup destination
            destination["via_destination_id"] = via
        if job.params.get("targetLibvirtUri"):
            destination["libvirt_uri"] = job.params["targetLibvirtUri"]
        stage = "completed" if job.state == "success" else job.result.get("stage", job.phase)
    if job.state == "success":
        percent = 100
    elif job.total_bytes:
        percent = min(99, job.bytes_transferred * 100 // job.total_bytes)
    elif job.total_units:
        percent = min(99, job.completed_units * 100 // job.total_units)
    else:
        percent = 0
    return {
        "definition": {
            "id": job.id,
            "type": job.type,
            "vm_path": vm_path,
            "source": {"type": "libvirt", "server_id": server_id},
            "destination": destination,
        },
        "status": STATUS[job.state],
        "progress": {
            "stage": stage,
            "percent_complete": percent,
            "current_bytes": job.bytes_transferred,
            "total_bytes": job.total_bytes,
        },
        "message": job.message,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "completed_at": job.finished_at,
        "error": job.message if job.state == "failure" else None,
    }
