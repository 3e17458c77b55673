"""`tokenmill report` on a real SQLite store filled with realistic results, rendered in real Chromium."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from tests.conftest import REPO, need
from tokenmill.cli.report import register
from tokenmill.errors import JobNotFound
from tokenmill.report import write_report
from tokenmill.report.ab import response_text
from tokenmill.report.data import NoResultsYet, Reservoir, load_report
from tokenmill.rows import CHAT, COMPLETIONS, DatasetRow, SamplingParams
from tokenmill.store import Store
from tokenmill.store import jobs as store_jobs
from tokenmill.store import results as store_results

BASE = 1_764_000_000.0  # 2025-11-24, a fixed clock so the numbers below are exact
WALL_S = 100.0
N_ROWS = 24
FAILED = {5, 13, 21}
CACHED = {2}
COMPLETION = 30
WORKERS = (("cpu-host-a:1234", "qwen2.5-7b-instruct:q4_k_m"), ("gpu-host-b:5678", "qwen2.5-7b-instruct:q8_0"))
EVIL_ID = "<script>alert('x')</script>"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SLUGS = (
    "throughput_over_time",
    "ttft_distribution",
    "inter_token_latency",
    "tokens_per_second_by_variant",
    "prompt_length_vs_latency",
    "failures_by_reason",
)


def chat_row(i: int, custom_id: str) -> DatasetRow:
    return DatasetRow(
        line=i + 1,
        custom_id=custom_id,
        endpoint=CHAT,
        messages=({"role": "user", "content": f"Summarize review {i}: " + "great product " * (i + 1)},),
        params=SamplingParams(max_tokens=64, temperature=0.0, seed=7),
    )


def chat_body(text: str, variant: str, prompt: int, completion: int) -> dict[str, Any]:
    return {
        "id": "chatcmpl-x",
        "object": "chat.completion",
        "model": variant,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
    }


def timings(prompt: int, completion: int, worker: int) -> dict[str, Any]:
    """Shaped like tokenmill.output.timings: a 7B model, ~5 tok/s on the CPU worker, ~40 tok/s on the GPU."""
    ttft = (180.0, 40.0)[worker] + prompt * (2.0, 0.4)[worker]
    per_token = (200.0, 25.0)[worker] * (1 + 0.08 * ((prompt * 7) % 5 - 2))
    token_ms = [ttft] + [per_token * (1 + 0.3 * ((j * 37 + prompt) % 11) / 10) for j in range(completion - 1)]
    eval_ms = sum(token_ms[1:])
    total = ttft + eval_ms
    return {
        "queue_ms": 120.0,
        "load_ms": 0.0,
        "prompt_eval_ms": ttft - 2.0,
        "ttft_ms": ttft,
        "eval_ms": eval_ms,
        "total_ms": total,
        "tokens_per_second": (completion - 1) / (eval_ms / 1000),
        "cached_prompt_tokens": 0,
        "token_ms": token_ms,
        "ollama": {"eval_count": completion, "eval_duration": int(eval_ms * 1e6), "total_duration": int(total * 1e6)},
        "llama_server": {"prompt_n": prompt, "predicted_n": completion, "predicted_ms": eval_ms},
    }


def custom_id(i: int) -> str:
    return EVIL_ID if i == 5 else f"review-{i:03d}"  # a failed row: its id is listed on the page


def make_job(store: Store) -> str:
    """24 chat rows on two workers and two variants, 3 over-long rows failed, 1 answered from the cache."""
    with store.session() as s:
        job = store_jobs.create_job(
            s,
            key="k",
            name="reviews <b>bold</b>.jsonl",
            family="qwen2.5-7b-instruct",
            queue="tm.qwen2.5-7b-instruct",
            chunk_size=8,
        )
        store_jobs.ingest_rows(s, job, [chat_row(i, custom_id(i)) for i in range(N_ROWS)])
        job.started_at = BASE
        job.state = "completed_with_errors"
        job_id = job.id
    with store.session() as s:
        for i in range(N_ROWS):
            worker = i % 2
            wid, variant = WORKERS[worker]
            end = BASE + WALL_S - (N_ROWS - 1 - i) * 4.0
            prompt = 20 + 7 * i
            values: dict[str, Any] = {"job_id": job_id, "seq": i, "custom_id": custom_id(i), "worker_id": wid}
            values.update(variant=variant, created_at=end, prompt_tokens=prompt)
            if i in FAILED:
                values.update(
                    status="failed",
                    error_code="context_length_exceeded",
                    error=f"line {i + 1}: prompt of 9000 tokens does not fit <n_ctx=2048>",
                )
            else:
                values.update(
                    status="succeeded",
                    body=chat_body(f"Review {i} is positive.", variant, prompt, COMPLETION),
                    timings=timings(prompt, COMPLETION, worker),
                    completion_tokens=COMPLETION,
                    cached=i in CACHED,
                )
            assert store_results.write_result(s, values)
    return job_id


class _Doc(HTMLParser):
    """Just enough of the page: the summary's row → value pairs and every <img>'s attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.summary: dict[str, str] = {}
        self.images: list[dict[str, str]] = []
        self._in_summary = False
        self._cell: str | None = None
        self._key = ""
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "img":
            self.images.append(a)
        if a.get("id") == "summary":
            self._in_summary = True
        if self._in_summary and tag in ("th", "td"):
            self._cell, self._text = tag, []

    def handle_endtag(self, tag: str) -> None:
        if self._in_summary and tag == self._cell:
            text = "".join(self._text).strip()
            if tag == "th":
                self._key = text
            else:
                self.summary[self._key] = text
            self._cell = None
        if self._in_summary and tag == "table":
            self._in_summary = False

    def handle_data(self, data: str) -> None:
        if self._cell:
            self._text.append(data)


