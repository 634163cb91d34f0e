"""Administration commands: users (``users add|update|rm|passwd``, on
``/api/v1/admin/sys/users``), roles (``roles ls``), remote agents (``agents
add|rm|activate|deactivate``: registration tokens and ``/api/v1/agents``) and the audit
trail (``audit ls``: the operation log, ``audit logins``: the login log).

Users are named by their user name (the API's numeric id also works); passwords are
asked for (twice for a new one) or read from ``VIRTBACKUP_PASSWORD`` (one's current
password) and ``VIRTBACKUP_NEW_PASSWORD`` (a new one), never taken as an argument
(arguments show in the process list and the shell's history). A registration token is
printed once and stored nowhere.
"""

from __future__ import annotations

import base64
import getpass
import json
import os
from typing import Annotated, Any

import typer

from virtbackup.cli.client import app as base
from virtbackup.cli.client import more
from virtbackup.cli.client.api import LOGIN_PATH, Api, ApiError, error_message, store_tokens
from virtbackup.cli.client.app import ContextOpt, OutputOpt, connect, handled
from virtbackup.cli.client.output import Column, Format, emit, short_time

roles_app = typer.Typer(help="Roles and their permissions.", no_args_is_help=True)
audit_app = typer.Typer(help="The audit trail: operations and logins.", no_args_is_help=True)
base.app.add_typer(roles_app, name="roles")
base.app.add_typer(audit_app, name="audit")

USERS = "/api/v1/admin/sys/users"
USER_COLS = [
    Column("ID", "id"),
    Column("USER", "username", flex=True),
    Column("ROLES", "roles", flex=True),
    Column("ENABLED", "enabled"),
    Column("EMAIL", "email", flex=True),
    Column("CREATED", "created_at", wide_only=True),
]

RoleOpt = Annotated[
    list[str] | None,
    typer.Option("--role", "-r", help="a role (repeat for several; see `roles ls`)"),
]


def new_password(user: str) -> str:
    """``$VIRTBACKUP_NEW_PASSWORD``, else asked twice (they must match)."""
    given = os.environ.get("VIRTBACKUP_NEW_PASSWORD")
    if given:
        return given
    first = getpass.getpass(f"new password for {user}: ")
    if first != getpass.getpass("again: "):
        raise ApiError(0, "the two passwords differ: nothing changed")
    if not first:
        raise ApiError(0, "an empty password: nothing changed")
    return first


def find_user(api: Api, ref: str) -> dict[str, Any]:
    """The user named ``ref`` (exactly), or whose id it is.

    Raises ``ApiError`` when there is none."""
    if ref.isdigit():
        found: dict[str, Any] = api.get(f"{USERS}/{ref}")
        return found
    answer = api.get(USERS, username=ref, size=1000)
    for user in answer.get("items", []):
        if user.get("username") == ref:
            return dict(user)
    raise ApiError(404, f"no user named {ref!r} (see `virtbackup users ls`)")


def own_user_id(api: Api) -> int:
    """The id of the user a context logs in as: the ``sub`` of its access token (read,
    not verified: the gateway verifies it with every request).

    Raises ``ApiError`` for a context that logs in with a token."""
    if not api.ctx.get("user"):
        raise ApiError(0, "this context logs in with a token, not as a user")
    api.request("GET", "/health")  # renews the access token when it is about to expire
    try:
        payload = str(api.ctx["accessToken"]).split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return int(claims["sub"])
    except (KeyError, IndexError, ValueError, TypeError) as exc:
        raise ApiError(
            0, f"the context's access token is not readable ({exc}): log in again"
        ) from None


@more.users_app.command("add")
@handled
def users_add(
    username: Annotated[str, typer.Argument(help="the new user's name")],
    role: RoleOpt = None,
    email: Annotated[
        str | None, typer.Option(help="e-mail (OAuth2 login finds users by it)")
    ] = None,
    nickname: Annotated[str | None, typer.Option(help="a display name")] = None,
    disabled: Annotated[bool, typer.Option(help="make the user disabled")] = False,
    output: OutputOpt = Format.table,
    context: ContextOpt = None,
) -> None:
    """Add a user (needs users:manage). The password is asked twice, or read from
    $VIRTBACKUP_NEW_PASSWORD; roles given must be within your own permissions.

    Example: virtbackup users add bob --role operator --email bob@example.com
    """
    body: dict[str, Any] = {"username": username, "roles": role or []}
    if email is not None:
        body["email"] = email
    if nickname is not None:
        body["nickname"] = nickname
    if disabled:
        body["enabled"] = False
    with connect(context) as api:
        body["password"] = new_password(username)
        user = api.post(USERS, body)
    emit(base.out, user, output, USER_COLS)


