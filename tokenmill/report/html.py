"""One self-contained HTML page: inline CSS, figures as data URIs, no scripts, no external assets.

A report is mailed, attached to tickets and opened years later from disk, so it must not depend on
anything outside the file. The page comes from the ``report.html`` Jinja2 template (shared with the web
dashboard) with autoescaping on: datasets are user input and may well contain markup, and every string
from data is printed through the template, never pasted into HTML here.
"""

from __future__ import annotations

import base64
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass

from tokenmill import __version__, templates
from tokenmill.report.data import Plot, Report
from tokenmill.store.states import JOB_STATES

STATES = frozenset(JOB_STATES)  # states with a badge colour in the CSS


@dataclass(frozen=True)
class Figure:
    """A plot as the page embeds it: the PNG's own size keeps the layout still while it decodes."""

    slug: str
    title: str
    alt: str
    data: str
    width: int
    height: int


def figure(p: Plot) -> Figure:
    width, height = struct.unpack(">II", p.png[16:24])  # the IHDR chunk of a PNG
    return Figure(p.slug, p.title, p.alt, base64.b64encode(p.png).decode("ascii"), width, height)


def render(report: Report, plots: Sequence[Plot]) -> str:
    return templates.render(
        "report.html",
        report=report,
        figures=[figure(p) for p in plots],
        states=STATES,
        version=__version__,
        now=time.time(),
    )


__all__ = ["STATES", "Figure", "figure", "render"]
