"""Instant access: read-only NBD exports of one disk of a restore point.

An export is kept in ``VB_EXPORTS`` (key = export id) as an :class:`InstantExport`. The
job-orchestrator creates the record (``starting``) and asks one transfer worker to serve
it (``vb.cmd.worker.serve-export``); that worker starts its NBD server, marks the record
``active`` with its address, and ends it: ``stopped`` when a stop was asked
(``stopping``), ``expired`` when its lifetime is over. A record that names a worker which
is gone is ``failed``. No record ever holds a private key: the client certificate's key
is made by the caller (the gateway), which sends only its public key and returns the key
to the user once.
"""

from __future__ import annotations

from typing import Final, Literal

import msgspec

from virtbackup.contracts.v1.common import Message

ExportState = Literal["starting", "active", "stopping", "stopped", "expired", "failed"]
#: States in which an export may still be (or become) reachable.
LIVE_EXPORT_STATES: Final = frozenset({"starting", "active", "stopping"})

#: Lifetime of an export when the request names none, and the range allowed (seconds).
DEFAULT_TTL_SECONDS: Final = 3600
MIN_TTL_SECONDS: Final = 1
MAX_TTL_SECONDS: Final = 24 * 3600


class InstantExport(Message, frozen=True, kw_only=True):
    """An export as ``VB_EXPORTS`` keeps it and ``GET /restore/exports`` lists it.

    Times are ISO 8601 UTC. ``size`` is the disk's size in bytes. ``nbd_url`` (``nbds://``,
    TLS required) and ``export_name`` are set once a worker serves it; ``worker`` is that
    worker's key in ``VB_WORKERS`` and ``worker_started_at`` its start time (a restarted
    worker of the same name is another worker). ``client_fingerprint`` is the SHA-256
    (hex) of the only client certificate the export accepts. ``message`` says why an
    ended export ended."""

    id: str
    state: ExportState
    message: str = ""
    xml_path: str
    vm_name: str
    timestamp: str
    disk: str
    size: int = 0
    destination_id: str
    created_at: str
    expires_at: str
    ended_at: str | None = None
    nbd_url: str = ""
    export_name: str = ""
    worker: str = ""
    worker_started_at: str = ""
    client_fingerprint: str = ""


class ExportCreateRequest(Message, frozen=True, kw_only=True):
    """``POST /restore/exports``: export ``disk`` (a target, e.g. ``vda``) of the point
    ``xml_path`` names, for ``ttl_seconds`` (default :data:`DEFAULT_TTL_SECONDS`).
    ``client_public_key`` is the PEM public key the client certificate is issued for."""

    xml_path: str
    disk: str
    destination_id: str | None = None
    ttl_seconds: int | None = None
    client_public_key: str


class ExportTls(Message, frozen=True, kw_only=True):
    """The export's own CA certificate (it signed the server's and the client's
    certificate, and nothing else) and the client certificate, both PEM."""

    ca_cert: str
    client_cert: str


class ExportCreated(Message, frozen=True, kw_only=True):
    export: InstantExport
    tls: ExportTls


class ExportServeRequest(Message, frozen=True, kw_only=True):
    """To one transfer worker: serve the export whose ``starting`` record is ``id``."""

    id: str
    client_public_key: str


class ExportListRequest(Message, frozen=True, kw_only=True):
    """List exports, newest first; ``live_only`` keeps those not ended."""

    live_only: bool = False


class ExportList(Message, frozen=True, kw_only=True):
    exports: list[InstantExport] = msgspec.field(default_factory=list)


class ExportStopRequest(Message, frozen=True, kw_only=True):
    id: str
