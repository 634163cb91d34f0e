"""The credentials of the NBD exports the inventory starts: TLS with client certificates.

The inventory keeps VirtBackup's CA (made at first start, see
:mod:`virtbackup.virt.pki`) and the client certificate the transfer workers present
(``<pki>/nbd-client``, read by the workers from the same place). Before an export is
started on a server, that server's libvirt TLS folder is given a server certificate for
the address the workers dial (:mod:`virtbackup.virt.nbd_tls`; a session server's in its
user's own folder); exports then refuse any client without a certificate the CA signed.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from virtbackup.inventory.hosts import HostServer
from virtbackup.nbd.tls import client_context_from_dir
from virtbackup.runtime.errors import Conflict
from virtbackup.virt.nbd_tls import TlsSetupError, install_server_credentials
from virtbackup.virt.pki import (
    Authority,
    ensure_client_credentials,
    load_or_create_authority,
)


@dataclass(frozen=True, slots=True)
class ExportCredentials:
    """The CA that signs the servers' certificates, and the client context the inventory
    reads new exports with."""

    authority: Authority
    client: ssl.SSLContext
    client_dir: Path

    @classmethod
    def load(cls, pki_dir: Path, client_owner: str | None = None) -> ExportCredentials:
        """The CA and client certificate in ``pki_dir``, made there on first use; with
        ``client_owner`` (``uid[:gid]``, ``Settings.pki_client_owner``) the client folder
        and its files are given to that user, modes unchanged (the workers run as it).
        Raises OSError or ValueError when the folder cannot be written or read."""
        authority = load_or_create_authority(pki_dir)
        client_dir = ensure_client_credentials(pki_dir, authority)
        if client_owner is not None:
            uid, _, gid = client_owner.partition(":")
            for path in (client_dir, *client_dir.iterdir()):
                os.chown(path, int(uid), int(gid or uid), follow_symlinks=False)
        return cls(
            authority=authority, client=client_context_from_dir(client_dir), client_dir=client_dir
        )

    async def install(self, server: HostServer) -> str:
        """Make ``server`` ready to serve exports with TLS; returns its TLS folder.

        Raises Conflict (with what to change on the host) when its libvirt cannot require
        client certificates, Unavailable or VirtError when it cannot be reached."""
        host = await server.host()
        session_conf = (await server.session_daemon()).qemu_conf if server.is_session else None
        # One at a time per server: backups that begin together would each issue a new
        # server key and certificate and write them over each other (the key of one with
        # the certificate of another: every TLS handshake then fails).
        async with _installing.setdefault(server.id, asyncio.Lock()):
            try:
                config = await install_server_credentials(
                    host, self.authority, [server.nbd_host], session_conf=session_conf
                )
            except TlsSetupError as exc:
                raise Conflict(f"server {server.id}: NBD exports cannot use TLS: {exc}") from None
        return config.directory


#: The lock of each server's TLS folder (by server id), see ``ExportCredentials.install``.
_installing: dict[str, asyncio.Lock] = {}
