"""Property-based fuzzing of the real server from its own ``/openapi.json`` (schemathesis): no
generated request, valid or not, gets a 5xx, and the engine serves an ordinary request after.

Bounded: a fixed number of examples per operation, no shrinking past a deadline, the server on
127.0.0.1 with a small model and small ``max_tokens`` limits enforced by the schema itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from server_harness import MODEL_NAME, LiveServer, live_server

# Examples per operation: enough to hit every route with odd shapes, small enough for CI.
EXAMPLES = 25


@pytest.fixture(scope="module")
def fuzzed_server(checkpoints: dict[str, Path]) -> Iterator[LiveServer]:
    with live_server(checkpoints["llama"], api_key="fuzz-key") as server:
        yield server


@pytest.fixture(scope="module")
def api_schema(fuzzed_server: LiveServer) -> schemathesis.BaseSchema:
    schema = schemathesis.openapi.from_url(
        f"{fuzzed_server.base_url}/openapi.json", headers={"Authorization": "Bearer fuzz-key"}
    )
    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
def test_no_generated_request_gets_a_5xx(
    case: schemathesis.Case, fuzzed_server: LiveServer
) -> None:
    headers = {"Authorization": "Bearer fuzz-key"}
    # Generated completions may ask for many tokens: keep each call short in time.
    if isinstance(case.body, dict):
        for field in ("max_tokens", "max_completion_tokens"):
            if isinstance(case.body.get(field), int) and case.body[field] > 8:
                case.body[field] = 8
        if isinstance(case.body.get("n"), int) and case.body["n"] > 2:
            case.body["n"] = 2
    response = case.call(headers=headers, timeout=30)
    assert response.status_code < 500, (response.status_code, response.text[:500])


def test_the_engine_serves_after_the_fuzzing(fuzzed_server: LiveServer) -> None:
    with fuzzed_server.http() as http:
        assert http.get("/health").status_code == 200
    client = fuzzed_server.client(api_key="fuzz-key")
    out = client.completions.create(model=MODEL_NAME, prompt="def add(a, b):", max_tokens=4)
    assert out.choices[0].finish_reason in ("length", "stop")
