"""`tokenmill run` on an OpenAI /v1/embeddings batch file: real CLI, worker process, embedding model, SQLite."""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from openai.types import CreateEmbeddingResponse

from tests.conftest import run_cli
from tokenmill.config import Settings

pytestmark = pytest.mark.model


def line(cid: str, body: dict[str, object]) -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/embeddings", "body": body}) + "\n"


def test_run_embeddings_file(tmp_path: Path, settings: Settings, minilm_path: Path) -> None:
    data = tmp_path / "embed.jsonl"
    data.write_text(
        line("one", {"model": "all-minilm-l6-v2", "input": "The cat sits on the mat."})
        + line("pair", {"input": ["A cat is sitting on a rug.", "Stock markets fell sharply."],
                        "encoding_format": "base64", "user": "u-1"})
        + line("tokens", {"input": [[101, 1996, 4937, 102], [101, 102]]})
        + line("too-long", {"input": ["fine", "word " * 700]}),
        encoding="utf-8",
    )
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    proc = run_cli(settings, "run", str(data), "--model", "all-minilm-l6-v2", "-o", str(out), "--errors", str(err),
                   "--workers", "1", "--threads", "2")  # fmt: skip
    assert proc.returncode == 7, proc.stderr  # one row failed, the others succeeded
    lines = {json.loads(x)["custom_id"]: json.loads(x) for x in out.read_text().splitlines()}
    assert set(lines) == {"one", "pair", "tokens"}
    bodies = {cid: v["response"]["body"] for cid, v in lines.items()}
    for cid in ("one", "tokens"):
        parsed = CreateEmbeddingResponse.model_validate(bodies[cid])
        assert parsed.model == "all-minilm-l6-v2:f16"
        for item in parsed.data:
            assert len(item.embedding) == 384
            assert abs(float(np.linalg.norm(item.embedding)) - 1.0) < 1e-5
    assert len(bodies["tokens"]["data"]) == 2 and bodies["tokens"]["usage"]["prompt_tokens"] == 6
    pair = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in bodies["pair"]["data"]]
    cat = np.asarray(bodies["one"]["data"][0]["embedding"])
    assert [d["index"] for d in bodies["pair"]["data"]] == [0, 1]
    assert float(cat @ pair[0]) > 0.5 > float(cat @ pair[1]) + 0.3  # paraphrase vs unrelated
    assert struct.calcsize("<384f") == len(base64.b64decode(bodies["pair"]["data"][0]["embedding"]))
    errors = [json.loads(x) for x in err.read_text().splitlines()]
    assert [e["custom_id"] for e in errors] == ["too-long"]
    assert errors[0]["error"]["code"] == "context_length_exceeded" and "input[1]" in errors[0]["error"]["message"]


def test_run_refuses_a_file_mixing_generation_and_embeddings(tmp_path: Path, settings: Settings) -> None:
    data = tmp_path / "mixed.jsonl"
    chat = {"custom_id": "c", "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": "hi"}]}}
    data.write_text(line("e", {"input": "x"}) + json.dumps(chat) + "\n", encoding="utf-8")
    proc = run_cli(settings, "run", str(data), timeout=60)
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
    message = " ".join(proc.stderr.split())
    assert f"{data}:2" in message and "either generation or embeddings" in message


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (json.dumps({"custom_id": "c", "messages": [{"role": "user", "content": "hi"}]}),
         "field 'url': is a generation request, but all-minilm-l6-v2 is an embedding model"),
        (line("d", {"input": "x", "dimensions": 64}).strip(),
         "field 'body.dimensions': dimensions=64 is not supported: all-minilm-l6-v2 gives 384-dimensional"),
    ],
)
def test_run_refuses_lines_the_model_cannot_serve(tmp_path: Path, settings: Settings, text: str, words: str) -> None:
    data = tmp_path / "in.jsonl"
    data.write_text(text + "\n", encoding="utf-8")
    proc = run_cli(settings, "run", str(data), "--model", "all-minilm-l6-v2", timeout=60)
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
    message = " ".join(proc.stderr.split())
    assert f"{data}:1" in message and words in message