def parse(page: str) -> _Doc:
    doc = _Doc()
    doc.feed(page)
    return doc


@pytest.fixture
def job_id(store: Store) -> str:
    return make_job(store)


def render(store: Store, job: str, tmp_path: Path, **kw: Any) -> str:
    out = tmp_path / "report.html"
    write_report(store, job, output=out, **kw)
    return out.read_text(encoding="utf-8")


def test_html_report_embeds_six_plots_and_true_numbers(store: Store, job_id: str, tmp_path: Path) -> None:
    with store.session() as s:  # two tasks' engine slot use
        store_jobs.add_slot_use(s, job_id, steps=150, slots=1200, filled=1150)
        store_jobs.add_slot_use(s, job_id, steps=50, slots=400, filled=370)
    page = render(store, job_id, tmp_path)
    assert page.count("data:image/png;base64,") == 6
    pngs = [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]
    assert len(pngs) == 6
    for png in pngs:
        assert png.startswith(PNG_MAGIC)
        assert 10_000 < len(png) < 2_000_000
    doc = parse(page)
    summary = doc.summary
    succeeded = N_ROWS - len(FAILED)
    generated = (succeeded - len(CACHED)) * COMPLETION
    assert summary["Rows"] == str(N_ROWS)
    assert summary["Finished"] == str(N_ROWS)
    assert summary["Pending"] == "0"
    assert summary["Succeeded"] == str(succeeded)
    assert summary["Failed"] == str(len(FAILED))
    assert summary["Cached"] == str(len(CACHED))
    assert summary["Completion tokens"] == str(succeeded * COMPLETION)
    assert summary["Generated tokens (not cached)"] == str(generated)
    assert summary["Wall time"].startswith("1m 40s")
    assert summary["End-to-end throughput"] == f"{generated / WALL_S:,.1f} tok/s"
    assert summary["Engine busy (slots filled / available)"] == "95.0 % over 200 decode steps"
    fresh = [i for i in range(N_ROWS) if i not in FAILED | CACHED]
    ttfts = [timings(20 + 7 * i, COMPLETION, i % 2)["ttft_ms"] for i in fresh]
    assert summary["TTFT mean / p50 / p95"].startswith(f"{sum(ttfts) / len(ttfts):,.1f} / ")
    assert "context_length_exceeded" in page
    # Everything that came from data is escaped, never live markup.
    assert EVIL_ID not in page and "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in page
    assert "<b>bold</b>" not in page and "reviews &lt;b&gt;bold&lt;/b&gt;.jsonl" in page
    assert "&lt;n_ctx=2048&gt;" in page
    assert "<script" not in page.lower()


