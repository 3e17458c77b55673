"""One self-contained HTML page: inline CSS, figures as data URIs, no scripts, no external assets.

A report is mailed, attached to tickets and opened years later from disk, so it must not depend on
anything outside the file. Every string that comes from data (job names, custom ids, outputs, errors,
worker ids) is escaped: datasets are user input and may well contain markup.
"""

from __future__ import annotations

import base64
import html
import struct
import time
from collections.abc import Iterable, Sequence

from tokenmill import __version__
from tokenmill.report.ab import ABReport
from tokenmill.report.data import Cost, Dist, JobReport, Plot, Report
from tokenmill.store.states import JOB_STATES

STATES = set(JOB_STATES)  # states with a badge colour in CSS
TRUNCATE = 300

CSS = """
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 -apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
  color:#111827;background:#f3f4f6}
header{background:#111827;color:#f9fafb;padding:22px 40px 20px}
header .brand{font-size:12px;letter-spacing:.12em;text-transform:uppercase;color:#93c5fd}
header h1{margin:4px 0 6px;font-size:26px;word-break:break-all}
header p{margin:0;color:#d1d5db}
code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.92em}
header code{color:#f9fafb}
main{max-width:1400px;margin:0 auto;padding:22px 40px 40px}
h2{font-size:17px;margin:26px 0 10px}
.badge{display:inline-block;padding:1px 9px;border-radius:10px;font-size:12px;font-weight:600;
  background:#4b5563;color:#fff}
.s-completed{background:#16a34a}.s-completed_with_errors{background:#d97706}.s-cancelled{background:#dc2626}
.s-running,.s-queued,.s-ingesting{background:#2563eb}
.kpis{display:grid;grid-template-columns:repeat(5,minmax(0,1fr));gap:14px}
.kpi{background:#fff;border-radius:10px;padding:14px 16px;box-shadow:0 1px 2px rgba(0,0,0,.07)}
.kpi .label{font-size:12px;color:#6b7280;text-transform:uppercase;letter-spacing:.05em}
.kpi .value{font-size:26px;font-weight:700;margin:2px 0}
.kpi .sub{font-size:12px;color:#4b5563}
.cols{display:grid;grid-template-columns:minmax(0,5fr) minmax(0,7fr);gap:22px;align-items:start}
.card{background:#fff;border-radius:10px;padding:6px 16px 14px;box-shadow:0 1px 2px rgba(0,0,0,.07)}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid #e5e7eb;vertical-align:top}
thead th{font-size:12px;color:#6b7280;text-transform:uppercase;letter-spacing:.04em}
table.kv th{font-weight:500;color:#374151;width:44%}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.cost{background:#fff;border-left:4px solid #2563eb;border-radius:6px;padding:12px 16px;margin:14px 0 0}
.hint{color:#6b7280}
.plots{display:grid;grid-template-columns:repeat(2,minmax(0,1fr));gap:18px}
figure{margin:0;background:#fff;border-radius:10px;padding:10px;box-shadow:0 1px 2px rgba(0,0,0,.07)}
figure img{display:block;width:100%;height:auto}
figcaption{font-size:12px;color:#6b7280;padding:4px 4px 0}
.text{white-space:pre-wrap;word-break:break-word;font-family:ui-monospace,Menlo,Consolas,monospace;
  font-size:12px;max-width:460px}
.note{background:#fef3c7;border-radius:6px;padding:8px 12px}
#ab .card{max-width:1000px}
#workers code{white-space:nowrap}
footer{color:#9ca3af;font-size:12px;margin-top:30px}
"""


def e(value: object) -> str:
    return html.escape(str(value), quote=True)


