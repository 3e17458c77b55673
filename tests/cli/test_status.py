"""`tokenmill jobs`, `tokenmill status` (--json, --wait exit codes) and the live `status --watch` view."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console
from sqlalchemy import select

from tests.conftest import Procs, need, run_cli, tokenmill_cmd
from tests.observability.helpers import start_stub_worker, submit, write_prompts
from tokenmill.cli.watch import WatchState
from tokenmill.config import Settings
from tokenmill.scheduler.submit import Submission, submit_dataset
from tokenmill.store import Store
from tokenmill.store import results as store_results
from tokenmill.store import workers as store_workers
from tokenmill.store.tables import Chunk, Job

EXIT_JOB_INCOMPLETE = 7
WIDE = {"COLUMNS": "220"}  # rich tables are cut to 80 columns otherwise, ellipsizing ids


def test_status_jobs_and_wait_exit_codes(tmp_path: Path, settings: Settings, procs: Procs) -> None:
    """Embedded store and broker, a real scheduler and a stub worker: status agrees with what happened."""
    drafts = tmp_path / "[draft]"  # rich markup would swallow "[draft]" in the JSON if it were not verbatim
    drafts.mkdir()
    good = write_prompts(drafts / "good.jsonl", 5, max_tokens=3)
    bad = write_prompts(tmp_path / "bad.jsonl", 2, extra=[{"id": "huge", "prompt": "word " * 600}])
    (good_id,) = submit(settings, good, "--chunk-size", "2")
    (bad_id,) = submit(settings, bad)
    (gemma_id,) = submit(settings, good, "--model", "gemma-3-270m")  # nobody serves it: it stays queued

    procs.start(settings, "scheduler", name="scheduler")
    start_stub_worker(procs, settings, "statusw")

    waited = run_cli(settings, "status", good_id[:6], "--wait", "--json", "--interval", "0.2", timeout=120)
    assert waited.returncode == 0, waited.stderr + procs.logs()
    info = json.loads(waited.stdout)
    assert info["job"] == good_id and info["state"] == "completed" and info["name"] == str(good)
    assert info["model"] == "smollm2-135m-instruct"
    assert (info["total"], info["done"], info["succeeded"], info["failed"], info["pending"]) == (5, 5, 5, 0, 0)
    assert info["completion_tokens"] == 5 * 3  # the stub emits min(max_tokens, 4) tokens per row
    assert info["chunks"] == {"total": 3, "done": 3, "running": 0}
    assert info["elapsed_s"] > 0 and info["tokens_per_second"] > 0

    waited = run_cli(settings, "status", bad_id, "--wait", "--interval", "0.2", timeout=120)
    assert waited.returncode == EXIT_JOB_INCOMPLETE, waited.stderr
    assert "completed_with_errors" in waited.stderr and "1 failed" in waited.stderr

    cancelled = run_cli(settings, "cancel", gemma_id)
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stderr
    waited = run_cli(settings, "status", gemma_id, "--wait", "--interval", "0.2", timeout=60)
    assert waited.returncode == EXIT_JOB_INCOMPLETE and "cancelled" in waited.stderr

    listing = run_cli(settings, "jobs", env=WIDE)
    assert listing.returncode == 0, listing.stderr
    rows = {line.split("│")[1].strip(): line for line in listing.stdout.splitlines() if line.count("│") > 3}
    assert {good_id, bad_id, gemma_id} <= rows.keys()
    assert re.search(r"│\s*completed\s*│\s*smollm2-135m-instruct\s*│\s*5\s*│\s*5\s*│\s*0\s*│", rows[good_id])
    assert "completed_with_errors" in rows[bad_id] and "cancelled" in rows[gemma_id]
    assert "gemma-3-270m" in rows[gemma_id]
    assert str(good) in rows[good_id]  # the name is a path, printed as is: "[draft]" is not markup
    narrow = run_cli(settings, "jobs", env={"COLUMNS": "80"})  # other columns fold; ids stay whole to copy
    assert all(job in narrow.stdout for job in (good_id, bad_id, gemma_id)), narrow.stdout
    listed = json.loads(run_cli(settings, "jobs", "--json").stdout)
    assert [j["job"] for j in listed] == [gemma_id, bad_id, good_id]  # newest first
    assert [(j["state"], j["done"], j["failed"]) for j in listed] == [
        ("cancelled", 0, 0), ("completed_with_errors", 3, 1), ("completed", 5, 0)
    ]


def test_status_of_unknown_job_is_one_clean_line(settings: Settings, store: Store) -> None:
    proc = run_cli(settings, "status", "nope", "--json", timeout=60)
    assert proc.returncode == 6 and "no job 'nope'" in proc.stderr and "Traceback" not in proc.stderr


def _running_job(settings: Settings, store: Store, tmp_path: Path) -> tuple[str, int]:
    """A job of 10 rows, 4 answered with 10 tokens each, running for 8 s; (job id, a chunk id)."""
    data = write_prompts(tmp_path / "ten.jsonl", 10)
    job_id, _, _ = submit_dataset(store, Submission(path=data, model="smollm2-135m-instruct", chunk_size=5))
    now = time.time()
    with store.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        job.state, job.started_at = "running", now - 8
        for seq in range(4):
            store_results.write_result(
                s, {"job_id": job_id, "seq": seq, "custom_id": f"r{seq}", "status": "succeeded",
                    "completion_tokens": 10, "prompt_tokens": 3, "worker_id": "w"},
            )  # fmt: skip
        chunk_id = s.scalars(select(Chunk.id).where(Chunk.job_id == job_id).order_by(Chunk.idx)).first()
        assert chunk_id is not None
        common = {"family": "smollm2-135m-instruct", "capacity": {}, "queues": ["tm.smollm2-135m-instruct"]}
        store_workers.register(s, id="gpu-box-7:4242:abc123", name="gpu-box-7", host="gpu-box-7", pid=4242,
                               state="busy", variant="smollm2-135m-instruct:q8_0", current_job=job_id,
                               current_chunk=chunk_id, **common)  # fmt: skip
        store_workers.register(s, id="old-box:1:def456", name="old-box", host="old-box", pid=1, state="ready",
                               variant="smollm2-135m-instruct:q4_1", **common)  # fmt: skip
        store_workers.register(s, id="gone-box:2:aaa", name="gone-box", host="gone-box", pid=2, state="stopped",
                               variant="smollm2-135m-instruct:q4_1", **common)  # fmt: skip
    with store.session() as s:
        store_workers.heartbeat(s, "old-box:1:def456")
    with store.session() as s:  # silent for 100 s: shown as lost
        from tokenmill.store.tables import Worker

        old = s.get(Worker, "old-box:1:def456")
        assert old is not None
        old.heartbeat_at = now - 100
    return job_id, chunk_id


def _text(state: WatchState, settings: Settings, store: Store, job: str | None = None, width: int = 200) -> str:
    console = Console(record=True, width=width, file=open(os.devnull, "w"))  # noqa: SIM115
    try:
        console.print(state.render(store, settings, job, width))
        return console.export_text()
    finally:
        console.file.close()


def _row(text: str, first_cell: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith("│") and first_cell in line)
    return [cell.strip() for cell in line.strip("│").split("│")]


def test_watch_render_shows_jobs_and_workers(tmp_path: Path, settings: Settings, store: Store) -> None:
    job_id, chunk_id = _running_job(settings, store, tmp_path)
    state = WatchState()
    first = _text(state, settings, store)
    job, status, model, done, failed, total, tps, eta = _row(first, job_id)
    assert (job, status, model, done, failed, total) == (job_id, "running", "smollm2-135m-instruct", "4", "0", "10")
    assert 4.7 <= float(tps) <= 5.0  # 40 tokens over ~8 s
    assert re.fullmatch(r"0m1[12]s", eta), eta  # 6 rows left at 0.5 rows/s
    host, pid, wstate, variant, chunk, wtps, _rows, beat = _row(first, "gpu-box-7")
    assert (host, pid, wstate, variant, chunk) == ("gpu-box-7", "4242", "busy", "smollm2-135m-instruct:q8_0",
                                                   str(chunk_id))  # fmt: skip
    assert wtps == "0.0" and re.fullmatch(r"[01]s ago", beat)
    lost = _row(first, "old-box")
    assert lost[2] == "lost" and lost[4] == "-" and re.fullmatch(r"10[01]s ago", lost[7])
    assert "gone-box" not in first  # stopped workers leave the view

    with store.session() as s:
        store_workers.count_tokens(s, "gpu-box-7:4242:abc123", 5, 60)
    time.sleep(0.3)
    second = _row(_text(state, settings, store), "gpu-box-7")
    # 60 tokens since the previous poll, 0.3 s ago: the rate is over the refresh interval.
    assert 50 < float(second[5]) < 200 and second[6] == "5"

    only = _text(WatchState(), settings, store, job_id[:5], width=80)
    assert job_id in only  # never "8a5778ebc…" on an 80-column terminal: people copy ids from here


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[list[str]]:
    """A private tmux server (its own socket), killed afterwards."""
    need(shutil.which("tmux") is not None, "tmux (apt-get install -y tmux)")
    cmd = ["tmux", "-S", str(tmp_path / f"tmux-{uuid.uuid4().hex[:6]}.sock")]
    yield cmd
    subprocess.run([*cmd, "kill-server"], capture_output=True, timeout=10, check=False)


def test_watch_renders_in_a_real_terminal(tmp_path: Path, settings: Settings, store: Store, tmux: list[str]) -> None:
    job_id, _ = _running_job(settings, store, tmp_path)
    env = {**settings.as_env(), "PYTHONUNBUFFERED": "1", "TERM": "xterm-256color"}
    # COLUMNS/LINES from the test's own environment would override the pane's real size.
    command = shlex.join(["env", "-u", "COLUMNS", "-u", "LINES", *(f"{k}={v}" for k, v in env.items()),
                          *tokenmill_cmd("status", "--watch", "--interval", "0.3")])  # fmt: skip
    subprocess.run([*tmux, "new-session", "-d", "-s", "w", "-x", "200", "-y", "40", command], check=True, timeout=10)

    def pane() -> str:
        res = subprocess.run([*tmux, "capture-pane", "-p", "-t", "w"], capture_output=True, text=True, timeout=10)
        return res.stdout

    deadline = time.monotonic() + 60
    screen = pane()
    while not (job_id in screen and "gpu-box-7" in screen) and time.monotonic() < deadline:
        time.sleep(0.3)
        screen = pane()
    assert job_id in screen and "gpu-box-7" in screen, screen
    assert "jobs" in screen and "workers" in screen and "running" in screen and "lost" in screen
    assert "Traceback" not in screen

    subprocess.run([*tmux, "send-keys", "-t", "w", "C-c"], check=True, timeout=10)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        alive = subprocess.run([*tmux, "has-session", "-t", "w"], capture_output=True, timeout=10)
        if alive.returncode != 0:
            break  # the command ended on Ctrl-C, so tmux closed the session
        time.sleep(0.2)
    else:
        pytest.fail(f"`tokenmill status --watch` did not exit on Ctrl-C:\n{pane()}")


def test_data_strings_are_never_rich_markup(tmp_path: Path, settings: Settings, store: Store) -> None:
    """A dataset named `x[/y].jsonl` crashed `tokenmill status`; `[bold]` or `:smile:` in data must print as is."""
    folder = tmp_path / "[bold]runs[/bold] :smile:"  # "/bold]..." is a sub-folder
    (folder / "x[").mkdir(parents=True)
    data = write_prompts(folder / "x[/y].jsonl", 2)
    job_id, _, _ = submit_dataset(store, Submission(path=data, model="smollm2-135m-instruct", chunk_size=5))
    with store.session() as s:
        store_workers.register(s, id="h:1:a", name="w[/i]", host="h[red]", pid=1, state="ready", family="f",
                               capacity={}, queues=["tm.f"], variant="v[/x]")  # fmt: skip
    for args in (["status", job_id], ["status"], ["jobs"], ["workers"], ["results", job_id, "-o", str(data) + ".o"]):
        proc = run_cli(settings, *args, timeout=60, env=WIDE)
        shown = proc.stdout + proc.stderr
        assert proc.returncode == 0, (args, shown)
        assert "Traceback" not in shown and "MarkupError" not in shown
        if args[0] in ("status", "jobs"):
            assert "x[/y].jsonl" in "".join(shown.split()), (args, shown)
        if args[0] == "status" and len(args) == 2:
            assert "[bold]runs[/bold]:smile:" in "".join(shown.split()), shown
        if args[0] == "workers":
            assert "h[red]" in shown and "v[/x]" in shown, shown
