"""The output format: OpenAI batch output lines, with tokenmill's own timings under ``tokenmill``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import IO, Any

from tokenmill.engine import Generation, TokenLogprob
from tokenmill.rows import CHAT, DatasetRow
from tokenmill.store import Store
from tokenmill.store.results import iter_results
from tokenmill.store.tables import RequestRow, Result


def response_body(row: DatasetRow, gen: Generation, variant: str, request_id: str) -> dict[str, Any]:
    created = int(time.time())
    usage = {
        "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": gen.completion_tokens,
        "total_tokens": gen.prompt_tokens + gen.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": gen.cached_prompt_tokens},
    }
    if row.endpoint == CHAT:
        return {
            "id": f"chatcmpl-{request_id}",
            "object": "chat.completion",
            "created": created,
            "model": variant,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": choice.text},
                    "finish_reason": choice.finish_reason,
                    "logprobs": chat_logprobs(choice.logprobs),
                }
                for i, choice in enumerate(gen.choices or [gen])
            ],
            "usage": usage,
        }
    return {
        "id": f"cmpl-{request_id}",
        "object": "text_completion",
        "created": created,
        "model": variant,
        "choices": [
            {"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": completion_logprobs(c)}
            for i, c in enumerate(gen.choices or [gen])
        ],
        "usage": usage,
    }


def _spell(piece: bytes) -> str:
    """A token as text; a token ending inside a multi-byte character shows its bytes as escapes."""
    return piece.decode("utf-8", errors="backslashreplace")


def chat_logprobs(items: list[TokenLogprob] | None) -> dict[str, Any] | None:
    """``choices[i].logprobs`` of a chat completion: one entry per token, ``bytes`` its UTF-8 bytes."""
    if items is None:
        return None
    content = []
    for item in items:
        tops = [
            {"token": _spell(piece), "logprob": lp, "bytes": list(piece)}
            for piece, (_, lp) in zip(item.top_pieces, item.top, strict=True)
        ]
        content.append(
            {"token": _spell(item.piece), "logprob": item.logprob, "bytes": list(item.piece), "top_logprobs": tops}
        )
    return {"content": content, "refusal": None}


def completion_logprobs(gen: Generation) -> dict[str, Any] | None:
    """The legacy completions shape: parallel lists, ``top_logprobs`` as token → logprob maps."""
    if gen.logprobs is None:
        return None
    tokens, offsets, tops = [], [], []
    offset = 0
    for item in gen.logprobs:
        text = _spell(item.piece)
        tokens.append(text)
        offsets.append(offset)
        offset += len(item.piece.decode("utf-8", errors="ignore"))
        tops.append({_spell(p): lp for p, (_, lp) in zip(item.top_pieces, item.top, strict=True)})
    return {
        "tokens": tokens,
        "token_logprobs": [item.logprob for item in gen.logprobs],
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def timings(gen: Generation, *, queue_ms: float, load_ms: float) -> dict[str, Any]:
    """Per-request timings in ms, plus the names people know from Ollama (ns) and llama-server.

    Both servers count only the prompt tokens they actually evaluated (a reused prefix is not
    evaluated), and ``prompt_eval_ms`` covers exactly those; so ``prompt_eval_count``/``prompt_n`` are
    the evaluated tokens, ``cache_n`` the reused ones, and their sum is ``usage.prompt_tokens``.
    Counting the cached tokens too would inflate ``prompt_per_second`` on every prefix-cache hit.
    """
    ns = 1_000_000
    cached = min(max(gen.cached_prompt_tokens, 0), gen.prompt_tokens)
    evaluated = gen.prompt_tokens - cached
    return {
        "queue_ms": round(queue_ms, 3),
        "load_ms": round(load_ms, 3),
        "prompt_eval_ms": round(gen.prompt_eval_ms, 3),
        "ttft_ms": round(gen.ttft_ms, 3),
        "eval_ms": round(gen.eval_ms, 3),
        "total_ms": round(gen.total_ms, 3),
        "tokens_per_second": round(gen.tokens_per_second, 3),
        "cached_prompt_tokens": cached,
        "token_ms": [round(t, 3) for t in gen.token_ms],
        "ollama": {
            "load_duration": int(load_ms * ns),
            "prompt_eval_count": evaluated,
            "prompt_eval_duration": int(gen.prompt_eval_ms * ns),
            "eval_count": gen.completion_tokens,
            "eval_duration": int(gen.eval_ms * ns),
            "total_duration": int(gen.total_ms * ns),
        },
        "llama_server": {
            "cache_n": cached,
            "prompt_n": evaluated,
            "prompt_ms": round(gen.prompt_eval_ms, 3),
            "prompt_per_second": round(evaluated / (gen.prompt_eval_ms / 1000), 3) if gen.prompt_eval_ms > 0 else 0.0,
            "predicted_n": gen.completion_tokens,
            "predicted_ms": round(gen.eval_ms, 3),
            "predicted_per_second": round(gen.tokens_per_second, 3),
        },
    }


def output_line(result: Result, request: RequestRow) -> dict[str, Any]:
    return {
        "id": f"batch_req_{result.job_id}_{result.seq}",
        "custom_id": result.custom_id,
        "response": {"status_code": 200, "request_id": f"{result.job_id}-{result.seq}", "body": result.body},
        "error": None,
        "tokenmill": {
            "line": request.line,
            "source": (request.payload or {}).get("source"),
            "worker": result.worker_id,
            "model": result.variant,
            "cached": result.cached,
            "attempts": result.attempts,
            "timings": result.timings or {},
        },
    }


def error_line(result: Result, request: RequestRow) -> dict[str, Any]:
    return {
        "id": f"batch_req_{result.job_id}_{result.seq}",
        "custom_id": result.custom_id,
        "response": None,
        "error": {"code": result.error_code or "generation_failed", "message": result.error, "line": request.line},
        "tokenmill": {"worker": result.worker_id, "model": result.variant, "attempts": result.attempts},
    }


def export(store: Store, job_id: str, out: Path | None, errors: Path | None) -> tuple[int, int]:
    """Write results (and failures) in input order; returns (succeeded, failed) line counts."""
    ok = bad = 0
    out_fh: IO[str] | None = None
    err_fh: IO[str] | None = None
    try:
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out_fh = open(out.with_name(out.name + ".part"), "w", encoding="utf-8")  # noqa: SIM115
        if errors is not None:
            errors.parent.mkdir(parents=True, exist_ok=True)
            err_fh = open(errors.with_name(errors.name + ".part"), "w", encoding="utf-8")  # noqa: SIM115
        with store.session() as s:
            for result, request in iter_results(s, job_id):
                if result.status == "succeeded":
                    ok += 1
                    if out_fh:
                        out_fh.write(json.dumps(output_line(result, request), ensure_ascii=False) + "\n")
                else:
                    bad += 1
                    if err_fh:
                        err_fh.write(json.dumps(error_line(result, request), ensure_ascii=False) + "\n")
    finally:
        for fh in (out_fh, err_fh):
            if fh is not None:
                fh.close()
    # Renamed only when complete, so an interrupted export never leaves a half file under the real name.
    if out is not None:
        out.with_name(out.name + ".part").replace(out)
    if errors is not None:
        errors.with_name(errors.name + ".part").replace(errors)
    return ok, bad
