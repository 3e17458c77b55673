"""Which model file a worker serves: capacity → variant → a verified local file.

Shared by the worker and by `tokenmill run`, which resolves the model once before starting local
workers (so they do not race to fetch it) and needs the file's identity to answer cached rows.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from tokenmill.config import Settings
from tokenmill.errors import ModelError
from tokenmill.host import Capacity
from tokenmill.models.catalog import Family, get_family, parse_model_ref
from tokenmill.models.quantize import catalog_with_local
from tokenmill.models.resolve import ResolvedModel, looks_like_path, obtainable_predicate, resolve_model
from tokenmill.models.sizing import Choice, Prefer, choose_variant

log = logging.getLogger(__name__)
DEFAULT_N_SEQ = 8
N_SEQ_CHOICES = (16, 8, 4, 2, 1)


@dataclass(frozen=True)
class WorkerOptions:
    model: str = "smollm2-135m-instruct"
    concurrency: int = 1
    threads: int | None = None
    n_seq: int | None = None
    n_ctx: int = 2048
    gpu: bool | None = None
    name: str | None = None
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"  # the metrics endpoint has no auth: loopback unless widened
    share: int = 1  # how many tokenmill worker processes split this host
    prefer: Prefer = "balanced"


@dataclass(frozen=True)
class ModelSelection:
    resolved: ResolvedModel
    choice: Choice | None  # None for a bare .gguf path: nothing to choose
    n_seq: int = DEFAULT_N_SEQ

    @property
    def model_id(self) -> str:
        """Identity of the weights for the result cache: the file's sha256 when known."""
        return self.resolved.sha256 or self.resolved.variant_label

    @property
    def family_queue(self) -> str:
        return self.resolved.family  # a .gguf path's family is already its content (resolve.file_family)


def select_model(settings: Settings, opts: WorkerOptions, capacity: Capacity) -> ModelSelection:
    """The best variant that fits and can be obtained; falls back when the best cannot be fetched."""
    if looks_like_path(opts.model):
        return ModelSelection(
            resolve_model(opts.model, settings.models_dir, fetch=False), None, opts.n_seq or DEFAULT_N_SEQ
        )
    catalog = catalog_with_local(settings.models_dir)
    family_name, quant = parse_model_ref(opts.model, catalog)
    if opts.gpu is False:
        capacity = capacity.without_gpus()
    elif capacity.gpus and not capacity.gpu_offload:
        warn_cpu_build(capacity)
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    can_get = obtainable_predicate(
        settings.models_dir, sources=("local", "registry") if offline else ("local", "registry", "hub")
    )
    failed: dict[str, str] = {}
    while True:
        try:
            choice = choose_variant(
                get_family(family_name, catalog),
                capacity,
                share=opts.share,
                n_ctx=opts.n_ctx,
                n_seq=(opts.n_seq or DEFAULT_N_SEQ) + 1,  # the engine keeps one extra KV stream for shared prefixes
                pinned=quant,
                obtainable=lambda v: v.label not in failed and can_get(v),
                prefer=opts.prefer,
            )
        except ModelError:
            if not failed:
                raise
            raise ModelError("; ".join(f"{label}: {why}" for label, why in failed.items())) from None
        n_seq = opts.n_seq or _widest_batch(choice, get_family(family_name, catalog), capacity, opts)
        try:
            resolved = resolve_model(choice.variant.label, settings.models_dir, fetch=True, catalog=catalog)
            return ModelSelection(resolved, choice, n_seq)
        except ModelError as exc:
            # The best fit may be unreachable (no hub access, corrupt download): take the next best.
            if quant is not None:
                raise
            failed[choice.variant.label] = str(exc)
            log.warning("cannot obtain %s (%s); trying the next variant", choice.variant.label, exc)


def warn_cpu_build(capacity: Capacity) -> None:
    """A GPU the installed llama.cpp cannot use is worth a warning: the choice quietly falls back to the CPU."""
    names = ", ".join(f"GPU{g.index} {g.name}" for g in capacity.gpus)
    log.warning(
        "%s found, but the installed llama.cpp is built without GPU offload: running on the CPU. Reinstall "
        'llama-cpp-python with CMAKE_ARGS="-DGGML_CUDA=on" to use it (README, "GPU")', names
    )


def _widest_batch(choice: Choice, family: Family, capacity: Capacity, opts: WorkerOptions) -> int:
    """The most sequences decoded together whose KV cache still fits beside the chosen variant.

    Batched decoding is where CPU throughput comes from (about 2x at 16 sequences on a small model),
    but KV grows with every sequence: a 7B model on a small box gets fewer, SmolLM2 gets 16.
    """
    for n_seq in N_SEQ_CHOICES:
        try:
            choose_variant(
                family,
                capacity,
                share=opts.share,
                n_ctx=opts.n_ctx,
                n_seq=n_seq + 1,
                pinned=choice.variant.quant,
            )
            return n_seq
        except ModelError:
            continue
    return 1
