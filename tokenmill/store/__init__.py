"""The SQL store: the single source of truth for jobs, rows, chunks, leases, results and workers.

All SQL, and every write of a state, lives in this package. Other packages get a transaction from
:meth:`Store.session` and pass it to the functions here; ``Session`` is re-exported for their type hints.
"""

from sqlalchemy.orm import Session

from tokenmill.store.db import DB_ERRORS, Store

__all__ = ["DB_ERRORS", "Session", "Store"]
