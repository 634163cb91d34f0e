"""Disk images for tests, through ``qemu-img`` (errors: ``VirtError``)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from virtbackup.virt import VirtError

__all__ = ["create_image", "images_equal"]


def create_image(path: Path, size: int, fmt: str = "qcow2") -> Path:
    """``qemu-img create`` an empty image of ``size`` bytes."""
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", fmt, str(path), str(size)], check=True, timeout=30
    )
    return path


def images_equal(first: Path | str, second: Path | str, *, second_format: str = "raw") -> bool:
    """``qemu-img compare -U``: same guest-visible content (``first`` may be in use)."""
    result = subprocess.run(
        ["qemu-img", "compare", "-U", "-F", second_format, str(first), str(second)],
        capture_output=True,
        timeout=120,
    )
    if result.returncode not in (0, 1):
        raise VirtError(f"qemu-img compare failed: {result.stderr.decode(errors='replace')}")
    return result.returncode == 0
