"""The llama.cpp engine against the real SmolLM2 model: same answers as llama-cpp-python, but batched."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tokenmill.engine import Generation
from tokenmill.engines.llama import LlamaEngine
from tokenmill.engines.llama_guard import plain_llama
from tokenmill.engines.prefix import best_shared_prefix
from tokenmill.engines.sampling import TextAccumulator
from tokenmill.errors import RequestTooLong, RowTimeLimit
from tokenmill.rows import CHAT, COMPLETIONS, DatasetRow, SamplingParams

pytestmark = pytest.mark.model

N_CTX = 512
THREADS = 2
SYSTEM = (
    "You are a meticulous assistant for a logistics company. Answer in plain English, be brief, "
    "never invent shipment numbers, and say so when you do not know something."
)


def chat(cid: str, text: str, *, system: str | None = None, **params: Any) -> DatasetRow:
    messages: tuple[dict[str, str], ...] = ({"role": "system", "content": system},) if system else ()
    messages += ({"role": "user", "content": text},)
    return DatasetRow(line=0, custom_id=cid, endpoint=CHAT, messages=messages, params=SamplingParams(**params))


def completion(cid: str, prompt: str, **params: Any) -> DatasetRow:
    return DatasetRow(line=0, custom_id=cid, endpoint=COMPLETIONS, prompt=prompt, params=SamplingParams(**params))


def run(
    engine: LlamaEngine,
    rows: Sequence[DatasetRow],
    should_stop: Callable[[], bool] = lambda: False,
    order: list[str] | None = None,
) -> tuple[dict[str, Generation | Exception], list[str]]:
    """Results by custom_id plus the order rows were reported in; a row reported twice fails the test."""
    results: dict[str, Generation | Exception] = {}
    order = [] if order is None else order

    def on_done(row: DatasetRow, result: Generation | Exception) -> None:
        assert row.custom_id not in results, f"{row.custom_id} reported twice"
        results[row.custom_id] = result
        order.append(row.custom_id)

    engine.generate(rows, on_done, should_stop)
    return results, order


def ok(result: Generation | Exception) -> Generation:
    assert isinstance(result, Generation), f"expected a generation, got {result!r}"
    return result


@pytest.fixture(scope="module")
def engine(smollm2_path: Path) -> Iterator[LlamaEngine]:
    eng = LlamaEngine(smollm2_path, "Q4_1", n_ctx_per_seq=N_CTX, n_seq=4, n_threads=THREADS)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def llm(smollm2_path: Path) -> Any:
    """The plain llama-cpp-python path the engine must agree with (same attention kernel as the engine)."""
    model = plain_llama(str(smollm2_path), n_ctx=N_CTX, n_threads=THREADS, flash_attn=True, verbose=False)
    yield model
    model.close()


def reference(llm: Any, row: DatasetRow) -> tuple[str, str, int, int]:
    """(text, finish_reason, prompt_tokens, completion_tokens) from create_chat_completion/create_completion."""
    p = row.params
    kwargs = {"temperature": p.temperature, "max_tokens": p.max_tokens, "stop": list(p.stop), "seed": p.seed}
    if row.endpoint == CHAT:
        res = llm.create_chat_completion(list(row.messages or ()), **kwargs)
        text = res["choices"][0]["message"]["content"]
    else:
        res = llm.create_completion(row.prompt, **kwargs)
        text = res["choices"][0]["text"]
    usage = res["usage"]
    return text, res["choices"][0]["finish_reason"], usage["prompt_tokens"], usage["completion_tokens"]


GREEDY_ROWS = [
    chat("chat-haiku", "Write a haiku about rivers.", temperature=0, max_tokens=40),
    chat("chat-math", "What is 2+2?", temperature=0, max_tokens=40),
    chat("chat-photo", "Explain photosynthesis in two sentences for a child.", temperature=0, max_tokens=48),
    chat("chat-sys", "Where is my parcel?", system=SYSTEM, temperature=0, max_tokens=32),
    chat("chat-fr", "Translate 'good morning, how are you today?' to French.", temperature=0, max_tokens=24),
    completion("cmp-paris", "The capital of France is", temperature=0, max_tokens=32),
    completion("cmp-fib", "def fibonacci(n):", temperature=0, max_tokens=40),
    completion("cmp-story", "Once upon a time, in a small village by the sea, there", temperature=0, max_tokens=20),
]


def test_greedy_output_matches_llama_cpp_python_one_at_a_time(engine: LlamaEngine, llm: Any) -> None:
    results, _ = run(engine, GREEDY_ROWS)
    assert sorted(results) == sorted(r.custom_id for r in GREEDY_ROWS)
    for row in GREEDY_ROWS:
        gen = ok(results[row.custom_id])
        text, finish, prompt_tokens, completion_tokens = reference(llm, row)
        assert (gen.text, gen.finish_reason) == (text, finish), row.custom_id
        assert (gen.prompt_tokens, gen.completion_tokens) == (prompt_tokens, completion_tokens), row.custom_id
    assert {ok(results[r.custom_id]).finish_reason for r in GREEDY_ROWS} == {"stop", "length"}


def test_greedy_output_matches_default_llama_without_flash_attention(smollm2_path: Path) -> None:
    rows = [GREEDY_ROWS[0], GREEDY_ROWS[6]]
    with LlamaEngine(smollm2_path, "Q4_1", n_ctx_per_seq=N_CTX, n_seq=2, n_threads=THREADS, flash_attn=False) as eng:
        results, _ = run(eng, rows)
    plain = plain_llama(str(smollm2_path), n_ctx=N_CTX, n_threads=THREADS, verbose=False)
    try:
        for row in rows:
            text, finish, _, completion_tokens = reference(plain, row)
            gen = ok(results[row.custom_id])
            assert (gen.text, gen.finish_reason, gen.completion_tokens) == (text, finish, completion_tokens)
    finally:
        plain.close()


def test_continuous_batching_refills_slots_and_times_every_token(smollm2_path: Path) -> None:
    long_row = completion("long", "1, 2, 3, 4,", temperature=0, max_tokens=40)
    short = [chat(f"short-{i}", f"Say a word that rhymes with {i}.", temperature=0, max_tokens=4) for i in range(9)]
    rows = [long_row, *short]
    with LlamaEngine(smollm2_path, "Q4_1", n_ctx_per_seq=N_CTX, n_seq=3, n_threads=THREADS) as eng:
        results, order = run(eng, rows)
    assert sorted(order) == sorted(r.custom_id for r in rows)
    # With 3 slots the nine short rows cycle through two of them while the long row keeps its own.
    assert order[-1] == "long"
    assert ok(results["long"]).completion_tokens == 40
    for cid, result in results.items():
        gen = ok(result)
        assert 1 <= gen.completion_tokens == len(gen.token_ms), cid
        assert gen.prompt_eval_ms > 0 and gen.ttft_ms > 0, cid
        assert gen.token_ms[0] == gen.ttft_ms and gen.ttft_ms >= gen.prompt_eval_ms, cid
        assert sum(gen.token_ms) == pytest.approx(gen.ttft_ms + gen.eval_ms, abs=1e-6), cid
        assert gen.total_ms >= gen.ttft_ms + gen.eval_ms - 1e-6, cid
        assert gen.prompt_tokens > 0, cid


class _CountingCopies:
    """Wraps the llama_cpp module an engine uses, recording every KV stream copy (src, dst)."""

    def __init__(self, module: Any) -> None:
        self._module = module
        self.copies: list[tuple[int, int]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)

    def llama_memory_seq_cp(self, mem: Any, src: int, dst: int, p0: int, p1: int) -> None:
        self.copies.append((src, dst))
        self._module.llama_memory_seq_cp(mem, src, dst, p0, p1)


def test_rows_moved_to_close_slot_gaps_keep_their_output(engine: LlamaEngine, llm: Any) -> None:
    rows = [
        completion("slot0", "1, 2, 3, 4,", temperature=0, max_tokens=30),
        completion("slot1", "The capital of France is", temperature=0, max_tokens=2),
        completion("slot2", "def fibonacci(n):", temperature=0, max_tokens=14),
    ]
    spy = _CountingCopies(engine._L)
    engine._L = spy
    try:
        results, order = run(engine, rows)
    finally:
        engine._L = spy._module
    assert order == ["slot1", "slot2", "slot0"]
    assert (2, 1) in spy.copies  # slot1 finished with nothing left to admit: slot2's row moved down
    for row in rows:
        text, finish, _, completion_tokens = reference(llm, row)
        gen = ok(results[row.custom_id])
        assert (gen.text, gen.finish_reason, gen.completion_tokens) == (text, finish, completion_tokens)


def test_stop_strings_cut_the_text_like_create_completion(engine: LlamaEngine, llm: Any) -> None:
    rows = [
        completion("count-stop", "1, 2, 3, 4,", temperature=0, max_tokens=40, stop=("8",)),
        completion("count-multi", "1, 2, 3, 4,", temperature=0, max_tokens=40, stop=("never", ", 7")),
        chat("chat-stop", "Name three colors.", temperature=0, max_tokens=40, stop=("\n",)),
    ]
    results, _ = run(engine, rows)
    counted = ok(results["count-stop"])
    assert counted.finish_reason == "stop" and "8" not in counted.text and counted.text.strip().startswith("5")
    assert ok(results["count-multi"]).text.endswith("6")
    for row in rows:
        text, finish, _, completion_tokens = reference(llm, row)
        gen = ok(results[row.custom_id])
        assert (gen.text, gen.finish_reason, gen.completion_tokens) == (text, finish, completion_tokens)


def test_max_tokens_ends_with_length_and_exactly_that_many_tokens(engine: LlamaEngine) -> None:
    rows = [completion(f"len-{n}", "1, 2, 3, 4,", temperature=0, max_tokens=n) for n in (1, 5, 13)]
    results, _ = run(engine, rows)
    for n in (1, 5, 13):
        gen = ok(results[f"len-{n}"])
        assert (gen.finish_reason, gen.completion_tokens, len(gen.token_ms)) == ("length", n, n)
    assert ok(results["len-1"]).eval_ms == 0.0


def test_rows_that_do_not_fit_the_context_fail_alone(engine: LlamaEngine) -> None:
    huge = "word " * 600
    rows = [
        completion("before", "The capital of France is", temperature=0, max_tokens=8),
        completion("too-long-prompt", huge, temperature=0, max_tokens=8),
        completion("too-long-budget", "The capital of Spain is", temperature=0, max_tokens=N_CTX),
        DatasetRow(line=0, custom_id="broken-message", endpoint=CHAT, messages=({"role": "user"},)),
        chat("after", "What is 2+2?", temperature=0, max_tokens=8),
    ]
    results, _ = run(engine, rows)
    prompt_error = results["too-long-prompt"]
    assert isinstance(prompt_error, RequestTooLong)
    n_prompt = engine.count_tokens(huge)
    assert str(prompt_error) == f"prompt is {n_prompt} tokens; the model context is {N_CTX} per request"
    budget_error = results["too-long-budget"]
    assert isinstance(budget_error, RequestTooLong) and f"max_tokens is {N_CTX}" in str(budget_error)
    assert isinstance(results["broken-message"], Exception)
    assert not isinstance(results["broken-message"], RequestTooLong)
    assert ok(results["before"]).completion_tokens > 0
    assert ok(results["after"]).completion_tokens > 0


def test_a_row_past_the_time_limit_fails_alone(engine: LlamaEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A row still generating when its time is up fails with RowTimeLimit; a row done by then is answered."""
    monkeypatch.setattr(engine, "row_time_limit", 0.0)  # every row is over it from its first token on
    rows = [
        completion("quick", "The capital of France is", temperature=0, max_tokens=1),
        completion("runaway", "Count: 1, 2, 3,", temperature=0, max_tokens=64),
    ]
    results, _ = run(engine, rows)
    assert ok(results["quick"]).completion_tokens == 1
    assert isinstance(results["runaway"], RowTimeLimit), results["runaway"]
    assert "per-row limit" in str(results["runaway"])


