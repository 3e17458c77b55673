"""`--prefer` and `--deadline` for `run` and `submit`: the variant chosen for the job, printed with its plan."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tokenmill.cli.common import console
from tokenmill.config import Settings
from tokenmill.errors import UsageError
from tokenmill.host import Capacity
from tokenmill.models.catalog import Family, get_family, parse_model_ref
from tokenmill.models.quantize import catalog_with_local
from tokenmill.models.resolve import looks_like_path, obtainable_predicate
from tokenmill.models.sizing import Prefer, choose_variant
from tokenmill.models.speed import HostSpeed, host_speed
from tokenmill.rows import DatasetRow
from tokenmill.scheduler.plan import FleetMember, Workload, fastest, parse_deadline, plan_job
from tokenmill.scheduler.submit import Submission
from tokenmill.store import Store
from tokenmill.store import workers as store_workers
from tokenmill.store.clock import db_now


@dataclass(frozen=True)
class JobChoice:
    pin: str | None  # "family:quant" the job is pinned to, None when the workers choose
    deadline: float | None


def this_host(
    settings: Settings,
    capacity: Capacity,
    processes: int,
    threads_each: int,
    *,
    n_ctx: int | None = None,
    n_seq: int | None = None,
) -> list[FleetMember]:
    """`run`'s fleet: its local worker processes, splitting this host, with the job's context and batch."""
    speed = host_speed(settings.models_dir)
    sized = {"n_ctx": n_ctx} if n_ctx else {}
    sized |= {"n_seq": n_seq} if n_seq else {}
    return [FleetMember(capacity, speed, threads=threads_each, share=processes, **sized) for _ in range(processes)]


def live_fleet(store: Store, settings: Settings, fallback: Capacity) -> list[FleetMember]:
    """The live workers as the plan sees them (their advertised capacity and probe); this host when none."""
    members = []
    lost_after = settings.lost_after
    with store.session() as s:
        now = db_now(s)
        for w in store_workers.list_workers(s):
            if store_workers.effective_state(w, lost_after, now) not in ("ready", "busy", "starting"):
                continue
            raw: dict[str, Any] = dict(w.capacity or {})
            if "speed" not in raw:
                continue
            members.append(FleetMember(Capacity.from_json(raw), HostSpeed(**raw["speed"]),
                                       threads=max(1, w.n_threads), n_seq=max(1, w.n_seq)))
    if not members:
        console.print("no live workers advertise their speed; planning for this host")
        members = this_host(settings, fallback, 1, max(1, fallback.physical_cores))
    return members


def choose_for_job(
    settings: Settings,
    sub: Submission,
    prefer: Prefer,
    deadline_text: str | None,
    fleet_of: Callable[[], list[FleetMember]],
    *,
    sources: tuple[str, ...] = ("local", "registry", "hub"),
) -> JobChoice:
    """The pin (and deadline) `--prefer`/`--deadline` give a job; no pin when the model names a variant
    or a file, or when neither flag asks for one. ``fleet_of`` is asked only when a plan needs the fleet
    (it probes this host or reads the live workers). ``sources``: where the variants may come from (`run`
    pins only what this host has or a package registry gives: a pinned variant does not fall back)."""
    if deadline_text is None and prefer == "balanced":
        return JobChoice(None, None)
    if looks_like_path(sub.model) or parse_model_ref(sub.model)[1] is not None:
        if deadline_text is not None:
            raise UsageError(f"--deadline chooses the variant; give a family, not {sub.model!r}")
        return JobChoice(None, None)
    catalog = catalog_with_local(settings.models_dir)
    family = get_family(parse_model_ref(sub.model, catalog)[0], catalog)
    can_get = obtainable_predicate(settings.models_dir, sources=sources)
    fleet = fleet_of()
    if deadline_text is None:
        return JobChoice(_preferred(family, prefer, fleet, can_get), None)
    deadline = parse_deadline(deadline_text)
    counter = sub.counter
    count = (lambda text: counter.count(text)) if counter is not None else None
    overhead = counter.chat_overhead if counter is not None else None
    workload = Workload.of_rows((r for r in sub.rows() if isinstance(r, DatasetRow)), count=count, markup=overhead)
    plan = plan_job(family, workload, fleet, deadline, now=time.time(), obtainable=can_get)
    for line in plan.lines():
        console.print(line, soft_wrap=True)
    picked = plan.chosen or fastest(plan)
    if picked is None:
        raise UsageError(f"no variant of {family.name} fits any worker of this fleet")
    return JobChoice(picked.variant.label, deadline)


def _preferred(family: Family, prefer: Prefer, fleet: list[FleetMember], can_get: Any) -> str:
    """The preference's pick for the fleet member with the least memory, so every member can run it."""
    def memory(m: FleetMember) -> int:
        return m.capacity.ram_available_bytes + sum(g.vram_free_bytes for g in m.capacity.gpus)

    smallest = min(fleet, key=memory)
    c = choose_variant(family, smallest.capacity, share=smallest.share, n_ctx=smallest.n_ctx,
                       n_seq=smallest.n_seq + 1, obtainable=can_get, prefer=prefer)
    console.print(f"--prefer {prefer}: {c.variant.label} ({c.reason})", soft_wrap=True)
    return c.variant.label


def deadline_note(options: dict[str, Any], eta: float | None) -> str | None:
    """`status`'s line for a job with a deadline: the measured ETA against it."""
    deadline = options.get("deadline")
    if not deadline:
        return None
    when = time.strftime("%H:%M", time.localtime(float(deadline)))
    if eta is None:
        return f"deadline {when}; no ETA yet"
    verdict = "on time" if eta <= float(deadline) else f"late by {(eta - float(deadline)) / 60:.0f} min"
    return f"ETA {time.strftime('%H:%M', time.localtime(eta))}, deadline {when}: {verdict}"
