"""Where webhooks may point: any address, or, with
``VIRTBACKUP_WEBHOOKS_ALLOW_PRIVATE=false``, public addresses only.

Whoever holds an API token can add a webhook and so make the notifier send requests; by
default that may be any address the notifier reaches (a receiver on the same host or
network is a common set-up). With private targets refused, a URL whose host is, or
resolves to, a loopback, private (RFC 1918, unique local), link-local (cloud metadata
services live there), carrier-grade NAT, multicast, reserved or unspecified address (or
an IPv6 address that carries such an IPv4 address: mapped, compatible, NAT64, 6to4,
Teredo) is refused when the webhook is added or tested (400 naming ``url``) and at every
delivery attempt (a name may resolve elsewhere later: the attempt fails saying why, and is
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


#: NAT64's well-known prefix (RFC 6052): the IPv4 address is the last 32 bits.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
#: NAT64 for local use (RFC 8215): never a public target.
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries, through which a request may reach
    them: IPv4-mapped (``::ffff:a.b.c.d``) and -compatible (``::a.b.c.d``), NAT64
    (``64:ff9b::/96``), 6to4 (``2002::/16``) and Teredo (``2001::/32``: its server and
    its client)."""
    found: list[ipaddress.IPv4Address] = []
    if ip.ipv4_mapped is not None:
        found.append(ip.ipv4_mapped)
    value = int(ip)
    if value >> 32 == 0 and value > 1:  # IPv4-compatible (deprecated, still routed by some)
        found.append(ipaddress.IPv4Address(value))
    if ip in _NAT64:
        found.append(ipaddress.IPv4Address(value & 0xFFFFFFFF))
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)
    return found


def is_public(address: str) -> bool:
    """Whether ``address`` (an IP address) is a public unicast address; an IPv6 address
    that carries an IPv4 address (``embedded_ipv4``) is public only when that is too."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _NAT64_LOCAL:
            return False
        inner = embedded_ipv4(ip)
        if ip.ipv4_mapped is not None:  # an IPv4 address, written as IPv6
            return all(_public(v4) for v4 in inner)
        if inner and not all(_public(v4) for v4 in inner):
            return False
        if ip in _NAT64:  # the well-known prefix is not "global" itself, its targets are
            return True
    return _public(ip)


def _public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
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
