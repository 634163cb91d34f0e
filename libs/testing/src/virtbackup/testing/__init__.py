"""Test kits and stand-ins for VirtBackup's tests and benchmark: a dev-only package.

Nothing in a production package imports this one, and no image installs it. Import the
module you need; there are no re-exports here:

- :mod:`.sshd`: a real OpenSSH sshd on loopback, as an SFTP server or as a remote
  hypervisor host (``SshdServer``, ``sshd_server``);
- :mod:`.seaweedfs`: a real SeaweedFS S3 server (``SeaweedServer``, ``seaweedfs_server``);
- :mod:`.gdrive`: ``FakeGoogleDrive``, an in-memory stand-in for Drive v3 and Google's
  OAuth token endpoint, and ``google_driver`` signed in to it;
- :mod:`.kube_stand_in`: ``KubeStandIn``, a stand-in Kubernetes API server that the Helm
  chart is installed into by Helm's engine (no Kubernetes runs here), recording what
  Helm creates; :mod:`.kube_protobuf` reads the protobuf bodies client-go sends it;
- :mod:`.drivers`: a fresh destination driver of every kind (``open_test_driver``);
- :mod:`.servers`: what the server harnesses share (``ServerError``, ``port_open``);
- :mod:`.pagecache`: ``resident_pages`` (is a file's data in the page cache?);
- :mod:`.libvirtd`: ``ensure_libvirtd`` (and usable ``/dev/kvm``);
- :mod:`.vms`: small OS-less VMs (``create_vm``, ``guest_write``, ``drop_bitmap``, ...);
- :mod:`.images`, :mod:`.nbdtools`: ``qemu-img`` and libnbd's tools, for checking results.

Free ports come from :func:`virtbackup.runtime.ports.free_port`, which the launcher
uses too.
"""

from __future__ import annotations
