"""The XML documents, URIs and decodings, without a hypervisor."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import libvirt
import pytest

from virtbackup.virt import (
    CheckpointInconsistent,
    Conflict,
    Disk,
    LifecycleKind,
    NotFound,
    TcpServer,
    UnixServer,
    Unreachable,
    VirtError,
    build_backup_xml,
    build_checkpoint_xml,
    parse_disks,
    ssh_uri,
)
from virtbackup.virt.backup import nbd_uri, parse_backup_xml, scratch_path
from virtbackup.virt.checkpoints import parse_checkpoint
from virtbackup.virt.errors import translate
from virtbackup.virt.events import lifecycle_event
from virtbackup.virt.images import parse_image_info

DOMAIN_XML = """
<domain type='kvm' id='3'>
  <name>web</name>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/vm/web.overlay-1.qcow2' index='3'/>
      <backingStore type='file' index='1'>
        <format type='qcow2'/>
        <source file='/vm/web.qcow2'/>
        <backingStore type='file' index='2'>
          <format type='raw'/>
          <source file='/vm/base.raw'/>
          <backingStore/>
        </backingStore>
      </backingStore>
      <target dev='vda' bus='virtio'/>
      <alias name='ua-system'/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw'/>
      <source dev='/dev/vg/data'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/iso/install.iso'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <disk type='file' device='disk'>
      <source file='/vm/shared.img'/>
      <target dev='vdc' bus='virtio'/>
      <readonly/>
    </disk>
    <disk type='file' device='floppy'><target dev='fda'/></disk>
    <disk type='file' device='disk'><driver type='qcow2'/><target dev='vdd'/></disk>
  </devices>
