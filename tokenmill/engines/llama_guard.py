"""Keep llama.cpp off its AMX weight repacking, which segfaults on Intel CPUs with AMX.

When llama-cpp-python is compiled on such a CPU (pip builds it with ``-march=native``), ggml repacks
quantized weights into an "AMX" buffer and multiplies them with its AMX kernel, and that kernel
crashes the process on the first batched prompt evaluation (``ggml_backend_amx_mul_mat``;
llama.cpp issue #20824, closed without a fix; dspy dropped the AMX build for the same crash). A short
prompt survives, so the crash shows up only under real work. With ``use_extra_bufts`` off the weights
stay in the ordinary CPU buffer and the AVX-512 kernels run them.

The guard is keyed on what the loaded library reports (``AMX_INT8 = 1`` in its system info), so builds
and CPUs without AMX keep their extra buffer types (e.g. the Q4_0 repack) untouched.
"""

from __future__ import annotations

import importlib
import logging
import threading
from typing import Any

log = logging.getLogger(__name__)

_lock = threading.Lock()
_warned = False


def amx_repack_active(L: Any) -> bool:
    """True when this llama.cpp build would repack weights for AMX on this CPU."""
    return b"AMX_INT8 = 1" in bytes(L.llama_print_system_info() or b"")


def model_params(L: Any) -> Any:
    """``llama_model_default_params()`` with the AMX repack turned off where it would be used."""
    params = L.llama_model_default_params()
    if amx_repack_active(L):
        params.use_extra_bufts = False
        _note_once()
    return params


def _note_once() -> None:
    global _warned
    if not _warned:
        _warned = True
        log.info("AMX weight repacking off: its matmul kernel crashes on batched prompts (llama.cpp #20824)")


def plain_llama(model_path: str, **kwargs: Any) -> Any:
    """``llama_cpp.Llama(model_path, **kwargs)`` under the same guard (benchmark baseline, test reference).

    ``Llama`` builds its model parameters from ``llama_model_default_params`` and offers no switch for
    extra buffer types, so that function is swapped for the duration of the constructor.
    """
    llama_cpp: Any = importlib.import_module("llama_cpp")
    low: Any = importlib.import_module("llama_cpp.llama_cpp")
    if not amx_repack_active(low):
        return llama_cpp.Llama(model_path, **kwargs)
    with _lock:
        default = low.llama_model_default_params

        def guarded() -> Any:
            params = default()
            params.use_extra_bufts = False
            return params

        low.llama_model_default_params = guarded
        try:
            _note_once()
            return llama_cpp.Llama(model_path, **kwargs)
        finally:
            low.llama_model_default_params = default
