"""The ``virtbackup`` operator commands (typer): contexts, servers and VMs, backups,
restores, restore points, jobs and destination maintenance, each a call of the public
HTTP API of the current context's gateway.

Every failure is one line on stderr (the API's message) and exit code 1 (2 for bad
usage, typer's); never a traceback. ``--wait`` and ``jobs watch`` exit 0 when the job
succeeded and 1 (with the job's message) when it failed or was canceled.
"""

from __future__ import annotations

import functools
import getpass
import inspect
import os
import re
import ssl
from collections.abc import Callable
from typing import Annotated, Any, ParamSpec, TypeVar

import httpx
import typer
from rich.console import Console
from rich.markup import escape

from virtbackup.cli.client.api import (
    LOGIN_PATH,
    Api,
    ApiError,
    check_hypersdk_url,
    error_message,
    fingerprint_of,
    hypersdk_endpoint,
    server_certificate,
    store_tokens,
    tls_context,
)
from virtbackup.cli.client.contexts import ContextError, Contexts
from virtbackup.cli.client.output import (
    Column,
    Format,
    emit,
    printable,
    short_fingerprint,
    short_job_id,
    short_point_id,
    short_time,
)
from virtbackup.cli.client.progress import follow_job
from virtbackup.cli.client.refs import job_id as job_ref
from virtbackup.cli.client.refs import point_id as point_ref

P = ParamSpec("P")
R = TypeVar("R")

HELP = """VirtBackup's command line: a client of a gateway's HTTPS API.

Start with `virtbackup login https://HOST:33551 --token TOKEN`. The launcher's own
commands (`up`, `nats-auth`, `new-secrets`, `agent`) are listed by `virtbackup up --help`
and the like."""

app = typer.Typer(
    help=HELP, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode="markdown"
)
context_app = typer.Typer(
    help="Named contexts (like kubectl's): list, switch, remove.", no_args_is_help=True
)
vms_app = typer.Typer(help="VMs of the configured servers.", no_args_is_help=True)
vm_app = typer.Typer(help="Power actions on one VM.", no_args_is_help=True)
points_app = typer.Typer(
    help="Restore points: list, delete, protect, verify.", no_args_is_help=True
)
jobs_app = typer.Typer(help="Jobs: list, watch, cancel, output log.", no_args_is_help=True)
app.add_typer(context_app, name="context")
app.add_typer(vms_app, name="vms")
app.add_typer(vm_app, name="vm")
app.add_typer(points_app, name="points")
app.add_typer(jobs_app, name="jobs")

out = Console(highlight=False, markup=False)
err = Console(stderr=True, highlight=False)


@app.callback()
def consoles() -> None:
    """Fresh consoles for each invocation (they read ``COLUMNS`` and the streams then)."""
    global out, err  # one pair per invocation, read by every command
    out = Console(highlight=False, markup=False)  # what it prints is the API's text
    err = Console(stderr=True, highlight=False)  # markup: escape what comes from the API


OutputOpt = Annotated[
    Format,
    typer.Option(
        "--output", "-o", help="table (80 columns), wide (full ids, more columns), json or yaml"
    ),
]
ContextOpt = Annotated[
    str | None, typer.Option("--context", help="a named context instead of the current one")
]
WaitOpt = Annotated[
    bool, typer.Option("--wait", help="follow the job with a progress bar; exit 1 if it fails")
]


def fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {escape(printable(message))}", soft_wrap=True)
    return typer.Exit(code)


#: API fields some commands' errors name, and the option of the command that sets each
#: (only translated for a command that has that option).
API_FLAGS: dict[str, tuple[str, str]] = {
    "keepLast": ("keep_last", "--keep-last"),
    "keepDaily": ("keep_daily", "--keep-daily"),
    "keepWeekly": ("keep_weekly", "--keep-weekly"),
    "keepMonthly": ("keep_monthly", "--keep-monthly"),
    "targetDirectory": ("directory", "--dir"),
    "destinationId": ("dest", "--dest"),
}


def in_flags(message: str, func: Callable[..., Any]) -> str:
    """``message`` with the API fields that one of ``func``'s options sets named by that
    option first (``--keep-last (keepLast)``): the user typed the option, not the field."""
    options = set(inspect.signature(func).parameters)
    for field, (param, flag) in API_FLAGS.items():
        if param in options:
            message = re.sub(rf"(?<![\w-])(?:\$\.)?{field}\b", f"{flag} ({field})", message)
    return message