def test_seeded_sampling_is_reproducible_and_seed_dependent(engine: LlamaEngine) -> None:
    def row(cid: str, seed: int) -> DatasetRow:
        return chat(cid, "Tell me a very short story about a dragon.", temperature=0.8, max_tokens=32, seed=seed)

    # Two rows with the same seed run side by side in different slots: each has its own RNG.
    first, _ = run(engine, [row("a", 1), row("b", 1), row("c", 2)])
    again, _ = run(engine, [row("a", 1)])
    assert ok(first["a"]).text == ok(first["b"]).text == ok(again["a"]).text
    assert ok(first["a"]).text != ok(first["c"]).text


def test_shared_system_prompt_is_computed_once_and_changes_nothing(smollm2_path: Path, engine: LlamaEngine) -> None:
    questions = ["Where is my parcel?", "Can I change the delivery address?", "What does 'in transit' mean?"]
    rows = [chat(f"q{i}", q, system=SYSTEM, temperature=0, max_tokens=24) for i, q in enumerate(questions)]
    rows.append(chat("other", "Name a fruit.", temperature=0, max_tokens=12))
    cached, _ = run(engine, rows)
    with LlamaEngine(
        smollm2_path, "Q4_1", n_ctx_per_seq=N_CTX, n_seq=4, n_threads=THREADS, prefix_cache=False
    ) as plain:
        fresh, _ = run(plain, rows)
    system_tokens = engine.count_tokens(SYSTEM)
    for i in range(len(questions)):
        gen = ok(cached[f"q{i}"])
        assert gen.cached_prompt_tokens > system_tokens
        assert gen.cached_prompt_tokens < gen.prompt_tokens
        assert ok(fresh[f"q{i}"]).cached_prompt_tokens == 0
    for row in rows:
        assert ok(cached[row.custom_id]).text == ok(fresh[row.custom_id]).text, row.custom_id
        assert ok(cached[row.custom_id]).completion_tokens == ok(fresh[row.custom_id]).completion_tokens
    # The prefix stays for the next call (the next chunk of the same job): one row still reuses it.
    later, _ = run(engine, rows[1:2])
    assert ok(later["q1"]).cached_prompt_tokens == ok(cached["q1"]).cached_prompt_tokens
    assert ok(later["q1"]).text == ok(fresh["q1"]).text


