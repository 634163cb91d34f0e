"""Entry point: ``python -m virtbackup.gateway`` or ``virtbackup-gateway``."""

from __future__ import annotations

from virtbackup.gateway.server import main

if __name__ == "__main__":
    main()
