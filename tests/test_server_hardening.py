"""Hostile requests, table-driven, against the real server: each gets its 4xx with OpenAI's
error body (or a documented 2xx), and after each one ``/health`` is 200 and an innocent
request sent beside it completes. The request that used to kill the engine is in the table,
and is sent more times in a row than the engine's failure limit.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from server_harness import TIMEOUT, LiveServer, live_server

from tierkv import SamplingParams
from tierkv.engine.async_engine import MAX_CONSECUTIVE_FAILURES
from tierkv.server import fields
from tierkv.server.protocol import CompletionRequest
from tierkv.tokenizer import Tokenizer

CMPL = "/v1/completions"
CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "Hello"}]
SURROGATE = '"abc\\ud800"'  # JSON text: the escape decodes to a lone surrogate
KILLER = '{"prompt": "hi", "max_tokens": 2, "top_k": 1180591620717411303424, "top_p": 0.5}'
INT64_MAX = 2**63 - 1


def _hi(extra: str, max_tokens: int = 2) -> str:
    """A completions body (raw JSON, so ``1e309``, ``NaN`` and escapes go out as written)."""
    return f'{{"prompt": "hi", "max_tokens": {max_tokens}, {extra}}}'


def _chat(extra: str) -> str:
    return f'{{"messages": [{{"role": "user", "content": "hi"}}], "max_tokens": 2, {extra}}}'


# (case, path, raw JSON body, status, expected "param" or None)
CASES: list[tuple[str, str, str, int, str | None]] = [
    *[(f"engine killer #{i}", CMPL, KILLER, 400, "top_k")
      for i in range(MAX_CONSECUTIVE_FAILURES + 2)],
    ("top_k int64 max: clamped to the vocabulary", CMPL, _hi(f'"top_k": {INT64_MAX}'), 200, None),
    ("top_k below -1", CMPL, _hi('"top_k": -2'), 400, "top_k"),
    ("lone surrogate prompt", CMPL, f'{{"prompt": {SURROGATE}}}', 400, "prompt"),
    ("lone surrogate in a prompt list", CMPL, f'{{"prompt": ["ok", {SURROGATE}]}}', 400, "prompt"),
    ("lone surrogate stop", CMPL, _hi(f'"stop": [{SURROGATE}]'), 400, "stop"),
    ("lone surrogate chat", CHAT, f'{{"messages": [{{"role": "user", "content": {SURROGATE}}}]}}',
     400, "messages"),
    ("lone surrogate chat part", CHAT,
     f'{{"messages": [{{"role": "user", "content": [{{"type": "text", "text": {SURROGATE}}}]}}]}}',
     400, "messages"),
    ("temperature 1e309", CMPL, _hi('"temperature": 1e309'), 400, "temperature"),
    ("temperature -1e309", CMPL, _hi('"temperature": -1e309'), 400, "temperature"),
    ("temperature string inf", CMPL, _hi('"temperature": "inf"'), 400, "temperature"),
    ("temperature NaN", CMPL, _hi('"temperature": NaN'), 400, "temperature"),
    ("temperature Infinity", CMPL, _hi('"temperature": Infinity'), 400, "temperature"),
    ("temperature true", CMPL, _hi('"temperature": true'), 400, "temperature"),
    ("temperature negative", CMPL, _hi('"temperature": -0.5'), 400, "temperature"),
    ("temperature tiny", CMPL, _hi('"temperature": 1e-30'), 200, None),
    ("temperature huge but finite", CMPL, _hi('"temperature": 1e300'), 200, None),
    ("chat temperature 1e309", CHAT, _chat('"temperature": 1e309'), 400, "temperature"),
    ("repetition_penalty 1e309", CMPL, _hi('"repetition_penalty": 1e309'), 400,
     "repetition_penalty"),
    ("repetition_penalty zero", CMPL, _hi('"repetition_penalty": 0'), 400, "repetition_penalty"),
    ("repetition_penalty huge but finite", CMPL, _hi('"repetition_penalty": 1e308'), 200, None),
    ("presence_penalty NaN", CMPL, _hi('"presence_penalty": NaN'), 400, "presence_penalty"),
    ("frequency_penalty 3", CMPL, _hi('"frequency_penalty": 3'), 400, "frequency_penalty"),
    ("top_p NaN", CMPL, _hi('"top_p": NaN'), 400, "top_p"),
    ("top_p zero", CMPL, _hi('"top_p": 0'), 400, "top_p"),
    ("min_p 1e309", CMPL, _hi('"min_p": 1e309'), 400, "min_p"),
    ("token ids as booleans", CMPL, '{"prompt": [true, false]}', 400, "prompt"),
    # Found by schemathesis: echo decoded ids before the engine's vocabulary check.
    ("echoed id past the vocab", CMPL, '{"prompt": [4294967296], "echo": true}', 400, "prompt"),
    ("echoed negative id", CMPL, '{"prompt": [-3], "echo": true}', 400, "prompt"),
    ("token ids as floats", CMPL, '{"prompt": [[1, 2.5]]}', 400, "prompt"),
    ("token id wider than int64", CMPL, f'{{"prompt": [1, {2**70}]}}', 400, None),
    ("seed negative", CMPL, _hi('"seed": -1'), 400, "seed"),
    ("seed 2**64", CMPL, _hi(f'"seed": {2**64}'), 400, "seed"),
    ("seed 1e30 as integer", CMPL, _hi(f'"seed": {10**30}'), 400, "seed"),
    ("seed int64 max with n 3", CMPL, _hi(f'"seed": {INT64_MAX}, "n": 3, "temperature": 1'),
     200, None),
    ("chat seed 2**64", CHAT, _chat(f'"seed": {2**64}'), 400, "seed"),
    ("max_tokens 2**64", CMPL, '{"prompt": "hi", "max_tokens": 18446744073709551616}', 400,
     "max_tokens"),
    ("max_tokens true", CMPL, '{"prompt": "hi", "max_tokens": true}', 400, "max_tokens"),
    ("max_tokens 2.0", CMPL, '{"prompt": "hi", "max_tokens": 2.0}', 400, "max_tokens"),
    ("max_completion_tokens 2**64", CHAT,
     f'{{"messages": [{{"role": "user", "content": "hi"}}], "max_completion_tokens": {2**64}}}',
     400, "max_completion_tokens"),
    ("n huge", CMPL, _hi(f'"n": {10**20}'), 400, "n"),
    ("n true", CMPL, _hi('"n": true'), 400, "n"),
    ("logprobs huge", CMPL, _hi(f'"logprobs": {10**20}'), 400, "logprobs"),
    ("top_logprobs 2**64", CHAT, _chat(f'"logprobs": true, "top_logprobs": {2**64}'), 400,
     "top_logprobs"),
    ("stop_token_ids 2**64", CMPL, _hi(f'"stop_token_ids": [{2**64}]'), 400, "stop_token_ids"),
    ("stop_token_ids negative", CMPL, _hi('"stop_token_ids": [-1]'), 400, "stop_token_ids"),
    ("stop_token_ids boolean", CMPL, _hi('"stop_token_ids": [true]'), 400, "stop_token_ids"),
]  # fmt: skip


@pytest.fixture(scope="module")
def server(checkpoints: dict[str, Path]) -> Iterator[LiveServer]:
    with live_server(checkpoints["llama"]) as s:
        yield s


async def _hostile_beside_innocent(base_url: str, path: str, body: str) -> httpx.Response:
    """Send ``body`` while an innocent completion runs; the innocent one must finish."""
    innocent = {"prompt": "def add(a, b):", "max_tokens": 8, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=base_url, trust_env=False, timeout=TIMEOUT) as http:
        good, bad = await asyncio.gather(
            http.post(CMPL, json=innocent),
            http.post(path, content=body, headers={"Content-Type": "application/json"}),
        )
    assert good.status_code == 200, good.text
    assert good.json()["choices"][0]["finish_reason"] == "length"
    return bad


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_hostile_request_is_refused_and_the_server_keeps_serving(
    server: LiveServer, path: str, body: str, status: int, param: str | None
) -> None:
    response = asyncio.run(_hostile_beside_innocent(server.base_url, path, body))
    assert response.status_code == status, response.text
    if status >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error" and error["message"]
        if param is not None:
            assert error["param"] == param, error
    with server.http() as http:
        assert http.get("/health").status_code == 200


def test_surrogate_message_is_clear_on_both_routes(server: LiveServer) -> None:
    with server.http() as http:
        for path, body in [
            (CMPL, f'{{"prompt": {SURROGATE}}}'),
            (CHAT, f'{{"messages": [{{"role": "user", "content": {SURROGATE}}}]}}'),
        ]:
            response = http.post(path, content=body, headers={"Content-Type": "application/json"})
            message = response.json()["error"]["message"]
            assert "lone surrogate" in message and "\\ud800" in message, message
            assert "TypeError" not in message and "TextEncodeInput" not in message


def test_library_refuses_values_that_would_fail_inside_a_step() -> None:
    for kwargs in [
        dict(temperature=float("inf")),
        dict(temperature=float("nan")),
        dict(repetition_penalty=float("inf")),
        dict(top_k=2**70),
        dict(seed=2**64),
        dict(seed=-1),
        dict(max_tokens=True),
        dict(n=2.0),
        dict(stop_token_ids=[2**64]),
        dict(temperature="0.5"),
    ]:
        with pytest.raises(ValueError):
            SamplingParams(**kwargs)  # type: ignore[arg-type]
    np = pytest.importorskip("numpy")
    params = SamplingParams(top_k=np.int64(5), temperature=np.float32(0.5))
    assert type(params.top_k) is int and type(params.temperature) is float


def test_library_tokenizer_explains_a_lone_surrogate(checkpoints: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="lone surrogate"):
        Tokenizer(checkpoints["llama"]).encode("abc\ud800")


def test_unknown_fields_are_logged_once_per_name(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fresh record of logged names: earlier tests of this process (the schemathesis fuzzing)
    # may have filled it to its bound, past which new names are not logged by design.
    monkeypatch.setattr(fields, "_logged_unknown", set())
    name = f"field_{uuid.uuid4().hex}"
    with caplog.at_level(logging.WARNING, logger="tierkv.server.protocol"):
        for _ in range(3):
            CompletionRequest.model_validate({"prompt": "hi", name: 1})
    logged = [r for r in caplog.records if name in r.getMessage()]
    assert len(logged) == 1 and "ignoring unknown field" in logged[0].getMessage()


def test_unknown_field_names_logged_are_bounded(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Names are the client's choice: past ``MAX_LOGGED_UNKNOWN`` distinct ones, new names
    are no longer logged (nor remembered)."""
    monkeypatch.setattr(fields, "_logged_unknown", set())
    with caplog.at_level(logging.WARNING, logger="tierkv.server.protocol"):
        for i in range(fields.MAX_LOGGED_UNKNOWN + 5):
            CompletionRequest.model_validate({"prompt": "hi", f"f{i}": 1})
    assert len(fields._logged_unknown) == fields.MAX_LOGGED_UNKNOWN
    assert len(caplog.records) == fields.MAX_LOGGED_UNKNOWN


def test_engine_killer_never_reaches_the_engine(server: LiveServer) -> None:
    # Beyond the table: far more than the failure limit in a row, then a normal request.
    with server.http() as http:
        for _ in range(3 * MAX_CONSECUTIVE_FAILURES):
            response = http.post(CMPL, content=KILLER, headers={"Content-Type": "application/json"})
            assert response.status_code == 400
        ok = http.post(CMPL, json={"prompt": "hi", "max_tokens": 2})
        assert ok.status_code == 200
        assert http.get("/health").status_code == 200
