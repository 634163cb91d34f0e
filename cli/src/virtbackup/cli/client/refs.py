"""Short ids, as the default tables show them (``output.short_job_id``,
``short_point_id``), turned back into full ones by asking the API's listings.

A reference that is a full id is used as it is (the API says when there is no such
thing); a short one must name exactly one job or point, else ``ApiError`` naming the
candidates.
"""

from __future__ import annotations

from virtbackup.cli.client.api import Api, ApiError
from virtbackup.cli.client.output import short_point_id

#: A job id of at least this many characters is taken as a full one (they have 24).
FULL_JOB_ID = 20
#: The fewest characters of a short id taken (fewer would match by chance).
MIN_SHORT = 4
#: How many of the newest jobs a short job id is looked for in (the API's maximum).
JOB_WINDOW = 1000


def job_id(api: Api, ref: str) -> str:
    """The full id of the job ``ref`` names: a full id, or the end (as the table shows
    it) or start of one among the newest 1000 jobs.

    Raises ``ApiError`` when several match; a ``ref`` no job matches is returned as it
    is, so that the API's own "not found" names it."""
    ref = ref.strip()
    if len(ref) >= FULL_JOB_ID or len(ref) < MIN_SHORT:
        return ref
    page = api.get("/api/v1/jobs", limit=JOB_WINDOW)
    ids = [str(j.get("id", "")) for j in page.get("jobs", []) if isinstance(j, dict)]
    found = sorted({i for i in ids if i == ref or i.endswith(ref) or i.startswith(ref)})
    if ref in found:
        return ref
    if len(found) > 1:
        raise ApiError(0, f"{ref!r} names several jobs ({', '.join(found[:5])}): give more of it")
    return found[0] if found else ref


def point_id(api: Api, ref: str) -> str:
    """The full id of the restore point ``ref`` names: a full id
    (``<destination>~<vm>~<timestamp>``), or the start of its short id (``points ls``)
    among every point of every destination.

    Raises ``ApiError`` when none or several match."""
    ref = ref.strip()
    if "~" in ref:
        return ref
    if len(ref) < MIN_SHORT:
        raise ApiError(
            0, f"{ref!r} is no restore point id: give its id or short id (see `points ls`)"
        )
    points = api.get("/api/v1/restore-points")
    ids = [str(p.get("id", "")) for p in points if isinstance(p, dict)]
    found = sorted({i for i in ids if short_point_id(i).startswith(ref.lower())})
    if not found:
        raise ApiError(0, f"no restore point has the short id {ref!r} (see `points ls`)")
    if len(found) > 1:
        raise ApiError(0, f"{ref!r} names several restore points ({', '.join(found[:5])})")
    return found[0]
