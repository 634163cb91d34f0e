"""Rewriting a saved domain XML for a restore elsewhere (no hypervisor needed)."""

from __future__ import annotations

import random
import xml.etree.ElementTree as ET

import pytest

from virtbackup.virt.rewrite import (
    DiskPlacement,
    device_file,
    domain_name,
    renamed_file,
    restored_domain,
    rewrite_domain,
)

SAVED = """
<domain type='kvm'>
  <name>web1</name>
  <uuid>0b6f6a3e-8f2c-4d55-9c5e-2a1b0c9d8e7f</uuid>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
    <nvram template='/usr/share/OVMF/VARS.fd'>/var/lib/libvirt/qemu/nvram/web1_VARS.fd</nvram>
  </os>
  <sysinfo type='smbios'>
    <system><entry name='uuid'>0b6f6a3e-8f2c-4d55-9c5e-2a1b0c9d8e7f</entry>
            <entry name='serial'>S1</entry></system>
  </sysinfo>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/var/lib/libvirt/images/web1-vda.img'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw' cache='none' io='native'/>
      <source dev='/dev/vg0/web1-data'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='/iso/install.iso'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:11:22:33'/>
      <source network='default'/>
    </interface>
    <interface type='network'>
      <mac address='52:54:00:11:22:34'/>
      <source network='default'/>
    </interface>
  </devices>
</domain>
"""


def _parse(xml: str) -> ET.Element:
    return ET.fromstring(xml)


def _disk(root: ET.Element, target: str) -> ET.Element:
    for disk in root.findall("./devices/disk"):
        tgt = disk.find("target")
        if tgt is not None and tgt.get("dev") == target:
            return disk
    raise AssertionError(target)


def test_same_name_same_places_changes_nothing_that_matters() -> None:
    placements = [
        DiskPlacement("vda", "/var/lib/libvirt/images/web1-vda.img", "file", "raw"),
        DiskPlacement("vdb", "/dev/vg0/web1-data", "block", "raw"),
    ]
    out = _parse(rewrite_domain(SAVED, name="web1", disks=placements))
    assert out.findtext("uuid") == "0b6f6a3e-8f2c-4d55-9c5e-2a1b0c9d8e7f"
    assert [m.get("address") for m in out.iter("mac")] == ["52:54:00:11:22:33", "52:54:00:11:22:34"]
    assert _disk(out, "vdb").get("type") == "block"
    source = _disk(out, "vdb").find("source")
    assert source is not None and source.get("dev") == "/dev/vg0/web1-data"
    driver = _disk(out, "vdb").find("driver")
    assert driver is not None and driver.get("io") == "native"


def test_a_new_name_gets_a_new_identity_and_its_own_files() -> None:
    placements = [
        DiskPlacement("vda", "/var/lib/libvirt/images/web2-vda.img", "file", "raw"),
        DiskPlacement("vdb", "/srv/images/web2-vdb.img", "file", "raw"),
    ]
    xml = rewrite_domain(SAVED, name="web2", disks=placements, rng=random.Random(1))
    out = _parse(xml)
    assert domain_name(xml) == "web2"
    assert out.find("uuid") is None
    assert [e.get("name") for e in out.iter("entry")] == ["serial"]
    macs = [m.get("address") or "" for m in out.iter("mac")]
    assert len(set(macs)) == 2
    assert not {"52:54:00:11:22:33", "52:54:00:11:22:34"} & set(macs)
    assert all(m.startswith("52:54:00:") for m in macs)
    assert out.findtext("./os/nvram") == "/var/lib/libvirt/qemu/nvram/web2_VARS.fd"
    nvram = out.find("./os/nvram")
    assert nvram is not None and nvram.get("template") == "/usr/share/OVMF/VARS.fd"
    # The block device became a raw file; the CD-ROM is untouched.
    vdb = _disk(out, "vdb")
    assert vdb.get("type") == "file"
    source = vdb.find("source")
    assert source is not None and source.attrib == {"file": "/srv/images/web2-vdb.img"}
    driver = vdb.find("driver")
    assert driver is not None and driver.get("type") == "raw"
    cd = _disk(out, "sda").find("source")
    assert cd is not None and cd.get("file") == "/iso/install.iso"


def test_nvram_in_source_form_is_renamed_too() -> None:
    saved = SAVED.replace(
        "<nvram template='/usr/share/OVMF/VARS.fd'>"
        "/var/lib/libvirt/qemu/nvram/web1_VARS.fd</nvram>",
        "<nvram type='file'><source file='/nv/vars-of-web1.fd'/></nvram>",
    )
    out = _parse(rewrite_domain(saved, name="copy", disks=[]))
    source = out.find("./os/nvram/source")
    assert source is not None and source.get("file") == "/nv/vars-of-copy.fd"


