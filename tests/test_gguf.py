"""GGUF input: SmolLM2's GGUF and tiny GGUFs written here, against transformers' GGUF load."""

from __future__ import annotations

import threading
from pathlib import Path

import gguf
import pytest
import torch
from conftest import CHAT_TEMPLATE, VOCAB, build_checkpoint
from gguf_files import write_header_only_gguf, write_llama_gguf

from tierkv import LLM, SamplingParams
from tierkv.cli import main
from tierkv.model import bundled
from tierkv.model.gguf import SOURCE_FILE, materialize
from tierkv.model.source import ModelSource, load_transformers_model, resolve_model
from tierkv.tokenizer import Tokenizer

FP16 = {"kv_policy": "fp16"}  # the uncompressed cache: compared with transformers exactly
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def gguf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private GGUF cache: the tiny files of one test leave nothing in ~/.cache."""
    cache = tmp_path / "gguf-cache"
    monkeypatch.setenv("TIERKV_GGUF_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(an fp32 llama checkpoint, its F32 GGUF). Its head_dim (24) is not hidden / heads, and
    its q/k rows are permuted as llama.cpp stores them."""
    root = tmp_path_factory.mktemp("tiny")
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    checkpoint = build_checkpoint(root / "hf", "llama", rope_parameters=rope)
    return checkpoint, write_llama_gguf(checkpoint, root / "tiny-llama.gguf", CHAT_TEMPLATE)


def _tierkv_logprobs(llm: LLM, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens, and the log-probs [steps, V] at the prefill and at each decode step,
    teacher-forced along those tokens through the engine's real decode path."""
    greedy = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)
    tokens = llm.generate([prompt], greedy, use_tqdm=False)[0].token_ids
    engine = llm.engine
    rid = engine.add_request(prompt, greedy, forced_output=tokens)
    rows = None
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == rid and out.finished:
                rows = out.outputs[0].forced_logprobs
    assert rows is not None and rows.shape[0] == steps
    return tokens, rows


def _reference_logprobs(hf: torch.nn.Module, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1 :]
    return torch.log_softmax(logits.float(), dim=-1)


def test_smollm2_matches_transformers_gguf_load_at_prefill_and_16_decode_steps(
    smollm2: ModelSource,
) -> None:
    llm = LLM(
        bundled.SMOLLM2_NAME,
        dtype="float32",
        kv_cache_memory="64MiB",
        max_model_len=256,
        **FP16,
    )
    prompt = llm.engine.tokenizer.apply_chat_template(QUESTION)
    tokens, ours = _tierkv_logprobs(llm, prompt, steps=17)  # the prefill and 16 decode steps
    ref = _reference_logprobs(
        load_transformers_model(bundled.SMOLLM2_NAME, torch.float32), prompt, tokens
    )
    torch.testing.assert_close(ours, ref, atol=1e-3, rtol=0)
    assert ref.argmax(-1).tolist() == tokens  # transformers' greedy path is ours
    assert "Paris" in llm.engine.tokenizer.decode(tokens)


def test_smollm2_tokenizer_follows_the_gguf_metadata(smollm2: ModelSource) -> None:
    tok = Tokenizer(smollm2.folder)
    assert tok.hf.eos_token == "<|im_end|>" and tok.eos_token_ids == {2}
    assert tok.encode("Hello") == [19556]  # tokenizer.ggml.add_bos_token is false
    assert len(tok.hf) == 49152  # no infilling tokens past the model's vocabulary
    ids = tok.apply_chat_template(QUESTION)
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")


def test_short_name_resolves_to_the_wheel_gguf(smollm2: ModelSource) -> None:
    assert smollm2.gguf == bundled.smollm2_gguf().resolve()
    assert (smollm2.folder / "config.json").is_file()
    assert resolve_model(smollm2.folder) == smollm2  # the cached folder alone names its GGUF
    path, extra = smollm2.transformers_args()
    assert Path(path) / extra["gguf_file"] == smollm2.gguf


