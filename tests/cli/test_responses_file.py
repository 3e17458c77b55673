"""A /v1/responses batch file through `tokenmill run` with no flags but the output path, on the real model: every
output line is OpenAI's batch output line around a body the SDK's ``Response`` type reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from openai.types.responses import Response

from tests.conftest import WORKER_ENV, run_cli
from tokenmill.config import Settings

pytestmark = pytest.mark.model

MODEL = "smollm2-135m-instruct"
PICK = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 1, "maximum": 9},
    },
    "required": ["colour", "count"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}}, "required": ["city"],
                   "additionalProperties": False},
    "strict": True,
}  # fmt: skip
BODIES: dict[str, dict[str, Any]] = {
    "text": {"input": "Name a colour.", "instructions": "Answer in one word.", "max_output_tokens": 8,
             "temperature": 0, "metadata": {"run": "cli"}, "store": False, "user": "u-1"},
    "cut": {"input": [{"role": "user", "content": [{"type": "input_text", "text": "Tell me a long story."}]}],
            "max_output_tokens": 3, "temperature": 0},
    "schema": {"input": "Pick a colour and a count as JSON.", "max_output_tokens": 40, "temperature": 0,
               "text": {"format": {"type": "json_schema", "name": "pick", "schema": PICK, "strict": True}}},
    "call": {"input": "What is the weather in Paris?", "tools": [WEATHER], "tool_choice": "required",
             "parallel_tool_calls": False, "max_output_tokens": 40, "temperature": 0},
    "history": {"input": [
        {"role": "user", "content": "What is the weather in Oslo?"},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "4 degrees and rain"},
    ], "tools": [WEATHER], "tool_choice": "none", "max_output_tokens": 12, "temperature": 0},
}  # fmt: skip


@pytest.mark.timeout(600)
def test_a_responses_file_runs_with_no_flags(tmp_path: Path, settings: Settings) -> None:
    data, out = tmp_path / "responses.jsonl", tmp_path / "out.jsonl"
    with data.open("w", encoding="utf-8") as fh:
        for cid, body in BODIES.items():
            line = {"custom_id": cid, "method": "POST", "url": "/v1/responses", "body": {"model": MODEL, **body}}
            fh.write(json.dumps(line) + "\n")
    proc = run_cli(settings, "run", str(data), "-o", str(out), env=WORKER_ENV)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(text) for text in out.read_text(encoding="utf-8").splitlines()]
    assert [line["custom_id"] for line in lines] == list(BODIES)
    responses: dict[str, Response] = {}
    for line in lines:
        assert line["error"] is None and line["response"]["status_code"] == 200, line
        responses[line["custom_id"]] = r = Response.model_validate(line["response"]["body"])
        assert r.object == "response" and r.id.startswith("resp_") and r.model == f"{MODEL}:q4_1"
        usage = r.usage
        assert usage is not None and usage.input_tokens > 0 and usage.output_tokens >= 1
        assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    text = responses["text"]
    assert text.status == "completed" and text.output_text.strip() and text.metadata == {"run": "cli"}
    assert text.instructions == "Answer in one word." and text.max_output_tokens == 8
    cut = responses["cut"]
    assert cut.status == "incomplete" and cut.incomplete_details is not None
    assert cut.incomplete_details.reason == "max_output_tokens" and cut.usage and cut.usage.output_tokens == 3
    schema = responses["schema"]
    assert schema.text is not None and schema.text.format is not None and schema.text.format.type == "json_schema"
    if schema.status == "completed":
        jsonschema.validate(json.loads(schema.output_text), PICK)
    (call,) = responses["call"].output
    assert call.type == "function_call" and call.name == "get_weather" and responses["call"].status == "completed"
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    assert [item.type for item in responses["history"].output] == ["message"]
