"""Google OAuth for the Drive driver: the token holder, the ``expiresAt`` parser, the refresh.

The agent stores one Google account's tokens (``POST /oauth/google`` -> the config's
``backup.gdrive``: ``accessToken``, ``refreshToken``, ``scope``, ``accountEmail``,
``expiresAt``). ``GoogleTokens`` holds them with ``expires_at`` as an aware datetime;
``parse_expires_at`` accepts what the API accepts (Unix seconds, Unix milliseconds or an
ISO-8601 string) and says clearly what it rejects.

``TokenSource`` hands out a usable access token: it refreshes it with the refresh token
(``grant_type=refresh_token`` at ``GoogleApi.token_url``, with the OAuth client id and
secret, by default from ``VIRTBACKUP_GOOGLE_CLIENT_ID``/``VIRTBACKUP_GOOGLE_CLIENT_SECRET``)
when it is about to expire or when Drive answered 401, one refresh at a time, and calls
``on_refresh(tokens)`` with the new tokens so that the service can store them.

Errors: a refresh token Google refuses (``invalid_grant``: revoked, expired, password
changed) or a refused client (``invalid_client``) is a ``PermanentError`` telling what to
do; 429 and 5xx of the token endpoint, and network errors, are ``TransientError``.

Why not google-auth or authlib: the refresh itself is one form POST (``_request``). What
is left around it is ours either way (the config's token shapes, the single refresh for
concurrent 401s, ``on_refresh``, and classifying an answer by status and ``Retry-After``,
which google-auth's ``RefreshError`` and authlib's ``OAuthError`` do not carry). google-auth
would add a synchronous transport and retries of its own under ours; authlib a second
HTTP client. Neither removes code.
"""

from __future__ import annotations

import asyncio
import email.utils
import inspect
import logging
import math
import os
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

import msgspec

from virtbackup.contracts.v1.config import GdriveSettings
from virtbackup.storage.errors import InvalidParamsError, PermanentError, TransientError

if TYPE_CHECKING:
    import httpx  # imported where used: it is slow to import, and only the driver needs it

log = logging.getLogger(__name__)

DEFAULT_API_BASE: Final = "https://www.googleapis.com/drive/v3"
DEFAULT_UPLOAD_BASE: Final = "https://www.googleapis.com/upload/drive/v3"
DEFAULT_TOKEN_URL: Final = "https://oauth2.googleapis.com/token"  # noqa: S105
CLIENT_ID_ENV: Final = "VIRTBACKUP_GOOGLE_CLIENT_ID"
CLIENT_SECRET_ENV: Final = "VIRTBACKUP_GOOGLE_CLIENT_SECRET"  # noqa: S105
#: Optional overrides of the endpoints (for a stand-in server in system tests).
API_BASE_ENV: Final = "VIRTBACKUP_GDRIVE_API_BASE"
UPLOAD_BASE_ENV: Final = "VIRTBACKUP_GDRIVE_UPLOAD_BASE"
TOKEN_URL_ENV: Final = "VIRTBACKUP_GOOGLE_TOKEN_URL"  # noqa: S105

#: Numbers from here up are milliseconds: as seconds they would be after the year 5000,
#: as milliseconds they are after March 1973.
MILLISECONDS_FROM: Final = 100_000_000_000
#: Refresh this long before the stated expiry, so a request does not expire in flight.
EXPIRY_SKEW: Final = timedelta(seconds=60)
#: The longest Retry-After we take from a server (seconds).
MAX_RETRY_AFTER: Final = 3600.0

#: The longest value ``from_wire`` takes per field (``accountEmail`` as in the config).
_MAX_FIELD: Final = {
    "accessToken": 8192,
    "refreshToken": 8192,
    "scope": 2048,
    "accountEmail": 320,
}
_NUMBER: Final = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")

#: Called with the new tokens after every successful refresh (may be async).
OnRefresh = Callable[["GoogleTokens"], Awaitable[None] | None]


