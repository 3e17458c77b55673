"""schemathesis over the app's own OpenAPI document, with a key and without: malformed requests get a 4xx,
never a 5xx, and a caller without a key gets a 401 from every route but the open ones, never data."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, settings

from tests.conftest import API_KEYS, InProcessServer
from tokenmill.config import Settings
from tokenmill.server.app import create_app
from tokenmill.server.gate import OPEN_PATHS

schema = schemathesis.openapi.from_dict(create_app(Settings(database_url="sqlite:///:memory:")).openapi())
ERROR_FIELDS = {"message", "type", "param", "code"}


@schema.parametrize()
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_makes_the_server_fail(case: schemathesis.Case, fuzz_server: InProcessServer) -> None:
    response = case.call(base_url=fuzz_server.url, headers={"Authorization": f"Bearer {API_KEYS[0]}"}, timeout=30)
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
    if response.status_code >= 400 and case.path.startswith("/v1/"):
        assert set(response.json()["error"]) == ERROR_FIELDS
    if case.path.startswith("/v1/"):
        assert response.status_code != 422  # OpenAI answers a malformed request 400


@schema.parametrize()
@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
def test_without_a_key_every_tenant_route_is_a_401(case: schemathesis.Case, fuzz_server: InProcessServer) -> None:
    headers = dict(case.headers or {})
    headers.pop("Authorization", None)
    response = case.call(base_url=fuzz_server.url, headers=headers, timeout=30)
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
    if case.path in OPEN_PATHS:  # liveness only: no tenant data, no infrastructure names
        assert response.json() == {"status": "ok"} if response.status_code == 200 else response.status_code < 500
    else:
        assert response.status_code == 401, (case.method, case.path, response.status_code, response.text[:300])
        assert set(response.json()["error"]) == ERROR_FIELDS
