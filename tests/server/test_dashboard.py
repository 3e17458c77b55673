"""The web dashboard as a person sees it: a real uvicorn server process, real Chromium, a real job.

The browser is Debian's chromium driven by Playwright (its own browser download cannot work here).
Screenshots are saved into the test's tmp folder and their paths printed (`pytest -s` shows them).
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ADMIN_KEY, API_KEYS, SERVE_APP, Procs, free_port, wait_http
from tests.report.test_report import EVIL_ID, FAILED, N_ROWS, make_job
from tokenmill.config import Settings
from tokenmill.server.auth import tenant_of
from tokenmill.store import Store
from tokenmill.store import jobs as store_jobs
from tokenmill.store import workers as store_workers
from tokenmill.store.tables import Worker

EVIL_NAME = "<script>alert('name')</script> x[/y].jsonl"


def get(url: str) -> tuple[int, str, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, r.read().decode("utf-8"), dict(r.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8"), dict(exc.headers)


def test_pages_and_json_show_true_numbers_and_escape_data(store: Store, app_server: str) -> None:
    job_id = make_job(store)  # 24 rows, 3 failed (one with a custom id that is a script tag)
    with store.session() as s:
        evil = store_jobs.create_job(
            s, key="e", name=EVIL_NAME, family="smollm2-135m-instruct", queue="q", chunk_size=4
        )
        evil_id = evil.id
        store_workers.register(s, id="w-live", name="<b>w</b>", host="gpu-host-b", pid=1, state="busy", n_seq=16,
                               variant="smollm2-135m-instruct:q8_0", device="cuda", current_job=job_id)  # fmt: skip
        store_workers.register(s, id="w-gone", name="w2", host="cpu-host-a", pid=2, state="ready", n_seq=4)
        store_workers.heartbeat(s, "w-gone")
    with store.session() as s:  # a worker whose heartbeats stopped a minute ago
        s.get(Worker, "w-gone").heartbeat_at = time.time() - 60  # type: ignore[union-attr]

    status, page, headers = get(app_server + "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert EVIL_NAME not in page and "&lt;script&gt;alert(&#39;name&#39;)&lt;/script&gt; x[/y].jsonl" in page
    assert "reviews &lt;b&gt;bold&lt;/b&gt;.jsonl" in page and "<b>w</b>" not in page
    assert page.lower().count("<script") == 1  # only the dashboard's own script
    assert f'href="/dashboard/jobs/{job_id}"' in page

    jobs = {j["id"]: j for j in json.loads(get(app_server + "/dashboard/api/jobs")[1])["jobs"]}
    assert jobs[evil_id]["name"] == EVIL_NAME and jobs[evil_id]["done"] == 0
    j = jobs[job_id]
    assert (j["total"], j["done"], j["failed"], j["succeeded"]) == (N_ROWS, N_ROWS, len(FAILED), N_ROWS - len(FAILED))
    assert j["state"] == "completed_with_errors" and j["final"] and j["eta_s"] is None and j["percent"] == 100.0
    workers = {w["id"]: w for w in json.loads(get(app_server + "/dashboard/api/workers")[1])["workers"]}
    assert workers["w-live"]["state"] == "busy" and workers["w-live"]["load"] == f"busy on {job_id} (16 slots)"
    assert workers["w-live"]["host"] == "gpu-host-b" and workers["w-live"]["variant"] == "smollm2-135m-instruct:q8_0"
    assert workers["w-gone"]["state"] == "lost" and workers["w-gone"]["heartbeat_age_s"] >= 59

    status, page, _ = get(f"{app_server}/dashboard/jobs/{job_id}")
    assert status == 200 and page.count("data:image/png;base64,") == 6
    assert EVIL_ID not in page and "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in page
    assert "context_length_exceeded" in page and page.lower().count("<script") == 1

    status, body, headers = get(f"{app_server}/dashboard/jobs/{job_id}/results.jsonl")
    lines = [json.loads(line) for line in body.splitlines()]
    assert status == 200 and headers["content-disposition"] == f'attachment; filename="{job_id}.results.jsonl"'
    assert [line["custom_id"] for line in lines] == [f"review-{i:03d}" for i in range(N_ROWS) if i not in FAILED]
    assert all(line["response"]["status_code"] == 200 and line["error"] is None for line in lines)
    errors = [json.loads(line) for line in get(f"{app_server}/dashboard/jobs/{job_id}/errors.jsonl")[1].splitlines()]
    assert [e["error"]["line"] for e in errors] == [i + 1 for i in sorted(FAILED)]
    assert {e["error"]["code"] for e in errors} == {"context_length_exceeded"} and errors[0]["custom_id"] == EVIL_ID

    status, report, headers = get(f"{app_server}/dashboard/jobs/{job_id}/report.html")  # what `tokenmill report` writes
    assert status == 200 and headers["content-disposition"] == f'attachment; filename="{job_id}.report.html"'
    assert report.count("data:image/png;base64,") == 6 and "<script" not in report.lower() and 'id="summary"' in report
    assert get(f"{app_server}/dashboard/jobs/{evil_id}/report.html")[0] == 409  # nothing to report yet

    status, page, _ = get(f"{app_server}/dashboard/jobs/{evil_id}")  # no results yet: progress, no plots
    assert status == 200 and "No row has finished yet" in page and EVIL_NAME not in page
    status, page, _ = get(f"{app_server}/dashboard/jobs/%3Cb%3Enope")
    assert status == 404 and "&lt;b&gt;nope" in page and "<b>nope" not in page
    assert get(f"{app_server}/dashboard/api/jobs/nope")[0] == 404
    assert get(f"{app_server}/dashboard/jobs/nope/results.jsonl")[0] == 404


def test_script_renders_data_as_text_in_chromium(
    store: Store, app_server: str, chromium_browser: Any, tmp_path: Path
) -> None:
    """After the script has rebuilt the tables from JSON, names are still text and no script of theirs ran."""
    with store.session() as s:
        job = store_jobs.create_job(s, key="e", name=EVIL_NAME, family="smollm2-135m-instruct", queue="q", chunk_size=4)
        job_id = job.id
        store_workers.register(s, id="w<img src=x onerror=alert(1)>", name="<i>n</i>", host="h", pid=1, state="ready")
    page = chromium_browser.new_page()
    dialogs: list[str] = []

    def on_dialog(dialog: Any) -> None:  # an alert() from data that ran as script
        dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    page.goto(app_server + "/")
    page.wait_for_function("document.getElementById('live').textContent.includes('updated')", timeout=30_000)
    row = page.locator(f'tr[data-job="{job_id}"]')
    assert row.locator("td.name a").text_content() == EVIL_NAME
    assert row.locator("td.name a").get_attribute("href") == f"/dashboard/jobs/{job_id}"
    assert page.locator("tr[data-worker] td.wname code").text_content() == "<i>n</i>"
    assert page.locator("#n-jobs").text_content() == "1" and page.locator("#n-active").text_content() == "1"
    assert page.locator("#job-rows script, #worker-rows img, #worker-rows i").count() == 0
    page.goto(f"{app_server}/dashboard/jobs/{job_id}")
    page.wait_for_function("document.getElementById('live').textContent.includes('updated')", timeout=30_000)
    assert page.locator("#job-name").text_content() == EVIL_NAME and page.title().startswith("tokenmill: <script>")
    assert page.locator("#kpi-done .value").text_content() == "0" and dialogs == []
    shot = tmp_path / "dashboard-escaping.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")
    assert shot.stat().st_size > 10_000


def _write_dataset(path: Path, n: int) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            # temperature > 0: never answered from the result cache, every row is really generated
            question = {"role": "user", "content": f"Write one short sentence about the number {i}."}
            row = {"id": f"row-{i}", "messages": [question], "max_tokens": 12, "temperature": 0.7}
            fh.write(json.dumps(row) + "\n")
    return path


READ_ROW = "tr => [tr.querySelector('td.done').textContent, tr.querySelector('td.state').textContent]"


def _done(text: str | None) -> int:
    return int((text or "0").replace(",", ""))


@pytest.mark.model
@pytest.mark.timeout(600)
def test_dashboard_follows_a_real_job_in_chromium(
    settings: Settings,
    store: Store,
    app_server: str,
    chromium_browser: Any,
    procs: Procs,
    tmp_path: Path,
    smollm2_path: Path,
) -> None:
    n = 24
    data = _write_dataset(tmp_path / "numbers.jsonl", n)
    index = chromium_browser.new_page(viewport={"width": 1400, "height": 900})
    index.goto(app_server + "/")
    assert index.locator("#no-jobs").is_visible()  # nothing submitted yet
    run = procs.start(
        settings, "run", str(data), "--model", "smollm2-135m-instruct", "--workers", "1", "--threads", "2",
        "--chunk-size", "4", "-o", str(tmp_path / "out.jsonl"), env={"HF_HUB_OFFLINE": "1"}, name="run",
    )  # fmt: skip
    row = index.locator("#job-rows tr").first
    row.wait_for(timeout=120_000)  # the script added the job once `run` stored it
    job_id = row.get_attribute("data-job")
    assert job_id
    job_page = chromium_browser.new_page(viewport={"width": 1400, "height": 900})
    job_page.goto(f"{app_server}/dashboard/jobs/{job_id}")

    seen: list[int] = []
    busy_worker = ""
    states: list[str] = []
    shot_running = tmp_path / "dashboard-running.png"
    deadline = time.monotonic() + 420
    while time.monotonic() < deadline:
        # One evaluate reads both cells between two refreshes of the script (which rewrites them together).
        done, state = index.locator(f'tr[data-job="{job_id}"]').evaluate(READ_ROW)
        seen.append(_done(done))
        states.append(state)
        if not busy_worker and index.locator("#worker-rows tr").count():
            load = index.locator("#worker-rows tr td.load").first.text_content() or ""
            busy_worker = load if load.startswith("busy") else ""
        if 0 < seen[-1] < n and not shot_running.exists():
            index.screenshot(path=str(shot_running), full_page=True)
        if states[-1] == "completed":
            break
        time.sleep(0.3)
    print(f"rows done as the page showed them: {sorted(set(seen))}; states: {list(dict.fromkeys(states))}")
    print(f"screenshot while running: {shot_running}")
    assert states[-1] == "completed", procs.logs()
    assert seen == sorted(seen), "rows done never goes backwards"
    assert seen[0] < n and seen[-1] == n and len(set(seen)) >= 2, f"progress did not advance: {seen}"
    assert any(0 < v < n for v in seen) and shot_running.exists(), "a part-done count was on screen"
    assert "running" in states and busy_worker.startswith(f"busy on {job_id} ("), busy_worker

    # The job page opened mid-run reloads itself when the job ends, and then shows the plots and downloads.
    job_page.wait_for_function("document.querySelectorAll('#plots img').length === 6", timeout=120_000)
    assert job_page.locator("#kpi-done .value").text_content() == str(n)
    assert job_page.locator("#job-state").text_content() == "completed"
    assert job_page.locator("#kpi-failed .value").text_content() == "0" and job_page.locator("#dl-report").count() == 1
    alts = [img.get_attribute("alt") for img in job_page.locator("#plots img").all()]
    assert all(alts) and len(set(alts)) == 6
    results = job_page.request.get(app_server + (job_page.locator("#dl-results").get_attribute("href") or ""))
    lines = [json.loads(line) for line in results.text().splitlines()]
    assert results.status == 200 and sorted(line["custom_id"] for line in lines) == sorted(f"row-{i}" for i in range(n))
    assert all(line["response"]["body"]["object"] == "chat.completion" for line in lines)
    assert sum(line["response"]["body"]["usage"]["completion_tokens"] for line in lines) > n  # it really generated
    assert job_page.request.get(app_server + f"/dashboard/jobs/{job_id}/errors.jsonl").text() == ""
    shot_done = tmp_path / "dashboard-job.png"
    job_page.screenshot(path=str(shot_done), full_page=True)
    print(f"screenshot of the finished job: {shot_done}")
    assert shot_done.stat().st_size > 50_000
    assert run.wait(timeout=120) == 0, procs.logs()


@pytest.fixture
def keyed_app_server(settings: Settings, store: Store, procs: Procs) -> str:
    """The app as ``app_server`` runs it, with tenant keys and an admin key configured."""
    port = free_port()
    keys = {"TOKENMILL_API_KEYS": ",".join(API_KEYS), "TOKENMILL_ADMIN_KEYS": ADMIN_KEY}
    procs.spawn([sys.executable, "-c", SERVE_APP, str(port)], {**settings.as_env(), **keys}, "server")
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/healthz", 90)
    return base


def test_a_browser_sees_its_own_tenants_jobs_after_giving_its_key(
    store: Store, keyed_app_server: str, chromium_browser: Any, tmp_path: Path
) -> None:
    """The browser asks for the key (HTTP Basic, the key as the password): no key, no page; a tenant's key,
    that tenant's jobs and no workers; the admin key, everything."""
    base = keyed_app_server
    with store.session() as s:
        mine = store_jobs.create_job(s, key="a", name="team-a.jsonl", family="f", queue="q", chunk_size=4,
                                     owner=tenant_of(API_KEYS[0])).id  # fmt: skip
        theirs = store_jobs.create_job(s, key="o", name="operator.jsonl", family="f", queue="q", chunk_size=4).id
        store_workers.register(s, id="w-1", name="w1", host="gpu-host-secret", pid=1, state="ready", n_seq=4)
    from playwright.sync_api import Error as BrowserError

    for credentials in (None, {"username": "team-a", "password": "sk-guess"}):
        stranger = chromium_browser.new_context(http_credentials=credentials)
        page = stranger.new_page()
        try:  # headless Chromium gives up on the login box it would show a person, or shows the 401
            shown = page.goto(base + "/")
            assert shown is not None and shown.status == 401 and "team-a.jsonl" not in shown.text()
        except BrowserError as exc:
            assert "ERR_INVALID_AUTH_CREDENTIALS" in str(exc)
        for path in ("/", "/dashboard/api/jobs", f"/dashboard/jobs/{mine}/results.jsonl"):
            answer = stranger.request.get(base + path)
            assert answer.status == 401 and answer.headers["www-authenticate"].startswith("Basic ")
            assert "team-a.jsonl" not in answer.text() and mine not in answer.text()
        stranger.close()

    tenant = chromium_browser.new_context(http_credentials={"username": "team-a", "password": API_KEYS[0]})
    page = tenant.new_page()
    assert page.goto(base + "/").status == 200
    page.wait_for_function("document.getElementById('live').textContent.includes('updated')", timeout=30_000)
    assert [r.get_attribute("data-job") for r in page.locator("#job-rows tr").all()] == [mine]
    assert page.locator("#worker-rows tr").count() == 0 and "gpu-host-secret" not in page.content()
    assert "operators" in (page.locator("#no-workers").text_content() or "")
    shot = tmp_path / "dashboard-tenant.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")
    assert page.goto(f"{base}/dashboard/jobs/{theirs}").status == 404
    assert tenant.request.get(f"{base}/dashboard/jobs/{theirs}/results.jsonl").status == 404
    assert tenant.request.get(f"{base}/dashboard/jobs/{mine}/results.jsonl").status == 200
    tenant.close()

    operator = chromium_browser.new_context(http_credentials={"username": "ops", "password": ADMIN_KEY})
    page = operator.new_page()
    assert page.goto(base + "/").status == 200
    page.wait_for_function("document.getElementById('live').textContent.includes('updated')", timeout=30_000)
    assert {r.get_attribute("data-job") for r in page.locator("#job-rows tr").all()} == {mine, theirs}
    assert page.locator('tr[data-worker="w-1"] td.host').text_content() == "gpu-host-secret"
    operator.close()
