"""The OpenAI-compatible server, driven by the official ``openai`` client over real HTTP."""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from server_harness import MODEL_NAME, LiveServer, live_server
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from tierkv.sampling import SamplingParams
from tierkv.server.cli import add_serve_parser, serve
from tierkv.server.streaming import stop_prefix_len

PROMPT = "def add(a, b):"
MESSAGES = [
    {"role": "system", "content": "You write Python."},
    {"role": "user", "content": "Hello world!"},
]
# Exact token counts need a fixed length: the random model may emit EOS at any time.
FIXED = {"ignore_eos": True}


@pytest.fixture(scope="module")
def server(checkpoints: dict[str, Path]) -> Iterator[LiveServer]:
    with live_server(checkpoints["llama"]) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[openai.OpenAI]:
    with server.client() as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer(checkpoints: dict[str, Path]) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(checkpoints["llama"]))


def _chat_prompt_len(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> int:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_NAME]


def test_completion_usage_equals_tokenizer_counts(
    client: openai.OpenAI, tokenizer: PreTrainedTokenizerBase
) -> None:
    out = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=7, temperature=0, extra_body=FIXED
    )
    assert out.object == "text_completion"
    assert len(out.choices) == 1 and out.choices[0].finish_reason == "length"
    assert out.usage is not None
    assert out.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert out.usage.completion_tokens == 7
    assert out.usage.total_tokens == out.usage.prompt_tokens + 7


