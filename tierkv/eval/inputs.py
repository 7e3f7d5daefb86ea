"""The fidelity harness's configuration and the inputs every method sees (built once a run)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from tierkv.eval import corpus
from tierkv.eval.answers import answer_prompt_ids
from tierkv.eval.longgen import bos_ids, cut, long_gen_prompt_ids, spread_windows
from tierkv.eval.needle import NeedleExample, build_needles
from tierkv.eval.prompts import has_chat_template, load_prompts, spread
from tierkv.eval.retrieval import make_retrieval_example

# Room left after a retrieval prompt for its answer (as in the demo model's own evaluation).
ANSWER_ROOM = 16
RETRIEVAL_KEYS = 8


@dataclass(frozen=True)
class FidelityConfig:
    """What to evaluate and how much of it; the sizes trade precision for time.

    The defaults are the demo model's sweep; ``tierkv.eval.suites`` holds the real-model
    preset. A task whose count is 0 is skipped (its fields stay ``None`` or ``{}``).
    SnapKV-based peers score the prompt with its last 64 queries, so their prompts
    (``ppl_prefix``, ``greedy_prompt_len``) must be longer than 64 tokens.
    """

    model: str
    split: corpus.Split = "dev"
    contexts: tuple[int, ...] = (512, 1024, 2048)
    ppl_windows: int = 6
    ppl_window_len: int = 512
    ppl_prefix: int = 256
    greedy_prompts: int = 3
    greedy_prompt_len: int = 256
    greedy_tokens: int = 256
    retrieval_examples: int = 10
    answer_prompts: int = 0
    answer_tokens: int = 64
    needle_examples: int = 0
    needle_count: int = 1
    long_gen_prompts: int = 0
    long_gen_tokens: int = 512
    dtype: str = "auto"
    kv_cache_memory: str = "1GiB"
    seed: int = 0
    suite: str = "demo"

    def __post_init__(self) -> None:
        if not 0 < self.ppl_prefix < self.ppl_window_len:
            raise ValueError(
                f"ppl_prefix must be in (0, ppl_window_len={self.ppl_window_len}), "
                f"got {self.ppl_prefix}"
            )
        for name in ("ppl_windows", "greedy_tokens", "answer_tokens", "long_gen_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        skippable = ("greedy_prompts", "retrieval_examples", "answer_prompts")
        for name in (*skippable, "needle_examples", "long_gen_prompts"):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"{name} must be >= 0 (0 skips the task), got {getattr(self, name)}"
                )
        if self.needle_count < 1:
            raise ValueError(f"needle_count must be >= 1, got {self.needle_count}")
        if not self.contexts or min(self.contexts) <= ANSWER_ROOM:
            raise ValueError(f"retrieval contexts must be longer than {ANSWER_ROOM} tokens")


@dataclass
class RetrievalItem:
    """One retrieval prompt (token ids) and its expected answer text."""

    ids: list[int]
    answer: str
    max_new: int


@dataclass
class FidelityData:
    """The token ids every method sees, built once per run."""

    windows: list[list[int]]
    greedy_prompts: list[list[int]]
    retrieval: dict[int, list[RetrievalItem]]
    measure_ids: list[int]
    answer_ids: list[list[int]] = field(default_factory=list)
    answer_categories: list[str] = field(default_factory=list)
    eos_ids: frozenset[int] = frozenset()
    needles: dict[int, list[NeedleExample]] = field(default_factory=dict)
    long_gen_prompts: list[list[int]] = field(default_factory=list)
    # Filled by run_fidelity from the reference's own greedy run.
    long_gen_paths: list[list[int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# -- data ------------------------------------------------------------------------------------


def build_data(
    config: FidelityConfig,
    tokenizer: Any,
    max_model_len: int,
    eos_ids: frozenset[int] = frozenset(),
) -> FidelityData:
    """Every task's inputs from the held-out ``config.split``."""
    if config.ppl_window_len > max_model_len:
        raise ValueError(
            f"ppl_window_len={config.ppl_window_len} is longer than the model's "
            f"max_model_len={max_model_len}"
        )
    texts = corpus.read_text(corpus.held_out_files(config.split))
    bos = bos_ids(tokenizer)
    # Whole files are longer than the model's context: they are cut into windows below.
    docs = [tokenizer(t, add_special_tokens=False, verbose=False).input_ids for t in texts]
    windows = spread_windows(
        [bos + w for w in cut(docs, config.ppl_window_len - len(bos))],
        config.ppl_windows,
        f"windows of {config.ppl_window_len} tokens",
    )
    greedy: list[list[int]] = []
    if config.greedy_prompts:
        # Greedy prompts start half a window later than the scored windows: other text.
        shifted = [d[config.ppl_window_len // 2 :] for d in docs]
        greedy = spread_windows(
            [bos + w for w in cut(shifted, config.greedy_prompt_len - len(bos))],
            config.greedy_prompts,
            f"prompts of {config.greedy_prompt_len} tokens",
        )
    longest = max(config.contexts)
    # Room for the 3 tokens of the measuring request (see EngineBackend.kv_bytes_per_token).
    measure = bos + [t for d in docs for t in d][: min(longest, max_model_len) - 4 - len(bos)]
    data = FidelityData(windows, greedy, _retrieval(config, tokenizer, texts), measure)
    data.eos_ids = frozenset(eos_ids)
    chat = has_chat_template(tokenizer)
    if config.answer_prompts and not chat:
        data.notes.append("answers: skipped, the model's tokenizer has no chat template")
    elif config.answer_prompts:
        prompts = spread(load_prompts(config.split), config.answer_prompts)
        data.answer_ids = answer_prompt_ids(tokenizer, prompts)
        data.answer_categories = [p.category for p in prompts]
    if config.needle_examples:
        data.needles, notes = build_needles(
            tokenizer,
            config.contexts,
            config.needle_examples,
            max_model_len,
            config.split,
            config.seed,
            config.needle_count,
        )
        data.notes += notes
    if config.long_gen_prompts:
        data.long_gen_prompts = long_gen_prompt_ids(
            tokenizer, config.split, config.long_gen_prompts
        )
        longest_gen = max(len(p) for p in data.long_gen_prompts) + config.long_gen_tokens
        if longest_gen > max_model_len:
            raise ValueError(
                f"long generation needs {longest_gen} tokens, max_model_len is {max_model_len}"
            )
    return data


def _retrieval(
    config: FidelityConfig, tokenizer: Any, texts: list[str]
) -> dict[int, list[RetrievalItem]]:
    """The demo model's key/value retrieval prompts at each context length."""
    filler = "\n".join(texts)
    retrieval: dict[int, list[RetrievalItem]] = {}
    for ctx in config.contexts if config.retrieval_examples else ():
        rng = random.Random(config.seed * 100_003 + ctx)
        items = []
        for _ in range(config.retrieval_examples):
            ex = make_retrieval_example(
                rng, tokenizer, ctx - ANSWER_ROOM, filler, n_keys=RETRIEVAL_KEYS
            )
            n_new = len(tokenizer(ex.answer, add_special_tokens=False).input_ids) + 1
            items.append(RetrievalItem(tokenizer(ex.prompt).input_ids, ex.answer, n_new))
        retrieval[ctx] = items
    return retrieval
