"""NBD URIs: the subset of the NBD URI specification (nbd project, doc/uri.md) we speak.

- ``nbd://host[:port][/export]``: TCP, port 10809 by default;
- ``nbd+unix:///export?socket=/path/to.sock``: Unix domain socket;
- ``nbds://`` and ``nbds+unix://``: the same with TLS required (the client must be given
  a TLS context); ``nbds+unix`` takes ``tls-hostname=`` for the name the server's
  certificate must carry.

The export name is the percent-decoded path without its leading slash. vsock schemes
and other parameters are refused with :class:`ValueError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

from .protocol import DEFAULT_PORT


@dataclass(frozen=True, slots=True)
class NbdUri:
    """Where an export is: either ``host``/``port`` or ``socket``, plus the export name;
    ``tls`` when the URI requires TLS."""

    export: str = ""
    host: str | None = None
    port: int = DEFAULT_PORT
    socket: str | None = None
    tls: bool = False
    tls_hostname: str | None = None

    def __post_init__(self) -> None:
        if (self.host is None) == (self.socket is None):
            raise ValueError("an NBD address needs exactly one of host or socket")

    @classmethod
    def parse(cls, uri: str) -> NbdUri:
        """Parse an ``nbd[s]://`` or ``nbd[s]+unix://`` URI; raise ValueError for anything
        else."""
        parts = urlsplit(uri)
        scheme = parts.scheme.lower()
        export = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
        query = parse_qs(parts.query, keep_blank_values=True)
        if scheme in ("nbd", "nbd+tcp", "nbds", "nbds+tcp"):
            if not parts.hostname:
                raise ValueError(f"NBD URI without a host: {uri!r}")
            unknown = set(query)
            if unknown:
                raise ValueError(f"unsupported NBD URI parameters {sorted(unknown)}: {uri!r}")
            try:
                port = parts.port
            except ValueError as exc:
                raise ValueError(f"bad port in NBD URI {uri!r}") from exc
            return cls(
                export=export,
                host=parts.hostname,
                port=port or DEFAULT_PORT,
                tls=scheme.startswith("nbds"),
            )
        if scheme in ("nbd+unix", "nbds+unix"):
            if parts.netloc:
                raise ValueError(f"nbd+unix URI must not name a host: {uri!r}")
            sockets = query.pop("socket", [])
            if len(sockets) != 1 or not sockets[0]:
                raise ValueError(f"nbd+unix URI needs exactly one socket= parameter: {uri!r}")
            tls = scheme == "nbds+unix"
            names = query.pop("tls-hostname", []) if tls else []
            if query:
                raise ValueError(f"unsupported NBD URI parameters {sorted(query)}: {uri!r}")
            return cls(
                export=export, socket=sockets[0], tls=tls, tls_hostname=names[0] if names else None
            )
        raise ValueError(
            f"unsupported NBD URI scheme {parts.scheme!r} (nbd, nbd+unix, nbds, nbds+unix): {uri!r}"
        )

    def __str__(self) -> str:
        path = "/" + quote(self.export, safe="")
        scheme = "nbds" if self.tls else "nbd"
        if self.socket is not None:
            params = {"socket": self.socket}
            if self.tls_hostname:
                params["tls-hostname"] = self.tls_hostname
            return f"{scheme}+unix://{path}?{urlencode(params, safe='/')}"
        host = f"[{self.host}]" if self.host is not None and ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}{path}"