def test_file_names_follow_the_new_name() -> None:
    assert renamed_file("web1-vda.qcow2", "web1", "web2") == "web2-vda.qcow2"
    assert renamed_file("disk0.img", "web1", "web2") == "web2-disk0.img"
    # Only as a word, and once: a short name inside other words is not it.
    assert renamed_file("data-a.img", "a", "b") == "data-b.img"
    assert renamed_file("data.img", "a", "b") == "b-data.img"
    assert renamed_file("db-x-db.img", "db", "c") == "c-x-db.img"
    assert renamed_file("web1_VARS.fd", "web1", "we b\\2") == "we b\\2_VARS.fd"
    assert renamed_file("web1-vda.qcow2", "web1", "web1") == "web1-vda.qcow2"
    assert device_file("web2", "vdb", "raw") == "web2-vdb.img"
    assert device_file("web2", "vdb", "qcow2") == "web2-vdb.qcow2"


def test_an_xml_without_a_name_is_refused() -> None:
    with pytest.raises(ValueError, match="no <name>"):
        rewrite_domain("<domain/>", name="x")


def test_a_restore_keeps_the_uuid_of_the_domain_it_replaces() -> None:
    """The same job and ``uuid`` always give the same XML (state staged early in a job and
    the domain defined at its commit agree); a replaced domain keeps its UUID, whether the
    name is the saved one or a new one; a new domain gets the job's."""
    kept = "11111111-2222-3333-4444-555555555555"
    for name in ("web1", "web2"):
        xml = restored_domain(SAVED, name=name, job_id="j1", uuid=kept)
        assert xml == restored_domain(SAVED, name=name, job_id="j1", uuid=kept)
        out = _parse(xml)
        assert out.findtext("uuid") == kept
        assert [e.get("name") for e in out.iter("entry")] == ["serial"]  # no contradiction
    new = _parse(restored_domain(SAVED, name="web2", job_id="j1"))
    assert new.findtext("uuid") == _parse(
        restored_domain(SAVED, name="web2", job_id="j1")
    ).findtext("uuid")
    assert new.findtext("uuid") not in (kept, "0b6f6a3e-8f2c-4d55-9c5e-2a1b0c9d8e7f")
    same = _parse(restored_domain(SAVED, name="web1", job_id="j1"))
    assert same.findtext("uuid") == "0b6f6a3e-8f2c-4d55-9c5e-2a1b0c9d8e7f"


def _with_nvram(path: str) -> str:
    return (
        "<domain type='kvm'><name>web1</name><os><type>hvm</type>"
        f"<nvram>{path}</nvram></os><devices/></domain>"
    )


@pytest.mark.parametrize(
    ("saved", "target_dir", "expected"),
    [
        # A system VM onto a user's session daemon: into the user's NVRAM directory.
        (
            "/var/lib/libvirt/qemu/nvram/web1_VARS.fd",
            "/home/u/.config/libvirt/qemu/nvram",
            "/home/u/.config/libvirt/qemu/nvram/web2_VARS.fd",
        ),
        # A session VM onto the system daemon.
        (
            "/home/u/.config/libvirt/qemu/nvram/web1_VARS.fd",
            "/var/lib/libvirt/qemu/nvram",
            "/var/lib/libvirt/qemu/nvram/web2_VARS.fd",
        ),
        # The same kind of daemon: the store stays in its directory.
        (
            "/var/lib/libvirt/qemu/nvram/web1_VARS.fd",
            "/var/lib/libvirt/qemu/nvram",
            "/var/lib/libvirt/qemu/nvram/web2_VARS.fd",
        ),
        # A store the user put somewhere of their own stays there.
        ("/srv/vm/web1_VARS.fd", "/home/u/.config/libvirt/qemu/nvram", "/srv/vm/web2_VARS.fd"),
    ],
)
def test_a_variable_store_moves_to_the_target_daemons_nvram_directory(
    saved: str, target_dir: str, expected: str
) -> None:
    xml = restored_domain(_with_nvram(saved), name="web2", job_id="j1", nvram_dir=target_dir)
    assert _parse(xml).findtext("./os/nvram") == expected
    unchanged = restored_domain(_with_nvram(saved), name="web2", job_id="j1")
    assert _parse(unchanged).findtext("./os/nvram") == saved.replace("web1", "web2")
