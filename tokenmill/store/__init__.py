"""The SQL store: the single source of truth for jobs, rows, chunks, leases, results and workers."""

from tokenmill.store.db import Store

__all__ = ["Store"]
