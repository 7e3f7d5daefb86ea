"""No layer reads a value back from a tensor: everything the host needs about a step is worked
out once, before its first layer (``PagedAttention.plan``). On a GPU each such read would stall
the host once per layer; here, on CPU tensors, the test catches them by making every
tensor-to-Python conversion (``item``, ``int``, ``bool``, ``float``, ``tolist``) inside a
layer's attention raise."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from tierkv import LLM, SamplingParams
from tierkv.kv.attention.paged import PagedAttention

DEMO = Path(__file__).resolve().parent.parent / "assets" / "demo-model"
_CONVERSIONS = ("item", "__bool__", "__int__", "__float__", "__index__", "tolist")
# Uniform with and without a ring, uncompressed, the default (tiered with a ring), DiffKV's
# thresholds with pooling and no ring, and budget mode.
POLICIES = ("fp16", "k8v8", "k4v2:r=0", "default", "k8v4/k4v2:ah=1,al=0.02,pk=7,r=0", "default@0.3")


class HostSync(AssertionError):
    """A layer read a tensor's value on the host."""


def _track_layers(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """A flag, ``[True]`` while ``PagedAttention.__call__`` (a layer's attention) runs."""
    inside = [False]
    call = PagedAttention.__call__

    def layer(self: PagedAttention, *args: object) -> torch.Tensor:
        inside[0] = True
        try:
            return call(self, *args)  # type: ignore[arg-type]
        finally:
            inside[0] = False

    monkeypatch.setattr(PagedAttention, "__call__", layer)
    return inside


@contextmanager
def layers_may_not_sync(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Inside ``PagedAttention.__call__``, every tensor-to-Python conversion raises."""
    inside = _track_layers(monkeypatch)
    for name in _CONVERSIONS:
        original = getattr(torch.Tensor, name)

        def guarded(self: torch.Tensor, *args: object, _name: str = name, _f=original) -> object:  # type: ignore[no-untyped-def]
            if inside[0]:
                raise HostSync(f"Tensor.{_name} inside a layer's attention")
            return _f(self, *args)

        monkeypatch.setattr(torch.Tensor, name, guarded)
    yield


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_no_layer_reads_a_tensor_on_the_host(
    backend: str, policy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    llm = LLM(
        str(DEMO),
        dtype="float32",
        kv_policy=policy,
        attention_backend=backend,
        max_model_len=512,
        max_num_batched_tokens=160,
    )
    rng = random.Random(0)
    # Prompts over the token budget (chunked prefill beside decodes) and past the tiered
    # policies' recent window, so that decisions demote and prune.
    prompts = [[rng.randrange(5, 4000) for _ in range(n)] for n in (300, 150, 20)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    want = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    with layers_may_not_sync(monkeypatch):
        got = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == want


def test_the_guard_catches_a_step_planned_inside_its_first_layer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    llm = LLM(str(DEMO), dtype="float32", kv_policy="default", max_model_len=256)
    plan = PagedAttention.plan

    def late(self: PagedAttention, batch: object) -> object:
        # The runner's call (the first for a batch) does nothing: the first layer plans.
        if batch is not getattr(self, "_late", None):
            self._late = batch  # type: ignore[attr-defined]
            return None
        return plan(self, batch)  # type: ignore[arg-type]

    monkeypatch.setattr(PagedAttention, "plan", late)
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    with layers_may_not_sync(monkeypatch), pytest.raises(HostSync):
        llm.generate([[5, 6, 7, 8]], params, use_tqdm=False)


@pytest.mark.parametrize(
    ("backend", "policy", "planners"),
    [
        ("cpu", "fp16", ("plan_decode", "plan_full")),
        ("cpu", "k8v8", ("plan_decode", "plan_full")),
        ("torch", "k8v8", ("plan_pages",)),
    ],
)
def test_the_fast_backends_gather_a_steps_page_tables_in_plan(
    backend: str, policy: str, planners: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every layer's page table is gathered once per step by the backend's ``plan``, before
    the first layer, never inside a layer's attention (where it would wait on the host)."""
    from tierkv.kv.backends.cpu import ops as cpu_ops
    from tierkv.kv.backends.torch import ops as torch_ops

    ops = cpu_ops if backend == "cpu" else torch_ops
    inside, calls = _track_layers(monkeypatch), []
    for name in planners:
        original = getattr(ops, name)

        def spy(*args: object, _f=original, **kwargs: object) -> None:  # type: ignore[no-untyped-def]
            calls.append(inside[0])
            _f(*args, **kwargs)

        monkeypatch.setattr(ops, name, spy)
    llm = LLM(str(DEMO), dtype="float32", kv_policy=policy, attention_backend=backend)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    llm.generate([[5, 6, 7, 8], [9, 10, 11]], params, use_tqdm=False)
    # One gather per decode step (5 after the prompts' step), none inside a layer.
    assert calls and not any(calls) and len(calls) == 5
