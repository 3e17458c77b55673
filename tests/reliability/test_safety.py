"""Safety: no pickle on the wire, passwords never printed, no file path taken from dataset content."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.reliability.conftest import QUEUE, Stack, wait_for, write_dataset
from tokenmill.celery_app import TASK_PROCESS_CHUNK, make_app

SECRET = "s3cretpw"


class Exploit:
    """Unpickling this runs a shell command: the classic reason never to accept pickle from a queue."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_celery_accepts_json_only_and_a_pickle_message_is_not_executed(fleet: Stack) -> None:
    app = make_app(fleet.settings)
    conf = app.conf
    assert conf.accept_content == ["json"] and conf.task_serializer == "json"
    assert conf.result_serializer == "json" and conf.event_serializer == "json"
    n = 10
    job = fleet.submit(write_dataset(fleet.tmp / "d.jsonl", n), "--chunk-size", "5")
    fleet.worker(name="target")
    wait_for(lambda: fleet.query("SELECT 1 FROM workers WHERE state = 'ready'"), 60, "a ready worker", fleet.logs)
    marker = fleet.tmp / "pwned"
    try:
        app.send_task(TASK_PROCESS_CHUNK, args=[Exploit(marker), 1], queue=QUEUE, serializer="pickle")
    finally:
        app.close()
    wait_for(lambda: "untrusted content" in " ".join(fleet.logs().split()), 30, "the refusal", fleet.logs)
    time.sleep(1)
    assert not marker.exists()
    log = " ".join(fleet.logs().split())
    assert "Refusing to deserialize untrusted content of type pickle" in log
    # The worker is unharmed and the message is gone: real work still flows.
    fleet.scheduler()
    fleet.wait_state(job, timeout=60)
    counts = fleet.counts(job)
    print(f"\npickle message refused; the job after it: {counts}")
    assert (counts.stored, counts.duplicated) == (n, 0) and not marker.exists()
    assert fleet.procs.items[0].poll() is None


@pytest.fixture
def secret_fleet(fleet: Stack) -> Stack:
    """The fleet with a password in both URLs (Postgres trust auth and a password-less Redis accept any)."""
    db = fleet.settings.database_url.replace("postgresql://postgres@", f"postgresql://postgres:{SECRET}@")
    broker = fleet.settings.broker_url.replace("redis://", f"redis://:{SECRET}@")
    assert SECRET in db and SECRET in broker
    fleet.settings = fleet.settings.with_(database_url=db, broker_url=broker)
    return fleet


def test_passwords_are_masked_in_output_logs_and_errors(secret_fleet: Stack) -> None:
    fleet = secret_fleet
    wide = {"COLUMNS": "400"}  # no folding: a password split over two lines would dodge the grep
    n = 20
    job = fleet.submit(write_dataset(fleet.tmp / "d.jsonl", n), "--chunk-size", "5")
    scheduler = fleet.procs.start(fleet.settings, "-v", "scheduler", env=wide, name="scheduler")
    worker = fleet.worker(env=wide)
    fleet.wait_state(job, timeout=60)
    outputs = [fleet.logs()]
    for args in (("workers",), ("workers", "--json"), ("status", job), ("status", job, "--json"), ("jobs",),
                 ("status", job, "--wait")):  # fmt: skip
        shown = fleet.cli(*args, env=wide)
        assert shown.returncode == 0, shown.stderr
        outputs.append(shown.stdout + shown.stderr)
    # Error paths: unreachable services, with the password in the URL.
    dead_db = fleet.settings.with_(database_url=f"postgresql://postgres:{SECRET}@127.0.0.1:1/nothing")
    dead_broker = fleet.settings.with_(broker_url=f"redis://:{SECRET}@127.0.0.1:1/0")
    from tests.conftest import run_cli

    for settings, args in ((dead_db, ("status", job)), (dead_db, ("workers",)), (dead_db, ("worker",)),
                           (dead_broker, ("run", str(fleet.tmp / "d.jsonl")))):  # fmt: skip
        failed = run_cli(settings, *args, env={**wide, **fleet.worker_env()}, timeout=90)
        assert failed.returncode == 5, failed.stderr
        outputs.append(failed.stdout + failed.stderr)
    # A scheduler whose broker is down, with work to send (and no other scheduler), logs its retries.
    for proc in (scheduler, worker):
        proc.terminate()
        proc.wait(timeout=30)
    fleet.submit(write_dataset(fleet.tmp / "more.jsonl", 5))
    down = fleet.procs.start(dead_broker, "-v", "scheduler", env=wide, name="scheduler-down")
    wait_for(lambda: "broker unavailable" in fleet.logs(), 30, "the scheduler's broker warning", fleet.logs)
    down.kill()
    outputs.append(fleet.logs())
    everything = "\n".join(outputs)
    print(
        f"\nchecked {len(everything)} characters of output and logs; masked URLs seen: "
        f"{everything.count(':***@')} (ours) + {everything.count(':**@')} (Celery's)"
    )
    assert SECRET not in everything
    assert ":***@" in everything  # the URLs are there, masked


