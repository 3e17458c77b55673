"""Measured decode rates, read back for `tokenmill workers` beside each worker's predicted rate."""

from __future__ import annotations

from sqlalchemy import Float, func, select
from sqlalchemy.orm import Session

from tokenmill.store.tables import Result


def decode_rates(s: Session) -> dict[str, float]:
    """Per worker: generated tokens per second of decoding, per sequence (its rows' tokens over their eval time)."""
    eval_ms = func.coalesce(Result.timings["eval_ms"].as_float(), 0.0).cast(Float)
    rows = s.execute(
        select(Result.worker_id, func.sum(Result.completion_tokens), func.sum(eval_ms))
        .where(Result.status == "succeeded", Result.cached.is_(False), Result.worker_id.is_not(None))
        .group_by(Result.worker_id)
    ).all()
    return {str(w): float(tokens) / (float(ms) / 1000.0) for w, tokens, ms in rows if ms and tokens}
