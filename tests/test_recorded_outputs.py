"""Recorded greedy outputs of the demo model under every kind of KV policy and both backends.

A guard for refactors of the KV cache (layout, backends, store): the engine must keep producing
the tokens it produced when the record was made. Regenerate the record only for a change that
is meant to alter outputs, and say so in the commit:

    python tests/test_recorded_outputs.py --record

Each recorded token carries the gap between the two most likely tokens at that step. Float32
rounding differs between CPUs (AVX2 and AVX-512 sum in other orders), so a sequence is compared
up to the first step whose recorded gap is under ``TIE``, where another machine could
legitimately pick the other token; every step before it must match exactly.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

from tierkv import LLM, SamplingParams

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "assets" / "demo-model"
RECORD = Path(__file__).resolve().parent / "data" / "recorded_outputs.json"
TIE = 1e-3
MAX_TOKENS = 40
# One of each kind: the baseline, uniform formats with and without the residual ring, a
# 64-channel group with and without the rotated basis, the default, tiers with DiffKV's
# thresholds and pooling, a sliding-ring variant, and budget mode (which prunes every step).
POLICIES = (
    "fp16",
    "k8v8",
    "k8v4:r=0",
    "k4v2-g64",
    "k4v2-g64:h=0",
    "k2v2",
    "default",
    "k8v4/k4v2:ah=1,al=0.02,pk=1,r=0",
    "default:w=32,di=1",
    "default@0.3",
)
BACKENDS = ("fast", "reference")


def _prompts() -> list[list[int]]:
    """Three prompts long enough that the tiered policies demote and prune (past their
    128-token recent window), and one short one that stays in the recent window."""
    rng = random.Random(1234)
    lengths = (300, 180, 150, 12)
    return [[rng.randrange(5, 4000) for _ in range(n)] for n in lengths]


def _generate(backend: str, policy: str) -> list[dict[str, list[float] | list[int]]]:
    llm = LLM(
        str(DEMO),
        dtype="float32",
        kv_policy=policy,
        attention_backend=backend,
        max_model_len=512,
        max_num_batched_tokens=256,
        kv_cache_memory="64MiB",
    )
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=2)
    runs = []
    for out in llm.generate(_prompts(), params, use_tqdm=False):
        gaps = []
        for step in out.logprobs or []:
            top = sorted((lp.logprob for lp in step.values()), reverse=True)
            gaps.append(round(top[0] - top[1], 6) if len(top) > 1 else 99.0)
        runs.append({"tokens": list(out.token_ids), "gaps": gaps})
    stats = llm.kv_stats()
    assert stats["used_pages"] == 0, stats  # every page back in the pool
    return runs


def record() -> None:
    data = {f"{b}/{p}": _generate(b, p) for b in BACKENDS for p in POLICIES}
    RECORD.parent.mkdir(parents=True, exist_ok=True)
    RECORD.write_text(json.dumps(data, indent=0) + "\n")


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_match_the_record(backend: str, policy: str) -> None:
    recorded = json.loads(RECORD.read_text())[f"{backend}/{policy}"]
    now = _generate(backend, policy)
    compared = 0
    for i, (old, new) in enumerate(zip(recorded, now, strict=True)):
        for step, (a, b, gap) in enumerate(
            zip(old["tokens"], new["tokens"], old["gaps"], strict=True)
        ):
            if gap < TIE:
                break  # a near tie: another CPU may round to the other token
            assert a == b, f"prompt {i} step {step}: recorded {a}, now {b} (gap {gap})"
            compared += 1
    # Near ties are rare: most of the record is compared, so the test can fail.
    assert compared >= len(recorded) * MAX_TOKENS // 2


def test_the_fast_and_reference_chains_recorded_the_same_tokens() -> None:
    # With test_outputs_match_the_record, the engine gives the same greedy output on the
    # reference chain (torch only, any device) as on the default one (the cpu kernels).
    record = json.loads(RECORD.read_text())
    for policy in POLICIES:
        fast, reference = record[f"fast/{policy}"], record[f"reference/{policy}"]
        assert [r["tokens"] for r in fast] == [r["tokens"] for r in reference], policy


if __name__ == "__main__" and "--record" in sys.argv:
    record()
    print(f"wrote {RECORD}")
