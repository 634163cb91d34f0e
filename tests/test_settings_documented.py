"""Every setting the code reads is in the README's Settings section: each field of
``runtime.settings.Settings`` (as its ``VIRTBACKUP_`` variable), every ``VIRTBACKUP_``
variable read elsewhere, and every flag of ``virtbackup up``."""

from __future__ import annotations

import re
from pathlib import Path

from virtbackup.runtime.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def settings_section() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("\n## Settings\n")
    return readme[start : readme.index("\n## ", start + 1)]


def variables_read_by_code() -> set[str]:
    names = {f"VIRTBACKUP_{name.upper()}" for name in Settings.model_fields}
    sources = [*ROOT.glob("libs/*/src/**/*.py"), *ROOT.glob("services/*/src/**/*.py")]
    sources += list(ROOT.glob("cli/src/**/*.py"))
    for path in sources:
        names |= set(re.findall(r"VIRTBACKUP_[A-Z0-9_]+", path.read_text()))
    return names


def test_every_variable_is_in_the_settings_table() -> None:
    section = settings_section()
    documented = set(re.findall(r"`(VIRTBACKUP_[A-Z0-9_]+)", section))
    assert variables_read_by_code() - documented == set()


def test_every_flag_of_up_is_in_the_settings_section() -> None:
    cli = (ROOT / "cli/src/virtbackup/cli/__main__.py").read_text()
    flags = set(re.findall(r'add_argument\(\s*"(--[a-z-]+)"', cli))
    assert {"--workers", "--orchestrators", "--nats-port"} <= flags
    section = settings_section()
    assert {f for f in flags if f"`{f} " not in section} == set()