@more.users_app.command("update")
@handled
def users_update(
    username: Annotated[str, typer.Argument(help="the user's name (or id)")],
    role: RoleOpt = None,
    email: Annotated[str | None, typer.Option(help="a new e-mail")] = None,
    nickname: Annotated[str | None, typer.Option(help="a new display name")] = None,
    enabled: Annotated[
        bool | None, typer.Option("--enable/--disable", help="allow or refuse the user's logins")
    ] = None,
    output: OutputOpt = Format.table,
    context: ContextOpt = None,
) -> None:
    """Change a user: the options given replace what the user has (--role replaces all
    its roles). Disabling a user ends its sessions.

    Example: virtbackup users update bob --role viewer --disable
    """
    body: dict[str, Any] = {}
    for key, value in (("roles", role), ("email", email), ("nickname", nickname),
                       ("enabled", enabled)):  # fmt: skip
        if value is not None:
            body[key] = value
    if not body:
        raise ApiError(
            0, "nothing to change: give --role, --email, --nickname or --enable/--disable"
        )
    with connect(context) as api:
        user = find_user(api, username)
        if api.ctx.get("user") == user["username"] and "email" in body:
            body["current_password"] = current_password(user["username"])
        changed = api.request("PUT", f"{USERS}/{user['id']}", json_body=body)
    emit(base.out, changed, output, USER_COLS)


def current_password(user: str) -> str:
    """One's own password, to confirm a change: ``$VIRTBACKUP_PASSWORD`` or asked."""
    return os.environ.get("VIRTBACKUP_PASSWORD") or getpass.getpass(
        f"current password for {user}: "
    )


@more.users_app.command("rm")
@handled
def users_rm(
    username: Annotated[str, typer.Argument(help="the user's name (or id)")],
    context: ContextOpt = None,
) -> None:
    """Remove a user, with its sessions and API tokens (needs users:manage).

    Example: virtbackup users rm bob
    """
    with connect(context) as api:
        user = find_user(api, username)
        api.request("DELETE", f"{USERS}/{user['id']}")
    base.out.print(f"user {user['username']} removed")


@more.users_app.command("passwd")
@handled
def users_passwd(
    username: Annotated[
        str | None, typer.Argument(help="whose password (default: the context's user)")
    ] = None,
    context: ContextOpt = None,
) -> None:
    """Set a user's password (asked twice, or $VIRTBACKUP_NEW_PASSWORD). One's own takes
    the current password too ($VIRTBACKUP_PASSWORD or asked), and the context logs in
    again with the new one (a new password ends the user's sessions); another user's
    needs users:manage.

    Example: VIRTBACKUP_NEW_PASSWORD='a new long one' virtbackup users passwd bob
    """
    with connect(context) as api:
        me = api.ctx.get("user")
        name = username or me
        if not name:
            raise ApiError(0, "this context logs in with a token: name the user")
        own = name == me
        user = api.get(f"{USERS}/{own_user_id(api)}") if own else find_user(api, name)
        body: dict[str, Any] = {"password": new_password(user["username"])}
        if own:
            body["current_password"] = current_password(user["username"])
        api.request("PUT", f"{USERS}/{user['id']}", json_body=body)
        if own:  # its sessions ended: log in again with the new password
            resp = api.client.post(
                LOGIN_PATH, json={"username": user["username"], "password": body["password"]}
            )
            if resp.status_code != 200:
                raise ApiError(resp.status_code, f"password changed; {error_message(resp)}")
            store_tokens(api.ctx, resp.json())
            api.store.contexts[api.name] = api.ctx
            api.store.save()
    base.out.print(f"password of {user['username']} changed")


@roles_app.command("ls")
@handled
def roles_ls(output: OutputOpt = Format.table, context: ContextOpt = None) -> None:
    """List the roles: the built-in ones, then the custom ones, with their permissions
    (needs users:read).

    Example: virtbackup roles ls -o wide
    """
    with connect(context) as api:
        roles = api.get("/api/v1/admin/sys/roles")
    cols = [
        Column("NAME", "name"),
        Column("BUILTIN", "builtin"),
        Column("PERMISSIONS", "permissions", flex=True),
        Column("DESCRIPTION", "description", wide_only=True),
    ]
    emit(base.out, roles, output, cols)


# -- remote agents ----------------------------------------------------------------------


def agent_ref(api: Api, ref: str) -> str:
    """The full id of the agent ``ref`` names: its id, or the start of one.

    Raises ``ApiError`` when several match; one that none matches is returned as it is
    (the API's "not found" names it)."""
    if len(ref) >= 36 or ref.startswith("worker:"):
        return ref
    ids = [str(a.get("id", "")) for a in api.get("/api/v1/agents") if isinstance(a, dict)]
    found = sorted({i for i in ids if i.startswith(ref)})
    if len(found) > 1:
        raise ApiError(0, f"{ref!r} names several agents ({', '.join(found[:5])})")
    return found[0] if found else ref


