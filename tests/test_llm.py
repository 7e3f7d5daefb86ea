"""The offline API: prompt forms, chat, per-prompt params, and the incremental detokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import _tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from tierkv import LLM, SamplingParams
from tierkv.tokenizer import IncrementalDetokenizer, Tokenizer, find_stop

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(checkpoints: dict[str, Path]) -> LLM:
    return LLM(
        str(checkpoints["qwen3"]), dtype="float32", max_model_len=256, kv_cache_memory="8MiB"
    )


def test_prompt_forms_agree(llm: LLM) -> None:
    text = "def add(a, b):"
    ids = llm.tokenizer.encode(text)
    single = llm.generate(text, GREEDY, use_tqdm=False)
    listed = llm.generate([text, text], GREEDY, use_tqdm=False)
    as_ids = llm.generate([ids], GREEDY, use_tqdm=False)
    flat_ids = llm.generate(ids, GREEDY, use_tqdm=False)
    assert len(single) == 1 and len(listed) == 2 and len(flat_ids) == 1
    assert (
        single[0].token_ids == listed[1].token_ids == as_ids[0].token_ids == flat_ids[0].token_ids
    )
    assert single[0].prompt == text and single[0].prompt_token_ids == ids
    assert as_ids[0].prompt is None


def test_one_sampling_params_per_prompt(llm: LLM) -> None:
    short = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    outs = llm.generate(["a", "b"], [GREEDY, short], use_tqdm=False)
    assert [len(o.token_ids) for o in outs] == [6, 2]
    with pytest.raises(ValueError, match="got 1 sampling params for 2 prompts"):
        llm.generate(["a", "b"], [GREEDY], use_tqdm=False)


def test_chat_applies_the_chat_template(llm: LLM) -> None:
    conversation = [{"role": "user", "content": "Hello world!"}]
    rendered = llm.tokenizer.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=True
    )
    assert rendered.endswith("<|assistant|>\n")
    expected = llm.generate([llm.tokenizer.encode(rendered)], GREEDY, use_tqdm=False)
    one = llm.chat(conversation, GREEDY, use_tqdm=False)
    many = llm.chat([conversation, conversation], GREEDY, use_tqdm=False)
    assert one[0].token_ids == expected[0].token_ids == many[1].token_ids


@settings(max_examples=60, deadline=None)
@given(text=st.text(min_size=1, max_size=40))
def test_incremental_detokenizer_equals_full_decode(
    text: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Deltas never split a character and add up to the Hugging Face tokenizer's own decode."""
    tok = _cached_tokenizer(tmp_path_factory)
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    deltas = [detok.add(t) for t in ids]
    assert all("\ufffd" not in d for d in deltas) or "\ufffd" in text
    assert "".join(deltas) == tok.hf.decode(ids, skip_special_tokens=True) == tok.decode(ids)


_TOKENIZER: dict[str, Tokenizer] = {}


def _cached_tokenizer(factory: pytest.TempPathFactory) -> Tokenizer:
    if "t" not in _TOKENIZER:
        path = factory.mktemp("tok")
        _tokenizer().save_pretrained(path)
        _TOKENIZER["t"] = Tokenizer(path)
    return _TOKENIZER["t"]


def test_find_stop_finds_the_earliest_stop_in_new_text() -> None:
    assert find_stop("hello world", ["wor", "o"], new_chars=3) == 6
    assert find_stop("hello world", ["hell"], new_chars=3) is None  # checked on earlier text
    assert find_stop("hello world", ["o wor"], new_chars=3) == 4  # straddles the new text


def test_forced_output_replaces_samples_and_keeps_every_position_logprobs(llm: LLM) -> None:
    engine = llm.engine
    prompt = llm.tokenizer.encode("def add(a, b):")
    eos = sorted(engine.tokenizer.eos_token_ids)[0]
    forced = [eos, 7, 11, eos, 5]  # end-of-sequence tokens do not stop a forced request
    params = SamplingParams(temperature=1.0, seed=3, stop_token_ids=[7])
    rid = engine.add_request(prompt, params, forced_output=forced)
    finals = []
    while engine.has_unfinished():
        finals += [o for o in engine.step() if o.request_id == rid and o.finished]
    (out,) = finals
    assert out.token_ids == forced and out.finish_reason == "length"
    logprobs = out.outputs[0].forced_logprobs
    assert logprobs.shape == (len(forced), engine.spec.vocab_size)
    # Each row is the distribution greedy decoding of the same forced prefix would sample from.
    for i in range(len(forced)):
        step = llm.generate([prompt + forced[:i]], GREEDY, use_tqdm=False)[0]
        assert step.token_ids[0] == int(logprobs[i].argmax())
    assert llm.kv_stats()["free_pages"] == llm.kv_stats()["total_pages"]


def test_forced_output_that_does_not_fit_is_refused(llm: LLM) -> None:
    with pytest.raises(ValueError, match="forced_output has 300 tokens, but only"):
        llm.engine.add_request([1, 2, 3], forced_output=[4] * 300)
    with pytest.raises(ValueError, match="forced token id -1 is outside the vocabulary"):
        llm.engine.add_request([1, 2, 3], forced_output=[4, -1])
    with pytest.raises(ValueError, match="forced_output is empty"):
        llm.engine.add_request([1, 2, 3], forced_output=[])
    assert not llm.engine.has_unfinished()


@pytest.mark.parametrize("budget", [2048, 8])
def test_step_times_split_prompt_steps_from_decode_steps(
    checkpoints: dict[str, Path], budget: int
) -> None:
    llm = LLM(str(checkpoints["llama"]), dtype="float32", max_num_batched_tokens=budget)
    before = llm.engine.step_times.snapshot()
    llm.generate([[5] * 20, [7] * 12], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    steps = llm.engine.step_times.since(before)
    if budget == 2048:
        # One step computes both prompts and samples their first tokens; three decode both.
        assert (steps.prefill_steps, steps.decode_steps, steps.decode_rows) == (1, 3, 6)
    else:
        # 8-token chunks, running requests first: A 8, A 8, A 4 + B 4 (A's first token),
        # A's decode + B 7, A's decode + B 1 (B's first token) all compute prompt tokens;
        # then A + B, B, B decode.
        assert (steps.prefill_steps, steps.decode_steps, steps.decode_rows) == (5, 3, 4)
    assert steps.prefill_s > 0 and steps.decode_s > 0
