"""Map-reduce rounds of `run --combine`: a document's answers are packed into combine requests that fit the
context, round after round, until one answer is left (the store side is covered end to end in
tests/cli/test_documents_real.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.documents import PartBudget
from tokenmill.errors import UsageError
from tokenmill.rows import SamplingParams
from tokenmill.scheduler.combine import DEFAULT_COMBINE_TEMPLATE, Reduction, _Doc


class Words:
    chat_overhead = 5

    def count(self, text: str) -> int:
        return len(text.split())


def reduce(red: Reduction, answers: list[str]) -> tuple[str, int, list[str]]:
    """Run rounds with made-up answers (a round's answer names the rows it combined); (final, rounds, prompts)."""
    doc = _Doc("a.txt", 1, answers=list(answers))
    red.docs = {"a.txt": doc}
    prompts: list[str] = []
    rounds = 0
    while red.open_docs():
        rounds += 1
        rows = red.next_rows(rounds)
        assert rows, "a round must make progress"
        made = {}
        for row in rows:
            assert row.messages is not None and row.source == "a.txt"
            prompts.append(row.messages[0]["content"])
            made[row.custom_id] = f"s{rounds}.{row.line} " * 3
        doc.answers = [made[v] if kind == "row" else v for kind, v in doc.slots]
        doc.slots = []
        assert rounds < 50
    return doc.answers[0], rounds, prompts


def test_few_answers_take_one_round_many_take_several() -> None:
    params = SamplingParams(max_tokens=6)
    budget = PartBudget(n_ctx=80, max_tokens=6, counter=Words())
    red = Reduction(DEFAULT_COMBINE_TEMPLATE, budget, params)
    _, rounds, prompts = reduce(red, ["alpha beta gamma"] * 3)
    assert rounds == 1 and len(prompts) == 1
    assert "Part 1: alpha" in prompts[0] and "Part 3: alpha" in prompts[0] and "a.txt" in prompts[0]
    _, rounds, prompts = reduce(red, [f"answer {i} " * 3 for i in range(40)])
    assert rounds >= 2
    assert all(5 + len(p.split()) + 6 <= 80 for p in prompts)


@settings(max_examples=100, deadline=None, database=None)
@given(n=st.integers(2, 60), words=st.integers(1, 6), n_ctx=st.integers(60, 300))
def test_rounds_end_with_one_answer_and_every_request_fits(n: int, words: int, n_ctx: int) -> None:
    params = SamplingParams(max_tokens=6)
    budget = PartBudget(n_ctx=n_ctx, max_tokens=6, counter=Words())
    red = Reduction("Combine for {name}: {text}", budget, params)
    final, rounds, prompts = reduce(red, [" ".join(["w"] * words) + f" {i}" for i in range(n)])
    assert final and rounds >= 1
    assert all(5 + len(p.split()) + 6 <= n_ctx for p in prompts)


def test_templates_and_room_are_checked_before_any_work() -> None:
    params = SamplingParams(max_tokens=30)
    with pytest.raises(UsageError, match="room for two answers"):
        Reduction(DEFAULT_COMBINE_TEMPLATE, PartBudget(n_ctx=64, max_tokens=30, counter=Words()), params)
    roomy = PartBudget(n_ctx=4096, max_tokens=30, counter=Words())
    with pytest.raises(UsageError, match=r"field \{part\} is not available"):
        Reduction("{part}: {text}", roomy, params)
    with pytest.raises(UsageError, match=r"must contain \{text\}"):
        Reduction("Combine {name}", roomy, params)
