"""OAuth2 login with GitHub or Google (agents-backend-api.md's OAuth2 plugin).

A provider is offered only when its client id and secret are configured
(``VIRTBACKUP_OAUTH2_GITHUB_CLIENT_ID`` and ``VIRTBACKUP_OAUTH2_GITHUB_CLIENT_SECRET``,
or Google's likewise). The flow:

1. ``authorize``: a one-time ``state`` (random; kept in ``VB_USERS`` as
   ``oauth.<sha256 of it>`` for :data:`STATE_SECONDS`, with the provider and the
   callback URL) and a 302 to the provider's consent page.
2. ``callback`` with ``code`` and ``state``: the state is consumed (a delete at the
   revision it was read at: of two callbacks with one state, one wins), the code is
   exchanged for an access token at the provider's token endpoint (client secret sent
   there only), and the account's **verified** e-mail address is read (GitHub
   ``/user/emails``, Google's OpenID ``userinfo``).
3. The address must be the ``email`` of an enabled user (case-insensitively): an
   administrator makes the user first; nobody is created by logging in. The answer is
   that of a password login (a session, its access and refresh tokens).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlencode

import httpx
import msgspec
from nats.js.errors import APIError, KeyNotFoundError, KeyWrongLastSequenceError

from virtbackup.gateway.identity_store import IdentityStore, UserRecord
from virtbackup.runtime.settings import Settings

#: Seconds a ``state`` stays good between ``authorize`` and ``callback``.
STATE_SECONDS: Final = 600.0
#: Seconds a call to the provider may take.
PROVIDER_TIMEOUT: Final = 10.0
_WRONG_LAST_SEQUENCE: Final = 10071


@dataclass(frozen=True)
class Provider:
    name: str
    client_id: str
    client_secret: str
    authorize_url: str
    token_url: str
    #: Where the verified e-mail addresses are read.
    email_url: str
    scope: str


class LoginFailed(Exception):
    """The provider said no, or the account is no user here; the message says why."""


class ProviderUnavailable(Exception):
    """The provider could not be reached or answered nonsense."""


class OAuthState(msgspec.Struct, kw_only=True):
    provider: str
    redirect_uri: str
    expires_at: float


def providers(settings: Settings) -> dict[str, Provider]:
    """The configured providers by name (``github``, ``google``)."""
    out: dict[str, Provider] = {}
    gh_secret = settings.oauth2_github_client_secret
    if settings.oauth2_github_client_id and gh_secret is not None:
        base = settings.oauth2_github_base_url.rstrip("/")
        out["github"] = Provider(
            name="github",
            client_id=settings.oauth2_github_client_id,
            client_secret=gh_secret.get_secret_value(),
            authorize_url=(base or "https://github.com") + "/login/oauth/authorize",
            token_url=(base or "https://github.com") + "/login/oauth/access_token",
            email_url=(base or "https://api.github.com") + "/user/emails",
            scope="read:user user:email",
        )
    g_secret = settings.oauth2_google_client_secret
    if settings.oauth2_google_client_id and g_secret is not None:
        base = settings.oauth2_google_base_url.rstrip("/")
        out["google"] = Provider(
            name="google",
            client_id=settings.oauth2_google_client_id,
            client_secret=g_secret.get_secret_value(),
            authorize_url=(base or "https://accounts.google.com") + "/o/oauth2/v2/auth",
            token_url=(base or "https://oauth2.googleapis.com") + "/token",
            email_url=(base or "https://openidconnect.googleapis.com") + "/v1/userinfo",
            scope="openid email",
        )
    return out


def _state_key(state: str) -> str:
    return "oauth." + hashlib.sha256(state.encode()).hexdigest()


async def begin(store: IdentityStore, provider: Provider, redirect_uri: str) -> str:
    """The provider's consent URL for a new one-time state."""
    state = secrets.token_urlsafe(32)
    record = OAuthState(
        provider=provider.name,
        redirect_uri=redirect_uri,
        expires_at=time.time() + STATE_SECONDS,
    )
    await store.kv.create(_state_key(state), msgspec.json.encode(record))
    query = {
        "client_id": provider.client_id,
        "redirect_uri": redirect_uri,
        "scope": provider.scope,
        "state": state,
        "response_type": "code",
    }
    return provider.authorize_url + "?" + urlencode(query)


async def _consume(store: IdentityStore, provider: Provider, state: str) -> OAuthState:
    key = _state_key(state)
    try:
        entry = await store.kv.get(key)
    except KeyNotFoundError:
        raise LoginFailed("unknown, used or expired state") from None
    if entry.value is None or entry.revision is None:
        raise LoginFailed("unknown, used or expired state")
    try:
        await store.kv.delete(key, last=entry.revision)
    except KeyWrongLastSequenceError:
        raise LoginFailed("unknown, used or expired state") from None
    except APIError as exc:
        if exc.err_code != _WRONG_LAST_SEQUENCE:
            raise
        raise LoginFailed("unknown, used or expired state") from None
    record = msgspec.json.decode(entry.value, type=OAuthState)
    if record.provider != provider.name or record.expires_at <= time.time():
        raise LoginFailed("unknown, used or expired state")
    return record


async def _verified_emails(provider: Provider, access_token: str) -> list[str]:
    headers = {"Authorization": f"Bearer {access_token}", "Accept": "application/json"}
    async with httpx.AsyncClient(timeout=PROVIDER_TIMEOUT) as client:
        resp = await client.get(provider.email_url, headers=headers)
    if resp.status_code != 200:
        raise LoginFailed(f"{provider.name} refused the account's e-mail ({resp.status_code})")
    body: Any = resp.json()
    if provider.name == "github" and isinstance(body, list):
        return [
            str(e["email"])
            for e in body
            if isinstance(e, dict) and e.get("verified") is True and e.get("email")
        ]
    if isinstance(body, dict) and body.get("email_verified") is True and body.get("email"):
        return [str(body["email"])]
    return []


async def finish(
    store: IdentityStore, provider: Provider, code: str, state: str
) -> tuple[UserRecord | None, str]:
    """The user the callback logs in, or None and the e-mail address that matched no
    enabled user. ``LoginFailed`` for a bad state or code, ``ProviderUnavailable`` when
    the provider cannot be reached."""
    record = await _consume(store, provider, state)
    form = {
        "code": code,
        "client_id": provider.client_id,
        "client_secret": provider.client_secret,
        "redirect_uri": record.redirect_uri,
        "grant_type": "authorization_code",
    }
    try:
        async with httpx.AsyncClient(timeout=PROVIDER_TIMEOUT) as client:
            resp = await client.post(
                provider.token_url, data=form, headers={"Accept": "application/json"}
            )
        if resp.status_code != 200:
            raise LoginFailed(f"{provider.name} refused the code ({resp.status_code})")
        token = resp.json().get("access_token")
        if not isinstance(token, str) or not token:
            raise LoginFailed(f"{provider.name} answered no access token")
        emails = await _verified_emails(provider, token)
    except (httpx.HTTPError, ValueError) as exc:
        raise ProviderUnavailable(f"{provider.name} could not be reached: {exc!r}") from None
    if not emails:
        raise LoginFailed(f"the {provider.name} account has no verified e-mail address")
    wanted = {e.lower() for e in emails}
    found = [
        u for u in await store.list_users() if u.email and u.email.lower() in wanted and u.enabled
    ]
    if len(found) > 1:  # made before addresses were unique: never pick one
        names = ", ".join(u.username for u in found)
        raise LoginFailed(f"the {provider.name} account's addresses are those of users {names}")
    if found:
        return found[0], found[0].email
    return None, sorted(wanted)[0]
