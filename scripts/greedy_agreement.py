"""Greedy agreement of KV policies with fp16 on the demo model, and their next-token KL.

For each policy: how many of ``--prompts`` held-out prompts of ``--prompt-len`` tokens give
exactly fp16's ``--tokens`` greedy tokens, the mean position of the first divergence, and the
mean and max KL(fp16 || policy) of the next-token distributions along fp16's own greedy
continuation (both engines teacher-forced on it, so every position is compared on the same
prefix). Issue 4's acceptance figure is ``k8v8`` at >= 95% of 64 prompts x 128 tokens.

    python scripts/greedy_agreement.py --policy k8v8 --policy k8v8:r=0
"""

from __future__ import annotations

import argparse

import torch

from tierkv import LLM, SamplingParams
from tierkv.eval.corpus import held_out_files, read_text


def _engine(model: str, policy: str, dtype: str, prompts: int) -> LLM:
    return LLM(model, dtype=dtype, kv_cache_memory="512MiB", max_num_seqs=prompts, kv_policy=policy)


def _forced_logprobs(llm: LLM, prompts: list[list[int]], outputs: list[list[int]]) -> torch.Tensor:
    """``[prompts, tokens, vocab]`` log-probs of ``llm`` along the given outputs."""
    engine = llm.engine
    ids = [
        engine.add_request(p, SamplingParams(temperature=0), forced_output=o)
        for p, o in zip(prompts, outputs, strict=True)
    ]
    rows = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                rows[out.request_id] = out.outputs[0].forced_logprobs
    return torch.stack([rows[i] for i in ids])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="assets/demo-model")
    parser.add_argument("--policy", action="append", help="policy to compare (repeatable)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--split", default="dev", choices=["dev", "test"])
    args = parser.parse_args()

    base = _engine(args.model, "fp16", args.dtype, args.prompts)
    ids = [i for text in read_text(held_out_files(args.split)) for i in base.tokenizer.encode(text)]
    stride = (len(ids) - args.prompt_len) // args.prompts
    prompts = [ids[j * stride : j * stride + args.prompt_len] for j in range(args.prompts)]
    greedy = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    reference = [o.token_ids for o in base.generate(prompts, greedy, use_tqdm=False)]
    ref_logprobs = _forced_logprobs(base, prompts, reference)
    for policy in args.policy or ["k8v8"]:
        llm = _engine(args.model, policy, args.dtype, args.prompts)
        outputs = [o.token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
        logprobs = _forced_logprobs(llm, prompts, reference)
        kl = (ref_logprobs.exp() * (ref_logprobs - logprobs)).sum(-1)
        same = sum(a == b for a, b in zip(reference, outputs, strict=True))
        first = [
            next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), args.tokens)
            for a, b in zip(reference, outputs, strict=True)
        ]
        n = args.prompts
        print(
            f"{llm.engine.policy.name} vs fp16 ({args.dtype}, {args.split}): identical "
            f"{same}/{n} ({same / n:.1%}), mean first divergence {sum(first) / n:.1f}/"
            f"{args.tokens}, mean KL {kl.mean():.2e}, max KL {kl.max():.2e}",
            flush=True,
        )


if __name__ == "__main__":
    main()
