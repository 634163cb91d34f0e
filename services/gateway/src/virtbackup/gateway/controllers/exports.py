"""Agent API extension: instant access to a restore point (kept by the job-orchestrator,
served by a transfer worker).

``POST /restore/exports`` makes the client certificate's key here, sends only its public
key on the bus, and returns the key in this one response (``cache-control: no-store``):
no service stores it, so it cannot be shown again. Lists and stops never carry a key.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from litestar import Controller, Response, delete, get, post
from litestar.params import Parameter

from virtbackup.contracts.subjects import ExportCmd
from virtbackup.contracts.v1.exports import (
    MAX_TTL_SECONDS,
    MIN_TTL_SECONDS,
    ExportCreated,
    ExportCreateRequest,
    ExportList,
    ExportListRequest,
    ExportStopRequest,
    InstantExport,
)
from virtbackup.gateway.bodies import Body
from virtbackup.gateway.errors import responses
from virtbackup.gateway.state import Gateway
from virtbackup.runtime import timeouts

TtlSeconds = Annotated[int, msgspec.Meta(ge=MIN_TTL_SECONDS, le=MAX_TTL_SECONDS)]


class ExportBody(Body, kw_only=True):
    """Export ``disk`` (a target of the point, e.g. ``vda``) of the restore point
    ``xmlPath`` names (from ``GET /restore/entries``) for ``ttlSeconds`` (default 3600)."""

    xml_path: str
    disk: str
    destination_id: str | None = None
    ttl_seconds: TtlSeconds | None = None


class ExportTlsFiles(msgspec.Struct, kw_only=True, rename="camel"):
    """A ``tls-creds-x509`` folder for qemu-nbd, qemu-img or nbdinfo: write them as
    ``ca-cert.pem``, ``client-cert.pem`` and ``client-key.pem`` (PEM)."""

    ca_cert: str
    client_cert: str
    client_key: str


class NewExport(InstantExport, frozen=True, kw_only=True):
    """The export, and its TLS credentials (the key is given only here, once)."""

    tls: ExportTlsFiles


def new_client_key() -> tuple[str, str]:
    """A fresh ECDSA P-256 key: (public key PEM, private key PEM in PKCS#8)."""
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return public.decode(), private.decode()


class ExportsController(Controller):
    path = "/restore/exports"

    @post(status_code=200, responses=responses(404, 409))
    async def create(self, gw: Gateway, data: ExportBody) -> Response[NewExport]:
        """Serve one disk of a restore point read-only over NBD (TLS), for a while."""
        public_key, private_key = new_client_key()
        request = ExportCreateRequest(
            xml_path=data.xml_path,
            disk=data.disk,
            destination_id=data.destination_id,
            ttl_seconds=data.ttl_seconds,
            client_public_key=public_key,
        )
        created = await gw.bus.request(
            ExportCmd.CREATE, request, ExportCreated, timeout=timeouts.JOB_COMMAND + 30
        )
        body = NewExport(
            **msgspec.structs.asdict(created.export),
            tls=ExportTlsFiles(
                ca_cert=created.tls.ca_cert,
                client_cert=created.tls.client_cert,
                client_key=private_key,
            ),
        )
        return Response(body, status_code=200, headers={"cache-control": "no-store"})

    @get()
    async def list_exports(self, gw: Gateway) -> list[InstantExport]:
        """Every export, newest first, each in the state it is in now (never with a key)."""
        found = await gw.bus.request(
            ExportCmd.LIST, ExportListRequest(), ExportList, timeout=timeouts.JOB_COMMAND
        )
        return found.exports

    @delete("/{export_id:str}", status_code=200, responses=responses(404))
    async def stop(
        self,
        gw: Gateway,
        export_id: Annotated[str, Parameter(description="An export's id", max_length=128)],
    ) -> InstantExport:
        """Stop an export: its listener and every connection to it are closed."""
        return await gw.bus.request(
            ExportCmd.STOP,
            ExportStopRequest(id=export_id),
            InstantExport,
            timeout=timeouts.JOB_COMMAND,
        )
