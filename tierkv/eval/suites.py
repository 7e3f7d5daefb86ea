"""Size presets of the fidelity harness: ``demo`` (the demo model's sweep) and ``real``.

``real`` is sized for a real chat model such as SmolLM2-135M-Instruct: chat answers, needles
at 1k-8k tokens, perplexity after 2k-token prefixes and 512-token generations, so that
``fp16``, ``default`` and ``k8v4`` fit in about 30 minutes on a 2-core CPU. The demo model's
own retrieval task and the short greedy runs are off there (0 skips a task). It computes in
float32: in bfloat16 the next-token logits tie often enough that even a lossless-looking
``k8v8`` changes half the answers (measured on SmolLM2: 0.47 agreement in bf16), which would
hide what the cache itself changes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tierkv.eval.inputs import FidelityConfig

SUITES: dict[str, dict[str, Any]] = {
    "demo": {},
    "real": dict(
        contexts=(1024, 2048, 4096, 8192),
        ppl_windows=4,
        ppl_window_len=2048 + 128,
        ppl_prefix=2048,
        greedy_prompts=0,
        retrieval_examples=0,
        answer_prompts=64,
        answer_tokens=64,
        needle_examples=3,
        long_gen_prompts=2,
        long_gen_tokens=512,
        dtype="float32",
        kv_cache_memory="2GiB",
    ),
}


def choose_suite(model: str) -> str:
    """``real`` for a model whose tokenizer has a chat template, else ``demo``."""
    try:
        from tierkv.model.source import resolve_model
        from tierkv.tokenizer import Tokenizer

        # A .gguf file or a short name such as smollm2 reads its tokenizer from its folder.
        return "real" if Tokenizer(resolve_model(model).folder).hf.chat_template else "demo"
    except (OSError, ValueError):
        return "demo"


def suite_config(suite: str, model: str, **overrides: Any) -> FidelityConfig:
    """The preset's config for ``model``; ``overrides`` (None values ignored) win."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; choose from {', '.join(SUITES)}")
    known = {f.name for f in dataclasses.fields(FidelityConfig)}
    sizes = {**SUITES[suite], **{k: v for k, v in overrides.items() if v is not None}}
    unknown = sorted(set(sizes) - known)
    if unknown:
        raise TypeError(f"unknown fidelity setting(s): {', '.join(unknown)}")
    return FidelityConfig(model=model, suite=suite, **sizes)
