"""The inventory service: hypervisor servers, libvirt connections, the VM cache, VM actions,
checkpoints and pull-mode backup jobs."""
