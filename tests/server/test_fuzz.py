"""schemathesis over the app's own OpenAPI document: malformed requests get a 4xx, never a 5xx."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, settings

from tests.conftest import API_KEYS, InProcessServer
from tokenmill.config import Settings
from tokenmill.server.app import create_app

schema = schemathesis.openapi.from_dict(create_app(Settings(database_url="sqlite:///:memory:")).openapi())


@schema.parametrize()
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_makes_the_server_fail(case: schemathesis.Case, fuzz_server: InProcessServer) -> None:
    response = case.call(base_url=fuzz_server.url, headers={"Authorization": f"Bearer {API_KEYS[0]}"}, timeout=30)
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
    if response.status_code >= 400 and case.path.startswith("/v1/"):
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
