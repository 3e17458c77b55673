"""A GPU host stood in for real `tokenmill` processes: NVML and, if asked, llama.cpp's offload answer.

The stand-ins are modules written to a folder that goes first on the children's PYTHONPATH, so every process
of the test (a `worker --concurrency N` parent, its children, `run` and its workers, the offload probe's
throwaway interpreter) imports them in place of the real ones. NVML ignores CUDA_VISIBLE_DEVICES, as the real
one does: which GPU a child sees is tokenmill's own filtering of what NVML lists. Only with the stub engine:
the llama_cpp stand-in answers the offload probe and nothing else.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

GiB = 1024**3

PYNVML = '''
import json, os, types

class NVMLError(Exception):
    pass

NVML_CLOCK_MEM = 2
_GPUS = json.loads(os.environ.get("FAKE_NVML_GPUS", "[]"))

def nvmlInit():
    if not _GPUS:
        raise NVMLError("NVML Shared Library Not Found")

def nvmlShutdown():
    pass

def nvmlDeviceGetCount():
    return len(_GPUS)

def nvmlDeviceGetHandleByIndex(index):
    return index

def nvmlDeviceGetName(handle):
    return _GPUS[handle][0]

def nvmlDeviceGetUUID(handle):
    return _GPUS[handle][3]

def nvmlDeviceGetMemoryInfo(handle):
    total, free = _GPUS[handle][1], _GPUS[handle][2]
    return types.SimpleNamespace(total=total, free=free, used=total - free)

def nvmlDeviceGetMaxClockInfo(handle, clock):
    return 2619

def nvmlDeviceGetMemoryBusWidth(handle):
    return 5120
'''

LLAMA_CPP = '''
def llama_supports_gpu_offload():
    return True
'''

# Two unlike cards, so a test can tell which one a process sized its model against.
TWO_GPUS = [
    ("NVIDIA H100 80GB HBM3", 80 * GiB, 79 * GiB, "GPU-11111111-aaaa-4aaa-8aaa-aaaaaaaaaaaa"),
    ("NVIDIA L4", 24 * GiB, 23 * GiB, "GPU-22222222-bbbb-4bbb-8bbb-bbbbbbbbbbbb"),
]


def gpu_host_env(folder: Path, gpus: list[tuple[str, int, int, str]], *, offload: bool) -> dict[str, str]:
    """The environment that makes a child see ``gpus`` through NVML; ``offload``: its llama.cpp offloads
    (else the real llama.cpp installed here answers the probe: a CPU build)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pynvml.py").write_text(PYNVML)
    if offload:
        (folder / "llama_cpp").mkdir(exist_ok=True)
        (folder / "llama_cpp" / "__init__.py").write_text(LLAMA_CPP)
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "FAKE_NVML_GPUS": json.dumps(gpus)}
