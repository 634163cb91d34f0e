"""Entry point: ``python -m virtbackup.inventory`` or ``virtbackup-inventory``."""

from __future__ import annotations

from virtbackup.inventory.service import SPEC
from virtbackup.runtime.service import main as run


def main() -> None:
    run(SPEC)


if __name__ == "__main__":
    main()
