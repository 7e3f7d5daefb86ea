"""Engine: ``step()`` = schedule -> run the model -> sample -> emit outputs."""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any

import torch

from tierkv.config import EngineConfig
from tierkv.engine import admission, stats
from tierkv.engine.outputs import append_token, group_output
from tierkv.engine.request import Request, RequestOutput
from tierkv.engine.runner import ModelRunner
from tierkv.engine.scheduler import Scheduler, SchedulerOutput
from tierkv.engine.stats import StepTimes
from tierkv.kv import (
    KVPolicy,
    KVStore,
    PagedAttention,
    PagePool,
    PrefixCache,
    default_page_bytes,
)
from tierkv.model.decoder import Decoder
from tierkv.model.layers import native_dtype
from tierkv.model.loader import ModelSpec, load_weights, read_spec
from tierkv.model.source import resolve_model
from tierkv.sampling import Logprob, SampleRow, SamplingParams, sample_isolated
from tierkv.structured.matcher import StructuredOutputs
from tierkv.tokenizer import IncrementalDetokenizer, Tokenizer

__all__ = ["Engine", "StepTimes", "resolve_dtype"]

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    """The compute dtype for a ``dtype`` option.

    ``auto`` is bfloat16: on this project's reference CPU (AVX512-BF16) the engine decodes
    faster in bfloat16 than in float32 (see BENCHMARKS.md), and it halves weight memory.
    """
    return torch.bfloat16 if name == "auto" else _DTYPES[name]


