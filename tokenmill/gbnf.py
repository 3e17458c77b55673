"""The ``grammar`` field at submit time: a GBNF check that needs no model.

A grammar that llama.cpp cannot compile must fail its line before any model loads, and the submitting
host may have neither the model nor llama.cpp initialised (it must not touch ggml in a parent that
forks). So the grammar is checked here by a parser that follows llama.cpp's own (``llama-grammar.cpp``:
rules, literals, classes, groups, repetitions, undefined rules, a ``root`` rule, left recursion). The
worker still compiles the grammar with llama.cpp and fails the row (never falls back to unconstrained)
if that disagrees. JSON schemas do not pass through GBNF: see :mod:`tokenmill.structured`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache

MAX_REPETITIONS = 2000  # llama.cpp's MAX_REPETITION_THRESHOLD
_HEX = {"x": 2, "u": 4, "U": 8}
_ESCAPES = {"t": "\t", "r": "\r", "n": "\n", "\\": "\\", '"': '"', "[": "[", "]": "]", "-": "-"}


class GrammarError(ValueError):
    """The grammar cannot be compiled; the message is one line."""


@dataclass
class _Rules:
    """Per rule: its alternatives, each the (referenced rule or None for a terminal, may-be-empty) items."""

    defined: dict[str, list[list[tuple[str | None, bool]]]] = field(default_factory=dict)
    referenced: set[str] = field(default_factory=set)
    generated: int = 0


class _Parser:
    def __init__(self, text: str) -> None:
        self.s = text
        self.rules = _Rules()

    def fail(self, what: str, pos: int) -> GrammarError:
        line = self.s.count("\n", 0, pos) + 1
        near = self.s[pos : pos + 20].split("\n")[0]
        return GrammarError(f"{what} at grammar line {line}" + (f" near {json.dumps(near)}" if near else ""))

    def space(self, pos: int, newline_ok: bool) -> int:
        s = self.s
        while pos < len(s) and (s[pos] in " \t#" or (newline_ok and s[pos] in "\r\n")):
            if s[pos] == "#":
                while pos < len(s) and s[pos] not in "\r\n":
                    pos += 1
            else:
                pos += 1
        return pos

    def name(self, pos: int) -> int:
        end = pos
        while end < len(self.s) and _word(self.s[end]):
            end += 1
        if end == pos:
            raise self.fail("expecting a rule name", pos)
        return end

    def char(self, pos: int) -> int:
        s = self.s
        if pos >= len(s):
            raise self.fail("unexpected end of input", pos)
        if s[pos] != "\\":
            return pos + 1
        kind = s[pos + 1 : pos + 2]
        if kind in _HEX:
            digits = s[pos + 2 : pos + 2 + _HEX[kind]]
            if len(digits) != _HEX[kind] or any(c not in "0123456789abcdefABCDEF" for c in digits):
                raise self.fail(f"expecting {_HEX[kind]} hex digits", pos)
            return pos + 2 + _HEX[kind]
        if kind not in _ESCAPES:
            raise self.fail("unknown escape", pos)
        return pos + 2

    def parse(self) -> _Rules:
        pos = self.space(0, True)
        while pos < len(self.s):
            pos = self.rule(pos)
        return self.rules

    def rule(self, pos: int) -> int:
        end = self.name(pos)
        rule = self.s[pos:end]
        pos = self.space(end, False)
        if not self.s.startswith("::=", pos):
            raise self.fail("expecting ::=", pos)
        pos = self.alternates(self.space(pos + 3, True), rule, nested=False)
        if self.s.startswith("\r\n", pos):
            pos += 2
        elif pos < len(self.s) and self.s[pos] in "\r\n":
            pos += 1
        elif pos < len(self.s):
            raise self.fail("expecting newline or end", pos)
        return self.space(pos, True)

    def alternates(self, pos: int, rule: str, nested: bool) -> int:
        alts: list[list[tuple[str | None, bool]]] = []
        pos = self.sequence(pos, alts, nested)
        while pos < len(self.s) and self.s[pos] == "|":
            pos = self.sequence(self.space(pos + 1, True), alts, nested)
        self.rules.defined.setdefault(rule, []).extend(alts)
        return pos

    def sequence(self, pos: int, alts: list[list[tuple[str | None, bool]]], nested: bool) -> int:
        s = self.s
        items: list[tuple[str | None, bool]] = []
        item_open = False
        while pos < len(s):
            c = s[pos]
            if c == '"':
                pos += 1
                while pos >= len(s) or s[pos] != '"':
                    pos = self.char(pos)
                items.append((None, False))
                pos += 1
            elif c == "[":
                pos += 1
                if pos < len(s) and s[pos] == "^":
                    pos += 1
                while pos >= len(s) or s[pos] != "]":
                    pos = self.char(pos)
                    if s[pos : pos + 1] == "-" and s[pos + 1 : pos + 2] not in ("]", ""):
                        pos = self.char(pos + 1)
                items.append((None, False))
                pos += 1
            elif c in "<!":
                raise self.fail("token references (<...>) are not supported; write the text as a literal", pos)
            elif _word(c):
                end = self.name(pos)
                self.rules.referenced.add(s[pos:end])
                items.append((s[pos:end], False))
                pos = end
            elif c == "(":
                self.rules.generated += 1
                sub = f"({self.rules.generated})"
                pos = self.alternates(self.space(pos + 1, True), sub, nested=True)
                if pos >= len(s) or s[pos] != ")":
                    raise self.fail("expecting ')'", pos)
                items.append((sub, False))
                pos += 1
            elif c == ".":
                items.append((None, False))
                pos += 1
            elif c in "*+?{":
                if not item_open:
                    raise self.fail(f"expecting an item before {c}", pos)
                pos, low = self.repetition(pos)
                ref, _ = items[-1]
                items[-1] = (ref, low == 0)
                pos = self.space(pos, nested)
                continue
            else:
                break
            item_open = True
            pos = self.space(pos, nested)
        alts.append(items)
        return pos

    def repetition(self, pos: int) -> tuple[int, int]:
        """Skip ``*``, ``+``, ``?`` or ``{m}``, ``{m,}``, ``{m,n}``; returns (position, minimum)."""
        c = self.s[pos]
        if c != "{":
            return pos + 1, 1 if c == "+" else 0
        pos = self.space(pos + 1, False)
        low, pos = self.integer(pos)
        pos = self.space(pos, False)
        if self.s[pos : pos + 1] == ",":
            pos = self.space(pos + 1, False)
            if self.s[pos : pos + 1].isdigit():
                high, pos = self.integer(pos)
                if high < low:
                    raise self.fail("repetition maximum below its minimum", pos)
                pos = self.space(pos, False)
        if self.s[pos : pos + 1] != "}":
            raise self.fail("expecting '}'", pos)
        if low > MAX_REPETITIONS:
            raise self.fail(f"more than {MAX_REPETITIONS} repetitions", pos)
        return pos + 1, low

    def integer(self, pos: int) -> tuple[int, int]:
        end = pos
        while end < len(self.s) and self.s[end].isdigit():
            end += 1
        if end == pos:
            raise self.fail("expecting an integer", pos)
        return int(self.s[pos:end]), end


def _word(c: str) -> bool:
    return c.isascii() and (c.isalnum() or c == "-")


@lru_cache(maxsize=256)
def check_grammar(text: str) -> None:
    """Raise GrammarError unless llama.cpp's parser would accept ``text`` with a ``root`` rule."""
    if not text.strip():
        raise GrammarError("the grammar is empty")
    if "\x00" in text:
        raise GrammarError("the grammar contains a NUL character")
    rules = _Parser(text).parse()
    missing = sorted(rules.referenced - rules.defined.keys())
    if missing:
        raise GrammarError(f"undefined rule {missing[0]!r}")
    if "root" not in rules.defined:
        raise GrammarError("the grammar has no 'root' rule")
    recursive = _left_recursive(rules.defined)
    if recursive:
        raise GrammarError(f"rule {recursive!r} is left-recursive, which llama.cpp cannot run")


def _left_recursive(defined: dict[str, list[list[tuple[str | None, bool]]]]) -> str | None:
    """The first rule that can reach itself before consuming any character, as llama.cpp refuses."""
    empty: dict[str, bool] = dict.fromkeys(defined, False)
    changed = True
    while changed:
        changed = False
        for name, alts in defined.items():
            if not empty[name] and any(all(opt or (ref is not None and empty[ref]) for ref, opt in a) for a in alts):
                empty[name] = changed = True
    firsts: dict[str, set[str]] = {}
    for name, alts in defined.items():
        heads: set[str] = set()
        for alt in alts:
            for ref, opt in alt:
                if ref is not None:
                    heads.add(ref)
                if not (opt or (ref is not None and empty[ref])):
                    break
        firsts[name] = heads
    for start in (n for n in defined if not n.startswith("(")):
        seen: set[str] = set()
        todo = list(firsts[start])
        while todo:
            ref = todo.pop()
            if ref == start:
                return start
            if ref not in seen:
                seen.add(ref)
                todo.extend(firsts.get(ref, ()))
    return None