def test_query_passwords_and_hub_credentials_are_masked_everywhere(fleet: Stack) -> None:
    """`?password=` in the store URL, credentials in HF_ENDPOINT, a download error: a planted secret never
    appears in CLI output, logs, the workers/status views, the report HTML or /metrics."""
    from tests.conftest import run_cli
    from tests.observability.helpers import free_port, http_get

    planted = "pl4nted-qs-secret"
    fleet.settings = fleet.settings.with_(
        database_url=f"{fleet.settings.database_url}?password={planted}",
        broker_url=fleet.settings.broker_url.replace("redis://", f"redis://:{planted}@"),
    )
    wide = {"COLUMNS": "400", "HF_ENDPOINT": f"http://hf:{planted}@127.0.0.1:9"}
    job = fleet.submit(write_dataset(fleet.tmp / "d.jsonl", 10), "--chunk-size", "5")
    port = free_port()
    fleet.procs.start(fleet.settings, "-v", "scheduler", env=wide, name="scheduler")
    fleet.worker("--metrics-port", str(port), env=wide)
    fleet.wait_state(job, timeout=60)
    outputs = []
    wait_for(lambda: http_get(f"http://127.0.0.1:{port}/metrics")[0] == 200, 30, "/metrics", fleet.logs)
    outputs.append(http_get(f"http://127.0.0.1:{port}/metrics")[1].decode())
    report = fleet.tmp / "report.html"
    for args in (("workers",), ("workers", "--json"), ("status", job), ("status", job, "--json"), ("jobs",),
                 ("report", job, "-o", str(report))):  # fmt: skip
        shown = run_cli(fleet.settings, "-v", *args, env=wide, timeout=120)
        assert shown.returncode == 0, shown.stderr
        outputs.append(shown.stdout + shown.stderr)
    outputs.append(report.read_text(encoding="utf-8"))
    # A download that fails through the credentialed mirror, and a store that cannot be reached.
    pull = run_cli(fleet.settings, "-v", "models", "pull", "mistral-7b-instruct-v0.3", "--source", "hub",
                   env={**wide, "TOKENMILL_MODELS_DIR": str(fleet.tmp / "models")}, timeout=120)  # fmt: skip
    assert pull.returncode == 4, pull.stderr
    outputs.append(pull.stdout + pull.stderr)
    dead = fleet.settings.with_(database_url=f"postgresql://postgres@127.0.0.1:1/x?sslmode=disable&password={planted}")
    failed = run_cli(dead, "status", job, env=wide, timeout=90)
    assert failed.returncode == 5, failed.stderr
    outputs.append(failed.stdout + failed.stderr)
    outputs.append(fleet.logs())
    everything = "\n".join(outputs)
    print(f"\nchecked {len(everything)} characters; masked: {everything.count('password=***')} query passwords, "
          f"{everything.count(':***@')} user:password URLs")  # fmt: skip
    assert planted not in everything
    assert "password=***" in everything and "hf:***@127.0.0.1:9" in everything


def test_no_path_is_derived_from_dataset_content(embedded: Stack) -> None:
    """custom_id and every other field are data: stored and echoed, never joined into a path on disk."""
    evil = ["../../escape-up", "/tmp/escape-abs", "~/escape-home", "sub/dir/escape-nested", "..", "C:\\escape-win",
            "%2e%2e%2fescape-encoded", "escape.jsonl"]  # fmt: skip
    rows: list[dict[str, object]] = [
        {
            "custom_id": cid,
            "method": "POST",
            "url": "/v1/completions",
            "body": {"prompt": f"p {i}", "max_tokens": 2, "temperature": 0.5},
        }
        for i, cid in enumerate(evil)
    ]
    rows.append({"id": "../escape-template", "text": "../../escape-field", "max_tokens": 2})
    work = embedded.tmp / "work"
    work.mkdir()
    data = work / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]), encoding="utf-8")
    fielded = work / "f.jsonl"
    fielded.write_text(json.dumps(rows[-1]) + "\n", encoding="utf-8")

    def files() -> set[Path]:
        roots = (embedded.tmp, Path("/tmp"), Path.home())
        found = {p for p in embedded.tmp.rglob("*")}
        found |= {p for root in roots[1:] for p in root.iterdir()}
        return found

    before = files()
    env = embedded.worker_env()
    for path, extra in ((data, ()), (fielded, ("--field", "text"))):
        proc = embedded.cli("run", str(path), "--workers", "1", "--threads", "1", *extra, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr
    job = embedded.query("SELECT id FROM jobs WHERE name LIKE :n", n="%d.jsonl")[0][0]
    out = work / "exported.jsonl"
    assert embedded.cli("results", job, "-o", str(out), "--errors", str(work / "failed.jsonl")).returncode == 0
    created = files() - before
    escaped = sorted(str(p) for p in created if "escape" in str(p))
    assert not escaped, escaped
    outside = sorted(str(p) for p in created if not p.is_relative_to(embedded.tmp))
    assert not outside, outside  # nothing new in /tmp or $HOME
    names = {p.relative_to(embedded.tmp).as_posix() for p in created if p.is_file()}
    expected = {"work/d.results.jsonl", "work/d.errors.jsonl", "work/f.results.jsonl", "work/f.errors.jsonl",
                "work/exported.jsonl", "work/failed.jsonl", "generated.log"}  # fmt: skip
    unexpected = {n for n in names - expected if not n.startswith((".tokenmill/", "logs/"))}
    assert not unexpected, unexpected
    ids = [json.loads(line)["custom_id"] for line in out.read_text().splitlines()]
    print(f"\npath-like ids stored verbatim: {ids}; files created: {sorted(names)}")
    assert ids == evil  # echoed back exactly, never used as a name
