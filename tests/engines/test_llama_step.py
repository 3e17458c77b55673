"""The batched decode step on the real SmolLM2 model: batch-wide picks that choose what the chains chose."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tokenmill.engine import Generation, SlotUse
from tokenmill.engines.llama import LlamaEngine
from tokenmill.engines.llama_batch import NumpyBatch
from tokenmill.engines.llama_step import Stepper
from tokenmill.rows import CHAT, DatasetRow, SamplingParams

pytestmark = pytest.mark.model


def chat(cid: str, text: str, **params: Any) -> DatasetRow:
    messages = ({"role": "user", "content": text},)
    return DatasetRow(line=0, custom_id=cid, endpoint=CHAT, messages=messages, params=SamplingParams(**params))


def run(engine: LlamaEngine, rows: list[DatasetRow]) -> dict[str, Generation]:
    results: dict[str, Generation] = {}

    def on_done(row: DatasetRow, result: Generation | Exception) -> None:
        assert isinstance(result, Generation), f"{row.custom_id}: {result!r}"
        results[row.custom_id] = result

    engine.generate(rows, on_done, lambda: False)
    return results


@pytest.fixture(scope="module")
def engine(smollm2_path: Path) -> Iterator[LlamaEngine]:
    eng = LlamaEngine(smollm2_path, "Q4_1", n_ctx_per_seq=512, n_seq=4, n_threads=2)
    yield eng
    eng.close()


class _CountingSamples:
    """Wraps the llama_cpp module an engine uses, counting calls into a row's sampler chain."""

    def __init__(self, module: Any) -> None:
        self._module = module
        self.samples = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)

    def llama_sampler_sample(self, chain: Any, ctx: Any, idx: int) -> int:
        self.samples += 1
        return int(self._module.llama_sampler_sample(chain, ctx, idx))


# Five rows through four slots, greedy and seeded rows interleaved, so outputs sit at every position of
# the logits block and a row is admitted (a prompt chunk beside generating rows) mid-run.
MIXED = [
    chat("greedy-rivers", "Write a haiku about rivers.", temperature=0, max_tokens=24),
    chat("seeded-dragon", "Tell me a very short story about a dragon.", temperature=0.8, seed=5, max_tokens=24),
    chat("greedy-math", "What is 2+2?", temperature=0, max_tokens=24),
    chat("seeded-topk", "Name three colors.", temperature=0.7, top_k=20, top_p=0.9, seed=9, max_tokens=24),
    chat("greedy-photo", "Explain photosynthesis to a child.", temperature=0, max_tokens=24),
]


def _picks(results: dict[str, Generation], cids: list[str]) -> int:
    """Tokens chosen for these rows: every completion token, plus the end token of rows that met it
    (no row here has stop strings, so "stop" means the end token)."""
    return sum(results[c].completion_tokens + (results[c].finish_reason == "stop") for c in cids)


def test_greedy_rows_skip_their_chains_and_every_row_keeps_the_tokens_it_gets_alone(engine: LlamaEngine) -> None:
    spy = _CountingSamples(engine._L)
    engine._L = spy
    try:
        together = run(engine, MIXED)
    finally:
        engine._L = spy._module
    seeded = [r.custom_id for r in MIXED if r.params.temperature > 0]
    assert spy.samples == _picks(together, seeded) > 0  # greedy rows never reached llama_sampler_sample
    for row in MIXED:
        alone = run(engine, [row])[row.custom_id]
        assert (together[row.custom_id].text, together[row.custom_id].completion_tokens) == (
            alone.text,
            alone.completion_tokens,
        ), row.custom_id


def test_slot_use_counts_decode_time_and_the_hosts_share_per_token(engine: LlamaEngine) -> None:
    before = SlotUse(**vars(engine.slot_use))
    results = run(engine, MIXED[:3])
    use = engine.slot_use.since(before)
    assert use.picked == _picks(results, list(results))
    assert 0 < use.decode_s < use.loop_s
    assert use.host_us_per_token == pytest.approx((use.loop_s - use.decode_s) / use.picked * 1e6)
    assert use.steps >= max(r.completion_tokens for r in results.values())


def test_the_logits_block_holds_each_output_in_batch_order(engine: LlamaEngine) -> None:
    L = engine._L
    prompts = [engine.tokenize(t) for t in ("The capital of France is", "1, 2, 3,", "def fibonacci(n):")]
    batch = NumpyBatch(L, 64)
    n, outputs = 0, []
    for seq_id, tokens in enumerate(prompts):
        n = batch.put(n, tokens, 0, seq_id)
        batch.logits[n - 1] = 1
        outputs.append(n - 1)
    assert L.llama_decode(engine._ctx, batch.ready(n)) == 0
    try:
        stepper = Stepper(
            L, engine._ctx, engine._mem, batch, engine._tokens, SlotUse(), n_vocab=engine._n_vocab, row_time_limit=None
        )
        block = stepper.logits(len(outputs)).copy()
        for j, idx in enumerate(outputs):
            own = np.ctypeslib.as_array(L.llama_get_logits_ith(engine._ctx, idx), shape=(engine._n_vocab,))
            assert np.array_equal(block[j], own), j
        assert len({int(row.argmax()) for row in block}) > 1  # three prompts, not one row three times
    finally:
        for seq_id in range(len(prompts)):
            L.llama_memory_seq_rm(engine._mem, seq_id, -1, -1)


# At temperature 0 these leave the pick to llama.cpp's greedy sampler alone; the others change it. A new
# SamplingParams field fails the test below until it is put in one of the two (and, if it changes the
# pick, RowSampler.greedy learns of it): otherwise the batch argmax would silently ignore it.
PICK_UNCHANGED: dict[str, Any] = {
    "max_tokens": 7,
    "top_p": 0.5,
    "stop": ("x",),
    "seed": 3,
    "top_k": 5,
    "min_p": 0.1,
    "n": 2,
}
PICK_CHANGED: dict[str, Any] = {
    "temperature": 0.5,
    "presence_penalty": 0.5,
    "frequency_penalty": 0.5,
    "repetition_penalty": 1.2,
    "logit_bias": ((5, 1.0),),
    "logprobs": 2,
    "grammar": 'root ::= "a"',
    "json_schema": '{"type":"object"}',
    # a row offering tools decodes under the call grammar's mask (choice "auto": text or a call)
    "tools": '{"tools":[{"name":"f","parameters":{"type":"object"},"description":null,"strict":false}],'
    '"choice":"auto","name":null,"parallel":true,"max_calls":null}',
}


def test_only_rows_whose_chain_is_a_plain_greedy_pick_take_the_batch_argmax(engine: LlamaEngine) -> None:
    assert {f.name for f in fields(SamplingParams)} == set(PICK_UNCHANGED) | set(PICK_CHANGED)
    tokens = engine.tokenize("Hello there")
    for name, value in {**PICK_UNCHANGED, **PICK_CHANGED}.items():
        row = chat(name, "Hello there", **{"temperature": 0, name: value})
        seq = engine._start(0, row, tokens)
        try:
            assert seq.sampler is not None
            assert seq.sampler.greedy == (name in PICK_UNCHANGED), name
        finally:
            engine._L.llama_memory_seq_rm(engine._mem, 0, -1, -1)
            if seq.sampler is not None:
                seq.sampler.free()
