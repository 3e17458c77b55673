from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from tokenmill.engines import llama_guard

AMX_INFO = b"CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 1 | AVX512_BF16 = 1 | AMX_INT8 = 1 | OPENMP = 1 | REPACK = 1 | "
PLAIN_INFO = b"CPU : SSE3 = 1 | AVX2 = 1 | FMA = 1 | OPENMP = 1 | REPACK = 1 | "


@pytest.mark.parametrize(("info", "extra_bufts"), [(AMX_INFO, False), (PLAIN_INFO, True)], ids=["amx", "no-amx"])
def test_extra_buffer_types_are_off_only_where_amx_would_repack(info: bytes, extra_bufts: bool) -> None:
    import llama_cpp

    fake = SimpleNamespace(
        llama_print_system_info=lambda: info, llama_model_default_params=llama_cpp.llama_model_default_params
    )
    assert llama_guard.amx_repack_active(fake) is not extra_bufts
    assert llama_guard.model_params(fake).use_extra_bufts is extra_bufts


def test_plain_llama_evaluates_a_long_prompt_and_restores_the_defaults(smollm2_path: Path) -> None:
    """A batched prompt is what crashed in ggml's AMX kernel; a short one never reached it."""
    import llama_cpp.llama_cpp as low

    before = low.llama_model_default_params
    llm = llama_guard.plain_llama(str(smollm2_path), n_ctx=1024, n_threads=2, flash_attn=True, verbose=False)
    try:
        prompt = "The quick brown fox jumps over the lazy dog. " * 20
        out = llm(prompt, max_tokens=4, temperature=0.0)
        assert out["usage"]["prompt_tokens"] > 100 and out["usage"]["completion_tokens"] >= 1
    finally:
        llm.close()
    assert low.llama_model_default_params is before
    assert low.llama_model_default_params().use_extra_bufts  # nothing else in the process is affected
