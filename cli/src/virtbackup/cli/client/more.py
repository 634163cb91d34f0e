"""More operator commands: ``config get|set`` (a YAML round trip of ``/config``),
``plans import FILE`` (``/api/v1/projects/import``), instant access (``mount POINT
DISK``: an NBD export of one disk of a point, with its TLS files written for qemu-nbd and
nbdinfo; ``umount EXPORT``), and listings of schedules (``/api/v1/task/schedulers``),
users (``/api/v1/admin/sys/users``) and agents (``/api/v1/agents``)."""

from __future__ import annotations

import math
import os
import re
import shlex
from collections.abc import Hashable
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from virtbackup.cli.client import app as base
from virtbackup.cli.client.api import ApiError
from virtbackup.cli.client.app import ContextOpt, OutputOpt, connect, handled
from virtbackup.cli.client.output import Column, Format, emit, printable, short_hex, short_time
from virtbackup.cli.client.refs import point_id as point_ref

config_app = typer.Typer(
    help="The configuration: get it as YAML, edit, set it.", no_args_is_help=True
)
plans_app = typer.Typer(help="Backup plans (projects).", no_args_is_help=True)
schedules_app = typer.Typer(
    help="Schedules: list, add, change, enable, disable, run one now, delete.", no_args_is_help=True
)
users_app = typer.Typer(
    help="Users of the identity API: list, add, change, remove, set a password.",
    no_args_is_help=True,
)
agents_app = typer.Typer(
    help="Transfer workers and remote agents: list, register, remove.", no_args_is_help=True
)
base.app.add_typer(config_app, name="config")
base.app.add_typer(plans_app, name="plans")
base.app.add_typer(schedules_app, name="schedules")
base.app.add_typer(users_app, name="users")
base.app.add_typer(agents_app, name="agents")


class StrictLoader(yaml.SafeLoader):
    """YAML's safe loader that refuses a key given twice in one mapping (as the API
    refuses it in JSON), instead of keeping the last one silently, and aliases
    (``*name``, as the gateway's plan parser does): ten nested aliases of ten make a
    document of 10^10 values once sent as JSON."""

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed: write the value out", mark
            )
        return super().compose_node(parent, index)


def _mapping(loader: StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, Hashable):
            raise yaml.constructor.ConstructorError(
                None, None, "a key must be a string, not a list or a mapping", key_node.start_mark
            )
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} given twice", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def load_strict(text: str, source: str) -> Any:
    """``text`` as YAML (JSON is YAML too), duplicate keys refused, and only what JSON
    can carry: mappings with string keys, lists, strings, finite numbers, booleans and
    null (an unquoted ``2026-01-01`` is a date in YAML, ``!!binary`` bytes, ``.nan`` no
    JSON number).

    Raises ``ApiError`` naming ``source`` and the line, or the place (``$.a.b[0]``) of a
    value JSON cannot carry."""
    try:
        document = yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        raise ApiError(0, f"{source}: {' '.join(str(exc).split())}") from exc
    _check_json(document, "$", source)
    return document


