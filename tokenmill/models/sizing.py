"""How much memory a variant needs, and which variant a worker should load.

Memory model (bytes), for ``n_ctx`` tokens per sequence and ``n_seq`` parallel sequences:

- weights: the GGUF file size (llama.cpp maps it; every byte ends up in RAM or VRAM);
- KV cache: ``2 x n_layers x n_kv_heads x head_dim x 2 (f16) x n_ctx x n_seq``;
- overhead: llama.cpp's compute buffer plus a fixed runtime allowance. The compute buffer is sized for
  a worst-case micro-batch of ``u = min(512, n_ctx x n_seq)`` tokens, and its largest tensors are either
  the logits (``u x n_vocab`` f32) or, without flash attention, the attention scores
  (``u x (n_heads + 1) x n_ctx`` f32), whichever is larger; plus ``u x 4 x n_embd`` f32 activations,
  ``n_seq x n_vocab`` f32 output logits and 64 MiB for the runtime (CUDA/ggml scratch, graph metadata).
  Measured on SmolLM2 135M with llama.cpp 0.3.36 (flash attention off): n_ctx 2048 → 99 MiB,
  8192 → 166 MiB, 32768 → 646 MiB compute buffer; the formula gives 100, 164 and 644 MiB.

Preference (``--prefer``, default ``balanced``) orders the candidates before the rules below:

- ``quality``: best quality first (:data:`~tokenmill.models.catalog.QUALITY_ORDER`), the rules as written.
- ``balanced``: the source document's guidance. Decoding is bound by memory bandwidth, so on a CPU a
  Q8_0 generates about half as fast as a 4-bit K-quant for 1-3 % of quality: the 4-bit class comes first
  (``q4_k_m``, then ``q4_k_s`` when memory is tight). On a GPU, where everything fits, the best quality
  whose predicted generation rate is within 25 % of the fastest variant above Q3 that fits.
- ``speed``: the fastest (smallest) variant above Q3 that fits.

Choice rules, in the preference's order:

1. Full GPU offload with the best variant whose total fits the chosen GPU's free VRAM minus a margin
   (512 MiB + 3 % of the card: the CUDA context and allocator fragmentation are not in "free").
2. Partial offload with the best variant that puts at least half its layers on the GPU while the rest
   (non-layer tensors, remaining layers and their KV, a CPU compute buffer) fits the RAM share.
   Below half the layers the CPU does most of the work, so a smaller variant that runs mostly on the
   GPU is the better trade; that is why a 14B model on an 8 GB card lands on Q6_K, not Q8_0.
3. Otherwise the CPU rules: only variants up to ``cpu_max_bpw`` (Q8_0 by default; F16 on a CPU doubles
   the memory read per token for no measurable quality), each with as many layers on a GPU as fit,
   else none. The RAM share is ``available / share - 1 GiB`` and threads are ``physical cores / share``,
   so N workers on one host split it instead of fighting over it.

A pinned variant skips the choice but not the fit check.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from tokenmill.errors import ModelLoadError
from tokenmill.host import Capacity, GpuInfo
from tokenmill.models.catalog import CATALOG, QUANT_BPW, Family, Variant, get_family, quality_rank

MiB = 1024**2
GiB = 1024**3
N_UBATCH = 512
RUNTIME_OVERHEAD = 64 * MiB
VRAM_MARGIN_FIXED = 512 * MiB
VRAM_MARGIN_FRACTION = 0.03
RAM_MARGIN = 1 * GiB
MIN_OFFLOAD_FRACTION = 0.5
CPU_MAX_BPW = QUANT_BPW["q8_0"]

Device = Literal["cuda", "cpu"]
Prefer = Literal["quality", "balanced", "speed"]
PREFERENCES: tuple[str, ...] = ("quality", "balanced", "speed")
FOUR_BIT_MAX_BPW = 5.0  # q4_k_m, q4_k_s, q4_1, q4_0: the 4-bit class
ABOVE_Q3_MIN_BPW = 4.0
BALANCED_GPU_SLOWDOWN = 0.75  # balanced on a GPU: the best quality within 25 % of the fastest that fits
Obtainable = Callable[[Variant], bool]


def fmt_bytes(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if abs(n) >= 0.1 * GiB else f"{n / MiB:.0f} MiB"


@dataclass(frozen=True)
class MemoryEstimate:
    weights_bytes: int
    kv_bytes: int
    overhead_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.overhead_bytes

    def describe(self) -> str:
        return (f"{fmt_bytes(self.weights_bytes)} weights + {fmt_bytes(self.kv_bytes)} KV + "
                f"{fmt_bytes(self.overhead_bytes)} overhead = {fmt_bytes(self.total_bytes)}")

    def to_json(self) -> dict[str, int]:
        return {"weights_bytes": self.weights_bytes, "kv_bytes": self.kv_bytes,
                "overhead_bytes": self.overhead_bytes, "total_bytes": self.total_bytes}


def _family_of(variant: Variant, family: Family | None) -> Family:
    return family if family is not None else get_family(variant.family, CATALOG)


def estimate_memory(variant: Variant, n_ctx: int, n_seq: int = 1, *, family: Family | None = None) -> MemoryEstimate:
    """Weights + KV cache + compute overhead for ``n_seq`` sequences of ``n_ctx`` tokens (module doc)."""
    if n_ctx < 1 or n_seq < 1:
        raise ValueError(f"n_ctx and n_seq must be positive (got {n_ctx}, {n_seq})")
    fam = _family_of(variant, family)
    cells = n_ctx * n_seq
    kv = fam.kv_bytes_per_token * cells
    u = min(N_UBATCH, cells)
    compute = 4 * u * (max(fam.n_vocab, (fam.n_heads + 1) * n_ctx) + 4 * fam.n_embd)
    overhead = compute + 4 * n_seq * fam.n_vocab + RUNTIME_OVERHEAD
    return MemoryEstimate(weights_bytes=variant.size_bytes, kv_bytes=kv, overhead_bytes=overhead)


@dataclass(frozen=True)
class Choice:
    """What a worker loads and how. ``n_gpu_layers``: -1 all layers, k partial, 0 none."""

    variant: Variant
    device: Device
    n_gpu_layers: int
    n_threads: int
    memory: MemoryEstimate
    reason: str
    n_ctx: int
    n_seq: int
    gpu_index: int | None = None

    @property
    def label(self) -> str:
        return self.variant.label

    def to_json(self) -> dict[str, Any]:
        return {"variant": self.variant.label, "device": self.device, "n_gpu_layers": self.n_gpu_layers,
                "n_threads": self.n_threads, "n_ctx": self.n_ctx, "n_seq": self.n_seq,
                "gpu_index": self.gpu_index, "memory": self.memory.to_json(), "reason": self.reason}


@dataclass(frozen=True)
class _Budget:
    ram: int
    ram_note: str
    threads: int
    gpu: GpuInfo | None
    vram: int


def _budget(capacity: Capacity, share: int, gpu_index: int | None) -> _Budget:
    if share < 1:
        raise ValueError(f"share must be >= 1 (got {share})")
    ram = max(0, capacity.ram_available_bytes // share - RAM_MARGIN)
    note = f"{fmt_bytes(ram)} RAM" + (f" (1/{share} of {fmt_bytes(capacity.ram_available_bytes)} available)"
                                      if share > 1 else "")
    threads = max(1, capacity.physical_cores // share)
    gpus = capacity.usable_gpus
    gpu: GpuInfo | None = None
    if gpu_index is not None:
        gpu = next((g for g in gpus if g.index == gpu_index), None)
        if gpu is None:
            raise ModelLoadError(f"GPU {gpu_index} is not usable on {capacity.hostname} "
                                 f"(usable: {[g.index for g in gpus] or 'none'})")
    elif gpus:
        gpu = max(gpus, key=lambda g: g.vram_free_bytes)
    vram = 0
    if gpu is not None:
        margin = VRAM_MARGIN_FIXED + int(VRAM_MARGIN_FRACTION * gpu.vram_total_bytes)
        vram = max(0, gpu.vram_free_bytes - margin)
    return _Budget(ram, note, threads, gpu, vram)


def _split(fam: Family, variant: Variant, est: MemoryEstimate, vram: int) -> tuple[int, int, int]:
    """(layers on GPU, bytes on GPU, bytes in RAM) for a partial offload into ``vram`` bytes.

    Token embeddings and the output head stay in RAM; each offloaded layer takes its weights and its
    KV with it; both sides get a compute buffer.
    """
    non_layer = min(est.weights_bytes // 2, int(2 * fam.n_vocab * fam.n_embd * variant.bits_per_weight / 8))
    per_layer = (est.weights_bytes - non_layer) / fam.n_layers + est.kv_bytes / fam.n_layers
    k = 0 if vram <= est.overhead_bytes else min(fam.n_layers, int((vram - est.overhead_bytes) // per_layer))
    gpu_bytes = int(k * per_layer) + est.overhead_bytes
    ram_bytes = non_layer + int((fam.n_layers - k) * per_layer) + est.overhead_bytes
    return k, gpu_bytes, ram_bytes


def choose_variant(
    family: Family | str,
    capacity: Capacity,
    *,
    share: int = 1,
    n_ctx: int,
    n_seq: int = 1,
    pinned: str | None = None,
    obtainable: Obtainable | None = None,
    gpu_index: int | None = None,
    cpu_max_bpw: float | None = CPU_MAX_BPW,
    prefer: Prefer = "quality",
) -> Choice:
    """The variant this worker should load (module doc for the rules); ModelLoadError when none fits."""
    if prefer not in PREFERENCES:
        raise ValueError(f"prefer must be one of {', '.join(PREFERENCES)} (got {prefer!r})")
    fam = family if isinstance(family, Family) else get_family(family)
    candidates = _candidates(fam, capacity, pinned, obtainable)
    note = "" if pinned is not None or prefer == "quality" else f" [prefer {prefer}]"
    c = _Chooser(fam, capacity, _budget(capacity, share, gpu_index), candidates, n_ctx, n_seq, note)
    if pinned is None and prefer == "balanced":
        picked = c.balanced_gpu()
        if picked is not None:
            return picked
    ordered = candidates if pinned is not None else order_candidates(candidates, prefer)
    # The CPU cap only steers the choice: a family published at f16 alone (small embedding models) still runs.
    if cpu_max_bpw is not None and (pinned is not None or not any(v.bits_per_weight <= cpu_max_bpw for v in ordered)):
        cpu_max_bpw = None
    chosen = c.on_gpu(ordered) or c.on_cpu(ordered, cpu_max_bpw)
    if chosen is None:
        raise c.none_fits(pinned is not None)
    return chosen


def _candidates(fam: Family, capacity: Capacity, pinned: str | None, obtainable: Obtainable | None) -> list[Variant]:
    if pinned is not None:
        v = fam.variant(pinned)
        if obtainable is not None and not obtainable(v):
            raise ModelLoadError(f"pinned variant {v.label} cannot be obtained on {capacity.hostname}")
        return [v]
    candidates = [v for v in fam.variants if obtainable is None or obtainable(v)]
    if not candidates:
        raise ModelLoadError(f"no variant of {fam.name} can be obtained on {capacity.hostname} "
                             f"(catalog variants: {', '.join(fam.quants)})")
    return candidates


class _Chooser:
    """The fit rules of the module doc, each a method, over one family's candidates on one budget."""

    def __init__(self, fam: Family, capacity: Capacity, budget: _Budget, candidates: Sequence[Variant],
                 n_ctx: int, n_seq: int, note: str) -> None:
        self.fam, self.capacity, self.budget = fam, capacity, budget
        self.candidates, self.n_ctx, self.n_seq, self.note = candidates, n_ctx, n_seq, note
        self.est = {v.quant: estimate_memory(v, n_ctx, n_seq, family=fam) for v in candidates}
        gpu = budget.gpu
        self.where = f"{fmt_bytes(budget.vram)} usable VRAM on GPU{gpu.index} {gpu.name}" if gpu else ""

    def make(self, v: Variant, device: Device, layers: int, reason: str) -> Choice:
        b = self.budget
        return Choice(v, device, layers, b.threads, self.est[v.quant], f"{v.quant}: {reason}{self.note}",
                      self.n_ctx, self.n_seq, b.gpu.index if device == "cuda" and b.gpu else None)

    def balanced_gpu(self) -> Choice | None:
        if self.budget.gpu is None:
            return None
        picked = _balanced_gpu([v for v in self.candidates if self.est[v.quant].total_bytes <= self.budget.vram])
        if picked is None:
            return None
        return self.make(picked, "cuda", -1, f"{self.est[picked.quant].describe()} fits {self.where} (full "
                                            "offload; the best quality within 25 % of the fastest that fits)")

    def on_gpu(self, ordered: Sequence[Variant]) -> Choice | None:
        """Full offload, else a partial offload that keeps at least half the layers on the GPU."""
        b, fam = self.budget, self.fam
        if b.gpu is None:
            return None
        for v in ordered:
            if self.est[v.quant].total_bytes <= b.vram:
                return self.make(v, "cuda", -1, f"{self.est[v.quant].describe()} fits {self.where} (full offload)")
        need = math.ceil(MIN_OFFLOAD_FRACTION * fam.n_layers)
        for v in ordered:
            k, gpu_bytes, ram_bytes = _split(fam, v, self.est[v.quant], b.vram)
            if k >= need and ram_bytes <= b.ram:
                return self.make(v, "cuda", k, f"{k}/{fam.n_layers} layers ({fmt_bytes(gpu_bytes)}) on {self.where}, "
                                               f"rest ({fmt_bytes(ram_bytes)}) in {b.ram_note} (partial offload)")
        return None

    def on_cpu(self, ordered: Sequence[Variant], cpu_max_bpw: float | None) -> Choice | None:
        """Mostly on the CPU (a few layers on a GPU when one is there), variants up to ``cpu_max_bpw``."""
        b, fam, gpu = self.budget, self.fam, self.budget.gpu
        skipped = [v.quant for v in ordered if cpu_max_bpw is not None and v.bits_per_weight > cpu_max_bpw]
        for v in ordered:
            if v.quant in skipped:
                continue
            est = self.est[v.quant]
            if gpu is not None:
                k, gpu_bytes, ram_bytes = _split(fam, v, est, b.vram)
                if k >= 1 and ram_bytes <= b.ram:
                    return self.make(v, "cuda", k, f"{k}/{fam.n_layers} layers ({fmt_bytes(gpu_bytes)}) on "
                                                   f"GPU{gpu.index} {gpu.name}, rest ({fmt_bytes(ram_bytes)}) in "
                                                   f"{b.ram_note} (mostly CPU; {fmt_bytes(b.vram)} usable VRAM)")
            if est.total_bytes <= b.ram:
                why = _no_gpu_reason(self.capacity, gpu)
                capped = f"; {'/'.join(skipped)} skipped on CPU" if skipped else ""
                return self.make(v, "cpu", 0, f"{est.describe()} fits {b.ram_note}, {b.threads} threads "
                                              f"({why}{capped})")
        return None

    def none_fits(self, pinned: bool) -> ModelLoadError:
        smallest = min(self.candidates, key=lambda v: self.est[v.quant].total_bytes)
        est, b = self.est[smallest.quant], self.budget
        what = (f"pinned variant {smallest.label}" if pinned
                else f"no variant of {self.fam.name} fits; the smallest, {smallest.label},")
        have = f"this worker has {b.ram_note}" + (f" and {self.where}" if b.gpu is not None else "")
        return ModelLoadError(f"{what} needs {est.describe()} at n_ctx={self.n_ctx} x {self.n_seq} sequences; "
                              f"{have}. Lower --n-ctx/--n-seq, pin a smaller variant, or run fewer workers on "
                              "this host")


