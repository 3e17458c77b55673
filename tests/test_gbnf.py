"""The GBNF check: linear in the grammar's size, capped, and the same verdicts as the textbook algorithm."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.server.adversarial import big_grammar, chain_grammar
from tokenmill import gbnf

Alts = list[list[tuple[str | None, bool]]]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("text", "what"), [(chain_grammar(2000), "2,000 rules"), (big_grammar(256), "256 KiB")])
def test_large_grammars_are_checked_in_linear_time(text: str, what: str) -> None:
    """A hang guard only (the figures are printed by benchmarks/adversarial_batches.py): 2,000 chained rules
    took 2 s and a 256 KiB grammar about 95 s with the quadratic check."""
    started = time.perf_counter()
    gbnf.check_grammar(text, max_chars=None)
    assert time.perf_counter() - started < 5, what


def test_a_left_recursive_rule_at_the_end_of_a_long_chain_is_found() -> None:
    text = chain_grammar(3000).replace('r2999 ::= "x"?', "r2999 ::= r5 r2999")
    with pytest.raises(gbnf.GrammarError, match="rule 'r5' is left-recursive"):
        gbnf.check_grammar(text, max_chars=None)


def test_groups_nested_600_deep_are_refused_not_a_recursion_error() -> None:
    text = "root ::= " + "(" * 600 + '"a"' + ")" * 600 + "\n"
    with pytest.raises(gbnf.GrammarError, match=f"groups nested more than {gbnf.MAX_NESTING} deep"):
        gbnf.check_grammar(text, max_chars=None)
    gbnf.check_grammar("root ::= " + "(" * gbnf.MAX_NESTING + '"a"' + ")" * gbnf.MAX_NESTING + "\n")


def test_a_grammar_over_the_cap_is_refused_before_it_is_parsed() -> None:
    text = big_grammar(gbnf.MAX_GRAMMAR_CHARS // 1024 + 1)
    with pytest.raises(gbnf.GrammarError, match="the grammar is longer than 64 KiB"):
        gbnf.check_grammar(text)


def quadratic_left_recursive(defined: dict[str, Alts]) -> str | None:
    """The check as it was (a fixpoint and a search from every rule): the oracle for the linear one."""
    empty = dict.fromkeys(defined, False)
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


NAMES = ["root", "a", "b", "c", "d"]
item = st.one_of(
    st.sampled_from(['"x"', "[a-z]", '"y"?', "."]),
    st.sampled_from(NAMES),
    st.builds(lambda n, r: n + r, st.sampled_from(NAMES), st.sampled_from(["?", "*", "+", "{0,2}", "{1}"])),
    st.builds(lambda n, m: f"({n} | {m})", st.sampled_from(NAMES), st.sampled_from(['"x"', "a", "b?", ""])),
)
# half the alternatives start with a character, so about as many grammars pass as are left-recursive
alternative = st.tuples(st.sampled_from(["", '"h" ']), st.lists(item, min_size=1, max_size=4).map(" ".join))
rule = st.lists(alternative.map("".join), min_size=1, max_size=3).map(" | ".join)


@settings(max_examples=300, deadline=None)
@given(bodies=st.fixed_dictionaries({n: rule for n in NAMES}))
def test_the_linear_check_agrees_with_the_quadratic_one(bodies: dict[str, str]) -> None:
    text = "".join(f"{name} ::= {body}\n" for name, body in bodies.items())
    rules = gbnf._Parser(text).parse()
    assert gbnf._left_recursive(rules.defined) == quadratic_left_recursive(rules.defined), text
