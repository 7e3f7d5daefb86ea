"""Structured output: ``response_format`` / ``StructuredOutputsParams`` through llguidance.

The oracle is ``jsonschema``: every completion that the grammar ended must parse and validate.
The schemas are small and bounded (enums, ``maxLength``, integer ranges, ``maxItems``,
``additionalProperties: false``) so the grammar, not ``max_tokens``, ends each completion,
which keeps SmolLM2 on two CPU cores within seconds.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
import torch
from server_harness import LiveServer, live_server

from tierkv import LLM, SamplingParams, StructuredOutputsParams
from tierkv.model.source import ModelSource
from tierkv.structured.bitmask import apply_bitmask
from tierkv.structured.vocab import token_bytes
from tierkv.tokenizer import Tokenizer

DEMO = Path(__file__).resolve().parents[1] / "assets" / "demo-model"

PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}
ORDER: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 9999},
        "items": {
            "type": "array",
            "items": {"enum": ["apple", "pear", "fig"]},
            "minItems": 1,
            "maxItems": 3,
        },
        "paid": {"type": "boolean"},
        "note": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 8}]},
    },
    "required": ["id", "items", "paid", "note"],
    "additionalProperties": False,
}
# Enough for the longest object these schemas allow, escapes included: the grammar ends
# every completion well before.
MAX_TOKENS = 120


def _format(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def _check(texts: list[str], finish: list[str | None], schema: dict[str, Any]) -> None:
    for text, reason in zip(texts, finish, strict=True):
        assert reason == "stop", (reason, text)
        jsonschema.validate(json.loads(text), schema)


# -- the pieces ----------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["demo", "smollm2"])
def test_token_bytes_match_the_tokenizer(which: str, request: pytest.FixtureRequest) -> None:
    folder = DEMO if which == "demo" else request.getfixturevalue("smollm2").folder
    tok = Tokenizer(folder)
    tokens, special = token_bytes(tok.hf)
    text = '{"name": "Ada", "x": [1, 2.5e-3, null]}\n\t ünï ✓ 日本'
    ids = tok.hf.encode(text, add_special_tokens=False)
    assert b"".join(tokens[i] for i in ids) == text.encode()
    assert set(tok.eos_token_ids) <= set(special)
    for i in range(0, len(tokens), 7):  # every token whose text stands alone
        decoded = tok.hf.decode([i], skip_special_tokens=False)
        if i not in special and "\ufffd" not in decoded:
            assert tokens[i] == decoded.encode(), i


def test_bitmask_sets_refused_tokens_to_minus_inf() -> None:
    logits = torch.randn(3, 70)
    allowed = torch.rand(3, 70) < 0.3
    mask = torch.zeros(3, 3, dtype=torch.int32)
    for r, t in allowed.nonzero().tolist():
        mask[r, t // 32] |= torch.tensor(1 << (t % 32)).to(torch.int32)  # wraps at bit 31
    out = logits.clone()
    apply_bitmask(out, mask)
    assert torch.equal(out, torch.where(allowed, logits, float("-inf")))
    wider = torch.randn(2, 100)  # a padded model vocabulary: tokens past the mask are refused
    apply_bitmask(wider, torch.full((2, 3), -1, dtype=torch.int32))
    assert torch.isinf(wider[:, 96:]).all() and torch.isfinite(wider[:, :96]).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"json": {"not": {"type": "string"}}}, "Unimplemented keys"),
        ({"json": {"type": "array", "uniqueItems": True}}, "uniqueItems"),
        ({"json": {"type": "string", "format": "bogus"}}, "Unknown format"),
        ({"json": {"type": "string", "pattern": "(("}}, "regex"),
        ({"json": {"type": "integer", "minimum": 5, "maximum": 2}}, "nsatisfiable"),
        ({"json": {"$ref": "#/$defs/missing"}}, "does not exist"),
        ({"json": "{not json"}, "not valid JSON"),
        # llguidance 1.9.1 panics on this one (a PanicException, not an Exception).
        ({"json": {"maxItems": [{"x": "\u00e9" * 60}]}}, "unsupported JSON schema"),
        ({"json": [1]}, "must be an object"),
        ({}, "exactly one"),
        ({"json": {}, "json_object": True}, "exactly one"),
    ],
)
def test_unsupported_constraints_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StructuredOutputsParams(**kwargs)


# -- the engine ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_llm() -> LLM:
    return LLM(str(DEMO), dtype="float32", kv_cache_memory="32MiB", max_model_len=512)


def test_every_kv_policy_greedy_and_sampled_n_gt_1(demo_llm: LLM) -> None:
    """Masking happens in the batched sampler: it composes with any policy and batch."""
    person = StructuredOutputsParams(json=PERSON)
    params = [
        SamplingParams(
            temperature=t,
            n=2,
            seed=7,
            max_tokens=MAX_TOKENS,
            kv_policy=policy,
            structured_outputs=person,
        )
        for policy in ("fp16", "k4v2", "k8v4/k4v2@0.5")
        for t in (0.0, 1.0)
    ]
    # An unconstrained request in the same batch keeps its own distribution.
    params.append(SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    outputs = demo_llm.generate(["Name: x\n"] * len(params), params, use_tqdm=False)
    for out in outputs[:-1]:
        _check([c.text for c in out.outputs], [c.finish_reason for c in out.outputs], PERSON)
    assert outputs[-1].finish_reason == "length" and len(outputs[-1].token_ids) == 8


def test_preempted_requests_keep_their_grammar_state() -> None:
    """A preempted request recomputes its KV cache; its matcher, on the request, stays put."""
    llm = LLM(
        str(DEMO), dtype="float32", kv_cache_memory="1MiB", max_model_len=256, kv_policy="fp16"
    )
    params = SamplingParams(
        temperature=1.0,
        seed=5,
        max_tokens=MAX_TOKENS,
        structured_outputs=StructuredOutputsParams(json=PERSON),
    )
    outputs = llm.generate(["def f(x):\n    return x\n" * 8] * 12, params, use_tqdm=False)
    assert llm.kv_stats()["preemptions"] > 0
    _check([o.text for o in outputs], [o.finish_reason for o in outputs], PERSON)


def test_a_complete_grammar_stops_even_with_ignore_eos(demo_llm: LLM) -> None:
    params = SamplingParams(
        temperature=0,
        max_tokens=MAX_TOKENS,
        ignore_eos=True,
        structured_outputs=StructuredOutputsParams(json=ORDER),
    )
    out = demo_llm.generate("order", params, use_tqdm=False)[0]
    _check([out.text], [out.finish_reason], ORDER)


def test_forced_output_and_structured_output_do_not_mix(demo_llm: LLM) -> None:
    params = SamplingParams(structured_outputs=StructuredOutputsParams(json_object=True))
    with pytest.raises(ValueError, match="forced_output"):
        demo_llm.engine.add_request([1, 2], params, forced_output=[3])


# -- the server, through the official client -------------------------------------------------------


def _twenty_objects(server: LiveServer, chat_prompt: str, text_prompt: str) -> None:
    """20 objects: 5 per route (chat, completions) and mode (streamed, not), all at once, with
    an unconstrained request in the same batches."""
    client = server.client()
    common: dict[str, Any] = dict(
        model="tiny-llama", n=5, seed=3, temperature=1.0, max_tokens=MAX_TOKENS
    )
    messages = [{"role": "user", "content": chat_prompt}]

    def chat(stream: bool) -> tuple[list[str], list[str | None]]:
        fmt = _format("person", PERSON)
        if not stream:
            r = client.chat.completions.create(messages=messages, response_format=fmt, **common)
            return [c.message.content for c in r.choices], [c.finish_reason for c in r.choices]
        chunks = client.chat.completions.create(
            messages=messages, response_format=fmt, stream=True, **common
        )
        return _gather(
            (c.index, c.delta.content, c.finish_reason) for k in chunks for c in k.choices
        )

    def completion(stream: bool) -> tuple[list[str], list[str | None]]:
        extra = {"response_format": _format("order", ORDER)}
        if not stream:
            r = client.completions.create(prompt=text_prompt, extra_body=extra, **common)
            return [c.text for c in r.choices], [c.finish_reason for c in r.choices]
        chunks = client.completions.create(
            prompt=text_prompt, extra_body=extra, stream=True, **common
        )
        return _gather((c.index, c.text, c.finish_reason) for k in chunks for c in k.choices)

    def plain() -> str | None:
        r = client.completions.create(model="tiny-llama", prompt=text_prompt, max_tokens=4)
        return r.choices[0].finish_reason

    with ThreadPoolExecutor(5) as pool:
        jobs = [
            pool.submit(chat, False),
            pool.submit(chat, True),
            pool.submit(completion, False),
            pool.submit(completion, True),
            pool.submit(plain),
        ]
        results = [j.result() for j in jobs]
    for (texts, finish), schema in zip(results[:4], [PERSON, PERSON, ORDER, ORDER], strict=True):
        assert len(texts) == 5
        _check(texts, finish, schema)
    assert results[4] in ("stop", "length")


def _gather(parts: Iterator[tuple[int, str | None, str | None]]) -> tuple[list[str], list[Any]]:
    texts, finish = [""] * 5, [None] * 5
    for index, text, reason in parts:
        texts[index] += text or ""
        finish[index] = reason or finish[index]
    return texts, finish


@pytest.fixture(scope="module")
def demo_server() -> Iterator[LiveServer]:
    with live_server(DEMO) as server:
        yield server


def test_demo_model_twenty_objects_validate(demo_server: LiveServer) -> None:
    _twenty_objects(demo_server, "A person as JSON.", "order = ")


def test_smollm2_twenty_objects_validate(smollm2: ModelSource) -> None:
    with live_server(smollm2.folder, kv_cache_memory="96MiB", dtype="auto") as server:
        _twenty_objects(
            server,
            "Reply with a JSON object describing a person: name, age and role.",
            "A shop order as JSON: ",
        )
        # json_object: any JSON object, greedy.
        r = server.client().chat.completions.create(
            model="tiny-llama",
            messages=[{"role": "user", "content": 'Reply in JSON: {"ok": true}.'}],
            response_format={"type": "json_object"},
            temperature=0,
            max_tokens=48,
        )
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_json_object_and_text_formats(demo_server: LiveServer) -> None:
    client = demo_server.client()
    r = client.chat.completions.create(
        model="tiny-llama",
        messages=[{"role": "user", "content": "{"}],
        response_format={"type": "json_object"},
        n=6,
        seed=1,
        max_tokens=64,
    )
    done = [c.message.content for c in r.choices if c.finish_reason == "stop"]
    assert done, "no completion ended its object within 64 tokens"
    for text in done:
        assert isinstance(json.loads(text), dict)
    for c in r.choices:  # one cut by max_tokens is still a prefix of an object
        assert c.message.content.startswith("{")
    r = client.completions.create(
        model="tiny-llama",
        prompt="x",
        max_tokens=3,
        extra_body={"response_format": {"type": "text"}},
    )
    assert r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize(
    ("response_format", "message"),
    [
        (_format("bad", {"type": "object", "not": {"required": ["a"]}}), "Unimplemented keys"),
        (_format("bad", {"type": "string", "format": "no-such-format"}), "Unknown format"),
        ({"type": "json_schema"}, "needs a json_schema"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "schema is required"),
        ({"type": "xml"}, "response_format"),
    ],
)
def test_a_schema_the_library_cannot_handle_is_a_400(
    demo_server: LiveServer, response_format: dict[str, Any], message: str
) -> None:
    client = demo_server.client()
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(
            model="tiny-llama",
            messages=[{"role": "user", "content": "hi"}],
            response_format=response_format,  # type: ignore[arg-type]
        )
    assert exc.value.status_code == 400
    assert message in exc.value.message
    assert exc.value.body["param"] == "response_format"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(
            model="tiny-llama", prompt="hi", extra_body={"response_format": response_format}
        )
    with demo_server.http() as http:
        assert http.get("/health").status_code == 200
