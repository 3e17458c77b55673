"""The batched engine's decode step: lay the batch out, decode, choose every row's next token, move on.

What a step costs the host is paid per step where llama.cpp allows it, not per sequence: the batch is
written as whole numpy slices (:mod:`.llama_batch`), every output's logits are one
``[n_outputs, n_vocab]`` block read once, and the rows whose choice is a plain greedy pick (temperature
0, no penalties, bias, grammar, schema or logprobs) take one vectorised argmax over that block, which is
what llama.cpp's greedy sampler computes (the first of equal maxima). Rows with a sampler chain keep
their own chain, so seeded sampling gives exactly the tokens it gave before. Per token only the piece
lookup, the stop-string check and a timestamp remain (:class:`.llama_seq.Seq`).

A :class:`Stepper` lives for one ``generate`` call and reads ``llama_cpp`` from the engine then, so a
test can wrap the module (the engine's ``_L``) around a run.
"""

from __future__ import annotations

import ctypes
import time
from typing import Any

import numpy as np

from tokenmill.engine import Generation, OnDone, SlotUse
from tokenmill.engines.llama_batch import NumpyBatch
from tokenmill.engines.llama_seq import Seq, TokenTable
from tokenmill.errors import RowTimeLimit

Pick = int | Exception


class Stepper:
    def __init__(
        self,
        llama_cpp: Any,
        ctx: Any,
        mem: Any,
        batch: NumpyBatch,
        tokens: TokenTable,
        use: SlotUse,
        *,
        n_vocab: int,
        row_time_limit: float | None,
    ) -> None:
        self._L, self._ctx, self._mem = llama_cpp, ctx, mem
        self._batch, self._tokens, self._use = batch, tokens, use
        self._n_vocab = n_vocab
        self._limit = row_time_limit
        self._views: dict[tuple[int, int], np.ndarray] = {}

    def step(self, active: list[Seq], slots: list[Seq | None], live: dict[int, Seq], on_done: OnDone) -> None:
        """One decode of every row in flight (``active``, in seq_id order), then each row's next token;
        finished rows leave their slot and are reported."""
        outs = self._layout(active)
        started = time.perf_counter()
        rc = self._L.llama_decode(self._ctx, self._batch.batch)
        decoded = time.perf_counter()
        use = self._use
        use.decode_s += decoded - started
        if rc != 0:
            n = self._batch.batch.n_tokens
            raise RuntimeError(f"llama_decode failed with status {rc} on a batch of {n} tokens")
        use.steps, use.filled, use.slots = use.steps + 1, use.filled + len(active), use.slots + len(slots)
        for seq in active:
            seq.n_past += seq.n_fed
            del seq.feed[: seq.n_fed]
        self.attach_followers(active)
        picks = self._pick(outs)
        now = time.perf_counter()
        use.picked += len(outs)
        for seq, token in zip(outs, picks, strict=True):
            if not seq.n_generated:
                seq.prompt_eval_ms = (decoded - seq.admitted) * 1000.0
            result = self._advance(seq, token, now)
            if result is not None:
                slots[seq.seq_id] = None
                live.pop(id(seq.row), None)
                self.release(seq)
                on_done(seq.row, result)

    def _advance(self, seq: Seq, token: Pick, now: float) -> Generation | Exception | None:
        """The row's result once this token ends it (or its sampling failed), else None."""
        if isinstance(token, Exception):
            return token
        tokens = self._tokens
        if tokens.is_eog(token):
            return seq.finish("stop", now, tokens)
        reason = seq.take(token, tokens.piece(token), now)
        if reason is not None:
            return seq.finish(reason, now, tokens)
        if self._limit is not None and now - seq.admitted > self._limit:
            return RowTimeLimit(
                f"the row ran {now - seq.admitted:.1f}s, past the per-row limit of {self._limit:g}s "
                "(TOKENMILL_ROW_TIME_LIMIT)"
            )
        return None

    def _layout(self, active: list[Seq]) -> list[Seq]:
        """Place the next token of every generating row, then prompt chunks up to the batch's room; the
        rows that get logits, in output order.

        Tokens are laid out by ascending seq_id with each sequence's tokens together: with split KV
        streams llama.cpp cuts a batch into ubatches of consecutive seq_ids, so this order lets all
        generating rows share one forward pass. Prompts are fed oldest admission first.
        """
        budget = self._batch.n_max
        prompting = []
        for seq in active:
            seq.n_fed = 1 if seq.n_generated else 0
            budget -= seq.n_fed
            if not seq.n_generated:
                prompting.append(seq)
        for seq in sorted(prompting, key=lambda s: s.admitted):
            seq.n_fed = min(len(seq.feed), budget)
            budget -= seq.n_fed
        tokens: list[int] = []
        pos: list[int] = []
        ids: list[int] = []
        marks: list[int] = []
        outs: list[Seq] = []
        for seq in active:
            k = seq.n_fed
            seq.out_idx = -1
            if k == 1:
                tokens.append(seq.feed[0])
                pos.append(seq.n_past)
                ids.append(seq.seq_id)
            elif k:
                tokens += seq.feed[:k]
                pos += range(seq.n_past, seq.n_past + k)
                ids += [seq.seq_id] * k
            if k and k == len(seq.feed):
                seq.out_idx = len(tokens) - 1
                marks.append(seq.out_idx)
                outs.append(seq)
        self._batch.fill(tokens, pos, ids, marks)
        return outs

    def _pick(self, outs: list[Seq]) -> list[Pick]:
        """Every output's next token: greedy rows from one argmax over the logits block, others by their chain."""
        picks: list[Pick] = [0] * len(outs)
        best: list[int] | None = None
        for j, seq in enumerate(outs):
            sampler = seq.sampler
            assert sampler is not None
            if sampler.greedy:
                if best is None:
                    best = self.logits(len(outs)).argmax(axis=1).tolist()
                picks[j] = best[j]
                continue
            try:
                picks[j] = sampler.sample(self._ctx, seq.out_idx)
            except Exception as exc:  # this row's sampling failed: the row fails alone
                picks[j] = exc
        return picks

    def logits(self, n_outputs: int) -> np.ndarray:
        """The last decode's logits, one row per output in batch order (a view of llama.cpp's buffer).

        Views are kept by (address, rows): llama.cpp keeps its logits buffer until a batch needs more
        outputs than it holds, and making a view costs tens of microseconds, several tokens' worth.
        """
        ptr = self._L.llama_get_logits(self._ctx)
        key = (ctypes.addressof(ptr.contents), n_outputs)
        view = self._views.get(key)
        if view is None:
            view = self._views[key] = np.ctypeslib.as_array(ptr, shape=(n_outputs, self._n_vocab))
        return view

    def attach_followers(self, active: list[Seq]) -> None:
        """Give each waiting n > 1 sibling its leader's prompt KV, once the leader has evaluated it.

        Done right after the decode that finished the leader's prompt and before the leader can be
        released: the follower copies the stream, cuts it back to all but the last prompt token, and
        decodes that one token itself next step, for logits of its own to sample from.
        """
        L = self._L
        for seq in active:
            leader = seq.follows
            if leader is None or leader.n_past < len(leader.prompt):
                continue
            keep = len(seq.prompt) - 1
            L.llama_memory_seq_cp(self._mem, leader.seq_id, seq.seq_id, -1, -1)
            L.llama_memory_seq_rm(self._mem, seq.seq_id, keep, -1)
            seq.n_past = seq.cached = keep
            seq.feed = [seq.prompt[-1]]
            seq.follows = None

    def compact(self, slots: list[Seq | None]) -> None:
        """Move the highest rows into free lower slots so in-flight seq_ids stay contiguous.

        With one KV stream per sequence llama.cpp only batches consecutive seq_ids into one forward pass;
        a gap (a finished row with nothing left to admit) would split every later step in two. Moving a row
        is one KV-stream copy, paid once, against a slower forward pass on every remaining step.
        """
        L = self._L
        while True:
            free = [i for i, s in enumerate(slots) if s is None]
            busy = [i for i, s in enumerate(slots) if s is not None]
            if not free or not busy or free[0] > busy[-1]:
                return
            lo, hi = free[0], busy[-1]
            seq = slots[hi]
            assert seq is not None
            L.llama_memory_seq_cp(self._mem, hi, lo, -1, -1)
            L.llama_memory_seq_rm(self._mem, hi, -1, -1)
            seq.seq_id, slots[lo], slots[hi] = lo, seq, None

    def release(self, seq: Seq) -> None:
        self._L.llama_memory_seq_rm(self._mem, seq.seq_id, -1, -1)
        if seq.sampler is not None:
            seq.sampler.free()
            seq.sampler = None
