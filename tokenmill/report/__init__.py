"""`tokenmill report`: a job's throughput, latency, failures, cost and A/B agreement on one page.

Submodules are imported inside :func:`write_report` so that importing this package (and so the CLI)
never loads matplotlib.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tokenmill.store import Store


@dataclass
class Written:
    """What a report run produced, so the CLI can say where it went."""

    job_id: str
    busy_fraction: float | None = None
    decode_steps: int = 0
    html: Path | None = None
    pngs: list[Path] = field(default_factory=list)


def write_report(
    store: Store,
    job_ref: str,
    *,
    output: Path | None = None,
    png_dir: Path | None = None,
    cost_per_hour: float | None = None,
    api_price: float | None = None,
    ab: str | None = None,
) -> Written:
    """Write the HTML page to ``output`` and/or one PNG per plot into ``png_dir``."""
    from tokenmill.report import data, html, plots

    report = data.load_report(store, job_ref, ab=ab, cost_per_hour=cost_per_hour, api_price=api_price)
    figures = plots.render_all(report.job)
    written = Written(report.job.job_id, report.job.busy_fraction, report.job.decode_steps)
    if png_dir is not None:
        png_dir.mkdir(parents=True, exist_ok=True)
        for p in figures:
            path = png_dir / p.filename
            path.write_bytes(p.png)
            written.pngs.append(path)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        part = output.with_name(output.name + ".part")
        part.write_text(html.render(report, figures), encoding="utf-8")
        part.replace(output)
        written.html = output
    return written


__all__ = ["Written", "write_report"]
