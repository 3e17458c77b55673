"""Options more than one command takes, defined once so `run` and `submit` (or `status` and `workers`) cannot
drift apart in name, default or help text; and how the dataset options become a Submission.

A command module imports its shared options from here, never from a sibling command module.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from tokenmill.config import DEFAULT_ENGINE
from tokenmill.models.sizing import Prefer
from tokenmill.rows import SamplingParams
from tokenmill.scheduler.submit import DEFAULT_MODEL as SUBMIT_DEFAULT_MODEL
from tokenmill.scheduler.submit import Submission

DEFAULT_MODEL = SUBMIT_DEFAULT_MODEL

DatasetArg = Annotated[Path, typer.Argument(help="JSONL dataset (or a folder of .txt/.md with --template)")]
JobArg = Annotated[str, typer.Argument(help="Job id (or a unique prefix)")]

ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Catalog name[:variant] or path to a .gguf file [default: the lines' body.model when it names a "
        "catalog model, else smollm2-135m-instruct]",
        show_default=False,
    ),
]
TemplateOpt = Annotated[
    str | None, typer.Option(help="Prompt template with {field} placeholders, or a file holding one")
]
FieldOpt = Annotated[str | None, typer.Option("--field", help="Take the prompt from this field of each line")]
MaxTokensOpt = Annotated[int | None, typer.Option(help="Default max_tokens for lines that set none", min=1)]
TemperatureOpt = Annotated[float | None, typer.Option(help="Default temperature for lines that set none")]
ChunkOpt = Annotated[
    int | None, typer.Option(help="Rows per chunk, the unit a worker leases [default: from the data]", min=1)
]
AllowUnknownOpt = Annotated[
    bool,
    typer.Option(help="Ignore request fields tokenmill does not know (one warning per field) instead of failing"),
]
SkipOpt = Annotated[bool, typer.Option(help="Run the valid lines; write bad ones to the errors file")]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="Generate even when an identical answer is stored")]
TokenBudgetOpt = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="Documents only: at most this many tokens of a file per row; longer files become 'FILE#part-K' "
        "rows (default: what the context per request leaves after the chat markup, the template and "
        "max_tokens, counted with the model's tokenizer)",
        show_default=False,
    ),
]

OutputOpt = Annotated[Path | None, typer.Option("--output", "-o", help="Results JSONL")]
FailedRowsOpt = Annotated[Path | None, typer.Option("--errors", help="Failed rows JSONL")]

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable")]
NCtxOpt = Annotated[int, typer.Option(help="Context tokens per sequence")]
JobNCtxOpt = Annotated[
    int | None,
    typer.Option(
        "--n-ctx",
        min=64,
        help="Context tokens per request [default: sized from the rows (documents: the longest, counted with the "
        "model's tokenizer), up to the model's trained context; 2048 for short rows]",
        show_default=False,
    ),
]
OverlapOpt = Annotated[
    int, typer.Option(min=0, help="Documents only: tokens of each part's end repeated at the start of the next")
]


def build_submission(
    path: Path,
    model: str,
    template: str | None,
    field: str | None,
    max_tokens: int | None,
    temperature: float | None,
    chunk_size: int | None,
    skip_invalid: bool,
    no_cache: bool,
    token_budget: int | None = None,
    models_dir: Path | None = None,
    allow_unknown_fields: bool = False,
    model_source: str = "--model",
    engine: str = DEFAULT_ENGINE,
    *,
    n_ctx: int | None = None,
    overlap: int = 0,
) -> Submission:
    """The dataset options of `run` and `submit` as one Submission: an unset --max-tokens/--temperature
    falls back to SamplingParams' own default, so both commands store the same job for the same flags."""
    base = SamplingParams()
    defaults = SamplingParams(
        max_tokens=max_tokens or base.max_tokens,
        temperature=base.temperature if temperature is None else temperature,
    )
    return Submission(
        path=path,
        model=model,
        template=template,
        text_field=field,
        defaults=defaults,
        chunk_size=chunk_size,
        skip_invalid=skip_invalid,
        no_cache=no_cache,
        token_budget=token_budget,
        models_dir=models_dir,
        allow_unknown_fields=allow_unknown_fields,
        model_source=model_source,
        engine=engine,
        n_ctx=n_ctx,
        overlap=overlap,
    )


class PreferChoice(str, Enum):
    quality = "quality"
    balanced = "balanced"
    speed = "speed"


PreferOpt = Annotated[
    PreferChoice,
    typer.Option(help="Variant choice: quality (best that fits), balanced (4-bit K-quants on CPU), speed"),
]
DeadlineOpt = Annotated[
    str | None,
    typer.Option(help="Finish by 06:00 or within 8h: plan each variant's finish and pin the best in time",
                 show_default=False),
]


def prefer_value(choice: PreferChoice) -> Prefer:
    return choice.value


def print_ignored(sub: Submission) -> None:
    """One warning per unknown field name let through by --allow-unknown-fields (data, so no markup)."""
    from tokenmill.cli.common import console

    for warning in sub.ignored.warnings():
        console.print(f"warning: {warning}", markup=False, highlight=False)
