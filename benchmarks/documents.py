"""A folder of documents through `tokenmill run`: how the documents were cut and how fast they ran.

    .venv/bin/python benchmarks/documents.py FOLDER [--template T] [--max-tokens 64] [--combine] [--n-ctx N]
    .venv/bin/python benchmarks/documents.py --licenses BSD,Apache-2.0,MPL-2.0,GPL-3   # a folder made here

Runs the real command (SmolLM2-135M-Instruct, a fresh data dir) with nothing but the template (and the flags
given), then reads the store and prints, per file, its parts and the tokens of its largest and mean part
(chat markup, template and part, counted with the model's tokenizer) against the budget (the per-request
context less max_tokens), the per-request context `run` chose, the wall time and the prompt and generated
tokens per second. `--licenses` copies those files of /usr/share/common-licenses (Debian) into a folder.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import select

from tokenmill.models.tokenizer import tokenizer_for
from tokenmill.store import Store
from tokenmill.store.tables import Job, RequestRow, Result

DEFAULT_TEMPLATE = "Summarize the license terms of this package in one sentence. {text}"


def licenses_folder(names: str, into: Path) -> Path:
    folder = into / "licenses"
    folder.mkdir(parents=True)
    for name in names.split(","):
        shutil.copy(Path("/usr/share/common-licenses") / name, folder / f"{name}.txt")
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="?", type=Path)
    ap.add_argument("--licenses", help="comma-separated names in /usr/share/common-licenses to make the folder of")
    ap.add_argument("--template", default=DEFAULT_TEMPLATE)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--n-ctx", type=int)
    ap.add_argument("--combine", action="store_true")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tm-docs-bench-"))
    folder = args.folder or licenses_folder(args.licenses or "BSD,Apache-2.0,MPL-2.0", work)
    data = work / ".tokenmill"
    argv = [sys.executable, "-m", "tokenmill.cli", "--data-dir", str(data), "run", str(folder), "--model", args.model,
            "--template", args.template, "--max-tokens", str(args.max_tokens), "--workers", str(args.workers),
            "-o", str(work / "out.jsonl"), "--errors", str(work / "errors.jsonl")]  # fmt: skip
    argv += ["--n-ctx", str(args.n_ctx)] if args.n_ctx else []
    argv += ["--combine"] if args.combine else []
    started = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "TOKENMILL_DATA_DIR": str(data)})
    wall = time.monotonic() - started
    context = next((line for line in proc.stderr.splitlines() if line.startswith("context:")), "context: default")
    report(folder, data, args, wall, context, proc.returncode)
    if proc.returncode != 0:
        print(proc.stderr[-2000:], file=sys.stderr)
    shutil.rmtree(work, ignore_errors=True)


def report(folder: Path, data: Path, args: argparse.Namespace, wall: float, context: str, rc: int) -> None:
    models_dir = Path(os.environ.get("TOKENMILL_MODELS_DIR", Path.home() / ".cache" / "tokenmill" / "models"))
    tok = tokenizer_for(args.model, models_dir)
    assert tok is not None, "the model is not in the models folder"
    store = Store(f"sqlite:///{data / 'tokenmill.db'}")
    with store.session() as s:
        jobs = list(s.scalars(select(Job).order_by(Job.created_at)))
        first = jobs[0]
        n_ctx = int(first.options.get("n_ctx") or 2048)
        budget = n_ctx - args.max_tokens
        sizes: dict[str, list[int]] = {}
        for req in s.scalars(select(RequestRow).where(RequestRow.job_id == first.id).order_by(RequestRow.seq)):
            source = req.payload.get("source") or req.custom_id
            sizes.setdefault(source, []).append(tok.prompt_tokens(req.payload["messages"][-1]["content"]))
        ids = [j.id for j in jobs]
        results = list(s.execute(select(Result.prompt_tokens, Result.completion_tokens, Result.status)
                                 .where(Result.job_id.in_(ids))))  # fmt: skip
    total_kb = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1024
    print(f"folder: {folder} ({len(sizes)} files, {total_kb:,.0f} KB), max_tokens {args.max_tokens}"
          + (", --combine" if args.combine else ""))
    print(re.sub(r"\s+", " ", context))
    print(f"{'file':40} {'KB':>7} {'parts':>6} {'max tok':>8} {'mean tok':>9} {'budget':>7}")
    for source, parts in sizes.items():
        kb = (folder / source).stat().st_size / 1024
        mean = sum(parts) / len(parts)
        print(f"{source[:40]:40} {kb:7.1f} {len(parts):6d} {max(parts):8,d} {mean:9,.0f} {budget:7,d}")
    every = [t for parts in sizes.values() for t in parts]
    over = sum(t > budget for t in every)
    print(f"all parts: {len(every)}; max {max(every):,} and mean {sum(every) / len(every):,.0f} tokens of a "
          f"{budget:,}-token budget (n_ctx {n_ctx:,} less max_tokens); {over} over")
    prompt = sum(r[0] for r in results)
    gen = sum(r[1] for r in results)
    failed = sum(r[2] != "succeeded" for r in results)
    print(f"jobs: {len(jobs)} ({len(jobs) - 1} combine rounds); rows {len(results)}, {failed} failed; exit {rc}")
    print(f"wall {wall:.1f} s; prompt {prompt:,} tokens = {prompt / wall:,.1f} tok/s; "
          f"generated {gen:,} tokens = {gen / wall:,.1f} tok/s (end to end, launch to exit)")


if __name__ == "__main__":
    main()
