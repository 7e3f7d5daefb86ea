"""Train the tierkv demo model: a small Llama on the Python standard library, on CPU.

The recipe is seeded and resumable. It trains a byte-level BPE tokenizer on the training
split of the stdlib sources (see ``tierkv.eval.corpus``), then a ``LlamaForCausalLM`` with
grouped-query attention on a mix of ordinary code windows and synthetic key/value retrieval
documents (``tierkv.eval.retrieval``). A length curriculum goes from 256- to 2048-token
sequences: copying from context forms cheaply on short sequences, and the final phase
teaches the model to use all 2048 positions. Checkpoints (resumable state plus an exported
model in ``--out``) are written every few minutes, so a usable model exists even if the run
is cut off. After training, the model in ``--out`` is evaluated (held-out loss against a
unigram baseline, retrieval accuracy at 512/1024/2048 tokens) and its model card is written.

Every batch is a pure function of (seed, step), so resuming reproduces the same run.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # run as a script from a checkout without installing

from tierkv.eval import corpus  # noqa: E402
from tierkv.eval.retrieval import make_retrieval_example  # noqa: E402

EOT, PAD, USER, ASSISTANT, SYSTEM = (
    "<|endoftext|>",
    "<|pad|>",
    "<|user|>",
    "<|assistant|>",
    "<|system|>",
)
SPECIAL_TOKENS = [EOT, PAD, USER, ASSISTANT, SYSTEM]  # ids 0..4, in this order
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
MAX_POSITIONS = 2048
# Retrieval evaluation: prompt plus answer must fit in the context, so the prompt is this
# many tokens shorter than the nominal context length.
ANSWER_ROOM = 16
EVAL_CONTEXTS = (512, 1024, 2048)
EVAL_N_KEYS = 8


@dataclass(frozen=True)
class Phase:
    """One stage of the length curriculum, active until ``until`` of the token budget.

    Rows are retrieval documents with probability ``retrieval_frac``, code otherwise.
    """

    until: float
    seq_len: int
    retrieval_frac: float
    retrieval_ctx: tuple[int, int]


# Retrieval documents dominate the short first phase: copying must form there, and a
# sparser mix (half the rows, a few queries each, 4096 tokens per step) left the answer
# loss at chance after 500 steps. Accuracy falls with distance, so the 2048-token phase is
# the longest and the most retrieval-heavy.
CURRICULUM = (
    Phase(until=0.35, seq_len=256, retrieval_frac=0.7, retrieval_ctx=(48, 240)),
    Phase(until=0.60, seq_len=512, retrieval_frac=0.5, retrieval_ctx=(128, 496)),
    Phase(until=0.72, seq_len=1024, retrieval_frac=0.6, retrieval_ctx=(256, 1008)),
    Phase(until=1.00, seq_len=2048, retrieval_frac=0.7, retrieval_ctx=(1024, 2032)),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT / "assets" / "demo-model",
        help="exported model directory (config, weights, tokenizer, model card)",
    )
    p.add_argument(
        "--ckpt-dir",
        type=Path,
        default=REPO_ROOT / "scripts" / ".train_ckpt",
        help="resumable state, cached tokenizer and token ids (git-ignored)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for init and data")
    p.add_argument(
        "--total-tokens",
        type=int,
        default=8_000_000,
        help="training tokens; the curriculum and LR schedule are fractions of it",
    )
    p.add_argument(
        "--tokens-per-step",
        type=int,
        default=2048,
        help="tokens per optimizer step (batch size = this / sequence length)",
    )
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--warmup-steps", type=int, default=100, help="linear warmup steps")
    p.add_argument("--layers", type=int, default=4, help="transformer layers")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size")
    p.add_argument(
        "--max-minutes",
        type=float,
        default=70.0,
        help="stop training after this much wall time (summed over resumes)",
    )
    p.add_argument("--ckpt-minutes", type=float, default=5.0, help="checkpoint interval")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1 is faster than 2 when the 2-core machine is shared)",
    )
    p.add_argument(
        "--no-bf16",
        action="store_true",
        help="train in fp32 instead of bf16 autocast (autocast is ~2x faster on "
        "CPUs with AVX512-BF16/AMX)",
    )
    p.add_argument("--resume", action="store_true", help="continue from --ckpt-dir state")
    p.add_argument(
        "--eval-only",
        action="store_true",
        help="skip training: evaluate --out and rewrite its model card",
    )
    p.add_argument(
        "--eval-examples", type=int, default=50, help="retrieval examples per context length"
    )
    p.add_argument("--log-every", type=int, default=25, help="steps between progress lines")
    return p.parse_args(argv)


def log(msg: str) -> None:
    """Print a timestamped progress line."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer whose post-processor prepends ``<|endoftext|>``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    eot = tok.token_to_id(EOT)
    # BOS on every encoded sequence: training samples all start with it too.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{EOT} $A", pair=f"{EOT} $A {EOT} $B", special_tokens=[(EOT, eot)]
    )
    return tok


