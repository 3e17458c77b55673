"""The Jinja2 templates shared by `tokenmill report` and the web dashboard, and the filters they use.

Autoescaping is on for every template, so any string that comes from data (job names, custom ids,
outputs, errors, worker ids: all user input) is rendered as text; there is no hand-written escaping
anywhere. The few numbers-to-text formats live here so the report and the dashboard say them the same way.
"""

from __future__ import annotations

import time
from functools import cache
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape


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


def num(v: float, decimals: int = 0) -> str:
    """Thousands separators, as every count on the pages is shown."""
    return f"{v:,.{decimals}f}"


def clip(text: str, n: int = 300) -> str:
    """Long outputs and errors are cut so one row cannot stretch a table over several screens."""
    return text if len(text) <= n else text[: n - 1] + "…"


@cache
def environment() -> Environment:
    """One environment per process: templates compile once, then render from the cache."""
    env = Environment(
        loader=PackageLoader("tokenmill", "templates"),
        autoescape=select_autoescape(("html", "jinja"), default_for_string=True, default=True),
        undefined=StrictUndefined,  # a misspelt field fails the render instead of showing nothing
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(money=money, duration=duration, stamp=stamp, num=num, clip=clip)
    return env


def render(name: str, **context: Any) -> str:
    return environment().get_template(name).render(**context)


def source(name: str) -> str:
    """A template file's raw text (the dashboard's script is served as it is, not rendered)."""
    env = environment()
    assert env.loader is not None
    text, _, _ = env.loader.get_source(env, name)
    return text


__all__ = ["clip", "duration", "environment", "money", "num", "render", "source", "stamp"]
