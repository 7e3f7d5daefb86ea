"""The real-model tasks of the fidelity harness: prompt sets, needles, answer agreement,
long generation, and the suites (tiny random checkpoints; one SmolLM2 test when it is here)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tierkv.eval.answers import answer_agreement, score_answers
from tierkv.eval.engines import engine_for
from tierkv.eval.longgen import long_generation
from tierkv.eval.metrics import answer_match
from tierkv.eval.needle import (
    ANSWER_TOKENS,
    build_needles,
    make_needle_example,
    needle_found,
)
from tierkv.eval.prompts import ChatPrompt, load_prompts, plain_text, render
from tierkv.eval.suites import suite_config
from tierkv.model.source import ModelSource

DEMO = Path(__file__).resolve().parents[1] / "assets" / "demo-model"


def test_prompt_sets_parse_are_disjoint_and_mix_categories() -> None:
    dev, test = load_prompts("dev"), load_prompts("test")
    for prompts in (dev, test):
        assert len(prompts) >= 110
        assert {p.category for p in prompts} >= {
            "factual", "arithmetic", "code", "instruction", "multi_turn"
        }  # fmt: skip
        for p in prompts:
            assert p.messages[-1]["role"] == "user"
            assert all(m["role"] in ("user", "assistant") and m["content"] for m in p.messages)
        assert len({p.id for p in prompts}) == len(prompts)
        # Multi-turn chats carry earlier assistant turns.
        assert any(len(p.messages) >= 3 for p in prompts if p.category == "multi_turn")
    assert not {p.id for p in dev} & {p.id for p in test}

    # Whole conversations, and their opening turns (follow-ups such as "How would you test
    # it?" may recur after different code listings).
    def texts(prompts: list[ChatPrompt]) -> set[str]:
        return {json.dumps(p.messages) for p in prompts} | {
            p.messages[0]["content"] for p in prompts
        }

    assert not texts(dev) & texts(test)


def test_answer_match_compares_up_to_a_shared_eos() -> None:
    eos = {2}
    assert answer_match([5, 6, 2, 9], [5, 6, 2, 7], eos, 4) == (True, 4)
    assert answer_match([5, 6, 7, 8], [5, 6, 2], eos, 4) == (False, 2)
    assert answer_match([5, 6, 7], [5, 9, 7], eos, 3) == (False, 1)
    score = score_answers([[1, 2], [3, 4]], [[1, 2], [3, 5]], ["a", "b"], eos, 2)
    assert score.agreement == 0.5 and score.first_divergence == 1.5
    assert score.by_category["b"] == {"agreement": 0.0, "first_divergence": 1.0, "n": 1.0}


@pytest.fixture(scope="module")
def tokenizer(checkpoints: dict[str, Path]) -> object:
    return AutoTokenizer.from_pretrained(DEMO if DEMO.exists() else checkpoints["llama"])


@pytest.mark.parametrize(("context", "depth"), [(512, 0.1), (1024, 0.5), (2000, 0.9)])
def test_needle_lands_at_the_requested_depth_and_length(
    tokenizer: object, context: int, depth: float
) -> None:
    ex = make_needle_example(random.Random(0), tokenizer, context, depth, n_needles=3)
    # Within one sentence of prose (< 64 tokens) of the wanted length and depth.
    assert context - 64 <= len(ex.ids) <= context
    assert abs(ex.depth - depth) < 64 / context + 0.02
    text = tokenizer.decode(ex.ids)
    assert text.count("The special magic number for") == 4  # 3 needles + the answer prefix
    assert text.rstrip().endswith(f"The special magic number for {ex.key} is")
    assert len(ex.answer) == 7 and ex.answer in text
    assert needle_found(f" {ex.answer}.", ex.answer) and not needle_found(" 1234567", ex.answer)


def test_needles_too_long_for_the_model_are_skipped_with_a_note(tokenizer: object) -> None:
    needles, notes = build_needles(tokenizer, (512, 2048, 4096), 2, 2048)
    assert list(needles) == [512, 2048]
    assert [round(e.requested_depth, 2) for e in needles[512]] == [0.25, 0.75]
    # A length equal to the window is kept, shortened so that prompt and answer fit it.
    assert all(
        2048 - 64 - ANSWER_TOKENS <= len(e.ids) <= 2048 - ANSWER_TOKENS for e in needles[2048]
    )
    assert "needle@2048" in notes[0] and "needle@4096: skipped" in notes[1]


def test_models_without_a_chat_template_get_plain_turns(tokenizer: object) -> None:
    msgs = ({"role": "user", "content": "Hi"},)
    assert plain_text(msgs, "Hello") == "User: Hi\n\nAssistant: Hello"
    if not getattr(tokenizer, "chat_template", None):
        assert tokenizer.decode(render(tokenizer, msgs)).endswith("Assistant:")


def test_reference_agrees_with_itself_and_a_quantized_cache_is_scored(
    checkpoints: dict[str, Path],
) -> None:
    engine = engine_for(checkpoints["llama"], dtype="float32", kv_cache_memory="64MiB")
    prompts = [ChatPrompt(f"p{i}", "c", ({"role": "user", "content": "def add"},)) for i in "ab"]
    got = answer_agreement(engine, ["fp16", "k2v2"], prompts, max_new=8)
    assert got["fp16"].agreement == 1.0 and got["fp16"].first_divergence == 8
    assert 0.0 <= got["k2v2"].agreement <= 1.0
    paths = long_generation(engine, ["k2v2"], prompts=1, n_tokens=16)
    assert paths["fp16"].kl == 0.0 and paths["fp16"].top1 == 1.0
    assert paths["k2v2"].kl > 0


def test_real_suite_sizes_and_overrides() -> None:
    cfg = suite_config("real", "m", needle_examples=5, contexts=None)
    assert cfg.contexts == (1024, 2048, 4096, 8192) and cfg.needle_examples == 5
    assert cfg.ppl_prefix >= 2048 and cfg.long_gen_tokens >= 512 and cfg.answer_tokens == 64
    assert suite_config("demo", "m").retrieval_examples == 10
    with pytest.raises(ValueError):
        suite_config("nope", "m")


def test_a_bad_policy_changes_smollm2_answers_more_than_k8v8(smollm2: ModelSource) -> None:
    """On the real model, the uncompressed cache agrees with itself and 2-bit keys and values
    diverge before 8-bit ones (the answers the harness scores are the model's own)."""
    engine = engine_for(str(smollm2.folder), dtype="float32", kv_cache_memory="256MiB")
    prompts = [p for p in load_prompts("dev") if p.category == "factual"][:4]
    got = answer_agreement(engine, ["k8v8", "k2v2"], prompts, max_new=24)
    assert got["fp16"].agreement == 1.0
    assert got["k2v2"].first_divergence < got["k8v8"].first_divergence
