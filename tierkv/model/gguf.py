"""GGUF checkpoints (llama.cpp, Ollama): checked, described as a Hugging Face folder, and
dequantized at load.

Design, measured on SmolLM2-135M-Instruct Q4_1 (98 MB, 272 tensors) on 2 shared cores:

- A GGUF is turned once into a small folder under ``~/.cache/tierkv/gguf/<stem>-<key>`` (the key
  hashes the file's absolute path, size, mtime and ``FORMAT_VERSION``): ``config.json``,
  ``generation_config.json``, the tokenizer files with the chat template, and ``SOURCE_FILE``
  naming the GGUF. Everything that reads a model folder (``read_spec``, ``Tokenizer``, the
  benchmarks) then works unchanged. Building it parses the GGUF header three times (our check,
  transformers' config, transformers' tokenizer; ``GGUFReader`` takes 3.5-7 s for SmolLM2's
  49k-token vocabulary each time), so it is done once and cached. The folder is written to a
  temporary directory and renamed into place: a reader sees a whole folder or none, and two
  processes that race each build one and the loser's rename fails harmlessly; nobody waits on
  a lock.
- The weights are not copied into the cache: each load reads the GGUF again and dequantizes it
  with the ``gguf`` library, one tensor at a time, straight into the compute dtype (a 7B GGUF
  dequantized to fp32 on disk would cost 28 GB). transformers' tensor processors apply the
  per-architecture fixes (llama's q/k row permutation undone); the names come from the
  ``gguf`` library's table. One tensor at a time rather than
  ``load_gguf_checkpoint(return_tensors=True)``: the same dequantizing time at 880 MB peak RSS
  instead of 1,260 MB, and for a 7B model one fp32 tensor in flight instead of all 28 GB of
  them. A SmolLM2 engine loads in about 9 s from the cache (reader 4-7 s, dequantizing 3 s),
  after about 13 s to build the folder the first time.
- Refused before transformers is asked anything: an architecture outside ``ARCHITECTURES``,
  a quant type the installed ``gguf`` cannot dequantize, and rope scaling (transformers drops
  it when reading a GGUF, so honouring the file is not possible through it).
- The tokenizer comes from ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` and keeps its
  Rust backend, but its special tokens come from the GGUF's own metadata: transformers 5.2's
  llama converter names the BOS token as EOS, adds a BOS token whatever
  ``tokenizer.ggml.add_bos_token`` says (SmolLM2: EOS ``<|im_end|>``, no BOS) and appends
  CodeLlama's infilling tokens past the vocabulary.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

FORMAT_VERSION = 1
"""Bump when the cached folder's contents change: old folders are then ignored."""
SOURCE_FILE = "gguf-source.json"
"""The file in a cached folder that names its GGUF (and the size and mtime it was made from)."""

