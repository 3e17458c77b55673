"""Issue 12 end to end: one OpenAI Batch input file using every accepted body field, through `tokenmill run`.

The file names the catalog model in ``body.model`` and the command takes no flags but the output path, as
an OpenAI user would run it. Every output body must validate with the openai SDK's own types, field by
field (object, choice count, usage sums, logprobs shapes), and every constrained row with its schema or
grammar. The per-feature tests (tests/engines/test_structured.py) check each field's effect in depth;
this one checks that a real file carrying all of them at once comes out right through the whole system.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion

from tests.conftest import WORKER_ENV, run_cli
from tokenmill.config import Settings

pytestmark = pytest.mark.model

MODEL = "smollm2-135m-instruct"
CHAT_URL, COMPLETIONS_URL = "/v1/chat/completions", "/v1/completions"
IGNORED = {
    "user": "user-42",
    "metadata": {"team": "eval"},
    "store": False,
    "service_tier": "auto",
    "stream": False,
    "stream_options": {"include_usage": True},
    "parallel_tool_calls": False,
}
COLOURS = [{"role": "user", "content": "Name three colours."}]
YES_NO = 'root ::= "yes" | "no"'

SCHEMAS: dict[str, dict[str, Any]] = {
    "person": {  # nested object, integer, array of bounded strings
        "type": "object",
        "properties": {
            "person": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
                "required": ["name", "age"],
                "additionalProperties": False,
            },
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 2},
        },
        "required": ["person", "tags"],
        "additionalProperties": False,
    },
    "palette": {  # enums, in an array and alone
        "type": "object",
        "properties": {
            "colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
            "mode": {"type": "string", "enum": ["light", "dark"]},
        },
        "required": ["colors", "mode"],
        "additionalProperties": False,
    },
    "stock": {  # number, boolean, integer, a short string
        "type": "object",
        "properties": {
            "price": {"type": "number"},
            "in_stock": {"type": "boolean"},
            "count": {"type": "integer"},
            "sku": {"type": "string", "maxLength": 5},
        },
        "required": ["price", "in_stock", "count", "sku"],
        "additionalProperties": False,
    },
    "answer": {
        "type": "object",
        "properties": {"answer": {"type": "boolean"}},
        "required": ["answer"],
        "additionalProperties": False,
    },
}


def _schema_format(name: str) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


def _chat(text: str, **body: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], **body}


def chat_bodies(banana: int) -> dict[str, dict[str, Any]]:
    """Chat rows by custom_id; ``banana`` is the model's token id for " banana" (for logit_bias)."""
    turns = [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "developer", "content": [{"type": "text", "text": "Be polite."}]},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": [{"type": "text", "text": "And of Italy?"}]},
    ]
    return {
        "turns": {"messages": turns, "max_tokens": 10, "temperature": 0},
        "greedy": {"messages": COLOURS, "max_tokens": 8, "temperature": 0},
        "greedy-ignored": {"messages": COLOURS, "max_tokens": 8, "temperature": 0, **IGNORED},
        "format-text": {"messages": COLOURS, "max_tokens": 8, "temperature": 0, "response_format": {"type": "text"}},
        "top-k-1": {"messages": COLOURS, "max_tokens": 8, "temperature": 1.0, "top_k": 1, "seed": 1},
        "sampling": {"messages": COLOURS, "max_completion_tokens": 8, "temperature": 0.7, "top_p": 0.9,
                     "top_k": 40, "min_p": 0.05, "seed": 7, "presence_penalty": 0.5, "frequency_penalty": 0.5,
                     "repetition_penalty": 1.1},
        "max-completion": _chat("Tell me a long story about a dragon.", max_completion_tokens=3, temperature=0,
                                repeat_penalty=1.2),
        "stop-string": _chat("Tell me about the sea.", max_tokens=16, temperature=0, stop="."),
        "stop-list": _chat("List five fruits, comma separated.", max_tokens=24, temperature=0, stop=[",", "\n"]),
        "forced": _chat("Write a list of fruits.", max_tokens=3, temperature=0, logit_bias={str(banana): 100}),
        "logprobs": _chat("Name a colour.", max_tokens=6, temperature=0, logprobs=True, top_logprobs=3),
        "logprobs-bare": _chat("Name a colour.", max_tokens=4, temperature=0, logprobs=True),
        "n3": {"messages": COLOURS, "max_tokens": 5, "temperature": 0.9, "seed": 5, "n": 3, "logprobs": True,
               "top_logprobs": 1},
        "person": _chat("Describe a person as JSON.", max_tokens=160, temperature=0,
                        response_format=_schema_format("person")),
        "palette": _chat("Pick colours as JSON.", max_tokens=160, temperature=0,
                         response_format=_schema_format("palette")),
        "stock": _chat("Describe a product in stock as JSON.", max_tokens=160, temperature=0,
                       response_format=_schema_format("stock")),
        "json-object-schema": _chat("Is water wet? Answer as JSON.", max_tokens=40, temperature=0,
                                    response_format={"type": "json_object", "schema": SCHEMAS["answer"]}),
        "json-object": _chat("List two fruits as JSON.", max_tokens=20, temperature=0,
                             response_format={"type": "json_object"}),
        "grammar": _chat("Is the sky blue?", max_tokens=4, temperature=0.8, seed=4, grammar=YES_NO),
    }  # fmt: skip


