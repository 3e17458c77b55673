"""Hypothesis strategies for hostile batch files, and what serve must answer for each hostile line.

Shared by tests/server/test_adversarial.py (a few seeded examples) and benchmarks/adversarial_batches.py
(many, larger, with timings). A batch is some good chat lines with poisoned lines put among them; every
poisoned line must come back as a batch error with its own line number, and no other line may.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from hypothesis import strategies as st

from tests.server.helpers import CHAT, MODEL, chat_line

ID = b"@ID@"  # replaced by a unique custom_id when the line takes its place in a file


@dataclass(frozen=True)
class Poison:
    """A hostile line (``ID`` marks where its custom_id goes) and words its error must contain."""

    kind: str
    line: bytes
    words: str
    param: str | None = None


@dataclass(frozen=True)
class HostileBatch:
    data: bytes
    bad: dict[int, Poison]  # line number → the poison on it
    lines: int

    def describe(self) -> str:
        kinds = sorted({p.kind for p in self.bad.values()})
        return (
            f"{self.lines} lines, {len(self.data) / 1e6:.1f} MB, poisoned lines {sorted(self.bad)} ({', '.join(kinds)})"
        )


def _line(body: dict[str, object], **top: object) -> bytes:
    line = {"custom_id": "@ID@", "method": "POST", "url": CHAT, "body": body, **top}
    return json.dumps(line).encode()


def _body(**extra: object) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}


def _insert(line: bytes, at: int, what: bytes) -> bytes:
    """``what`` inside the prompt text: a string value, so the rest of the line stays well formed."""
    anchor = line.index(b'"hi"') + 1
    return line[:anchor] + b"h" * (at % 8) + what + line[anchor:]


def _deep(n: int) -> Poison:
    """About ``n`` bytes, never under 2,000 levels (past Python's recursion limit)."""
    opener = (b"[", b'{"a": ', b'[{"a": ')[n % 3]
    return Poison(
        "deep nesting", b'{"custom_id": "@ID@", "x": ' + opener * max(2_000, n // len(opener)), "nested too deeply"
    )


def _replace_tokens(kind: str, value: bytes, words: str) -> Poison:
    return Poison(kind, _line(_body()).replace(b'"max_tokens": 4', value), words)


def _schema(n: int) -> Poison:
    schema = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(n)}}
    fmt = {"type": "json_schema", "json_schema": {"name": "g", "schema": schema}}
    where = "body.response_format.json_schema.schema"
    return Poison("giant schema", _line(_body(response_format=fmt)), "is longer than 64 KiB", where)


def _grammar(kind: str, grammar: str, words: str) -> Poison:
    return Poison(kind, _line(_body(grammar=grammar)), words, "body.grammar")


_UTF8 = (b"\xff", b"\xc3(", b"\xed\xa0\x80", b"\xe9", b"\xf8\x88\x80\x80\x80")
_CONSTANTS = (b"NaN", b"Infinity", b"-Infinity")

# kind → (smallest size, largest size or None for ``scale``, size → the poison)
KINDS: dict[str, tuple[int, int | None, Callable[[int], Poison]]] = {
    "deep nesting": (2_000, None, _deep),
    "huge url": (1_000, None, lambda n: Poison("huge url", _line(_body(), url="/v1/" + "u" * n), "differs", "url")),
    "huge model": (
        1_000, None, lambda n: Poison("huge model", _line(_body(model="m" * n)), "model 'mmmmmmmm", "body.model")
    ),
    "huge field name": (1_000, None, lambda n: Poison(
        "huge field name", _line(_body(**{"k" * n: 1})), "not a request field", "body." + "k" * 95 + "…"
    )),
    "huge custom_id": (1_000, None, lambda n: Poison(
        "huge custom_id", _line(_body()).replace(ID, b"i" * n), "at most 512", "custom_id"
    )),
    "huge exponent": (
        400, 10**7, lambda e: _replace_tokens("huge exponent", f'"seed": 1e{e}'.encode(), "is too large")
    ),
    "huge integer": (
        4_300, None, lambda n: _replace_tokens("huge integer", b'"seed": 9' + b"9" * n, "too many digits")
    ),
    "NaN/Infinity": (0, 2, lambda i: _replace_tokens(
        "NaN/Infinity", b'"temperature": ' + _CONSTANTS[i], "is not a JSON value"
    )),
    "NUL": (0, 7, lambda at: Poison("NUL", _insert(_line(_body()), at, b"\x00"), "Invalid control character")),
    "invalid UTF-8": (0, 4, lambda i: Poison(
        "invalid UTF-8", _insert(_line(_body()), i, _UTF8[i]), "invalid UTF-8 byte"
    )),
    "giant schema": (3_000, 20_000, _schema),
    "grammar nested deep": (101, 5_000, lambda n: _grammar(
        "grammar nested deep", "root ::= " + "(" * n + '"a"' + ")" * n, "nested more than 100 deep"
    )),
    "grammar left recursion": (10, 2_500, lambda n: _grammar(
        "grammar left recursion", _left_recursive_chain(n), "left-recursive"
    )),
    "grammar over the cap": (65 * 1024, None, lambda n: _grammar(
        "grammar over the cap", 'root ::= "' + "a" * n + '"', "is longer than 64 KiB"
    )),
}  # fmt: skip