def test_streamed_completion_equals_unstreamed(client: openai.OpenAI) -> None:
    kwargs = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0, extra_body=FIXED)
    whole = client.completions.create(**kwargs)
    chunks = list(
        client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_chat_streamed_and_unstreamed(
    client: openai.OpenAI, tokenizer: PreTrainedTokenizerBase
) -> None:
    kwargs = dict(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=10, temperature=0, extra_body=FIXED
    )
    whole = client.chat.completions.create(**kwargs)
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage is not None
    assert whole.usage.prompt_tokens == _chat_prompt_len(tokenizer, MESSAGES)
    assert whole.usage.completion_tokens == 10

    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content
    assert chunks[-1].usage == whole.usage


def test_max_completion_tokens_wins_over_max_tokens(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model=MODEL_NAME,
        messages=MESSAGES,
        max_tokens=9,
        max_completion_tokens=3,
        extra_body=FIXED,
    )
    assert out.usage is not None and out.usage.completion_tokens == 3


def test_n_and_seed_reproduce(client: openai.OpenAI) -> None:
    kwargs = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, n=3, seed=1234, extra_body=FIXED)
    first = client.completions.create(**kwargs, temperature=1.0)
    again = client.completions.create(**kwargs, temperature=1.0)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert first.usage is not None and first.usage.completion_tokens == 3 * 8

    streamed: dict[int, str] = {}
    for chunk in client.completions.create(**kwargs, temperature=1.0, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert [streamed[i] for i in range(3)] == [c.text for c in first.choices]


def test_chat_n_choices(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=5, n=2, seed=3, extra_body=FIXED
    )
    assert [c.index for c in out.choices] == [0, 1]
    assert out.usage is not None and out.usage.completion_tokens == 10


def test_stop_string_cuts_text_and_is_never_streamed(client: openai.OpenAI) -> None:
    kwargs = dict(model=MODEL_NAME, prompt=PROMPT, temperature=0, extra_body=FIXED)
    reference = client.completions.create(**kwargs, max_tokens=24).choices[0].text
    assert len(reference) >= 6
    middle = len(reference) // 2
    stop = reference[middle : middle + 3]
    expected = reference[: reference.find(stop)]

    out = client.completions.create(**kwargs, max_tokens=24, stop=[stop])
    assert out.choices[0].text == expected
    assert out.choices[0].finish_reason == "stop"

    deltas = [
        c.choices[0].text
        for c in client.completions.create(**kwargs, max_tokens=24, stop=stop, stream=True)
    ]
    assert "".join(deltas) == expected


def test_stop_prefix_is_held_back() -> None:
    assert stop_prefix_len("hello wor", ["world"]) == 3
    assert stop_prefix_len("hello", ["world"]) == 0
    assert stop_prefix_len("ab", ["b", "abc"]) == 2
    assert stop_prefix_len("anything", []) == 0


def test_completion_logprobs(client: openai.OpenAI) -> None:
    out = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2, extra_body=FIXED
    )
    logprobs = out.choices[0].logprobs
    assert logprobs is not None and out.usage is not None
    assert logprobs.tokens is not None and len(logprobs.tokens) == out.usage.completion_tokens
    assert logprobs.token_logprobs is not None and logprobs.top_logprobs is not None
    for chosen, top in zip(logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert chosen is not None and chosen <= 0
        assert 1 <= len(top) <= 3
        assert chosen == pytest.approx(max(top.values()))  # greedy picks the most likely
    assert logprobs.text_offset == sorted(logprobs.text_offset or [])


def test_chat_logprobs(client: openai.OpenAI) -> None:
    kwargs = dict(
        model=MODEL_NAME,
        messages=MESSAGES,
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body=FIXED,
    )
    out = client.chat.completions.create(**kwargs)
    content = out.choices[0].logprobs.content
    assert content is not None and len(content) == 5
    for token in content:
        assert len(token.top_logprobs) == 3
        values = [t.logprob for t in token.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert token.logprob == pytest.approx(values[0])
        assert token.bytes == list(token.token.encode())

    streamed = [
        t
        for chunk in client.chat.completions.create(**kwargs, stream=True)
        for choice in chunk.choices
        if choice.logprobs is not None and choice.logprobs.content
        for t in choice.logprobs.content
    ]
    assert [t.token for t in streamed] == [t.token for t in content]


def test_token_id_prompts_and_echo(
    client: openai.OpenAI, tokenizer: PreTrainedTokenizerBase
) -> None:
    ids = [tokenizer.encode(PROMPT), tokenizer.encode("class Point:")]
    out = client.completions.create(
        model=MODEL_NAME, prompt=ids, max_tokens=4, temperature=0, extra_body=FIXED
    )
    assert [c.index for c in out.choices] == [0, 1]
    assert out.usage is not None
    assert out.usage.prompt_tokens == len(ids[0]) + len(ids[1])
    assert out.usage.completion_tokens == 8

    text = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=0, echo=True
    )
    assert text.choices[0].text.startswith(PROMPT)


def test_openapi_health_and_metrics(server: LiveServer) -> None:
    with server.http() as http:
        schema = http.get("/openapi.json").json()
        assert {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= set(schema["paths"])
        assert http.get("/health").status_code == 200
        text = http.get("/metrics").text
    for name in (
        "tierkv:kv_pages_total",
        "tierkv:kv_pages_free",
        "tierkv:kv_bytes_per_token",
        "tierkv:num_requests_running",
        "tierkv:num_requests_waiting",
        "tierkv:num_preemptions_total",
        "tierkv:prompt_tokens_total",
        "tierkv:generation_tokens_total",
        "tierkv:time_to_first_token_seconds_bucket",
        "tierkv:time_per_output_token_seconds_bucket",
        "tierkv:e2e_request_latency_seconds_bucket",
        'tierkv:requests_finished_total{finish_reason="length"}',
    ):
        assert name in text, name


def test_serve_parser_defaults() -> None:
    parser = argparse.ArgumentParser(prog="tierkv")
    add_serve_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", "--kv-cache-memory", "2GiB", "--max-num-seqs", "8"])
    assert args.func is serve
    assert (args.model, args.host, args.port, args.api_key) == (None, "127.0.0.1", 8000, None)
    assert (args.kv_cache_memory, args.max_num_seqs) == ("2GiB", 8)
    args = parser.parse_args(["serve", "/models/x", "--port", "9000", "--api-key", "k"])
    assert (args.model, args.port, args.api_key) == ("/models/x", 9000, "k")


def test_async_engine_generate_and_early_close(server: LiveServer) -> None:
    engine = server.app.state.engine
    fixed = dict(temperature=0.0, ignore_eos=True)

    async def run() -> None:
        outputs = [
            o async for o in engine.generate([5, 6, 7], SamplingParams(max_tokens=4, **fixed), "g1")
        ]
        assert outputs[-1].finished and len(outputs[-1].token_ids) == 4
        assert not any(o.finished for o in outputs[:-1])
        stream = engine.generate([5, 6, 7], SamplingParams(max_tokens=200, **fixed), "g2")
        assert not (await anext(stream)).finished
        await stream.aclose()  # aborts the request

    aborted = server.metrics().get('tierkv:requests_finished_total{finish_reason="abort"}', 0)
    asyncio.run(asyncio.wait_for(run(), 30))
    deadline = time.monotonic() + 10
    metrics = server.metrics()
    while metrics.get('tierkv:requests_finished_total{finish_reason="abort"}', 0) == aborted:
        assert time.monotonic() < deadline, "the closed stream was not aborted"
        time.sleep(0.05)
        metrics = server.metrics()
    assert metrics["tierkv:kv_pages_free"] == metrics["tierkv:kv_pages_total"]


def test_return_token_ids_gives_the_prompt_and_output_ids(client: openai.OpenAI) -> None:
    """vLLM's ``return_token_ids``: the ids the text came from, streamed or not, so that a
    client can resend an answer token for token (and hit the prefix cache on it)."""
    extra = {"return_token_ids": True, "ignore_eos": True}
    prompt = [5, 6, 7, 8, 9]
    whole = client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=6, temperature=0, extra_body=extra
    ).choices[0]
    assert whole.model_extra["prompt_token_ids"] == prompt
    assert len(whole.model_extra["token_ids"]) == 6
    streamed: list[int] = []
    prompts = []
    for chunk in client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=6, temperature=0, extra_body=extra, stream=True
    ):
        for choice in chunk.choices:
            streamed += choice.model_extra.get("token_ids") or []
            prompts.append(choice.model_extra.get("prompt_token_ids"))
    assert streamed == whole.model_extra["token_ids"]
    assert prompts[0] == prompt and all(p is None for p in prompts[1:])
    plain = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=2).choices[0]
    assert plain.model_extra.get("token_ids") is None
    chat = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        temperature=0,
        extra_body=extra,
    )
    assert len(chat.choices[0].model_extra["token_ids"]) == 4
    assert chat.model_extra["prompt_token_ids"]
