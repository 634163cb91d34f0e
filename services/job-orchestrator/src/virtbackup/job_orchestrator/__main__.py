"""Entry point: ``python -m virtbackup.job_orchestrator`` or ``virtbackup-job-orchestrator``."""

from __future__ import annotations

from virtbackup.job_orchestrator.service import SPEC
from virtbackup.runtime.service import main as run


def main() -> None:
    run(SPEC)


if __name__ == "__main__":
    main()
