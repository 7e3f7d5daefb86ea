"""The linear layers of one decode step against the number of rows (requests in the step).

For a checkpoint's shapes (every layer's fused q/k/v, output, fused gate/up and down projections,
then the LM head), random weights in the chosen dtype: one "step" applies each of them once to
M rows, in layer order, so the weights stream from memory as they do in the engine. Reports per
M the step's milliseconds, milliseconds per row and GFLOP/s, for torch's ``F.linear`` and for
``tierkv.model.layers.Linear`` as the engine runs it (after ``prepack``: oneDNN over weights
reordered once, the native kernel for one row of a weight under ``RELEASE_BYTES``).

Why: on a GPU a decode step costs about the same at 4 and at 32 requests while the weight reads
dominate, and that is where fitting more requests into the same KV memory pays. On a CPU the
cost per row falls only as fast as the matrix product's efficiency at small M rises.

    python scripts/make_bench_model.py --out /tmp/qwen05-shape --layers 24 --hidden 896 \\
        --heads 14 --kv-heads 2 --intermediate 4864
    OMP_NUM_THREADS=1 python scripts/bench_linear.py --model /tmp/qwen05-shape
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import AutoConfig

from tierkv.model.layers import Linear, linear, pack_weight

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def step_shapes(model: str) -> list[tuple[int, int]]:
    """(in, out) of each linear layer of one decode step, in the engine's fused form, the
    output head last."""
    cfg = AutoConfig.from_pretrained(model)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * head_dim
    layer = [
        (cfg.hidden_size, qkv),
        (cfg.num_attention_heads * head_dim, cfg.hidden_size),
        (cfg.hidden_size, 2 * cfg.intermediate_size),
        (cfg.intermediate_size, cfg.hidden_size),
    ]
    return layer * cfg.num_hidden_layers + [(cfg.hidden_size, cfg.vocab_size)]


def step_seconds(layers: list, rows: int, repeat: int) -> float:
    """Median seconds of one step: every layer (a callable of x) once, ``rows`` rows each."""
    inputs = {
        layer.in_features: torch.randn(rows, layer.in_features, dtype=layer.weight.dtype)
        for layer in layers
    }
    for layer in layers:
        layer(inputs[layer.in_features])
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        for layer in layers:
            layer(inputs[layer.in_features])
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


class TorchLinear:
    """``F.linear`` over a layer's row-major weight."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight, self.in_features = weight, weight.shape[1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class TiedHead(TorchLinear):
    """A tied output head as the engine runs it: the embedding table is kept (the input reads
    it), with a packed copy (``Decoder.prepack``)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__(weight)
        self.packed = pack_weight(weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, packed=self.packed)


def engine_layers(plain: list[TorchLinear], tied: bool) -> list:
    """The layers of ``plain`` as the engine holds them after ``prepack``."""
    layers: list = []
    for i, layer in enumerate(plain):
        if tied and i == len(plain) - 1:
            layers.append(TiedHead(layer.weight))
            continue
        out, inp = layer.weight.shape
        module = Linear(inp, out, bias=False, dtype=layer.weight.dtype)
        module.weight.data.copy_(layer.weight)
        module.prepack()
        layers.append(module)
    return layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="assets/demo-model", help="checkpoint folder")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 12, 16, 32, 64, 512])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    shapes = step_shapes(args.model)
    plain = [TorchLinear(torch.randn(out, inp, dtype=dtype)) for inp, out in shapes]
    tied = bool(getattr(AutoConfig.from_pretrained(args.model), "tie_word_embeddings", False))
    engine = engine_layers(plain, tied)
    params = sum(layer.weight.numel() for layer in plain)
    head = "tied" if tied else "untied"
    print(f"{args.model}: {len(plain)} linear layers ({head} head), {params / 1e6:.1f}M weights,")
    print(f"{args.dtype}, {torch.get_num_threads()} thread(s)")
    print("| rows | F.linear ms/step | ms/row | GFLOP/s | engine ms/step | ms/row | GFLOP/s |")
    print("|---|---|---|---|---|---|---|")
    for rows in args.rows:
        cells = [str(rows)]
        for layers in (plain, engine):
            sec = step_seconds(layers, rows, args.repeat)
            flops = 2 * rows * params
            cells += [f"{sec * 1e3:.2f}", f"{sec * 1e3 / rows:.2f}", f"{flops / sec / 1e9:.0f}"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