def test_throughput_series_conserves_generated_tokens(store: Store, job_id: str) -> None:
    report = load_report(store, job_id).job
    tp = report.throughput
    assert sum(tp.total) * tp.bucket_s == pytest.approx(report.generated_tokens)
    assert set(tp.per_worker) == {w for w, _ in WORKERS}
    assert {w.worker_id: w.rows for w in report.workers} == {w: N_ROWS // 2 for w, _ in WORKERS}
    assert [v.variant for v in report.variants] == [v for _, v in WORKERS]
    itl_per_row = COMPLETION - 1
    assert report.itl.count == (N_ROWS - len(FAILED) - len(CACHED)) * itl_per_row
    assert report.failures == [("context_length_exceeded", len(FAILED))]


def test_reservoir_is_a_uniform_sample_with_exact_totals() -> None:
    sample: Reservoir[int] = Reservoir(500, seed=3)
    sample.extend(range(50_000))
    for v in range(50_000, 100_000):
        sample.add(v)
    assert sample.seen == 100_000 and len(sample.items) == 500 == len(set(sample.items))
    assert 40_000 < sum(sample.items) / 500 < 60_000  # the mean of a uniform sample of 0..99,999
    assert sum(1 for v in sample.items if v >= 50_000) > 180  # the second half is represented too
    small: Reservoir[int] = Reservoir(10)
    small.extend(range(4))
    assert small.items == [0, 1, 2, 3]


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    need(path is not None, "chromium (apt-get install chromium)")
    assert path is not None
    return path


def _chromium_run(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
    ]
    return subprocess.run([binary, *flags, *args], capture_output=True, text=True, timeout=180)


def test_report_renders_in_headless_chromium(store: Store, job_id: str, tmp_path: Path) -> None:
    binary = _chromium()
    page = tmp_path / "report.html"
    write_report(store, job_id, output=page, cost_per_hour=0.5, api_price=0.6)
    url = page.resolve().as_uri()
    dom = _chromium_run(binary, tmp_path / "profile-dom", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    images = parse(dom.stdout).images
    assert len(images) == 6
    from tokenmill.report import plots

    expected = {p.alt for p in plots.render_all(load_report(store, job_id).job)}
    assert {img["alt"] for img in images} == expected
    assert all(img["title"] and img["src"].startswith("data:image/png;base64,") for img in images)
    assert "Summary" in dom.stdout and "Failures by reason" in dom.stdout

    shot = tmp_path / "screenshot.png"
    run = _chromium_run(binary, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1400,4000", url)
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    assert shot.read_bytes().startswith(PNG_MAGIC)
    assert shot.stat().st_size > 100_000
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(shot) as im:
        assert im.size == (1400, 4000)
        colours = im.convert("RGB").getcolors(maxcolors=1 << 22)
    assert colours is not None and len(colours) > 500


def make_ab_pair(store: Store) -> tuple[str, str]:
    """Five rows on two pinned variants: rows 0-2 agree, row 3 differs, row 4 failed on B (not compared)."""
    a_texts = ["Positive.", "Negative.", "Neutral.", "The <i>battery</i> lasts long.", "Positive."]
    b_texts = ["Positive.", "Negative.", "Neutral.", "Shipping was slow & costly.", None]
    ids = []
    for variant, texts in (("smollm2-135m-instruct:q4_1", a_texts), ("smollm2-135m-instruct:q8_0", b_texts)):
        with store.session() as s:
            job = store_jobs.create_job(
                s,
                key="ab",
                name="ab.jsonl",
                family="smollm2-135m-instruct",
                queue="tm.smollm2",
                chunk_size=8,
                pinned_variant=variant,
                ab_group="grp1",
            )
            store_jobs.ingest_rows(s, job, [chat_row(i, f"ab-{i}") for i in range(len(texts))])
            job.started_at = BASE
            for i, text in enumerate(texts):
                values: dict[str, Any] = {"job_id": job.id, "seq": i, "custom_id": f"ab-{i}", "variant": variant}
                values.update(worker_id="w1", created_at=BASE + 1 + i, prompt_tokens=40)
                if text is None:
                    values.update(status="failed", error_code="generation_failed", error="boom")
                else:
                    values.update(
                        status="succeeded",
                        body=chat_body(text, variant, 40, 12),
                        timings=timings(40, 12, 1 if variant.endswith("q8_0") else 0),
                        completion_tokens=12,
                    )
                store_results.write_result(s, values)
            ids.append(job.id)
    return ids[0], ids[1]


def test_ab_report_measures_output_agreement(store: Store, tmp_path: Path) -> None:
    a, b = make_ab_pair(store)
    report = load_report(store, a)
    assert report.ab is not None
    assert (report.ab.compared, report.ab.exact, report.ab.exact_rate) == (4, 3, 0.75)
    assert report.ab.b.job_id == b
    assert [r.custom_id for r in report.ab.most_different] == ["ab-3"]
    assert 0.25 < report.ab.mean_similarity < 1.0
    page = render(store, a, tmp_path)
    assert "exact match <b>3 of 4 (75.0%)</b>" in page
    assert "The &lt;i&gt;battery&lt;/i&gt; lasts long." in page and "Shipping was slow &amp; costly." in page
    assert "smollm2-135m-instruct:q8_0" in page
    # --ab names the partner explicitly, from either side.
    assert load_report(store, b, ab=a).ab is not None


def test_response_text_reads_chat_and_completions_bodies() -> None:
    assert response_text({"choices": [{"message": {"content": "hi"}}]}) == "hi"
    assert response_text({"choices": [{"text": "plain"}]}) == "plain"
    assert response_text(None) == "" and response_text({"choices": []}) == ""
    row = DatasetRow(line=1, custom_id="c", endpoint=COMPLETIONS, prompt="x")
    assert row.endpoint == COMPLETIONS


def test_cost_line_uses_the_measured_rate(store: Store, job_id: str, tmp_path: Path) -> None:
    rate = (N_ROWS - len(FAILED) - len(CACHED)) * COMPLETION / WALL_S  # 6 tok/s
    per_million = 0.50 / (rate * 3600) * 1e6
    page = render(store, job_id, tmp_path, cost_per_hour=0.50, api_price=0.60)
    assert f"${per_million:,.2f} per 1M generated tokens" in page  # $23.15
    assert "$0.60 per 1M from the API" in page and "at $0.50/hour" in page
    assert f"ratio {0.60 / per_million:,.2f}" in page and "the API is" in page
    hint = render(store, job_id, tmp_path)
    assert "--cost-per-hour X" in hint and "per 1M generated tokens</b>" not in hint


def cli() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """A group, so `report` stays a subcommand as in the real app."""

    register(app)
    return app


def test_cli_writes_html_and_pngs(store: Store, job_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"TOKENMILL_DATABASE_URL": store.url}
    out, pngs = tmp_path / "out" / "r.html", tmp_path / "plots"
    args = ["report", job_id[:6], "-o", str(out), "--png", str(pngs), "--cost-per-hour", "0.5", "--api-price", "0.6"]
    result = CliRunner().invoke(cli(), args, env=env)
    assert result.exit_code == 0, result.output
    assert "engine busy" not in result.output  # no decode steps recorded for this job: nothing claimed
    with store.session() as s:
        store_jobs.add_slot_use(s, job_id, steps=10, slots=80, filled=78)
    result = CliRunner().invoke(cli(), args, env=env)
    assert "engine busy 97.5% (slots filled / available over 10 decode steps)" in result.output
    assert out.read_text(encoding="utf-8").count("data:image/png;base64,") == 6
    assert sorted(p.name for p in pngs.iterdir()) == sorted(f"{s}.png" for s in SLUGS)
    assert all(p.read_bytes().startswith(PNG_MAGIC) for p in pngs.iterdir())

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    only_png = CliRunner().invoke(cli(), ["report", job_id, "--png", "p"], env=env)
    assert only_png.exit_code == 0, only_png.output
    assert not (cwd / "report.html").exists() and len(list((cwd / "p").iterdir())) == 6
    default = CliRunner().invoke(cli(), ["report", job_id], env=env)
    assert default.exit_code == 0 and (cwd / "report.html").exists()


def test_cli_errors_are_tokenmill_errors(store: Store, tmp_path: Path) -> None:
    env = {"TOKENMILL_DATABASE_URL": store.url}
    missing = CliRunner().invoke(cli(), ["report", "nosuchjob", "-o", str(tmp_path / "x.html")], env=env)
    assert isinstance(missing.exception, JobNotFound)
    with store.session() as s:
        job = store_jobs.create_job(s, key="e", name="e.jsonl", family="f", queue="tm.f", chunk_size=4)
        store_jobs.ingest_rows(s, job, [chat_row(0, "only")])
        empty = job.id
    result = CliRunner().invoke(cli(), ["report", empty, "-o", str(tmp_path / "x.html")], env=env)
    assert isinstance(result.exception, NoResultsYet)
    assert str(result.exception).startswith(f"job {empty} has no results yet")
    assert not (tmp_path / "x.html").exists()


def test_cli_import_does_not_load_matplotlib() -> None:
    code = "import sys, tokenmill.cli.report, tokenmill.report; sys.exit('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0