def poisons(scale: int) -> st.SearchStrategy[Poison]:
    """``scale`` bounds the big things in bytes: a test keeps it at a few hundred KB, a benchmark at MBs."""
    return st.one_of(
        [
            st.integers(min_value=low, max_value=max(low, high if high is not None else scale)).map(make)
            for low, high, make in KINDS.values()
        ]
    )


def every_kind(scale: int, good: int = 2) -> HostileBatch:
    """One poison of each kind at its largest size, each after ``good`` good lines: no draw leaves one out."""
    bad = [make(max(low, high if high is not None else scale)) for low, high, make in KINDS.values()]
    return assemble(bad, [(good + 1) * (i + 1) for i in range(len(bad))], (good + 1) * len(bad))


def chain_grammar(n: int) -> str:
    """n rules, each needing the next, nullable from the end: the old fixpoint took n rounds of n rules."""
    return (
        'root ::= r0 "z"\n' + "".join(f"r{i} ::= r{i + 1} r{i + 1}?\n" for i in range(n - 1)) + f'r{n - 1} ::= "x"?\n'
    )


def big_grammar(kib: int) -> str:
    rules = ['root ::= c0 "z"']
    i = 0
    while sum(len(r) + 1 for r in rules) < kib * 1024:
        rules.append(f'c{i} ::= c{i + 1} c{i + 1}? ("a" | [b-d]+ c{i + 1})* | "q"')
        i += 1
    rules.append(f'c{i} ::= "e"?')
    return "\n".join(rules) + "\n"


def _left_recursive_chain(n: int) -> str:
    """A chain of rules whose last one loops back to the first, before any character: found only at the end."""
    return 'root ::= r0 "z"\n' + "".join(f"r{i} ::= r{i + 1}? r{i + 1}\n" for i in range(n)) + f"r{n} ::= r0\n"


@st.composite
def hostile_batches(draw: st.DrawFn, *, max_good: int, scale: int, max_poisons: int = 4) -> HostileBatch:
    bad = draw(st.lists(poisons(scale), min_size=1, max_size=max_poisons))
    good = draw(st.integers(min_value=0, max_value=max_good))
    total = good + len(bad)
    where = st.lists(st.integers(min_value=1, max_value=total), min_size=len(bad), max_size=len(bad), unique=True)
    return assemble(bad, sorted(draw(where)), total)


def assemble(bad: list[Poison], where: list[int], total: int) -> HostileBatch:
    """``total`` lines: the poisons on the lines ``where`` says, good chat lines on the rest."""
    by_line = dict(zip(where, bad, strict=True))
    out: list[bytes] = []
    for n in range(1, total + 1):
        poison = by_line.get(n)
        if poison is None:
            out.append(json.dumps(chat_line(n)).encode())
        else:
            out.append(poison.line.replace(ID, f"bad-{n}".encode(), 1))
    return HostileBatch(b"\n".join(out) + b"\n", by_line, total)


def mismatches(batch: HostileBatch, errors: list[dict[str, object]]) -> list[str]:
    """What is wrong with a failed batch's errors: each poisoned line once, with its words; nothing else."""
    problems: list[str] = []
    got = {e.get("line"): e for e in errors}
    if sorted(k for k in got if isinstance(k, int)) != sorted(batch.bad) or len(got) != len(errors):
        problems.append(f"error lines {[e.get('line') for e in errors]} != poisoned lines {sorted(batch.bad)}")
    for line, poison in batch.bad.items():
        error = got.get(line)
        if error is None:
            continue
        message = str(error.get("message") or "")
        if poison.words not in message or len(message) > 1100:
            problems.append(f"line {line} ({poison.kind}): message {message[:200]!r} lacks {poison.words!r}")
        if poison.param is not None and error.get("param") != poison.param:
            problems.append(f"line {line} ({poison.kind}): param {str(error.get('param'))[:120]!r} != {poison.param!r}")
    return problems