def money(v: float) -> str:
    """Cents when they say it all ($0.50, $23.15); four decimals for the sub-cent prices of small models."""
    return f"${v:,.2f}" if v >= 1 or round(v, 2) == v else f"${v:,.4f}"


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m {int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h {int(seconds % 3600 // 60):02d}m"


def stamp(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def ms_triplet(d: Dist) -> str:
    if not d.count:
        return "n/a"
    return f"{d.mean:,.1f} / {d.p50:,.1f} / {d.p95:,.1f} ms"


def _truncate(text: str, n: int = TRUNCATE) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _kv_table(rows: Iterable[tuple[str, str]]) -> str:
    body = "".join(f'<tr><th scope="row">{e(k)}</th><td>{v}</td></tr>' for k, v in rows)
    return f'<table class="kv">{body}</table>'


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], numeric: Sequence[int] = ()) -> str:
    head = "".join(
        f'<th class="num">{e(h)}</th>' if i in numeric else f"<th>{e(h)}</th>" for i, h in enumerate(headers)
    )
    body = "".join(
        "<tr>"
        + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _kpi(label: str, value: str, note: str) -> str:
    return (
        f'<div class="kpi"><div class="label">{e(label)}</div>'
        f'<div class="value">{value}</div><div class="sub">{note}</div></div>'
    )


def _summary(j: JobReport) -> str:
    return _kv_table(
        [
            ("Job", f"{e(j.name)} (<code>{e(j.job_id)}</code>)"),
            ("Model", f"<code>{e(j.model)}</code>"),
            ("Variants seen", ", ".join(f"<code>{e(v.variant)}</code>" for v in j.variants) or "none"),
            ("State", e(j.state)),
            ("Rows", f"{j.total_rows:,}"),
            ("Finished", f"{j.finished:,}"),
            ("Pending", f"{j.pending:,}"),
            ("Succeeded", f"{j.succeeded:,}"),
            ("Failed", f"{j.failed:,}"),
            ("Cached", f"{j.cached:,}"),
            ("Wall time", f"{duration(j.wall_s)} ({stamp(j.started_at)} → {stamp(j.finished_at)})"),
            ("Prompt tokens", f"{j.prompt_tokens:,}"),
            ("Completion tokens", f"{j.completion_tokens:,}"),
            ("Generated tokens (not cached)", f"{j.generated_tokens:,}"),
            ("End-to-end throughput", f"{j.tokens_per_second:,.1f} tok/s"),
            ("TTFT mean / p50 / p95", ms_triplet(j.ttft)),
            ("Inter-token latency mean / p50 / p95", ms_triplet(j.itl)),
            ("Request latency mean / p50 / p95", ms_triplet(j.total_ms)),
            ("Decode speed per request (mean)", f"{j.decode_tps.mean:,.1f} tok/s" if j.decode_tps.count else "n/a"),
        ]
    )


def _workers(j: JobReport) -> str:
    rows = [
        [
            f"<code>{e(w.worker_id)}</code>",
            ", ".join(e(v) for v in w.variants),
            f"{w.rows:,}",
            f"{w.succeeded:,}",
            f"{w.failed:,}",
            f"{w.generated_tokens:,}",
            duration(w.active_s),
            f"{w.tokens_per_second:,.1f}",
            f"{w.mean_decode_tps:,.1f}",
        ]
        for w in j.workers
    ]
    headers = ("Worker", "Variant", "Rows", "OK", "Failed", "Tokens", "Active", "tok/s", "Decode tok/s")
    return _table(headers, rows, numeric=(2, 3, 4, 5, 6, 7, 8))


def cost_text(c: Cost) -> str:
    """The cost sentence; without a price it says which options produce one."""
    hint = (
        "Pass <code>--cost-per-hour X</code> (what the hardware costs per hour, e.g. 0.50) to see the cost per "
        "1M generated tokens, and <code>--api-price Y</code> ($ per 1M tokens) to compare it with an API."
    )
    if c.cost_per_hour is None:
        api = f" API price given: {money(c.api_price)} per 1M tokens." if c.api_price is not None else ""
        return f'<span class="hint">Cost: {hint}</span>{api}'
    if c.per_million is None:
        return (
            f"Cost: no tokens were generated, so a cost per token cannot be computed at {money(c.cost_per_hour)}/hour."
        )
    per_hour = c.tokens_per_second * 3600
    text = (
        f"<b>Cost: {money(c.per_million)} per 1M generated tokens</b> at {money(c.cost_per_hour)}/hour "
        f"and the measured {c.tokens_per_second:,.1f} tok/s ({per_hour:,.0f} tokens/hour)"
    )
    if c.api_price is None:
        return text + ". Add <code>--api-price Y</code> ($ per 1M tokens) to compare with an API."
    assert c.ratio is not None
    verdict = f"self-hosting is {c.ratio:,.2f}x cheaper" if c.ratio >= 1 else f"the API is {1 / c.ratio:,.2f}x cheaper"
    return text + f", against {money(c.api_price)} per 1M from the API: ratio {c.ratio:,.2f} ({verdict})."


def _figure(p: Plot) -> str:
    width, height = struct.unpack(">II", p.png[16:24])
    data = base64.b64encode(p.png).decode("ascii")
    return (
        f'<figure id="{e(p.slug)}"><img src="data:image/png;base64,{data}" alt="{e(p.alt)}" title="{e(p.title)}" '
        f'width="{width}" height="{height}"><figcaption>{e(p.alt)}</figcaption></figure>'
    )


def _failures(j: JobReport) -> str:
    if not j.failure_examples:
        return "<p>No failures.</p>"
    counts = ", ".join(f"<code>{e(code)}</code>: {n:,}" for code, n in j.failures)
    rows = [
        [
            f"<code>{e(f.custom_id)}</code>",
            f"<code>{e(f.code)}</code>",
            f'<div class="text">{e(_truncate(f.error))}</div>',
        ]
        for f in j.failure_examples
    ]
    shown = f"first {len(rows)} of {j.failed:,}" if j.failed > len(rows) else f"all {len(rows)}"
    return f"<p>{counts} ({shown} shown)</p>" + _table(("custom_id", "Error code", "Error"), rows)


def _delta(a: float, b: float) -> str:
    if not a:
        return ""
    return f"{(b - a) / a * 100:+.1f}%"


def _ab(ab: ABReport) -> str:
    a, b = ab.a, ab.b

    def row(name: str, va: float, vb: float, fmt: str, has: bool = True) -> list[str]:
        if not has:
            return [e(name), "n/a", "n/a", ""]
        return [e(name), fmt.format(va), fmt.format(vb), _delta(va, vb)]

    metrics = [
        [
            "Variant",
            f"<code>{e(a.main_variant)}</code><br><small>job <code>{e(a.job_id)}</code></small>",
            f"<code>{e(b.main_variant)}</code><br><small>job <code>{e(b.job_id)}</code></small>",
            "",
        ],
        ["Succeeded / failed", f"{a.succeeded:,} / {a.failed:,}", f"{b.succeeded:,} / {b.failed:,}", ""],
        row("End-to-end tok/s", a.tokens_per_second, b.tokens_per_second, "{:,.1f}"),
        row("Decode tok/s per request (mean)", a.decode_tps.mean, b.decode_tps.mean, "{:,.1f}"),
        row("TTFT mean (ms)", a.ttft.mean, b.ttft.mean, "{:,.1f}", bool(a.ttft.count and b.ttft.count)),
        row("TTFT p50 (ms)", a.ttft.p50, b.ttft.p50, "{:,.1f}", bool(a.ttft.count and b.ttft.count)),
        row("TTFT p95 (ms)", a.ttft.p95, b.ttft.p95, "{:,.1f}", bool(a.ttft.count and b.ttft.count)),
        row("Inter-token p50 (ms)", a.itl.p50, b.itl.p50, "{:,.2f}", bool(a.itl.count and b.itl.count)),
        row("Request latency p50 (ms)", a.total_ms.p50, b.total_ms.p50, "{:,.1f}", bool(a.total_ms.count)),
    ]
    parts = ['<div class="card">', _table(("Metric", "A", "B", "B vs A"), metrics, numeric=(1, 2, 3)), "</div>"]
    if ab.note:
        parts.append(f'<p class="note">{e(ab.note)}</p>')
    else:
        parts.append(
            f'<p id="ab-agreement">Outputs compared on <b>{ab.compared:,}</b> rows that succeeded in both jobs: '
            f"exact match <b>{ab.exact:,} of {ab.compared:,} ({ab.exact_rate * 100:.1f}%)</b>, "
            f"mean similarity <b>{ab.mean_similarity:.3f}</b> (difflib ratio, 1 = identical).</p>"
        )
    if ab.most_different:
        rows = [
            [
                f"<code>{e(r.custom_id)}</code>",
                f"{r.similarity:.3f}",
                f'<div class="text">{e(_truncate(r.a_text))}</div>',
                f'<div class="text">{e(_truncate(r.b_text))}</div>',
            ]
            for r in ab.most_different
        ]
        parts.append("<h3>Most different outputs</h3>")
        parts.append(
            '<div class="card">' + _table(("custom_id", "Similarity", "A output", "B output"), rows, (1,)) + "</div>"
        )
    return "".join(parts)


def render(report: Report, plots: Sequence[Plot]) -> str:
    j = report.job
    state_class = f"s-{j.state}" if j.state in STATES else ""
    cost = report.cost
    kpis = "".join(
        [
            _kpi(
                "Rows succeeded", f"{j.succeeded:,}", f"of {j.total_rows:,} · {j.failed:,} failed · {j.cached:,} cached"
            ),
            _kpi(
                "Throughput",
                f"{j.tokens_per_second:,.1f}",
                f"generated tok/s end to end · {j.generated_tokens:,} tokens",
            ),
            _kpi("Wall time", e(duration(j.wall_s)), "first row started → last row finished"),
            _kpi(
                "TTFT p50",
                f"{j.ttft.p50:,.0f} ms" if j.ttft.count else "n/a",
                f"p95 {j.ttft.p95:,.0f} ms" if j.ttft.count else "",
            ),
            _kpi(
                "Cost / 1M tokens",
                money(cost.per_million) if cost.per_million is not None else "—",
                f"API {money(cost.api_price)}" if cost.api_price is not None else "see cost line below",
            ),
        ]
    )
    ab_section = ""
    if report.ab is not None or report.ab_note:
        body = _ab(report.ab) if report.ab is not None else ""
        note = f'<p class="note">{e(report.ab_note)}</p>' if report.ab_note else ""
        ab_section = f'<section id="ab"><h2>A/B comparison</h2>{note}{body}</section>'
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>tokenmill report: {e(j.name)} ({e(j.job_id)})</title>
<style>{CSS}</style></head>
<body>
<header><div class="brand">tokenmill report</div><h1>{e(j.name)}</h1>
<p>job <code>{e(j.job_id)}</code> · model <code>{e(j.model)}</code> ·
<span class="badge {state_class}">{e(j.state)}</span> · {j.finished:,} of {j.total_rows:,} rows finished</p></header>
<main>
<section class="kpis">{kpis}</section>
<div class="cols">
<section><h2>Summary</h2><div class="card" id="summary">{_summary(j)}</div></section>
<section><h2>Workers</h2><div class="card" id="workers">{_workers(j)}</div>
<p class="cost" id="cost">{cost_text(cost)}</p></section>
</div>
{ab_section}
<section><h2>Plots</h2><div class="plots">{"".join(_figure(p) for p in plots)}</div></section>
<section id="failures"><h2>Failures</h2>{_failures(j)}</section>
<footer>Made by tokenmill {e(__version__)} at {stamp(time.time())}. Latency figures leave out cached rows;
percentiles come from a uniform sample of at most 200,000 values per distribution.</footer>
</main></body></html>
"""
