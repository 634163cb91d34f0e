"""Fixtures every test package shares (a real nats-server per test, ...), and how the suite
is split between pytest-xdist workers.

``python3 dev.py test`` runs the suite in two workers (``-n 2 --dist loadfile``). Every
test module is one unit of work, run whole by one worker in its own order, so a module's
fixtures (a system, VMs) are made once and its tests may build on each other; modules
that share something of the machine that is not theirs alone are one unit, run one after
the other (:data:`SHARED_GROUPS`, by :func:`pytest_xdist_make_scheduler`). Units start
heaviest first (:data:`HEAVY_FIRST`), so that the two workers end at about the same
time. Run alone (no ``-n``), none of this applies.

pytest-xdist's own ``xdist_group`` marker is not used: it renames node ids through an
attribute pytest 9.2 no longer reads, so its groups are silently ignored there.
"""

from __future__ import annotations

from typing import Any

import pytest

pytest_plugins = ["virtbackup.testing.fixtures"]

#: Modules that share machine state of their own kind, run in one unit, in this order.
#: ``session-host``: the session user's one ``qemu:///session`` daemon, which
#: ``test_session.py`` stops on purpose (the others need it running).
#: ``firmware``: the host's NVRAM and swtpm folders, which both check hold no staged
#: restore files (``.vbrestore-*``), anybody's.
SHARED_GROUPS: dict[str, str] = {
    "tests/test_session_host.py": "session-host",
    "tests/test_trial18.py": "session-host",
    "services/inventory/tests/test_bitmap_exports.py": "session-host",
    "libs/virt/tests/test_session.py": "session-host",
    "tests/test_firmware_state.py": "firmware",
    "tests/test_agent_restore.py": "firmware",
}

#: Units by their measured time, longest first (``--durations=0`` of a whole run,
#: 2026-12-01, 2-core machine): only the order matters; units not named start after
#: these, in collection order.
HEAVY_FIRST: tuple[str, ...] = (
    "tests/test_faults.py",
    "firmware",
    "tests/test_lifecycle_gc.py",
    "tests/test_migrate.py",
    "tests/test_schemathesis.py",
    "session-host",
    "tests/test_backend_jobs.py",
    "tests/test_migrate_via.py",
    "tests/test_fanout.py",
    "tests/test_identity.py",
    "tests/test_destinations.py",
    "tests/test_console.py",
    "tests/test_replicas.py",
    "tests/test_hypersdk_jobs.py",
    "tests/test_remote_agents.py",
    "tests/test_datapath.py",
    "libs/repository/tests/test_lifecycle_gc.py",
    "tests/test_vm_names.py",
    "tests/test_offline.py",
    "tests/test_instant_access.py",
    "tests/test_restore_safety.py",
    "tests/test_bus_security.py",
    "tests/test_point_chain.py",
    "tests/test_lifecycle.py",
    "tests/test_vault.py",
    "tests/test_job_slots.py",
    "tests/test_webhooks.py",
)


def unit_of(nodeid: str) -> str:
    """The unit of work a test belongs to: its module's path (as in its node id), or the
    name of the shared group that module is in."""
    module = nodeid.split("::", 1)[0]
    return SHARED_GROUPS.get(module, module)


def pytest_configure(config: pytest.Config) -> None:
    """In the controlling process of a run with workers, make the machine-wide test state
    once, before the workers start (:mod:`virtbackup.testing.prepare`)."""
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        from virtbackup.testing.prepare import prepare_machine

        for problem in prepare_machine():
            print(f"test machine: {problem}")


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Units of work by :func:`unit_of`, handed out in the workers' collection order
    (heaviest first, see :func:`pytest_collection_modifyitems`)."""
    from xdist.scheduler import LoadScopeScheduling

    class ModuleUnits(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid)

    return ModuleUnits(config, log)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In a pytest-xdist worker: the heaviest units first, each module's tests in their
    own order (a stable sort)."""
    if not hasattr(config, "workerinput"):
        return
    rank = {unit: i for i, unit in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(unit_of(item.nodeid), len(rank)))