def tokenizer_config() -> dict[str, object]:
    """The ``tokenizer_config.json`` contents, written by hand so that the class name and
    keys load with transformers 4.x as well as 5.x."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOT,
        "eos_token": EOT,
        "pad_token": PAD,
        "additional_special_tokens": [USER, ASSISTANT, SYSTEM],
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": MAX_POSITIONS,
        "clean_up_tokenization_spaces": False,
    }


def load_or_train_tokenizer(ckpt_dir: Path, texts: list[str], vocab_size: int) -> Tokenizer:
    """Reuse the cached tokenizer so resumed runs and re-evaluations see the same ids."""
    path = ckpt_dir / "tokenizer.json"
    if path.exists():
        return Tokenizer.from_file(str(path))
    t0 = time.time()
    tok = train_tokenizer(texts, vocab_size)
    tok.save(str(path))
    log(f"trained tokenizer (vocab {tok.get_vocab_size()}) in {time.time() - t0:.0f}s")
    return tok


def encode_documents(tok: Tokenizer, texts: list[str]) -> torch.Tensor:
    """Encode ``texts`` into one stream, each document starting with ``<|endoftext|>``."""
    ids: list[int] = []
    for enc in tok.encode_batch(texts):  # the post-processor adds the leading EOT
        ids.extend(enc.ids)
    return torch.tensor(ids, dtype=torch.int32)


# ----------------------------------------------------------------------------- data


class BatchMaker:
    """Builds the batch of a given step; deterministic in (seed, step)."""

    def __init__(self, tok: Tokenizer, train_ids: torch.Tensor, filler_text: str, seed: int):
        self.tok = tok
        self.train_ids = train_ids
        self.filler_text = filler_text
        self.seed = seed
        self.eot = tok.token_to_id(EOT)

    def _code(self, rng: random.Random, n: int) -> list[int]:
        # A window of the token stream, always led by EOT like a fresh document.
        start = rng.randrange(len(self.train_ids) - n)
        return [self.eot, *self.train_ids[start : start + n - 1].tolist()]

    def _retrieval(self, rng: random.Random, phase: Phase) -> tuple[list[int], range]:
        ctx = rng.randint(*phase.retrieval_ctx)
        # A key costs ~28 tokens (assignment plus query): more keys only where there is room.
        n_keys = rng.randint(2, max(2, min(12, ctx // 32)))
        # Query every key: each query is a retrieval target, so this densifies the signal.
        ex = make_retrieval_example(
            rng, self.tok, ctx, self.filler_text, n_keys=n_keys, n_queries=n_keys
        )
        prompt = self.tok.encode(ex.prompt).ids  # with leading EOT
        answer = self.tok.encode(ex.answer + "\n", add_special_tokens=False).ids
        ids = (prompt + answer)[: phase.seq_len]
        n_answer = len(self.tok.encode(ex.answer, add_special_tokens=False).ids)
        answer_pos = range(len(prompt), min(len(prompt) + n_answer, len(ids)))
        if len(ids) < phase.seq_len:  # fill the row with code rather than padding
            ids += self._code(rng, phase.seq_len - len(ids))
        return ids, answer_pos

    def batch(self, step: int, phase: Phase, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (input ids, mask of retrieval-answer target positions) for ``step``."""
        rng = random.Random(self.seed * 1_000_003 + step)
        rows: list[list[int]] = []
        answer_mask = torch.zeros(batch_size, phase.seq_len, dtype=torch.bool)
        for b in range(batch_size):
            if rng.random() < phase.retrieval_frac:
                ids, pos = self._retrieval(rng, phase)
                answer_mask[b, pos.start : pos.stop] = True
            else:
                ids = self._code(rng, phase.seq_len)
            rows.append(ids)
        return torch.tensor(rows, dtype=torch.long), answer_mask


