"""Bad input through the real CLI: a clean exit code, ONE line on stderr naming file (and line), no
traceback, and nothing already in the store lost. The parser itself is covered in tests/test_datasets.py;
this is the command-line contract, against a store that already holds a completed job."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import pytest
from sqlalchemy import text

from tests.conftest import run_cli
from tokenmill.config import Settings
from tokenmill.rows import COMPLETIONS, DatasetRow, SamplingParams
from tokenmill.scheduler.submit import submit_rows
from tokenmill.store import Store
from tokenmill.store import results as store_results

SECRET = "s3cretpw"
GOOD = '{"id": "ok-1", "prompt": "fine"}\n'


def batch(url: str = "/v1/chat/completions", method: str = "POST") -> str:
    body = {"messages": [{"role": "user", "content": "hi"}]}
    return json.dumps({"custom_id": "b", "method": method, "url": url, "body": body}) + "\n"


@dataclass
class Case:
    name: str
    content: bytes | None  # None: the path is made by `make` (or does not exist)
    code: int
    line: int | None = None  # the line the message must name
    words: tuple[str, ...] = ()  # also in the message (lowercased match)
    args: tuple[str, ...] = ()
    command: str = "submit"
    make: Callable[[Path], None] | None = None
    names_file: bool = True


def _documents_with_escape(folder: Path) -> None:
    """A folder of documents where one is a symlink to a file outside it (a dataset must not read it)."""
    folder.mkdir()
    (folder / "a.txt").write_text("a document", encoding="utf-8")
    outside = folder.parent / "secret.txt"
    outside.write_text("not yours", encoding="utf-8")
    (folder / "b.txt").symlink_to(outside)


CASES = [
    Case("malformed-json", (GOOD + '{"prompt": "x",\n').encode(), 3, 2),
    Case("not-an-object", (GOOD + "[1, 2]\n").encode(), 3, 2),
    Case("missing-prompt", (GOOD + '{"id": "x", "max_tokens": 5}\n').encode(), 3, 2),
    Case("wrong-type", (GOOD + '{"prompt": 42}\n').encode(), 3, 2, ("prompt",)),
    Case("unknown-role", (GOOD + '{"messages": [{"role": "wizard", "content": "hi"}]}\n').encode(), 3, 2, ("role",)),
    Case("negative-max-tokens", (GOOD + '{"prompt": "x", "max_tokens": -3}\n').encode(), 3, 2, ("max_tokens",)),
    Case("fractional-max-tokens", (GOOD + '{"prompt": "x", "max_tokens": 2.5}\n').encode(), 3, 2, ("max_tokens",)),
    Case("temperature-range", (GOOD + '{"prompt": "x", "temperature": 7}\n').encode(), 3, 2, ("temperature",)),
    Case("top-p-range", (GOOD + '{"prompt": "x", "top_p": 1.5}\n').encode(), 3, 2, ("top_p",)),
    Case(
        "duplicate-id",
        (GOOD + '{"id": "x", "prompt": "a"}\n{"id": "x", "prompt": "b"}\n').encode(),
        3,
        3,
        ("duplicate",),
    ),
    Case("unsupported-endpoint", (GOOD + batch(url="/v1/moderations")).encode(), 3, 2, ("url",)),
    Case("unsupported-method", (GOOD + batch(method="GET")).encode(), 3, 2, ("method",)),
    Case("invalid-utf8", GOOD.encode() + b'{"prompt": "\xff\xfe"}\n', 3, 2, ("utf-8",)),
    Case("binary-file", b"\x00\x01\x02\x03" * 64, 3, None, ("binary",)),
    Case("gzip-file", b"\x1f\x8b\x08\x00" + b"\x00" * 64, 3, None, ("gzip",)),
    Case("empty-file", b"", 3, None, ("empty",)),
    Case("directory", None, 3, make=lambda p: p.mkdir()),
    Case("missing-file", None, 3, words=("no such file",)),
    Case("bracketed-name", (GOOD + '{"prompt": 3}\n').encode(), 3, 2),  # rich markup must not eat "[x]"
    Case(
        "unknown-model", GOOD.encode(), 4, words=("smollm3-9000b",), args=("--model", "smollm3-9000b"), names_file=False
    ),
    Case("template-attribute", GOOD.encode(), 2, words=("{a.b}",), args=("--template", "{a.b}"), names_file=False),
    Case("template-index", GOOD.encode(), 2, words=("{0[x]}",), args=("--template", "{0[x]}"), names_file=False),
    Case(
        "database-unreachable",
        GOOD.encode(),
        5,
        words=("unreachable", "***"),
        args=("--database-url", f"postgresql://tm:{SECRET}@127.0.0.1:1/tm"),
        names_file=False,
    ),
    Case(
        "broker-unreachable",
        GOOD.encode(),
        5,
        words=("broker", "unreachable", "***"),
        args=("--broker-url", f"redis://:{SECRET}@127.0.0.1:1/0"),
        command="run",
        names_file=False,
    ),
    Case(
        "document-symlink-escape",
        None,
        3,
        words=("symlink", "outside"),
        args=("--template", "Summarize: {text}"),
        make=lambda p: _documents_with_escape(p),
    ),
    Case("run-malformed-json", (GOOD + "{nope\n").encode(), 3, 2, command="run"),
]


class Snapshot(TypedDict):
    counts: dict[str, int | None]
    jobs: list[tuple[object, ...]]


def store_snapshot(settings: Settings) -> Snapshot:
    store = Store(settings.database_url)
    try:
        with store.session() as s:
            counts = {t: s.execute(text(f"SELECT count(*) FROM {t}")).scalar() for t in ("jobs", "requests", "results")}
            jobs = s.execute(text("SELECT id, state, total_rows FROM jobs ORDER BY id")).all()
        return Snapshot(counts=counts, jobs=[tuple(j) for j in jobs])
    finally:
        store.dispose()


@pytest.fixture
def completed_store(settings: Settings) -> Iterator[Snapshot]:
    """The embedded store with one completed job of 3 answered rows in it."""
    store = Store(settings.database_url)
    store.migrate()
    rows = [DatasetRow(i + 1, f"done-{i}", COMPLETIONS, prompt=f"p{i}", params=SamplingParams()) for i in range(3)]
    job = submit_rows(store, rows, name="earlier", key="k", family="smollm2-135m-instruct", pinned_quant=None,
                      chunk_size=2)  # fmt: skip
    with store.session() as s:
        for i, row in enumerate(rows):
            store_results.write_result(s, {"job_id": job, "seq": i, "custom_id": row.custom_id,
                                           "status": "succeeded", "body": {"x": i}})  # fmt: skip
        s.execute(text("UPDATE chunks SET state = 'done' WHERE job_id = :j"), {"j": job})
        s.execute(text("UPDATE jobs SET state = 'completed' WHERE id = :j"), {"j": job})
    store.dispose()
    before = store_snapshot(settings)
    assert before["counts"] == {"jobs": 1, "requests": 3, "results": 3}
    yield before


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_clean_line_and_loses_nothing(
    case: Case, tmp_path: Path, settings: Settings, completed_store: Snapshot
) -> None:
    path = tmp_path / ("bad[x].jsonl" if case.name == "bracketed-name" else f"{case.name}.jsonl")
    if case.content is not None:
        path.write_bytes(case.content)
    if case.make is not None:
        case.make(path)
    url_args = tuple(a for a in case.args if a in ("--database-url", "--broker-url"))
    # URL options belong to the root command: `tokenmill --database-url URL submit FILE`.
    root: tuple[str, ...] = ()
    args = list(case.args)
    for opt in url_args:
        i = args.index(opt)
        root += (opt, args[i + 1])
        del args[i : i + 2]
    proc = run_cli(settings, *root, case.command, str(path), *args, timeout=90, env={"COLUMNS": "80"})
    err = proc.stderr
    lines = err.strip().splitlines()
    print(f"\n{case.name}: exit {proc.returncode}: {err.strip()}")
    assert proc.returncode == case.code, err
    assert "Traceback" not in err and SECRET not in err and SECRET not in proc.stdout
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    message = lines[0].lower()
    if case.names_file:
        where = f"{path}:{case.line}:" if case.line else str(path)
        assert where.lower() in message, (where, err)
    for word in case.words:
        assert word.lower() in message, (word, err)
    assert store_snapshot(settings) == completed_store  # nothing stored lost, no half job added


def test_skip_invalid_runs_good_lines_and_reports_bad_ones(
    tmp_path: Path, settings: Settings, completed_store: Snapshot
) -> None:
    good = [{"id": f"g{i}", "prompt": f"good {i}"} for i in range(4)]
    lines = [
        json.dumps(good[0]), '{"prompt": 42}', json.dumps(good[1]), "not json", json.dumps(good[2]),
        '{"prompt": "x", "max_tokens": -1}', json.dumps(good[3]),
    ]  # fmt: skip
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    errors = tmp_path / "mixed.errors.jsonl"
    proc = run_cli(settings, "submit", str(path), "--skip-invalid", "--errors", str(errors), timeout=90)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().splitlines()[-1]
    rejected = [json.loads(line) for line in errors.read_text().splitlines()]
    assert [r["error"]["line"] for r in rejected] == [2, 4, 6], rejected
    assert all(r["error"]["message"] for r in rejected)
    store = Store(settings.database_url)
    try:
        with store.session() as s:
            stored = s.execute(text("SELECT custom_id, line FROM requests WHERE job_id = :j ORDER BY seq"),
                               {"j": job}).all()  # fmt: skip
    finally:
        store.dispose()
    assert [tuple(r) for r in stored] == [("g0", 1), ("g1", 3), ("g2", 5), ("g3", 7)]
    after = store_snapshot(settings)
    assert after["counts"] == {"jobs": 2, "requests": 3 + 4, "results": 3}
    assert completed_store["jobs"][0] in after["jobs"]
