"""The overnight document workflow from the CLI: a folder of .txt/.md files and a template file in,
one result per file (or per part of a long file) out, each traceable to its file.
"""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import select

from tests.conftest import run_cli
from tests.observability.helpers import STUB_WORKER_ENV
from tokenmill.config import Settings
from tokenmill.models.tokenizer import load_tokenizer
from tokenmill.store import Store
from tokenmill.store.tables import Job, RequestRow

TEMPLATE = "Summarize {name} (part {part} of {parts}) in one line.\n\n{text}"


def make_docs(root: Path) -> Path:
    docs = root / "docs"
    (docs / "notes").mkdir(parents=True)
    (docs / "a.txt").write_text("Alpha quarterly report. Revenue grew.\n", encoding="utf-8")
    (docs / "notes" / "b.md").write_text("# Beta\n\nMeeting notes: ship on Friday.\n", encoding="utf-8")
    paragraphs = [f"Paragraph {i}: " + " ".join(f"word{i}x{j}" for j in range(30)) for i in range(6)]
    (docs / "long.txt").write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")  # ~1.3k chars, 880 tokens
    (docs / ".hidden.txt").write_text("never read\n", encoding="utf-8")
    (docs / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (root / "prompt.txt").write_text(TEMPLATE + "\n", encoding="utf-8")
    return docs


def stored_prompts(settings: Settings, job_id: str) -> dict[str, str]:
    store = Store(settings.database_url)
    try:
        with store.session() as s:
            rows = s.scalars(select(RequestRow).where(RequestRow.job_id == job_id).order_by(RequestRow.seq))
            return {r.custom_id: r.payload["messages"][-1]["content"] for r in rows}
    finally:
        store.dispose()


def test_folder_with_template_runs_and_maps_back_to_files(
    tmp_path: Path, settings: Settings, smollm2_path: Path
) -> None:
    docs = make_docs(tmp_path)
    proc = run_cli(settings, "run", str(docs), "--template", str(tmp_path / "prompt.txt"), "--token-budget", "200",
                   "--workers", "1", "--threads", "1", "--max-tokens", "4", env=STUB_WORKER_ENV)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "docs.results.jsonl"  # next to the folder, like data.jsonl → data.results.jsonl
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    ids = [line["custom_id"] for line in lines]
    parts = [i for i in ids if i.startswith("long.txt#part-")]
    assert len(parts) == 6  # six paragraphs of 145 SmolLM2 tokens: one per 200-token part
    assert ids == ["a.txt", *[f"long.txt#part-{k}" for k in range(1, len(parts) + 1)], "notes/b.md"]
    for line in lines:
        source = line["custom_id"].split("#", 1)[0]
        assert line["tokenmill"]["source"] == source
        assert line["response"]["body"]["choices"][0]["message"]["content"] == f"echo:{line['custom_id']}"

    with Store(settings.database_url).session() as s:
        job_id = s.scalars(select(Job.id)).one()
    prompts = stored_prompts(settings, job_id)
    tokenizer = load_tokenizer(smollm2_path)
    assert prompts["a.txt"] == "Summarize a.txt (part 1 of 1) in one line.\n\nAlpha quarterly report. Revenue grew."
    assert prompts["notes/b.md"].startswith("Summarize notes/b.md (part 1 of 1)")
    text_of_parts = []
    for k in range(1, len(parts) + 1):
        prompt = prompts[f"long.txt#part-{k}"]
        head, body = prompt.split("\n\n", 1)
        assert head == f"Summarize long.txt (part {k} of {len(parts)}) in one line."
        assert tokenizer.count(body) <= 200  # the budget, counted with the model's own tokenizer
        text_of_parts.append(body)
    original = (docs / "long.txt").read_text(encoding="utf-8").strip()
    assert "\n\n".join(text_of_parts) == original  # split at paragraphs: nothing lost, nothing repeated


def test_submit_folder_default_budget_and_clean_errors(tmp_path: Path, settings: Settings) -> None:
    docs = make_docs(tmp_path)
    proc = run_cli(settings, "submit", str(docs), "--template", str(tmp_path / "prompt.txt"), timeout=60)
    assert proc.returncode == 0, proc.stderr
    (job_id,) = proc.stdout.split()
    # A fleet worker's default context (2048 tokens with max_tokens 256): the 880-token file stays whole,
    # counted with the model's tokenizer.
    assert list(stored_prompts(settings, job_id)) == ["a.txt", "long.txt", "notes/b.md"]
    with Store(settings.database_url).session() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.options["exact_budget"] is True and job.options["token_budget"] is None

    no_template = run_cli(settings, "submit", str(docs), timeout=60)
    assert no_template.returncode == 3 and "needs --template" in no_template.stderr
    bad_field = run_cli(settings, "submit", str(docs), "--template", "{text} by {author}", timeout=60)
    assert bad_field.returncode == 2 and "{author}" in bad_field.stderr
    zero = run_cli(settings, "submit", str(docs), "--template", "{text}", "--token-budget", "0", timeout=60)
    assert zero.returncode == 2 and "Traceback" not in zero.stderr
