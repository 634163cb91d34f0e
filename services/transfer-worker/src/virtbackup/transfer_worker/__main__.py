"""Entry point: ``python -m virtbackup.transfer_worker`` or ``virtbackup-transfer-worker``."""

from __future__ import annotations

from virtbackup.transfer_worker.service import SPEC
from virtbackup.runtime.service import main as run


def main() -> None:
    run(SPEC)


if __name__ == "__main__":
    main()
