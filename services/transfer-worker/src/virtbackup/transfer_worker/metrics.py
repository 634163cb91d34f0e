"""The transfer worker's Prometheus metrics (served by ``runtime.metrics``): bytes of the
data path, counted by the worker that moved them (sum over workers for the fleet)."""

from __future__ import annotations

from prometheus_client import Counter

from virtbackup.contracts.v1.work import UnitResult

#: Bytes read from VM disks by backup units (only the ranges read of a chunk read in part).
BYTES_READ = Counter("virtbackup_backup_read_bytes_total", "Bytes read from VM disks by backups")
#: Bytes written to destinations by backup units (compressed, encrypted chunks).
BYTES_STORED = Counter(
    "virtbackup_backup_stored_bytes_total", "Bytes of new chunks written to destinations"
)
#: Bytes of chunks a backup did not write because the destination already had them.
BYTES_DEDUPLICATED = Counter(
    "virtbackup_backup_deduplicated_bytes_total",
    "Bytes of chunks not written because the destination already held them",
)
#: Units finished, by kind (``backup``, ``restore``, ``verify``) and outcome.
UNITS = Counter(
    "virtbackup_transfer_units_total",
    "Transfer units finished, by kind and outcome",
    ["kind", "outcome"],
)


def unit_done(result: UnitResult) -> None:
    """Count a finished unit (its deduplicated bytes are counted as they happen)."""
    UNITS.labels(result.kind, "ok" if result.ok else "failed").inc()
    if result.kind == "backup":
        BYTES_READ.inc(result.bytes_read)
        BYTES_STORED.inc(result.bytes_written)
