"""The model's own tokenizer from a vocabulary-only load, and document parts budgeted with it (real SmolLM2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.corpus import FRENCH, JAPANESE, large_text, small_texts
from tokenmill.dataset_fields import compile_template
from tokenmill.documents import PartBudget, estimate_tokens, read_documents, split_document, split_text
from tokenmill.engines.llama import LlamaEngine
from tokenmill.models.tokenizer import load_tokenizer, tokenizer_for
from tokenmill.rows import CHAT, DatasetRow, SamplingParams
from tokenmill.scheduler.submit import document_token_budget

pytestmark = pytest.mark.model
TEMPLATE = "Summarize the license terms of this package in one sentence. {text}"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = small_texts(tmp_path_factory.mktemp("corpus") / "docs")
    large_text(folder)
    return folder


def test_counts_are_the_engines_own(smollm2_path: Path, corpus: Path) -> None:
    """markup + count(content) is exactly the prompt the engine builds, for every kind of text."""
    tok = load_tokenizer(smollm2_path)
    assert tok.n_ctx_train == 8192 and tok.chat_overhead > 0
    engine = LlamaEngine(smollm2_path, "smollm2-135m-instruct:q4_1", n_ctx_per_seq=256, n_seq=1, prefix_cache=False)
    try:
        for path in sorted(corpus.rglob("*.*")):
            content = TEMPLATE.format(text=path.read_text(encoding="utf-8")[:20_000])
            row = DatasetRow(1, "x", CHAT, messages=({"role": "user", "content": content},))
            assert len(engine.format_prompt(row)) == tok.prompt_tokens(content), path.name
        assert tok.count("<|im_start|>system") == len(engine.tokenize("<|im_start|>system", parse_special=False))
    finally:
        engine.close()


def test_tokenizer_for_finds_the_local_file(smollm2_path: Path, tmp_path: Path) -> None:
    models = smollm2_path.parent.parent
    found = tokenizer_for("smollm2-135m-instruct", models)
    assert found is not None and found.path == smollm2_path.resolve()
    assert tokenizer_for("smollm2-135m-instruct", tmp_path) is None  # nothing here, no fetch: the caller estimates
    assert tokenizer_for(str(smollm2_path), tmp_path) is not None  # a .gguf path is its own tokenizer


@pytest.mark.parametrize("n_ctx", [2048, 8192])
def test_no_part_of_real_texts_exceeds_the_context(smollm2_path: Path, corpus: Path, n_ctx: int) -> None:
    """Licenses, code, French, Japanese and a 128 KB file: every part, rendered with its markup and max_tokens,
    fits the context; the text is all there, in order."""
    tok = load_tokenizer(smollm2_path)
    params = SamplingParams(max_tokens=256)
    budget = PartBudget(n_ctx=n_ctx, max_tokens=256, counter=tok)
    rows = list(read_documents(corpus, TEMPLATE, defaults=params, budget=budget))
    prefix = TEMPLATE.split("{text}")[0]
    by_source: dict[str, list[str]] = {}
    for row in rows:
        assert row.messages is not None and row.source is not None
        content = row.messages[0]["content"]
        assert tok.prompt_tokens(content) + 256 <= n_ctx, row.custom_id
        by_source.setdefault(row.source, []).append(content[len(prefix) :])
    assert len(by_source) == 6
    large = by_source["licenses-large.txt"]
    assert len(large) >= 28_350 // n_ctx + 1  # 28,350 tokens cannot take fewer parts
    for source, parts in by_source.items():
        original = (corpus / source).read_text(encoding="utf-8")
        assert "".join("".join(p.split()) for p in parts) == "".join(original.split()), source
    if n_ctx == 8192:  # the part budget is used, not wasted: parts fill most of the room
        assert tok.prompt_tokens(prefix + large[0]) + 256 > 0.8 * n_ctx


def test_four_characters_per_token_overflows_real_texts(smollm2_path: Path) -> None:
    """The estimate parts used to be cut by: French (~2.8 characters per SmolLM2 token) and Japanese (~0.55)
    overflow a 2048-token context with it, which made most parts of an overnight run fail with
    context_length_exceeded; the exact budget never does."""
    tok = load_tokenizer(smollm2_path)
    texts = {"french": FRENCH * 20, "japanese": JAPANESE * 30}
    for kind, text in texts.items():
        old = split_text(text, document_token_budget(256, 2048), estimate_tokens)
        assert max(tok.prompt_tokens(TEMPLATE.format(text=p)) for p in old) + 256 > 2048, kind
        budget = PartBudget(n_ctx=2048, max_tokens=256, counter=tok)
        new = split_document(text.strip(), kind, compile_template(TEMPLATE), budget)
        assert max(tok.prompt_tokens(TEMPLATE.format(text=p)) for p in new) + 256 <= 2048, kind