def completion_bodies(banana: int) -> dict[str, dict[str, Any]]:
    return {
        "c-basic": {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0, "stop": "\n",
                    "seed": 3, **IGNORED},
        "c-sampling": {"prompt": "Once upon a time", "max_tokens": 5, "temperature": 0.8, "top_p": 0.95,
                       "top_k": 50, "min_p": 0.02, "presence_penalty": 0.3, "frequency_penalty": 0.3,
                       "repeat_penalty": 1.1, "seed": 9, "n": 2, "logprobs": 1},
        "c-logprobs": {"prompt": "One, two, three,", "max_tokens": 6, "temperature": 0, "logprobs": 2},
        "c-forced": {"prompt": "My favourite fruit:", "max_tokens": 2, "temperature": 0,
                     "logit_bias": {str(banana): 100}},
        "c-json": {"prompt": "A product record in JSON: ", "max_tokens": 160, "temperature": 0,
                   "response_format": _schema_format("stock")},
        "c-grammar": {"prompt": "Is fire hot? Answer yes or no:", "max_tokens": 4, "temperature": 0,
                      "grammar": YES_NO},
    }  # fmt: skip


def banana_token(model_path: Path) -> int:
    """The model's single token for " banana", read from its vocabulary alone (no weights loaded)."""
    from llama_cpp import Llama

    vocab = Llama(model_path=str(model_path), vocab_only=True, verbose=True)  # verbose=False leaks /dev/null handles
    try:
        (token,) = vocab.tokenize(b" banana", add_bos=False, special=False)
    finally:
        vocab.close()
    return int(token)


def write_batch_file(path: Path, banana: int) -> list[str]:
    """The lines in file order, the schema rows (the longest) first so they start in the engine's first wave."""
    lines = [
        (cid, url, body)
        for url, bodies in ((CHAT_URL, chat_bodies(banana)), (COMPLETIONS_URL, completion_bodies(banana)))
        for cid, body in bodies.items()
    ]
    lines.sort(key=lambda line: line[2].get("max_tokens", 0) < 100)
    with path.open("w", encoding="utf-8") as fh:
        for cid, url, body in lines:
            request = {"custom_id": cid, "method": "POST", "url": url, "body": {"model": MODEL, **body}}
            fh.write(json.dumps(request) + "\n")
    return [cid for cid, _, _ in lines]


def test_a_batch_file_using_every_field_runs_with_no_flags(
    tmp_path: Path, settings: Settings, smollm2_path: Path
) -> None:
    data, out = tmp_path / "openai-batch.jsonl", tmp_path / "out.jsonl"
    ids = write_batch_file(data, banana_token(smollm2_path))
    proc = run_cli(settings, "run", str(data), "-o", str(out), env=WORKER_ENV)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(text) for text in out.read_text(encoding="utf-8").splitlines()]
    assert [line["custom_id"] for line in lines] == ids  # one line per input line, in input order
    requests = {**chat_bodies(0), **completion_bodies(0)}
    chats: dict[str, ChatCompletion] = {}
    completions: dict[str, Completion] = {}
    for line in lines:
        cid = line["custom_id"]
        assert line["error"] is None and line["response"]["status_code"] == 200, line
        assert re.fullmatch(r"batch_req_\S+", line["id"]) and line["response"]["request_id"]
        body, n = line["response"]["body"], requests[cid].get("n", 1)
        if cid.startswith("c-"):
            completions[cid] = parsed_c = Completion.model_validate(body)
            check_envelope(parsed_c, "text_completion", n)
        else:
            chats[cid] = parsed = ChatCompletion.model_validate(body)
            check_envelope(parsed, "chat.completion", n)
            assert all(c.message.role == "assistant" and c.message.content is not None for c in parsed.choices)
    check_chat_rows(chats)
    check_completion_rows(completions)


