"""Settings: URLs derived from the data dir follow it; explicit URLs stay."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.config import MaskingFilter, Settings, install_masking, mask_text, mask_url


def test_with_data_dir_rederives_urls_derived_from_the_old_dir(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    moved = Settings(data_dir=old).with_(data_dir=new)
    assert moved.database_url == f"sqlite:///{new / 'tokenmill.db'}"
    assert moved.broker_url == f"sqla+sqlite:///{new / 'broker.db'}"
    assert str(old) not in moved.database_url + moved.broker_url


def test_with_data_dir_keeps_explicit_urls(tmp_path: Path) -> None:
    pg, redis = "postgresql://postgres@127.0.0.1/x", "redis://127.0.0.1:6379/0"
    moved = Settings(data_dir=tmp_path / "a", database_url=pg, broker_url=redis).with_(data_dir=tmp_path / "b")
    assert (moved.database_url, moved.broker_url) == (pg, redis)
    both = Settings(data_dir=tmp_path / "a").with_(data_dir=tmp_path / "b", database_url=pg)
    assert both.database_url == pg and both.broker_url.endswith(f"{tmp_path / 'b' / 'broker.db'}")


SECRET = "pl4nted-s3cret"


@pytest.mark.parametrize(
    "text",
    [
        f"postgresql://postgres@db:5432/tm?password={SECRET}",
        f"postgresql://postgres@db/tm?sslmode=require&password={SECRET}&application_name=x",
        f"redis://db:6379/0?password={SECRET}",
        f"https://mirror.local/api?token={SECRET}",
        f"http://user:{SECRET}@hf-mirror.local:8080",
        f"https://:{SECRET}@hf-mirror.local",
        f"could not download x via http://u:{SECRET}@127.0.0.1:9: ConnectionError: HTTPConnectionPool(host=...)",
        f"amqp://guest:{SECRET}@rabbit//",
        f"sqla+postgresql://u:{SECRET}@h/db?password={SECRET}",
        f"postgresql://u:p@ss{SECRET}@db/x",
        f"postgresql://u:{SECRET}/with/slashes@db/x",
        f"database postgresql://u:a b {SECRET} c@db/x is unreachable",
        f"postgresql://u@db/x?sslmode=verify-full&sslpassword={SECRET}",
        f"host=db user=u password='a {SECRET} b' dbname=x",
        f"host=db password={SECRET}",
    ],
)
def test_mask_hides_every_form_of_url_secret(text: str) -> None:
    for masked in (mask_text(text), mask_url(text)):
        assert SECRET not in masked and "***" in masked
    assert mask_text("sslmode=require&application_name=x") == "sslmode=require&application_name=x"


def test_a_password_holding_an_at_sign_is_hidden_entirely() -> None:
    assert mask_text("postgresql://u:p@ss@db/x") == "postgresql://u:***@db/x"
    assert mask_text("postgresql://u@db/x?sslpassword=p%40ss&x=1") == "postgresql://u@db/x?sslpassword=***&x=1"
    assert mask_text("redis://localhost:6379/0 is down") == "redis://localhost:6379/0 is down"  # no credential


@settings(max_examples=300)
@given(password=st.text(min_size=1, max_size=40), before=st.sampled_from(["", "cannot reach ", "url='"]))
def test_no_password_survives_masking(password: str, before: str) -> None:
    """Whatever a password holds ("@", "/", spaces, quotes, newlines, "://"), none of it is left in the URL."""
    assert mask_text(f"{before}postgresql://tm:{password}@db:5432/x") == f"{before}postgresql://tm:***@db:5432/x"
    assert mask_url(f"redis://:{password}@cache:6379/0") == "redis://:***@cache:6379/0"


@given(value=st.text(alphabet=st.characters(blacklist_characters="&;#'\" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0"
                                             "\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
                                             "\u2009\u200a\u2028\u2029\u202f\u205f\u3000"),
                     min_size=1, max_size=30))  # fmt: skip
def test_no_password_parameter_survives_masking(value: str) -> None:
    for key in ("password", "sslpassword", "PASSWORD"):
        masked = mask_text(f"postgresql://u@db/x?sslmode=require&{key}={value}&target_session_attrs=any")
        assert masked == f"postgresql://u@db/x?sslmode=require&{key}=***&target_session_attrs=any"


def _logged(handler: logging.Handler, emit: object) -> str:
    """What ``handler`` writes for a record logged (with a traceback) by the callable ``emit``."""
    log = logging.getLogger("tokenmill.test.masking")
    log.addHandler(handler)
    try:
        assert callable(emit)
        emit(log)
    finally:
        log.removeHandler(handler)
    stream = getattr(handler, "stream", None)
    return stream.getvalue() if isinstance(stream, io.StringIO) else ""


def test_a_traceback_is_masked_too() -> None:
    """The exception's text in the traceback (``exc_info``), not only the message, goes through the mask."""
    handler = logging.StreamHandler(io.StringIO())
    handler.addFilter(MaskingFilter())

    def emit(log: logging.Logger) -> None:
        try:
            raise ConnectionError(f"connection to postgresql://tm:{SECRET}@db/x failed\nDETAIL: Failing row ({SECRET})")
        except ConnectionError:
            log.exception("store down")
            log.warning("stack", stack_info=True, extra={"x": 1})

    out = _logged(handler, emit)
    assert "Traceback" in out and "ConnectionError" in out and "store down" in out
    assert SECRET not in out


def test_masking_covers_uvicorns_handlers_as_serve_sets_them_up(capsys: pytest.CaptureFixture[str]) -> None:
    import uvicorn

    from tokenmill.cli.serve import UVICORN_LOGGERS

    uvicorn.Config(app=lambda: None, log_level="warning")  # configures uvicorn's loggers and their handlers
    install_masking(*UVICORN_LOGGERS)
    handlers = [h for name in UVICORN_LOGGERS for h in logging.getLogger(name).handlers]
    assert handlers and all(any(isinstance(f, MaskingFilter) for f in h.filters) for h in handlers)
    try:
        raise RuntimeError(f"postgresql://tm:{SECRET}@db/x refused")
    except RuntimeError:
        logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
    err = capsys.readouterr().err
    assert "Exception in ASGI application" in err and "RuntimeError" in err and SECRET not in err


def test_log_records_are_masked_where_they_are_written() -> None:
    """A download error logged with %s and the raw exception still reaches the log masked."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(MaskingFilter())
    log = logging.getLogger("tokenmill.test.masking")
    log.addHandler(handler)
    try:
        log.warning("fetching failed: %s", ValueError(f"GET http://u:{SECRET}@mirror/x?token={SECRET}"))
    finally:
        log.removeHandler(handler)
    assert SECRET not in stream.getvalue() and "fetching failed" in stream.getvalue()
