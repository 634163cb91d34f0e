"""The services a launcher starts, and the module each one runs as (``python -m``).

The names are ``virtbackup.contracts.subjects.SERVICES`` (also their queue groups); a
service ``job-orchestrator`` is the package ``virtbackup.job_orchestrator`` (folders use
hyphens, packages underscores).
"""

from __future__ import annotations

from typing import Final

from virtbackup.contracts.subjects import GATEWAY, SERVICES


def module_of(service: str) -> str:
    """The module that runs ``service`` with ``python -m``; ``KeyError`` for an unknown one."""
    if service not in SERVICES:
        raise KeyError(f"unknown service {service!r} (known: {', '.join(SERVICES)})")
    return "virtbackup." + service.replace("-", "_")


#: Every service -> its module, the gateway last: it answers health once the others run.
MODULES: Final = {
    name: module_of(name) for name in sorted(SERVICES, key=lambda name: name == GATEWAY)
}
