"""Bad input gets a clear exception naming the numbers or the alternatives, and loses nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from tierkv import LLM, KVPolicy, SamplingParams
from tierkv.config import EngineConfig, parse_size


@pytest.fixture(scope="module")
def llm(checkpoints: dict[str, Path]) -> LLM:
    return LLM(str(checkpoints["qwen3"]), dtype="float32", max_model_len=64, kv_cache_memory="4MiB")


def test_prompt_longer_than_max_model_len_names_both_numbers(llm: LLM) -> None:
    with pytest.raises(ValueError, match="the prompt has 80 tokens, but max_model_len is 64"):
        llm.generate([list(range(1, 81))], use_tqdm=False)


def test_a_bad_prompt_in_a_list_queues_nothing(llm: LLM) -> None:
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[1, 2, 3], [1, 10**6]], use_tqdm=False)
    assert not llm.engine.has_unfinished()
    stats = llm.kv_stats()
    assert stats["free_pages"] == stats["total_pages"]
    # The engine still serves afterwards.
    assert llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3), use_tqdm=False)[0].token_ids


def test_empty_prompt_is_refused(llm: LLM) -> None:
    with pytest.raises(ValueError, match="the prompt is empty"):
        llm.generate([[]], use_tqdm=False)


def test_generation_stops_at_max_model_len(llm: LLM) -> None:
    out = llm.generate(
        [list(range(1, 60))], SamplingParams(max_tokens=100, ignore_eos=True), use_tqdm=False
    )
    assert out[0].finish_reason == "length"
    assert len(out[0].token_ids) == 5


def test_pool_too_small_for_one_request_names_the_sizes(checkpoints: dict[str, Path]) -> None:
    with pytest.raises(
        ValueError, match=r"cannot hold even one request of max_model_len=2048 tokens"
    ):
        LLM(str(checkpoints["llama"]), dtype="float32", kv_cache_memory="64KiB")


def test_unknown_engine_argument_lists_the_accepted_ones(checkpoints: dict[str, Path]) -> None:
    with pytest.raises(
        TypeError, match="unknown engine argument.*gpu_memory.*accepted: .*dtype.*kv_cache_memory"
    ):
        LLM(str(checkpoints["llama"]), gpu_memory=0.9)


def test_unknown_policy_and_dtype_are_refused(checkpoints: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="unknown KV policy 'k3v9'; supported: fp16"):
        LLM(str(checkpoints["llama"]), kv_policy="k3v9")
    with pytest.raises(ValueError, match="dtype must be one of auto, float32, bfloat16, float16"):
        LLM(str(checkpoints["llama"]), dtype="int8")


def test_missing_model_folder_is_explained(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no config.json"):
        LLM(str(tmp_path))


def test_sizes_parse_and_bad_sizes_are_explained() -> None:
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5 MB") == 1_500_000
    assert parse_size(4096) == 4096
    with pytest.raises(ValueError, match="cannot parse size '2 parsecs'"):
        parse_size("2 parsecs")


def test_kv_budget_selects_budget_mode_and_bad_budgets_are_refused(
    checkpoints: dict[str, Path],
) -> None:
    path = str(checkpoints["llama"])
    policy = LLM(path, kv_budget=0.25, kv_cache_memory="16MiB").kv_stats()["policy"]
    assert KVPolicy.parse(policy) == KVPolicy.parse("default").with_budget(0.25)
    tiered = LLM(path, kv_policy="k8v8/k4v4", kv_budget=0.5, kv_cache_memory="16MiB")
    assert KVPolicy.parse(tiered.kv_stats()["policy"]) == KVPolicy.parse("k8v8/k4v4@0.5")
    with pytest.raises(ValueError, match=r"kv_budget must be in \(0, 1\], got 1.5"):
        LLM(path, kv_budget=1.5)


@pytest.mark.parametrize(
    ("name", "value"),
    [("max_num_seqs", 0), ("max_num_batched_tokens", None), ("max_model_len", 2.5)],
)
def test_engine_counts_must_be_positive_integers(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"{name} must be an integer >= 1, got {value!r}"):
        EngineConfig(model="unused", **{name: value})
