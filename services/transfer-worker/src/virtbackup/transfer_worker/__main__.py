"""Entry point: ``python -m virtbackup.transfer_worker`` or ``virtbackup-transfer-worker``."""

from __future__ import annotations

from virtbackup.runtime.service import main as run
from virtbackup.transfer_worker.service import SPEC


def main() -> None:
    run(SPEC)


if __name__ == "__main__":
    main()