def order_candidates(candidates: Sequence[Variant], prefer: Prefer) -> list[Variant]:
    """Candidates in the order a preference tries them (module doc); the first that fits is taken."""
    ordered = sorted(candidates, key=lambda v: quality_rank(v.quant))
    if prefer == "speed":
        above_q3 = [v for v in ordered if v.bits_per_weight >= ABOVE_Q3_MIN_BPW]
        return sorted(above_q3, key=lambda v: v.size_bytes) or sorted(ordered, key=lambda v: v.size_bytes)
    if prefer == "balanced":
        four_bit = [v for v in ordered if ABOVE_Q3_MIN_BPW <= v.bits_per_weight <= FOUR_BIT_MAX_BPW]
        if four_bit:
            lower = [v for v in ordered if v.bits_per_weight < ABOVE_Q3_MIN_BPW]
            higher = [v for v in ordered if v.bits_per_weight > FOUR_BIT_MAX_BPW]
            return four_bit + lower + higher
    return ordered


def _balanced_gpu(fits: Sequence[Variant]) -> Variant | None:
    """The best quality whose decode rate (∝ 1 / weight bytes on a GPU) is within 25 % of the fastest."""
    above_q3 = [v for v in fits if v.bits_per_weight >= ABOVE_Q3_MIN_BPW] or list(fits)
    if not above_q3:
        return None
    fastest = min(v.size_bytes for v in above_q3)
    ok = [v for v in above_q3 if fastest / v.size_bytes >= BALANCED_GPU_SLOWDOWN]
    return min(ok, key=lambda v: quality_rank(v.quant))