def parse_expires_at(value: object) -> datetime | None:
    """``expiresAt`` as an aware UTC datetime; None for "unknown" (None or empty string).

    Accepts Unix seconds or milliseconds (int, float, or a string of digits; values of
    ``MILLISECONDS_FROM`` and more are milliseconds) and ISO-8601 strings (``Z`` or an
    offset; without one, UTC). Anything else raises ``InvalidParamsError`` (a ValueError)
    naming the value.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidParamsError(f"expiresAt must be a timestamp, not a boolean ({value!r})")
    if isinstance(value, int | float):
        try:
            number = float(value)
        except OverflowError:  # an int of hundreds of digits
            digits = len(str(abs(int(value))))
            message = f"expiresAt (a {digits}-digit number) is out of range"
            raise InvalidParamsError(message) from None
        return _from_number(number, value)
    if not isinstance(value, str):
        raise InvalidParamsError(
            f"expiresAt must be a number or a string, not {type(value).__name__}"
        )
    text = value.strip()
    if not text:
        return None
    if len(text) > 64:
        raise InvalidParamsError(f"expiresAt is too long ({len(text)} characters)")
    if _NUMBER.match(text):
        return _from_number(float(text), value)
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidParamsError(
            f"expiresAt {value!r} is neither a Unix timestamp (seconds or milliseconds) "
            "nor an ISO-8601 date-time such as 2026-02-06T12:00:00Z"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def _from_number(number: float, original: object) -> datetime:
    if not math.isfinite(number) or number < 0:
        raise InvalidParamsError(f"expiresAt {original!r} is not a valid Unix timestamp")
    seconds = number / 1000 if number >= MILLISECONDS_FROM else number
    try:
        return datetime.fromtimestamp(seconds, tz=UTC)
    except (OverflowError, OSError, ValueError):
        raise InvalidParamsError(f"expiresAt {original!r} is out of range") from None


def format_expires_at(value: datetime | None) -> str | None:
    """The wire form stored in the config: ISO-8601 UTC with ``Z`` (or None)."""
    if value is None:
        return None
    return value.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds from an HTTP ``Retry-After`` (delta-seconds or an HTTP date); None if unusable."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    if text.isdigit():
        return min(float(text), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    delta = (when - (now or datetime.now(UTC))).total_seconds()
    return min(max(delta, 0.0), MAX_RETRY_AFTER)


@dataclass(frozen=True, kw_only=True, repr=False)
class GoogleTokens:
    """One Google account's OAuth tokens. ``expires_at`` is aware (None: unknown)."""

    access_token: str = ""
    refresh_token: str = ""
    expires_at: datetime | None = None
    scope: str = ""
    account_email: str = ""

    def __post_init__(self) -> None:
        if self.expires_at is not None and self.expires_at.tzinfo is None:
            raise ValueError("GoogleTokens.expires_at must be an aware datetime")

    def __repr__(self) -> str:
        def mask(secret: str) -> str:
            return "''" if not secret else "'***'"

        return (
            f"GoogleTokens(access_token={mask(self.access_token)}, "
            f"refresh_token={mask(self.refresh_token)}, "
            f"expires_at={format_expires_at(self.expires_at)!r}, scope={self.scope!r}, "
            f"account_email={self.account_email!r})"
        )

    def expired(self, *, now: datetime | None = None, skew: timedelta = EXPIRY_SKEW) -> bool:
        """Whether the access token is missing or expires within ``skew``."""
        if not self.access_token:
            return True
        if self.expires_at is None:
            return False
        return self.expires_at - skew <= (now or datetime.now(UTC))

    @classmethod
    def from_settings(cls, settings: GdriveSettings) -> GoogleTokens:
        """The tokens stored in the config's ``backup.gdrive``."""
        return cls(
            access_token=settings.access_token,
            refresh_token=settings.refresh_token,
            expires_at=parse_expires_at(settings.expires_at),
            scope=settings.scope,
            account_email=settings.account_email,
        )

    @classmethod
    def from_wire(cls, body: Mapping[str, Any]) -> GoogleTokens:
        """The body of ``POST /oauth/google`` (camelCase). ``refreshToken`` is required.

        Raises ``InvalidParamsError`` (a ValueError) naming the bad field.
        """
        strings: dict[str, str] = {}
        for name in ("accessToken", "refreshToken", "scope", "accountEmail"):
            value = body.get(name, "")
            if value is None:
                value = ""
            if not isinstance(value, str):
                raise InvalidParamsError(f"{name} must be a string")
            if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
                raise InvalidParamsError(f"{name} must not contain control characters")
            if len(value) > _MAX_FIELD[name]:
                raise InvalidParamsError(f"{name} is longer than {_MAX_FIELD[name]} characters")
            strings[name] = value.strip()
        if not strings["refreshToken"]:
            raise InvalidParamsError("refreshToken is required")
        return cls(
            access_token=strings["accessToken"],
            refresh_token=strings["refreshToken"],
            expires_at=parse_expires_at(body.get("expiresAt")),
            scope=strings["scope"],
            account_email=strings["accountEmail"],
        )

    def apply_to(self, settings: GdriveSettings) -> GdriveSettings:
        """``settings`` with these tokens (empty scope or e-mail keep the stored ones)."""
        return msgspec.structs.replace(
            settings,
            access_token=self.access_token,
            refresh_token=self.refresh_token,
            expires_at=format_expires_at(self.expires_at),
            scope=self.scope or settings.scope,
            account_email=self.account_email or settings.account_email,
        )


