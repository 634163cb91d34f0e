"""Entry point: ``python -m virtbackup.notifier`` or ``virtbackup-notifier``."""

from __future__ import annotations

from virtbackup.notifier.service import SPEC
from virtbackup.runtime.service import main as run


def main() -> None:
    run(SPEC)


if __name__ == "__main__":
    main()
