"""Make (or remove) the trial's small VM with virsh: trial/make_vm.py NAME DIR [remove]."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from virtbackup.testing.vms import build_vm_xml

name, directory = sys.argv[1], Path(sys.argv[2])
if len(sys.argv) > 3:
    subprocess.run(["virsh", "destroy", name], check=False)
    subprocess.run(["virsh", "undefine", name, "--checkpoints-metadata"], check=False)
    sys.exit(0)
directory.mkdir(parents=True, exist_ok=True)
directory.chmod(0o755)
disk = directory / f"{name}-vda.qcow2"
subprocess.run(["qemu-img", "create", "-f", "qcow2", str(disk), "64M"], check=True)
xml = directory / f"{name}.xml"
xml.write_text(build_vm_xml(name, [disk]))
subprocess.run(["virsh", "define", str(xml)], check=True)
subprocess.run(["virsh", "start", name], check=True)