def handled(func: Callable[P, R]) -> Callable[P, R]:
    """Turn every expected failure into one line on stderr and exit code 1."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except (ApiError, ContextError, TimeoutError) as exc:
            raise fail(in_flags(str(exc), func)) from None
        except httpx.HTTPError as exc:
            raise fail(f"connection failed: {exc}") from None
        except OSError as exc:
            raise fail(str(exc)) from None
        except (KeyError, TypeError, ValueError) as exc:  # an answer of another shape
            raise fail(f"unexpected answer from the server: {type(exc).__name__}: {exc}") from None
        except KeyboardInterrupt:
            raise fail("interrupted (a job that was started goes on: see `jobs ls`)", 130) from None

    return wrapper


def connect(context: str | None) -> Api:
    store = Contexts.load()
    name, ctx = store.get(context)
    return Api(store, name, ctx)


def finish_job(api: Api, job_id: str, wait: bool, fmt: Format) -> None:
    """Print the started job's id, or follow it (``wait``) and exit by its outcome."""
    if not wait:
        if fmt in (Format.table, Format.wide):
            out.print(f"job {job_id} started (follow it: virtbackup jobs watch {job_id})")
        else:
            emit(out, {"jobId": job_id}, fmt)
        return
    job = follow_job(api, job_id, err)
    if fmt in (Format.json, Format.yaml):
        emit(out, job, fmt)
    if job.get("state") != "success":
        raise fail(f"job {job_id} {job.get('state')}: {job.get('message', '')}")
    if fmt in (Format.table, Format.wide):
        message = printable(str(job.get("message", "")))
        out.print(f"job {job_id} succeeded: {message}", soft_wrap=True)


# -- contexts ---------------------------------------------------------------------------


@app.command()
@handled
def login(
    url: Annotated[str, typer.Argument(help="the gateway, https://HOST:PORT")],
    token: Annotated[
        str | None,
        typer.Option(help="an agent or API token (better: $VIRTBACKUP_TOKEN, not shown by ps)"),
    ] = None,
    user: Annotated[
        str | None, typer.Option(help="log in as this user (password prompted)")
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="the context's name (default: host:port)")
    ] = None,
    cacert: Annotated[
        typer.FileText | None, typer.Option(help="trust this CA (PEM) instead of pinning")
    ] = None,
    trust_new_cert: Annotated[
        bool, typer.Option(help="replace the certificate pinned for this context")
    ] = False,
    hypersdk_url: Annotated[
        str | None,
        typer.Option(
            help="the HyperSDK listener, for webhooks: https:// (pinned like URL), or http:// "
            "on this machine; default: none (webhooks go through URL's /api/v1/webhooks)"
        ),
    ] = None,
) -> None:
    """Log in to a gateway and make it the current context.

    Without --cacert the server's certificate is pinned on first use (its SHA-256
    fingerprint is shown and stored); a later change is refused. With --user the
    password is asked (or read from $VIRTBACKUP_PASSWORD) and the session's refresh
    token is stored, so access tokens are renewed as needed.

    Webhooks are managed through URL (/api/v1/webhooks); with --hypersdk-url, through
    that HyperSDK listener instead (but `webhooks rm`, by id through URL), with the
    same credentials; its certificate, for
    https://, is pinned (or checked with --cacert) as the gateway's. A plain http://
    URL is taken for this machine only.

    Example: virtbackup login https://backup.example.com:33551 --user alice --name prod
    """
    url = url.rstrip("/")
    if user and token:
        raise ApiError(0, "give --token or --user, not both")
    store = Contexts.load()
    name = name or url.split("://", 1)[-1]
    old = store.contexts.get(name, {})
    ctx: dict[str, Any] = {"url": url}
    if cacert is not None:
        ctx["cacert"] = cacert.read()
    else:
        pinned = old.get("fingerprint") if old.get("url") == url else None
        ctx["cacert"], ctx["fingerprint"] = _pin(url, pinned, name, trust_new_cert)
    if hypersdk_url is None and old.get("url") == url and old.get("hypersdkUrl"):
        hypersdk_url = old["hypersdkUrl"]  # logging in again keeps it
    if hypersdk_url is not None:
        hurl = check_hypersdk_url(hypersdk_url)
        ctx["hypersdkUrl"] = hurl
        if hurl.startswith("https://"):
            if cacert is not None:
                ctx["hypersdkCacert"] = ctx["cacert"]
            else:
                was = old.get("hypersdkFingerprint") if old.get("hypersdkUrl") == hurl else None
                ctx["hypersdkCacert"], ctx["hypersdkFingerprint"] = _pin(
                    hurl, was, name, trust_new_cert
                )
    with httpx.Client(base_url=url, verify=tls_context(ctx), timeout=30) as client:
        if user:
            password = os.environ.get("VIRTBACKUP_PASSWORD") or getpass.getpass(
                f"password for {user}: "
            )
            resp = client.post(LOGIN_PATH, json={"username": user, "password": password})
            if resp.status_code != 200:
                raise ApiError(resp.status_code, error_message(resp))
            ctx["user"] = user
            store_tokens(ctx, resp.json())
        else:
            token = token or os.environ.get("VIRTBACKUP_TOKEN")
            if not token:
                raise ApiError(0, "give --token TOKEN (or $VIRTBACKUP_TOKEN), or --user NAME")
            resp = client.get("/health", headers={"Authorization": f"Bearer {token}"})
            if resp.status_code != 200:
                raise ApiError(resp.status_code, error_message(resp))
            ctx["token"] = token
    if hypersdk_url is not None:
        _check_hypersdk(ctx)
    store.contexts[name] = ctx
    store.current = name
    store.save()
    who = f"as {user}" if user else "with a token"
    out.print(f"logged in to {url} {who}; context {name!r} is current")


