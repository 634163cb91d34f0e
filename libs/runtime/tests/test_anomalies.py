"""The pure parts of ``runtime.anomalies``: a domain XML's definition, drift, the size rule."""

from __future__ import annotations

import pytest

from virtbackup.runtime import anomalies

XML = """<domain type='kvm'>
  <name>web1</name>
  <memory unit='KiB'>1048576</memory>
  <vcpu placement='static'>2</vcpu>
  <os firmware='efi'><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/web1.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'><target dev='sda' bus='sata'/></disk>
    <interface type='network'><mac address='52:54:00:aa:bb:cc'/></interface>
  </devices>
</domain>"""


def test_a_domain_xml_is_summarized() -> None:
    d = anomalies.summarize(XML)
    assert [(x.target, x.format, x.device) for x in d.disks] == [
        ("sda", "", "cdrom"),
        ("vda", "qcow2", "disk"),
    ]
    assert (d.memory_kib, d.vcpus, d.firmware, d.nics) == (1048576, 2, "efi", ["52:54:00:aa:bb:cc"])
    with pytest.raises(ValueError, match="not XML"):
        anomalies.summarize("<domain")
    with pytest.raises(ValueError, match="root element <network>"):
        anomalies.summarize("<network/>")


def test_drift_names_each_change() -> None:
    old = anomalies.with_sizes(anomalies.summarize(XML), {"vda": 8 << 30})
    assert anomalies.drift(old, old) == []
    more = XML.replace(
        "<interface",
        "<disk type='file' device='disk'><driver type='raw'/><target dev='vdb'/></disk><interface",
    ).replace("<vcpu placement='static'>2", "<vcpu placement='static'>4")
    new = anomalies.with_sizes(anomalies.summarize(more), {"vda": 16 << 30, "vdb": 1 << 30})
    assert anomalies.drift(old, new) == [
        "disk vdb added (1.00 GiB)",
        "disk vda resized from 8.00 GiB to 16.00 GiB",
        "vCPUs changed from 2 to 4",
    ]
    assert anomalies.drift(new, old)[0] == "disk vdb removed"
    # A size nobody knows (0) is no change.
    assert anomalies.drift(anomalies.summarize(XML), old) == []


def test_the_size_rule() -> None:
    mib = 1 << 20
    history = [100 * mib, 104 * mib, 98 * mib]
    assert anomalies.size_verdict(45 * mib, history) == ("smaller", 100 * mib)
    assert anomalies.size_verdict(201 * mib, history) == ("larger", 100 * mib)
    assert anomalies.size_verdict(51 * mib, history) is None
    assert anomalies.size_verdict(199 * mib, history) is None
    # Too little history, and only the last five count.
    assert anomalies.size_verdict(1, history[:2]) is None
    assert anomalies.size_verdict(45 * mib, [10 * mib] * 10 + history * 2) == (
        "smaller",
        100 * mib,
    )
