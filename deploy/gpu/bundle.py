"""Prepares deploy/gpu/bundle/: every file the GPU run needs, for a machine with no network.

`make gpu-bundle` runs this. A GPU run may carry at most 64 MiB (the git-tracked tree included), and
SmolLM2's GGUF alone is 94 MiB (every quant of it is over 84 MiB: its 576-wide rows rule out the K-quants),
so the bundle is cut into *loads*, each under the limit, carried by successive runs of deploy/gpu/run.sh on
the same machine (which keeps deploy/gpu/work/ between runs):

- ``load1/``: ``llama.cpp-src.tar.xz`` (the llama.cpp tree vendored in the pinned llama-cpp-python sdist,
  trimmed to what the libraries and llama-server are built from: the sdist itself is 77 MB), ``wheels/``
  (tokenmill, its dependencies and pytest for CPython 3.12 on manylinux x86-64, a wheel of
  llama-cpp-python's Python part alone, which loads the libraries the run builds through
  ``LLAMA_CPP_LIB_PATH``, and pip itself, for a Python without ``ensurepip``), and the model's first part;
- ``load2/``, ``load3/`` ...: the model's other parts;
- ``manifest.json`` in every load: the parts and their sha256, and which dependencies were left out.

Left out of ``wheels/`` to stay under the limit (tokenmill imports none of them on the GPU run's path):
matplotlib and its dependencies (only `tokenmill report`'s plots import it), psycopg (Postgres; the run uses
SQLite), hf-xet (the hub is never reached), uvloop (`tokenmill serve` is not run).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LLAMA_CPP_PYTHON = "0.3.36"
LIMIT_BYTES = 64 * 1024**2
MARGIN_BYTES = 1536 * 1024  # the manifest, folder entries, a tree that grows a little before the run
PYTHON_VERSION = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64")
MODEL = ("smollm2-135m-instruct", "q4_1", "SmolLM2-135M-Instruct.Q4_1.gguf")
# What of the vendored tree the build reads (build_llama.sh's targets: the libraries and llama-server).
KEEP = ("CMakeLists.txt", "LICENSE", "licenses", "cmake", "ggml", "src", "include", "common", "vendor", "tools",
        "scripts/ui-assets.cmake")
# Inside the kept folders: the web UI's sources (not built: LLAMA_BUILD_UI=OFF), tests and benchmarks.
DROP = ("tools/ui/src", "tools/ui/static", "tools/ui/tests", "tools/ui/package-lock.json", "tools/server/tests",
        "tools/server/bench")
TEST_TOOLS = ("pytest>=8", "pytest-timeout>=2.3", "pip")
EXCLUDED = {
    "matplotlib": "only `tokenmill report`'s plots import it",
    "pillow": "matplotlib's", "fonttools": "matplotlib's", "kiwisolver": "matplotlib's",
    "contourpy": "matplotlib's", "pyparsing": "matplotlib's", "cycler": "matplotlib's",
    "psycopg": "Postgres; the run uses SQLite", "psycopg-binary": "Postgres; the run uses SQLite",
    "hf-xet": "the hub is never reached", "uvloop": "`tokenmill serve` is not run",
}  # fmt: skip
NOT_FOUND = re.compile(r"No matching distribution found for ([A-Za-z0-9_.\-]+)")


def log(msg: str) -> None:
    print(f"gpu-bundle: {msg}", flush=True)


def sh(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    log("$ " + " ".join(argv))
    return subprocess.run(argv, env=env, text=True, capture_output=True, check=False)


def checked(proc: subprocess.CompletedProcess[str]) -> None:
    if proc.returncode != 0:
        raise SystemExit(f"gpu-bundle: failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")


def kept(rel: str) -> bool:
    """Whether ``rel`` (a path inside the vendored llama.cpp) goes into the trimmed source archive."""
    if rel == "":
        return True
    wanted = any(rel == k or rel.startswith(k + "/") or k.startswith(rel + "/") for k in KEEP)
    return wanted and not any(rel == d or rel.startswith(d + "/") for d in DROP)


def trim_sources(sdist: Path, out: Path) -> int:
    """The vendored llama.cpp of ``sdist`` as ``out`` (tar.xz, top folder ``llama.cpp``); its unpacked size."""
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
    unpacked = 0
    with tarfile.open(sdist, "r:gz") as src, tarfile.open(out, "w:xz", preset=6) as dst:
        for member in src:
            if not member.name.startswith(prefix):
                continue
            rel = member.name[len(prefix) :].rstrip("/")
            if not kept(rel) or not (member.isfile() or member.isdir()):
                continue
            member.name = "llama.cpp/" + rel if rel else "llama.cpp"
            # A path over 100 characters travels in a PAX header, which would win over the new name.
            member.pax_headers = {k: v for k, v in member.pax_headers.items() if k not in ("path", "linkpath")}
            unpacked += member.size if member.isfile() else 0
            dst.addfile(member, src.extractfile(member) if member.isfile() else None)
    return unpacked


def fetch_sdist(cache: Path) -> Path:
    """The pinned llama-cpp-python sdist, from the package registry once, then from ``cache``."""
    path = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        checked(sh([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(cache)]))  # fmt: skip
    return path


def python_part_wheel(sdist: Path, out: Path) -> Path:
    """llama-cpp-python's Python part alone: the sdist built with its CMake project switched off."""
    env = {**os.environ, "CMAKE_ARGS": "-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF"}
    checked(sh([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out), str(sdist)], env=env))
    wheel = next(out.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}-*.whl"))
    with zipfile.ZipFile(wheel) as whl:
        libs = [n for n in whl.namelist() if n.endswith((".so", ".dylib", ".dll"))]
    if libs:
        raise SystemExit(f"gpu-bundle: {wheel.name} holds compiled libraries ({libs[:3]}); expected none")
    return wheel