def _pin(url: str, pinned: str | None, name: str, trust_new_cert: bool) -> tuple[str, str]:
    """The certificate ``url`` presents and its fingerprint (printed), to be pinned.

    Raises ``ApiError`` when it is not ``pinned`` (unless ``trust_new_cert``)."""
    pem = server_certificate(url)
    seen = fingerprint_of(pem)
    if pinned and pinned != seen and not trust_new_cert:
        raise ApiError(
            0,
            f"the certificate of {url} changed: it is now SHA-256 {seen}, but context "
            f"{name!r} pinned {pinned}; refusing (add --trust-new-cert if expected)",
        )
    err.print(f"server certificate SHA-256 fingerprint: {seen}", soft_wrap=True)
    return pem, seen


def _check_hypersdk(ctx: dict[str, Any]) -> None:
    """Refuse (``ApiError``) a HyperSDK URL that does not answer ``/health`` with these
    credentials: a typo is said at login, not at the first webhook command."""
    where = hypersdk_endpoint(ctx)
    verify: ssl.SSLContext | bool = tls_context(where) if where["url"].startswith("https") else True
    bearer = ctx.get("token") or ctx.get("accessToken")
    with httpx.Client(base_url=where["url"], verify=verify, timeout=30) as client:
        try:
            resp = client.get("/health", headers={"Authorization": f"Bearer {bearer}"})
        except httpx.HTTPError as exc:
            raise ApiError(0, f"--hypersdk-url {where['url']}: {exc}") from None
    if resp.status_code != 200:
        raise ApiError(resp.status_code, f"--hypersdk-url {where['url']}: {error_message(resp)}")


@context_app.command("ls")
@handled
def context_ls(output: OutputOpt = Format.table) -> None:
    """List the contexts (never their secrets); * marks the current one.

    Example: virtbackup context ls -o yaml
    """
    store = Contexts.load()
    rows = [
        {
            "name": name,
            "current": name == store.current,
            "url": ctx.get("url"),
            "auth": f"user {ctx['user']}" if ctx.get("user") else "token",
            "certificate": ctx.get("fingerprint") or "CA (--cacert)",
            "hypersdkUrl": ctx.get("hypersdkUrl"),
        }
        for name, ctx in sorted(store.contexts.items())
    ]
    if output in (Format.table, Format.wide):
        for row in rows:
            row["current"] = "*" if row["current"] else " "
    if output in (Format.table, Format.wide):
        for row in rows:
            row["name"] = f"{row.pop('current')}{row['name']}"
    cols = [
        Column("NAME", "name"),
        Column("URL", "url", flex=True),
        Column("AUTH", "auth", flex=True),
        Column("CERTIFICATE", "certificate", short_fingerprint),
        Column("HYPERSDK", "hypersdkUrl", wide_only=True),
    ]
    emit(out, rows, output, cols)


