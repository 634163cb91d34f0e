"""Printing the API's objects: a rich table by default, ``-o json`` or ``-o yaml`` as
the API sent them (for scripts)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from enum import StrEnum
from typing import Any

import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text


class Format(StrEnum):
    """``-o``: how results are printed."""

    table = "table"
    json = "json"
    yaml = "yaml"


#: Table columns whose numbers are byte counts, shown as KiB/MiB/GiB.
BYTE_KEYS = frozenset({"logicalBytes", "storedBytes", "bytesTransferred", "totalBytes", "size"})


def human_bytes(value: int) -> str:
    """``value`` bytes in binary units, e.g. ``64.0 MiB``."""
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


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
    table = Table(title=escape(title) if title else None, show_lines=False)
    for index, (heading, _) in enumerate(columns):
        # The first column is the id to copy into the next command: never folded.
        table.add_column(heading, overflow="fold", no_wrap=index == 0)
    for row in rows:
        # Text, not markup: a name with [brackets] is shown as it is.
        table.add_row(*(Text(_shown(_dig(row, key), key)) for _, key in columns))
    console.print(table)


def _shown(value: Any, key: str) -> str:
    if (
        key.rsplit(".", 1)[-1] in BYTE_KEYS
        and isinstance(value, int)
        and not isinstance(value, bool)
    ):
        return human_bytes(value)
    return _cell(value)


def _dig(row: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(row, dict):
            return None
        row = row.get(part)
    return row
