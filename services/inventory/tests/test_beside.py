"""Temporary names beside a file: within NAME_MAX for any file name, the same every time."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from virtbackup.inventory.beside import NAME_MAX, beside

SUFFIX = ".vbrestore-01a22b61361b2600115b354c"


def test_a_name_that_fits_keeps_its_form() -> None:
    assert beside("/d/vm1-vda.qcow2", SUFFIX) == f"/d/vm1-vda.qcow2{SUFFIX}"


@pytest.mark.parametrize("base", ["x" * 250 + ".qcow2", "日" * 80 + "-vda.qcow2", "ü" * 120])
def test_a_long_name_is_shortened_and_can_be_created(tmp_path: Path, base: str) -> None:
    path = str(tmp_path / base[: len(base)])
    made = beside(path, SUFFIX, reserve=len(".pid"))
    name = os.path.basename(made)
    assert made.endswith(SUFFIX) and os.path.dirname(made) == str(tmp_path)
    assert len(name.encode()) <= NAME_MAX - len(".pid")
    assert made == beside(path, SUFFIX, reserve=len(".pid"))  # the same every time
    assert made != beside(path + "x", SUFFIX, reserve=len(".pid"))
    Path(made + ".pid").write_bytes(b"")  # the file system takes it
