"""Rows and their sampling parameters survive the store: every field, and a field added later, round-trip."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from tokenmill.rows import CHAT, DatasetRow, SamplingParams


@dataclass(frozen=True)
class _Extended(SamplingParams):
    """SamplingParams as it will be once someone adds fields: nothing else may need editing."""

    beams: int = 1
    tags: tuple[str, ...] = ()
    pairs: tuple[tuple[int, float], ...] = ()
    note: str | None = None
    scale: float = 1.0


def _through_json(data: dict[str, Any]) -> dict[str, Any]:
    return dict(json.loads(json.dumps(data)))


def test_a_field_added_to_sampling_params_round_trips_without_a_second_list() -> None:
    params = _Extended(max_tokens=9, beams=3, tags=("a", "b"), pairs=((5, -1.5),), note="x", scale=2.0)
    stored = _through_json(params.to_json())
    assert {"beams", "tags", "pairs", "note", "scale"} <= stored.keys()
    assert _Extended.from_json(stored) == params


def test_defaults_are_not_stored_so_old_payloads_keep_their_shape() -> None:
    assert set(_Extended().to_json()) == {"max_tokens", "temperature", "top_p", "stop", "seed"}


_VALUES: dict[str, Any] = {
    "max_tokens": 7,
    "temperature": 0.25,
    "top_p": 0.5,
    "stop": ("\n\n", "END"),
    "seed": 11,
    "presence_penalty": 1.5,
    "frequency_penalty": -0.5,
    "repetition_penalty": 1.2,
    "top_k": 40,
    "min_p": 0.1,
    "logit_bias": ((13, 2.5), (50256, -100.0)),
    "logprobs": 3,
    "grammar": 'root ::= "a"',
    "n": 4,
    "json_schema": '{"type":"object"}',
    "tools": '{"tools":[],"choice":"auto","name":null,"parallel":true,"max_calls":null}',
}


def test_every_sampling_field_round_trips_through_a_stored_payload() -> None:
    names = {f.name for f in fields(SamplingParams)}
    assert names == set(_VALUES), "give the new field a non-default value here"
    params = SamplingParams(**_VALUES)
    row = DatasetRow(3, "c", CHAT, messages=({"role": "user", "content": "hi"},), params=params)
    again = DatasetRow.from_payload(3, "c", _through_json(row.to_payload()))
    assert again == row and again.params == params


@given(
    temperature=st.sampled_from([0, 0.0, 1, 1.5]),
    bias=st.lists(st.tuples(st.integers(0, 10**6), st.floats(-100, 100)), max_size=3),
)
def test_integral_json_numbers_load_as_the_same_params_and_payload(temperature: float, bias: list[Any]) -> None:
    """A float field stored as 0 (not 0.0) must load to params whose payload, so cache key, is unchanged."""
    stored = _through_json(
        {"max_tokens": 4, "temperature": temperature, "top_p": 1, "stop": [], "seed": None, "logit_bias": bias}
    )
    params = SamplingParams.from_json(stored)
    assert isinstance(params.temperature, float) and isinstance(params.top_p, float)
    assert SamplingParams.from_json(_through_json(params.to_json())) == params
    assert json.dumps(_through_json(params.to_json())) == json.dumps(params.to_json())