@context_app.command("use")
@handled
def context_use(name: str) -> None:
    """Make NAME the current context.

    Example: virtbackup context use prod
    """
    store = Contexts.load()
    store.get(name)
    store.current = name
    store.save()
    out.print(f"context {name!r} is current")


@context_app.command("rm")
@handled
def context_rm(name: str) -> None:
    """Forget the context NAME and its tokens (a user's session stays valid on the
    server until it expires).

    Example: virtbackup context rm old-lab
    """
    store = Contexts.load()
    store.get(name)
    del store.contexts[name]
    if store.current == name:
        store.current = None
    store.save()
    out.print(f"context {name!r} removed")


# -- servers and VMs --------------------------------------------------------------------


@app.command()
@handled
def servers(output: OutputOpt = Format.table, context: ContextOpt = None) -> None:
    """List the configured libvirt servers (GET /config's servers; secrets masked).

    Example: virtbackup servers -o json
    """
    with connect(context) as api:
        config = api.get("/config")
    rows = config.get("servers", []) if isinstance(config, dict) else []
    cols = [
        Column("ID", "id"),
        Column("NAME", "name", flex=True),
        Column("HOST", "host", flex=True),
        Column("USER", "username"),
        Column("URI", "uri", flex=True),
        Column("AGENT", "agentId", wide_only=True),
    ]
    emit(out, rows, output, cols)


def _where(destination: dict[str, Any]) -> str:
    """Where a destination keeps its data, in one short string (no secret)."""
    params = destination.get("params") or {}
    if not isinstance(params, dict):
        return ""
    for keys in (("path",), ("host", "basePath"), ("endpoint", "bucket"), ("rootPath",)):
        found = [str(params[k]) for k in keys if params.get(k)]
        if found:
            return ":".join(found)
    return ""


@app.command()
@handled
def destinations(output: OutputOpt = Format.table, context: ContextOpt = None) -> None:
    """List the configured backup destinations (GET /config's; secrets masked), the
    default one marked. Add or change them with `config get` / `config set`.

    Example: virtbackup destinations -o json
    """
    with connect(context) as api:
        config = api.get("/config")
    if not isinstance(config, dict):
        config = {}
    default = config.get("backupDestinationId")
    rows = [
        {**d, "default": "yes" if d.get("id") == default else "", "where": _where(d)}
        for d in config.get("destinations", [])
        if isinstance(d, dict)
    ]
    if not rows and output in (Format.table, Format.wide):
        err.print(
            "no destination is configured: add one with `virtbackup config get > vb.yaml`, "
            "a `destinations` entry in vb.yaml, then `virtbackup config set vb.yaml`"
        )
        return
    cols = [
        Column("ID", "id"),
        Column("DRIVER", "driverId"),
        Column("WHERE", "where", flex=True),
        Column("DEFAULT", "default"),
        Column("ENABLED", "enabled", wide_only=True),
        Column("NAME", "name", flex=True, wide_only=True),
    ]
    emit(out, rows, output, cols)


@vms_app.command("ls")
@handled
def vms_ls(
    server: Annotated[str | None, typer.Option(help="only this server's VMs")] = None,
    output: OutputOpt = Format.table,
    context: ContextOpt = None,
) -> None:
    """List the VMs of one server, or of every configured server.

    Example: virtbackup vms ls --server local
    """
    rows: list[dict[str, Any]] = []
    with connect(context) as api:
        ids = [server] if server else [s["id"] for s in api.get("/config").get("servers", [])]
        if not ids:
            err.print(f"[yellow]warning:[/yellow] {escape(NO_SERVERS)}", soft_wrap=True)
        failed = []
        for sid in ids:
            try:
                entries = api.get(f"/servers/{sid}/vms")
            except ApiError as exc:
                if server:
                    raise
                err.print(
                    f"[yellow]warning:[/yellow] server {sid}: {escape(str(exc))}", soft_wrap=True
                )
                failed.append(sid)
                continue
            rows.extend({"serverId": sid, **entry} for entry in entries)
    cols = [
        Column("NAME", "vm.name"),
        Column("SERVER", "serverId", flex=True),
        Column("STATE", "vm.powerState"),
        Column("OVERLAY", "hasOverlay"),
        Column("UUID", "vm.id", wide_only=True),
    ]
    emit(out, rows, output, cols)
    if failed:
        raise typer.Exit(1)


