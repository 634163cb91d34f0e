"""Users, roles and API tokens (agents-backend-api.md, ``/api/v1/admin/sys``).

* ``GET /users`` (``users:read``; ``page`` from 1, ``size`` 1-1000, ``username``: part of
  the name): ``{"items", "total", "page", "size", "total_pages"}``; ``GET /users/{id}``
  (oneself, or ``users:read``). A user is ``{"id", "username", "nickname", "email",
  "roles", "permissions", "enabled", "created_at", "updated_at"}``: never a password or
  its hash.
* ``POST /users`` (``users:manage``) ``{"username", "password", "nickname", "email",
  "roles", "enabled"}``: 201 with the user; 409 when the name, or the ``email`` (by
  which OAuth2 login finds a user), is another user's.
  ``PUT /users/{id}`` (the same fields but ``username``, each optional): with
  ``users:manage`` any of them; oneself without it ``nickname``, ``email`` and
  ``password`` only. Changing one's own ``password`` or ``email`` takes
  ``current_password`` (400 without it; 403 when wrong, counted as a failed login:
  429 while the name is locked out), so that a stolen access token cannot make itself
  a lasting login (a new password, or an address for OAuth2 login). A new password
  ends the user's sessions. ``DELETE /users/{id}``
  (``users:manage``): 204, its sessions and API tokens go with it.
* ``GET /roles`` (``users:read``): the built-in roles (``builtin: true``, not
  changeable) and the custom ones; ``POST /roles`` ``{"name", "description",
  "permissions"}`` (201), ``PUT /roles/{id}`` (``description``, ``permissions``),
  ``DELETE /roles/{id}`` (204; 409 while a user has it): ``users:manage``. ``{id}`` is a
  role's id or name. ``GET /permissions``: the vocabulary and the built-in roles.
* ``POST /users/{id}/tokens`` ``{"name", "permissions", "expires_in_seconds"}`` (a user
  for themselves only): 201 ``{"id", "name", "token", "permissions", "expires_at", ...}``
  with the token (``vbt_...``) shown this once; it is stored as its SHA-256 only.
  ``permissions`` (default: all the user has) must be the user's; at use a token has
  those its user still has. ``GET /users/{id}/tokens``, ``DELETE
  /users/{id}/tokens/{token_id}``: oneself, or ``users:manage``.

No escalation: a role given (to a user, or a role's permissions) must be within the
caller's own permissions, and a user whose permissions the caller lacks cannot be
changed or removed by them (403). Errors are ``{"detail", "code"}``.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, delete, get, post, put
from litestar.exceptions import HTTPException
from litestar.params import Parameter

from virtbackup.gateway.bodies import SnakeBody
from virtbackup.gateway.controllers.admin_auth import stores
from virtbackup.gateway.identity_auth import Identity, identity_of
from virtbackup.gateway.identity_perms import ADMIN, BUILTIN_ROLES, PERMISSIONS, allows
from virtbackup.gateway.identity_store import (
    ApiTokenRecord,
    IdentityStore,
    RoleRecord,
    UserRecord,
    check_permissions,
    role_permissions,
)
from virtbackup.gateway.login_log import paged
from virtbackup.gateway.state import Gateway
from virtbackup.runtime.errors import BadRequest, Conflict, NotFound

Name = Annotated[str, msgspec.Meta(max_length=128)]
Short = Annotated[str, msgspec.Meta(max_length=256)]
Secret = Annotated[str, msgspec.Meta(max_length=1024)]
Names = Annotated[list[Name], msgspec.Meta(max_length=64)]
UserId = Annotated[int, Parameter(description="A user's id", ge=1, le=2**53)]
RoleRef = Annotated[str, Parameter(description="A role's id or name", max_length=64)]


class Forbidden(HTTPException):
    status_code = 403


class LockedOut(HTTPException):
    status_code = 429


class UserCreate(SnakeBody, kw_only=True):
    username: Name
    password: Secret
    nickname: Short = ""
    email: Short = ""
    roles: Names = msgspec.field(default_factory=list)
    enabled: bool = True


class UserUpdate(SnakeBody, kw_only=True):
    nickname: Short | None = None
    email: Short | None = None
    password: Secret | None = None
    current_password: Secret | None = None
    roles: Names | None = None
    enabled: bool | None = None


class RoleCreate(SnakeBody, kw_only=True):
    name: Name
    description: Short = ""
    permissions: Names = msgspec.field(default_factory=list)


class RoleUpdate(SnakeBody, kw_only=True):
    description: Short | None = None
    permissions: Names | None = None


class TokenCreate(SnakeBody, kw_only=True):
    name: Name
    permissions: Names | None = None
    expires_in_seconds: Annotated[int, msgspec.Meta(ge=60, le=10 * 365 * 86400)] | None = None


async def user_view(store: IdentityStore, user: UserRecord) -> dict[str, Any]:
    return {
        "id": user.id,
        "username": user.username,
        "nickname": user.nickname,
        "email": user.email,
        "roles": user.roles,
        "permissions": sorted(await store.permissions_of(user)),
        "enabled": user.enabled,
        "created_at": user.created_at,
        "updated_at": user.updated_at,
    }


def role_view(role: RoleRecord) -> dict[str, Any]:
    return {
        "id": role.id,
        "name": role.name,
        "description": role.description,
        "permissions": role.permissions,
        "builtin": False,
        "created_at": role.created_at,
        "updated_at": role.updated_at,
    }


def builtin_views() -> list[dict[str, Any]]:
    return [
        {
            "id": r.id,
            "name": r.name,
            "description": r.description,
            "permissions": sorted(r.permissions),
            "builtin": True,
        }
        for r in BUILTIN_ROLES.values()
    ]


def token_view(record: ApiTokenRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "name": record.name,
        "user_id": record.user_id,
        "permissions": record.permissions,
        "created_at": record.created_at,
        "expires_at": record.expires_at,
    }


def _within(caller: Identity, perms: frozenset[str], what: str) -> None:
    """403 unless the caller holds every permission of ``perms`` (no escalation)."""
    if ADMIN in caller.permissions:
        return
    missing = sorted(perms - caller.permissions)
    if missing:
        raise Forbidden(f"{what} needs permissions you do not have: {', '.join(missing)}")


async def _roles_perms(store: IdentityStore, roles: list[str]) -> frozenset[str]:
    await store.check_roles(roles)
    custom = await store.custom_roles()
    out: frozenset[str] = frozenset()
    for role in roles:
        out |= role_permissions(role, custom)
    return out


async def _confirm_password(
    gw: Gateway, store: IdentityStore, user: UserRecord, current: str | None
) -> None:
    """400 without ``current``, 403 unless it is ``user``'s password; an attempt counts
    as a login's would (``claim_attempt``: 429 while the name is locked out)."""
    if current is None:
        raise BadRequest(
            "changing one's own password or email takes current_password - at `$.current_password`"
        )
    settings = gw.settings
    name_key = user.username.lower()
    stamp, failures = await store.claim_attempt(
        "user", name_key, settings.login_failure_window, settings.login_max_failures
    )
    if stamp is None:
        raise LockedOut(
            f"too many failed logins of this user name ({len(failures)}); try again later"
        )
    if await store.verify(user.username, current) is None:  # the attempt stays counted
        raise Forbidden("current_password is wrong - at `$.current_password`")
    await store.release_attempt("user", name_key, stamp)


