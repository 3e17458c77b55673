"""Settings: URLs derived from the data dir follow it; explicit URLs stay."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest

from tokenmill.config import MaskingFilter, Settings, mask_text, mask_url


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
    ],
)
def test_mask_hides_every_form_of_url_secret(text: str) -> None:
    for masked in (mask_text(text), mask_url(text)):
        assert SECRET not in masked and "***" in masked
    assert mask_text("sslmode=require&application_name=x") == "sslmode=require&application_name=x"


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
