"""Printing the API's objects: a table by default, readable at 80 columns; ``-o wide``
a table with full ids, full times and more columns (as wide as it needs); ``-o json``
or ``-o yaml`` as the API sent them (for scripts).

A default table prints each row on one line: every cell stays on its line and a cell
too long for its column ends with an ellipsis, except the first column (the id to copy
into the next command), which is never cut. Ids are shown short there (see
``short_job_id``, ``short_point_id``, ``short_hex``); every command that takes such an
id also takes its short form (``refs``).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
    wide = "wide"
    json = "json"
    yaml = "yaml"


#: Table columns whose numbers are byte counts, shown as KiB/MiB/GiB.
BYTE_KEYS = frozenset({"logicalBytes", "storedBytes", "bytesTransferred", "totalBytes", "size"})
#: Characters of a short id (``short_job_id``, ``short_point_id``, ``short_hex``).
SHORT = 8


def human_bytes(value: int) -> str:
    """``value`` bytes in binary units, e.g. ``64.0 MiB``."""
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def short_job_id(value: Any) -> str:
    """A job id's last 8 characters: its random part (the first 12 hex digits are the
    time it was made, shared by the jobs of one moment)."""
    return str(value or "")[-SHORT:]


def short_point_id(value: Any) -> str:
    """A restore point's short id: the first 8 hex digits of the SHA-256 of its id
    (``<destination>~<vm base64url>~<timestamp>`` carries nothing short and unique)."""
    if not value:
        return ""
    return hashlib.sha256(str(value).encode()).hexdigest()[:SHORT]


def short_hex(value: Any) -> str:
    """An id of random hex digits (a webhook's, an agent's) cut to its first 8."""
    return str(value or "")[:SHORT]


def short_time(value: Any) -> str:
    """An ISO-8601 time (``2026-11-30T21:57:57.123Z``) or a point's timestamp
    (``2026-11-30T21-57-57``) as ``2026-11-30 21:57`` (the zone as given: UTC)."""
    text = str(value or "")
    if len(text) < 16 or text[10] != "T":
        return text
    return f"{text[:10]} {text[11:13]}:{text[14:16]}"


def short_fingerprint(value: Any) -> str:
    """A SHA-256 fingerprint ``AB:CD:...`` cut to its first four bytes, ``AB:CD:EF:01…``."""
    text = str(value or "")
    return f"{text[:11]}…" if len(text) > 11 else text


@dataclass(frozen=True)
class Column:
    """One column of a table: its ``heading``, the ``key`` it shows (a dotted key reads a
    nested field), how the default table ``short``-ens it (``-o wide`` shows the value
    in full), whether only ``-o wide`` shows it, and whether it gives way first."""

    heading: str
    key: str
    short: Callable[[Any], str] | None = None
    wide_only: bool = False
    #: Cut first when the table is too wide (names, messages), rather than times or sizes.
    flex: bool = False


ColumnSpec = Column | tuple[str, str]


#: Characters a terminal would act on rather than show: C0 and C1 controls (ESC starts
#: sequences that clear the screen, set the title, remap keys...), DEL, and the bidi
#: overrides and isolates that reorder what is shown (U+202A-U+202E, U+2066-U+2069).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """``text`` with every character a terminal would act on (see ``_CONTROL``) written
    as a visible escape (``\\x1b``, ``\\u202e``): what the API returns may have been set
    by another user, and must not drive the reader's terminal."""
    return _CONTROL.sub(
        lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}", text
    )


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (dict, list)):
        if isinstance(value, list) and all(isinstance(v, (str, int)) for v in value):
            return printable(",".join(str(v) for v in value))
        return json.dumps(value, separators=(",", ":"))[:200]
    # One line: no newline of a message breaks a row; no control character is sent.
    return printable(" ".join(str(value).split()))


def emit(
    console: Console,
    data: Any,
    fmt: Format,
    columns: Sequence[ColumnSpec] = (),
    title: str | None = None,
) -> None:
    """Print ``data`` (a list of objects, or one object) as ``fmt``; a table shows
    ``columns`` (``Column``, or (heading, key) pairs)."""
    if fmt is Format.json:
        console.print(json.dumps(data, indent=2), markup=False, highlight=False, soft_wrap=True)
        return
    if fmt is Format.yaml:
        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
        console.print(text, end="", markup=False, highlight=False, soft_wrap=True)
        return
    wide = fmt is Format.wide
    rows = data if isinstance(data, list) else [data]
    cols = [c if isinstance(c, Column) else Column(*c) for c in columns]
    if not cols:
        keys = sorted({k for row in rows if isinstance(row, dict) for k in row})
        cols = [Column(k, k) for k in keys]
    cols = [c for c in cols if wide or not c.wide_only]
    cells = [[Text(_shown(_dig(row, c.key), c, wide)) for c in cols] for row in rows]
    table = Table(
        title=escape(title) if title else None,
        box=None,
        pad_edge=False,
        padding=(0, 1),
        show_edge=False,
        header_style="bold",
    )
    widths = _fit(cols, cells, console.width if not wide else 1 << 16)
    for index, (col, width) in enumerate(zip(cols, widths, strict=True)):
        table.add_column(
            col.heading,
            no_wrap=True,
            overflow="crop" if index == 0 else "ellipsis",
            width=width,
            min_width=width,
            max_width=width,
        )
    for row_cells in cells:
        table.add_row(*row_cells)
    needed = sum(widths) + GAP * (len(widths) - 1)
    if wide and needed > console.width:  # as wide as it takes, rather than cut
        console = Console(
            file=console.file,
            width=needed,
            force_terminal=console.is_terminal,
            no_color=console.no_color,
            highlight=False,
        )
    console.print(table)


#: The narrowest a column is cut to (its heading may be cut too).
MIN_COLUMN = 4
#: Characters between two columns.
GAP = 2


def _fit(cols: Sequence[Column], cells: Sequence[Sequence[Text]], total: int) -> list[int]:
    """Each column's width so that the table fits ``total`` characters: the widest cell
    of each, then the ``flex`` columns cut (the widest first), then the others but the
    first. The first column (the id) keeps its width."""
    widths = [
        max([len(col.heading), *(row[i].cell_len for row in cells)]) for i, col in enumerate(cols)
    ]
    room = total - GAP * (len(cols) - 1)
    for group in (
        [i for i, c in enumerate(cols) if c.flex and i],
        [i for i, c in enumerate(cols) if not c.flex and i],
    ):
        while sum(widths) > room:
            cut = [i for i in group if widths[i] > MIN_COLUMN]
            if not cut:
                break
            widest = max(cut, key=lambda i: widths[i])
            widths[widest] -= 1
    return widths


def _shown(value: Any, col: Column, wide: bool) -> str:
    if (
        col.key.rsplit(".", 1)[-1] in BYTE_KEYS
        and isinstance(value, int)
        and not isinstance(value, bool)
    ):
        return human_bytes(value)
    if col.short is not None and not wide and value is not None:
        return printable(col.short(value))
    return _cell(value)


def _dig(row: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(row, dict):
            return None
        row = row.get(part)
    return row
