"""LLM: the offline front door, modelled on vLLM's ``LLM`` class."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from tierkv.config import EngineConfig
from tierkv.engine.engine import Engine
from tierkv.engine.request import RequestOutput
from tierkv.sampling import SamplingParams
from tierkv.tokenizer import Message

Prompt = str | list[int]


class LLM:
    """Load a model once, then ``generate`` or ``chat`` over many prompts batched together.

    Example::

        llm = LLM("assets/demo-model", kv_cache_memory="512MiB")
        out = llm.generate("def fibonacci(n):", SamplingParams(temperature=0, max_tokens=32))
        print(out[0].text)
    """

    def __init__(self, model: str, **engine_kwargs: Any) -> None:
        self.engine = Engine(EngineConfig.from_kwargs(model, **engine_kwargs))

    @property
    def tokenizer(self) -> Any:
        """The Hugging Face tokenizer of the model."""
        return self.engine.tokenizer.hf

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Complete each prompt (a string, a list of strings or a list of token-id lists).

        ``sampling_params`` is one for all prompts or one per prompt. Outputs come back in the
        order of the prompts. A request that fails on its own (its sampling raised) comes back
        finished with ``finish_reason == "error"`` and the reason in ``error``; the others
        are unaffected.
        """
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        return self._run(list(prompts), sampling_params, use_tqdm)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Reply to one conversation or a list of them, through the model's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.engine.tokenizer.apply_chat_template(c) for c in conversations]
        return self._run(prompts, sampling_params, use_tqdm)

    def kv_stats(self) -> dict[str, Any]:
        """KV pool usage and scheduler counters (see ``Engine.kv_stats``)."""
        return self.engine.kv_stats()

    def _run(
        self,
        prompts: list[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None,
        use_tqdm: bool,
    ) -> list[RequestOutput]:
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(
                    f"got {len(params)} sampling params for {len(prompts)} prompts; "
                    "pass one for all or one per prompt"
                )
        # Validate everything before queuing anything, so a bad prompt loses nothing.
        ids = []
        try:
            for prompt, p in zip(prompts, params, strict=True):
                ids.append(self.engine.add_request(prompt, p))
        except Exception:
            for rid in ids:
                self.engine.abort(rid)
            raise
        order = {rid: i for i, rid in enumerate(ids)}
        results: list[RequestOutput | None] = [None] * len(ids)
        with tqdm(total=len(ids), desc="generate", unit="req", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.finished:
                        results[order[out.request_id]] = out
                        bar.update(1)
        return [r for r in results if r is not None]