def prefill_chunk(config: EngineConfig) -> int:
    """Where batch-invariant mode cuts prompts: every multiple of this many tokens
    (``Scheduler``'s ``chunk``). It leaves room in a step's budget for a decode token of every
    other running request, so the oldest waiting chunk always fits, and at least half the
    budget."""
    budget = config.max_num_batched_tokens
    return max(budget // 2, budget - config.max_num_seqs + 1, 1)


class Engine:
    """A model, its KV cache and a scheduler, driven one step at a time."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        # The folder tierkv reads: config.model itself, or the cached folder of a GGUF.
        self.model_dir = resolve_model(config.model).folder
        self.spec: ModelSpec = read_spec(self.model_dir)
        # Before the weights load: a refused length fails in a moment.
        self.max_model_len = config.resolve_max_model_len(self.spec.max_position_embeddings)
        self.dtype = resolve_dtype(config.dtype)
        self.tokenizer = Tokenizer(self.model_dir)
        # Grammar matchers for structured output, over this tokenizer and the model's logits.
        self.structured = StructuredOutputs(self.tokenizer, self.spec.vocab_size)
        self.model = Decoder(self.spec, self.dtype)
        load_weights(self.model, self.model_dir)
        # Batch-invariant mode computes every linear layer from the row-major weights by one
        # native kernel; otherwise they are packed for oneDNN, whose rounding of a token
        # follows the batch. On by default where it is cheap: bfloat16 with the kernels built.
        self.batch_invariant = config.resolve_batch_invariant(
            cheap=self.dtype == torch.bfloat16 and native_dtype(self.dtype)
        )
        if self.batch_invariant:
            if not native_dtype(self.dtype):
                logger.warning(
                    "batch-invariant mode without a native kernel for %s: linear layers run "
                    "one row at a time, which is slow",
                    self.dtype,
                )
            self.model.set_batch_invariant()
        else:
            self.model.prepack()
        self.policy = KVPolicy.parse(config.kv_policy)
        if config.kv_budget is not None:
            tiers = self.policy if self.policy.tiered else KVPolicy.parse("default")
            self.policy = tiers.with_budget(config.kv_budget)

        page_bytes = config.page_bytes or default_page_bytes(self.spec.head_dim)
        num_pages = config.kv_cache_memory // page_bytes
        if num_pages < 1:
            raise ValueError(
                f"kv_cache_memory={config.kv_cache_memory} bytes is smaller than one "
                f"{page_bytes}-byte KV page"
            )
        pool = PagePool(num_pages, page_bytes)
        self.store = KVStore(
            pool,
            self.spec.num_layers,
            self.spec.num_kv_heads,
            self.spec.head_dim,
            self.dtype,
            config.max_num_seqs,
            self.max_model_len,
        )
        self.store.register_policy(self.policy)
        needed = self.store.pages_to_admit(self.max_model_len, self.policy)
        if needed > num_pages:
            raise ValueError(
                f"the KV pool ({num_pages} pages of {page_bytes} bytes = "
                f"{config.kv_cache_memory} bytes) cannot hold even one request of "
                f"max_model_len={self.max_model_len} tokens, which needs {needed} pages "
                f"({needed * page_bytes} bytes); raise kv_cache_memory or lower max_model_len"
            )
        self.scheduler = Scheduler(
            self.store,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            chunk=prefill_chunk(config) if self.batch_invariant else None,
            prefix_cache=PrefixCache(self.store) if config.enable_prefix_caching else None,
        )
        self.step_times = StepTimes()
        self.runner = ModelRunner(
            self.model,
            PagedAttention(self.store, list(self.spec.sliding_windows), config.attention_backend),
        )
        self._seed_source = torch.Generator().manual_seed(config.seed)
        self._groups: dict[str, tuple[str | None, list[Request]]] = {}
        self._ids = itertools.count()

    # -- requests ------------------------------------------------------------------------------

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        forced_output: list[int] | None = None,
    ) -> str:
        """Queue a prompt (text or token ids); returns its request id.

        ``forced_output`` teacher-forces the request (evaluation): each step's sampled token is
        replaced by the next forced one, so every forced token goes through the real decode
        path, and the finished output carries the log-probabilities of every position
        (``CompletionOutput.forced_logprobs``). The request then generates exactly
        ``len(forced_output)`` tokens.
        """
        params = params or SamplingParams()
        text = prompt if isinstance(prompt, str) else None
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        admission.check_prompt(ids, self.max_model_len, self.spec.vocab_size)
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        room = self.max_model_len - len(ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        if forced_output is not None:
            admission.check_forced(forced_output, room, self.max_model_len, self.spec.vocab_size)
            max_tokens = len(forced_output)
            if params.structured_outputs is not None:
                raise ValueError("forced_output cannot be combined with structured_outputs")
        policy = admission.request_policy(params, len(ids) + max_tokens, self.policy, self.store)
        children = []
        for i in range(params.n):
            seed = params.seed + i if params.seed is not None else self._draw_seed()
            req = Request(
                request_id=f"{request_id}-{i}",
                group_id=request_id,
                prompt=text,
                prompt_token_ids=ids,
                params=params,
                generator=torch.Generator().manual_seed(seed),
                detokenizer=IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens),
                max_tokens=max_tokens,
                kv_policy=policy,
                forced_output=forced_output,
                grammar=(
                    self.structured.matcher(params.structured_outputs)
                    if params.structured_outputs is not None
                    else None
                ),
            )
            children.append(req)
        # Queue only once every child is built, so a failure leaves nothing behind.
        for req in children:
            self.scheduler.add(req)
        self._groups[request_id] = (text, children)
        return request_id

    def abort(self, request_id: str) -> None:
        """Stop a request now; its pages return to the pool at once. Unknown ids are ignored."""
        group = self._groups.pop(request_id, None)
        for req in group[1] if group else []:
            if not req.finished:
                req.finish_reason = "abort"
                self.scheduler.finish(req)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def running_request_ids(self) -> set[str]:
        """Ids of the request groups that have a request in the running batch."""
        return {r.group_id for r in self.scheduler.running}

    def _draw_seed(self) -> int:
        return int(torch.randint(0, 2**62, (1,), generator=self._seed_source))

    # -- stepping ------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one step; return the current output of every request group that advanced."""
        start = time.perf_counter()
        scheduled = self.scheduler.schedule()
        if not scheduled.requests:
            return []
        # A decode computes one token past the prompt with everything before it cached.
        decode_only = all(
            n == 1 and r.num_computed_tokens >= len(r.prompt_token_ids)
            for r, n in zip(scheduled.requests, scheduled.num_new_tokens, strict=True)
        )
        outputs = self._run(scheduled)
        self.step_times.record(decode_only, len(scheduled.requests), time.perf_counter() - start)
        return outputs

    def _run(self, scheduled: SchedulerOutput) -> list[RequestOutput]:
        """Model, sampling and outputs of a scheduled step."""
        sampling, logits = self.runner.execute(scheduled)
        self.scheduler.cache_computed(scheduled)
        if sampling:
            rows = [
                SampleRow(r.params, r.generator, r.prompt_token_ids, r.output_token_ids, r.grammar)
                for r in sampling
            ]
            result = sample_isolated(logits, rows)
            for i, (req, token, logprobs, error) in enumerate(
                zip(sampling, result.tokens, result.logprobs, result.errors, strict=True)
            ):
                if req.finished:  # a sibling of ``n`` failed earlier in this loop
                    continue
                # What follows the model is per request, and so is any failure in it: the
                # request ends with its error, the rest of the step goes on.
                try:
                    if error is not None:
                        raise error
                    if req.forced_output is not None:
                        req.forced_logprobs.append(torch.log_softmax(logits[i].float(), dim=-1))
                        token = req.forced_output[len(req.output_token_ids)]
                    self._append(req, token, logprobs)
                except Exception as exc:
                    self._fail(req, exc)
        advanced = {r.group_id for r in sampling}
        return [self._output(gid) for gid in advanced if gid in self._groups]

    def _fail(self, req: Request, exc: Exception) -> None:
        """End ``req``'s group, and free its pages, because post-processing ``req`` raised.

        The completion that failed carries the error; its siblings end as aborted.
        """
        logger.error("request %s failed; ending it alone", req.group_id, exc_info=exc)
        req.error = f"{type(exc).__name__}: {exc}"
        _, children = self._groups.get(req.group_id, (None, [req]))
        for r in children:
            if not r.finished:
                r.finish_reason = "error" if r is req else "abort"
                self.scheduler.finish(r)

    def _append(self, req: Request, token: int, logprobs: dict[int, Logprob] | None) -> None:
        if append_token(req, token, logprobs, self.tokenizer):
            self.scheduler.finish(req)

    def _output(self, group_id: str) -> RequestOutput:
        text, children = self._groups[group_id]
        finished = all(r.finished for r in children)
        if finished:
            del self._groups[group_id]
        return group_output(group_id, text, children, finished)

    # -- introspection -------------------------------------------------------------------------

    def kv_stats(self) -> dict[str, Any]:
        """KV pool and scheduler counters; bytes per token include all metadata (the keys are
        described at ``stats.kv_stats``)."""
        return stats.kv_stats(self.scheduler, self.policy)

    def reset_prefix_cache(self) -> bool:
        """Evict every cached prefix page no running request uses (vLLM's
        ``reset_prefix_cache``); returns whether the cache is now empty."""
        cache = self.scheduler.prefix_cache
        if cache is None:
            return True
        cache.clear()
        return cache.num_blocks == 0

    def pool_counters(self) -> dict[str, int | float]:
        """The plain counters of ``kv_stats`` (pages, bytes, requests), cheap enough to read
        after every step, as the server's metrics do."""
        return stats.pool_counters(self.scheduler, self.policy)