def _vm_action(action: str, name: str, server: str, context: str | None) -> None:
    with connect(context) as api:
        api.post(f"/servers/{server}/actions", {"action": action, "vmName": name})
    out.print(f"{action} {name} on {server}: done")


ServerOpt = Annotated[str, typer.Option("--server", "-s", help="the VM's server id")]


@vm_app.command("start")
@handled
def vm_start(name: str, server: ServerOpt, context: ContextOpt = None) -> None:
    """Start a VM.

    Example: virtbackup vm start web1 --server local
    """
    _vm_action("start", name, server, context)


@vm_app.command("shutdown")
@handled
def vm_shutdown(name: str, server: ServerOpt, context: ContextOpt = None) -> None:
    """Ask a VM's guest to shut down (ACPI).

    Example: virtbackup vm shutdown web1 --server local
    """
    _vm_action("shutdown", name, server, context)


@vm_app.command("poweroff")
@handled
def vm_poweroff(name: str, server: ServerOpt, context: ContextOpt = None) -> None:
    """Power a VM off at once (libvirt's destroy).

    Example: virtbackup vm poweroff web1 --server local
    """
    _vm_action("forceOff", name, server, context)


@vm_app.command("reboot")
@handled
def vm_reboot(name: str, server: ServerOpt, context: ContextOpt = None) -> None:
    """Reboot a VM's guest.

    Example: virtbackup vm reboot web1 --server local
    """
    _vm_action("reboot", name, server, context)


# -- backup and restore -----------------------------------------------------------------


#: What a command that needs a server says when the configuration has none (a new system).
NO_SERVERS = (
    "no server is configured: add one with virtbackup config get > config.yaml, an entry"
    " under servers (this host: {id: local, name: This host, host: ''}), then"
    " virtbackup config set config.yaml"
)


def find_server(api: Api, vm: str) -> str:
    """The id of the one configured server that has a VM named ``vm``.

    Raises ``ApiError`` when none or several have one (naming them)."""
    found: list[str] = []
    unreachable: list[str] = []
    servers = [s["id"] for s in api.get("/config").get("servers", [])]
    if not servers:
        raise ApiError(0, NO_SERVERS)
    for sid in servers:
        try:
            names = {entry["vm"]["name"] for entry in api.get(f"/servers/{sid}/vms")}
        except ApiError:
            unreachable.append(sid)
            continue
        if vm in names:
            found.append(sid)
    if len(found) == 1:
        return found[0]
    if found:
        raise ApiError(0, f"VM {vm!r} is on several servers ({', '.join(found)}): give --server")
    also = f" (not reachable: {', '.join(unreachable)})" if unreachable else ""
    raise ApiError(
        0,
        f"no server has a VM named {vm!r}{also} (servers: {', '.join(servers)});"
        " see the VMs' names with: virtbackup vms ls",
    )


@app.command()
@handled
def backup(
    vm: Annotated[str, typer.Argument(help="the VM's name")],
    server: Annotated[
        str | None,
        typer.Option("--server", "-s", help="the VM's server id (default: the one that has it)"),
    ] = None,
    dest: Annotated[
        str | None,
        typer.Option("--dest", "-d", help="destination id (default: the configured one)"),
    ] = None,
    wait: WaitOpt = False,
    output: OutputOpt = Format.table,
    context: ContextOpt = None,
) -> None:
    """Back up a VM (live when running, offline when shut off).

    Example: virtbackup backup web1 --server local --dest local-disk --wait
    """
    body: dict[str, Any] = {"vmName": vm}
    if dest:
        body["destinationId"] = dest
    with connect(context) as api:
        answer = api.post(f"/servers/{server or find_server(api, vm)}/backup", body)
        finish_job(api, answer["jobId"], wait, output)