def _no_gpu_reason(capacity: Capacity, gpu: GpuInfo | None) -> str:
    if gpu is not None:
        return f"too large for GPU{gpu.index}"
    if capacity.gpus and not capacity.gpu_offload:
        return "llama.cpp here is built without GPU offload"
    return "no GPU"


@dataclass(frozen=True)
class Recommendation:
    """What this machine would load for one family, or why it cannot."""

    family: Family
    choice: Choice | None
    error: str | None = None

    def describe(self) -> str:
        if self.choice is None:
            return f"{self.family.name}: does not fit ({self.error})"
        c = self.choice
        where = "CPU" if c.device == "cpu" else ("GPU" if c.n_gpu_layers == -1 else f"GPU {c.n_gpu_layers} layers")
        return f"{c.label} on {where} — {c.reason}"


def recommend(
    capacity: Capacity,
    families: Iterable[Family | str] | None = None,
    *,
    n_ctx: int = 4096,
    n_seq: int = 1,
    share: int = 1,
    obtainable: Obtainable | None = None,
    prefer: Prefer = "balanced",
) -> list[Recommendation]:
    """For each family, what :func:`choose_variant` would pick here (for ``tokenmill models recommend``)."""
    out: list[Recommendation] = []
    for f in (CATALOG.values() if families is None else families):
        fam = f if isinstance(f, Family) else get_family(f)
        try:
            choice = choose_variant(fam, capacity, share=share, n_ctx=n_ctx, n_seq=n_seq, obtainable=obtainable,
                                    prefer=prefer)
        except ModelLoadError as exc:
            out.append(Recommendation(fam, None, str(exc)))
        else:
            out.append(Recommendation(fam, choice))
    return out