@dataclass(frozen=True, kw_only=True)
class GoogleApi:
    """Where the Google endpoints are, and the OAuth client used to refresh tokens."""

    api_base: str = DEFAULT_API_BASE
    upload_base: str = DEFAULT_UPLOAD_BASE
    token_url: str = DEFAULT_TOKEN_URL
    client_id: str = ""
    client_secret: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        for name in ("api_base", "upload_base", "token_url"):
            value = getattr(self, name)
            if not value.startswith(("https://", "http://")):
                raise InvalidParamsError(f"gdrive: {name} must be an http(s) URL, not {value!r}")
            object.__setattr__(self, name, value.rstrip("/"))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> GoogleApi:
        """Client id/secret from ``VIRTBACKUP_GOOGLE_CLIENT_ID``/``_SECRET``; endpoint overrides
        from ``VIRTBACKUP_GDRIVE_API_BASE``, ``VIRTBACKUP_GDRIVE_UPLOAD_BASE`` and
        ``VIRTBACKUP_GOOGLE_TOKEN_URL`` (Google's by default)."""
        env = os.environ if environ is None else environ
        return cls(
            api_base=env.get(API_BASE_ENV) or DEFAULT_API_BASE,
            upload_base=env.get(UPLOAD_BASE_ENV) or DEFAULT_UPLOAD_BASE,
            token_url=env.get(TOKEN_URL_ENV) or DEFAULT_TOKEN_URL,
            client_id=env.get(CLIENT_ID_ENV, ""),
            client_secret=env.get(CLIENT_SECRET_ENV, ""),
        )