def test_should_stop_returns_early_and_leaves_the_engine_clean(engine: LlamaEngine) -> None:
    rows = [completion(f"s{i}", f"{i}, {i + 1}, {i + 2},", temperature=0, max_tokens=6 + 4 * i) for i in range(8)]
    reported: list[str] = []
    results, order = run(engine, rows, should_stop=lambda: bool(reported), order=reported)
    assert 1 <= len(order) < len(rows)
    full, _ = run(engine, rows)
    assert len(full) == len(rows)
    for cid, result in results.items():
        assert ok(result).text == ok(full[cid]).text


def test_stop_requested_before_any_decoding_reports_nothing(engine: LlamaEngine) -> None:
    results, _ = run(engine, GREEDY_ROWS[:3], should_stop=lambda: True)
    assert results == {}


def test_count_tokens_and_format_prompt_agree_with_llama_cpp_python(engine: LlamaEngine, llm: Any) -> None:
    text = "Hello, world! Ünïcödé and <|im_start|> markup."
    assert engine.count_tokens(text) == len(llm.tokenize(text.encode(), add_bos=False, special=True))
    assert engine.count_tokens("") == 0
    row = completion("p", "The capital of France is")
    assert engine.format_prompt(row) == llm.tokenize(b"The capital of France is", add_bos=False)
    chat_tokens = engine.format_prompt(chat("c", "Hi"))
    generation_prompt = engine.tokenize("<|im_start|>assistant\n")
    assert generation_prompt[0] == llm.tokenize(b"<|im_start|>", add_bos=False, special=True)[0]
    assert chat_tokens[-len(generation_prompt) :] == generation_prompt


