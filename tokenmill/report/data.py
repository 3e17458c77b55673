"""What a report shows, read from the store into plain dataclasses.

Results are streamed a page at a time and distributions are kept as bounded uniform samples (counts and
means stay exact), so a report on a million-row job needs megabytes, not gigabytes. Cached rows are
counted but left out of speed and latency figures: their timings belong to the job that generated them.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from tokenmill.errors import NoResultsYet, UsageError
from tokenmill.report.ab import ABReport, compare_outputs
from tokenmill.store import Session, Store
from tokenmill.store import jobs as store_jobs
from tokenmill.store import results as store_results
from tokenmill.store.states import ErrorCode, ResultStatus
from tokenmill.store.tables import Job, Result

T = TypeVar("T")
PAGE = 2000
SAMPLE_CAP = 200_000
SCATTER_CAP = 20_000
FAILURE_EXAMPLES = 20
BUCKET_WIDTHS = (0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 86400)
MAX_BUCKETS = 40


class Reservoir(Generic[T]):
    """A uniform sample of at most ``cap`` items; seeded so the same job gives the same report.

    Li's Algorithm L: once full, it draws how many items to skip instead of a random number per item,
    so millions of per-token latencies cost little more than iterating over them.
    """

    def __init__(self, cap: int, seed: int = 0) -> None:
        self.cap = cap
        self.items: list[T] = []
        self.seen = 0
        self._rng = random.Random(seed)
        self._w = 1.0
        self._take = cap  # index (in all items seen) of the next item that enters a full sample

    def _u(self) -> float:
        return 1.0 - self._rng.random()  # in (0, 1], never log(0)

    def _schedule(self) -> None:
        self._w = min(self._w * math.exp(math.log(self._u()) / self.cap), 1.0 - 1e-12)
        self._take = self.seen + int(math.log(self._u()) / math.log(1.0 - self._w))

    def add(self, item: T) -> None:
        self.extend((item,))

    def extend(self, batch: Sequence[T]) -> None:
        i, n = 0, len(batch)
        while i < n and len(self.items) < self.cap:
            self.items.append(batch[i])
            i += 1
            self.seen += 1
            if len(self.items) == self.cap:
                self._schedule()
        while i < n:
            skip = self._take - self.seen
            if skip >= n - i:
                self.seen += n - i
                return
            i += skip
            self.seen += skip
            self.items[self._rng.randrange(self.cap)] = batch[i]
            i += 1
            self.seen += 1
            self._schedule()


@dataclass
class Dist:
    """A latency (or speed) distribution: exact count and mean, percentiles from the sample."""

    count: int = 0
    mean: float = 0.0
    p50: float = 0.0
    p95: float = 0.0
    values: list[float] = field(default_factory=list)


class _Acc:
    def __init__(self, cap: int = SAMPLE_CAP) -> None:
        self.sample: Reservoir[float] = Reservoir(cap)
        self.total = 0.0

    def add(self, v: float) -> None:
        self.sample.add(v)
        self.total += v

    def extend(self, values: Sequence[float]) -> None:
        self.sample.extend(values)
        self.total += sum(values)

    def dist(self) -> Dist:
        n = self.sample.seen
        if not n:
            return Dist()
        ordered = sorted(self.sample.items)
        return Dist(n, self.total / n, percentile(ordered, 50), percentile(ordered, 95), self.sample.items)


def percentile(ordered: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), on an already sorted sequence."""
    if not ordered:
        return 0.0
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class WorkerStats:
    worker_id: str
    variants: list[str]
    rows: int
    succeeded: int
    failed: int
    generated_tokens: int
    active_s: float
    tokens_per_second: float
    mean_decode_tps: float


@dataclass
class VariantStats:
    variant: str
    rows: int
    generated_tokens: int
    decode_tps: Dist


@dataclass
class Throughput:
    """Generated tokens/s per time bucket; ``starts`` are seconds since the job's first start."""

    bucket_s: float
    starts: list[float]
    total: list[float]
    per_worker: dict[str, list[float]]


@dataclass
class Failure:
    custom_id: str
    code: str
    error: str


@dataclass
class JobReport:
    job_id: str
    name: str
    state: str
    model: str
    ab_group: str | None
    total_rows: int
    finished: int
    succeeded: int
    failed: int
    cached: int
    prompt_tokens: int
    completion_tokens: int
    generated_tokens: int
    started_at: float
    finished_at: float
    wall_s: float
    tokens_per_second: float
    ttft: Dist
    itl: Dist
    total_ms: Dist
    decode_tps: Dist
    workers: list[WorkerStats]
    variants: list[VariantStats]
    throughput: Throughput
    scatter: list[tuple[int, float, str]]
    failures: list[tuple[str, int]]
    failure_examples: list[Failure]
    decode_steps: int = 0
    busy_fraction: float | None = None  # engine slots filled / available over the job's decode steps

    @property
    def pending(self) -> int:
        return max(self.total_rows - self.finished, 0)

    @property
    def main_variant(self) -> str:
        if self.variants:
            return max(self.variants, key=lambda v: v.rows).variant
        return self.model


