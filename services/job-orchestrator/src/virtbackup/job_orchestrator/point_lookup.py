"""Finding a restore point by its ``xmlPath`` across the configured destinations, and a
destination's storage faults as API faults naming it.

A leaf module: the handlers, the exports and the points modules all use it, and it
imports none of them (the handlers import the runner, which imports the points, which
import the exports).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from virtbackup.contracts.v1.common import shown
from virtbackup.job_orchestrator.jobctx import JobContext
from virtbackup.repository.format import parse_xml_key
from virtbackup.repository.records import RestorePoint
from virtbackup.repository.repository import NoRepositoryError, RepositoryError
from virtbackup.runtime.agent_config import find_destination
from virtbackup.runtime.errors import BadRequest, NotFound, Unavailable
from virtbackup.storage.errors import NotFoundError, StorageError


@contextlib.contextmanager
def destination_faults(destination_id: str) -> Iterator[None]:
    """A destination's storage errors as faults naming it: 503 (``Unavailable``) whether
    it is unreachable or refuses (a wrong password, a missing bucket), 404 for a missing
    object, instead of an internal error."""
    try:
        yield
    except NotFoundError as exc:
        raise NotFound(f"destination {shown(destination_id)}: {exc}") from None
    except StorageError as exc:
        state = "is unreachable" if exc.retryable else "cannot be used"
        raise Unavailable(f"destination {shown(destination_id)} {state}: {exc}") from None


async def open_point(
    jc: JobContext, xml_path: str, destination_id: str | None
) -> tuple[str, RestorePoint]:
    """The destination and restore point an ``xmlPath`` names: in ``destination_id`` when
    given; else the first destination that has it, in this order: ``restoreDestinationId``,
    ``backupDestinationId``, then every other enabled destination as configured. So an
    ``xmlPath`` from any listing resolves wherever it came from.

    ``BadRequest`` (400) for an ``xmlPath`` outside the repository layout. ``NotFound``
    (404) for an unknown ``destination_id``, or when no destination has the point (naming
    where it looked, and every destination that could not be read and why). With
    ``destination_id``, that destination's own faults: 503 unreachable, 400 a repository
    it cannot open (a wrong passphrase).
    """
    try:
        parse_xml_key(xml_path)
    except ValueError as exc:
        raise BadRequest(f"xmlPath {shown(xml_path)}: {exc}") from None
    cfg = await jc.config()
    if destination_id:
        dest = find_destination(cfg, destination_id)
        return dest.id, await point_in(jc, dest.id, xml_path)
    order = [cfg.restore_destination_id, cfg.backup_destination_id]
    order += [d.id for d in cfg.destinations if d.enabled]
    known = {d.id for d in cfg.destinations}
    candidates = [d for d in dict.fromkeys(order) if d and d in known]
    if not candidates:
        raise NotFound("no destination is configured to look for the restore point in")
    # Asked at once, answered in order: a destination that is slow to fail delays the
    # answer only when every one before it lacks the point.
    lookups = [asyncio.ensure_future(point_in(jc, dest_id, xml_path)) for dest_id in candidates]
    unreadable: list[str] = []
    try:
        for dest_id, lookup in zip(candidates, lookups, strict=True):
            try:
                return dest_id, await lookup
            except NotFound:
                continue
            except (BadRequest, Unavailable) as exc:
                unreadable.append(f"{exc}")
    finally:
        for lookup in lookups:
            lookup.cancel()
        await asyncio.gather(*lookups, return_exceptions=True)
    message = f"no restore point {shown(xml_path)} in destinations {', '.join(candidates)}"
    if unreadable:
        message += "; not searched: " + "; ".join(unreadable)
    raise NotFound(message)


async def point_in(jc: JobContext, destination_id: str, xml_path: str) -> RestorePoint:
    """The restore point ``xml_path`` of one destination: ``NotFound`` when it has no
    repository or no such point, ``Unavailable`` when it cannot be reached, ``BadRequest``
    when its repository cannot be opened (unknown format, wrong passphrase) or the
    record cannot be read."""
    with destination_faults(destination_id):
        try:
            repo = await jc.repository(destination_id, create=False)
        except NoRepositoryError as exc:
            raise NotFound(f"destination {destination_id}: {exc}") from None
        except RepositoryError as exc:
            raise BadRequest(f"destination {destination_id}: {exc}") from None
        try:
            return await repo.restore_point(xml_path)
        except NotFoundError:
            raise NotFound(
                f"no restore point {shown(xml_path)} in destination {destination_id}"
            ) from None
        except RepositoryError as exc:
            raise BadRequest(f"destination {destination_id}: {exc}") from None
        finally:
            await repo.close()
