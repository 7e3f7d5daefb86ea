"""What the fidelity harness asks of a KV-cache method, and the tierkv engine's answer.

A ``Backend`` scores teacher-forced windows, generates greedily and reports its KV bytes per
token. ``EngineBackend`` runs one tierkv KV policy through the real engine (``Engine.step``):
every scored token is predicted by a decode step that reads the policy's compressed cache, via
the engine's teacher forcing (``Engine.add_request(forced_output=...)``), which feeds the true
next token in place of the sampled one and returns each position's float log-probabilities
(the ``logprobs=vocab_size`` route would build 4,096 ``Logprob`` objects with their text per
token, which costs more than the model).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import torch

from tierkv.engine.engine import Engine
from tierkv.eval.metrics import cut_at_eos
from tierkv.eval.peers import Peer, press_context
from tierkv.model.source import load_transformers_model
from tierkv.sampling import SamplingParams


class Backend(Protocol):
    """One KV-cache method on one model, as the harness drives it."""

    name: str

    def kv_bytes_per_token(self) -> float:
        """KV bytes one token of a long prompt costs, over all layers and KV heads."""
        ...

    def teacher_forced(self, windows: list[list[int]], prefix: int) -> torch.Tensor:
        """Log-probs [W, T - prefix, V] of the next token at each position past ``prefix``.

        Each window of T tokens: its first ``prefix`` tokens are the prompt; every later token
        is fed as the true next token, and row ``i`` is the distribution over token
        ``prefix + i`` given everything before it.
        """
        ...

    def greedy(
        self, prompts: list[list[int]], max_new: int, stop_at_eos: bool = False
    ) -> list[list[int]]:
        """``max_new`` greedy tokens after each prompt.

        End of sequence is ignored unless ``stop_at_eos``; then an answer may end early, with
        the EOS token as its last token.
        """
        ...

    def measured_greedy(self, prompt: list[int], max_new: int) -> tuple[list[int], float]:
        """Greedy tokens of one prompt run alone, and the KV bytes per token it held."""
        ...

    def forced_paths(self, prompts: list[list[int]], paths: list[list[int]]) -> list[torch.Tensor]:
        """Log-probs [len(path), V] of each prompt's next tokens, teacher-forced along ``path``.

        Prompts may differ in length (unlike ``teacher_forced``'s windows).
        """
        ...


class EngineBackend:
    """A tierkv KV policy, run through an ``Engine`` shared by every policy of a sweep."""

    def __init__(self, engine: Engine, policy: str, measure_ids: list[int]) -> None:
        self.engine = engine
        self.policy = policy
        self.name = policy
        # The long prompt of real text on which bytes per token are measured: a pruning
        # policy keeps a number of tokens that depends on the text.
        self.measure_ids = measure_ids

    def kv_bytes_per_token(self, ids: list[int] | None = None) -> float:
        """Pool bytes per token held by one request after its long prompt and one decode step.

        Read from ``Engine.kv_stats()["kv_bytes_per_token_measured"]`` with this request
        alone in the engine: pages, page-table entries and every per-token field included,
        plus the partly filled last page of each head. One decode step past the prompt, so a
        differentiated policy has made its decisions and returned the pages they emptied.
        ``ids`` is the prompt (default: the sweep's ``measure_ids``).
        """
        return self.measured_greedy(self.measure_ids if ids is None else ids, 3)[1]

    def measured_greedy(self, prompt: list[int], max_new: int) -> tuple[list[int], float]:
        """Greedy tokens of ``prompt`` alone in the engine, bytes measured after one decode step.

        The measurement is ``kv_bytes_per_token``'s, taken on the way: a task's own prompts
        give the bytes at that task's context length for the price of running it.
        """
        if self.engine.has_unfinished():
            raise RuntimeError("measured_greedy needs an idle engine: bytes are per request")
        if max_new < 3:
            # Read after the first decode step, while the request still holds its pages.
            raise ValueError(f"measured_greedy needs max_new >= 3, got {max_new}")
        rid = self.engine.add_request(prompt, self._params(max_tokens=max_new))
        measured: float | None = None
        tokens: list[int] = []
        try:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.request_id != rid:
                        continue
                    tokens = out.outputs[0].token_ids
                    if measured is None and len(tokens) >= 2:
                        measured = self.engine.kv_stats()["kv_bytes_per_token_measured"]
        finally:
            self.engine.abort(rid)
        return list(tokens), float(measured or 0.0)

    def teacher_forced(self, windows: list[list[int]], prefix: int) -> torch.Tensor:
        rows = self.forced_paths([w[:prefix] for w in windows], [w[prefix:] for w in windows])
        return torch.stack(rows)

    def greedy(
        self, prompts: list[list[int]], max_new: int, stop_at_eos: bool = False
    ) -> list[list[int]]:
        # One engine run for every prompt: the engine batches them continuously.
        params = self._params(max_tokens=max_new, ignore_eos=not stop_at_eos)
        ids = [self.engine.add_request(p, params) for p in prompts]
        return [out.token_ids for out in self._run(ids)]

    def forced_paths(self, prompts: list[list[int]], paths: list[list[int]]) -> list[torch.Tensor]:
        params = self._params(max_tokens=None)
        ids = [
            self.engine.add_request(p, params, forced_output=f)
            for p, f in zip(prompts, paths, strict=True)
        ]
        return [out.outputs[0].forced_logprobs for out in self._run(ids)]

    def _run(self, ids: list[str]) -> list[Any]:
        """Step the engine until every request is done; their final outputs, in ``ids`` order."""
        done: dict[str, Any] = {}
        with self._no_preemption():
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
        return [done[rid] for rid in ids]

    def _params(self, max_tokens: int | None, ignore_eos: bool = True) -> SamplingParams:
        # Out of the prefix cache: a method computes every prompt itself, whatever pages an
        # earlier method's run left, so two runs of one method score the same.
        return SamplingParams(
            temperature=0,
            max_tokens=max_tokens,
            ignore_eos=ignore_eos,
            kv_policy=self.policy,
            prefix_caching=False,
        )

    @contextmanager
    def _no_preemption(self) -> Iterator[None]:
        """Refuse a run in which a request was preempted: its recompute would be re-scored."""
        before = self.engine.scheduler.num_preemptions
        yield
        if self.engine.scheduler.num_preemptions != before:
            raise RuntimeError(
                "a request was preempted during a fidelity run; give the engine a larger "
                "kv_cache_memory so that every window fits at once"
            )


class HFBackend:
    """A peer method (``tierkv.eval.peers.Peer``) on the transformers model of a checkpoint.

    The prompt is prefilled in one forward (inside the peer's press, if any, which compresses
    it there); every later token is fed one decode step at a time at its true position, so the
    cache a peer builds during decoding is the one its predictions read.
    """

    def __init__(
        self, model: Any, peer: Peer, measure_len: int, eos_ids: frozenset[int] = frozenset()
    ) -> None:
        self.model = model
        self.peer = peer
        self.name = peer.name
        self.measure_len = measure_len
        self.eos_ids = eos_ids

    def kv_bytes_per_token(self, length: int | None = None) -> float:
        """Analytic bytes per token of a ``length``-token prompt (default: ``measure_len``)."""
        c = self.model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        shape = (c.num_hidden_layers, c.num_key_value_heads, head_dim)
        return self.peer.bytes_per_token(shape, self.measure_len if length is None else length)

    def measured_greedy(self, prompt: list[int], max_new: int) -> tuple[list[int], float]:
        return self.greedy([prompt], max_new)[0], self.kv_bytes_per_token(len(prompt))

    @torch.no_grad()
    def forced_paths(self, prompts: list[list[int]], paths: list[list[int]]) -> list[torch.Tensor]:
        # One sequence at a time: prompts differ in length and a press must not see padding.
        return [
            self.teacher_forced([p + f], len(p))[0] for p, f in zip(prompts, paths, strict=True)
        ]

    @torch.no_grad()
    def teacher_forced(self, windows: list[list[int]], prefix: int) -> torch.Tensor:
        ids = torch.tensor(windows, dtype=torch.int64)
        cache, logits = self._prefill(ids[:, :prefix])
        rows = [logits]
        for t in range(prefix, ids.shape[1] - 1):
            rows.append(self._decode(cache, ids[:, t : t + 1], t))
        return torch.stack([torch.log_softmax(r.float(), dim=-1) for r in rows], dim=1)

    @torch.no_grad()
    def greedy(
        self, prompts: list[list[int]], max_new: int, stop_at_eos: bool = False
    ) -> list[list[int]]:
        # Equal-length prompts run as one batch (no padding to confuse a press).
        by_len: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            by_len.setdefault(len(p), []).append(i)
        out: list[list[int]] = [[] for _ in prompts]
        for length, rows in by_len.items():
            ids = torch.tensor([prompts[i] for i in rows], dtype=torch.int64)
            cache, logits = self._prefill(ids)
            tokens = [logits.argmax(-1)]
            for t in range(length, length + max_new - 1):
                tokens.append(self._decode(cache, tokens[-1][:, None], t).argmax(-1))
            for i, seq in zip(rows, torch.stack(tokens, dim=1).tolist(), strict=True):
                out[i] = cut_at_eos(seq, self.eos_ids) if stop_at_eos else seq
        return out

    def _prefill(self, ids: torch.Tensor) -> tuple[Any, torch.Tensor]:
        cache = self.peer.make_cache(self.model.config)
        with press_context(self.peer, self.model, ids.shape[1]):
            out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return cache, out.logits[:, -1]

    def _decode(self, cache: Any, ids: torch.Tensor, position: int) -> torch.Tensor:
        # A press shortens the cache: positions must come from the text, not the cache length.
        pos = torch.full((ids.shape[0], 1), position, dtype=torch.int64)
        out = self.model(input_ids=ids, past_key_values=cache, position_ids=pos, use_cache=True)
        return out.logits[:, -1]


def load_hf_model(path: str, dtype: torch.dtype) -> Any:
    """The transformers model of a checkpoint (a folder, a ``.gguf`` file through transformers'
    own GGUF loader, or ``smollm2``), in eval mode with SDPA attention (AdaKV needs it)."""
    return load_transformers_model(path, dtype, attn_implementation="sdpa")
