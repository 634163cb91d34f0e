"""The remote agent (``virtbackup agent``): see ``process``."""