DEFAULT_KV_CELLS = 16 * 2048  # a default worker's KV cache: 16 sequences of 2048 tokens
N_SEQ_CHOICES = (16, 8, 4, 2, 1)
MIN_TRADED_CONTEXT = 512


def trade_context(
    family: Family,
    capacity: Capacity,
    *,
    share: int,
    n_ctx: int,
    n_seq: int | None = None,
    pinned: str | None = None,
    prefer: Prefer = "balanced",
    obtainable: Obtainable | None = None,
) -> tuple[int, int]:
    """(context per sequence, sequences per worker) for a job whose requests need ``n_ctx`` tokens.

    Sequences are traded for context: a worker keeps about a default worker's KV cache
    (:data:`DEFAULT_KV_CELLS`), so 8192-token requests are decoded 4 at a time where 2048-token ones
    are decoded 16 at a time. Long prompts are prefill, which batching barely speeds up on a CPU, so
    the trade costs little, while 16 sequences of 8192 tokens would take 4x the memory and the time to
    allocate it. Within that, the widest batch that fits the worker's memory (the same fit check a
    worker makes); when not even one sequence of ``n_ctx`` fits, the context is halved until one does.
    ``n_seq`` set by hand is kept and only the context is fitted to it.
    """
    ctx = n_ctx
    while True:
        for seqs in (n_seq,) if n_seq else N_SEQ_CHOICES:
            if not n_seq and seqs > 1 and seqs * ctx > max(DEFAULT_KV_CELLS, ctx):
                continue
            try:
                choose_variant(family, capacity, share=share, n_ctx=ctx, n_seq=seqs + 1, pinned=pinned,
                               obtainable=obtainable, prefer=prefer)
            except ModelLoadError:
                continue
            return ctx, seqs
        if ctx // 2 < MIN_TRADED_CONTEXT:
            break
        ctx //= 2
    raise ModelLoadError(f"{family.name} does not fit this worker even at {ctx} tokens of context "
                         f"x {n_seq or 1} sequences; run fewer workers on this host or pin a smaller variant")
