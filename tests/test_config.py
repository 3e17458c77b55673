"""Settings: URLs derived from the data dir follow it; explicit URLs stay."""

from __future__ import annotations

from pathlib import Path

from tokenmill.config import Settings


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