class TokenSource:
    """Hands out a valid access token, refreshing it (once at a time) when needed."""

    def __init__(
        self,
        tokens: GoogleTokens,
        *,
        api: GoogleApi,
        http: httpx.AsyncClient,
        on_refresh: OnRefresh | None = None,
    ) -> None:
        self._tokens = tokens
        self._api = api
        self._http = http
        self._on_refresh = on_refresh
        self._lock = asyncio.Lock()
        #: Set once Google refused the refresh token: every later call fails the same way.
        self._refused: PermanentError | None = None

    @property
    def tokens(self) -> GoogleTokens:
        return self._tokens

    async def access_token(self) -> str:
        """The current access token, refreshed first if it is (about to be) expired."""
        tokens = self._tokens
        if tokens.expired() and tokens.refresh_token:
            return await self.refresh()
        return tokens.access_token

    async def refresh(self, *, rejected: str | None = None) -> str:
        """Refresh and return the new access token.

        ``rejected`` is the token Drive just refused (401): if another task has replaced
        it meanwhile, its replacement is returned without a second refresh. Without
        ``rejected`` (a proactive refresh) nothing happens unless the token is expired.
        """
        async with self._lock:
            current = self._tokens
            if rejected is not None and current.access_token != rejected:
                return current.access_token
            if rejected is None and not current.expired():
                return current.access_token
            if self._refused is not None:
                raise self._refused
            if not current.refresh_token:
                raise PermanentError(
                    "Google Drive: the access token is expired or was rejected and no refresh "
                    "token is stored; sign in with Google again (POST /oauth/google)"
                )
            if not self._api.client_id:
                raise PermanentError(
                    "Google Drive: cannot refresh the access token without the OAuth client id; "
                    f"set {CLIENT_ID_ENV} (and {CLIENT_SECRET_ENV})"
                )
            fresh = await self._request(current)
            self._tokens = fresh
        await self._notify(fresh)
        return fresh.access_token

    async def _request(self, current: GoogleTokens) -> GoogleTokens:
        import httpx

        form = {
            "grant_type": "refresh_token",
            "refresh_token": current.refresh_token,
            "client_id": self._api.client_id,
        }
        if self._api.client_secret:
            form["client_secret"] = self._api.client_secret
        try:
            response = await self._http.post(self._api.token_url, data=form)
        except httpx.TimeoutException as exc:
            raise TransientError(f"Google token refresh timed out ({self._api.token_url})") from exc
        except httpx.HTTPError as exc:
            raise TransientError(
                f"Google token endpoint {self._api.token_url} unreachable: {exc}"
            ) from exc
        status = response.status_code
        body = _json_object(response)
        if status == 200:
            access = body.get("access_token")
            if not isinstance(access, str) or not access:
                raise TransientError("Google token refresh: the answer has no access_token")
            expires_in = body.get("expires_in")
            expires_at = None
            if isinstance(expires_in, int | float) and not isinstance(expires_in, bool):
                expires_at = datetime.now(UTC) + timedelta(seconds=float(expires_in))
            rotated = body.get("refresh_token")  # Google rarely rotates it; keep the old one
            if not isinstance(rotated, str) or not rotated:
                rotated = current.refresh_token
            scope = body.get("scope")
            return replace(
                current,
                access_token=access,
                refresh_token=rotated,
                expires_at=expires_at,
                scope=scope if isinstance(scope, str) and scope else current.scope,
            )
        error = str(body.get("error") or "")
        description = str(body.get("error_description") or response.reason_phrase or "")
        detail = f"{error}: {description}" if error else f"HTTP {status} {description}"
        if status == 429 or status >= 500:
            raise TransientError(
                f"Google token refresh failed ({detail})",
                retry_after=parse_retry_after(response.headers.get("Retry-After")),
            )
        if error == "invalid_grant":
            self._refused = PermanentError(
                f"Google refused the stored refresh token ({detail}): it was revoked or has "
                "expired; sign in with Google again to store new tokens (POST /oauth/google)"
            )
            raise self._refused
        if error in ("invalid_client", "unauthorized_client"):
            raise PermanentError(
                f"Google refused the OAuth client ({detail}): check {CLIENT_ID_ENV} and "
                f"{CLIENT_SECRET_ENV} (they must be those the refresh token was issued to)"
            )
        raise PermanentError(f"Google token refresh failed ({detail})")

    async def _notify(self, tokens: GoogleTokens) -> None:
        if self._on_refresh is None:
            return
        try:
            result = self._on_refresh(tokens)
            if inspect.isawaitable(result):
                await result
        except Exception:
            # The request can go on with the new token; storing it is the caller's business.
            log.exception("on_refresh callback failed")


def _json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
