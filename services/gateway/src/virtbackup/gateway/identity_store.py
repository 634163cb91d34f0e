"""Users, roles, sessions, API tokens and login lockouts in ``VB_USERS`` (the gateway's).

Keys of the bucket (every change a compare-and-swap on the revision, or a ``create``
that only one writer wins, so gateway replicas can race):

* ``user.<id>``: a user (:class:`UserRecord`; the password only as an argon2id hash);
  ``username.<sha256 of the lower-cased name>``: the id the name belongs to (makes
  names unique, case-insensitively); ``seq.user`` / ``seq.role``: the last ids given;
* ``role.<name>``: a custom role (:class:`RoleRecord`); the built-in roles
  (``identity_perms.BUILTIN_ROLES``) are not stored and cannot be changed;
* ``session.<id>``: a login session (:class:`SessionRecord`): the refresh token family.
  Its access tokens name it (``sid``), so revoking it ends them too;
* ``token.<sha256 of the token>``: an API token (:class:`ApiTokenRecord`), stored only
  as its hash (shown once, when made);
* ``fail.user.<sha256>`` / ``fail.addr.<sha256>``: recent failed logins of a user name
  or a client address (:class:`Failures`), for the lockout;
* ``oauth.<sha256 of a state>``: an OAuth2 login under way (``oauth2_login``);
* ``jwt-key``: the HS256 key of access and refresh tokens, made at first start, sealed
  under the services' secret key (``runtime.sealing``).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
import secrets
import time
import uuid
from collections.abc import Callable
from typing import Any, Final

import msgspec
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from virtbackup.contracts.v1.common import shown
from virtbackup.gateway.identity_perms import ADMIN, BUILTIN_ROLES, PERMISSIONS
from virtbackup.runtime.clock import utcnow_iso
from virtbackup.runtime.errors import BadRequest, Conflict, NotFound
from virtbackup.runtime.kv import keys
from virtbackup.runtime.sealing import SecretBox

log = logging.getLogger(__name__)

API_TOKEN_PREFIX: Final = "vbt_"  # noqa: S105 (a prefix, not a secret)
CAS_ATTEMPTS: Final = 20
#: A user name: letters, digits, ``_.@-``; ``token`` is the installation token's actor.
USERNAME: Final = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
ROLE_NAME: Final = re.compile(r"[a-z][a-z0-9_-]{0,63}")
TOKEN_NAME: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")
RESERVED_USERNAMES: Final = frozenset({"token", "anonymous"})
MIN_PASSWORD: Final = 8
MAX_PASSWORD: Final = 256
#: Custom roles' ids start here (the built-in roles have 1-4).
FIRST_CUSTOM_ROLE_ID: Final = 100
#: Refresh tokens of a session remembered after use (a reuse of one revokes the session).
USED_REFRESH_KEPT: Final = 64

_hasher = PasswordHasher()
#: Verified against when a user name is unknown, so that a wrong name takes as long.
_DUMMY_HASH: Final = _hasher.hash(secrets.token_urlsafe(16))


class UserRecord(msgspec.Struct, kw_only=True):
    id: int
    username: str
    password_hash: str
    nickname: str = ""
    email: str = ""
    roles: list[str] = msgspec.field(default_factory=list)
    enabled: bool = True
    created_at: str = ""
    updated_at: str = ""


class RoleRecord(msgspec.Struct, kw_only=True):
    id: int
    name: str
    description: str = ""
    permissions: list[str] = msgspec.field(default_factory=list)
    created_at: str = ""
    updated_at: str = ""


class SessionRecord(msgspec.Struct, kw_only=True):
    id: str
    user_id: int
    #: The ``jti`` of the one refresh token that may be used next.
    refresh_jti: str
    used_refresh_jtis: list[str] = msgspec.field(default_factory=list)
    revoked: bool = False
    revoked_reason: str = ""
    created_at: float = 0.0
    #: Unix time after which the session (its refresh tokens) ends.
    expires_at: float = 0.0


class ApiTokenRecord(msgspec.Struct, kw_only=True):
    id: str
    name: str
    user_id: int
    permissions: list[str]
    created_at: str
    #: ISO-8601 UTC, or None: no expiry.
    expires_at: str | None = None
    expires_unix: float = 0.0


class Failures(msgspec.Struct, kw_only=True):
    times: list[float] = msgspec.field(default_factory=list)


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def role_permissions(name: str, custom: dict[str, RoleRecord]) -> frozenset[str]:
    builtin = BUILTIN_ROLES.get(name)
    if builtin is not None:
        return builtin.permissions
    record = custom.get(name)
    return frozenset(record.permissions) if record is not None else frozenset()


def check_password(password: str, field: str = "password") -> None:
    """400 naming ``field`` for a password too short or too long."""
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise BadRequest(
            f"{field} must be {MIN_PASSWORD} to {MAX_PASSWORD} characters - at `$.{field}`"
        )


def check_permissions(names: list[str], field: str = "permissions") -> frozenset[str]:
    """The permission names as a set; 400 naming ``field`` for one not in the vocabulary."""
    unknown = [n for n in names if n not in PERMISSIONS]
    if unknown:
        raise BadRequest(
            f"unknown permission {shown(unknown[0])} (known: {', '.join(sorted(PERMISSIONS))})"
            f" - at `$.{field}`"
        )
    return frozenset(names)


class IdentityStore:
    """Users, roles, sessions, API tokens and lockouts in ``kv`` (``VB_USERS``)."""

    def __init__(self, kv: KeyValue, box: SecretBox | None) -> None:
        self.kv = kv
        self.box = box
        self._jwt_key: bytes | None = None

    # --- plumbing -------------------------------------------------------------------

    async def _get(self, key: str, kind: type[Any]) -> tuple[Any, int] | None:
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return None
        if entry.value is None or entry.revision is None:
            return None
        return msgspec.json.decode(entry.value, type=kind), entry.revision

    async def _change(self, key: str, kind: type[Any], change: Callable[[Any], Any]) -> Any:
        """Apply ``change`` to the record at ``key`` by compare-and-swap; ``NotFound``
        when there is none (``change`` may raise to refuse)."""
        for _ in range(CAS_ATTEMPTS):
            found = await self._get(key, kind)
            if found is None:
                raise NotFound(f"{key.split('.', 1)[0]} not found")
            record, revision = found
            new = change(record)
            try:
                await self.kv.update(key, msgspec.json.encode(new), last=revision)
            except KeyWrongLastSequenceError:
                continue
            return new
        raise Conflict("the record is being changed by others; try again")

    async def _next_id(self, name: str, floor: int) -> int:
        key = f"seq.{name}"
        for _ in range(CAS_ATTEMPTS):
            try:
                entry = await self.kv.get(key)
            except KeyNotFoundError:
                try:
                    await self.kv.create(key, str(floor).encode())
                except KeyWrongLastSequenceError:
                    continue
                return floor
            assert entry.value is not None and entry.revision is not None
            value = int(entry.value) + 1
            try:
                await self.kv.update(key, str(value).encode(), last=entry.revision)
            except KeyWrongLastSequenceError:
                continue
            return value
        raise Conflict("ids are being taken by others; try again")

    async def jwt_key(self) -> bytes:
        """The key tokens are signed with: made once (the first gateway to start wins the
        ``create``), kept sealed in the bucket, cached in the process."""
        if self._jwt_key is not None:
            return self._jwt_key
        try:
            entry = await self.kv.get("jwt-key")
            assert entry.value is not None
            stored = entry.value.decode()
        except KeyNotFoundError:
            fresh = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
            sealed = self.box.seal(fresh) if self.box is not None else fresh
            try:
                await self.kv.create("jwt-key", sealed.encode())
                stored = sealed
            except KeyWrongLastSequenceError:  # another replica made it first
                entry = await self.kv.get("jwt-key")
                assert entry.value is not None
                stored = entry.value.decode()
        plain = self.box.open(stored) if self.box is not None else stored
        self._jwt_key = base64.urlsafe_b64decode(plain)
        return self._jwt_key

    # --- roles ----------------------------------------------------------------------

    async def custom_roles(self) -> dict[str, RoleRecord]:
        out: dict[str, RoleRecord] = {}
        for key in await keys(self.kv, "role."):
            found = await self._get(key, RoleRecord)
            if found is not None:
                out[found[0].name] = found[0]
        return out

    async def permissions_of(self, user: UserRecord) -> frozenset[str]:
        """The union of the permissions of the user's roles (none when disabled)."""
        if not user.enabled:
            return frozenset()
        custom = (
            await self.custom_roles() if any(r not in BUILTIN_ROLES for r in user.roles) else {}
        )
        perms: frozenset[str] = frozenset()
        for role in user.roles:
            perms |= role_permissions(role, custom)
        return perms

    async def find_role(self, ref: str) -> RoleRecord | None:
        """A custom role by name or id (``None``: none; built-in roles are not here)."""
        custom = await self.custom_roles()
        if ref in custom:
            return custom[ref]
        return next((r for r in custom.values() if str(r.id) == ref), None)

    async def create_role(self, name: str, description: str, perms: list[str]) -> RoleRecord:
        if not ROLE_NAME.fullmatch(name):
            raise BadRequest(
                "name must be 1-64 lower-case letters, digits, '_' or '-', starting with"
                " a letter - at `$.name`"
            )
        if name in BUILTIN_ROLES:
            raise Conflict(f"role {name} exists (built-in)")
        check_permissions(perms)
        now = utcnow_iso()
        record = RoleRecord(
            id=await self._next_id("role", FIRST_CUSTOM_ROLE_ID),
            name=name,
            description=description,
            permissions=sorted(set(perms)),
            created_at=now,
            updated_at=now,
        )
        try:
            await self.kv.create(f"role.{name}", msgspec.json.encode(record))
        except KeyWrongLastSequenceError:
            raise Conflict(f"role {name} exists") from None
        return record

    async def update_role(
        self, name: str, description: str | None, perms: list[str] | None
    ) -> RoleRecord:
        if perms is not None:
            check_permissions(perms)

        def change(record: RoleRecord) -> RoleRecord:
            return msgspec.structs.replace(
                record,
                description=record.description if description is None else description,
                permissions=record.permissions if perms is None else sorted(set(perms)),
                updated_at=utcnow_iso(),
            )

        result: RoleRecord = await self._change(f"role.{name}", RoleRecord, change)
        return result

    async def delete_role(self, name: str) -> None:
        users = [u.username for u in await self.list_users() if name in u.roles]
        if users:
            raise Conflict(f"role {name} is given to {', '.join(users)}: take it from them first")
        await self.kv.delete(f"role.{name}")

    # --- users ----------------------------------------------------------------------

    async def check_roles(self, roles: list[str]) -> None:
        custom = await self.custom_roles()
        unknown = [r for r in roles if r not in BUILTIN_ROLES and r not in custom]
        if unknown:
            raise BadRequest(f"unknown role {shown(unknown[0])} - at `$.roles`")

    async def create_user(
        self, username: str, password: str, *, nickname: str, email: str, roles: list[str]
    ) -> UserRecord:
        """A new user; 400 naming the field for a bad name, password or role, 409 when
        the name is taken (case-insensitively)."""
        if not USERNAME.fullmatch(username) or username.lower() in RESERVED_USERNAMES:
            raise BadRequest(
                "username must be 1-64 letters, digits, '_', '.', '@' or '-' (not 'token'"
                " or 'anonymous') - at `$.username`"
            )
        check_password(password)
        await self.check_roles(roles)
        password_hash = await asyncio.to_thread(_hasher.hash, password)
        user_id = await self._next_id("user", 1)
        name_key = f"username.{sha256_hex(username.lower())}"
        try:
            await self.kv.create(name_key, str(user_id).encode())
        except KeyWrongLastSequenceError:
            raise Conflict(f"user name {username} is taken") from None
        now = utcnow_iso()
        user = UserRecord(
            id=user_id,
            username=username,
            password_hash=password_hash,
            nickname=nickname or username,
            email=email,
            roles=list(dict.fromkeys(roles)),
            created_at=now,
            updated_at=now,
        )
        await self.kv.create(f"user.{user_id}", msgspec.json.encode(user))
        return user

    async def get_user(self, user_id: int) -> UserRecord | None:
        found = await self._get(f"user.{user_id}", UserRecord)
        return None if found is None else found[0]

    async def find_user(self, username: str) -> UserRecord | None:
        if not USERNAME.fullmatch(username):
            return None
        try:
            entry = await self.kv.get(f"username.{sha256_hex(username.lower())}")
        except KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        return await self.get_user(int(entry.value))

    async def list_users(self) -> list[UserRecord]:
        out = []
        for key in await keys(self.kv, "user."):
            found = await self._get(key, UserRecord)
            if found is not None:
                out.append(found[0])
        return sorted(out, key=lambda u: u.id)

    async def update_user(
        self, user_id: int, change: Callable[[UserRecord], UserRecord]
    ) -> UserRecord:
        def stamped(user: UserRecord) -> UserRecord:
            return msgspec.structs.replace(change(user), updated_at=utcnow_iso())

        try:
            result: UserRecord = await self._change(f"user.{user_id}", UserRecord, stamped)
        except NotFound:
            raise NotFound(f"user {user_id} not found") from None
        return result

    async def hash_password(self, password: str) -> str:
        check_password(password)
        return await asyncio.to_thread(_hasher.hash, password)

    async def delete_user(self, user_id: int) -> None:
        """Remove the user, its name, its sessions and its API tokens."""
        user = await self.get_user(user_id)
        if user is None:
            raise NotFound(f"user {user_id} not found")
        for token in await self.list_tokens(user_id):
            await self.kv.delete(f"token.{token[1]}")
        await self.end_sessions(user_id, "user deleted")
        await self.kv.delete(f"user.{user_id}")
        await self.kv.delete(f"username.{sha256_hex(user.username.lower())}")

    async def verify(self, username: str, password: str) -> UserRecord | None:
        """The user when ``password`` is theirs, else None (an unknown name costs as long
        as a wrong password). A hash made with older parameters is made again."""
        user = await self.find_user(username)
        stored = user.password_hash if user is not None else _DUMMY_HASH
        try:
            await asyncio.to_thread(_hasher.verify, stored, password)
        except (VerificationError, InvalidHashError):
            return None
        if user is None:
            return None
        if _hasher.check_needs_rehash(user.password_hash):
            new_hash = await asyncio.to_thread(_hasher.hash, password)
            user = await self.update_user(
                user.id, lambda u: msgspec.structs.replace(u, password_hash=new_hash)
            )
        return user

    # --- sessions -------------------------------------------------------------------

    async def create_session(self, user_id: int, lifetime: float) -> SessionRecord:
        now = time.time()
        record = SessionRecord(
            id=uuid.uuid4().hex,
            user_id=user_id,
            refresh_jti=uuid.uuid4().hex,
            created_at=now,
            expires_at=now + lifetime,
        )
        await self.kv.create(f"session.{record.id}", msgspec.json.encode(record))
        return record

    async def get_session(self, session_id: str) -> SessionRecord | None:
        if not re.fullmatch(r"[0-9a-f]{32}", session_id):
            return None
        found = await self._get(f"session.{session_id}", SessionRecord)
        return None if found is None else found[0]

    async def rotate(self, session_id: str, jti: str) -> tuple[SessionRecord | None, str]:
        """Use the refresh token ``jti`` of the session: the session with a new
        ``refresh_jti`` and ``""``, or None and why not. A token of the session that was
        used already revokes the whole session (its refresh family and access tokens)."""
        for _ in range(CAS_ATTEMPTS):
            if not re.fullmatch(r"[0-9a-f]{32}", session_id):
                return None, "unknown session"
            found = await self._get(f"session.{session_id}", SessionRecord)
            if found is None:
                return None, "unknown session"
            session, revision = found
            if session.revoked:
                return None, f"session revoked ({session.revoked_reason})"
            if session.expires_at <= time.time():
                return None, "session expired"
            if secrets.compare_digest(session.refresh_jti, jti):
                new = msgspec.structs.replace(
                    session,
                    refresh_jti=uuid.uuid4().hex,
                    used_refresh_jtis=[*session.used_refresh_jtis, jti][-USED_REFRESH_KEPT:],
                )
                reason = ""
            elif jti in session.used_refresh_jtis:
                new = msgspec.structs.replace(
                    session, revoked=True, revoked_reason="refresh token reused"
                )
                reason = "refresh token reused: the session is revoked"
            else:
                return None, "unknown refresh token"
            try:
                await self.kv.update(
                    f"session.{session_id}", msgspec.json.encode(new), last=revision
                )
            except KeyWrongLastSequenceError:
                continue
            return (new, "") if not reason else (None, reason)
        return None, "session busy"

    async def revoke_session(self, session_id: str, reason: str) -> None:
        def change(session: SessionRecord) -> SessionRecord:
            return msgspec.structs.replace(session, revoked=True, revoked_reason=reason)

        await self._change(f"session.{session_id}", SessionRecord, change)

    async def end_sessions(self, user_id: int, reason: str) -> None:
        """Revoke every session of the user (a password change, a removal)."""
        for key in await keys(self.kv, "session."):
            found = await self._get(key, SessionRecord)
            if found is None:
                continue
            session = found[0]
            if session.expires_at <= time.time():
                await self.kv.delete(key)  # ended anyway: tidy up
            elif session.user_id == user_id and not session.revoked:
                await self.revoke_session(session.id, reason)

    # --- API tokens -----------------------------------------------------------------

    async def create_token(
        self, user: UserRecord, name: str, perms: frozenset[str], expires_in: int | None
    ) -> tuple[str, ApiTokenRecord]:
        """A new API token of ``user`` (shown once; stored as its SHA-256 only)."""
        if not TOKEN_NAME.fullmatch(name):
            raise BadRequest("name must be 1-64 letters, digits, '_', '.' or '-' - at `$.name`")
        if any(t.name == name for t, _ in await self.list_tokens(user.id)):
            raise Conflict(f"user {user.username} has a token named {name}")
        token = API_TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = time.time()
        expires_unix = now + expires_in if expires_in else 0.0
        record = ApiTokenRecord(
            id=uuid.uuid4().hex[:16],
            name=name,
            user_id=user.id,
            permissions=sorted(perms - {ADMIN}) + ([ADMIN] if ADMIN in perms else []),
            created_at=utcnow_iso(),
            expires_at=(
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires_unix))
                if expires_in
                else None
            ),
            expires_unix=expires_unix,
        )
        await self.kv.create(f"token.{sha256_hex(token)}", msgspec.json.encode(record))
        return token, record

    async def list_tokens(self, user_id: int) -> list[tuple[ApiTokenRecord, str]]:
        """The user's API tokens, each with the hash its key is stored under."""
        out = []
        for key in await keys(self.kv, "token."):
            found = await self._get(key, ApiTokenRecord)
            if found is not None and found[0].user_id == user_id:
                out.append((found[0], key.removeprefix("token.")))
        return sorted(out, key=lambda t: t[0].created_at)

    async def delete_token(self, user_id: int, token_id: str) -> None:
        for record, digest in await self.list_tokens(user_id):
            if record.id == token_id:
                await self.kv.delete(f"token.{digest}")
                return
        raise NotFound(f"API token {shown(token_id)} not found")

    async def authenticate_token(self, token: str) -> ApiTokenRecord | None:
        """The API token's record, or None (unknown, revoked or expired)."""
        if not token.startswith(API_TOKEN_PREFIX) or len(token) > 200:
            return None
        found = await self._get(f"token.{sha256_hex(token)}", ApiTokenRecord)
        if found is None:
            return None
        record: ApiTokenRecord = found[0]
        if record.expires_unix and record.expires_unix <= time.time():
            return None
        return record

    # --- lockout --------------------------------------------------------------------

    async def claim_attempt(
        self, kind: str, subject: str, window: float, limit: int
    ) -> tuple[float | None, list[float]]:
        """Count a login attempt of ``subject`` *before* its password is checked, so that
        attempts sent at once cannot all pass the check of ``limit``: by compare-and-swap,
        the time now joins the failures of the last ``window`` seconds unless ``limit``
        of them are there already. Returns the time added (None when refused) and the
        recent failures (without it). A key changed by others on each of
        ``CAS_ATTEMPTS`` tries is refused too (None, fewer than ``limit`` times): a
        burst of attempts never gets more than ``limit`` through. An attempt that turns
        out to be no failure (the right password) is taken back with
        :meth:`release_attempt`."""
        key = f"fail.{kind}.{sha256_hex(subject)}"
        times: list[float] = []
        for _ in range(CAS_ATTEMPTS):
            now = time.time()
            found = await self._get(key, Failures)
            times = [] if found is None else [t for t in found[0].times if t > now - window]
            if len(times) >= limit:
                return None, times
            value = msgspec.json.encode(Failures(times=[*times, now][-200:]))
            try:
                if found is None:
                    await self.kv.create(key, value)
                else:
                    await self.kv.update(key, value, last=found[1])
            except KeyWrongLastSequenceError:
                await asyncio.sleep(0.005 * (1 + secrets.randbelow(10)))
                continue
            return now, times
        return None, times

    async def release_attempt(self, kind: str, subject: str, stamp: float) -> None:
        """Take back an attempt :meth:`claim_attempt` counted (``stamp``: the time it
        returned). If the key keeps changing it stays counted (logged): never fewer."""
        key = f"fail.{kind}.{sha256_hex(subject)}"
        for _ in range(CAS_ATTEMPTS):
            found = await self._get(key, Failures)
            if found is None or stamp not in found[0].times:
                return
            times = [t for t in found[0].times if t != stamp]
            try:
                await self.kv.update(key, msgspec.json.encode(Failures(times=times)), last=found[1])
            except KeyWrongLastSequenceError:
                await asyncio.sleep(0.005 * (1 + secrets.randbelow(10)))
                continue
            return
        log.warning("a login attempt of a %s stays counted: its record kept changing", kind)

    async def clear_failures(self, kind: str, subject: str) -> None:
        await self.kv.delete(f"fail.{kind}.{sha256_hex(subject)}")

    # --- housekeeping ---------------------------------------------------------------

    async def tidy(self, window: float) -> int:
        """Remove sessions that ended (expired or revoked: their tokens are refused either
        way), OAuth2 states that expired, and failed-login records older than ``window``;
        returns how many went."""
        now = time.time()
        gone = 0
        for key in await keys(self.kv, "session."):
            found = await self._get(key, SessionRecord)
            if found is not None and (found[0].revoked or found[0].expires_at <= now):
                await self.kv.delete(key)
                gone += 1
        for key in await keys(self.kv, "oauth."):  # OAuth2 states never called back
            found_state = await self._get(key, dict[str, Any])
            if found_state is not None and found_state[0].get("expires_at", 0) <= now:
                await self.kv.delete(key)
                gone += 1
        for key in await keys(self.kv, "fail."):
            failures = await self._get(key, Failures)
            if failures is not None and all(t <= now - window for t in failures[0].times):
                await self.kv.delete(key)
                gone += 1
        return gone


#: Seconds between two tidy-ups of ``VB_USERS`` (:func:`tidy_forever`).
TIDY_EVERY: Final = 3600.0


async def tidy_forever(store: IdentityStore, window: float) -> None:
    """Tidy the bucket up every :data:`TIDY_EVERY` seconds (any replica may: deletes are
    idempotent)."""
    while True:
        await asyncio.sleep(TIDY_EVERY)
        try:
            await store.tidy(window)
        except Exception as exc:  # the bus may be away for a while: next round
            log.warning("could not tidy up sessions: %r", exc)
