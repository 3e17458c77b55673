"""Puts the model back together from the parts the loads carried (deploy/gpu/run.sh's collect step).

    python3 deploy/gpu/model_parts.py MANIFEST PARTS_DIR MODELS_DIR

Each part is checked against its sha256 in the manifest as it arrives; once every part is there, they are
joined into MODELS_DIR/<family>/<file> and the whole file checked. Standard library only: it runs before the
venv exists. Exit 0 in every case but a corrupt part or file (what is still missing is printed).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def main(manifest_path: Path, parts_dir: Path, models_dir: Path) -> int:
    manifest = json.loads(manifest_path.read_text())
    model = manifest["model"]
    target = models_dir / model["family"] / model["filename"]
    if target.is_file() and target.stat().st_size == model["size"]:
        print(f"model: {target} is whole")
        return 0
    missing = []
    for part in manifest["parts"]:
        path = parts_dir / part["name"]
        if not path.is_file():
            missing.append(f"{part['name']} (load{part['load']})")
        elif sha256(path) != part["sha256"]:
            print(f"model: {path} is corrupt (sha256 differs from the manifest's)")
            return 1
    if missing:
        print(f"model: waiting for {', '.join(missing)}")
        return 0
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.part")
    with tmp.open("wb") as out:
        for part in manifest["parts"]:
            out.write((parts_dir / part["name"]).read_bytes())
    if sha256(tmp) != model["sha256"]:
        print(f"model: the joined {target.name} does not match its sha256")
        tmp.unlink()
        return 1
    tmp.replace(target)
    print(f"model: {target} joined from {len(manifest['parts'])} parts, sha256 {model['sha256'][:16]}… ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])))
