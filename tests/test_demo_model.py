"""The shipped demo model and the corpus/retrieval definitions it was trained with."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tierkv.eval import corpus
from tierkv.eval.retrieval import make_retrieval_example

MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo-model"
WINDOWS, WINDOW_LEN = 4, 512
# Nats/token the model must beat the unigram baseline by: far below what training reaches,
# far above what an untrained or broken model could show.
MARGIN = 1.0

needs_model = pytest.mark.skipif(
    not (MODEL_DIR / "config.json").exists(),
    reason=f"demo model not built: run scripts/train_demo_model.py to create {MODEL_DIR}",
)


def _stream(tok: Tokenizer, texts: list[str]) -> torch.Tensor:
    """Token ids of ``texts`` as one stream (the tokenizer prepends bos to each)."""
    return torch.tensor([i for enc in tok.encode_batch(texts) for i in enc.ids])


@pytest.fixture(scope="module")
def small_tokenizer() -> Tokenizer:
    """A tiny byte-level BPE, so the generator tests do not need the shipped model."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus.read_text(corpus.held_out_files("dev")), trainer)
    return tok


def test_splits_are_disjoint_and_complete() -> None:
    train = set(corpus.train_files())
    dev, test = set(corpus.held_out_files("dev")), set(corpus.held_out_files("test"))
    assert dev and test and len(train) > 100
    assert not (train & dev) and not (train & test) and not (dev & test)
    root = corpus.stdlib_root()
    for name in corpus.HELD_OUT["dev"] + corpus.HELD_OUT["test"]:
        assert (root / name).exists(), name


@pytest.mark.parametrize("context", [512, 1024, 2048])
def test_retrieval_example_shape(small_tokenizer: Tokenizer, context: int) -> None:
    filler = "\n".join(corpus.read_text(corpus.held_out_files("dev")))
    a = make_retrieval_example(random.Random(7), small_tokenizer, context, filler, n_queries=3)
    b = make_retrieval_example(random.Random(7), small_tokenizer, context, filler, n_queries=3)
    assert a == b  # a pure function of the rng state
    n_tokens = len(small_tokenizer.encode(a.prompt).ids)
    # Filler is cut at whole lines, so the prompt can fall short by about one line.
    assert context - max(32, context // 10) <= n_tokens <= context + 8
    key_block = a.prompt.split("\n\n", 1)[0] + "\n"
    assert f'CONFIG["{a.key}"] = "{a.answer}\n' in key_block
    assert a.prompt.endswith(f'assert CONFIG["{a.key}"] == "')
    assert a.prompt.count("assert CONFIG[") == 3
    assert a.answer.endswith('"') and len(a.answer) == 7


@needs_model
def test_heldout_loss_beats_unigram() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    tok = tokenizer.backend_tokenizer
    test_ids = _stream(tok, corpus.read_text(corpus.held_out_files("test")))
    stride = (len(test_ids) - WINDOW_LEN) // (WINDOWS - 1)
    batch = torch.stack([test_ids[i * stride : i * stride + WINDOW_LEN] for i in range(WINDOWS)])
    with torch.no_grad():
        logits = model(input_ids=batch).logits[:, :-1]
    targets = batch[:, 1:]
    model_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())

    # Unigram fitted on every 8th training file (enough counts for 4k types), add-one.
    train_ids = _stream(tok, corpus.read_text(corpus.train_files()[::8]))
    counts = torch.bincount(train_ids, minlength=len(tokenizer)).double() + 1.0
    unigram_loss = -(counts.log() - counts.sum().log())[targets].mean()

    assert model_loss.item() < unigram_loss.item() - MARGIN, (model_loss, unigram_loss)


@needs_model
def test_chat_template_and_special_tokens() -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text == "<|endoftext|><|user|>\nhi\n<|assistant|>\n"
    assert tokenizer.bos_token_id == tokenizer.eos_token_id != tokenizer.pad_token_id


@needs_model
def test_greedy_retrieval_at_1024() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    filler = "\n".join(corpus.read_text(corpus.held_out_files("test")))
    rng = random.Random(0)
    hits = 0
    for _ in range(10):
        ex = make_retrieval_example(rng, tokenizer, 1008, filler)
        ids = tokenizer(ex.prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=8, do_sample=False)
        hits += tokenizer.decode(out[0, ids.shape[1] :]).startswith(ex.answer)
    # The model card reports ~90% at 1024 on 50 examples; 7/10 leaves room for the spread
    # between example sets while still catching a model that cannot retrieve.
    assert hits >= 7, hits
