"""Build a random-weight Llama checkpoint larger than the demo model, for benchmarks.

The demo model (4.2M parameters, 8 MB in bfloat16) makes a decode step cost mostly Python and
operator dispatch, so achieved bandwidth says little there. The default shape here is the
56M-parameter Llama the throughput issue measured its peers on (8 layers, hidden 768, GQA
12/4 heads of 64, MLP 2048, the demo tokenizer's 4096-token vocabulary, untied head): about
50M parameters are read per decode step. Weights are random (nothing is downloaded); the
tokenizer is the demo model's.

    python scripts/make_bench_model.py --out /tmp/llama-56m
    OMP_NUM_THREADS=1 tierkv bench decode --model /tmp/llama-56m --dtype float32 ...
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

DEMO = Path(__file__).resolve().parent.parent / "assets" / "demo-model"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--max-len", type=int, default=16384)
    args = parser.parse_args()
    demo = LlamaConfig.from_pretrained(DEMO)
    config = LlamaConfig(
        vocab_size=demo.vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        max_position_embeddings=args.max_len,
        tie_word_embeddings=False,
        bos_token_id=demo.bos_token_id,
        eos_token_id=demo.eos_token_id,
        pad_token_id=demo.pad_token_id,
        architectures=["LlamaForCausalLM"],
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(args.out)
    for name in TOKENIZER_FILES:
        if (DEMO / name).exists():
            shutil.copy(DEMO / name, args.out / name)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.out}: {params / 1e6:.1f}M parameters")


if __name__ == "__main__":
    main()
