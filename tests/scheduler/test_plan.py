"""Deadline plans: parse the deadline, predict each variant's finish on a fleet, pin the best that meets it."""

from __future__ import annotations

import datetime as dt

import pytest

from tokenmill.errors import UsageError
from tokenmill.host import Capacity, GpuInfo
from tokenmill.models.catalog import get_family
from tokenmill.models.speed import HostSpeed
from tokenmill.rows import CHAT, DatasetRow, SamplingParams
from tokenmill.scheduler.plan import FleetMember, Workload, fastest, parse_deadline, plan_job

GiB = 1024**3
NOW = dt.datetime(2026, 12, 2, 22, 0).astimezone().timestamp()
SPEED = HostSpeed("h", "cpu", mem_bandwidth_bytes=20e9, flops=10e9)
MISTRAL = get_family("mistral-7b-instruct-v0.3")
CPU_BOX = FleetMember(Capacity("cpu", 16, 32, 64 * GiB, 64 * GiB), SPEED, threads=8, n_seq=1)
GPU_BOX = FleetMember(
    Capacity("gpu", 16, 32, 64 * GiB, 64 * GiB, (GpuInfo(0, "RTX 4090", 24 * GiB, 24 * GiB),), True),
    SPEED, threads=16, n_seq=16,
)


def test_deadlines_as_a_clock_time_or_a_duration() -> None:
    assert parse_deadline("8h", NOW) == NOW + 8 * 3600
    assert parse_deadline("90m", NOW) == NOW + 5400
    assert parse_deadline("1h30m", NOW) == NOW + 5400
    six = dt.datetime.fromtimestamp(parse_deadline("06:00", NOW)).astimezone()
    assert (six.hour, six.minute, six.day) == (6, 0, 3)  # 06:00 after 22:00 is tomorrow morning
    for bad in ("tomorrow", "25:00", "0h", ""):
        with pytest.raises(UsageError, match="--deadline"):
            parse_deadline(bad, NOW)


def test_workload_estimates_prompt_and_generated_tokens() -> None:
    rows = [DatasetRow(i, f"r{i}", CHAT, messages=({"role": "user", "content": "x" * 400},),
                       params=SamplingParams(max_tokens=100)) for i in range(10)]
    w = Workload.of_rows(rows)
    assert (w.rows, w.gen_tokens) == (10, 1000)
    assert w.prompt_tokens == 10 * (100 + 6)


def test_a_generous_deadline_pins_a_better_variant_than_a_tight_one() -> None:
    # Generation-heavy on one sequence per worker: bandwidth-bound, so the smaller the variant the sooner.
    work = Workload(rows=2_000, prompt_tokens=50_000, gen_tokens=400_000)
    loose = plan_job(MISTRAL, work, [CPU_BOX], NOW + 48 * 3600, now=NOW)
    timed = {o.variant.quant: o.seconds or 0.0 for o in loose.options}
    assert 0 < timed["q4_k_s"] < timed["q4_k_m"] < timed["q8_0"]  # smaller decodes faster
    assert loose.chosen is not None and loose.chosen.variant.quant == "q8_0"
    quickest = fastest(loose)
    assert quickest is not None and quickest.variant.quant == "q4_k_s"
    tight_deadline = NOW + (timed["q4_k_s"] + timed["q4_k_m"]) / 2  # q4_k_s makes it, q4_k_m does not
    tight = plan_job(MISTRAL, work, [CPU_BOX], tight_deadline, now=NOW)
    assert tight.chosen is not None and tight.chosen.variant.quant == "q4_k_s"
    assert any("late" in line for line in tight.lines()) and any("→" in line for line in tight.lines())


def test_no_variant_in_time_warns() -> None:
    work = Workload(rows=1_000_000, prompt_tokens=10**9, gen_tokens=10**9)
    plan = plan_job(MISTRAL, work, [CPU_BOX], NOW + 60, now=NOW)
    assert plan.chosen is None
    assert plan.lines()[-1].startswith("warning: no variant")


def test_a_gpu_in_the_fleet_makes_the_job_finish_sooner() -> None:
    work = Workload(rows=2_000, prompt_tokens=1_000_000, gen_tokens=400_000)
    cpu_only = plan_job(MISTRAL, work, [CPU_BOX], NOW + 3600, now=NOW)
    with_gpu = plan_job(MISTRAL, work, [CPU_BOX, GPU_BOX], NOW + 3600, now=NOW)
    q = {o.variant.quant: o.seconds for o in cpu_only.options}
    g = {o.variant.quant: o.seconds for o in with_gpu.options}
    assert g["q4_k_m"] is not None and q["q4_k_m"] is not None and g["q4_k_m"] < q["q4_k_m"] / 3


def test_a_variant_that_fits_nowhere_has_no_finish_time() -> None:
    small = FleetMember(Capacity("small", 4, 8, 6 * GiB, 6 * GiB), SPEED, threads=4, n_seq=1)
    plan = plan_job(MISTRAL, Workload(10, 1000, 1000), [small], NOW + 3600, now=NOW)
    by = {o.variant.quant: o for o in plan.options}
    assert by["q8_0"].seconds is None
    assert any("does not fit" in line for line in plan.lines())


def test_prompt_heavy_job_is_timed_at_the_prompt_rate_and_says_so() -> None:
    """A folder of documents is almost all prompt: its time is the prompt tokens at the prompt rate, and the
    plan says prompt processing dominates instead of showing only a generation rate."""
    docs = Workload(rows=222, prompt_tokens=272_000, gen_tokens=222 * 64)
    chats = Workload(rows=222, prompt_tokens=5_000, gen_tokens=222 * 512)
    smol = get_family("smollm2-135m-instruct")
    box = FleetMember(Capacity("cpu", 2, 2, 8 * GiB, 8 * GiB), SPEED, threads=2, n_seq=4)
    plan = plan_job(smol, docs, [box], NOW + 3600, now=NOW)
    opt = plan.options[0]
    assert opt.seconds == pytest.approx(opt.prompt_seconds + opt.gen_seconds)
    assert opt.prompt_seconds == pytest.approx(272_000 / opt.prompt_tps)
    assert opt.prompt_seconds > opt.gen_seconds and opt.dominant == "prompt processing"
    line = plan.lines()[1]
    assert "prompt +" in line and "generated tok/s" in line and "prompt processing dominates" in line
    assert plan_job(smol, chats, [box], NOW + 3600, now=NOW).options[0].dominant == "generation"


def test_workload_counts_exactly_with_the_tokenizer() -> None:
    rows = [DatasetRow(1, "r", CHAT, messages=({"role": "user", "content": "a b c d"},), params=SamplingParams())]
    w = Workload.of_rows(rows, count=lambda text: len(text.split()), markup=30)
    assert (w.prompt_tokens, w.gen_tokens) == (4 + 30, 256)
