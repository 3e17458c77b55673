"""Reading a caller from an Authorization header: any header at all gives a caller or a one-line refusal,
never an exception, and only a configured key, exactly, gives a caller."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.config import Settings
from tokenmill.errors import ConfigError
from tokenmill.server.auth import OPEN, Caller, check_bind, identify, tenant_of
from tokenmill.store.tables import OPERATOR

KEYED = Settings(database_url="sqlite:///:memory:", api_keys=("sk-team-a", "sk-team-b"), admin_keys=("sk-ops",))
KEYS = {"sk-team-a", "sk-team-b", "sk-ops"}


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_each_kind_of_key_is_its_own_caller() -> None:
    a = identify(KEYED, "Bearer sk-team-a")
    assert a == Caller(tenant_of("sk-team-a"), operator=False) and "sk-team-a" not in a.owner
    assert identify(KEYED, "bearer  sk-team-b ") == Caller(tenant_of("sk-team-b"), operator=False)
    assert identify(KEYED, "Bearer sk-ops") == Caller(OPERATOR, operator=True)
    assert identify(KEYED, basic("anyone", "sk-team-a"), basic=True) == a  # the dashboard's login box
    assert identify(KEYED, basic("sk-team-a", ""), basic=True) == a
    assert isinstance(identify(KEYED, basic("anyone", "sk-team-a")), str)  # Basic only where it is asked for
    for refused in ("", "Bearer", "Bearer ", "Token sk-team-a", "Bearer sk-team-a2", "Bearer SK-TEAM-A"):
        assert isinstance(identify(KEYED, refused, basic=True), str), refused
    assert identify(Settings(database_url="sqlite:///:memory:"), "") == OPEN  # no keys: open, one owner


HEADERS = st.one_of(
    st.text(max_size=80),
    st.builds(lambda s: "Bearer " + s, st.text(max_size=40)),
    st.builds(basic, st.text(max_size=20), st.sampled_from(["", *KEYS]) | st.text(max_size=20)),
    st.builds(lambda b: "Basic " + base64.b64encode(b).decode(), st.binary(max_size=40)),
    st.sampled_from([f"{scheme} {key}" for scheme in ("Bearer", "bearer", "BEARER") for key in KEYS]),
)


@given(header=HEADERS)
@settings(max_examples=400, deadline=None)
def test_any_header_is_a_caller_only_when_it_carries_a_configured_key(header: str) -> None:
    who = identify(KEYED, header, basic=True)
    if isinstance(who, Caller):
        scheme, _, rest = header.partition(" ")
        given_key = rest.strip()
        if scheme.lower() == "basic":
            user, _, password = base64.b64decode(given_key).decode().partition(":")
            given_key = password or user
        assert given_key in KEYS
    else:
        assert who and "\n" not in who


def test_a_network_bind_needs_a_key_of_either_kind() -> None:
    with pytest.raises(ConfigError, match=r"refusing to listen on 0\.0\.0\.0"):
        check_bind("0.0.0.0", ())
    check_bind("0.0.0.0", KEYED.admin_keys)
    check_bind("127.0.0.1", ())


def test_admin_keys_come_from_the_environment_and_are_never_printed() -> None:
    s = Settings.from_env({"TOKENMILL_API_KEYS": "sk-a, sk-b", "TOKENMILL_ADMIN_KEYS": "sk-ops"})
    assert s.api_keys == ("sk-a", "sk-b") and s.admin_keys == ("sk-ops",) and s.keyed
    assert "sk-ops" not in repr(s) and "sk-a" not in repr(s)
    assert not Settings.from_env({}).keyed