def test_close_is_idempotent(smollm2_path: Path) -> None:
    eng = LlamaEngine(smollm2_path, "Q4_1", n_ctx_per_seq=256, n_seq=1, n_threads=1)
    assert eng.n_ctx == 256 and eng.load_ms > 0 and eng.variant == "Q4_1"
    eng.close()
    eng.close()


# -- model-free helpers -----------------------------------------------------------------------------


def test_best_shared_prefix_prefers_the_largest_saving() -> None:
    head = list(range(100, 140))
    prompts = [[*head, 1, 2], [*head, 3], [*head, 4, 5, 6], [7, 8, 9], [*head[:20], 99, 98]]
    assert best_shared_prefix(prompts, min_tokens=16, max_tokens=1000) == head
    assert best_shared_prefix(prompts, min_tokens=16, max_tokens=30) == head[:30]
    assert best_shared_prefix(prompts, min_tokens=41, max_tokens=1000) == []
    assert best_shared_prefix([[*head, 1]], min_tokens=16, max_tokens=1000) == []
    # identical prompts: the last token is kept out so each row still computes its own logits
    assert best_shared_prefix([head, head], min_tokens=16, max_tokens=1000) == head[:-1]


def test_text_accumulator_handles_split_characters_and_stops_across_tokens() -> None:
    acc = TextAccumulator(("STOP",))
    snow = "☃".encode()
    assert not acc.add(b"a" + snow[:1])
    assert acc.text() == "a"
    assert not acc.add(snow[1:] + b" ST")
    assert acc.text() == "a☃ ST"
    assert acc.add(b"OP and more")
    assert acc.text() == "a☃ "
    plain = TextAccumulator(())
    assert not plain.add(b"STOP")
    assert plain.text() == "STOP"


