"""Tables at 80 and 60 columns (a log file, a CI job, a narrow terminal): keys whole, headers uncut, no
line wider than the page; the columns left out are named."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.cells import cell_len
from rich.console import Console
from rich.text import Text

from tests.cli.test_status import _running_job
from tests.conftest import run_cli
from tokenmill.cli.tables import Column, fit_columns, fitted_table
from tokenmill.cli.watch import WatchState
from tokenmill.config import Settings
from tokenmill.models.catalog import CATALOG
from tokenmill.store import Store
from tokenmill.store import workers as store_workers


def _render(table: object, width: int) -> list[str]:
    console = Console(record=True, width=width, file=open(os.devnull, "w"))  # noqa: SIM115
    try:
        console.print(table)
        return console.export_text().splitlines()
    finally:
        console.file.close()


def _check_page(lines: list[str], width: int, keys: list[str], headers: list[str], *, fits: bool = True) -> None:
    """Every key on one line, every shown header whole, nothing ellipsized, and nothing past the right margin
    unless the keys alone are wider than the page (``fits=False``: then the lines run on, keys still whole)."""
    for key in keys:
        assert any(key in line for line in lines), (key, "\n".join(lines))
    for header in headers:
        assert any(header in line for line in lines), (header, "\n".join(lines))
    assert all(cell_len(line) <= width for line in lines) == fits, "\n".join(lines)
    assert not any("…" in line for line in lines), "\n".join(lines)


WORD = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789:._-/", min_size=1, max_size=30)


@st.composite
def tables(draw: st.DrawFn) -> tuple[list[Column], list[list[str | Text]], int]:
    n = draw(st.integers(1, 9))
    columns = [
        Column(draw(WORD.filter(lambda h: len(h) <= 12)), key=i < draw(st.integers(1, 3)),
               fold=draw(st.booleans()), drop=draw(st.integers(1, 9)))
        for i in range(n)
    ]  # fmt: skip
    rows: list[list[str | Text]] = [
        [draw(st.text(alphabet="abc xyz/é中", max_size=60) if c.fold else WORD) for c in columns]
        for _ in range(draw(st.integers(0, 6)))
    ]
    return columns, rows, draw(st.integers(20, 200))


@settings(max_examples=200, deadline=None, derandomize=True)
@given(spec=tables())
def test_any_table_fits_its_page_with_keys_whole(spec: tuple[list[Column], list[list[str | Text]], int]) -> None:
    """Hostile shapes (long keys, many columns, CJK and spaces in folding text, pages of 20 to 200 columns)."""
    columns, rows, width = spec
    kept = fit_columns(columns, rows, width)
    assert [i for i, c in enumerate(columns) if c.key] == [i for i in kept if columns[i].key]  # keys never dropped
    table, note = fitted_table("t", columns, rows, width)
    lines = _render(table, 400)
    shown = [columns[i].header for i in kept]
    keys_fit = sum(c.natural([r[i] for r in rows]) for i, c in enumerate(columns) if c.key) + 3 * len(
        [c for c in columns if c.key]) + 1 <= width  # fmt: skip
    if keys_fit:
        lines = _render(table, width)
        _check_page(lines, width, [str(r[i]) for r in rows for i in kept if columns[i].key], shown)
    else:  # wider than the page: the keys still print whole, the line runs on; or, in a live view, fold
        assert all(any(str(r[i]) in line for line in lines) for r in rows for i in kept if columns[i].key)
        folded = _render(fitted_table("t", columns, rows, width, run_on=False)[0], width)
        assert not any("…" in line for line in folded), "\n".join(folded)
    hidden = [c.header for i, c in enumerate(columns) if i not in kept]
    assert (note is None) == (not hidden)
    assert note is None or all(h in note for h in hidden)


@pytest.fixture
def fleet_store(tmp_path: Path, settings: Settings, store: Store) -> tuple[str, list[str]]:
    """A real store with a running job and workers, one of them failed with an error; (job id, hosts)."""
    job_id, _ = _running_job(settings, store, tmp_path)
    with store.session() as s:
        store_workers.register(s, id="ip-172-31-20-100:77:ffe", name="w", host="ip-172-31-20-100", pid=77,
                               state="failed", error="CUDA error: out of memory (tried to allocate 2.0 GiB)",
                               family="qwen2.5-7b-instruct", capacity={"physical_cores": 16, "gpus": [{"name": "L4"}]},
                               queues=["tm.qwen2.5-7b-instruct"], variant="qwen2.5-7b-instruct:q4_k_m")  # fmt: skip
    return job_id, ["gpu-box-7", "old-box", "ip-172-31-20-100"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("width", [80, 60])
def test_commands_read_at_narrow_widths(
    settings: Settings, store: Store, fleet_store: tuple[str, list[str]], width: int
) -> None:
    job_id, hosts = fleet_store
    env = {"COLUMNS": str(width)}
    jobs = run_cli(settings, "jobs", env=env, timeout=60)
    assert jobs.returncode == 0, jobs.stderr
    _check_page(jobs.stdout.splitlines(), width, [job_id, "running", "smollm2-135m-instruct"], ["id", "state", "model"])

    workers = run_cli(settings, "workers", "--all", env=env, timeout=60)
    assert workers.returncode == 0, workers.stderr
    lines = workers.stdout.splitlines()
    table = lines[: next(i for i, line in enumerate(lines) if line.startswith("└")) + 1]
    variants = ["smollm2-135m-instruct:q8_0", "smollm2-135m-instruct:q4_1", "qwen2.5-7b-instruct:q4_k_m"]
    # host, pid, state and variant of ip-172-31-20-100's row take 66 columns: at 60 the keys run on, whole
    _check_page(table, width, [*hosts, "4242", "lost", "failed", "stopped", *variants],
                ["host", "pid", "state", "variant"], fits=width >= 66)  # fmt: skip
    assert "not shown at" in workers.stdout and "scheduler: " in workers.stdout
    # the error is a line of its own, as written, whatever the width
    assert "ip-172-31-20-100 77 failed: CUDA error: out of memory (tried to allocate 2.0 GiB)" in " ".join(
        workers.stdout.split())  # fmt: skip

    listing = run_cli(settings, "models", "list", env=env, timeout=60)
    assert listing.returncode == 0, listing.stderr
    labels = [v.label for f in CATALOG.values() for v in f.variants]
    _check_page(listing.stdout.splitlines(), width, labels, ["variant", "size", "here"])

    view = _render(WatchState().render(store, settings, None, width), width)  # `status --watch`
    assert any(line.startswith("ip-172-31-20-100 77 failed: CUDA error") for line in view)
    if width >= 66:
        _check_page(view, width, [job_id, *hosts, *variants], ["job", "model", "host", "variant"])
    else:  # a live view would crop lines that run on: its keys fold instead, never cut
        _check_page(view, width, [job_id], ["job", "model", "host", "variant"])
        assert "ip-172-31-20-100" in "".join(line.split("│")[1].strip() for line in view if line.count("│") > 3)

    status = run_cli(settings, "status", job_id, env=env, timeout=60)
    assert status.returncode == 0, status.stderr
    assert job_id in status.stdout and "scheduler" in status.stdout
    assert all(cell_len(line) <= width for line in status.stdout.splitlines()), status.stdout


def test_json_forms_carry_what_narrow_tables_leave_out(settings: Settings, fleet_store: tuple[str, list[str]]) -> None:
    job_id, _ = fleet_store
    (job,) = json.loads(run_cli(settings, "jobs", "--json", timeout=60).stdout)
    assert job["job"] == job_id and job["model"] == "smollm2-135m-instruct" and job["name"].endswith("ten.jsonl")
    listed = json.loads(run_cli(settings, "models", "list", "--json", timeout=60).stdout)
    smol = next(m for m in listed if m["variant"] == "smollm2-135m-instruct:q4_1")
    assert smol["sources"][0].startswith("pypi:") and smol["size_bytes"] > 0
    assert smol["family"] == "smollm2-135m-instruct"
    assert len(listed) == sum(len(f.variants) for f in CATALOG.values())
