"""Where webhooks may point: any address, or, with
``VIRTBACKUP_WEBHOOKS_ALLOW_PRIVATE=false``, public addresses only.

Whoever holds an API token can add a webhook and so make the notifier send requests; by
default that may be any address the notifier reaches (a receiver on the same host or
network is a common set-up). With private targets refused, a URL whose host is, or
resolves to, a loopback, private (RFC 1918, unique local), link-local (cloud metadata
services live there), carrier-grade NAT, multicast, reserved or unspecified address is
refused when the webhook is added or tested (400 naming ``url``) and at every delivery
attempt (a name may resolve elsewhere later: the attempt fails saying why, and is
retried and given up as any failed attempt). What remains possible is a name that
resolves to a public address when checked and to a private one a moment later (DNS
rebinding within one attempt); a deployment that must exclude that too should also
restrict the notifier's egress in its network.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

from virtbackup.contracts.v1.common import shown


class PrivateTarget(Exception):
    """The URL's host is or resolves to an address that is not public (the message says
    which), or cannot be resolved."""


def is_public(address: str) -> bool:
    """Whether ``address`` (an IP address) is a public unicast address."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


async def check_public(url: str) -> None:
    """``PrivateTarget`` unless every address ``url``'s host resolves to is public."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise PrivateTarget(
            f"host {shown(host)} cannot be resolved ({exc}); private targets are refused, "
            "so only a host that resolves to public addresses is accepted"
        ) from None
    for info in infos:
        address = str(info[4][0])
        if not is_public(address):
            raise PrivateTarget(
                f"host {shown(host)} is or resolves to {address}, which is not a public "
                "address, and private targets are refused (VIRTBACKUP_WEBHOOKS_ALLOW_PRIVATE)"
            )