def test_refill_admits_a_later_chunks_rows_while_the_first_still_decode(engine: LlamaEngine) -> None:
    first = [chat(f"a{i}", f"Name a colour, number {i}.", max_tokens=6, temperature=0) for i in range(4)]
    later = [chat(f"b{i}", f"Name a fruit, number {i}.", max_tokens=6, temperature=0) for i in range(4)]
    calls: list[tuple[bool, int]] = []
    results: dict[str, Generation | Exception] = {}
    handed = [later]

    def refill(wait: bool) -> Sequence[DatasetRow] | None:
        calls.append((wait, len(results)))
        if handed:
            return handed.pop()
        return None if wait else []

    def on_done(row: DatasetRow, result: Generation | Exception) -> None:
        assert row.custom_id not in results
        results[row.custom_id] = result

    before = engine.slot_use.steps, engine.slot_use.filled, engine.slot_use.slots
    engine.generate(first, on_done, lambda: False, refill=refill)
    assert calls[0] == (False, 0)  # asked while all four first rows were in flight, without blocking
    assert calls[-1][0] is True and len(results) == 8  # ended only once the source said "no more"
    assert all(ok(results[r.custom_id]).completion_tokens > 0 for r in first + later)
    steps, filled, slots = (a - b for a, b in zip((engine.slot_use.steps, engine.slot_use.filled,
                                                    engine.slot_use.slots), before, strict=True))  # fmt: skip
    assert steps > 0 and slots == steps * engine.n_seq and 0 < filled <= slots


def test_n_choices_evaluate_the_prompt_once_and_copy_its_kv(smollm2_path: Path) -> None:
    """Without the prefix stream, the only way a later choice starts with cached tokens is the KV copy."""
    with LlamaEngine(smollm2_path, "Q4_1", n_ctx_per_seq=N_CTX, n_seq=4, n_threads=THREADS, prefix_cache=False) as eng:
        results, _ = run(
            eng,
            [
                chat("n3", "Describe the sea in one line.", max_tokens=10, temperature=0, n=3),
                chat("one", "Describe the sea in one line.", max_tokens=10, temperature=0),
            ],
        )
    gen, one = ok(results["n3"]), ok(results["one"])
    assert gen.choices is not None and len(gen.choices) == 3
    assert [c.cached_prompt_tokens for c in gen.choices] == [0, one.prompt_tokens - 1, one.prompt_tokens - 1]
    assert [c.text for c in gen.choices] == [one.text] * 3  # greedy: the copied KV gives the same answer
    assert gen.prompt_tokens == one.prompt_tokens


def test_rows_are_tokenized_as_they_are_admitted_not_all_up_front(smollm2_path: Path) -> None:
    with LlamaEngine(smollm2_path, "Q4_1", n_ctx_per_seq=N_CTX, n_seq=2, n_threads=THREADS) as eng:
        events: list[str] = []
        real = eng.format_prompt

        def format_prompt(row: DatasetRow) -> list[int]:
            events.append(f"tok:{row.custom_id}")
            return real(row)

        eng.format_prompt = format_prompt  # type: ignore[method-assign]
        rows = [chat(f"r{i}", f"Say {i}.", max_tokens=3, temperature=0) for i in range(10)]
        eng.generate(rows, lambda row, res: events.append(f"done:{row.custom_id}"), lambda: False)
    # the look-ahead (2 * n_seq rows, to choose the shared prefix) first, the rest only as slots free
    assert events[:4] == [f"tok:r{i}" for i in range(4)]
    assert events.index("tok:r9") > events.index(next(e for e in events if e.startswith("done:")))
    assert sorted(e for e in events if e.startswith("tok:")) == sorted(f"tok:r{i}" for i in range(10))
    assert len([e for e in events if e.startswith("done:")]) == 10


def test_a_row_too_long_by_its_length_alone_is_refused_before_tokenizing(engine: LlamaEngine) -> None:
    huge = chat("huge", "word " * 2_000_000, max_tokens=4)  # 10 MB of text
    tokenized: list[str] = []
    real = engine.format_prompt

    def format_prompt(row: DatasetRow) -> list[int]:
        tokenized.append(row.custom_id)
        return real(row)

    engine.format_prompt = format_prompt  # type: ignore[method-assign]
    try:
        results, _ = run(engine, [huge, chat("fine", "Hello.", max_tokens=3, temperature=0)])
    finally:
        del engine.format_prompt
    refused = results["huge"]
    assert isinstance(refused, RequestTooLong) and "10000000 characters" in str(refused)
    assert "huge" not in tokenized and ok(results["fine"]).completion_tokens > 0
