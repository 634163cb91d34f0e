"""Agent API: the SFTP connection test and the Google OAuth token store."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, post

from virtbackup.contracts.subjects import EventType
from virtbackup.contracts.v1.config import (
    SECRET_MASK,
    AgentConfig,
    SftpParams,
    host_key_fingerprint,
)
from virtbackup.gateway.bodies import Body, NoBody
from virtbackup.gateway.errors import responses
from virtbackup.gateway.host_keys import HostKeyUnavailable, fetch_host_key
from virtbackup.gateway.state import Gateway
from virtbackup.runtime.errors import BadRequest
from virtbackup.storage.errors import InvalidParamsError, StorageError
from virtbackup.storage.factory import open_driver
from virtbackup.storage.google_auth import GoogleTokens
from virtbackup.storage.probe import test_connection


class GoogleTokensBody(Body, kw_only=True):
    """The body of ``POST /oauth/google``: its shape is checked with this type, then
    ``GoogleTokens.from_wire`` reads it (``expiresAt`` in its three forms)."""

    refresh_token: Annotated[str, msgspec.Meta(min_length=1)]
    access_token: str | None = None
    scope: str | None = None
    account_email: str | None = None
    #: Unix seconds, Unix milliseconds (up to 2**53), or an ISO-8601 time.
    expires_at: Annotated[int, msgspec.Meta(ge=0, le=2**53)] | str | None = None


async def _json_object(
    request: Request[Any, Any, Any], *, optional: bool = False
) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        if optional:
            return {}
        raise BadRequest("request body must be a JSON object")
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


def _configured_sftp(cfg: AgentConfig, params: dict[str, Any]) -> dict[str, Any] | None:
    """The params of the configured SFTP destination at the same host, port and user."""
    port = params.get("port", 22)
    for dest in cfg.destinations:
        p = dest.params
        if (
            dest.driver_id == "sftp"
            and p.get("host") == params.get("host")
            and p.get("port", 22) == port
            and p.get("username") == params.get("username")
        ):
            return p
    sftp = cfg.backup.sftp
    if (sftp.host, sftp.port, sftp.username) == (params.get("host"), port, params.get("username")):
        return {"password": sftp.password, "privateKey": sftp.private_key}
    return None


class DestinationsController(Controller):
    @post("/sftp/test", status_code=200)
    async def sftp_test(self, gw: Gateway, request: Request[Any, Any, Any]) -> dict[str, Any]:
        """Write, read back and delete a probe in ``<basePath>/VirtBackup`` over SFTP.

        A masked secret is the one of the configured destination at the same host, port
        and user (else 400). Without ``hostKey``, the configured destination's pinned key
        is checked, or, for a server not configured yet, the key it presents now is used.
        The answer carries ``hostKeyFingerprint``, the SHA256 fingerprint checked.
        """
        params = await _json_object(request)
        cfg, _ = await gw.config.load()
        configured = _configured_sftp(cfg, params)
        for key in ("password", "privateKey"):
            if params.get(key) == SECRET_MASK:
                stored = configured.get(key) if configured is not None else None
                if not isinstance(stored, str) or not stored:
                    raise BadRequest(
                        f"{key} is the secret mask but no SFTP destination with this host, "
                        "port and username is configured"
                    )
                params[key] = stored
        try:
            typed = msgspec.convert(params, SftpParams, strict=True)
        except msgspec.ValidationError as exc:
            raise BadRequest(f"invalid SFTP parameters: {exc}") from None
        if not typed.host_key:
            pinned = configured.get("hostKey") if configured is not None else None
            if isinstance(pinned, str) and pinned:
                params["hostKey"] = pinned
            else:
                try:
                    params["hostKey"] = await fetch_host_key(typed.host, typed.port)
                except HostKeyUnavailable as exc:
                    return {"success": False, "message": f"SFTP test failed: {exc}"}
        try:
            fingerprint = host_key_fingerprint(params["hostKey"])
        except ValueError as exc:
            raise BadRequest(f"hostKey: {exc}") from None
        try:
            driver = open_driver("sftp", params)
        except InvalidParamsError as exc:
            raise BadRequest(str(exc)) from None
        try:
            message = await test_connection(driver)
        except StorageError as exc:
            return {
                "success": False,
                "message": f"SFTP test failed: {exc}",
                "hostKeyFingerprint": fingerprint,
            }
        finally:
            await driver.close()
        return {"success": True, "message": message, "hostKeyFingerprint": fingerprint}

    @post("/oauth/google", status_code=200, responses=responses(409))
    async def store_google(self, gw: Gateway, request: Request[Any, Any, Any]) -> dict[str, bool]:
        """Keep the Google account's tokens (``expiresAt``: seconds, ms or ISO-8601)."""
        body = await _json_object(request)
        if not body.get("refreshToken"):
            raise BadRequest("refreshToken is required")
        try:
            msgspec.convert(body, GoogleTokensBody, strict=True)
        except msgspec.ValidationError as exc:
            raise BadRequest(f"invalid Google tokens: {exc}") from None
        try:
            tokens = GoogleTokens.from_wire(body)
        except InvalidParamsError as exc:
            raise BadRequest(str(exc)) from None

        def apply(cfg: AgentConfig) -> AgentConfig:
            backup = msgspec.structs.replace(cfg.backup, gdrive=tokens.apply_to(cfg.backup.gdrive))
            return msgspec.structs.replace(cfg, backup=backup)

        await gw.config.change(apply)
        await gw.bus.publish_event(EventType.CONFIG_CHANGED, {"section": "backup.gdrive"})
        return {"success": True}

    @post("/oauth/google/clear", status_code=200, responses=responses(409))
    async def clear_google(self, gw: Gateway, data: NoBody | None = None) -> dict[str, bool]:
        """Forget the Google account's tokens (no body, or ``{}``)."""

        def apply(cfg: AgentConfig) -> AgentConfig:
            gdrive = msgspec.structs.replace(
                cfg.backup.gdrive, access_token="", refresh_token="", expires_at=None
            )
            backup = msgspec.structs.replace(cfg.backup, gdrive=gdrive)
            return msgspec.structs.replace(cfg, backup=backup)

        await gw.config.change(apply)
        await gw.bus.publish_event(EventType.CONFIG_CHANGED, {"section": "backup.gdrive"})
        return {"success": True}