# ----------------------------------------------------------------------------- model


def model_config(tok: Tokenizer, layers: int) -> LlamaConfig:
    """The demo architecture: 4 query heads sharing 2 KV heads, head_dim 64, 2048 positions."""
    eot, pad = tok.token_to_id(EOT), tok.token_to_id(PAD)
    return LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=MAX_POSITIONS,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=pad,
    )


def export(model: LlamaForCausalLM, tok: Tokenizer, out: Path, note: str) -> None:
    """Write fp16 weights, config, tokenizer and generation config to ``out``.

    ``note`` becomes a placeholder model card; the evaluated card replaces it at the end.
    """
    out.mkdir(parents=True, exist_ok=True)
    # A converted copy keeps the embedding/lm_head tie, so the tied matrix is stored once.
    half = copy.deepcopy(model).to(torch.float16)
    half.generation_config = GenerationConfig(
        bos_token_id=model.config.bos_token_id,
        eos_token_id=model.config.eos_token_id,
        pad_token_id=model.config.pad_token_id,
    )
    half.save_pretrained(out)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
    (out / "README.md").write_text(f"# tierkv demo model (unevaluated)\n\n{note}\n")


def lr_at(step: int, total_steps: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of ``peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def plan_steps(total_tokens: int, tokens_per_step: int) -> list[tuple[int, Phase]]:
    """Return the step at which each curriculum phase ends, with the phase."""
    plan, step = [], 0
    prev = 0.0
    for phase in CURRICULUM:
        step += round((phase.until - prev) * total_tokens / tokens_per_step)
        plan.append((step, phase))
        prev = phase.until
    return plan


def phase_of(step: int, plan: list[tuple[int, Phase]]) -> Phase:
    """The curriculum phase that ``step`` belongs to."""
    return next((phase for end, phase in plan if step < end), plan[-1][1])


def save_state(path: Path, **state: object) -> None:
    """Atomically write the resumable training state."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def train(args: argparse.Namespace, tok: Tokenizer, train_texts: list[str]) -> None:
    """Run (or resume) training, exporting to ``args.out`` at every checkpoint."""
    state_path = args.ckpt_dir / "train_state.pt"
    ids_path = args.ckpt_dir / "train_ids.pt"
    if ids_path.exists():
        train_ids = torch.load(ids_path)
    else:
        train_ids = encode_documents(tok, train_texts)
        torch.save(train_ids, ids_path)
    log(f"training stream: {len(train_ids):,} tokens from {len(train_texts)} files")

    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(model_config(tok, args.layers))
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    plan = plan_steps(args.total_tokens, args.tokens_per_step)
    total_steps = plan[-1][0]
    step, elapsed, tokens_seen = 0, 0.0, 0
    command = shlex.join(["python", *sys.argv])
    if args.resume and state_path.exists():
        state = torch.load(state_path, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, elapsed, tokens_seen = state["step"], state["elapsed"], state["tokens"]
        command = state["command"]
        log(f"resumed at step {step}/{total_steps} ({elapsed / 60:.1f} min so far)")
    log(f"model: {n_params:,} parameters; {total_steps} steps of {args.tokens_per_step} tokens")

    data = BatchMaker(tok, train_ids, "\n".join(train_texts), args.seed)
    model.train()
    t_start, t_ckpt = time.time() - elapsed, time.time()
    # Running sums over the log window: all tokens and retrieval answers.
    sums = {"loss": 0.0, "answer": 0.0}
    counts = {"loss": 0, "answer": 0}
    window_tok = 0
    t_window = time.time()

    def checkpoint(final: bool) -> None:
        elapsed_now = time.time() - t_start
        save_state(
            state_path,
            model=model.state_dict(),
            optimizer=opt.state_dict(),
            step=step,
            elapsed=elapsed_now,
            tokens=tokens_seen,
            command=command,
        )
        meta = {
            "parameters": n_params,
            "steps": step,
            "total_steps": total_steps,
            "tokens": tokens_seen,
            "wall_minutes": round(elapsed_now / 60, 1),
            "command": command,
            "finished": final,
        }
        (args.ckpt_dir / "train_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        export(model, tok, args.out, f"Checkpoint at step {step}/{total_steps}: {meta}")
        log(f"checkpoint at step {step} ({elapsed_now / 60:.1f} min)")

    while step < total_steps:
        if time.time() - t_start > args.max_minutes * 60:
            log(f"--max-minutes reached at step {step}/{total_steps}; stopping early")
            break
        phase = phase_of(step, plan)
        batch_size = max(1, args.tokens_per_step // phase.seq_len)
        ids, answer_mask = data.batch(step, phase, batch_size)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total_steps, args.lr, args.warmup_steps)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.no_bf16):
            logits = model(input_ids=ids).logits
        # Per-token loss in fp32, so the answer-token loss can be logged separately.
        nll = F.cross_entropy(
            logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(), reduction="none"
        ).view(batch_size, -1)
        loss = nll.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens_seen += ids.numel()
        window_tok += ids.numel()
        sums["loss"] += loss.item()
        counts["loss"] += 1
        answer = answer_mask[:, 1:]
        sums["answer"] += nll.detach()[answer].sum().item()
        counts["answer"] += int(answer.sum())
        if step % args.log_every == 0 or step == total_steps:
            now = time.time()
            avg = {k: sums[k] / counts[k] if counts[k] else float("nan") for k in sums}
            log(
                f"step {step}/{total_steps} seq {phase.seq_len} loss {avg['loss']:.3f} "
                f"answer-loss {avg['answer']:.3f} "
                f"lr {opt.param_groups[0]['lr']:.2e} "
                f"{window_tok / (now - t_window):.0f} tok/s {(now - t_start) / 60:.1f} min"
            )
            sums = dict.fromkeys(sums, 0.0)
            counts = dict.fromkeys(counts, 0)
            window_tok = 0
            t_window = now
        if time.time() - t_ckpt > args.ckpt_minutes * 60:
            checkpoint(final=False)
            t_ckpt = time.time()
    checkpoint(final=step >= total_steps)


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def heldout_nll(model: LlamaForCausalLM, ids: torch.Tensor, window: int) -> torch.Tensor:
    """Per-token NLL of ``ids`` under ``model``, scored in non-overlapping windows.

    Returns the NLL of every token except the first of each window (which has no context).
    """
    out = []
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start : start + window].long()[None]
        if chunk.shape[1] < 2:
            break
        logits = model(input_ids=chunk).logits[0, :-1].float()
        out.append(F.cross_entropy(logits, chunk[0, 1:], reduction="none"))
    return torch.cat(out)


def unigram_nll(train_ids: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Per-token NLL of ``targets`` under an add-one-smoothed unigram fit on ``train_ids``."""
    counts = torch.bincount(train_ids.long(), minlength=vocab_size).double() + 1.0
    logp = counts.log() - counts.sum().log()
    return -logp[targets.long()]


@torch.no_grad()
def retrieval_accuracy(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    filler_text: str,
    context: int,
    n: int,
    seed: int,
) -> float:
    """Greedy exact-match accuracy on ``n`` retrieval prompts fitting in ``context`` tokens."""
    rng = random.Random(seed)
    hits = 0
    for _ in range(n):
        ex = make_retrieval_example(
            rng, tokenizer, context - ANSWER_ROOM, filler_text, n_keys=EVAL_N_KEYS
        )
        ids = tokenizer(ex.prompt, return_tensors="pt").input_ids
        n_new = len(tokenizer(ex.answer, add_special_tokens=False).input_ids) + 1
        out = model.generate(ids, max_new_tokens=n_new, do_sample=False)
        hits += tokenizer.decode(out[0, ids.shape[1] :]).startswith(ex.answer)
    return hits / n


def evaluate(args: argparse.Namespace, train_ids: torch.Tensor) -> dict[str, float]:
    """Evaluate the exported model in ``args.out`` (fp16 weights, fp32 compute)."""
    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(args.out)
    model = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32).eval()
    test_text = corpus.read_text(corpus.held_out_files("test"))
    test_ids = encode_documents(tokenizer.backend_tokenizer, test_text)
    nll = heldout_nll(model, test_ids, MAX_POSITIONS)
    # The same targets the model scored: every token but each window's first.
    keep = torch.ones(len(test_ids), dtype=torch.bool)
    keep[::MAX_POSITIONS] = False
    uni = unigram_nll(train_ids, test_ids[keep], len(tokenizer))
    results: dict[str, float] = {
        "test_tokens": float(len(nll)),
        "test_loss": nll.mean().item(),
        "unigram_loss": uni.mean().item(),
    }
    log(f"held-out loss {results['test_loss']:.3f} vs unigram {results['unigram_loss']:.3f}")
    filler = "\n".join(test_text)
    for context in EVAL_CONTEXTS:
        acc = retrieval_accuracy(
            model, tokenizer, filler, context, args.eval_examples, seed=args.seed + context
        )
        results[f"retrieval_{context}"] = acc
        log(f"retrieval accuracy at {context}: {acc:.0%}")
    results["eval_seconds"] = time.time() - t0
    return results


