"""Offline throughput: a fixed synthetic workload through our engine (per KV policy) and HF.

Each row runs in a fresh process so that its peak resident memory is its own.
"""

from __future__ import annotations

import json
import multiprocessing
import random
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from tierkv.bench import DATASETS
from tierkv.config import EngineConfig
from tierkv.engine.engine import resolve_dtype
from tierkv.eval import corpus
from tierkv.eval.peers import QUANTO_BITS, PeerUnavailable, quanto_peer
from tierkv.model.loader import read_spec
from tierkv.model.source import load_transformers_model, resolve_model
from tierkv.tokenizer import Tokenizer


@dataclass(frozen=True)
class Workload:
    """``num_prompts`` prompts of ``input_len`` tokens, each generating ``output_len``.

    ``dataset`` ``random``: uniformly random token ids (vLLM's ``random`` dataset). ``stdlib``:
    windows of text at random offsets in the demo corpus's held-out ``test`` split
    (``tierkv.eval.corpus``: Python source the demo model was not trained on), so that
    attention is as concentrated as on real text, which is what tiered KV policies exploit.
    ``prefix_len`` tokens drawn the same way go before every prompt (vLLM's
    ``--random-prefix-len``): a shared system prompt, what prefix caching reuses.
    ``prefix_caching`` is the engine's ``enable_prefix_caching``.
    """

    model: str
    num_prompts: int = 64
    input_len: int = 512
    output_len: int = 128
    seed: int = 0
    dtype: str = "auto"
    attention_backend: str = EngineConfig.attention_backend
    dataset: str = "random"
    prefix_len: int = 0
    prefix_caching: bool = True

    def prompts(self) -> list[list[int]]:
        """The prompts' token ids, the same for every run with this seed."""
        windows = self.windows([self.prefix_len] + [self.input_len] * self.num_prompts)
        return [windows[0] + w for w in windows[1:]]

    def windows(self, lengths: list[int]) -> list[list[int]]:
        """Token windows of the given lengths from the dataset, the same for every run with
        this seed (and these lengths)."""
        rng = random.Random(self.seed)
        if self.dataset == "random":
            vocab_size = read_spec(resolve_model(self.model).folder).vocab_size
            # Token 0 is often a special token in small vocabularies; draw ordinary ids only.
            return [[rng.randrange(1, vocab_size) for _ in range(n)] for n in lengths]
        if self.dataset != "stdlib":
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        text = "\n\n".join(corpus.read_text(corpus.held_out_files("test")))
        ids = Tokenizer(resolve_model(self.model).folder).encode(text)
        if len(ids) <= max(lengths):
            raise ValueError(
                f"the stdlib test split is {len(ids)} tokens for this tokenizer, too short for "
                f"windows of {max(lengths)}"
            )
        starts = [rng.randrange(len(ids) - n) if n else 0 for n in lengths]
        return [ids[s : s + n] for s, n in zip(starts, lengths, strict=True)]


@dataclass
class ThroughputResult:
    """One row of the benchmark."""

    policy: str
    output_tokens_per_s: float
    total_tokens_per_s: float
    elapsed_s: float
    max_running: int
    preemptions: int
    peak_rss_mb: float
    # Where our engine's time went (``Engine.step_times``; None for transformers' rows):
    # steps computing prompt tokens, decode-only steps, and the mean batch of the latter.
    prefill_s: float | None = None
    decode_s: float | None = None
    decode_steps: int | None = None
    mean_decode_batch: float | None = None
    # Prompt tokens found in the prefix cache over those looked up (None: not our engine).
    prefix_hit_rate: float | None = None


