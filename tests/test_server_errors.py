"""Bad input gets the right 4xx with OpenAI's error body; engine failures never hang clients."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from server_harness import MAX_MODEL_LEN, MODEL_NAME, LiveServer, live_server

from tierkv.engine.async_engine import MAX_CONSECUTIVE_FAILURES

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LONG_PROMPT = "def add(a, b):\n" * 60  # several hundred tokens, more than MAX_MODEL_LEN
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def server(checkpoints: dict[str, Path]) -> Iterator[LiveServer]:
    with live_server(checkpoints["llama"], api_key=KEY) as s:
        yield s


# (case, path, body: JSON-able or raw bytes, headers, status, expected "param" or None)
CASES: list[tuple[str, str, Any, dict[str, str], int, str | None]] = [
    ("malformed json", COMPLETIONS, b'{"prompt": "hi", ', AUTH, 400, None),
    ("body not an object", COMPLETIONS, b"[1, 2, 3]", AUTH, 400, None),
    ("missing prompt", COMPLETIONS, {"max_tokens": 3}, AUTH, 400, "prompt"),
    ("prompt wrong type", COMPLETIONS, {"prompt": 42}, AUTH, 400, "prompt"),
    ("max_tokens wrong type", COMPLETIONS, {"prompt": "hi", "max_tokens": "many"}, AUTH, 400,
     "max_tokens"),
    ("temperature wrong type", COMPLETIONS, {"prompt": "hi", "temperature": "hot"}, AUTH, 400,
     "temperature"),
    ("negative max_tokens", COMPLETIONS, {"prompt": "hi", "max_tokens": -5}, AUTH, 400, None),
    ("zero max_tokens", COMPLETIONS, {"prompt": "hi", "max_tokens": 0}, AUTH, 400, None),
    ("huge max_tokens", COMPLETIONS, {"prompt": "hi", "max_tokens": 10**9}, AUTH, 400,
     "max_tokens"),
    ("negative temperature", COMPLETIONS, {"prompt": "hi", "temperature": -0.5}, AUTH, 400, None),
    ("top_p above one", COMPLETIONS, {"prompt": "hi", "top_p": 1.5}, AUTH, 400, None),
    ("n zero", COMPLETIONS, {"prompt": "hi", "n": 0}, AUTH, 400, "n"),
    ("too many logprobs", COMPLETIONS, {"prompt": "hi", "logprobs": 1000}, AUTH, 400, "logprobs"),
    ("empty prompt", COMPLETIONS, {"prompt": ""}, AUTH, 400, "prompt"),
    ("empty prompt list", COMPLETIONS, {"prompt": []}, AUTH, 400, "prompt"),
    ("token id out of vocab", COMPLETIONS, {"prompt": [1, 2, 10**6]}, AUTH, 400, None),
    ("negative token id", COMPLETIONS, {"prompt": [[5, -1]]}, AUTH, 400, None),
    ("unknown kv_policy", COMPLETIONS, {"prompt": "hi", "kv_policy": "nonsense"}, AUTH, 400, None),
    ("unknown model", COMPLETIONS, {"prompt": "hi", "model": "gpt-9"}, AUTH, 404, "model"),
    ("empty messages", CHAT, {"messages": []}, AUTH, 400, "messages"),
    ("messages wrong type", CHAT, {"messages": "hello"}, AUTH, 400, "messages"),
    ("unknown role", CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, AUTH, 400,
     "messages"),
    ("image content", CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     AUTH, 400, "messages[0].content"),
    ("top_logprobs without logprobs", CHAT, {"messages": HELLO, "top_logprobs": 2}, AUTH, 400,
     "top_logprobs"),
    ("huge max_completion_tokens", CHAT, {"messages": HELLO, "max_completion_tokens": 10**6},
     AUTH, 400, "max_completion_tokens"),
    ("chat unknown model", CHAT, {"messages": HELLO, "model": "nope"}, AUTH, 404, "model"),
    ("missing api key", COMPLETIONS, {"prompt": "hi"}, {}, 401, None),
    ("wrong api key", COMPLETIONS, {"prompt": "hi"}, {"Authorization": "Bearer nope"}, 401, None),
    ("wrong auth scheme", COMPLETIONS, {"prompt": "hi"}, {"Authorization": f"Basic {KEY}"}, 401,
     None),
    ("models without key", "/v1/models", None, {}, 401, None),
    ("unknown route", "/v1/engines", None, AUTH, 404, None),
]  # fmt: skip


def _assert_openai_error(body: dict[str, Any]) -> dict[str, Any]:
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    return error


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "param"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_bad_input_gets_openai_error(
    server: LiveServer,
    path: str,
    body: Any,
    headers: dict[str, str],
    status: int,
    param: str | None,
) -> None:
    with server.http() as http:
        if body is None:
            response = http.get(path, headers=headers)
        else:
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers = {**headers, "Content-Type": "application/json"}
            response = http.post(path, content=raw, headers=headers)
        assert response.status_code == status, response.text
        error = _assert_openai_error(response.json())
        if param is not None:
            assert error["param"] == param
        assert http.get("/health").status_code == 200


def test_too_long_prompt_states_both_numbers(server: LiveServer) -> None:
    with server.client(KEY) as client, pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL_NAME, prompt=LONG_PROMPT, max_tokens=4)
    tokens = len(server.engine.tokenizer.encode(LONG_PROMPT))
    assert tokens > MAX_MODEL_LEN
    message = info.value.message
    assert str(tokens) in message and str(MAX_MODEL_LEN) in message


def test_official_client_sees_typed_errors(server: LiveServer) -> None:
    with server.client(KEY) as client:
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=MODEL_NAME, prompt="hi", temperature=-1)
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="missing", messages=HELLO)
        # The stream never starts: the error comes back as a plain 400.
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=MODEL_NAME, prompt=[10**6], stream=True)
        # Unknown fields are ignored.
        out = client.completions.create(
            model=MODEL_NAME, prompt="hi", max_tokens=2, extra_body={"no_such_field": 1}
        )
        assert out.choices[0].finish_reason in {"stop", "length"}
    with server.client("wrong") as client, pytest.raises(openai.AuthenticationError):
        client.models.list()


class _FailingSteps:
    """Replaces ``Engine.step`` so that the next ``times`` steps raise."""

    def __init__(self, server: LiveServer, times: int) -> None:
        self.step = server.engine.step
        self.times = times

    def __call__(self) -> Any:
        if self.times > 0:
            self.times -= 1
            raise RuntimeError("injected step failure")
        return self.step()


def test_failing_step_fails_its_requests_only(
    checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    with live_server(checkpoints["llama"]) as server, server.client() as client:
        monkeypatch.setattr(server.engine, "step", _FailingSteps(server, 1))
        with pytest.raises(openai.InternalServerError) as info:
            client.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=3)
        assert info.value.type == "internal_error" and "injected" in info.value.message

        monkeypatch.setattr(server.engine, "step", _FailingSteps(server, 1))
        with pytest.raises(openai.APIError, match="injected"):
            list(client.completions.create(model=MODEL_NAME, prompt="hi", stream=True))

        out = client.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=3)
        assert out.choices[0].finish_reason in {"stop", "length"}
        assert server.metrics()['tierkv:requests_finished_total{finish_reason="error"}'] == 2
        with server.http() as http:
            assert http.get("/health").status_code == 200


def test_broken_engine_turns_health_to_503(
    checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    with live_server(checkpoints["llama"]) as server, server.client() as client:
        monkeypatch.setattr(server.engine, "step", _FailingSteps(server, 10**9))
        for _ in range(MAX_CONSECUTIVE_FAILURES):
            started = time.monotonic()
            with pytest.raises(openai.APIStatusError) as info:
                client.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=3)
            assert info.value.status_code in {500, 503}
            assert time.monotonic() - started < 10
        with server.http() as http:
            response = http.get("/health")
            assert response.status_code == 503
            _assert_openai_error(response.json())
        with pytest.raises(openai.APIStatusError) as info:
            client.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=3)
        assert info.value.status_code == 503


def test_one_bad_prompt_in_a_list_queues_none(server: LiveServer) -> None:
    with server.http() as http:
        body = {"prompt": [[5, 6, 7], [5, 10**6]], "max_tokens": 200, "ignore_eos": True}
        response = http.post(COMPLETIONS, json=body, headers=AUTH)
        assert response.status_code == 400
        assert str(10**6) in _assert_openai_error(response.json())["message"]
    deadline = time.monotonic() + 10
    metrics = server.metrics()
    while metrics["tierkv:num_requests_running"] or metrics["tierkv:num_requests_waiting"]:
        assert time.monotonic() < deadline, metrics
        time.sleep(0.05)
        metrics = server.metrics()
    assert metrics["tierkv:kv_pages_free"] == metrics["tierkv:kv_pages_total"]
