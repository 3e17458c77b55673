"""The store's clock: lease and heartbeat times come from the database, never from each host.

A fleet's hosts disagree about the time; a claimant whose clock runs ahead would see a live lease as
expired and take it, and a worker whose clock runs behind would look dead to the scheduler. Every lease
and heartbeat time is therefore written and compared *inside the SQL statement* with the database's
own clock: ``statement_timestamp()`` on Postgres (one value per statement), and SQLite's ``'now'``
(the store's host: an embedded store has one machine, and the value is fixed within a statement).
"""

from __future__ import annotations

from sqlalchemy import ColumnElement, Float, cast, func, select
from sqlalchemy.orm import Session

JULIAN_UNIX_EPOCH = 2440587.5  # julianday('1970-01-01')


def now_sql(s: Session) -> ColumnElement[float]:
    """The database's current time in epoch seconds, as an expression to use in a statement."""
    if s.get_bind().dialect.name == "postgresql":
        return cast(func.extract("epoch", func.statement_timestamp()), Float)
    return cast((func.julianday("now") - JULIAN_UNIX_EPOCH) * 86400.0, Float)


def db_now(s: Session) -> float:
    """The database's current time in epoch seconds (one round trip), e.g. for a view of worker ages."""
    return float(s.scalar(select(now_sql(s))) or 0.0)
