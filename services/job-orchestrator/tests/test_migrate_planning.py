"""A migration's plan without a server: which extents each pass copies, how they become
units, how its definition is checked and its networks mapped."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from virtbackup.contracts.v1.inventory import STATE_DIRTY, STATE_ZERO, Extent
from virtbackup.contracts.v1.schedules import JobDefinition
from virtbackup.contracts.v1.work import UnitResult
from virtbackup.job_orchestrator.migrate import (
    map_networks,
    migration_params,
    ranges_of,
    split_units,
)
from virtbackup.job_orchestrator.progress import Progress
from virtbackup.runtime.errors import BadRequest

MiB = 1 << 20


def test_the_first_pass_copies_allocated_extents_and_later_ones_dirty_extents() -> None:
    allocation = [
        Extent(0, MiB, 0),
        Extent(MiB, MiB, 0),  # split by a neighbour of other flags upstream: merged here
        Extent(2 * MiB, 2 * MiB, STATE_ZERO | 1),  # a hole: not copied
        Extent(4 * MiB, MiB, STATE_ZERO),  # reads as zeros: not copied
        Extent(5 * MiB, MiB, 0),
    ]
    assert ranges_of(allocation, dirty=False) == [(0, 2 * MiB), (5 * MiB, MiB)]
    dirty = [Extent(0, 64 << 10, STATE_DIRTY), Extent(64 << 10, MiB, 0)]
    dirty.append(Extent(MiB + (64 << 10), 128 << 10, STATE_DIRTY))
    assert ranges_of(dirty, dirty=True) == [(0, 64 << 10), (MiB + (64 << 10), 128 << 10)]


def test_a_migrations_progress_counts_the_bytes_copied_in_every_pass() -> None:
    """A pass's units count what they copied (``bytes_read``: zeros too), on top of the
    bytes of the passes before it, of a total that adds theirs as well."""
    progress = Progress(
        None, None, "j", total_units=2, total_bytes=6 * MiB, bytes_before=10 * MiB,  # type: ignore[arg-type]
    )  # fmt: skip
    for unit, (read, written) in enumerate([(4 * MiB, 3 * MiB), (2 * MiB, 0)]):
        progress.add(
            UnitResult(job_id="j", unit=unit, kind="migrate", disk="vda", worker="w", ok=True,
                       bytes_read=read, bytes_written=written)
        )  # fmt: skip
    fields = progress.fields(published=2)
    assert (fields["bytes_transferred"], fields["total_bytes"]) == (16 * MiB, 16 * MiB)
    assert fields["completed_units"] == 2 and fields["eta_seconds"] is None


def test_units_hold_at_most_their_bytes_and_cut_long_ranges() -> None:
    groups = split_units([(0, 10 * MiB), (20 * MiB, 10 * MiB)], limit=8 * MiB)
    assert groups == [
        [(0, 8 * MiB)],
        [(8 * MiB, 2 * MiB), (20 * MiB, 6 * MiB)],
        [(26 * MiB, 4 * MiB)],
    ]
    assert sum(length for g in groups for _, length in g) == 20 * MiB
    assert split_units([]) == []


def definition(**changes: object) -> JobDefinition:
    fields: dict[str, object] = {
        "vm_path": "kvm1/web1",
        "source": {"type": "libvirt", "server_id": "kvm1"},
        "destination": {"type": "kvm", "server_id": "kvm2"},
        "options": {},
    }
    fields.update(changes)
    return JobDefinition(**fields)  # type: ignore[arg-type]


def test_a_definition_becomes_the_jobs_params_with_defaults() -> None:
    server, vm, params = migration_params(
        definition(options={"target_directory": "/t", "max_passes": 2})
    )
    assert (server, vm) == ("kvm1", "web1")
    assert params["targetServerId"] == "kvm2"
    assert params["targetDirectory"] == "/t" and params["maxPasses"] == 2
    assert params["maxDowntimeSeconds"] == 30.0 and params["startOnTarget"] is True


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"destination": {"type": "kvm", "server_id": "kvm1"}}, "destination.server_id"),
        ({"destination": {"type": "kvm"}}, "destination.server_id"),
        ({"destination": {"type": "kvm", "libvirt_uri": 3}}, "destination.libvirt_uri"),
        ({"destination": {"type": "kvm", "uri": "qemu:///system"}}, "destination.uri"),
        ({"vm_path": "kvm1/web*"}, "vm_path"),
        ({"options": {"max_passes": True}}, "options.max_passes"),
        ({"options": {"max_downtime_seconds": 0}}, "options.max_downtime_seconds"),
        # Waited for in the cut-over, where a cancel is refused: bounded.
        ({"options": {"shutdown_timeout_seconds": 1e15}}, "options.shutdown_timeout_seconds"),
        ({"options": {"shutdown_timeout_seconds": 3601}}, "options.shutdown_timeout_seconds"),
        ({"options": {"shutdown_timeout_seconds": -1}}, "options.shutdown_timeout_seconds"),
        ({"options": {"force_shutdown": "yes"}}, "options.force_shutdown"),
        ({"options": {"remove_source_disks": True}}, "options.remove_source_disks"),
        ({"options": {"remove_source": "yes"}}, "options.remove_source"),
        ({"options": {"debug_fault": "cutover"}}, "options.debug_fault"),
        ({"options": {"debug_fault": "start"}}, "options.debug_fault"),
        ({"options": {"network_mapping": {"default": 3}}}, "options.network_mapping.default"),
        ({"options": {"vm_name": "a/b"}}, "options.vm_name"),
    ],
)
def test_bad_definitions_name_the_field(changes: dict[str, object], field: str) -> None:
    with pytest.raises(BadRequest, match=field.replace(".", r"\.")):
        migration_params(definition(**changes))


def test_a_libvirt_uri_and_source_removal_become_params() -> None:
    uri = "qemu+ssh://root@kvm2/system"
    _, _, params = migration_params(
        definition(
            destination={"type": "kvm", "libvirt_uri": uri},
            options={"remove_source": True, "remove_source_disks": True},
        )
    )
    # Resolved against the configuration when the job is submitted.
    assert params["targetLibvirtUri"] == uri and params["targetServerId"] == ""
    assert params["removeSource"] is True and params["removeSourceDisks"] is True
    _, _, params = migration_params(definition())
    assert params["removeSource"] is False and params["removeSourceDisks"] is False
    assert "targetLibvirtUri" not in params


def test_networks_are_mapped_and_others_kept() -> None:
    xml = (
        "<domain><name>w</name><devices>"
        "<interface type='network'><source network='default'/></interface>"
        "<interface type='network'><source network='lab'/></interface>"
        "<interface type='user'/></devices></domain>"
    )
    out = ET.fromstring(map_networks(xml, {"default": "br-prod"}))
    names = [s.get("network") for s in out.findall("./devices/interface/source")]
    assert names == ["br-prod", "lab"]
    assert map_networks(xml, {}) == xml
