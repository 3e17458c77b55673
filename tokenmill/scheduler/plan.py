"""Deadline planning: which variant finishes a job by a given time on the fleet that will run it.

An overnight run needs the variant that is done by morning, not the largest one that fits. The plan
estimates the job's tokens from its rows (counted with the model's tokenizer when it is at hand, else
prompt characters / 4; plus ``max_tokens`` per row: an upper bound, since rows that stop early finish
sooner), predicts each variant's prompt and generation rates on every member of the fleet
(:mod:`tokenmill.models.speed`: batched decoding, the member's threads and memory), times the prompt
tokens at the prompt rate and the generated ones at the generation rate, says which of the two
dominates (a folder of documents is almost all prompt), and pins the best-quality variant whose
predicted finish is before the deadline. Once rows finish,
``tokenmill status`` replaces the prediction with the measured rate.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from tokenmill.errors import ModelError, UsageError
from tokenmill.host import Capacity
from tokenmill.models.catalog import Family, Variant
from tokenmill.models.sizing import choose_variant
from tokenmill.models.speed import HostSpeed, predict, predict_batched
from tokenmill.rows import DatasetRow

CHARS_PER_TOKEN = 4.0
TOKENS_PER_MESSAGE = 6  # chat template markup around each message
_DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)\s*h)?\s*(?:(\d+(?:\.\d+)?)\s*m)?\s*$", re.IGNORECASE)
_CLOCK = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*$")


@dataclass(frozen=True)
class Workload:
    rows: int
    prompt_tokens: int
    gen_tokens: int

    @classmethod
    def of_rows(
        cls, rows: Iterable[DatasetRow], *, count: Callable[[str], int] | None = None, markup: int | None = None
    ) -> Workload:
        """The job's tokens: exact with ``count`` (the model's tokenizer) and ``markup`` (its chat template's
        tokens around a message), else estimated from characters."""
        n = prompt = gen = 0
        per_message = TOKENS_PER_MESSAGE if markup is None else markup
        for row in rows:
            n += 1
            texts = [row.prompt or "", *(str(m.get("content", "")) for m in row.messages or ())]
            if count is not None:
                prompt += sum(count(t) for t in texts if t)
            else:
                prompt += int(sum(len(t) for t in texts) / CHARS_PER_TOKEN)
            prompt += per_message * len(row.messages or ())
            gen += row.params.max_tokens
        return cls(n, prompt, gen)


@dataclass(frozen=True)
class FleetMember:
    """One worker process the job may run on, as the plan sees it."""

    capacity: Capacity
    speed: HostSpeed
    threads: int
    n_seq: int = 16
    n_ctx: int = 2048
    share: int = 1


@dataclass(frozen=True)
class VariantPlan:
    variant: Variant
    seconds: float | None  # None: fits on no member of the fleet
    gen_tps: float = 0.0
    prompt_tps: float = 0.0
    prompt_seconds: float = 0.0  # of ``seconds``: the prompt tokens at the prompt rate
    gen_seconds: float = 0.0  # the generated tokens at the generation rate

    def finish_at(self, start: float) -> float | None:
        return None if self.seconds is None else start + self.seconds

    @property
    def dominant(self) -> str:
        """Which side of the work takes most of the predicted time."""
        return "prompt processing" if self.prompt_seconds >= self.gen_seconds else "generation"


@dataclass(frozen=True)
class Plan:
    deadline: float
    start: float
    workload: Workload
    options: tuple[VariantPlan, ...]  # best quality first
    chosen: VariantPlan | None

    def lines(self) -> list[str]:
        """What `submit`/`run` print: the pick, when it finishes, and what the neighbours would give."""
        out = [f"plan: {self.workload.rows} rows, ~{self.workload.prompt_tokens:,} prompt + "
               f"≤{self.workload.gen_tokens:,} generated tokens, deadline {_clock(self.deadline)}"]
        for opt in self.options:
            at = opt.finish_at(self.start)
            if at is None:
                verdict = "does not fit this fleet"
            else:
                verdict = (f"~{opt.prompt_tps:,.0f} prompt + ~{opt.gen_tps:,.0f} generated tok/s, finishes "
                           f"~{_clock(at)} ({_dur(opt.seconds or 0)}: prompt {_dur(opt.prompt_seconds)}, generation "
                           f"{_dur(opt.gen_seconds)}; {opt.dominant} dominates)")
                verdict += " — meets the deadline" if at <= self.deadline else " — late"
            mark = "→" if self.chosen is not None and opt.variant.quant == self.chosen.variant.quant else " "
            out.append(f" {mark} {opt.variant.label}: {verdict}")
        if self.chosen is None:
            out.append("warning: no variant is predicted to finish by the deadline; running the fastest")
        return out


def parse_deadline(text: str, now: float | None = None) -> float:
    """``06:00`` (the next time the local clock shows it) or a duration (``8h``, ``90m``, ``1h30m``)."""
    now = time.time() if now is None else now
    clock = _CLOCK.match(text)
    if clock:
        hour, minute = int(clock.group(1)), int(clock.group(2))
        if hour > 23 or minute > 59:
            raise UsageError(f"--deadline {text!r}: not a time of day (HH:MM, 00:00-23:59)")
        base = dt.datetime.fromtimestamp(now).astimezone()
        at = base.replace(hour=hour, minute=minute, second=0, microsecond=0)
        if at.timestamp() <= now:
            at += dt.timedelta(days=1)
        return at.timestamp()
    dur = _DURATION.match(text)
    if dur and (dur.group(1) or dur.group(2)):
        seconds = float(dur.group(1) or 0) * 3600 + float(dur.group(2) or 0) * 60
        if seconds > 0:
            return now + seconds
    raise UsageError(f"--deadline {text!r}: give a time of day (06:00) or a duration (8h, 90m, 1h30m)")


def _member_rates(v: Variant, family: Family, m: FleetMember) -> tuple[float, float] | None:
    """(prompt tok/s, batched generation tok/s) of ``v`` on member ``m``; None when it does not fit there."""
    try:
        c = choose_variant(family, m.capacity, share=m.share, n_ctx=m.n_ctx, n_seq=m.n_seq + 1, pinned=v.quant)
    except ModelError:
        return None
    gpu = None
    if c.device == "cuda" and c.n_gpu_layers == -1:
        gpu = next((g for g in m.capacity.usable_gpus if g.index == c.gpu_index), None)
    single = predict(v, family, speed=m.speed, threads=m.threads, gpu=gpu)
    return single.prompt_tps, predict_batched(v, family, speed=m.speed, threads=m.threads, n_seq=m.n_seq, gpu=gpu)


def variant_plan(v: Variant, family: Family, workload: Workload, fleet: Sequence[FleetMember]) -> VariantPlan:
    rates = [r for r in (_member_rates(v, family, m) for m in fleet) if r is not None]
    if not rates:
        return VariantPlan(v, None)
    prompt_tps = sum(r[0] for r in rates)
    gen_tps = sum(r[1] for r in rates)
    prompt_s, gen_s = workload.prompt_tokens / prompt_tps, workload.gen_tokens / gen_tps
    return VariantPlan(v, prompt_s + gen_s, gen_tps, prompt_tps, prompt_s, gen_s)


def plan_job(
    family: Family,
    workload: Workload,
    fleet: Sequence[FleetMember],
    deadline: float,
    *,
    now: float | None = None,
    obtainable: Callable[[Variant], bool] | None = None,
) -> Plan:
    """Every obtainable variant's predicted finish; the best quality that meets the deadline is chosen,
    else (with a warning in :meth:`Plan.lines`) none, and the caller runs the fastest."""
    start = time.time() if now is None else now
    variants = [v for v in family.variants if obtainable is None or obtainable(v)]
    options = tuple(variant_plan(v, family, workload, fleet) for v in variants)
    meets = [o for o in options if o.seconds is not None and start + o.seconds <= deadline]
    return Plan(deadline, start, workload, options, meets[0] if meets else None)


def fastest(plan: Plan) -> VariantPlan | None:
    timed = [o for o in plan.options if o.seconds is not None]
    return min(timed, key=lambda o: o.seconds or 0.0) if timed else None


def _clock(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch).astimezone().strftime("%H:%M")


def _dur(seconds: float) -> str:
    m = round(seconds / 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{max(m, 1)} min" if seconds >= 30 else f"{seconds:.0f} s"
