"""Lint the Helm chart with Helm's own engine (helm-sdkpy: Helm's Go library in a wheel)
for one set of values: every template is rendered and each rendered document must
parse as YAML, with a name (Helm's lint rules).

Run by tests/test_deploy_validate.py under ``.tools/helm-sdkpy`` (``dev.py install``
makes it: helm-sdkpy needs Python 3.12 or newer), where no ``helm`` binary is to be had.
Usage: ``helm_lint.py CHART [dotted.key=YAML ...]``; exit 0 when Helm reports no error,
1 with one line per error (its template's path) otherwise. Helm's lint API hands back
no message text through helm-sdkpy, only the template and the severity.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from helm_sdkpy import Configuration
from helm_sdkpy.chart import Lint

#: Helm's lint severities (pkg/lint/support): 1 info, 2 warning, 3 error.
ERROR = 3


def _set(values: dict[str, Any], dotted: str, value: Any) -> None:
    *path, last = dotted.split(".")
    for key in path:
        values = values.setdefault(key, {})
    values[last] = value


async def lint(chart: Path, overrides: list[str]) -> list[str]:
    """The paths of the templates Helm reports an error for (empty: clean)."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / chart.name
        shutil.copytree(chart, copy)
        values = yaml.safe_load((copy / "values.yaml").read_text()) or {}
        for item in overrides:
            key, _, raw = item.partition("=")
            _set(values, key, yaml.safe_load(raw))
        (copy / "values.yaml").write_text(yaml.safe_dump(values))
        result = await Lint(Configuration(namespace="virtbackup")).run(str(copy))
    return [
        f"{m.get('Path')}: severity {m.get('Severity')}"
        for m in result.get("Messages") or []
        if int(m.get("Severity", 0)) >= ERROR
    ]


def main() -> int:
    chart, *overrides = sys.argv[1:]
    errors = asyncio.run(lint(Path(chart), overrides))
    for line in errors:
        print(line)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
