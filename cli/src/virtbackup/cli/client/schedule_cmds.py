"""``schedules add|update|enable|disable`` on ``/api/v1/task/schedulers`` (the very
schedules of the HyperSDK listener's ``/schedules``), from flags or from a YAML or JSON
file holding the route's body::

    id: nightly
    name: Nightly web
    schedule: "0 2 * * *"        # cron: 5 fields, 6 with seconds last, or @daily ...
    timezone: Europe/Berlin
    jobTemplate:
      vmPath: "local/web-*"      # <server>/<vm name or glob>
      destination: {type: backup, destinationId: local-disk}

Flags given with a file replace the file's fields. The API checks everything (cron,
time zone, servers, destinations) before it stores anything: a 400 names the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from virtbackup.cli.client import app as base
from virtbackup.cli.client import more
from virtbackup.cli.client.api import Api, ApiError
from virtbackup.cli.client.app import ContextOpt, OutputOpt, connect, handled
from virtbackup.cli.client.output import Format, emit

TASKS = "/api/v1/task/schedulers"

FileOpt = Annotated[
    Path | None,
    typer.Option("--file", "-f", help="the schedule as YAML or JSON (the API's body; '-': stdin)"),
]
CronOpt = Annotated[
    str | None, typer.Option("--cron", help="when: a cron expression, e.g. '0 2 * * *' or @daily")
]
ZoneOpt = Annotated[str | None, typer.Option("--timezone", help="the cron's IANA time zone")]
NameOpt = Annotated[str | None, typer.Option("--name", help="a name to show")]
DescOpt = Annotated[str | None, typer.Option("--description", help="a description")]
VmOpt = Annotated[
    str | None, typer.Option("--vm", help="SERVER/VM to back up (a glob: 'local/web-*')")
]
DestOpt = Annotated[
    str | None, typer.Option("--dest", "-d", help="destination id (default: the configured one)")
]
FreshOpt = Annotated[
    bool | None, typer.Option("--fresh/--no-fresh", help="full backups (debug mode only)")
]


def _document(file: Path | None) -> dict[str, Any]:
    if file is None:
        return {}
    text = typer.get_text_stream("stdin").read() if str(file) == "-" else file.read_text()
    document = more.load_strict(text, str(file))
    if not isinstance(document, dict):
        raise ApiError(0, f"{file}: a schedule is a mapping (schedule, jobTemplate, ...)")
    return document


def _fields(
    body: dict[str, Any],
    cron: str | None,
    timezone: str | None,
    name: str | None,
    description: str | None,
) -> None:
    for key, value in (("schedule", cron), ("timezone", timezone), ("name", name),
                       ("description", description)):  # fmt: skip
        if value is not None:
            body[key] = value


def _template(
    template: dict[str, Any], vm: str | None, dest: str | None, fresh: bool | None
) -> dict[str, Any]:
    """``template`` (a ``jobTemplate``) with the flags given put in."""
    out = dict(template)
    if vm is not None:
        server, sep, _ = vm.partition("/")
        if not sep or not server:
            raise ApiError(0, f"--vm {vm!r}: write it SERVER/VM (a glob allowed: local/web-*)")
        out["vmPath"] = vm
        # The source names the server unless the path's is a glob (then every server
        # that matches it).
        glob = any(c in server for c in "*?[")
        out["source"] = {"type": "libvirt", **({} if glob else {"serverId": server})}
    if dest is not None:
        out["destination"] = {"type": "backup", "destinationId": dest}
    if fresh is not None:
        out["options"] = {**(out.get("options") or {}), "fresh": fresh}
    return out


@more.schedules_app.command("add")
@handled
def schedules_add(
    schedule_id: Annotated[
        str | None, typer.Option("--id", help="its id (default: one is made)")
    ] = None,
    cron: CronOpt = None,
    vm: VmOpt = None,
    dest: DestOpt = None,
    timezone: ZoneOpt = None,
    name: NameOpt = None,
    description: DescOpt = None,
    fresh: FreshOpt = None,
    disabled: Annotated[bool, typer.Option(help="add it disabled")] = False,
    file: FileOpt = None,
    output: OutputOpt = Format.table,
    context: ContextOpt = None,
) -> None:
    """Add a schedule: each run backs up the VMs --vm names (--cron and --vm are needed,
    from flags or the file). A taken id is refused (409).

    Example: `virtbackup schedules add --id nightly --cron '0 2 * * *' --vm 'local/web-*' -d fs`
    """
    body = _document(file)
    _fields(body, cron, timezone, name, description)
    if schedule_id is not None:
        body["id"] = schedule_id
    if disabled:
        body["enabled"] = False
    template = body.get("jobTemplate") or {}
    if not isinstance(template, dict):
        raise ApiError(0, "jobTemplate: a mapping (vmPath, source, destination, options)")
    body["jobTemplate"] = _template(template, vm, dest, fresh)
    if "schedule" not in body:
        raise ApiError(0, "give --cron (or schedule: in --file)")
    if "vmPath" not in body["jobTemplate"]:
        raise ApiError(0, "give --vm SERVER/VM (or jobTemplate.vmPath: in --file)")
    with connect(context) as api:
        created = api.post(TASKS, body)
    emit(base.out, created, output, more.SCHEDULE_COLS)


def _current(api: Api, schedule_id: str) -> dict[str, Any]:
    for item in api.get(TASKS).get("items", []):
        if item.get("id") == schedule_id:
            return dict(item)
    raise ApiError(404, f"no schedule {schedule_id!r} (see `virtbackup schedules ls`)")


@more.schedules_app.command("update")
@handled
def schedules_update(
    schedule_id: Annotated[str, typer.Argument(help="the schedule's id")],
    cron: CronOpt = None,
    vm: VmOpt = None,
    dest: DestOpt = None,
    timezone: ZoneOpt = None,
    name: NameOpt = None,
    description: DescOpt = None,
    fresh: FreshOpt = None,
    file: FileOpt = None,
    output: OutputOpt = Format.table,
    context: ContextOpt = None,
) -> None:
    """Change a schedule: the fields given (flags, or the file's) replace its own; the
    rest stays. --vm, --dest and --fresh change its job template, kept otherwise.

    Example: `virtbackup schedules update nightly --cron '30 1 * * *' --timezone UTC`
    """
    body = _document(file)
    given_id = body.pop("id", schedule_id)
    if given_id != schedule_id:  # a schedule's id never changes: not silently ignored
        raise ApiError(
            0, f"--file: its id {given_id!r} is not {schedule_id!r}: a schedule's id cannot change"
        )
    _fields(body, cron, timezone, name, description)
    with connect(context) as api:
        if vm is not None or dest is not None or fresh is not None:
            template = body.get("jobTemplate") or _current(api, schedule_id).get("jobTemplate")
            body["jobTemplate"] = _template(dict(template or {}), vm, dest, fresh)
        if not body:
            raise ApiError(
                0,
                "nothing to change: the file gives no field but id"
                if file is not None
                else "nothing to change: give a flag or --file",
            )
        changed = api.request("PUT", f"{TASKS}/{schedule_id}", json_body=body)
    emit(base.out, changed, output, more.SCHEDULE_COLS)


def _enable(schedule_id: str, value: bool, output: Format, context: str | None) -> None:
    with connect(context) as api:
        changed = api.request("PUT", f"{TASKS}/{schedule_id}", json_body={"enabled": value})
    emit(base.out, changed, output, more.SCHEDULE_COLS)


@more.schedules_app.command("enable")
@handled
def schedules_enable(
    schedule_id: str, output: OutputOpt = Format.table, context: ContextOpt = None
) -> None:
    """Enable a schedule: it runs at its next due time.

    Example: virtbackup schedules enable nightly
    """
    _enable(schedule_id, True, output, context)


@more.schedules_app.command("disable")
@handled
def schedules_disable(
    schedule_id: str, output: OutputOpt = Format.table, context: ContextOpt = None
) -> None:
    """Disable a schedule: it does not run (nor with `schedules run`) until enabled.

    Example: virtbackup schedules disable nightly
    """
    _enable(schedule_id, False, output, context)
