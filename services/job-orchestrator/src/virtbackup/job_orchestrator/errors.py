"""Why a job stops early. Command errors are ``virtbackup.runtime.errors`` (mapped to bus
fault codes there, and to HTTP in the gateway only); these end a job's run instead."""

from __future__ import annotations


class JobStopped(Exception):
    """Base: the job's runner stops here; the final state says why."""


class JobCanceled(JobStopped):
    """A cancel was requested before the job's point of no return. ``notes``: what the
    job's final message adds after ``cancelled by user`` (what the job left behind)."""

    def __init__(self, *args: object, notes: tuple[str, ...] = ()) -> None:
        super().__init__(*args)
        self.notes = notes


class JobLost(JobStopped):
    """This instance no longer holds the job (its lease was taken over): stop silently,
    the new holder ends the job."""


class JobFailed(JobStopped):
    """The job failed for a reason its message names (shown to the user as is)."""


class UnitFailed(JobFailed):
    """A transfer unit failed permanently, or none made progress in time."""


class SanityFailed(JobFailed):
    """The restore point has missing or corrupt parts (named in the message)."""