def _check_json(value: Any, where: str, source: str) -> None:
    """Raise ``ApiError`` at the first value under ``value`` that JSON cannot carry."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ApiError(
                    0, f"{source}: the key {key!r} at {where} must be a string (quote it)"
                )
            _check_json(item, f"{where}.{key}", source)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_json(item, f"{where}[{index}]", source)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ApiError(0, f"{source}: {value!r} at {where} is not a JSON number")
    elif value is not None and not isinstance(value, (str, int, bool)):
        kind = type(value).__name__
        raise ApiError(
            0, f"{source}: the value at {where} is a YAML {kind}, not JSON (quote it: a string)"
        )


@config_app.command("get")
@handled
def config_get(
    output: Annotated[
        Format, typer.Option("--output", "-o", help="yaml (default) or json")
    ] = Format.yaml,
    context: ContextOpt = None,
) -> None:
    """Print the configuration (GET /config; secrets read as ********).

    Example: virtbackup config get > config.yaml
    """
    with connect(context) as api:
        config = api.get("/config")
    emit(base.out, config, output if output in (Format.json, Format.yaml) else Format.yaml)


@config_app.command("set")
@handled
def config_set(
    file: Annotated[
        Path, typer.Argument(help="the whole configuration, YAML or JSON ('-': stdin)")
    ],
    context: ContextOpt = None,
) -> None:
    """Replace the configuration with FILE (POST /config): the shape `config get` prints;
    a ******** secret keeps the stored one. Anything unknown or mistyped is refused with
    the API's message naming the field, and nothing changes. The POST names the
    revision read just before it (If-Match): if the configuration changes in between
    (another admin, the console), nothing is stored and the command exits 1 saying so.

    Example: virtbackup config get > c.yaml && $EDITOR c.yaml && virtbackup config set c.yaml
    """
    text = typer.get_text_stream("stdin").read() if str(file) == "-" else file.read_text()
    document = load_strict(text, str(file))
    if not isinstance(document, dict):
        raise ApiError(0, f"{file}: the configuration is a mapping (servers, destinations, ...)")
    with connect(context) as api:
        etag = api.send("GET", "/config").headers.get("etag", "")
        try:
            api.request(
                "POST", "/config", json_body=document, headers={"If-Match": etag} if etag else None
            )
        except ApiError as exc:
            if exc.status != 412:
                raise
            raise ApiError(
                412,
                "the configuration changed since it was read (another admin or program saved "
                "it meanwhile); nothing was stored: run the command again (see `virtbackup "
                "config get` first: this file replaces the whole configuration)",
            ) from None
    base.out.print("configuration saved")


@plans_app.command("import")
@handled
def plans_import(
    file: Annotated[Path, typer.Argument(help="a plan document (YAML), see the README")],
    output: OutputOpt = Format.table,
    context: ContextOpt = None,
) -> None:
    """Import (or replace) a backup plan from a YAML file (POST /api/v1/projects/import).

    Example: virtbackup plans import nightly.yaml
    """
    with connect(context) as api:
        plan = api.post("/api/v1/projects/import", {"yaml": file.read_text()})
    cols = [
        Column("ID", "id"),
        Column("NAME", "name", flex=True),
        Column("SCHEDULES", "schedule_ids", flex=True),
    ]
    emit(base.out, plan, output, cols)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


@base.app.command()
@handled
def mount(
    point: Annotated[
        str, typer.Argument(help="a restore point: its id or short id (see `points ls`)")
    ],
    disk: Annotated[str, typer.Argument(help="the disk's target, e.g. vda")],
    directory: Annotated[
        Path | None,
        typer.Option(
            "--dir",
            help="where to write its TLS files (default ./VM-DISK, where any character but "
            "letters, digits, dots and dashes becomes an underscore; made 0700)",
        ),
    ] = None,
    ttl: Annotated[int, typer.Option(min=1, max=86400, help="seconds the export lives")] = 3600,
    output: OutputOpt = Format.table,
    context: ContextOpt = None,
) -> None:
    """Instant access: export one disk of a restore point read-only over NBD (TLS), write
    the client's certificate folder (the key 0600; it is shown nowhere else) and print
    how to attach it. Stop it with `virtbackup umount EXPORT_ID`.

    Example: virtbackup mount 3fa9c2d1 vda --ttl 600
    """
    with connect(context) as api:
        rp = api.get(f"/api/v1/restore-points/{point_ref(api, point)}")
        # A VM's name may hold anything but '/' and control characters (spaces, "$(",
        # quotes): the default folder takes only letters, digits, '.', '_' and '-' of it.
        folder = directory or Path(re.sub(r"[^\w.-]", "_", f"{rp['vmName']}-{disk}")).resolve()
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
        export = api.post(
            "/restore/exports",
            {"xmlPath": rp["xmlPath"], "disk": disk, "destinationId": rp["destinationId"],
             "ttlSeconds": ttl},
        )  # fmt: skip
    tls = export.pop("tls", {})
    _write_private(folder / "ca-cert.pem", tls.get("caCert", ""))
    _write_private(folder / "client-cert.pem", tls.get("clientCert", ""))
    _write_private(folder / "client-key.pem", tls.get("clientKey", ""))
    export["tlsDirectory"] = str(folder)
    if output in (Format.json, Format.yaml):
        emit(base.out, export, output)
        return
    url = export["nbdUrl"]
    host_port = url.split("://", 1)[1].split("/", 1)[0]
    host, _, port = host_port.rpartition(":")
    name = export.get("exportName", disk)
    # Commands to paste into a shell: every value in them is quoted for it.
    nbdinfo = shlex.quote(f"{url}?tls-certificates={folder}")
    creds = shlex.quote(f"tls-creds-x509,id=tls0,endpoint=client,dir={folder}")
    image = shlex.quote(f"driver=nbd,host={host},port={port},export={name},tls-creds=tls0")
    base.out.print(
        f"export {export['id']} of {printable(rp['vmName'])} {disk} "
        f"({export.get('size', 0)} bytes) until {export.get('expiresAt')}\n"
        f"  {url}  (TLS files in {printable(str(folder))})\n\n"
        f"  nbdinfo {nbdinfo}\n"
        f"  qemu-nbd -r -c /dev/nbd0 --object {creds} \\\n"
        f"      --image-opts {image}\n"
        f"  mount -o ro /dev/nbd0p1 /mnt   # then: umount /mnt; qemu-nbd -d /dev/nbd0\n\n"
        f"  stop it: virtbackup umount {export['id']}",
        soft_wrap=True,
    )


@base.app.command()
@handled
def umount(
    export_id: Annotated[str, typer.Argument(help="the export's id (from `mount`)")],
    output: OutputOpt = Format.table,
    context: ContextOpt = None,
) -> None:
    """Stop an instant-access export: its clients are dropped, new ones refused.

    Example: virtbackup umount 019ad2...
    """
    with connect(context) as api:
        answer = api.request("DELETE", f"/restore/exports/{export_id}")
    cols = [Column("ID", "id"), Column("STATE", "state"), Column("MESSAGE", "message", flex=True)]
    emit(base.out, answer, output, cols)


SCHEDULE_COLS = [
    Column("ID", "id"),
    Column("NAME", "name", flex=True),
    Column("CRON", "schedule", flex=True),
    Column("ON", "enabled"),
    Column("NEXT RUN", "nextRun", short_time),
    Column("VMS", "jobTemplate.vmPath", flex=True),
    Column("TZ", "timezone", wide_only=True),
    Column("LAST RUN", "lastRun", wide_only=True),
    Column("LAST", "lastStatus", wide_only=True),
    Column("DEST", "jobTemplate.destination.destinationId", wide_only=True),
]


@schedules_app.command("ls")
@handled
def schedules_ls(output: OutputOpt = Format.table, context: ContextOpt = None) -> None:
    """List the schedules (the HyperSDK listener's /schedules, in camelCase).

    Example: virtbackup schedules ls -o yaml
    """
    with connect(context) as api:
        page = api.get("/api/v1/task/schedulers")
    emit(base.out, page.get("items", []), output, SCHEDULE_COLS)


@schedules_app.command("run")
@handled
def schedules_run(
    schedule_id: str,
    wait: base.WaitOpt = False,
    output: OutputOpt = Format.table,
    context: ContextOpt = None,
) -> None:
    """Run a schedule now (409 while it is disabled); --wait follows its jobs in turn.

    Example: virtbackup schedules run nightly --wait
    """
    with connect(context) as api:
        try:
            run = api.post(f"/api/v1/task/schedulers/{schedule_id}/run")
        except ApiError as exc:
            if exc.status == 409 and "disabled" in str(exc):
                raise ApiError(
                    exc.status,
                    f"{exc.message}; with this CLI: virtbackup schedules enable {schedule_id}",
                ) from None
            raise
        if run.get("skipped"):
            raise ApiError(0, f"schedule {schedule_id} skipped: {run.get('message', '')}")
        for job_id in run.get("jobIds", []):
            base.finish_job(api, job_id, wait, output)


@schedules_app.command("rm")
@handled
def schedules_rm(schedule_id: str, context: ContextOpt = None) -> None:
    """Delete a schedule (the jobs it started go on).

    Example: virtbackup schedules rm nightly
    """
    with connect(context) as api:
        api.request("DELETE", f"/api/v1/task/schedulers/{schedule_id}")
    base.out.print(f"schedule {schedule_id} deleted")


@users_app.command("ls")
@handled
def users_ls(output: OutputOpt = Format.table, context: ContextOpt = None) -> None:
    """List the users (needs users:read).

    Example: virtbackup users ls
    """
    users: list[dict[str, Any]] = []
    with connect(context) as api:
        page = 1
        while True:
            answer = api.get("/api/v1/admin/sys/users", page=page, size=1000)
            users.extend(answer.get("items", []))
            if page >= int(answer.get("total_pages") or 1):
                break
            page += 1
    cols = [
        Column("ID", "id"),
        Column("USER", "username", flex=True),
        Column("ROLES", "roles", flex=True),
        Column("ENABLED", "enabled"),
        Column("EMAIL", "email", flex=True),
        Column("CREATED", "created_at", wide_only=True),
    ]
    emit(base.out, users, output, cols)


def short_agent_id(value: Any) -> str:
    """A remote agent's id (a UUID) cut to its first 8 characters; a transfer worker's
    (``worker:<name>``) as it is."""
    text = str(value or "")
    return text if text.startswith("worker:") else short_hex(text)


AGENT_COLS = [
    Column("ID", "id", short_agent_id),
    Column("KIND", "kind"),
    Column("HOST", "hostname", flex=True),
    Column("STATE", "state"),
    Column("LAST SEEN", "lastHeartbeat", short_time),
    Column("STATUS", "status", wide_only=True),
    Column("VERSION", "version", wide_only=True),
]


@agents_app.command("ls")
@handled
def agents_ls(output: OutputOpt = Format.table, context: ContextOpt = None) -> None:
    """List the live transfer workers and the registered remote agents.

    Example: virtbackup agents ls -o json
    """
    with connect(context) as api:
        answer = api.get("/api/v1/agents")
    rows = answer.get("agents", []) if isinstance(answer, dict) else answer
    emit(base.out, rows, output, AGENT_COLS)