# GGUF ``general.architecture`` -> the transformers class tierkv's loader knows it by.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def cache_root() -> Path:
    """Where GGUF folders are cached: ``$TIERKV_GGUF_CACHE``, else ``$XDG_CACHE_HOME/tierkv/gguf``
    (``~/.cache`` by default)."""
    if os.environ.get("TIERKV_GGUF_CACHE"):
        return Path(os.environ["TIERKV_GGUF_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tierkv" / "gguf"


def is_gguf(path: Path) -> bool:
    """Whether ``path`` is a GGUF file (by its magic bytes, whatever its name)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def open_gguf(path: Path) -> gguf.GGUFReader:
    """Read a GGUF's header, refusing what tierkv cannot run with an error that names it."""
    reader = gguf.GGUFReader(path)
    arch = _field(reader, "general.architecture")
    types = sorted({t.tensor_type.name for t in reader.tensors})
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"unsupported GGUF architecture {arch!r} (tensor types {', '.join(types)}) in {path}; "
            f"supported: {', '.join(ARCHITECTURES)}"
        )
    unreadable = sorted(
        {t.tensor_type.name for t in reader.tensors if not _dequantizable(t.tensor_type)}
    )
    if unreadable:
        raise ValueError(
            f"unsupported GGUF quant type {', '.join(unreadable)} in {path}: the installed "
            f"gguf {version('gguf')} cannot dequantize it (tierkv computes in bf16/fp32 and "
            "dequantizes every tensor at load)"
        )
    scaling = _field(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none") or any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise ValueError(
            f"unsupported rope scaling ({scaling or 'rope_freqs.weight'}) in GGUF {path}: "
            "transformers does not read it from GGUF metadata; load the Hugging Face "
            "checkpoint instead"
        )
    return reader


def materialize(path: Path) -> Path:
    """The cached Hugging Face-style folder of the GGUF at ``path``, built on first use."""
    path = path.resolve()
    stat = path.stat()
    key = f"{FORMAT_VERSION}\0{path}\0{stat.st_size}\0{stat.st_mtime_ns}"
    root = cache_root()
    final = root / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if (final / SOURCE_FILE).is_file():  # folders appear whole, by rename
        return final
    reader = open_gguf(path)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        _write_folder(path, reader, tmp)
        source = {"gguf": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / SOURCE_FILE).is_file():  # not a race lost to another process
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def gguf_source(folder: Path) -> Path | None:
    """The GGUF a cached folder was made from, or ``None`` for an ordinary model folder.

    Raises ``ValueError`` when that GGUF has changed or gone since: its config would be stale.
    """
    marker = Path(folder) / SOURCE_FILE
    if not marker.is_file():
        return None
    source = json.loads(marker.read_text())
    path = Path(source["gguf"])
    try:
        stat = path.stat()
    except OSError as err:
        raise ValueError(f"{folder} was made from {path}, which is gone") from err
    if (stat.st_size, stat.st_mtime_ns) != (source["size"], source["mtime_ns"]):
        raise ValueError(f"{path} changed after {folder} was made from it; load the .gguf itself")
    return path


def read_tensors(path: Path, folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Hugging Face-named float tensors of the GGUF at ``path`` (whose cached folder is
    ``folder``), dequantized one at a time by the ``gguf`` library, with transformers'
    per-architecture fixes applied (llama's q/k permutation undone)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    reader = open_gguf(path)
    arch = _field(reader, "general.architecture")
    config = AutoConfig.from_pretrained(folder)
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict())
    with torch.device("meta"):  # only the parameter names are needed: no memory, no init
        skeleton = AutoModelForCausalLM.from_config(config)
    names = _gguf_to_hf_names(list(skeleton.state_dict()), arch, config.num_hidden_layers)
    for info in reader.tensors:
        result = processor.process(
            weights=gguf.dequantize(info.data, info.tensor_type),
            name=info.name,
            tensor_key_mapping=names,
            parsed_parameters={},
        )
        if result.name not in names:
            raise ValueError(f"GGUF tensor {info.name} in {path} has no place in a {arch} model")
        weights = result.weights
        if not weights.flags.writeable:  # F32 tensors are views of the read-only file mapping
            weights = np.array(weights)
        yield names[result.name], torch.from_numpy(weights)


def _gguf_to_hf_names(hf_names: list[str], arch: str, num_layers: int) -> dict[str, str]:
    """GGUF tensor name -> transformers parameter name, from the ``gguf`` library's name table.

    What transformers' ``get_gguf_hf_weights_map`` computes, without its recursion into every
    submodule, which rebuilds the table once per module (8 s of a 20 s SmolLM2 load).
    """
    # llama.cpp stores Mistral models as "llama"; its table has no "mistral".
    arch_name = "llama" if arch == "mistral" else arch
    table = gguf.get_tensor_name_map(
        next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch_name), num_layers
    )
    names = {}
    for hf_name in hf_names:
        base, _, suffix = hf_name.rpartition(".")
        gguf_name = table.get_name(base)
        if gguf_name is not None:
            names[f"{gguf_name}.{suffix}"] = hf_name
    return names


def _write_folder(path: Path, reader: gguf.GGUFReader, out: Path) -> None:
    from transformers import AutoConfig, GenerationConfig

    arch = _field(reader, "general.architecture")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers lists every GGUF key it does not use
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    # model_type is the GGUF architecture, or mistral for a llama GGUF named so.
    config.architectures = [ARCHITECTURES[config.model_type]]
    # transformers maps a Qwen3 GGUF's head size nowhere and falls back to hidden / heads.
    key_length = _field(reader, f"{arch}.attention.key_length")
    if key_length is not None:
        config.head_dim = int(key_length)
    special = _special_tokens(reader)
    config.save_pretrained(out)
    ids = {k: special[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    GenerationConfig(**{k: v for k, v in ids.items() if v is not None}).save_pretrained(out)
    _write_tokenizer(path, reader, special, out)


def _write_tokenizer(
    path: Path, reader: gguf.GGUFReader, special: dict[str, Any], out: Path
) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if "tokenizer.ggml.tokens" not in reader.fields:
        raise ValueError(f"GGUF {path} carries no tokenizer (tokenizer.ggml.tokens)")
    hf = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # transformers picks CodeLlamaTokenizer for llama GGUFs, which appends five infilling tokens
    # (<FILL_ME>, ...) past the model's vocabulary: keep only the GGUF's own tokens.
    spec = json.loads(hf.backend_tokenizer.to_str())
    size = len(reader.fields["tokenizer.ggml.tokens"].data)
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < size]
    tokens = Tokenizer.from_str(json.dumps(spec))
    add_bos = _field(reader, "tokenizer.ggml.add_bos_token")
    add_eos = _field(reader, "tokenizer.ggml.add_eos_token")

    def token(kind: str) -> str | None:
        index = special[f"{kind}_token_id"]
        return None if index is None else tokens.id_to_token(index)

    PreTrainedTokenizerFast(
        tokenizer_object=tokens,
        bos_token=token("bos"),
        eos_token=token("eos"),
        unk_token=token("unk"),
        pad_token=token("pad"),
        # Absent flags keep what transformers' converter chose for this vocabulary.
        add_bos_token=bool(getattr(hf, "add_bos_token", False)) if add_bos is None else add_bos,
        add_eos_token=bool(add_eos),
        chat_template=hf.chat_template,
        # transformers' converter turns the cleanup on, which rewrites " ," as ","; without
        # it a byte-level vocabulary decodes text exactly as it was encoded.
        clean_up_tokenization_spaces=False,
    ).save_pretrained(out)


def _special_tokens(reader: gguf.GGUFReader) -> dict[str, int | None]:
    return {
        f"{kind}_token_id": _field(reader, f"tokenizer.ggml.{field}_token_id")
        for kind, field in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))
    }


def _field(reader: gguf.GGUFReader, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


@functools.cache
def _dequantizable(qtype: gguf.GGMLQuantizationType) -> bool:
    # Asking the library with one block of zeros: its list of supported types is private.
    try:
        _, type_size = gguf.GGML_QUANT_SIZES[qtype]
        gguf.dequantize(np.zeros((1, type_size), np.uint8), qtype)
    except (KeyError, NotImplementedError):
        return False
    return True