@app.command()
@handled
def restore(
    point: Annotated[
        str, typer.Argument(help="a restore point: its id or short id (see `points ls`)")
    ],
    as_name: Annotated[
        str | None, typer.Option("--as", help="restore as a VM of this name")
    ] = None,
    to: Annotated[
        str | None, typer.Option("--to", help="target server id (default: the point's server)")
    ] = None,
    directory: Annotated[
        str | None, typer.Option("--dir", help="write the disks into this directory")
    ] = None,
    start: Annotated[bool, typer.Option(help="start the VM once restored")] = False,
    wait: WaitOpt = False,
    output: OutputOpt = Format.table,
    context: ContextOpt = None,
) -> None:
    """Restore a point: the VM's disks and definition, overwriting a shut-off VM of the
    same name, or beside it with --as.

    Example: virtbackup restore 3fa9c2d1 --as web1-test --wait
    """
    with connect(context) as api:
        rp = api.get(f"/api/v1/restore-points/{point_ref(api, point)}")
        target = to or rp.get("serverId")
        if not target:
            raise ApiError(0, "the point names no server: give --to SERVER")
        body: dict[str, Any] = {
            "xmlPath": rp["xmlPath"],
            "decision": "overwrite",
            "destinationId": rp["destinationId"],
        }
        if as_name:
            body["vmName"] = as_name
        if directory:
            body["targetDirectory"] = directory
        if start:
            body["start"] = True
        answer = api.post(f"/servers/{target}/restore/start", body)
        finish_job(api, answer["jobId"], wait, output)


# -- restore points ---------------------------------------------------------------------


def _kind(value: object) -> str:
    return "incr" if value == "incremental" else str(value)


def _mark(value: object) -> str:
    return "yes" if value is True else ""


POINT_COLS = [
    Column("ID", "id", short_point_id),
    Column("VM", "vmName", flex=True),
    Column("DEST", "destinationId", flex=True),
    Column("TIME", "timestamp", short_time),
    Column("KIND", "kind", _kind),
    Column("SIZE", "logicalBytes"),
    Column("STORED", "storedBytes"),
    Column("PROT", "protected", _mark),
    Column("SERVER", "serverId", wide_only=True),
    Column("VERIFIED", "verification.state", wide_only=True),
]


@points_app.command("ls")
@handled
def points_ls(
    vm: Annotated[str | None, typer.Option("--vm", help="only this VM's points")] = None,
    dest: Annotated[str | None, typer.Option("--dest", "-d", help="only this destination")] = None,
    server: Annotated[
        str | None, typer.Option("--server", "-s", help="only from this server")
    ] = None,
    output: OutputOpt = Format.table,
    context: ContextOpt = None,
) -> None:
    """List restore points, newest first. The table shows short ids (any command that
    takes a point takes them too); -o wide and -o json show the full ones.

    Example: virtbackup points ls --vm web1 -o json
    """
    with connect(context) as api:
        rows = api.get("/api/v1/restore-points", destinationId=dest, vmName=vm, serverId=server)
    emit(out, rows, output, POINT_COLS)


@points_app.command("rm")
@handled
def points_rm(
    point: str,
    force: Annotated[bool, typer.Option(help="remove a point whose record is unreadable")] = False,
    output: OutputOpt = Format.table,
    context: ContextOpt = None,
) -> None:
    """Delete a restore point (its chunks go at the next garbage collection).

    Example: virtbackup points rm 'local-disk~d2ViMQ~2026-11-22T20-40-12' (or its short id)
    """
    with connect(context) as api:
        answer = api.request(
            "DELETE",
            f"/api/v1/restore-points/{point_ref(api, point)}",
            params={"force": "true" if force else None},
        )
    emit(
        out, answer.get("point", answer) if isinstance(answer, dict) else answer, output, POINT_COLS
    )


def _protect(
    point: str, value: bool, notes: str | None, output: Format, context: str | None
) -> None:
    body: dict[str, Any] = {"protected": value}
    if notes is not None:
        body["notes"] = notes
    with connect(context) as api:
        answer = api.request(
            "PATCH", f"/api/v1/restore-points/{point_ref(api, point)}", json_body=body
        )
    emit(
        out, answer.get("point", answer) if isinstance(answer, dict) else answer, output, POINT_COLS
    )


NotesOpt = Annotated[str | None, typer.Option(help="a note kept with the point")]


