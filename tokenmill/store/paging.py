"""Keyset paging: the one way the store reads a million rows without holding them.

``WHERE key > last ORDER BY key LIMIT n`` costs the same on the last page as on the first (OFFSET
does not), and rows written meanwhile after ``last`` are still seen. Every paged read goes through
:func:`keyset_pages`, with an open session (one transaction, a consistent report) or with the
:class:`~tokenmill.store.db.Store` itself (a short session per page, so the caller may write between
pages without holding a read transaction open).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVarTuple, Unpack

from sqlalchemy import Connection, Row, Select
from sqlalchemy.orm import InstrumentedAttribute, Session

from tokenmill.store.db import Store

Ts = TypeVarTuple("Ts")


def keyset_pages(
    reader: Session | Connection | Store,
    stmt: Select[Unpack[Ts]],
    key: InstrumentedAttribute[int],
    *,
    size: int,
    key_of: Callable[[Row[Unpack[Ts]]], int] | None = None,
    after: int = -1,
) -> Iterator[list[Row[Unpack[Ts]]]]:
    """Pages of ``stmt``'s rows in ``key`` order, ``size`` at a time.

    ``key_of`` reads the key from a row; by default the row's attribute named after ``key``, so select
    the key column (or pass e.g. ``lambda r: r[0].seq`` when selecting whole entities). A session's
    ``connection()`` reads plain columns without the ORM's per-row result layer (a bulk export's choice).
    """
    name = key.key
    position = key_of or (lambda row: int(getattr(row, name)))
    last = after
    while True:
        page_stmt = stmt.where(key > last).order_by(key).limit(size)
        if isinstance(reader, Store):
            with reader.session() as s:
                rows = list(s.execute(page_stmt).all())
        else:
            rows = list(reader.execute(page_stmt).all())
        if not rows:
            return
        yield rows
        last = position(rows[-1])