def download_wheels(requirements: list[str], out: Path, local: Path) -> None:
    """Binary wheels of ``requirements`` and their dependencies for CPython 3.12 into ``out``.

    A dependency published only as an sdist is built into a wheel here, once, if it is pure Python (then
    one wheel serves every platform); a compiled one stops the bundle with its name.
    """
    base = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--python-version", PYTHON_VERSION,
            "--implementation", "cp", "--abi", f"cp{PYTHON_VERSION.replace('.', '')}", "--abi", "abi3",
            "--abi", "none", *(f"--platform={p}" for p in PLATFORMS), "--find-links", str(local),
            "-d", str(out)]  # fmt: skip
    for _ in range(10):
        proc = sh([*base, *requirements])
        if proc.returncode == 0:
            return
        missing = NOT_FOUND.search(proc.stderr)
        if missing is None:
            checked(proc)
        name = missing[1] if missing else ""
        log(f"{name} has no wheel for CPython {PYTHON_VERSION}; building one here from its sdist")
        checked(sh([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-binary", name, "-w", str(local), name]))
        built = sorted(local.glob(f"{re.sub(r'[-_.]+', '_', name)}-*.whl"), key=lambda p: p.stat().st_mtime)
        if not built or not built[-1].name.endswith("-py3-none-any.whl"):
            raise SystemExit(f"gpu-bundle: {name} is published only as an sdist and is not pure Python")
    raise SystemExit("gpu-bundle: too many dependencies without wheels")


def distribution(wheel: Path) -> str:
    return re.sub(r"[-_.]+", "-", wheel.name.split("-", 1)[0]).lower()


def tracked_bytes() -> int:
    """What the git-tracked tree weighs: every run carries it besides the bundle."""
    names = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True).stdout
    return sum((ROOT / n).stat().st_size for n in names.decode().split("\0") if n and (ROOT / n).is_file())


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def split_model(model: Path, out: Path, first_room: int, room: int) -> list[dict[str, object]]:
    """``model`` cut into parts: the first fits ``first_room`` bytes of load1, the others ``room`` each."""
    parts: list[dict[str, object]] = []
    with model.open("rb") as fh:
        load = 1
        while True:
            size = first_room if load == 1 else room
            block = fh.read(max(0, size))
            if not block and load > 1:
                break
            if block:
                name = f"{model.name}.part{len(parts) + 1}"
                (out / f"load{load}").mkdir(parents=True, exist_ok=True)
                (out / f"load{load}" / name).write_bytes(block)
                parts.append({"load": load, "name": name, "size": len(block),
                              "sha256": hashlib.sha256(block).hexdigest()})  # fmt: skip
            load += 1
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "deploy" / "gpu" / "bundle")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "tokenmill" / "gpu-bundle")
    default_models = Path(os.environ.get("TOKENMILL_MODELS_DIR", Path.home() / ".cache" / "tokenmill" / "models"))
    parser.add_argument("--models-dir", type=Path, default=default_models)
    args = parser.parse_args()
    family, quant, filename = MODEL
    model = args.models_dir / family / filename
    if not model.is_file():
        raise SystemExit(f"gpu-bundle: {model} is missing; `make model` fetches it")
    shutil.rmtree(args.out, ignore_errors=True)
    load1 = args.out / "load1"
    (load1 / "wheels").mkdir(parents=True)
    sdist = fetch_sdist(args.cache)
    unpacked = trim_sources(sdist, load1 / "llama.cpp-src.tar.xz")
    log(f"llama.cpp sources: {unpacked / 2**20:.1f} MiB unpacked, "
        f"{(load1 / 'llama.cpp-src.tar.xz').stat().st_size / 2**20:.1f} MiB as tar.xz")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="gpu-bundle-") as tmp:
        local, downloaded = Path(tmp) / "local", Path(tmp) / "downloaded"
        local.mkdir()
        python_part_wheel(sdist, local)
        checked(sh([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(local), str(ROOT)]))
        tokenmill_wheel = next(local.glob("tokenmill-*.whl"))
        download_wheels([str(tokenmill_wheel), *TEST_TOOLS], downloaded, local)
        for wheel in sorted(downloaded.glob("*.whl")):
            if distribution(wheel) not in EXCLUDED:
                shutil.copy2(wheel, load1 / "wheels" / wheel.name)
    tree = tracked_bytes()
    room = LIMIT_BYTES - tree - MARGIN_BYTES
    parts = split_model(model, args.out, room - folder_bytes(load1), room)
    manifest = {
        "llama_cpp_python": LLAMA_CPP_PYTHON, "python": PYTHON_VERSION,
        "model": {"family": family, "quant": quant, "filename": filename, "size": model.stat().st_size,
                  "sha256": sha256(model)},
        "parts": parts, "loads": max(int(str(p["load"])) for p in parts), "excluded": EXCLUDED,
    }  # fmt: skip
    loads = sorted(args.out.glob("load*"))
    for folder in loads:
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    report(loads, tree)


def report(loads: list[Path], tree: int) -> None:
    """Each load's size with the tracked tree, against the limit; exit 1 when one is over."""
    over = False
    log(f"git-tracked tree: {tree / 2**20:.1f} MiB (carried by every run)")
    for folder in loads:
        size = folder_bytes(folder)
        total = size + tree
        over |= total > LIMIT_BYTES
        what = ", ".join(sorted({p.name.split(".part")[0] if ".part" in p.name else p.name for p in folder.iterdir()}))
        log(f"{folder.name}: {size / 2**20:.1f} MiB + tree = {total / 2**20:.1f} MiB of {LIMIT_BYTES / 2**20:.0f} MiB "
            f"({'OVER' if total > LIMIT_BYTES else 'ok'}): {what}")
    if over:
        raise SystemExit("gpu-bundle: a load is over the limit of one run")
    wheels = loads[0] / "wheels"
    log(f"wheels: {len(list(wheels.glob('*.whl')))} files, {folder_bytes(wheels) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
