"""Every registered attention backend against ``reference``: each serves a format or refuses it
by name, and what it serves it decodes as the reference does, for every format, GQA groups 1-8
and head dims 64, 96 and 128; the tiered paths (output and the probabilities the scores are
built from) likewise."""

from __future__ import annotations

import math

import pytest
import torch
from kv_stores import CONTEXT, KV_HEADS, LAYER, tiered_store, uniform_store

from tierkv.kv.attention import tiered
from tierkv.kv.backends import BACKENDS, CHAINS, REGISTRY, DecodeGroup, DecodeStep, chain
from tierkv.kv.backends.cpu import ops as native
from tierkv.kv.formats.quant import FORMATS, QUANTIZED_BITS, KVFormat
from tierkv.kv.formats.rotation import rotation
from tierkv.kv.store.kv_store import LOW, RESIDUAL

HEAD_DIMS = (64, 96, 128)
GROUPS = range(1, 9)
CPU = torch.device("cpu")


def _variants(fmt: KVFormat) -> list[KVFormat]:
    if not fmt.quantized:
        return [fmt]
    return [fmt.with_group_size(g) for g in (16, 32, 64, 128)]


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_backend_serves_or_refuses_every_format_by_name(name: str) -> None:
    backend = REGISTRY[name]
    for fmt in [v for f in FORMATS.values() for v in _variants(f)]:
        for dim in HEAD_DIMS:
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                why = backend.refusal(fmt, dim, dtype, CPU)
                assert why is None or fmt.name in why or str(dtype) in why, (fmt, dim, why)
        # A device the backend cannot run on is refused by name too, never attempted.
        why = backend.refusal(fmt, 64, torch.float32, torch.device("meta"))
        assert why is None or "meta" in why or fmt.name in why


def test_reference_ends_every_chain_and_serves_everything() -> None:
    assert set(BACKENDS) == set(CHAINS)
    for name in CHAINS:
        assert chain(name)[-1] is REGISTRY["reference"]
    for fmt in FORMATS.values():
        assert REGISTRY["reference"].serves(fmt, 96, torch.bfloat16, CPU)
    with pytest.raises(ValueError, match="must be one of"):
        chain("gpu")


@pytest.mark.skipif(not native.available(), reason="the native kernels could not be built")
def test_the_cpu_kernel_table_is_the_format_table() -> None:
    # A new (key bits, value bits) pair is one entry of QUANTIZED_BITS plus the kernels'
    # instantiation list; this says when one was added without the other.
    assert native.kernel_bit_pairs() == frozenset(QUANTIZED_BITS)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("fmt", list(FORMATS.values()), ids=lambda f: f.name)
def test_every_backend_decodes_every_format_as_the_reference(fmt: KVFormat, head_dim: int) -> None:
    store, slots, _, f = uniform_store(fmt, head_dim)
    lens = torch.tensor(CONTEXT) + 1
    reference = REGISTRY["reference"]
    served = 0
    for group in GROUPS:
        q = torch.randn(len(CONTEXT), KV_HEADS * group, head_dim) * 2
        for window in (None, 9):
            group = DecodeGroup(f, None, slots, lens, int(lens.max()))
            want = reference.decode(DecodeStep(store), LAYER, q, group, window, None)
            for backend in REGISTRY.values():
                if backend is reference or not backend.serves(fmt, head_dim, q.dtype, CPU):
                    continue
                got = backend.decode(DecodeStep(store), LAYER, q.clone(), group, window, None)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=3e-5)
                served += 1
    # The test compares something wherever a fast backend exists for the format.
    if native.available() or fmt.quantized:
        assert served > 0


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("group", [1, 3, 8])
def test_tiered_paths_give_the_reference_output_and_scores(group: int, head_dim: int) -> None:
    window = 23
    store, slots, q, pos = tiered_store(
        "k8v8/k4v2:ah=10,al=4,w=8,sw=16",
        KV_HEADS * group,
        window,
        head_dim=head_dim,
        backend="reference",
        seed=KV_HEADS * group * head_dim,
    )
    # Values stored in the rotated basis are sqrt(block) times their size, their rounding too.
    atol = 3e-5 * math.sqrt(rotation(head_dim)[1])
    counts = store.count[slots, LAYER, :, :RESIDUAL]
    assert (counts[..., LOW] > 0).all()  # both tiers hold tokens
    want = tiered.attend(store, LAYER, q[:, None], slots, pos[:, None], window)
    fused = tiered.attend(store, LAYER, q[:, None], slots, pos[:, None], window, workspace={})
    torch.testing.assert_close(fused.out, want.out, rtol=1e-5, atol=atol)
    torch.testing.assert_close(fused.probs, want.probs, rtol=1e-5, atol=1e-6)
    if native.available():
        out, probs = native.tiered_decode(store, LAYER, q, slots, pos, window)
        torch.testing.assert_close(out, want.out[:, 0], rtol=1e-5, atol=atol)
        torch.testing.assert_close(probs, want.probs[:, :, :, 0], rtol=1e-5, atol=1e-6)