async def _email_free(store: IdentityStore, email: str, user_id: int | None) -> None:
    """409 when another user has ``email`` (case-insensitively): OAuth2 login finds its
    user by that address, so two users with one address would make it pick one."""
    if not email:
        return
    for other in await store.list_users():
        if other.id != user_id and other.email.lower() == email.lower():
            raise Conflict(f"e-mail address taken by user {other.username} - at `$.email`")


async def _user(store: IdentityStore, user_id: int) -> UserRecord:
    user = await store.get_user(user_id)
    if user is None:
        raise NotFound(f"user {user_id} not found")
    return user


class AdminSysController(Controller):
    path = "/api/v1/admin/sys"

    @get("/users")
    async def list_users(
        self,
        gw: Gateway,
        page: Annotated[int, Parameter(ge=1, le=100_000)] = 1,
        size: Annotated[int, Parameter(ge=1, le=1000)] = 20,
        username: Annotated[str, Parameter(max_length=64)] = "",
    ) -> dict[str, Any]:
        """A page of users (see module)."""
        store, _ = stores(gw)
        users = [u for u in await store.list_users() if username.lower() in u.username.lower()]
        views = [await user_view(store, u) for u in users]
        return paged(views, page, size)

    @get("/users/{user_id:int}")
    async def get_user(
        self, gw: Gateway, user_id: UserId, request: Request[Any, Any, Any]
    ) -> dict[str, Any]:
        """One user: oneself, or with ``users:read``."""
        store, _ = stores(gw)
        caller = identity_of(request.scope)
        if caller.user_id != user_id and not allows(caller.permissions, "users:read"):
            raise Forbidden("reading another user needs permission users:read")
        return await user_view(store, await _user(store, user_id))

    @post("/users", status_code=201)
    async def create_user(
        self, gw: Gateway, data: UserCreate, request: Request[Any, Any, Any]
    ) -> dict[str, Any]:
        """Make a user (``users:manage``; roles within the caller's permissions)."""
        store, _ = stores(gw)
        _within(identity_of(request.scope), await _roles_perms(store, data.roles), "these roles")
        await _email_free(store, data.email, None)
        user = await store.create_user(
            data.username,
            data.password,
            nickname=data.nickname,
            email=data.email,
            roles=data.roles,
        )
        if not data.enabled:
            user = await store.update_user(
                user.id, lambda u: msgspec.structs.replace(u, enabled=False)
            )
        return await user_view(store, user)

    @put("/users/{user_id:int}")
    async def update_user(
        self, gw: Gateway, user_id: UserId, data: UserUpdate, request: Request[Any, Any, Any]
    ) -> dict[str, Any]:
        """Change a user (see module for who may change what)."""
        store, _ = stores(gw)
        caller = identity_of(request.scope)
        target = await _user(store, user_id)
        manages = allows(caller.permissions, "users:manage")
        if not manages:
            if caller.user_id != user_id or caller.kind != "user":
                raise Forbidden(
                    "changing a user needs permission users:manage (oneself: logged in,"
                    " not with an API token)"
                )
            if data.roles is not None or data.enabled is not None:
                raise Forbidden("changing roles or enabled needs permission users:manage")
        else:
            _within(caller, await store.permissions_of(target), f"changing user {target.username}")
            if data.roles is not None:
                _within(caller, await _roles_perms(store, data.roles), "these roles")
        if caller.user_id == user_id and (data.password is not None or data.email is not None):
            await _confirm_password(gw, store, target, data.current_password)
        if data.email is not None:
            await _email_free(store, data.email, user_id)
        new_hash = await store.hash_password(data.password) if data.password is not None else None

        def change(user: UserRecord) -> UserRecord:
            return msgspec.structs.replace(
                user,
                nickname=user.nickname if data.nickname is None else data.nickname,
                email=user.email if data.email is None else data.email,
                roles=user.roles if data.roles is None else list(dict.fromkeys(data.roles)),
                enabled=user.enabled if data.enabled is None else data.enabled,
                password_hash=user.password_hash if new_hash is None else new_hash,
            )

        user = await store.update_user(user_id, change)
        if new_hash is not None or data.enabled is False:
            await store.end_sessions(user_id, "password changed or user disabled")
        return await user_view(store, user)

    @delete("/users/{user_id:int}", status_code=204)
    async def delete_user(
        self, gw: Gateway, user_id: UserId, request: Request[Any, Any, Any]
    ) -> None:
        """Remove a user with its sessions and API tokens (``users:manage``)."""
        store, _ = stores(gw)
        caller = identity_of(request.scope)
        target = await _user(store, user_id)
        _within(caller, await store.permissions_of(target), f"removing user {target.username}")
        if caller.user_id == user_id:
            raise Conflict("a user cannot remove themselves")
        await store.delete_user(user_id)

    @get("/roles")
    async def list_roles(self, gw: Gateway) -> list[dict[str, Any]]:
        """The built-in roles, then the custom ones by id."""
        store, _ = stores(gw)
        custom = sorted((await store.custom_roles()).values(), key=lambda r: r.id)
        return builtin_views() + [role_view(r) for r in custom]

    @get("/permissions")
    async def permissions(self) -> dict[str, Any]:
        """The permission vocabulary and the built-in roles."""
        return {"permissions": PERMISSIONS, "roles": builtin_views()}

    @post("/roles", status_code=201)
    async def create_role(
        self, gw: Gateway, data: RoleCreate, request: Request[Any, Any, Any]
    ) -> dict[str, Any]:
        """Make a custom role (its permissions within the caller's)."""
        store, _ = stores(gw)
        perms = check_permissions(data.permissions)
        _within(identity_of(request.scope), perms, "this role")
        return role_view(await store.create_role(data.name, data.description, data.permissions))

    @put("/roles/{role_id:str}")
    async def update_role(
        self, gw: Gateway, role_id: RoleRef, data: RoleUpdate, request: Request[Any, Any, Any]
    ) -> dict[str, Any]:
        """Change a custom role's description or permissions."""
        store, _ = stores(gw)
        role = await self._custom(store, role_id)
        caller = identity_of(request.scope)
        _within(caller, frozenset(role.permissions), f"changing role {role.name}")
        if data.permissions is not None:
            _within(caller, check_permissions(data.permissions), "these permissions")
        return role_view(await store.update_role(role.name, data.description, data.permissions))

    @delete("/roles/{role_id:str}", status_code=204)
    async def delete_role(
        self, gw: Gateway, role_id: RoleRef, request: Request[Any, Any, Any]
    ) -> None:
        """Remove a custom role that no user has."""
        store, _ = stores(gw)
        role = await self._custom(store, role_id)
        _within(
            identity_of(request.scope), frozenset(role.permissions), f"removing role {role.name}"
        )
        await store.delete_role(role.name)

    @staticmethod
    async def _custom(store: IdentityStore, ref: str) -> RoleRecord:
        builtin = next((r for r in BUILTIN_ROLES.values() if ref in (r.name, str(r.id))), None)
        if builtin is not None:
            raise Conflict(f"role {builtin.name} is built in: it cannot be changed or removed")
        role = await store.find_role(ref)
        if role is None:
            raise NotFound(f"role {ref[:64]!r} not found")
        return role

    @post("/users/{user_id:int}/tokens", status_code=201)
    async def create_token(
        self, gw: Gateway, user_id: UserId, data: TokenCreate, request: Request[Any, Any, Any]
    ) -> dict[str, Any]:
        """Make an API token of one's own (shown once; see module)."""
        store, _ = stores(gw)
        caller = identity_of(request.scope)
        if caller.kind != "user" or caller.user_id != user_id:
            raise Forbidden("an API token is made by its user, logged in (not with a token)")
        user = await _user(store, user_id)
        held = await store.permissions_of(user)
        wanted = held if data.permissions is None else check_permissions(data.permissions)
        missing = sorted(wanted - held)
        if missing:
            raise Forbidden(f"a token can have only your permissions; not {', '.join(missing)}")
        token, record = await store.create_token(user, data.name, wanted, data.expires_in_seconds)
        return {**token_view(record), "token": token}

    @get("/users/{user_id:int}/tokens")
    async def list_tokens(
        self, gw: Gateway, user_id: UserId, request: Request[Any, Any, Any]
    ) -> list[dict[str, Any]]:
        """A user's API tokens (never the tokens themselves)."""
        store, _ = stores(gw)
        self._own_or_manage(identity_of(request.scope), user_id)
        await _user(store, user_id)
        return [token_view(t) for t, _ in await store.list_tokens(user_id)]

    @delete("/users/{user_id:int}/tokens/{token_id:str}", status_code=204)
    async def delete_token(
        self,
        gw: Gateway,
        user_id: UserId,
        token_id: Annotated[str, Parameter(max_length=64)],
        request: Request[Any, Any, Any],
    ) -> None:
        """Revoke an API token: one's own, or with ``users:manage`` one of a user whose
        permissions the caller holds (403 otherwise, as for changing that user)."""
        store, _ = stores(gw)
        caller = identity_of(request.scope)
        self._own_or_manage(caller, user_id)
        if caller.user_id != user_id:
            target = await _user(store, user_id)
            _within(caller, await store.permissions_of(target), f"changing user {target.username}")
        await store.delete_token(user_id, token_id)

    @staticmethod
    def _own_or_manage(caller: Identity, user_id: int) -> None:
        if caller.user_id != user_id and not allows(caller.permissions, "users:manage"):
            raise Forbidden("another user's tokens need permission users:manage")