def test_generate_command_runs_smollm2(smollm2: ModelSource, capsys: pytest.CaptureFixture) -> None:
    argv = ["generate", "--model", "smollm2", "--max-tokens", "8", "--temperature", "0"]
    assert main([*argv, "--chat", "What is the capital of France?"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_tiny_gguf_matches_transformers_and_its_source_checkpoint(
    tiny: tuple[Path, Path], gguf_cache: Path
) -> None:
    checkpoint, path = tiny
    llm = LLM(str(path), dtype="float32", kv_cache_memory="16MiB", max_model_len=256, **FP16)
    prompt = [5, 17, 33, 81, 100, 200, 7, 9] * 4
    tokens, ours = _tierkv_logprobs(llm, prompt, steps=16)
    via_gguf = _reference_logprobs(
        load_transformers_model(str(path), torch.float32), prompt, tokens
    )
    torch.testing.assert_close(ours, via_gguf, atol=1e-4, rtol=1e-4)
    # F32 weights: the GGUF is the checkpoint itself once the q/k permutation is undone.
    source = _reference_logprobs(
        load_transformers_model(str(checkpoint), torch.float32), prompt, tokens
    )
    torch.testing.assert_close(ours, source, atol=1e-4, rtol=1e-4)
    assert ours.shape[-1] == VOCAB
    assert llm.engine.tokenizer.hf.chat_template == CHAT_TEMPLATE


def test_cache_folder_is_built_once_and_atomically(
    tiny: tuple[Path, Path], gguf_cache: Path
) -> None:
    _, path = tiny
    folders: list[Path] = []
    threads = [threading.Thread(target=lambda: folders.append(materialize(path))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(folders) == 2 and folders[0] == folders[1]
    assert [p.name for p in gguf_cache.iterdir()] == [folders[0].name]  # no temp dir left
    stamp = (folders[0] / SOURCE_FILE).stat().st_mtime_ns
    assert materialize(path) == folders[0]
    assert (folders[0] / SOURCE_FILE).stat().st_mtime_ns == stamp


def test_changed_gguf_gets_a_new_folder_and_the_old_one_is_refused(
    tiny: tuple[Path, Path], gguf_cache: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(tiny[1].read_bytes())
    old = resolve_model(copy).folder
    copy.write_bytes(copy.read_bytes())  # same bytes, new mtime
    assert resolve_model(copy).folder != old
    with pytest.raises(ValueError, match="changed after"):
        resolve_model(old)


@pytest.mark.parametrize("arch", ["gpt2", "falcon"])
def test_unsupported_architecture_is_named_with_the_supported_ones(
    arch: str, tmp_path: Path, gguf_cache: Path
) -> None:
    path = write_header_only_gguf(tmp_path / f"{arch}.gguf", arch)
    with pytest.raises(
        ValueError, match=f"architecture '{arch}'.*supported: llama, mistral, qwen2"
    ):
        LLM(str(path))


def test_quant_type_the_library_cannot_dequantize_is_named(
    tmp_path: Path, gguf_cache: Path
) -> None:
    q8k = gguf.GGMLQuantizationType.Q8_K
    path = write_header_only_gguf(tmp_path / "q8k.gguf", "llama", q8k)
    with pytest.raises(ValueError, match="quant type Q8_K"):
        resolve_model(path)


def test_rope_scaling_is_refused_not_dropped(tmp_path: Path, gguf_cache: Path) -> None:
    path = write_header_only_gguf(
        tmp_path / "yarn.gguf", "llama", **{"llama.rope.scaling.type": "yarn"}
    )
    with pytest.raises(ValueError, match=r"rope scaling \(yarn\)"):
        resolve_model(path)


def test_missing_gguf_and_non_gguf_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        resolve_model(tmp_path / "absent.gguf")
    text = tmp_path / "model.bin"
    text.write_text("not a gguf")
    with pytest.raises(ValueError, match="not a GGUF file"):
        resolve_model(text)
