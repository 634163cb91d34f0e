"""libvirt helpers."""