def write_model_card(out: Path, meta: dict[str, object], results: dict[str, float]) -> None:
    """Write ``out/README.md`` with the training facts and the evaluation results."""
    config = json.loads((out / "config.json").read_text())
    size_mb = sum(p.stat().st_size for p in out.iterdir() if p.is_file()) / 1e6
    test_modules = ", ".join(f"`{m}`" for m in corpus.HELD_OUT["test"])
    dev_modules = ", ".join(f"`{m}`" for m in corpus.HELD_OUT["dev"])
    ppl, uni_ppl = math.exp(results["test_loss"]), math.exp(results["unigram_loss"])
    n = int(results.get("n_examples", 0))
    retrieval_rows = "\n".join(
        f"| {c} | {results[f'retrieval_{c}']:.0%} ({round(results[f'retrieval_{c}'] * n)}/{n}) |"
        for c in EVAL_CONTEXTS
    )
    status = (
        ""
        if meta.get("finished", True)
        else f" of {meta['total_steps']} planned (the run did not reach the end)"
    )
    command = str(meta.get("command", "python scripts/train_demo_model.py"))
    # The recorded command (with the script's defaults) is the authoritative hyperparameter set.
    run = parse_args(shlex.split(command)[2:])
    curriculum = "\n".join(
        f"  - up to {p.until:.0%}: {p.seq_len}-token rows, {p.retrieval_frac:.0%} retrieval "
        f"documents of {p.retrieval_ctx[0]}–{p.retrieval_ctx[1]} tokens" + ", the rest code windows"
        for p in CURRICULUM
    )
    tokens = f"{meta['tokens']:,} in {meta['steps']} steps" if meta else "not recorded"
    throughput = f"{meta['tokens'] / (meta['wall_minutes'] * 60):.0f} tokens/s" if meta else "?"
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    n_params = f"{meta['parameters']:,}" if meta else "?"
    rope_theta = config["rope_parameters"]["rope_theta"]
    card = f"""# tierkv demo model

A small Llama-architecture causal LM trained from scratch on CPU on the Python standard
library's source, with synthetic key/value retrieval documents so that some heads learn
sharp long-range copying. It exists so that tierkv's KV-cache policies can be measured on a
real model offline. It is not a useful code model.

## Architecture

- `LlamaForCausalLM` (transformers), {n_params} parameters, fp16 safetensors
  ({size_mb:.1f} MB directory).
- {config["num_hidden_layers"]} layers, hidden size {config["hidden_size"]}, \
MLP {config["intermediate_size"]}, tied embeddings.
- {config["num_attention_heads"]} query heads sharing {config["num_key_value_heads"]} \
KV heads (GQA), head_dim {config["head_dim"]}, RoPE theta {rope_theta:g}, \
{config["max_position_embeddings"]} positions.
- Tokenizer: byte-level BPE, vocabulary {config["vocab_size"]}, trained on the training
  split. Special tokens: `<|endoftext|>` (bos = eos, prepended to every encoded text),
  `<|pad|>`, `<|user|>`, `<|assistant|>`, `<|system|>`.
- Chat template (in `tokenizer_config.json`): `<|role|>\\ncontent\\n` per message. The
  model never saw chat data, so chat output is code-like noise: use it only to exercise the
  serving path.

## Training

- Data: stdlib `.py` files of CPython {python} (`tierkv.eval.corpus.train_files()`: everything
  except `test/`, `idlelib/`, `lib2to3/`, `site-packages/` and the held-out modules),
  interleaved with retrieval documents whose filler is training-split code.
- Curriculum, by fraction of the token budget:
{curriculum}
- Optimizer: AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), peak LR {run.lr:g}, \
{run.warmup_steps} warmup steps, cosine decay to 10%, gradient clip 1.0, \
{run.tokens_per_step} tokens per step, {"fp32" if run.no_bf16 else "bf16 autocast"}, \
seed {run.seed}.
- Training tokens: {tokens}{status}.
- Wall time: {meta.get("wall_minutes", "?")} minutes of training ({throughput}) with \
{run.threads} torch thread(s) on a 2-core CPU shared with other work.
- Command: `{command}`

Reproduce with `python scripts/train_demo_model.py` (seeded; every batch is a function of
seed and step, so `--resume` continues the same run). `--eval-only` re-runs the evaluation
below and rewrites this card.

## Evaluation

Held-out split (`tierkv.eval.corpus.HELD_OUT`):

- test: {test_modules}
- dev: {dev_modules}

Scored on the test split ({int(results["test_tokens"]):,} tokens, non-overlapping 2048-token
windows, fp32 compute on the fp16 weights):

| model | loss (nats/token) | perplexity |
|---|---|---|
| this model | {results["test_loss"]:.3f} | {ppl:.1f} |
| unigram (training tokens, add-one) | {results["unigram_loss"]:.3f} | {uni_ppl:.1f} |

Retrieval accuracy (greedy decoding, exact match of the value and its closing quote,
{n} examples per length, {EVAL_N_KEYS} keys, filler from the test split; the prompt is
{ANSWER_ROOM} tokens shorter than the context length so the answer fits; with {n} examples
the standard error of each figure is up to {50 / math.sqrt(max(n, 1)):.0f} points):

| context (tokens) | accuracy |
|---|---|
{retrieval_rows}

## Retrieval format

Generated by `tierkv.eval.retrieval.make_retrieval_example(rng, tokenizer, context_tokens,
filler_text, n_keys=..., n_queries=...)`, which returns `RetrievalExample(prompt, answer,
...)`:

```python
CONFIG = {{}}
CONFIG["cache_limit"] = "3fa9c0"
CONFIG["retry_path"] = "b71e2d"
...                                   # n_keys assignments, random keys and 6-hex values

<real stdlib code, whole lines, filling the prompt to about context_tokens tokens>

assert CONFIG["retry_path"] == "b71e2d"   # n_queries - 1 answered queries
assert CONFIG["cache_limit"] == "         # the prompt ends here; answer: 3fa9c0"
```
"""
    (out / "README.md").write_text(card)


def main(argv: list[str] | None = None) -> None:
    """Train (unless ``--eval-only``), then evaluate and write the model card."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()  # keep the training log readable
    args.ckpt_dir.mkdir(parents=True, exist_ok=True)
    train_texts = corpus.read_text(corpus.train_files())
    if not args.eval_only:
        tok = load_or_train_tokenizer(args.ckpt_dir, train_texts, args.vocab_size)
        train(args, tok, train_texts)
    # The unigram baseline uses the exported tokenizer, so --eval-only needs no checkpoint.
    train_ids = encode_documents(Tokenizer.from_file(str(args.out / "tokenizer.json")), train_texts)
    meta_path = args.ckpt_dir / "train_meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    results = evaluate(args, train_ids)
    results["n_examples"] = args.eval_examples
    write_model_card(args.out, meta, results)
    log(f"wrote {args.out / 'README.md'} (evaluation took {results['eval_seconds']:.0f}s)")


if __name__ == "__main__":
    main()
