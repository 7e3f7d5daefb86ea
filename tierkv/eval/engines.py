"""The engine a task runs on: one loaded model shared by every policy of a call."""

from __future__ import annotations

from typing import Any

from tierkv.config import EngineConfig
from tierkv.engine.engine import Engine


def engine_for(model: Any, **engine_kwargs: Any) -> Engine:
    """``model`` itself when it is an ``Engine``, else a new engine on that path.

    Task functions take either, so that a tuning script loads the model once for many calls.
    Prefix caching is off unless asked for. The pool defaults to 2 GiB: a real model's batch
    of chat prompts, or one 8k-token needle prompt per method, must fit without preemption
    (a preempted request would be re-scored).
    """
    if isinstance(model, Engine):
        return model
    engine_kwargs.setdefault("kv_cache_memory", "2GiB")
    # Each method computes its prompts itself, as the peers do: a prefix hit on pages another
    # method's run left would compare rounding, not policies.
    engine_kwargs.setdefault("enable_prefix_caching", False)
    return Engine(EngineConfig.from_kwargs(str(model), **engine_kwargs))