@points_app.command("protect")
@handled
def points_protect(
    point: str, notes: NotesOpt = None, output: OutputOpt = Format.table, context: ContextOpt = None
) -> None:
    """Protect a point: prunes keep it and deletes are refused.

    Example: virtbackup points protect 3fa9c2d1 --notes 'before 2.0'
    """
    _protect(point, True, notes, output, context)


@points_app.command("unprotect")
@handled
def points_unprotect(
    point: str, notes: NotesOpt = None, output: OutputOpt = Format.table, context: ContextOpt = None
) -> None:
    """Remove a point's protection.

    Example: virtbackup points unprotect 3fa9c2d1
    """
    _protect(point, False, notes, output, context)


@points_app.command("verify")
@handled
def points_verify(
    point: str, wait: WaitOpt = False, output: OutputOpt = Format.table, context: ContextOpt = None
) -> None:
    """Re-read every manifest and chunk of one point and check every hash (a sanity
    job); with --wait, exit 1 naming damaged chunks.

    Example: virtbackup points verify 3fa9c2d1 --wait
    """
    with connect(context) as api:
        rp = api.get(f"/api/v1/restore-points/{point_ref(api, point)}")
        answer = api.post(
            "/restore/sanity", {"xmlPath": rp["xmlPath"], "destinationId": rp["destinationId"]}
        )
        finish_job(api, answer["jobId"], wait, output)


# -- jobs -------------------------------------------------------------------------------


def _percent(value: object) -> str:
    return f"{value:.0f}%" if isinstance(value, (int, float)) else str(value)


JOB_COLS = [
    Column("ID", "id", short_job_id),
    Column("TYPE", "type"),
    Column("STATUS", "status"),
    Column("VM", "vmName", flex=True),
    Column("PROG", "progress", _percent),
    Column("CREATED", "createdAt", short_time),
    Column("ERROR", "error", flex=True),
    Column("SERVER", "serverId", wide_only=True),
    Column("DEST", "destinationId", wide_only=True),
]


@jobs_app.command("ls")
@handled
def jobs_ls(
    status: Annotated[str | None, typer.Option(help="queued, running, succeeded or failed")] = None,
    job_type: Annotated[
        str | None, typer.Option("--type", help="backup, restore, prune, gc ...")
    ] = None,
    vm: Annotated[str | None, typer.Option("--vm", help="only this VM's jobs")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="at most this many")] = 50,
    output: OutputOpt = Format.table,
    context: ContextOpt = None,
) -> None:
    """List jobs, newest first (GET /api/v1/jobs). The table shows each id's last 8
    characters (the jobs commands take them); -o wide and -o json the whole.

    Example: virtbackup jobs ls --status failed -o yaml
    """
    with connect(context) as api:
        page = api.get("/api/v1/jobs", status=status, type=job_type, vmName=vm, limit=limit)
    emit(out, page.get("jobs", []), output, JOB_COLS)


@jobs_app.command("watch")
@handled
def jobs_watch(job_id: str, output: OutputOpt = Format.table, context: ContextOpt = None) -> None:
    """Follow a job with a progress bar until it ends; exit 1 if it fails.

    Example: virtbackup jobs watch 9e1f07c2 (the end of its id, as `jobs ls` shows it)
    """
    with connect(context) as api:
        finish_job(api, job_ref(api, job_id), True, output)


@jobs_app.command("cancel")
@handled
def jobs_cancel(job_id: str, output: OutputOpt = Format.table, context: ContextOpt = None) -> None:
    """Cancel a job (waits up to 20 s for it to stop).

    Example: virtbackup jobs cancel 9e1f07c2
    """
    with connect(context) as api:
        job = api.post(f"/api/v1/jobs/{job_ref(api, job_id)}/cancel")
    emit(out, job, output, JOB_COLS)


@jobs_app.command("logs")
@handled
def jobs_logs(job_id: str, context: ContextOpt = None) -> None:
    """Print a job's output log.

    Example: virtbackup jobs logs 019ad2f3a4b5c6d79e1f07c2
    """
    with connect(context) as api:
        ref = job_ref(api, job_id)
        text = api.request("GET", f"/api/v1/jobs/{ref}/artifacts/output.log", raw=True)
    # Lines may hold what other users named (VMs, schedules): no escape reaches the terminal.
    shown = "\n".join(printable(line) for line in str(text).split("\n"))
    out.print(shown, end="", markup=False, highlight=False, soft_wrap=True)