@more.agents_app.command("add")
@handled
def agents_add(
    expires_in: Annotated[
        int, typer.Option(min=1, max=30 * 86400, help="seconds the token may be used")
    ] = 3600,
    output: OutputOpt = Format.table,
    context: ContextOpt = None,
) -> None:
    """Make a one-time registration token for a new remote agent. It is shown this once
    and stored nowhere (the gateway keeps its SHA-256 only): give it to `virtbackup agent`
    on the hypervisor host, which trades it for its own key.

    Example: virtbackup agents add --expires-in 600
    """
    with connect(context) as api:
        answer = api.post("/api/v1/agent/registration-tokens", {"expiresInSeconds": expires_in})
    if output in (Format.json, Format.yaml):
        emit(base.out, answer, output)
        return
    base.out.print(
        f"registration token (shown once, valid until {answer['expiresAt']}):\n"
        f"  {answer['token']}\n"
        "register the agent with it on its host (see README, Remote agents)",
        soft_wrap=True,
    )


@more.agents_app.command("rm")
@handled
def agents_rm(
    agent_id: Annotated[str, typer.Argument(help="the remote agent's id (or its start)")],
    context: ContextOpt = None,
) -> None:
    """Forget a remote agent and revoke its key (409 while a server's agentId names it;
    a job it had leased is cancelled).

    Example: virtbackup agents rm 0b0f3c2a
    """
    with connect(context) as api:
        full = agent_ref(api, agent_id)
        api.request("DELETE", f"/api/v1/agents/{full}")
    base.out.print(f"agent {full} removed")


def _agent_action(agent_id: str, action: str, output: Format, context: str | None) -> None:
    with connect(context) as api:
        full = agent_ref(api, agent_id)
        agent = api.post(f"/api/v1/agents/{full}/actions", {"action": action})
    emit(base.out, agent, output, more.AGENT_COLS)


@more.agents_app.command("activate")
@handled
def agents_activate(
    agent_id: str, output: OutputOpt = Format.table, context: ContextOpt = None
) -> None:
    """Let a remote agent lease jobs again.

    Example: virtbackup agents activate 0b0f3c2a
    """
    _agent_action(agent_id, "activate", output, context)


@more.agents_app.command("deactivate")
@handled
def agents_deactivate(
    agent_id: str, output: OutputOpt = Format.table, context: ContextOpt = None
) -> None:
    """Stop a remote agent from leasing jobs; a job it runs is cancelled.

    Example: virtbackup agents deactivate 0b0f3c2a
    """
    _agent_action(agent_id, "deactivate", output, context)


# -- audit --------------------------------------------------------------------------------

LimitOpt = Annotated[int, typer.Option(min=1, max=1000, help="at most this many, newest first")]
SinceOpt = Annotated[
    str | None, typer.Option(help="from this time on (ISO-8601; without a zone: UTC)")
]


@audit_app.command("ls")
@handled
def audit_ls(
    actor: Annotated[
        str | None, typer.Option(help="only this actor's (a user name, token)")
    ] = None,
    method: Annotated[str | None, typer.Option(help="POST, PUT, PATCH or DELETE")] = None,
    route: Annotated[str | None, typer.Option(help="routes or paths starting with this")] = None,
    failed: Annotated[bool, typer.Option(help="only requests refused or failed")] = False,
    since: SinceOpt = None,
    limit: LimitOpt = 50,
    output: OutputOpt = Format.table,
    context: ContextOpt = None,
) -> None:
    """List the operation log: every change made through any listener, who made it and
    what was answered (needs logs:read).

    Example: virtbackup audit ls --actor alice --since 2026-11-30 --failed
    """
    with connect(context) as api:
        page = api.get(
            "/api/v1/admin/log/opera-logs",
            actor=actor,
            method=method,
            route=route,
            outcome="failure" if failed else None,
            since=since,
            size=limit,
        )
    cols = [
        Column("ID", "id"),
        Column("TIME", "time", short_time),
        Column("ACTOR", "actor", flex=True),
        Column("METHOD", "method"),
        Column("PATH", "path", flex=True),
        Column("STATUS", "status"),
        Column("LISTENER", "listener", wide_only=True),
        Column("ADDRESS", "clientAddress", wide_only=True),
        Column("REQUEST", "requestId", wide_only=True),
    ]
    emit(base.out, page.get("items", []), output, cols)


@audit_app.command("logins")
@handled
def audit_logins(
    user: Annotated[str | None, typer.Option(help="only this user name's")] = None,
    failed: Annotated[bool, typer.Option(help="only failed logins")] = False,
    since: SinceOpt = None,
    limit: LimitOpt = 50,
    output: OutputOpt = Format.table,
    context: ContextOpt = None,
) -> None:
    """List login attempts (and token refreshes), newest first (needs logs:read).

    Example: virtbackup audit logins --failed
    """
    with connect(context) as api:
        page = api.get(
            "/api/v1/admin/log/login-logs",
            username=user,
            status="failure" if failed else None,
            since=since,
            size=limit,
        )
    cols = [
        Column("ID", "id"),
        Column("TIME", "time", short_time),
        Column("USER", "username", flex=True),
        Column("KIND", "kind"),
        Column("STATUS", "status"),
        Column("ADDRESS", "address", flex=True),
        Column("REASON", "reason", wide_only=True),
    ]
    emit(base.out, page.get("items", []), output, cols)
