"""A ``llama_batch`` over numpy arrays: filled with a few slice assignments a step, not ctypes stores per token.

``llama_batch_init`` allocates the arrays in C and gives every token its own ``seq_id`` array, so filling
it from Python costs five ctypes stores per token (one through a pointer to a pointer). Here numpy owns
the arrays, every token belongs to exactly one sequence (``n_seq_id`` is 1 throughout), and the
``seq_id`` pointers are set once to consecutive cells of one int32 array: a step writes tokens,
positions, sequence ids and output flags as whole slices. llama.cpp never frees this batch; the arrays
live as long as the object.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np


class NumpyBatch:
    """Room for ``n_max`` tokens; :attr:`batch` is what ``llama_decode``/``llama_encode`` take."""

    def __init__(self, llama_cpp: Any, n_max: int) -> None:
        L = llama_cpp
        self.n_max = n_max
        self.token = np.zeros(n_max, dtype=np.int32)
        self.pos = np.zeros(n_max, dtype=np.int32)
        self.seq = np.zeros(n_max, dtype=np.int32)
        self.logits = np.zeros(n_max, dtype=np.int8)
        self.ramp = np.arange(n_max, dtype=np.int32)
        self._n_seq_id = np.ones(n_max, dtype=np.int32)
        base, stride = self.seq.ctypes.data, self.seq.itemsize
        self._seq_ptrs = (ctypes.POINTER(ctypes.c_int32) * n_max)(
            *(ctypes.cast(base + i * stride, ctypes.POINTER(ctypes.c_int32)) for i in range(n_max))
        )
        batch = L.llama_batch()
        batch.token = self.token.ctypes.data_as(ctypes.POINTER(L.llama_token))
        batch.embd = None
        batch.pos = self.pos.ctypes.data_as(ctypes.POINTER(L.llama_pos))
        batch.n_seq_id = self._n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        batch.seq_id = ctypes.cast(self._seq_ptrs, ctypes.POINTER(ctypes.POINTER(L.llama_seq_id)))
        batch.logits = self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        self.batch = batch

    def put(self, start: int, tokens: Any, pos0: int, seq_id: int, *, outputs: bool = False) -> int:
        """Place a run of one sequence's ``tokens`` at ``start``, positions from ``pos0``; the index after it."""
        end = start + len(tokens)
        self.token[start:end] = tokens
        self.pos[start:end] = self.ramp[: end - start] + pos0
        self.seq[start:end] = seq_id
        self.logits[start:end] = outputs
        return end

    def fill(self, tokens: list[int], pos: list[int], seq: list[int], outputs: list[int]) -> Any:
        """The whole batch from per-token lists; logits only at the ``outputs`` indices. Ready to decode."""
        n = len(tokens)
        self.token[:n] = tokens
        self.pos[:n] = pos
        self.seq[:n] = seq
        self.logits[:n] = 0
        self.logits[outputs] = 1
        return self.ready(n)

    def ready(self, n_tokens: int) -> Any:
        """The batch holding its first ``n_tokens``, ready to decode."""
        self.batch.n_tokens = n_tokens
        return self.batch
