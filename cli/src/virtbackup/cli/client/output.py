"""Printing the API's objects: a rich table by default, ``-o json`` or ``-o yaml`` as
the API sent them (for scripts)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from enum import StrEnum
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table


class Format(StrEnum):
    """``-o``: how results are printed."""

    table = "table"
    json = "json"
    yaml = "yaml"


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))[:60]
    return str(value)


def emit(
    console: Console,
    data: Any,
    fmt: Format,
    columns: Sequence[tuple[str, str]] = (),
    title: str | None = None,
) -> None:
    """Print ``data`` (a list of objects, or one object) as ``fmt``; a table shows
    ``columns`` (heading, key; a dotted key reads a nested field)."""
    if fmt is Format.json:
        console.print(json.dumps(data, indent=2), markup=False, highlight=False, soft_wrap=True)
        return
    if fmt is Format.yaml:
        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
        console.print(text, end="", markup=False, highlight=False, soft_wrap=True)
        return
    rows = data if isinstance(data, list) else [data]
    if not columns:
        keys = sorted({k for row in rows if isinstance(row, dict) for k in row})
        columns = [(k, k) for k in keys]
    table = Table(title=title, show_lines=False)
    for heading, _ in columns:
        table.add_column(heading, overflow="fold")
    for row in rows:
        table.add_row(*(_cell(_dig(row, key)) for _, key in columns))
    console.print(table)


def _dig(row: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(row, dict):
            return None
        row = row.get(part)
    return row