@dataclass
class Cost:
    """Hardware cost per 1M generated tokens at the measured rate, beside an API price when given."""

    cost_per_hour: float | None
    api_price: float | None
    tokens_per_second: float
    per_million: float | None
    ratio: float | None


@dataclass(frozen=True)
class Plot:
    """One rendered figure; ``slug`` names its PNG file and anchors it in the page."""

    slug: str
    title: str
    alt: str
    png: bytes

    @property
    def filename(self) -> str:
        return f"{self.slug}.png"


@dataclass
class Report:
    job: JobReport
    cost: Cost
    ab: ABReport[JobReport] | None = None
    ab_note: str | None = None


def _num(d: dict[str, Any], key: str) -> float | None:
    v = d.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _bucket_width(span: float) -> float:
    for w in BUCKET_WIDTHS:
        if span / w <= MAX_BUCKETS:
            return float(w)
    return float(BUCKET_WIDTHS[-1])


def _spread(into: list[float], t0: float, width: float, start: float, end: float, tokens: float) -> None:
    """Add ``tokens`` to the buckets ``[start, end]`` overlaps, in proportion to the overlap.

    Batched decoding finishes many rows at once; crediting each row's tokens to the moment it ended
    would draw spikes where the real rate was flat.
    """
    n = len(into)
    if end - start <= 1e-9:
        i = min(max(int((end - t0) / width), 0), n - 1)
        into[i] += tokens
        return
    first = min(max(int((start - t0) / width), 0), n - 1)
    last = min(max(int((end - t0) / width), 0), n - 1)
    rate = tokens / (end - start)
    for i in range(first, last + 1):
        lo = max(start, t0 + i * width)
        hi = min(end, t0 + (i + 1) * width)
        if i == n - 1:
            hi = max(hi, end)
        if i == 0:
            lo = min(lo, start)
        if hi > lo:
            into[i] += rate * (hi - lo)


_COLUMNS = (
    Result.seq,
    Result.custom_id,
    Result.status,
    Result.error_code,
    Result.error,
    Result.worker_id,
    Result.variant,
    Result.timings,
    Result.prompt_tokens,
    Result.completion_tokens,
    Result.cached,
    Result.created_at,
)


@dataclass
class _WorkerAcc:
    variants: Counter[str] = field(default_factory=Counter)
    rows: int = 0
    succeeded: int = 0
    failed: int = 0
    tokens: int = 0
    first: float = float("inf")
    last: float = float("-inf")
    decode: _Acc = field(default_factory=lambda: _Acc(cap=1))


def job_report(s: Session, job: Job) -> JobReport:
    """Everything the page shows about one job, in one streaming pass over its results."""
    if not store_results.count_results(s, job.id):
        raise NoResultsYet(f"job {job.id} has no results yet (state {job.state}); see: tokenmill status {job.id}")
    counts: Counter[str] = Counter()
    prompt_tokens = completion_tokens = generated = cached = 0
    ttft, itl, total_ms, decode = _Acc(), _Acc(), _Acc(), _Acc()
    per_variant: dict[str, tuple[list[int], _Acc]] = {}
    workers: dict[str, _WorkerAcc] = {}
    failures: Counter[str] = Counter()
    examples: list[Failure] = []
    scatter: Reservoir[tuple[int, float, str]] = Reservoir(SCATTER_CAP)
    spans: list[tuple[float, float, float, str]] = []
    first_start = job.started_at if job.started_at is not None else float("inf")
    last_end = float("-inf")
    for r in store_results.iter_result_columns(s, job.id, _COLUMNS, page=PAGE):
        counts[r.status] += 1
        end = float(r.created_at)
        last_end = max(last_end, end)
        wid = r.worker_id or "unknown"
        variant = r.variant or "unknown"
        w = workers.setdefault(wid, _WorkerAcc())
        w.rows += 1
        w.variants[variant] += 1
        if r.status != ResultStatus.SUCCEEDED:
            w.failed += 1
            code = r.error_code or ErrorCode.GENERATION_FAILED
            failures[code] += 1
            if len(examples) < FAILURE_EXAMPLES:
                examples.append(Failure(r.custom_id, code, r.error or ""))
            first_start = min(first_start, end)
            continue
        w.succeeded += 1
        prompt_tokens += r.prompt_tokens or 0
        completion_tokens += r.completion_tokens or 0
        if r.cached:
            cached += 1
            continue
        tokens = r.completion_tokens or 0
        generated += tokens
        w.tokens += tokens
        t: dict[str, Any] = r.timings or {}
        total = _num(t, "total_ms")
        first_token = _num(t, "ttft_ms")
        start = end - total / 1000 if total is not None else end
        first_start = min(first_start, start)
        w.first, w.last = min(w.first, start), max(w.last, end)
        decode_from = start + first_token / 1000 if first_token is not None and total is not None else start
        spans.append((min(decode_from, end), end, float(tokens), wid))
        if first_token is not None:
            ttft.add(first_token)
        if total is not None:
            total_ms.add(total)
            scatter.add((int(r.prompt_tokens or 0), total, variant))
        token_ms = t.get("token_ms")
        if isinstance(token_ms, list):
            itl.extend([float(v) for v in token_ms[1:] if isinstance(v, (int, float))])
        tps = _num(t, "tokens_per_second")
        var = per_variant.setdefault(variant, ([0, 0], _Acc()))
        var[0][0] += 1
        var[0][1] += tokens
        if tps is not None:
            decode.add(tps)
            var[1].add(tps)
            w.decode.add(tps)
    if first_start == float("inf"):
        first_start = last_end
    wall = max(last_end - first_start, 0.0)
    return JobReport(
        job_id=job.id,
        name=job.name,
        state=job.state,
        model=job.pinned_variant or job.family,
        ab_group=job.ab_group,
        total_rows=job.total_rows,
        finished=sum(counts.values()),
        succeeded=counts[ResultStatus.SUCCEEDED],
        failed=sum(n for status, n in counts.items() if status != ResultStatus.SUCCEEDED),
        cached=cached,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        generated_tokens=generated,
        started_at=first_start,
        finished_at=last_end,
        wall_s=wall,
        tokens_per_second=generated / wall if wall > 0 else 0.0,
        ttft=ttft.dist(),
        itl=itl.dist(),
        total_ms=total_ms.dist(),
        decode_tps=decode.dist(),
        workers=[_worker_stats(wid, w) for wid, w in sorted(workers.items())],
        variants=[
            VariantStats(name, counts_[0], counts_[1], acc.dist())
            for name, (counts_, acc) in sorted(per_variant.items())
        ],
        throughput=_throughput(spans, first_start, last_end, sorted(workers)),
        scatter=scatter.items,
        failures=failures.most_common(),
        failure_examples=examples,
        decode_steps=job.decode_steps or 0,
        busy_fraction=job.busy_fraction,
    )