def check_envelope(body: ChatCompletion | Completion, obj: str, n: int) -> None:
    """The fields every body has, exactly as the SDK reads them; the prompt counted once for n choices."""
    assert body.object == obj and body.model == f"{MODEL}:q4_1" and body.id and body.created > 0
    assert len(body.choices) == n and [c.index for c in body.choices] == list(range(n))
    assert all(c.finish_reason in ("stop", "length") for c in body.choices)
    usage = body.usage
    assert usage is not None and usage.prompt_tokens > 0 and usage.completion_tokens >= 1
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def chat_text(body: ChatCompletion, i: int = 0) -> str:
    content = body.choices[i].message.content
    assert content is not None
    return content


def check_chat_rows(rows: dict[str, ChatCompletion]) -> None:
    greedy = chat_text(rows["greedy"])
    assert greedy.strip()
    assert chat_text(rows["greedy-ignored"]) == greedy  # the ignored fields change nothing
    assert chat_text(rows["format-text"]) == greedy  # response_format text is free text
    assert chat_text(rows["top-k-1"]) == greedy  # top_k 1 keeps only the most likely token
    assert chat_text(rows["turns"]).strip()
    capped = rows["max-completion"]
    assert capped.usage is not None and capped.usage.completion_tokens == 3
    assert capped.choices[0].finish_reason == "length"
    assert "." not in chat_text(rows["stop-string"])
    assert not {",", "\n"} & set(chat_text(rows["stop-list"]))
    assert chat_text(rows["forced"]) == " banana" * 3
    check_chat_logprobs(rows["logprobs"], top=3)
    check_chat_logprobs(rows["logprobs-bare"], top=0)
    check_chat_logprobs(rows["n3"], top=1)
    for cid in ("person", "palette", "stock"):
        check_json(cid, rows[cid].choices[0], SCHEMAS[cid])
    check_json("json-object-schema", rows["json-object-schema"].choices[0], SCHEMAS["answer"])
    generic = rows["json-object"].choices[0]
    assert chat_text(rows["json-object"]).lstrip().startswith("{")
    if generic.finish_reason == "stop":
        assert isinstance(json.loads(chat_text(rows["json-object"])), dict)
    assert chat_text(rows["grammar"]) in ("yes", "no") and rows["grammar"].choices[0].finish_reason == "stop"


def check_chat_logprobs(body: ChatCompletion, top: int) -> None:
    """One content entry per generated token, spelling the text; over n choices they sum to the usage."""
    total = 0
    for choice in body.choices:
        assert choice.logprobs is not None and choice.logprobs.content is not None
        content = choice.logprobs.content
        total += len(content)
        assert bytes(b for item in content for b in item.bytes or []).decode() == choice.message.content
        for item in content:
            assert item.logprob <= 0.0 and item.bytes == list(item.token.encode())
            assert len(item.top_logprobs) == top
            tops = [t.logprob for t in item.top_logprobs]
            assert tops == sorted(tops, reverse=True)
    assert body.usage is not None and body.usage.completion_tokens == total


def check_json(cid: str, choice: Any, schema: dict[str, Any]) -> None:
    text = choice.message.content if hasattr(choice, "message") else choice.text
    assert choice.finish_reason == "stop", (cid, text)  # enough tokens given: the object closes
    jsonschema.validate(json.loads(text), schema)


def check_completion_rows(rows: dict[str, Completion]) -> None:
    basic = rows["c-basic"].choices[0].text
    assert basic.strip() and "\n" not in basic
    check_completion_logprobs(rows["c-sampling"], top=1, prompt="Once upon a time")
    check_completion_logprobs(rows["c-logprobs"], top=2, prompt="One, two, three,")
    assert rows["c-forced"].choices[0].text == " banana" * 2
    check_json("c-json", rows["c-json"].choices[0], SCHEMAS["stock"])
    grammar = rows["c-grammar"].choices[0]
    assert grammar.text in ("yes", "no") and grammar.finish_reason == "stop"


def check_completion_logprobs(body: Completion, top: int, prompt: str) -> None:
    """The legacy shape: parallel lists as long as the choice's tokens; they sum to the usage over choices."""
    total = 0
    for choice in body.choices:
        lp = choice.logprobs
        assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
        assert lp.top_logprobs is not None and lp.text_offset is not None
        total += len(lp.tokens)
        assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(lp.tokens)
        assert "".join(lp.tokens) == choice.text
        # offsets into prompt + completion, as OpenAI (and llama-cpp-python) count them without echo
        assert lp.text_offset == [len(prompt) + sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
        assert all(x is not None and x <= 0.0 for x in lp.token_logprobs)
        assert all(1 <= len(alts) <= top and max(alts.values()) <= 0.0 for alts in lp.top_logprobs)
    assert body.usage is not None and body.usage.completion_tokens == total
