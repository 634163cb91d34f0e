"""A migration's ``destination.libvirt_uri``: which configured server it names.

A migration writes only to servers of the configuration: their SSH logins, pinned host
keys and TLS exports are what it goes through, and a secret is never sent to a host it
was not given for. So a libvirt URI is not connected to: it is resolved to the one
configured server it names, and anything else is refused (``BadRequest`` naming
``destination.libvirt_uri``, saying to add the server first):

* ``qemu:///system`` (``qemu:///session``): this host, the configured server without a
  ``host`` whose ``uri`` is that (empty counts as ``qemu:///system``);
* ``qemu+ssh://[user@]host[:port]/system`` (also ``qemu+libssh``, ``qemu+libssh2``): the
  server with that ``host`` (compared as text, case-insensitively: no name is looked up)
  and SSH ``port`` (22 when the URI names none), whose ``username`` is ``user`` when the
  URI names one (an empty ``username`` is ``root``, as the inventory logs in), and whose
  libvirt is at that path (``/session`` when its ``uri`` ends so, else ``/system``);
* ``qemu+tls://host[:port]/system`` (``qemu://host/system`` is TLS too, as in libvirt):
  the server whose ``uri`` is a TLS URI of that host, port (16514 by default) and path.

URI parameters (``?keyfile=``, ``?socket=``, ...) and passwords in the URI are refused:
they would be ignored, and a socket names another daemon.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import SplitResult, urlsplit

from virtbackup.contracts.v1.common import shown
from virtbackup.contracts.v1.config import Server
from virtbackup.runtime.errors import BadRequest

FIELD = "destination.libvirt_uri"
SSH_SCHEMES = frozenset({"qemu+ssh", "qemu+libssh", "qemu+libssh2"})
TLS_PORT = 16514
SSH_PORT = 22
PATHS = ("/system", "/session")
_ADD_FIRST = (
    "a migration writes only to configured servers (their SSH login and host key): add "
    "the server to the configuration first, then name it here or in destination.server_id"
)


def _split(uri: str) -> SplitResult:
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in uri):
        raise BadRequest(f"{FIELD}: must not contain control characters")
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise BadRequest(f"{FIELD}: cannot be parsed: {exc}") from None
    if parts.password is not None:
        # Never echoed: the URI holds a secret.
        raise BadRequest(f"{FIELD}: must not hold a password: {_ADD_FIRST}")
    if parts.query or parts.fragment:
        raise BadRequest(
            f"{FIELD}: {shown(uri)}: libvirt URI parameters are not accepted (the "
            "configured server's own settings are used)"
        )
    if parts.path not in PATHS:
        raise BadRequest(f"{FIELD}: {shown(uri)}: the path must be /system or /session")
    return parts


def _server_path(server: Server) -> str:
    path = urlsplit(server.uri).path if server.uri else ""
    return "/session" if path == "/session" else "/system"


def _tls(uri: str) -> tuple[str, int, str] | None:
    """``(host, port, path)`` of a TLS URI (``qemu+tls://`` or ``qemu://host``)."""
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if not parts.hostname or scheme not in ("qemu+tls", "qemu"):
        return None
    return parts.hostname.lower(), port or TLS_PORT, parts.path


def _matches(parts: SplitResult, server: Server) -> bool:
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if scheme == "qemu" and not host:
        return not server.host and (server.uri or "qemu:///system") == f"qemu://{parts.path}"
    if scheme in ("qemu+tls", "qemu"):
        return bool(server.uri) and _tls(server.uri) == (host, parts.port or TLS_PORT, parts.path)
    # An SSH form: the server's SSH settings.
    if not server.host or server.host.lower() != host:
        return False
    if (parts.port or SSH_PORT) != server.port:
        return False
    if parts.username is not None and parts.username != (server.username or "root"):
        return False
    return parts.path == _server_path(server)


def resolve_libvirt_uri(uri: object, servers: Sequence[Server], server_id: str = "") -> str:
    """The id of the one configured server of ``servers`` that ``uri`` names (see the
    module docstring); with ``server_id`` (``destination.server_id`` given too), that
    server, which the URI must name. ``BadRequest`` naming ``destination.libvirt_uri``
    for a URI that is not a string, cannot be parsed, holds a password or parameters,
    uses another transport, names no configured server (add it first), several (name
    one with ``destination.server_id``) or not ``server_id``."""
    if not isinstance(uri, str) or not uri:
        raise BadRequest(f"{FIELD}: expected a libvirt URI (qemu+ssh://user@host/system)")
    if len(uri) > 2048:
        raise BadRequest(f"{FIELD}: longer than 2048 characters")
    parts = _split(uri)
    scheme = parts.scheme.lower()
    if scheme not in SSH_SCHEMES | {"qemu", "qemu+tls"}:
        raise BadRequest(
            f"{FIELD}: {shown(uri)}: transport {shown(parts.scheme)} is not one a configured "
            "server is reached by (qemu:///system, qemu+ssh://user@host/system, "
            "qemu+tls://host/system)"
        )
    if scheme in SSH_SCHEMES | {"qemu+tls"} and not parts.hostname:
        raise BadRequest(f"{FIELD}: {shown(uri)}: names no host")
    found = [s.id for s in servers if _matches(parts, s)]
    if not found:
        raise BadRequest(
            f"{FIELD}: {shown(uri)} is not the URI of a configured server: {_ADD_FIRST}"
        )
    if server_id and server_id not in found:
        raise BadRequest(
            f"{FIELD}: {shown(uri)} names server {', '.join(found)}, not "
            f"destination.server_id {shown(server_id)}: give one of them, or both naming "
            "the same server"
        )
    if server_id:
        return server_id
    if len(found) > 1:
        raise BadRequest(
            f"{FIELD}: {shown(uri)} names several configured servers ({', '.join(found)}): "
            "name one with destination.server_id"
        )
    return found[0]
