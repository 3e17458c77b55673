"""The report's figures, drawn headless into PNG bytes.

Only this module imports matplotlib, and only the report command imports this module, so the rest of
the CLI starts without paying for it. The Agg backend is chosen here because reports are made on
servers and in CI, where there is no display. Figures use the object API (no pyplot), so nothing is
kept in global figure state between reports.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import matplotlib

matplotlib.use("Agg")

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from tokenmill.report.data import Dist, JobReport, Plot, percentile

PALETTE = ("#2563eb", "#ea580c", "#16a34a", "#9333ea", "#dc2626", "#0891b2", "#ca8a04", "#db2777", "#4b5563")
MAX_SERIES = 8
STYLE: Any = {  # matplotlib types rcParams keys as literals; this is a plain mapping
    "font.size": 9.5,
    "axes.titlesize": 11.5,
    "axes.titleweight": "bold",
    "axes.labelsize": 9.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.25,
    "legend.fontsize": 8.5,
    "legend.frameon": True,
    "legend.framealpha": 0.85,
    "legend.edgecolor": "#e5e7eb",
}


def _label(text: str, width: int = 40) -> str:
    """Data-derived text for a figure: `$` would start mathtext, and long ids would squeeze the axes."""
    text = text if len(text) <= width else text[: width - 1] + "…"
    return text.replace("$", r"\$")


def _png(draw: Callable[[Axes], None], size: tuple[float, float] = (7.4, 4.1)) -> bytes:
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=size, dpi=110, layout="constrained")
        draw(fig.add_subplot())
        buf = io.BytesIO()
        fig.savefig(buf, format="png", facecolor="white")
    return buf.getvalue()


def _empty(ax: Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, fontsize=12, color="#6b7280")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)


def _time_unit(span_s: float) -> tuple[float, str]:
    if span_s <= 300:
        return 1.0, "s"
    if span_s <= 3 * 3600:
        return 60.0, "min"
    return 3600.0, "h"


def throughput(report: JobReport) -> Plot:
    tp = report.throughput
    title = f"Throughput over time ({tp.bucket_s:g} s buckets)"

    def draw(ax: Axes) -> None:
        ax.set_title(title)
        scale, unit = _time_unit(tp.bucket_s * len(tp.starts))
        ax.set_xlabel(f"time since job start ({unit})")
        ax.set_ylabel("generated tokens/s")
        if not any(tp.total):
            _empty(ax, "no tokens generated")
            return
        edges = [t / scale for t in tp.starts] + [(tp.starts[-1] + tp.bucket_s) / scale]
        ranked = sorted(tp.per_worker.items(), key=lambda kv: -sum(kv[1]))
        for i, (worker, rates) in enumerate(ranked[:MAX_SERIES]):
            ax.stairs(rates, edges, color=PALETTE[i % len(PALETTE)], linewidth=1.4, label=_label(worker, 32))
        more = len(ranked) - MAX_SERIES
        total_label = "total" + (f" ({more} more workers not drawn)" if more > 0 else "")
        ax.stairs(tp.total, edges, color="#111827", linewidth=2.4, label=total_label)
        ax.set_ylim(bottom=0)
        ax.set_xlim(edges[0], edges[-1])
        ax.legend(loc="best")

    return Plot(
        "throughput_over_time",
        title,
        "Throughput over time: generated tokens per second, per worker and in total",
        _png(draw),
    )


def _histogram(ax: Axes, dist: Dist, xlabel: str, ylabel: str, color: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if not dist.values:
        _empty(ax, "no data yet")
        return
    ordered = sorted(dist.values)
    lo, top = ordered[0], ordered[-1]
    hi = percentile(ordered, 99.5)
    hidden = 0
    if top > 1.5 * hi > 0:
        hidden = len(ordered) - sum(1 for v in ordered if v <= hi)
    else:
        hi = top
    bins = int(min(50, max(10, len(ordered) ** 0.5)))
    ax.hist(ordered, bins=bins, range=(lo, hi if hi > lo else lo + 1), color=color, alpha=0.8, edgecolor="white")
    ax.axvline(dist.p50, color="#111827", linestyle="--", linewidth=1.3, label=f"p50 {dist.p50:,.1f} ms")
    ax.axvline(dist.p95, color="#dc2626", linestyle=":", linewidth=1.6, label=f"p95 {dist.p95:,.1f} ms")
    ax.plot([], [], " ", label=f"mean {dist.mean:,.1f} ms, n={dist.count:,}")
    if hidden:
        ax.plot([], [], " ", label=f"{hidden:,} values above {hi:,.0f} ms not drawn")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="best")


def ttft(report: JobReport) -> Plot:
    title = "Time to first token"

    def draw(ax: Axes) -> None:
        ax.set_title(title)
        _histogram(ax, report.ttft, "time to first token (ms)", "requests (count)", PALETTE[0])

    return Plot("ttft_distribution", title, "Time-to-first-token distribution: histogram of TTFT in ms", _png(draw))


def inter_token(report: JobReport) -> Plot:
    title = "Inter-token latency"

    def draw(ax: Axes) -> None:
        ax.set_title(title)
        _histogram(ax, report.itl, "latency between consecutive tokens (ms)", "tokens (count)", PALETTE[1])

    return Plot(
        "inter_token_latency",
        title,
        "Inter-token latency distribution: histogram of per-token latency in ms, first token excluded",
        _png(draw),
    )


def speed_by_variant(report: JobReport) -> Plot:
    title = "Decode speed by model variant"

    def draw(ax: Axes) -> None:
        ax.set_title(title)
        ax.set_xlabel("model variant")
        ax.set_ylabel("decode speed per request (tokens/s)")
        variants = [v for v in report.variants if v.decode_tps.values][:12]
        if not variants:
            _empty(ax, "no successful generations yet")
            return
        box = ax.boxplot(
            [v.decode_tps.values for v in variants],
            showmeans=True,
            patch_artist=True,
            widths=0.5,
            flierprops={"markersize": 3, "alpha": 0.5},
            meanprops={"marker": "D", "markerfacecolor": "white", "markeredgecolor": "#111827"},
            medianprops={"color": "#111827"},
        )
        for i, patch in enumerate(box["boxes"]):
            patch.set_facecolor(PALETTE[i % len(PALETTE)])
            patch.set_alpha(0.55)
        ax.set_xticks(
            range(1, len(variants) + 1),
            labels=[
                f"{_label(v.variant, 34)}\nn={v.decode_tps.count:,}, mean {v.decode_tps.mean:,.1f}" for v in variants
            ],
        )
        ax.set_ylim(bottom=0)

    return Plot(
        "tokens_per_second_by_variant",
        title,
        "Tokens per second by model variant: box plot of per-request decode speed",
        _png(draw),
    )


def prompt_vs_latency(report: JobReport) -> Plot:
    title = "Prompt length vs. request latency"

    def draw(ax: Axes) -> None:
        ax.set_title(title)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("request latency, total (ms)")
        if not report.scatter:
            _empty(ax, "no successful generations yet")
            return
        by_variant: dict[str, tuple[list[int], list[float]]] = {}
        for prompt, total, variant in report.scatter:
            xs, ys = by_variant.setdefault(variant, ([], []))
            xs.append(prompt)
            ys.append(total)
        for i, (variant, (xs, ys)) in enumerate(sorted(by_variant.items())):
            ax.scatter(
                xs, ys, s=14, alpha=0.6, color=PALETTE[i % len(PALETTE)], label=_label(variant, 34), linewidths=0
            )
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.legend(loc="best", title="variant", title_fontsize=8.5)

    return Plot(
        "prompt_length_vs_latency",
        title,
        "Prompt length vs latency: scatter of prompt tokens against total request time in ms",
        _png(draw),
    )


def failures(report: JobReport) -> Plot:
    title = "Failures by reason"

    def draw(ax: Axes) -> None:
        ax.set_title(title)
        ax.set_xlabel("failed rows (count)")
        ax.set_ylabel("error code")
        if not report.failures:
            _empty(ax, f"no failures: all {report.finished:,} finished rows succeeded")
            return
        shown = report.failures[:12][::-1]
        labels = [_label(code, 32) for code, _ in shown]
        counts = [n for _, n in shown]
        bars = ax.barh(range(len(shown)), counts, color=PALETTE[4], alpha=0.8, height=0.6)
        ax.set_yticks(range(len(shown)), labels=labels)
        ax.bar_label(bars, labels=[f"{n:,}" for n in counts], padding=3)
        ax.set_xlim(0, max(counts) * 1.15)
        pad = max(0.0, (4 - len(shown)) / 2)
        ax.set_ylim(-0.5 - pad, len(shown) - 0.5 + pad)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(axis="y", visible=False)

    return Plot("failures_by_reason", title, "Failures by reason: count of failed rows per error code", _png(draw))


def render_all(report: JobReport) -> list[Plot]:
    return [f(report) for f in (throughput, ttft, inter_token, speed_by_variant, prompt_vs_latency, failures)]
