"""A/B agreement: how often two variants, run on the same rows, say the same thing.

Exact match is what a pipeline that parses outputs cares about; the difflib ratio says how far apart
the rest are, and the most different rows are what a person should read before choosing a variant.
"""

from __future__ import annotations

import difflib
import heapq
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from tokenmill.store import Session
from tokenmill.store import results as store_results

PAGE = 2000
MOST_DIFFERENT = 10


@dataclass
class ABRow:
    seq: int
    custom_id: str
    a_text: str
    b_text: str
    similarity: float


class JobSide(Protocol):
    """What the comparison needs of each side's report (the report module's JobReport)."""

    @property
    def job_id(self) -> str: ...


R = TypeVar("R", bound=JobSide)


@dataclass
class ABReport(Generic[R]):
    a: R
    b: R
    compared: int
    exact: int
    mean_similarity: float
    most_different: list[ABRow]
    note: str | None = None

    @property
    def exact_rate(self) -> float:
        return self.exact / self.compared if self.compared else 0.0


def response_text(body: dict[str, Any] | None) -> str:
    """The generated text of a chat or completions body; empty when the shape is unexpected."""
    try:
        choice = (body or {})["choices"][0]
    except (KeyError, IndexError, TypeError):
        return ""
    if not isinstance(choice, dict):
        return ""
    message = choice.get("message")
    text = message.get("content") if isinstance(message, dict) else choice.get("text")
    return text if isinstance(text, str) else ""


def _succeeded_texts(s: Session, job_id: str, lo: int, hi: int) -> dict[int, str]:
    return {seq: response_text(body) for seq, body in store_results.succeeded_bodies(s, job_id, lo, hi)}


def compare_outputs(s: Session, a: R, b: R, *, limit: int = MOST_DIFFERENT) -> ABReport[R]:
    """Agreement of two jobs' outputs over rows (same seq) that both answered."""
    compared = exact = 0
    similarity = 0.0
    worst: list[tuple[float, int, ABRow]] = []
    for page in store_results.succeeded_pages(s, a.job_id, page=PAGE):
        last = page[-1].seq
        others = _succeeded_texts(s, b.job_id, page[0].seq, last)
        for seq, custom_id, body in page:
            if seq not in others:
                continue
            ta, tb = response_text(body), others[seq]
            compared += 1
            if ta == tb:
                exact += 1
                similarity += 1.0
                continue
            ratio = difflib.SequenceMatcher(None, ta, tb).ratio()
            similarity += ratio
            item = (-ratio, -seq, ABRow(seq, custom_id, ta, tb, ratio))
            if len(worst) < limit:
                heapq.heappush(worst, item)
            elif item > worst[0]:
                heapq.heapreplace(worst, item)
    most_different = sorted((row for _, _, row in worst), key=lambda r: (r.similarity, r.seq))
    note = None if compared else "no row succeeded in both jobs yet, so outputs cannot be compared"
    return ABReport(a, b, compared, exact, similarity / compared if compared else 0.0, most_different, note)
