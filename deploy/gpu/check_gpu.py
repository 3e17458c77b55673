"""What `tokenmill sysinfo --json` and `tokenmill models recommend --json` must say on a GPU machine.

    python deploy/gpu/check_gpu.py SYSINFO_JSON RECOMMEND_JSON

One line per check (PASS/FAIL) and the facts behind it; exit 1 when a check fails.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

FAMILY = "smollm2-135m-instruct"


def checks(sysinfo: dict[str, Any], recommend: list[dict[str, Any]]) -> list[tuple[bool | None, str]]:
    """(passed, what was seen) per check; passed None: a fact shown, not checked (the other families)."""
    gpus = sysinfo.get("gpus", [])
    out: list[tuple[bool | None, str]] = [(bool(gpus), f"NVML sees {len(gpus)} GPU(s)")]
    for g in gpus:
        out.append((str(g.get("uuid", "")).startswith("GPU-"),
                    f"GPU{g['index']} {g['name']}: {g['vram_free_bytes'] / 2**30:.1f}/"
                    f"{g['vram_total_bytes'] / 2**30:.1f} GiB free, {g['mem_bandwidth_bytes'] / 1e9:.0f} GB/s, "
                    f"{g.get('uuid') or 'no UUID'}"))  # fmt: skip
    out.append((sysinfo.get("gpu_offload") is True, f"llama.cpp offload probe: {sysinfo.get('gpu_offload')}"))
    for rec in recommend:
        c = rec.get("choice")
        if c is None:
            if rec["family"] == FAMILY:
                out.append((False, f"{FAMILY}: nothing chosen ({rec.get('error')})"))
            continue
        full = c["device"] == "cuda" and c["n_gpu_layers"] == -1
        line = f"{rec['family']}: {c['variant']} on {c['device']}, n_gpu_layers {c['n_gpu_layers']} — {c['reason']}"
        out.append((full if rec["family"] == FAMILY else None, line))
    return out


def main() -> int:
    sysinfo = json.loads(Path(sys.argv[1]).read_text())
    recommend = json.loads(Path(sys.argv[2]).read_text())
    results = checks(sysinfo, recommend)
    for ok, line in results:
        print(f"{'INFO' if ok is None else 'PASS' if ok else 'FAIL'}  {line}")
    return 1 if any(ok is False for ok, _ in results) else 0


if __name__ == "__main__":
    sys.exit(main())
