"""The output format: OpenAI batch output lines, with tokenmill's own timings under ``tokenmill``."""

from __future__ import annotations

import base64
import functools
import json
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from tokenmill import tool_calls
from tokenmill.datasets import InvalidLine
from tokenmill.engine import EmbeddingResult, Generation, TokenLogprob
from tokenmill.errors import DatasetError
from tokenmill.rows import CHAT, EMBEDDINGS, RESPONSES, DatasetRow
from tokenmill.store import Store
from tokenmill.store.results import export_rows
from tokenmill.store.states import ResultStatus
from tokenmill.store.tables import RequestRow, Result
from tokenmill.tool_calls import Tool, ToolSpec


def response_body(row: DatasetRow, gen: Generation, variant: str, request_id: str) -> dict[str, Any]:
    if row.endpoint == EMBEDDINGS:
        return embeddings_body(row, gen, variant)
    if row.endpoint == RESPONSES:
        return responses_body(row, gen, variant, request_id)
    created = int(time.time())
    usage = {
        "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": gen.completion_tokens,
        "total_tokens": gen.prompt_tokens + gen.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": gen.reused_prompt_tokens},
    }
    if row.endpoint == CHAT:
        spec = tool_calls.spec_of(row.params.tools) if row.params.tools else None
        return {
            "id": f"chatcmpl-{request_id}",
            "object": "chat.completion",
            "created": created,
            "model": variant,
            "choices": [
                {
                    "index": i,
                    **chat_message(choice, spec, request_id, i),
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
            {
                "index": i,
                "text": c.text,
                "finish_reason": c.finish_reason,
                "logprobs": completion_logprobs(c, len(row.prompt or "")),
            }
            for i, c in enumerate(gen.choices or [gen])
        ],
        "usage": usage,
    }


def chat_message(choice: Generation, spec: ToolSpec | None, request_id: str, index: int) -> dict[str, Any]:
    """A chat choice's ``message`` and ``finish_reason``: text, or the calls it made (content then null, or
    the unfinished call when ``max_tokens`` cut the answer after some)."""
    parsed = tool_calls.parse(choice.text, spec) if spec is not None else None
    if parsed is None:
        return {"message": {"role": "assistant", "content": choice.text}, "finish_reason": choice.finish_reason}
    calls, rest = parsed
    message = {
        "role": "assistant",
        "content": rest or None,
        "tool_calls": [
            {
                "id": tool_calls.call_id(request_id, index, k),
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
            for k, call in enumerate(calls)
        ],
    }
    finish = "tool_calls" if choice.finish_reason == "stop" else choice.finish_reason
    return {"message": message, "finish_reason": finish}


def responses_body(row: DatasetRow, gen: Generation, variant: str, request_id: str) -> dict[str, Any]:
    """The ``Response`` object of a /v1/responses row: its output items, status and usage, and the request
    fields a Response repeats."""
    spec = tool_calls.spec_of(row.params.tools) if row.params.tools else None
    echo = row.echo or {}
    parsed = tool_calls.parse(gen.text, spec) if spec is not None else None
    calls, text = parsed if parsed is not None else ([], gen.text)
    complete = gen.finish_reason == "stop"
    status = "completed" if complete else "incomplete"
    output: list[dict[str, Any]] = [
        {
            "type": "function_call",
            "id": f"fc_{tool_calls.call_id(request_id, 0, k)[5:]}",
            "call_id": tool_calls.call_id(request_id, 0, k),
            "name": call.name,
            "arguments": call.arguments,
            "status": "completed",
        }
        for k, call in enumerate(calls)
    ]
    if text or not calls:
        content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
        output.append({"type": "message", "id": f"msg_{request_id}", "role": "assistant", "status": status,
                       "content": content})  # fmt: skip
    created = int(time.time())
    return {
        "id": f"resp_{request_id}",
        "object": "response",
        "created_at": created,
        "completed_at": created if complete else None,
        "status": status,
        "error": None,
        "incomplete_details": None if complete else {"reason": "max_output_tokens"},
        "instructions": echo.get("instructions"),
        "max_output_tokens": echo.get("max_output_tokens"),
        "max_tool_calls": echo.get("max_tool_calls"),
        "metadata": echo.get("metadata") or {},
        "model": variant,
        "output": output,
        "parallel_tool_calls": spec.parallel if spec is not None else True,
        "previous_response_id": None,
        "temperature": row.params.temperature,
        "text": echo.get("text") or {"format": {"type": "text"}},
        "tool_choice": _tool_choice(spec),
        "tools": [_function_tool(t) for t in spec.tools] if spec is not None else [],
        "top_p": row.params.top_p,
        "truncation": "disabled",
        "usage": {
            "input_tokens": gen.prompt_tokens,
            "input_tokens_details": {"cached_tokens": gen.reused_prompt_tokens, "cache_write_tokens": 0},
            "output_tokens": gen.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": gen.prompt_tokens + gen.completion_tokens,
        },
    }


def _tool_choice(spec: ToolSpec | None) -> str | dict[str, str]:
    if spec is None:
        return "auto"
    return {"type": "function", "name": spec.name or ""} if spec.choice == tool_calls.FUNCTION else spec.choice


def _function_tool(tool: Tool) -> dict[str, Any]:
    return {"type": "function", "name": tool.name, "description": tool.description,
            "parameters": json.loads(tool.parameters), "strict": tool.strict}  # fmt: skip


def embeddings_body(row: DatasetRow, result: Generation, variant: str) -> dict[str, Any]:
    """The OpenAI ``CreateEmbeddingResponse`` body: one entry per input, in input order.

    ``base64`` is what the OpenAI SDK asks for by default: the float32 values little-endian, base64-encoded,
    a quarter of the JSON size of ``float`` and exact.
    """
    if not isinstance(result, EmbeddingResult):
        raise TypeError(f"line {row.line}: an embeddings row needs an EmbeddingResult, got {type(result).__name__}")
    encode = encode_base64 if row.encoding_format == "base64" else None
    data = [
        {"object": "embedding", "index": i, "embedding": encode(v) if encode else v}
        for i, v in enumerate(result.vectors)
    ]
    usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
    return {"object": "list", "data": data, "model": variant, "usage": usage}


def encode_base64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


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


def completion_logprobs(gen: Generation, prompt_chars: int = 0) -> dict[str, Any] | None:
    """The legacy completions shape: parallel lists, ``top_logprobs`` as token → logprob maps.

    ``text_offset`` counts characters of prompt + completion, as OpenAI and llama-cpp-python count them
    without ``echo``: the first token sits at the prompt's length.
    """
    if gen.logprobs is None:
        return None
    tokens, offsets, tops = [], [], []
    offset = prompt_chars
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
    cached, evaluated = gen.reused_prompt_tokens, gen.evaluated_prompt_tokens
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


def _error_record(
    request_id: str | None, custom_id: str | None, code: str, message: str | None, line: int | None
) -> dict[str, Any]:
    """An errors-file line in OpenAI batch error form: rejected input lines and failed rows share it, so a
    reader of the errors file needs one parser whichever way a row failed."""
    return {
        "id": request_id,
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message, "line": line},
    }


def rejected_line(invalid: InvalidLine, path: str | Path) -> dict[str, Any]:
    """The errors-file line for an input line rejected at submit (never stored, so it has no request id)."""
    err = invalid.error
    message = str(DatasetError(str(path), err.reason, invalid.line, err.field))
    return _error_record(None, invalid.custom_id or f"line-{invalid.line}", "invalid_request", message, invalid.line)


def failed_line(result: Result, request: RequestRow) -> dict[str, Any]:
    """The errors-file line for a stored row whose generation failed."""
    record = _error_record(
        f"batch_req_{result.job_id}_{result.seq}",
        result.custom_id,
        result.error_code or "generation_failed",
        result.error,
        request.line,
    )
    record["tokenmill"] = {"worker": result.worker_id, "model": result.variant, "attempts": result.attempts}
    return record


def read_skipped(skipped: Path | None) -> list[dict[str, Any]]:
    """The error lines submit wrote for input lines it skipped (``--skip-invalid``); none when no file."""
    if skipped is None or not skipped.is_file():
        return []
    with open(skipped, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


# ``json.dumps(text, ensure_ascii=False)`` of one string, quotes included: the C escaper, called directly.
_q: Callable[[str], str] = json.encoder.encode_basestring


@functools.lru_cache(maxsize=64)
def _escape(text: str) -> str:
    """A job id inside a quoted string (one per export: cached)."""
    return _q(text)[1:-1]


def _json_text(raw: str | None) -> str:
    """Stored JSON text as a line fragment; a missing document reads as ``{}``, as :func:`output_line` has it."""
    return raw if raw and raw != "null" else "{}"


def _scalar(value: bool | int | None) -> str:
    return "null" if value is None else ("true" if value is True else "false" if value is False else str(value))


def success_text(row: Sequence[Any]) -> str:
    """:func:`output_line` of an :func:`~tokenmill.store.results.export_rows` row, as one JSON line.

    Built as text around the stored body and timings (already JSON) rather than decoded and encoded again,
    and unpacked as a tuple (a Row's attribute lookup costs more than the rest): that is what lets a
    million-row export stream at tens of thousands of rows/s. Same keys, same order, same values as
    :func:`output_line` (tests/test_output.py holds the two together).
    """
    job_id, seq, _, custom_id, worker, variant, cached, attempts, _, _, line, source, body, timings_json = row
    job = _escape(job_id)
    return (
        f'{{"id": "batch_req_{job}_{seq}", "custom_id": {_q(custom_id)}, '
        f'"response": {{"status_code": 200, "request_id": "{job}-{seq}", '
        f'"body": {body if body is not None else "null"}}}, "error": null, '
        f'"tokenmill": {{"line": {_scalar(line)}, "source": {"null" if source is None else _q(source)}, '
        f'"worker": {"null" if worker is None else _q(worker)}, "model": {"null" if variant is None else _q(variant)}, '
        f'"cached": {_scalar(cached)}, "attempts": {_scalar(attempts)}, "timings": {_json_text(timings_json)}}}}}\n'
    )


def failed_record(row: Any) -> dict[str, Any]:
    """:func:`failed_line` of an export row (failures are few: the ORM objects are built only for them)."""
    result = Result(
        job_id=row.job_id, seq=row.seq, custom_id=row.custom_id, error_code=row.error_code, error=row.error,
        worker_id=row.worker_id, variant=row.variant, attempts=row.attempts,
    )  # fmt: skip
    return failed_line(result, RequestRow(line=row.line))


def export(
    store: Store, job_id: str, out: Path | None, errors: Path | None, *, skipped: Path | None = None
) -> tuple[int, int]:
    """Write results (and failures) in input order; returns (succeeded, failed) line counts.

    ``skipped`` holds the lines submit refused: they go into the errors file too, in line order among
    the failed rows, so a run's errors file accounts for every line that got no answer.
    """
    ok = bad = 0
    pending = read_skipped(skipped) if errors is not None else []
    pending.reverse()  # pop() from the end yields them in line order
    out_fh: IO[str] | None = None
    err_fh: IO[str] | None = None
    try:
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out_fh = open(out.with_name(out.name + ".part"), "w", encoding="utf-8", buffering=1 << 20)  # noqa: SIM115
        if errors is not None:
            errors.parent.mkdir(parents=True, exist_ok=True)
            err_fh = open(errors.with_name(errors.name + ".part"), "w", encoding="utf-8")  # noqa: SIM115
        with store.session() as s:
            for row in export_rows(s, job_id):
                if row.status == ResultStatus.SUCCEEDED:
                    ok += 1
                    if out_fh:
                        out_fh.write(success_text(row))
                else:
                    bad += 1
                    if err_fh:
                        while pending and pending[-1]["error"]["line"] < row.line:
                            err_fh.write(json.dumps(pending.pop(), ensure_ascii=False) + "\n")
                        err_fh.write(json.dumps(failed_record(row), ensure_ascii=False) + "\n")
            if err_fh:
                for line in reversed(pending):
                    err_fh.write(json.dumps(line, ensure_ascii=False) + "\n")
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


def jsonl_lines(store: Store, job_id: str, *, errors: bool = False) -> Iterator[str]:
    """The output (or, with ``errors``, the error) file as lines, in input order, for streaming over HTTP.

    Same lines as :func:`export` writes; pages of results are read as the client consumes them, so a
    million-row download holds one page in memory, never the file.
    """
    with store.session() as s:
        for row in export_rows(s, job_id):
            if (row.status == ResultStatus.SUCCEEDED) == errors:
                continue
            yield json.dumps(failed_record(row), ensure_ascii=False) + "\n" if errors else success_text(row)
