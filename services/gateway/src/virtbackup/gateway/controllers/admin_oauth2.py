"""OAuth2 login (agents-backend-api.md, ``/api/v1/admin/oauth2/{github|google}``).

* ``GET /{provider}/authorize``: 302 to the provider's consent page (no credential
  needed); 404 for a provider that is not configured.
* ``GET /{provider}/callback?code=...&state=...``: the answer of a password login
  (``controllers.admin_auth``) for the enabled user whose ``email`` is the account's
  verified address; 401 for an unknown or used state, a refused code or no such user;
  502 when the provider cannot be reached. Every callback is in the login log (reason
  ``oauth2 <provider>``). How it works: ``oauth2_login``.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from litestar import Controller, Request, Response, get
from litestar.params import Parameter
from litestar.response import Redirect

from virtbackup.gateway.controllers.admin_auth import client, session_answer, stores
from virtbackup.gateway.errors import problem
from virtbackup.gateway.oauth2_login import (
    LoginFailed,
    Provider,
    ProviderUnavailable,
    begin,
    finish,
    providers,
)
from virtbackup.gateway.state import Gateway
from virtbackup.runtime.errors import NotFound

log = logging.getLogger(__name__)

ProviderName = Annotated[str, Parameter(description="github or google", max_length=16)]


def _provider(gw: Gateway, name: str) -> Provider:
    found = providers(gw.settings).get(name)
    if found is None:
        raise NotFound(f"OAuth2 provider {name[:16]!r} is not configured")
    return found


def _callback_url(gw: Gateway, request: Request[Any, Any, Any], provider: str) -> str:
    base = gw.settings.oauth2_redirect_base.rstrip("/") or str(request.base_url).rstrip("/")
    return f"{base}/api/v1/admin/oauth2/{provider}/callback"


class OAuth2Controller(Controller):
    path = "/api/v1/admin/oauth2"

    @get("/{provider:str}/authorize", status_code=302)
    async def authorize(
        self, gw: Gateway, provider: ProviderName, request: Request[Any, Any, Any]
    ) -> Redirect:
        """Send the browser to the provider's consent page (see module)."""
        store, _ = stores(gw)
        found = _provider(gw, provider)
        url = await begin(store, found, _callback_url(gw, request, found.name))
        return Redirect(path=url, status_code=302)

    @get("/{provider:str}/callback")
    async def callback(
        self,
        gw: Gateway,
        provider: ProviderName,
        request: Request[Any, Any, Any],
        code: Annotated[str, Parameter(max_length=2048)],
        oauth_state: Annotated[str, Parameter(query="state", max_length=256)],
    ) -> Response[dict[str, Any]]:
        """Log the provider's account in (see module)."""
        store, book = stores(gw)
        found = _provider(gw, provider)
        address, agent = client(request)
        reason = f"oauth2 {found.name}"
        try:
            user, email = await finish(store, found, code, oauth_state)
        except LoginFailed as exc:
            await book.record(
                username="", address=address, status="failure",
                reason=f"{reason}: {exc}", user_agent=agent,
            )  # fmt: skip
            return problem(401, f"OAuth2 login refused: {exc}")
        except ProviderUnavailable as exc:
            log.warning("%s", exc)
            return problem(502, f"{found.name} could not be reached; try again")
        if user is None:
            await book.record(
                username=email, address=address, status="failure",
                reason=f"{reason}: no enabled user has this e-mail address", user_agent=agent,
            )  # fmt: skip
            return problem(401, "OAuth2 login refused: no enabled user has this e-mail address")
        session = await store.create_session(user.id, gw.settings.refresh_token_seconds)
        answer = await session_answer(gw, store, user, session)
        await book.record(
            username=user.username, address=address, status="success",
            reason=reason, user_agent=agent,
        )  # fmt: skip
        return Response(answer, headers={"cache-control": "no-store"})
