"""Agent API: the configuration.

``GET /config`` answers the configuration's revision as an ``ETag`` (``"12"``);
``POST /config`` with ``If-Match: "12"`` stores the posted document only if the
configuration is still at that revision, else 412 and nothing changes (RFC 9110,
13.1.1), so that a read-modify-write (the console's forms) never loses a change someone
made in between. Without ``If-Match`` the POST replaces whatever is stored, as
agent-api.md describes it.
"""

from __future__ import annotations

import re
from typing import Any

from litestar import Controller, Request, Response, get, post
from litestar.exceptions import HTTPException

from virtbackup.contracts.subjects import EventType
from virtbackup.contracts.v1.config import config_to_builtins
from virtbackup.gateway.config_store import StaleRevision, mask_secrets
from virtbackup.gateway.errors import responses
from virtbackup.gateway.state import Gateway
from virtbackup.runtime.errors import BadRequest

#: One entity tag as ``GET /config`` gives it: a revision number in quotes.
_ETAG = re.compile(r'(?:W/)?"([0-9]{1,18})"')


def _expected_revision(request: Request[Any, Any, Any]) -> int | None:
    """The revision ``If-Match`` names; None without the header. ``BadRequest`` naming the
    header when it is not one tag of ``GET /config`` (a list or ``*`` included)."""
    value = request.headers.get("if-match")
    if value is None:
        return None
    match = _ETAG.fullmatch(value.strip())
    if match is None:
        raise BadRequest(
            f"If-Match: {value[:40]!r} is not the ETag of GET /config (a revision in quotes,"
            ' e.g. "12")'
        )
    return int(match.group(1))


class ConfigController(Controller):
    path = "/config"

    @get()
    async def get_config(self, gw: Gateway) -> Response[dict[str, Any]]:
        """The whole configuration; secrets read as ``********``; its revision as the
        ``ETag`` header."""
        cfg, revision = await gw.config.load()
        masked: dict[str, Any] = mask_secrets(config_to_builtins(cfg))
        return Response(masked, headers={"ETag": f'"{revision}"'})

    @post(status_code=200, responses=responses(412))
    async def post_config(self, gw: Gateway, request: Request[Any, Any, Any]) -> dict[str, bool]:
        """Replace the whole configuration (validated strictly; all or nothing); with
        ``If-Match``, only if it is still at that revision (412 otherwise)."""
        expected = _expected_revision(request)
        try:
            revision = await gw.config.replace(await request.body(), expected_revision=expected)
        except StaleRevision as exc:
            raise HTTPException(status_code=412, detail=str(exc)) from None
        await gw.bus.publish_event(EventType.CONFIG_CHANGED, {"revision": revision})
        return {"success": True}
