"""``webhooks ls|add|rm|test``: the webhooks (delivered by the notifier), through the
gateway's own HTTPS listener (``/api/v1/webhooks``, the same routes as the HyperSDK
listener's ``/webhooks``, on the context's pinned certificate), or, for a context
logged in with ``--hypersdk-url``, through that listener (``api.hypersdk_endpoint``),
with the context's credentials. No other address is ever guessed: the token goes only
where the context says.

``rm`` takes the webhook's position, its id (or its start) or its URL, looks it up and
deletes it by its id through the gateway's own listener (``DELETE
/api/v1/webhooks/{id}``), whatever the context: the HyperSDK listener deletes by
position, which another admin's delete in between would shift onto another webhook. A
webhook's ``secret`` is read from a file or stdin (an argument would show in
the process list), sent once and never shown again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from virtbackup.cli.client import app as base
from virtbackup.cli.client.api import Api, ApiError
from virtbackup.cli.client.app import ContextOpt, OutputOpt, connect, handled
from virtbackup.cli.client.output import Column, Format, emit, short_hex

webhooks_app = typer.Typer(
    help="Webhooks: list, add, remove, send a test.",
    no_args_is_help=True,
)
base.app.add_typer(webhooks_app, name="webhooks")

#: The events a webhook gets when ``add`` is given none: every job and scheduled run
#: that ended.
DEFAULT_EVENTS = ("job.completed", "job.failed", "schedule.completed", "schedule.failed")

WEBHOOK_COLS = [
    Column("#", "index"),
    Column("ID", "id", short_hex),
    Column("URL", "url", flex=True),
    Column("EVENTS", "events", flex=True),
    Column("ON", "enabled"),
    Column("LAST", "last_status.state"),
    Column("SECRET", "has_secret", wide_only=True),
    Column("HEADERS", "headers", wide_only=True),
    Column("LAST ERROR", "last_status.error", wide_only=True),
]


@contextlib.contextmanager
def webhooks_api(context: str | None) -> Iterator[tuple[Api, str]]:
    """A client that reaches the webhooks and their path there: the context's HyperSDK
    listener (``/webhooks``) when it was given one at login, else the gateway's own
    listener (``/api/v1/webhooks``)."""
    with connect(context) as api:
        if api.ctx.get("hypersdkUrl"):
            with api.hypersdk() as hs:
                yield hs, "/webhooks"
        else:
            yield api, "/api/v1/webhooks"


def _listed(hs: Api, path: str) -> list[dict[str, Any]]:
    hooks = hs.get(path).get("webhooks", [])
    return [{"index": i, **hook} for i, hook in enumerate(hooks)]


def find_webhook(hooks: list[dict[str, Any]], ref: str) -> dict[str, Any]:
    """The webhook ``ref`` names: its position (``#``), its id or the start of it (at
    least 4 characters), or its URL.

    Raises ``ApiError`` when none or several match."""
    if ref.isdigit() and len(ref) < 6:
        index = int(ref)
        if index >= len(hooks):
            raise ApiError(404, f"there is no webhook #{index} ({len(hooks)} webhooks)")
        return hooks[index]
    found = [h for h in hooks if h.get("url") == ref or str(h.get("id", "")) == ref]
    if not found and len(ref) >= 4:
        found = [h for h in hooks if str(h.get("id", "")).startswith(ref)]
    if not found:
        raise ApiError(404, f"no webhook has the id or URL {ref!r} (see `webhooks ls`)")
    if len(found) > 1:
        raise ApiError(
            0, f"{ref!r} names several webhooks (#{', #'.join(str(h['index']) for h in found)})"
        )
    return found[0]


@webhooks_app.command("ls")
@handled
def webhooks_ls(output: OutputOpt = Format.table, context: ContextOpt = None) -> None:
    """List the webhooks with the outcome of each one's last delivery (LAST).

    Example: virtbackup webhooks ls -o wide
    """
    with webhooks_api(context) as (hs, path):
        hooks = _listed(hs, path)
    emit(base.out, hooks, output, WEBHOOK_COLS)


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise ApiError(0, f"--header {text!r}: write it NAME: VALUE")
    return name.strip(), value.strip()


@webhooks_app.command("add")
@handled
def webhooks_add(
    url: Annotated[str, typer.Argument(help="where deliveries are POSTed (http or https)")],
    event: Annotated[
        list[str] | None,
        typer.Option(
            "--event",
            "-e",
            help="job.submitted|started|completed|failed|progress, schedule.triggered|"
            "completed|failed (repeat; default: job and schedule completed and failed)",
        ),
    ] = None,
    header: Annotated[
        list[str] | None, typer.Option(help="'NAME: VALUE' sent with each delivery (repeat)")
    ] = None,
    secret_file: Annotated[
        Path | None,
        typer.Option(help="a file holding the HMAC secret that signs each delivery ('-': stdin)"),
    ] = None,
    timeout: Annotated[int, typer.Option(min=1, max=300, help="seconds per attempt")] = 30,
    retries: Annotated[int, typer.Option(min=0, max=10, help="attempts after the first")] = 3,
    disabled: Annotated[bool, typer.Option(help="add it disabled")] = False,
    output: OutputOpt = Format.table,
    context: ContextOpt = None,
) -> None:
    """Add a webhook. Each delivery is a POST of {"event", "delivery_id", "timestamp",
    "data"}, signed (X-VirtBackup-Signature) when it has a secret; header values are
    masked when listed.

    Example: virtbackup webhooks add https://hooks.example.com/vb -e job.failed --secret-file s.txt
    """
    body: dict[str, Any] = {
        "url": url,
        "events": list(event or DEFAULT_EVENTS),
        "timeout": timeout,
        "retry_count": retries,
        "enabled": not disabled,
    }
    if header:
        headers: dict[str, str] = {}
        for text in header:
            name, value = _header(text)
            headers[name] = value
        body["headers"] = headers
    if secret_file is not None:
        text = (
            typer.get_text_stream("stdin").read()
            if str(secret_file) == "-"
            else secret_file.read_text()
        )
        body["secret"] = text.strip()
        if not body["secret"]:
            raise ApiError(0, f"--secret-file {secret_file}: it is empty")
    with webhooks_api(context) as (hs, path):
        added = hs.post(path, body)
        hooks = _listed(hs, path)
    hook = added.get("webhook", added)
    shown = next((h for h in hooks if h.get("id") == hook.get("id")), hook)
    emit(base.out, shown, output, WEBHOOK_COLS)


@webhooks_app.command("rm")
@handled
def webhooks_rm(
    webhook: Annotated[str, typer.Argument(help="its # (position), id (or its start) or URL")],
    context: ContextOpt = None,
) -> None:
    """Remove a webhook (by its id: another admin's delete meanwhile cannot make this
    one remove a different webhook); deliveries it still owed are dropped.

    Example: virtbackup webhooks rm https://hooks.example.com/vb
    """
    with connect(context) as api:
        hook = find_webhook(_listed(api, "/api/v1/webhooks"), webhook)
        api.request("DELETE", f"/api/v1/webhooks/{hook['id']}")
    base.out.print(f"webhook {hook['url']} removed")


@webhooks_app.command("test")
@handled
def webhooks_test(
    webhook: Annotated[
        str, typer.Argument(help="a URL, or a webhook's # (position), id or its start")
    ],
    event: Annotated[
        str, typer.Option("--event", "-e", help="test, or an event name to send as")
    ] = "test",
    output: OutputOpt = Format.table,
    context: ContextOpt = None,
) -> None:
    """Send one test delivery now (signed and with the headers of the webhook of that
    URL, if there is one); exit 1 with the receiver's answer unless it was 2xx.

    Example: virtbackup webhooks test 0 --event job.failed
    """
    with webhooks_api(context) as (hs, path):
        url = webhook
        if "://" not in webhook:
            url = find_webhook(_listed(hs, path), webhook)["url"]
        answer = hs.post(f"{path}/test", {"url": url, "event": event})
    if output in (Format.json, Format.yaml):
        emit(base.out, answer, output)
        return
    base.out.print(
        f"test delivery {answer.get('delivery_id', '')} to {url}: delivered", soft_wrap=True
    )
