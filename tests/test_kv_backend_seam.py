"""The optional kernels behind ``KVBackend`` (tiered decode, writes, compaction): every backend
serves a format pair or refuses it by name, what the chain picks follows its order, and every
backend's tiered decode, called through the interface, gives the reference backend's output
and adds the same scores to the store."""

from __future__ import annotations

import copy

import pytest
import torch
from kv_stores import KV_HEADS, LAYER, tiered_store

from tierkv.kv.attention.tiered_step import _unit_host
from tierkv.kv.backends import REGISTRY, DecodeStep, chain
from tierkv.kv.backends.routing import BackendChain
from tierkv.kv.formats.quant import FORMATS
from tierkv.kv.store.kv_store import HIGH, LOW, KVStore

CPU = torch.device("cpu")
QUANTIZED = [f for f in FORMATS.values() if f.quantized]


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_backend_serves_or_refuses_every_tier_pair_by_name(name: str) -> None:
    backend = REGISTRY[name]
    for high in QUANTIZED:
        for low in QUANTIZED:
            pair = (high, low)
            for why in (
                backend.tiered_refusal(pair, 64, torch.float32, CPU),
                backend.compact_refusal(pair, 64, CPU),
            ):
                assert why is None or name in why or high.name in why or low.name in why
        why = backend.write_refusal(high, 64, torch.float32, CPU)
        assert why is None or name in why or high.name in why
    # A device a backend cannot run on is refused, never attempted.
    meta = torch.device("meta")
    pair = (FORMATS["k8v4"], FORMATS["k4v2"])
    for why in (
        backend.tiered_refusal(pair, 64, torch.float32, meta),
        backend.compact_refusal(pair, 64, meta),
        backend.write_refusal(FORMATS["k8v4"], 64, torch.float32, meta),
    ):
        assert why is None or "meta" in why or name in why


def test_reference_serves_every_tiered_decode_and_ends_every_chain() -> None:
    reference = REGISTRY["reference"]
    for high in QUANTIZED:
        for low in QUANTIZED:
            assert reference.tiered_refusal((high, low), 96, torch.bfloat16, CPU) is None


def test_the_chain_picks_the_first_backend_that_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    store, slots, _, _ = tiered_store("k8v4/k4v2-g32:ah=10,al=4,w=8,sw=16", 4, None)
    formats = tuple(int(f) for f in store.slot_format[int(slots[0])])
    picked = BackendChain("fast", chain("fast"), store)
    assert picked.tiered(formats) is chain("fast")[0]
    only_reference = BackendChain("reference", chain("reference"), store)
    assert only_reference.tiered(formats) is REGISTRY["reference"]
    # Without a compaction or write kernel in the chain, the torch paths do the work.
    assert only_reference.compactor(formats) is None
    assert only_reference.writer(formats[HIGH]) is None
    # A backend that refuses is passed over for the next one, not called.
    cpu = REGISTRY["cpu"]
    if cpu.unavailable() is None:
        monkeypatch.setattr(cpu, "tiered_refusal", lambda *a: "refused for the test")
        assert BackendChain("cpu", chain("cpu"), store).tiered(formats) is REGISTRY["reference"]


def _scores(store: KVStore, slots: torch.Tensor) -> torch.Tensor:
    high = store.read_tier(LAYER, slots, HIGH, ("score",))
    low = store.read_tier(LAYER, slots, LOW, ("score",))
    return torch.cat([high.fields["score"], low.fields["score"]], 2)[..., 0]


@pytest.mark.parametrize("window", [None, 23])
@pytest.mark.parametrize(
    "spec", ["k8v4/k4v2-g32:ah=10,al=4,w=8,sw=16", "k8v8/k4v4:ah=10,al=4,r=4,w=8,sw=16"]
)
def test_every_tiered_decode_gives_the_reference_output_and_scores(
    spec: str, window: int | None
) -> None:
    store, slots, q, query_pos = tiered_store(spec, KV_HEADS * 3, window)
    formats = tuple(int(f) for f in store.slot_format[int(slots[0])])
    pair = (store.formats[formats[HIGH]], store.formats[formats[LOW]])
    results = {}
    for name, backend in REGISTRY.items():
        if backend.unavailable() or backend.tiered_refusal(pair, 64, q.dtype, CPU):
            continue
        copy_ = copy.deepcopy(store)
        host = _unit_host(copy_, slots, query_pos[:, None], 0)
        residual = None
        if host.recent and not backend.reads_rings_in_place:
            residual = copy_.read_residual(LAYER, slots, host.ring_pages)
        before = _scores(copy_, slots)
        out = backend.tiered_decode(
            DecodeStep(copy_), LAYER, q, slots, query_pos, window, host, residual
        )
        results[name] = (out, _scores(copy_, slots) - before)
    want_out, want_added = results.pop("reference")
    assert want_added.sum() > 0  # the decode scored something
    assert results, "no fast backend serves the pair here"
    for name, (out, added) in results.items():
        torch.testing.assert_close(out, want_out, rtol=1e-5, atol=3e-4, msg=name)
        torch.testing.assert_close(added, want_added, rtol=1e-5, atol=1e-6, msg=name)
