"""Time the triton backend's paged decode kernel and compare its achieved bandwidth with the
device's copy bandwidth (issue 20's GPU check). Writes JSON.

    python scripts/triton_decode_bench.py --json out.json  # a GPU: 32 x 8k, Llama-3-8B heads
    TRITON_INTERPRET=1 python scripts/triton_decode_bench.py --smoke  # CPU: tests the script

Random page bytes stand in for a cache (the kernel's time does not depend on the values); the
page table gives each (request, KV head) its own run of pages. Bytes read per call are every
visible token's codes, scales and zeros, keys and values.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tierkv.kv.backends.triton.backend import decode_pages  # noqa: E402
from tierkv.kv.formats.quant import FORMATS, default_page_bytes  # noqa: E402


def _timed(fn, device: torch.device, repeats: int) -> float:  # type: ignore[no-untyped-def]
    """Seconds per call, after a warm-up call."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--group", type=int, default=4, help="query heads per KV head")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--formats", default="k8v8,k8v4,k4v2")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="a tiny shape (CPU interpreter)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.smoke:
        args.batch, args.context, args.kv_heads, args.head_dim, args.repeats = 2, 64, 2, 64, 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    page_bytes = default_page_bytes(args.head_dim)
    results = []
    copy_src = torch.empty(256 * 2**20 if device.type == "cuda" else 2**20, dtype=torch.uint8)
    copy_src = copy_src.to(device)
    copy_dst = torch.empty_like(copy_src)
    copy_s = _timed(lambda: copy_dst.copy_(copy_src), device, args.repeats)
    copy_bw = 2 * copy_src.numel() / copy_s  # read + write
    for name in args.formats.split(","):
        fmt = FORMATS[name]
        layout = fmt.layout(args.head_dim, torch.bfloat16, page_bytes)
        per_page = layout.tokens_per_page
        pages = -(-args.context // per_page)
        rows = args.batch * args.kv_heads
        arena = torch.randint(0, 256, (rows * pages, page_bytes), dtype=torch.uint8)
        # Scales and zeros as small finite fp16 values: random bytes could be NaN.
        offsets = layout.offsets()
        for field in layout.fields:
            if field.dtype == torch.float16:
                span = per_page * field.numel * 2
                start = offsets[field.name]
                view = arena[:, start : start + span].view(torch.float16)
                view.uniform_(-0.05, 0.05)
        arena = arena.to(device)
        table = torch.arange(rows * pages, device=device).view(args.batch, args.kv_heads, pages)
        starts = torch.zeros(args.batch, dtype=torch.int64, device=device)
        ends = torch.full((args.batch,), args.context, dtype=torch.int64, device=device)
        q = torch.randn(args.batch, args.kv_heads * args.group, args.head_dim, device=device).to(
            torch.bfloat16
        )

        def call(fmt=fmt, layout=layout, arena=arena, table=table, q=q, s=starts, e=ends) -> None:  # type: ignore[no-untyped-def]
            decode_pages(q, arena, table, s, e, fmt, layout, args.kv_heads)

        seconds = _timed(call, device, args.repeats)
        token_bytes = sum(f.token_bytes for f in layout.fields if f.name not in ("score", "pos"))
        read = rows * args.context * token_bytes
        results.append(
            {
                "format": name,
                "seconds": seconds,
                "bytes_read": read,
                "bandwidth": read / seconds,
                "fraction_of_copy": read / seconds / copy_bw,
            }
        )
        print(
            f"{name}: {seconds * 1e3:.3f} ms, {read / seconds / 1e9:.1f} GB/s "
            f"({read / seconds / copy_bw:.0%} of copy {copy_bw / 1e9:.1f} GB/s)"
        )
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)",
        "shape": vars(args) | {"json": str(args.json)},
        "copy_bandwidth": copy_bw,
        "results": results,
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
