"""Which token prefix is worth computing once and copying into every sequence that starts with it.

Batch jobs are usually one system prompt (plus the chat template's head) in front of many different
user messages. Computing that shared head once and copying its KV cache saves ``(rows - 1) * length``
prompt tokens; this module picks the prefix with the largest such saving among a set of prompts.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def best_shared_prefix(prompts: Sequence[Sequence[int]], *, min_tokens: int, max_tokens: int) -> list[int]:
    """The prefix maximising ``(rows sharing it - 1) * length``; empty when none reaches ``min_tokens``.

    A prefix is always at least one token shorter than every prompt that shares it: the last prompt
    token must be decoded in the row's own sequence to produce the logits its first token is sampled from.
    Sorting puts prompts that share a prefix next to each other, so the rows sharing a prefix of length
    ``h`` form a run whose neighbouring common-prefix lengths are all >= ``h``; the best prefix is then
    the largest rectangle under that histogram (one stack pass).
    """
    if len(prompts) < 2:
        return []
    ordered = sorted(prompts, key=lambda p: list(p))
    heights = [min(common_prefix_len(a, b), len(a) - 1, len(b) - 1, max_tokens) for a, b in itertools.pairwise(ordered)]
    best_saving, best_len, best_at = 0, 0, 0
    stack: list[tuple[int, int]] = []  # (start index, height), heights increasing
    for i, h in enumerate([*heights, 0]):
        start = i
        while stack and stack[-1][1] >= h:
            start, height = stack.pop()
            saving = height * (i - start)
            if height >= min_tokens and saving > best_saving:
                best_saving, best_len, best_at = saving, height, start
        stack.append((start, h))
    return list(ordered[best_at][:best_len]) if best_len else []