def run_engine(
    work: Workload, policy: str, kv_cache_memory: str, max_num_seqs: int
) -> ThroughputResult:
    """Our engine under one KV policy."""
    from tierkv import LLM, SamplingParams

    llm = LLM(
        work.model,
        dtype=work.dtype,
        kv_policy=policy,
        kv_cache_memory=kv_cache_memory,
        max_num_seqs=max_num_seqs,
        max_model_len=work.prefix_len + work.input_len + work.output_len,
        # Speed only: lengths past the model's positions time as well as any.
        allow_long_max_model_len=True,
        seed=work.seed,
        attention_backend=work.attention_backend,
        enable_prefix_caching=work.prefix_caching,
    )
    prompts = work.prompts()
    params = SamplingParams(temperature=0, max_tokens=work.output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
    # What the warm-up cached would be free hits for the timed run.
    llm.engine.reset_prefix_cache()
    warm = llm.engine.pool_counters()
    before = llm.engine.step_times.snapshot()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    steps = llm.engine.step_times.since(before)
    generated = sum(len(o.token_ids) for o in outputs)
    stats = llm.kv_stats()
    queried = stats["prefix_cache_queries"] - warm["prefix_cache_queries"]
    return ThroughputResult(
        policy=policy if work.prefix_caching else f"{policy} no-pc",
        output_tokens_per_s=generated / elapsed,
        total_tokens_per_s=(generated + sum(map(len, prompts))) / elapsed,
        elapsed_s=elapsed,
        max_running=stats["max_running"],
        preemptions=stats["preemptions"],
        peak_rss_mb=_peak_rss_mb(),
        prefill_s=steps.prefill_s,
        decode_s=steps.decode_s,
        decode_steps=steps.decode_steps,
        mean_decode_batch=steps.decode_rows / steps.decode_steps if steps.decode_steps else 0.0,
        prefix_hit_rate=(
            (stats["prefix_cache_hits"] - warm["prefix_cache_hits"]) / queried if queried else 0.0
        ),
    )


def run_hf(work: Workload, batch_size: int, cache_bits: int | None = None) -> ThroughputResult:
    """transformers' ``generate`` in batches of ``batch_size``, with its default dynamic cache
    (``hf-dynamic``) or, given ``cache_bits``, its ``QuantizedCache`` with the optimum-quanto
    backend at that many bits and its default residual length (``hf-quanto-4``)."""
    model = load_transformers_model(work.model, resolve_dtype(work.dtype))
    prompts = torch.tensor(work.prompts())
    kwargs = dict(
        max_new_tokens=work.output_len,
        min_new_tokens=work.output_len,
        do_sample=False,
        pad_token_id=0,
    )
    with torch.inference_mode():
        warm = prompts[:2, :16]
        model.generate(warm, attention_mask=torch.ones_like(warm), max_new_tokens=2, pad_token_id=0)
        start = time.perf_counter()
        generated = 0
        for i in range(0, len(prompts), batch_size):
            batch = prompts[i : i + batch_size]
            if cache_bits is not None:
                kwargs["past_key_values"] = quanto_peer(cache_bits).make_cache(model.config)
            out = model.generate(batch, attention_mask=torch.ones_like(batch), **kwargs)
            generated += (out.shape[1] - batch.shape[1]) * batch.shape[0]
        elapsed = time.perf_counter() - start
    return ThroughputResult(
        policy="hf-dynamic" if cache_bits is None else f"hf-quanto-{cache_bits}",
        output_tokens_per_s=generated / elapsed,
        total_tokens_per_s=(generated + prompts.numel()) / elapsed,
        elapsed_s=elapsed,
        max_running=batch_size,
        preemptions=0,
        peak_rss_mb=_peak_rss_mb(),
    )


def hf_caches(compare_hf: bool) -> tuple[list[int | None], str | None]:
    """The HF rows ``--compare-hf`` asks for, and why quantized ones are missing (if so)."""
    if not compare_hf:
        return [], None
    try:
        quanto_peer(QUANTO_BITS[0])
    except PeerUnavailable as exc:
        return [None], f"QuantizedCache rows skipped: {exc}"
    return [None, *QUANTO_BITS], None


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_throughput(
    work: Workload,
    policies: list[str],
    kv_cache_memory: str,
    max_num_seqs: int,
    hf_caches: list[int | None],
    hf_batch_size: int,
    compare_prefix_caching: bool = False,
) -> list[ThroughputResult]:
    """Run every row, each in its own process, in the order given: each policy (then, with
    ``compare_prefix_caching``, each again with prefix caching the other way), then HF
    ``generate`` once per entry of ``hf_caches`` (``None``: its dynamic cache; a bit width:
    ``QuantizedCache`` at those bits)."""
    works = [work]
    if compare_prefix_caching:
        works.append(replace(work, prefix_caching=not work.prefix_caching))
    jobs = [(run_engine, (w, p, kv_cache_memory, max_num_seqs)) for w in works for p in policies]
    jobs += [(run_hf, (work, hf_batch_size, bits)) for bits in hf_caches]
    results = []
    spawn = multiprocessing.get_context("spawn")
    for fn, args in jobs:
        with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
            results.append(pool.submit(fn, *args).result())
    return results


def format_table(results: list[ThroughputResult]) -> str:
    """A plain-text table of the rows, with each row's speed relative to the first."""
    width = max([14] + [len(r.policy) + 1 for r in results])
    head = (
        f"{'policy':<{width}}{'out tok/s':>11}{'vs first':>9}{'max run':>9}{'preempt':>9}"
        f"{'rss MB':>9}"
        f"{'prefill s':>11}{'decode s':>10}{'dec batch':>11}{'pc hits':>9}"
    )
    lines = [head, "-" * len(head)]
    base = results[0].output_tokens_per_s if results else 1.0
    for r in results:
        steps = (
            f"{r.prefill_s:>11.2f}{r.decode_s:>10.2f}{r.mean_decode_batch:>11.1f}"
            f"{r.prefix_hit_rate:>9.0%}"
            if r.decode_s is not None
            else f"{'-':>11}{'-':>10}{'-':>11}{'-':>9}"
        )
        lines.append(
            f"{r.policy:<{width}}{r.output_tokens_per_s:>11.1f}"
            f"{r.output_tokens_per_s / base:>8.2f}x"
            f"{r.max_running:>9}{r.preemptions:>9}{r.peak_rss_mb:>9.0f}{steps}"
        )
    return "\n".join(lines)


def write_json(path: str | Path, work: Workload, results: list[ThroughputResult]) -> None:
    """Write ``{"workload": ..., "results": [...]}``."""
    payload = {"workload": asdict(work), "results": [asdict(r) for r in results]}
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")
