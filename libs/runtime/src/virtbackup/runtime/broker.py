"""The FastStream NATS broker, set up the same way in every service."""

from __future__ import annotations

import logging
import ssl

from fast_depends.msgspec import MsgSpecSerializer
from faststream.nats import NatsBroker
from faststream.nats.opentelemetry import NatsTelemetryMiddleware
from faststream.nats.security import NatsSecurity, NatsUserPassword
from opentelemetry.sdk.trace import TracerProvider

from virtbackup.runtime.nats_auth import inbox_prefix
from virtbackup.runtime.settings import Settings

log = logging.getLogger(__name__)


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context for NATS: None unless ``nats_url`` is ``tls://`` or a CA or client
    certificate is set. Verifies the server against ``nats_tls_ca`` (the system's CAs when
    unset) and presents ``nats_tls_cert``/``nats_tls_key`` when given. ``OSError`` or
    ``ssl.SSLError`` when a file cannot be read."""
    wanted = (
        settings.nats_url.startswith("tls://") or settings.nats_tls_ca or settings.nats_tls_cert
    )
    if not wanted:
        return None
    ctx = ssl.create_default_context(
        cafile=str(settings.nats_tls_ca) if settings.nats_tls_ca else None
    )
    if settings.nats_tls_cert:
        ctx.load_cert_chain(
            str(settings.nats_tls_cert),
            str(settings.nats_tls_key) if settings.nats_tls_key else None,
        )
    return ctx


def security(settings: Settings) -> NatsSecurity | None:
    """User/password (``nats_user``, ``nats_password``) and TLS as the settings say."""
    ctx = tls_context(settings)
    if settings.nats_user:
        password = settings.nats_password.get_secret_value() if settings.nats_password else ""
        return NatsUserPassword(settings.nats_user, password, ssl_context=ctx)
    return NatsSecurity(ssl_context=ctx) if ctx else None


async def _on_error(exc: Exception) -> None:
    # A permissions violation only shows here: the call it refused just times out.
    if "permissions violation" in str(exc).lower():
        log.error("NATS refused: %s (see virtbackup.runtime.nats_auth)", exc)
    else:
        log.warning("NATS: %r", exc)


#: The logger of every broker's per-message lines (FastStream's name for them).
BROKER_LOGGER = "faststream.access.nats"


def make_broker(settings: Settings, service: str, tracer_provider: TracerProvider) -> NatsBroker:
    """A broker that (de)serialises with msgspec and carries W3C trace context in headers.

    It logs in as ``settings.nats_user`` (over TLS when configured), receives replies
    below ``_INBOX.<service>`` (the only inbox its NATS user may read), and reconnects
    for ever, every second, after the connection is lost.
    """
    return NatsBroker(
        settings.nats_url,
        name=f"virtbackup-{service}",
        serializer=MsgSpecSerializer(),
        middlewares=(NatsTelemetryMiddleware(tracer_provider=tracer_provider),),
        security=security(settings),
        inbox_prefix=inbox_prefix(service),
        error_cb=_on_error,
        max_reconnect_attempts=-1,
        reconnect_time_wait=1,
        connect_timeout=5,
        # A plain logger that propagates to the root's JSON handler; by default FastStream
        # makes one with its own colourised plain-text handler on stdout.
        logger=logging.getLogger(BROKER_LOGGER),
    )
