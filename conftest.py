"""Fixtures every test package shares (a real nats-server per test, ...), and how the suite
is split between pytest-xdist workers.

``python3 dev.py test`` runs the suite in two workers (``-n 2 --dist loadgroup``). Every
test module is one unit of work, so a module's fixtures (a system, VMs) are made once, in
one worker; modules that share something of the machine that is not theirs alone run in
one unit, one after the other (:data:`SHARED_GROUPS`). Units start heaviest first
(:data:`HEAVY_FIRST`), so that the two workers end at about the same time. Run alone
(no ``-n``), none of this applies.
"""

from __future__ import annotations

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


def _unit(item: pytest.Item, root: str) -> str:
    path = item.path.as_posix()
    relative = path[len(root) + 1 :] if path.startswith(root + "/") else path
    return SHARED_GROUPS.get(relative, relative)


def pytest_configure(config: pytest.Config) -> None:
    """In the controlling process of a run with workers, make the machine-wide test state
    once, before the workers start (:mod:`virtbackup.testing.prepare`)."""
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        from virtbackup.testing.prepare import prepare_machine

        for problem in prepare_machine():
            print(f"test machine: {problem}")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With ``--dist loadgroup``: one unit per module (or shared group), heaviest first.
    Runs before pytest-xdist reads the groups (``tryfirst``)."""
    if getattr(config.option, "dist", "no") != "loadgroup":
        return
    root = config.rootpath.as_posix()
    rank = {unit: i for i, unit in enumerate(HEAVY_FIRST)}
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(_unit(item, root)))
    items.sort(key=lambda item: rank.get(_unit(item, root), len(rank)))