def _worker_stats(wid: str, w: _WorkerAcc) -> WorkerStats:
    active = max(w.last - w.first, 0.0) if w.last >= w.first else 0.0
    return WorkerStats(
        worker_id=wid,
        variants=[v for v, _ in w.variants.most_common()],
        rows=w.rows,
        succeeded=w.succeeded,
        failed=w.failed,
        generated_tokens=w.tokens,
        active_s=active,
        tokens_per_second=w.tokens / active if active > 0 else 0.0,
        mean_decode_tps=w.decode.total / w.decode.sample.seen if w.decode.sample.seen else 0.0,
    )


def _throughput(spans: list[tuple[float, float, float, str]], t0: float, t1: float, workers: list[str]) -> Throughput:
    span = max(t1 - t0, 0.0)
    width = _bucket_width(span)
    n = max(math.ceil(span / width), 1)
    per = {w: [0.0] * n for w in workers}
    for start, end, tokens, wid in spans:
        _spread(per[wid], t0, width, start, end, tokens)
    per = {w: [v / width for v in vals] for w, vals in per.items() if any(vals)}
    total = [sum(vals[i] for vals in per.values()) for i in range(n)]
    return Throughput(width, [i * width for i in range(n)], total, per)


def cost(tokens_per_second: float, cost_per_hour: float | None, api_price: float | None) -> Cost:
    per_million = None
    ratio = None
    if cost_per_hour is not None and tokens_per_second > 0:
        per_million = cost_per_hour / (tokens_per_second * 3600) * 1e6
        if api_price is not None and per_million > 0:
            ratio = api_price / per_million
    return Cost(cost_per_hour, api_price, tokens_per_second, per_million, ratio)


def _ab_partner(s: Session, job: Job, ab: str | None) -> tuple[Job | None, str | None]:
    if ab is not None:
        other = store_jobs.get_job(s, ab)
        if other.id == job.id:
            raise UsageError(f"--ab {ab} is the job itself; give the other job of the comparison")
        return other, None
    if not job.ab_group:
        return None, None
    partners = store_jobs.ab_partners(s, job)
    if not partners:
        return None, None
    note = None
    if len(partners) > 1:
        note = f"A/B group {job.ab_group} holds {len(partners) + 1} jobs; compared with {partners[0].id}"
    return partners[0], note


def load_report(
    store: Store,
    job_ref: str,
    *,
    ab: str | None = None,
    cost_per_hour: float | None = None,
    api_price: float | None = None,
) -> Report:
    """The whole report for ``job_ref``; raises JobNotFound or NoResultsYet with a message to act on."""
    with store.session() as s:
        job = store_jobs.get_job(s, job_ref)
        main = job_report(s, job)
        partner, note = _ab_partner(s, job, ab)
        comparison = None
        if partner is not None:
            try:
                other = job_report(s, partner)
            except NoResultsYet as exc:
                note = f"A/B: {exc}"
            else:
                comparison = compare_outputs(s, main, other)
    return Report(main, cost(main.tokens_per_second, cost_per_hour, api_price), comparison, note)
