"""The job-orchestrator's Prometheus metrics (served by ``runtime.metrics``).

Counted by the instance that finishes a job; with several replicas, sum over instances.
"""

from __future__ import annotations

from datetime import datetime

from prometheus_client import Counter, Histogram

from virtbackup.contracts.v1.jobs import Job

#: Seconds from a job's start (``started_at``, else ``created_at``) to its end, by job
#: type and final state (``success``, ``failure``, ``canceled``).
JOB_DURATION = Histogram(
    "virtbackup_job_duration_seconds",
    "Seconds a job ran, by type and final state",
    ["type", "state"],
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400),
)
#: Jobs this instance finished, by type and final state.
JOBS_FINISHED = Counter(
    "virtbackup_jobs_finished_total", "Jobs finished, by type and final state", ["type", "state"]
)

#: The admission line (``slots``): how often it was computed, and the jobs walked doing
#: so (the queued and running ones only, never the finished history).
SLOT_LINES = Counter("virtbackup_slot_lines_total", "Computations of the job slots' line")
SLOT_LINE_JOBS = Counter(
    "virtbackup_slot_line_jobs_total", "Jobs walked by the computations of the slots' line"
)


def _seconds(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def job_finished(job: Job) -> None:
    """Count a job that just reached its final state."""
    JOBS_FINISHED.labels(job.type, job.state).inc()
    start = job.started_at or job.created_at
    if job.finished_at and start:
        elapsed = max(_seconds(job.finished_at) - _seconds(start), 0.0)
        JOB_DURATION.labels(job.type, job.state).observe(elapsed)
