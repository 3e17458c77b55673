"""Structured output at submit time: JSON schema → GBNF, and a GBNF check that needs no model.

A schema or grammar that llama.cpp cannot compile must fail its line before any model loads, and the
submitting host may have neither the model nor llama.cpp initialised (it must not touch ggml in a parent
that forks). So the grammar is checked here by a parser that follows llama.cpp's own
(``llama-grammar.cpp``: rules, literals, classes, groups, repetitions, undefined rules, a ``root`` rule,
left recursion), and schemas are converted by llama-cpp-python's pure-Python converter, loaded from its
file so the native library is not loaded. The worker still compiles the grammar with llama.cpp and fails
the row (never falls back to unconstrained) if that disagrees.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from types import ModuleType
from typing import Any

MAX_REPETITIONS = 2000  # llama.cpp's MAX_REPETITION_THRESHOLD
MAX_GRAMMAR_CHARS = 64 * 1024  # a user's grammar, or the one a response_format schema converts to
MAX_NESTING = 100  # parentheses inside parentheses; llama.cpp's parser recurses (in C++) per level
_HEX = {"x": 2, "u": 4, "U": 8}
_ESCAPES = {"t": "\t", "r": "\r", "n": "\n", "\\": "\\", '"': '"', "[": "[", "]": "]", "-": "-"}


class GrammarError(ValueError):
    """The grammar or schema cannot be compiled; the message is one line."""


@lru_cache(maxsize=1)
def _converter() -> ModuleType:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise GrammarError("llama-cpp-python is not installed; it converts JSON schemas to grammars")
    path = f"{next(iter(spec.submodule_search_locations))}/llama_grammar.py"
    loader = importlib.util.spec_from_file_location("tokenmill._llama_grammar", path)
    if loader is None or loader.loader is None:
        raise GrammarError("llama-cpp-python's llama_grammar.py was not found")
    module = importlib.util.module_from_spec(loader)
    sys.modules.setdefault("tokenmill._llama_grammar", module)
    loader.loader.exec_module(module)
    return module


def json_grammar() -> str:
    """Any JSON object: what ``{"type": "json_object"}`` without a schema asks for."""
    return str(_converter().JSON_GBNF)


@lru_cache(maxsize=256)
def _schema_text_to_gbnf(text: str) -> str:
    try:
        grammar = str(_converter().json_schema_to_gbnf(text))
    except GrammarError:
        raise
    except RecursionError:
        raise GrammarError("the schema is nested too deeply to convert") from None
    except Exception as exc:  # the converter asserts and raises bare errors on what it cannot express
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise GrammarError(f"the schema cannot be turned into a grammar: {detail}") from None
    check_grammar(grammar)
    return grammar


def schema_to_gbnf(schema: dict[str, Any]) -> str:
    """The GBNF llama.cpp constrains decoding with; GrammarError when the schema cannot be expressed."""
    try:
        text = json.dumps(schema, sort_keys=False, ensure_ascii=False)
    except (RecursionError, ValueError):
        raise GrammarError("the schema is nested too deeply to convert") from None
    return _schema_text_to_gbnf(text)


Alts = list[list[tuple[str | None, bool]]]  # a rule's alternatives: (referenced rule or None, may be empty)


@dataclass
class _Rules:
    """Per rule: its alternatives, each the (referenced rule or None for a terminal, may-be-empty) items."""

    defined: dict[str, Alts] = field(default_factory=dict)
    referenced: set[str] = field(default_factory=set)
    generated: int = 0


class _Parser:
    def __init__(self, text: str) -> None:
        self.s = text
        self.rules = _Rules()
        self.depth = 0

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
        match = _NAME.match(self.s, pos)
        if match is None:
            raise self.fail("expecting a rule name", pos)
        return match.end()

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
        alts: Alts = []
        pos = self.sequence(pos, alts, nested)
        while pos < len(self.s) and self.s[pos] == "|":
            pos = self.sequence(self.space(pos + 1, True), alts, nested)
        self.rules.defined.setdefault(rule, []).extend(alts)
        return pos

    def sequence(self, pos: int, alts: Alts, nested: bool) -> int:
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
            elif c in _WORD:
                end = self.name(pos)
                self.rules.referenced.add(s[pos:end])
                items.append((s[pos:end], False))
                pos = end
            elif c == "(":
                if self.depth >= MAX_NESTING:
                    raise self.fail(f"groups nested more than {MAX_NESTING} deep", pos)
                self.rules.generated += 1
                sub = f"({self.rules.generated})"
                self.depth += 1
                pos = self.alternates(self.space(pos + 1, True), sub, nested=True)
                self.depth -= 1
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


_NAME = re.compile(r"[A-Za-z0-9-]+")
_WORD = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")


@lru_cache(maxsize=256)
def check_grammar(text: str, max_chars: int | None = MAX_GRAMMAR_CHARS) -> None:
    """Raise GrammarError unless llama.cpp's parser would accept ``text`` with a ``root`` rule.

    Linear in the grammar's size, and capped (``max_chars``): every line may carry its own grammar.
    """
    if max_chars is not None and len(text) > max_chars:
        raise GrammarError(f"the grammar is longer than {max_chars // 1024} KiB ({len(text) // 1024} KiB)")
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


def _left_recursive(defined: dict[str, Alts]) -> str | None:
    """The first rule that can reach itself before consuming any character, as llama.cpp refuses.

    Linear in the grammar's size: which rules can match nothing (:func:`_nullable`), then each rule's
    possible first references, then the strongly connected components of that graph; a rule in a
    component with a cycle reaches itself. Generated rules (groups) sit on a cycle only with a named
    rule, which is the one named.
    """
    empty = _nullable(defined)
    firsts: dict[str, list[str]] = {}
    for name, alts in defined.items():
        heads: list[str] = []
        for alt in alts:
            for ref, opt in alt:
                if ref is not None:
                    heads.append(ref)
                if not (opt or (ref is not None and ref in empty)):
                    break
        firsts[name] = heads
    cyclic = _cyclic_nodes(firsts)
    return next((n for n in defined if n in cyclic and not n.startswith("(")), None)


def _nullable(defined: dict[str, Alts]) -> set[str]:
    """Rules that can match the empty string: a worklist, each reference visited once.

    An alternative waits on its required references; when the last of them turns out nullable, so
    does its rule. (The textbook fixpoint re-scans every rule per round: quadratic in a long chain.)
    """
    waiting: list[int] = []  # per alternative: required references not yet known nullable
    owner: list[str] = []
    users: dict[str, list[int]] = {}
    todo: list[str] = []
    empty: set[str] = set()
    for name, alts in defined.items():
        for alt in alts:
            if any(ref is None and not opt for ref, opt in alt):
                continue  # a required terminal: this alternative never matches nothing
            required = [ref for ref, opt in alt if ref is not None and not opt]
            index = len(waiting)
            waiting.append(len(required))
            owner.append(name)
            for ref in required:
                users.setdefault(ref, []).append(index)
            if not required and name not in empty:
                empty.add(name)
                todo.append(name)
    while todo:
        for index in users.get(todo.pop(), ()):
            waiting[index] -= 1
            if waiting[index] == 0 and owner[index] not in empty:
                empty.add(owner[index])
                todo.append(owner[index])
    return empty


def _cyclic_nodes(graph: dict[str, list[str]]) -> set[str]:
    """Nodes on a cycle: Tarjan's strongly connected components, iterative (no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: set[str] = set()
    for root in graph:
        if root in index:
            continue
        work: list[tuple[str, int]] = [(root, 0)]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, i = work[-1]
            edges = graph.get(node, [])
            if i < len(edges):
                work[-1] = (node, i + 1)
                nxt = edges[i]
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in edges:
                    out.update(component)
    return out