# -- destination maintenance ------------------------------------------------------------


@app.command()
@handled
def prune(
    dest: str,
    vm: Annotated[str | None, typer.Option("--vm", help="only this VM's points")] = None,
    keep_last: Annotated[int | None, typer.Option(min=0, help="keep the newest N")] = None,
    keep_daily: Annotated[int | None, typer.Option(min=0, help="keep one a day for N days")] = None,
    keep_weekly: Annotated[int | None, typer.Option(min=0, help="one a week for N weeks")] = None,
    keep_monthly: Annotated[
        int | None, typer.Option(min=0, help="one a month for N months")
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="show what would be kept and removed")] = False,
    wait: WaitOpt = False,
    output: OutputOpt = Format.table,
    context: ContextOpt = None,
) -> None:
    """Prune a destination's points by retention (the configured policies, or the
    --keep-* rules given).

    Example: virtbackup prune local-disk --vm web1 --keep-daily 7 --dry-run
    """
    body: dict[str, Any] = {"dryRun": dry_run}
    for key, value in (
        ("vmName", vm), ("keepLast", keep_last), ("keepDaily", keep_daily),
        ("keepWeekly", keep_weekly), ("keepMonthly", keep_monthly),
    ):  # fmt: skip
        if value is not None:
            body[key] = value
    with connect(context) as api:
        answer = api.post(f"/api/v1/destinations/{dest}/prune", body)
        if dry_run:
            if output in (Format.table, Format.wide):
                rows = [{**p, "action": "keep"} for p in answer.get("keep", [])]
                rows += [{**p, "action": "remove"} for p in answer.get("remove", [])]
                rows += [{**p, "action": "skip"} for p in answer.get("skipped", [])]
                emit(
                    out,
                    rows,
                    output,
                    [
                        Column("ID", "id", short_point_id),
                        Column("ACTION", "action"),
                        Column("VM", "vmName", flex=True),
                        Column("TIME", "timestamp", short_time),
                        Column("REASON", "reason", flex=True),
                    ],
                )
            else:
                emit(out, answer, output)
            return
        finish_job(api, answer["jobId"], wait, output)


@app.command()
@handled
def gc(
    dest: str,
    grace_seconds: Annotated[
        int | None, typer.Option(min=0, help="keep chunks younger than this")
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="count, remove nothing")] = False,
    wait: WaitOpt = False,
    output: OutputOpt = Format.table,
    context: ContextOpt = None,
) -> None:
    """Garbage-collect a destination: remove chunks no restore point names.

    Example: virtbackup gc local-disk --grace-seconds 3600 --wait
    """
    body: dict[str, Any] = {"dryRun": dry_run}
    if grace_seconds is not None:
        body["graceSeconds"] = grace_seconds
    with connect(context) as api:
        job = api.post(f"/api/v1/destinations/{dest}/gc", body)
        finish_job(api, job["id"], wait, output)


@app.command()
@handled
def verify(
    dest: str,
    sample_percent: Annotated[
        int | None, typer.Option(min=1, max=100, help="check this share of each point's chunks")
    ] = None,
    vm: Annotated[str | None, typer.Option("--vm", help="only this VM's points")] = None,
    wait: WaitOpt = False,
    output: OutputOpt = Format.table,
    context: ContextOpt = None,
) -> None:
    """Verify a destination's points: read chunks back and check them.

    Example: virtbackup verify local-disk --sample-percent 5 --wait
    """
    body: dict[str, Any] = {"mode": "sample" if sample_percent else "full"}
    if sample_percent:
        body["samplePercent"] = sample_percent
    if vm:
        body["vmName"] = vm
    with connect(context) as api:
        job = api.post(f"/api/v1/destinations/{dest}/verify", body)
        finish_job(api, job["id"], wait, output)


def build() -> typer.Typer:
    """The whole command line: ``app`` with the commands of every module registered."""
    from virtbackup.cli.client import (  # noqa: F401 - they register their commands
        admin,
        more,
        schedule_cmds,
        webhooks,
    )

    return app


def main() -> None:
    """Run the operator's command line."""
    build()(prog_name="virtbackup")
