"""What a store error may put in a log line: never a value from the row it was writing."""

from __future__ import annotations

import io
import logging

import pytest
from sqlalchemy import insert
from sqlalchemy.exc import IntegrityError

from tokenmill.config import MaskingFilter
from tokenmill.store import Store
from tokenmill.store.db import log_reason
from tokenmill.store.tables import Result

SECRET = "tenant-prompt-7c1e-never-logged"


def test_a_failing_insert_logs_no_value_it_carried(any_store: Store) -> None:
    with pytest.raises(IntegrityError) as info, any_store.session() as s:  # NOT NULL: status
        s.execute(insert(Result).values(job_id="j", seq=0, custom_id=SECRET, status=None, body={"text": SECRET},
                                        created_at=0.0))  # fmt: skip
    exc = info.value
    assert "parameters hidden" in str(exc)  # the engine's part; Postgres's own DETAIL still quotes the row
    reason = log_reason(exc)
    assert SECRET not in reason and reason.startswith("IntegrityError")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(MaskingFilter())
    log = logging.getLogger("tokenmill.test.db")
    log.addHandler(handler)
    try:  # the whole exception and its traceback; Postgres's own text quotes the failing row
        log.error("storing failed: %s", exc, exc_info=exc)
    finally:
        log.removeHandler(handler)
    assert "IntegrityError" in stream.getvalue() and SECRET not in stream.getvalue()
