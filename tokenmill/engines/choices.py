"""``n > 1``: one row asking for several choices runs as n sibling sequences, merged when all finish.

Siblings are queued next to each other with identical prompts. The engine evaluates the prompt once, in
the first sibling's stream, and copies that KV into each later sibling (see ``LlamaEngine``); each has its
own sampler seeded ``seed + i`` (OpenAI's n choices are independent samples). The merged
:class:`Generation` counts the prompt once and the completion tokens of every choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from tokenmill.engine import Generation, OnDone
from tokenmill.rows import DatasetRow


class ChoiceMerger:
    """Expands rows with ``params.n > 1`` into siblings and reports the parent once, when all are done."""

    def __init__(self, on_done: OnDone) -> None:
        self._on_done = on_done
        self._parent: dict[int, tuple[DatasetRow, int]] = {}
        self._leader: dict[int, DatasetRow] = {}
        self._results: dict[str, list[Generation | Exception | None]] = {}

    def expand(self, rows: Sequence[DatasetRow]) -> list[DatasetRow]:
        """The sequences to run for ``rows``: each row itself, or its n siblings next to each other."""
        out: list[DatasetRow] = []
        for row in rows:
            n = row.params.n
            if n <= 1:
                out.append(row)
                continue
            self._results[row.custom_id] = [None] * n
            first: DatasetRow | None = None
            for i in range(n):
                seed = None if row.params.seed is None else row.params.seed + i
                child = replace(row, params=replace(row.params, n=1, seed=seed))
                self._parent[id(child)] = (row, i)
                if first is None:
                    first = child
                else:
                    self._leader[id(child)] = first
                out.append(child)
        return out

    def leader(self, row: DatasetRow) -> DatasetRow | None:
        """The first sibling of ``row`` when it is a later choice of an n > 1 row (its prompt KV source)."""
        return self._leader.get(id(row))

    def done(self, row: DatasetRow, result: Generation | Exception) -> None:
        parent = self._parent.pop(id(row), None)
        self._leader.pop(id(row), None)
        if parent is None:
            self._on_done(row, result)
            return
        owner, index = parent
        slots = self._results[owner.custom_id]
        slots[index] = result
        if any(slot is None for slot in slots):
            return
        del self._results[owner.custom_id]
        failed = next((slot for slot in slots if isinstance(slot, Exception)), None)
        self._on_done(owner, failed if failed is not None else merge([s for s in slots if isinstance(s, Generation)]))


def merge(choices: list[Generation]) -> Generation:
    """Choice 0's timings and text, the prompt counted once, completion tokens summed over the choices."""
    first = choices[0]
    return replace(
        first,
        completion_tokens=sum(c.completion_tokens for c in choices),
        total_ms=max(c.total_ms for c in choices),
        choices=choices,
    )
