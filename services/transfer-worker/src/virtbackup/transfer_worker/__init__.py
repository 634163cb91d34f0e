"""The transfer-worker service: reads and writes blocks over NBD, hashes, deduplicates,
compresses, encrypts, and talks to the destinations. Run as many as there are cores to
spare; they share the ``VB_WORK`` work queue."""
