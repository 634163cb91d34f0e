"""The all-in-one launcher (``virtbackup up``)."""
