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
from hypothesis import HealthCheck, Phase, given, settings
from server_harness import MODEL_NAME, LiveServer, live_server

# Examples per operation: enough to hit every route with odd shapes, small enough for CI.
EXAMPLES = 25


@pytest.fixture(scope="module")
def fuzzed_server(checkpoints: dict[str, Path]) -> Iterator[LiveServer]:
    with live_server(checkpoints["llama"], api_key="fuzz-key") as server:
        yield server


def _fuzz(case: schemathesis.Case) -> None:
    """Send one generated request; anything but a 5xx is an answer."""
    # Generated completions may ask for many tokens: keep each call short in time.
    if isinstance(case.body, dict):
        for field in ("max_tokens", "max_completion_tokens"):
            if isinstance(case.body.get(field), int) and case.body[field] > 8:
                case.body[field] = 8
        if isinstance(case.body.get("n"), int) and case.body["n"] > 2:
            case.body["n"] = 2
    response = case.call(headers={"Authorization": "Bearer fuzz-key"}, timeout=30)
    assert response.status_code < 500, (case.method, case.path, response.text[:500])


def test_no_generated_request_gets_a_5xx(fuzzed_server: LiveServer) -> None:
    """Every operation of the schema, ``EXAMPLES`` generated cases each. Driven through
    hypothesis directly rather than schemathesis's pytest plugin, which follows pytest's
    private API and breaks with new pytest releases."""
    schema = schemathesis.openapi.from_url(
        f"{fuzzed_server.base_url}/openapi.json", headers={"Authorization": "Bearer fuzz-key"}
    )
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 6  # the OpenAI routes, tokenize, detokenize, version, models...
    for operation in operations:
        run = settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )(given(operation.as_strategy())(_fuzz))
        run()


def test_the_engine_serves_after_the_fuzzing(fuzzed_server: LiveServer) -> None:
    with fuzzed_server.http() as http:
        assert http.get("/health").status_code == 200
    client = fuzzed_server.client(api_key="fuzz-key")
    out = client.completions.create(model=MODEL_NAME, prompt="def add(a, b):", max_tokens=4)
    assert out.choices[0].finish_reason in ("length", "stop")
