"""`tokenmill report`: one HTML page (and/or PNG files) about a job's speed, latency, failures and cost."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tokenmill.cli.common import console, open_store, settings_from
from tokenmill.cli.options import JobArg


def report_cmd(
    ctx: typer.Context,
    job: JobArg,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="HTML report to write (default report.html, unless only --png is given)"),
    ] = None,
    png: Annotated[
        Path | None, typer.Option("--png", help="Also (or only) write each plot as a PNG file into this folder")
    ] = None,
    cost_per_hour: Annotated[
        float | None,
        typer.Option("--cost-per-hour", min=0.0, help="Hardware cost in $/hour, for the cost per 1M tokens"),
    ] = None,
    api_price: Annotated[
        float | None, typer.Option("--api-price", min=0.0, help="An API's price in $ per 1M tokens, to compare")
    ] = None,
    ab: Annotated[
        str | None,
        typer.Option("--ab", help="Compare with this job (default: the other job of this job's A/B group)"),
    ] = None,
) -> None:
    """Throughput, latency, failures, cost and A/B agreement of a job, as one self-contained HTML page.

    Example: tokenmill report 3f2a -o report.html --cost-per-hour 0.50 --api-price 0.60
    """
    from tokenmill.report import write_report

    if output is None and png is None:
        output = Path("report.html")
    store = open_store(settings_from(ctx))
    try:
        written = write_report(
            store, job, output=output, png_dir=png, cost_per_hour=cost_per_hour, api_price=api_price, ab=ab
        )
    finally:
        store.dispose()
    if written.html is not None:
        console.print(f"report for job {written.job_id} → {written.html}")
    if written.pngs:
        console.print(f"{len(written.pngs)} plots → {png}/")
    if written.busy_fraction is not None:
        console.print(
            f"engine busy {written.busy_fraction:.1%} "
            f"(slots filled / available over {written.decode_steps:,} decode steps)"
        )


def register(app: typer.Typer) -> None:
    app.command("report")(report_cmd)