</domain>
"""


def disk(target: str, fmt: str = "qcow2") -> Disk:
    return Disk(target, f"/vm/{target}", fmt, "disk", "file", "virtio", None, capacity=1 << 30)


def test_parse_disks_keeps_writable_disks_with_media() -> None:
    disks = parse_disks(DOMAIN_XML)
    assert [d.target for d in disks] == ["vda", "vdb"]
    vda, vdb = disks
    assert vda.source == "/vm/web.overlay-1.qcow2"
    assert vda.backing == ("/vm/web.qcow2", "/vm/base.raw")
    assert vda.alias == "ua-system"
    assert vda.supports_bitmaps
    assert (vdb.type, vdb.source, vdb.format) == ("block", "/dev/vg/data", "raw")
    assert not vdb.supports_bitmaps
    assert vdb.capacity is None


def test_full_backup_xml() -> None:
    xml = build_backup_xml(
        server=TcpServer("10.0.0.5", 10809),
        disks=[disk("vda"), disk("vdb")],
        scratch_dir="/var/lib/vb",
        uuid="u-1",
        exclude=["vdc"],
    )
    root = ET.fromstring(xml)
    assert root.tag == "domainbackup"
    assert root.get("mode") == "pull"
    assert root.find("incremental") is None
    assert root.find("server").attrib == {"transport": "tcp", "name": "10.0.0.5", "port": "10809"}  # type: ignore[union-attr]
    disks = root.findall("./disks/disk")
    assert [(d.get("name"), d.get("backup"), d.get("type")) for d in disks] == [
        ("vda", "yes", "file"),
        ("vdb", "yes", "file"),
        ("vdc", "no", None),
    ]
    assert disks[0].find("scratch").get("file") == "/var/lib/vb/vb-u-1-vda.scratch"  # type: ignore[union-attr]
    assert scratch_path("/var/lib/vb", "u-1", "vda") == "/var/lib/vb/vb-u-1-vda.scratch"


def test_incremental_backup_xml_reads_raw_disks_in_full() -> None:
    xml = build_backup_xml(
        server=UnixServer("/run/vb/nbd.sock"),
        disks=[disk("vda"), disk("vdb", "raw")],
        scratch_dir="/s",
        uuid="u",
        incremental="cp-1",
    )
    root = ET.fromstring(xml)
    assert root.findtext("incremental") == "cp-1"
    assert root.find("server").attrib == {"transport": "unix", "socket": "/run/vb/nbd.sock"}  # type: ignore[union-attr]
    modes = {d.get("name"): d.get("backupmode") for d in root.findall("./disks/disk")}
    assert modes == {"vda": None, "vdb": "full"}


def test_checkpoint_xml_gives_bitmaps_to_qcow2_only() -> None:
    root = ET.fromstring(
        build_checkpoint_xml("cp-2", [disk("vda"), disk("vdb", "raw")], description="nightly")
    )
    assert root.findtext("name") == "cp-2"
    assert root.findtext("description") == "nightly"
    assert [d.attrib for d in root.findall("./disks/disk")] == [
        {"name": "vda", "checkpoint": "bitmap", "bitmap": "cp-2"},
        {"name": "vdb", "checkpoint": "no"},
    ]


def test_parse_checkpoint() -> None:
    cp = parse_checkpoint(
        "<domaincheckpoint><name>cp2</name><parent><name>cp1</name></parent>"
        "<creationTime>1700000000</creationTime><disks>"
        "<disk name='vda' checkpoint='bitmap' bitmap='cp2' size='1048576'/>"
        "<disk name='vdb' checkpoint='bitmap'/>"
        "<disk name='sda' checkpoint='no'/></disks></domaincheckpoint>"
    )
    assert (cp.name, cp.parent, cp.creation_time) == ("cp2", "cp1", 1700000000)
    assert [(d.target, d.bitmap, d.size) for d in cp.disks] == [
        ("vda", "cp2", 1048576),
        ("vdb", "cp2", None),
        ("sda", None, None),
    ]
    assert cp.bitmap_for("vdb") == "cp2"
    assert cp.bitmap_for("sda") is None
    assert cp.bitmap_for("vdz") is None


def test_parse_running_backup_xml() -> None:
    server, incremental, exports = parse_backup_xml(
        "<domainbackup mode='pull'><incremental>cp1</incremental>"
        "<server transport='tcp' name='127.0.0.1' port='10809'/><disks>"
        "<disk name='vda' backup='yes' type='file' backupmode='incremental' incremental='cp1'"
        " exportname='vda' exportbitmap='backup-vda' index='4'>"
        "<driver type='qcow2'/><scratch file='/s/a.scratch'/></disk>"
        "<disk name='sda' backup='no'/></disks></domainbackup>"
    )
    assert server == TcpServer("127.0.0.1", 10809)
    assert incremental == "cp1"
    assert len(exports) == 1
    vda = exports[0]
    assert (vda.export_name, vda.mode, vda.scratch) == ("vda", "incremental", "/s/a.scratch")
    assert vda.meta_context == "qemu:dirty-bitmap:backup-vda"


def test_parse_backup_xml_rejects_push_mode() -> None:
    with pytest.raises(VirtError, match="pull-mode"):
        parse_backup_xml("<domainbackup mode='push'><disks/></domainbackup>")


def test_nbd_uris() -> None:
    assert nbd_uri(TcpServer("10.1.2.3", 10809), "vda") == "nbd://10.1.2.3:10809/vda"
    assert nbd_uri(TcpServer("::1", 10809, tls=True), "vda") == "nbds://[::1]:10809/vda"
    assert nbd_uri(UnixServer("/run/x.sock"), "vdb") == "nbd+unix:///vdb?socket=/run/x.sock"


def test_ssh_uris() -> None:
    assert (
        ssh_uri("hv1", user="backup", port=2222, keyfile="/k/id", no_verify=True)
        == "qemu+ssh://backup@hv1:2222/system?keyfile=/k/id&no_tty=1&no_verify=1"
    )
    assert ssh_uri("hv1") == "qemu+ssh://root@hv1:22/system?no_tty=1"
    assert (
        ssh_uri("fe80::1", keyfile="/k", known_hosts="/kh", transport="libssh")
        == "qemu+libssh://root@[fe80::1]:22/system"
        "?keyfile=/k&sshauth=privkey,agent&known_hosts=/kh&known_hosts_verify=normal"
    )
    with pytest.raises(ValueError, match="known_hosts"):
        ssh_uri("hv1", known_hosts="/kh")


def test_lifecycle_decoding() -> None:
    ev = lifecycle_event("web", "u", libvirt.VIR_DOMAIN_EVENT_STOPPED, 1)
    assert (ev.event, ev.detail) == (LifecycleKind.STOPPED, "destroyed")
    assert ev.event == "stopped"
    ev = lifecycle_event("web", "u", libvirt.VIR_DOMAIN_EVENT_STARTED, 0)
    assert (ev.event, ev.detail) == (LifecycleKind.STARTED, "booted")
    ev = lifecycle_event("web", "u", libvirt.VIR_DOMAIN_EVENT_CRASHED, 99)
    assert (ev.event, ev.detail) == (LifecycleKind.CRASHED, "unknown(99)")


def test_image_info_with_bitmaps() -> None:
    info = parse_image_info(
        {
            "filename": "/vm/a.qcow2",
            "format": "qcow2",
            "virtual-size": 1073741824,
            "actual-size": 200704,
            "backing-filename": "base.qcow2",
            "full-backing-filename": "/vm/base.qcow2",
            "backing-filename-format": "qcow2",
            "format-specific": {
                "type": "qcow2",
                "data": {
                    "bitmaps": [
                        {"flags": ["auto"], "name": "cp1", "granularity": 65536},
                        {"flags": ["in-use", "auto"], "name": "cp2", "granularity": 65536},
                    ]
                },
            },
        }
    )
    assert info.backing_filename == "/vm/base.qcow2"
    assert [(b.name, b.in_use) for b in info.bitmaps] == [("cp1", False), ("cp2", True)]
    raw = parse_image_info({"filename": "r", "format": "raw", "virtual-size": 1})
    assert (raw.bitmaps, raw.backing_filename, raw.actual_size) == ((), None, None)


def libvirt_error(code: int, source: int, message: str) -> libvirt.libvirtError:
    err = libvirt.libvirtError(message)
    err.err = (code, source, message, 2, None, None, None, 0, 0)
    return err


@pytest.mark.parametrize(
    ("code", "source", "message", "expected"),
    [
        (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_FROM_QEMU, "no domain", NotFound),
        (libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT, libvirt.VIR_FROM_DOMAIN_CHECKPOINT, "x", NotFound),
        (libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_FROM_QEMU, "already running", Conflict),
        (libvirt.VIR_ERR_OPERATION_FAILED, libvirt.VIR_FROM_QEMU, "already exists", Conflict),
        (libvirt.VIR_ERR_OPERATION_FAILED, libvirt.VIR_FROM_QEMU, "disk full", VirtError),
        (
            libvirt.VIR_ERR_CHECKPOINT_INCONSISTENT,
            libvirt.VIR_FROM_QEMU,
            "missing bitmap",
            CheckpointInconsistent,
        ),
        (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_RPC, "broken pipe", Unreachable),
        (libvirt.VIR_ERR_AUTH_FAILED, libvirt.VIR_FROM_AUTH, "denied", Unreachable),
    ],
)
def test_error_translation(code: int, source: int, message: str, expected: type) -> None:
    translated = translate(libvirt_error(code, source, message))
    assert type(translated) is expected
    assert translated.code == code
    assert translated.libvirt_message == message


def test_errors_while_opening_are_unreachable() -> None:
    err = libvirt_error(libvirt.VIR_ERR_OPERATION_FAILED, libvirt.VIR_FROM_QEMU, "x")
    assert isinstance(translate(err, opening=True), Unreachable)
    assert Unreachable.retryable
    assert not Conflict.retryable
