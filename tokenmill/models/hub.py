"""Download one GGUF file from a Hugging Face Hub (or a Hub-compatible mirror via ``HF_ENDPOINT``).

huggingface_hub does the transfer (auth, redirects to the CDN, retries, progress). The file lands in a
private staging folder next to the target and is moved into place only after its sha256 matched: the
catalog's hash when known, else the Hub's LFS ETag (which *is* the sha256 of LFS files). A corrupt or
interrupted download therefore never becomes a model file another worker could pick up.
"""

from __future__ import annotations

import inspect
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tokenmill.config import mask_text, mask_url
from tokenmill.errors import ModelError, ModelIntegrityError
from tokenmill.models.catalog import HubSource
from tokenmill.models.integrity import sha256_file

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _silent_tqdm() -> Any:
    from tqdm.auto import tqdm

    class Silent(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Silent


def hub_download(
    source: HubSource,
    target: Path,
    *,
    expected_sha256: str | None = None,
    endpoint: str | None = None,
    token: str | bool | None = None,
    progress: bool = True,
) -> str:
    """Fetch ``source`` to ``target`` atomically and return its verified sha256."""
    try:
        import huggingface_hub
    except ImportError as exc:
        raise ModelError("huggingface_hub is not installed; cannot download from the Hub") from exc
    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or None
    where = f"{source.describe()}" + (f" via {mask_url(endpoint)}" if endpoint else "")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".hub-", dir=target.parent))
    try:
        try:
            url = huggingface_hub.hf_hub_url(source.repo_id, source.filename, revision=source.revision,
                                             endpoint=endpoint)
            meta = huggingface_hub.get_hf_file_metadata(url, token=token)
            kwargs: dict[str, Any] = {
                "revision": meta.commit_hash or source.revision,
                "local_dir": staging,
                "endpoint": endpoint,
                "token": token,
            }
            if not progress and "tqdm_class" in inspect.signature(huggingface_hub.hf_hub_download).parameters:
                kwargs["tqdm_class"] = _silent_tqdm()
            downloaded = Path(huggingface_hub.hf_hub_download(source.repo_id, source.filename, **kwargs))
        except ModelError:
            raise
        except Exception as exc:  # huggingface_hub raises HTTP, OS, value and offline errors alike
            raise ModelError(mask_text(f"could not download {where}: {type(exc).__name__}: {exc}")) from exc
        etag = (meta.etag or "").strip('"').lower()
        expected = expected_sha256 or (etag if _SHA256.match(etag) else None)
        actual = sha256_file(downloaded)
        if expected is not None and actual != expected:
            raise ModelIntegrityError(f"sha256 mismatch for {target}: expected {expected}, got {actual} from {where}")
        os.replace(downloaded, target)
        return actual
    finally:
        shutil.rmtree(staging, ignore_errors=True)
