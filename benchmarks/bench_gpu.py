"""GPU benchmark: WAN 14B-shaped blocks at 480p-like token counts, swapped vs resident.

For each blocks-swapped fraction it reports, from one run: forward time and the ratio to the
all-resident forward, achieved H2D GB/s (bytes / CUDA-event copy time) against the pinned bandwidth
measured here, stall ms per forward, peak allocated/reserved VRAM, pinned bytes, D2H bytes.

    python benchmarks/bench_gpu.py [--layers 40] [--sizes 480x832x81,320x576x33] [--forwards 2]
        [--dtype bf16] [--json out.json]

Sizes are pixel height x width x frames; tokens = (frames-1)/4+1 x h/16 x w/16 as for WAN's VAE
(8x spatial, 4x temporal) and 1x2x2 patches.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _pack import import_pack  # noqa: E402

import_pack()
from wan22_blockswap.block_manager import BlockSwapEngine, place_resident  # noqa: E402
from wan22_blockswap.config import SwapSettings  # noqa: E402
from wan22_blockswap.tiny_wan import WanModel, make_inputs, wan14b_config  # noqa: E402
from wan22_blockswap.utils import format_bytes  # noqa: E402

log = logging.getLogger("wan22_blockswap.bench_gpu")
DEV = torch.device("cuda")


def build_model(layers: int, dtype) -> WanModel:
    """14B-shaped WAN in host RAM; weights drawn on the GPU block by block (fast), then moved out."""
    with torch.device("meta"):
        model = WanModel(wan14b_config(num_layers=layers), dtype=dtype)
    model = model.to_empty(device=DEV)
    model.init_weights(seed=0)
    for b in model.blocks:
        b.to("cpu")
    torch.cuda.empty_cache()
    return model.eval()


def pinned_bandwidth(nbytes: int) -> float:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=DEV)
    dev.copy_(host, non_blocking=True)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dev.copy_(host, non_blocking=True)
    end.record()
    end.synchronize()
    return 10 * nbytes / (start.elapsed_time(end) / 1e3) / 1e9


def timed_forwards(model, inputs, n: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        model(**inputs)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / n


def run_size(model, size: str, fractions, forwards: int, dtype, bw: float) -> list:
    h, w, f = (int(v) for v in size.split("x"))
    cfg = model.config
    inputs = make_inputs(cfg, frames=(f - 1) // 4 + 1, height=h // 8, width=w // 8, text_len=512,
                         dtype=dtype, device=DEV)
    tokens = ((f - 1) // 4 + 1) * (h // 16) * (w // 16)
    rows = []
    layers = len(model.blocks)
    for frac in fractions:
        n = round(frac * layers)
        engine = BlockSwapEngine.from_settings(model, SwapSettings(blocks_to_swap=n, prefetch_blocks=1), DEV).setup()
        place_resident(model, engine.plan, DEV)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            model(**inputs)  # warm-up; learns the order
            torch.cuda.synchronize()
            engine.tracker.reset_counters()
            ms = timed_forwards(model, inputs, forwards)
        engine._drain_timings()
        t = engine.tracker
        copy_ms = sum(t.copy_ms.values())
        rows.append({
            "size": size, "tokens": tokens, "blocks_swapped": n, "forward_ms": ms,
            "h2d_gb_s": (t.h2d_bytes / (copy_ms / 1e3) / 1e9) if copy_ms else 0.0,
            "pinned_gb_s": bw, "stall_ms_per_forward": sum(t.stall_ms.values()) / forwards,
            "copy_ms_per_forward": copy_ms / forwards,
            "peak_allocated": torch.cuda.max_memory_allocated(), "peak_reserved": torch.cuda.max_memory_reserved(),
            "pinned_bytes": t.pinned_bytes, "d2h_bytes": t.d2h_bytes, "stalls": t.stalls,
            "prefetch_hits": t.prefetch_hits})
        engine.teardown(device="cpu")
        for b in model.blocks:  # teardown put streamed blocks back on the host; keep all there
            b.to("cpu")
        torch.cuda.empty_cache()
        log.info("%s", rows[-1])
    base = rows[0]["forward_ms"]
    for r in rows:
        r["ratio"] = r["forward_ms"] / base
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--sizes", default="480x832x81,320x576x33")
    ap.add_argument("--fractions", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--forwards", type=int, default=2)
    ap.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        log.error("no CUDA device: this benchmark needs a GPU")
        return 2
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    model = build_model(args.layers, dtype)
    block_bytes = sum(p.numel() * p.element_size() for p in model.blocks[0].parameters())
    bw = pinned_bandwidth(block_bytes)
    props = torch.cuda.get_device_properties(DEV)
    info = {"gpu": props.name, "vram": props.total_memory, "torch": torch.__version__,
            "cuda": torch.version.cuda, "layers": args.layers, "dtype": args.dtype,
            "block_bytes": block_bytes, "pinned_gb_s": bw}
    log.info("%s", info)
    fractions = [float(x) for x in args.fractions.split(",")]
    rows = []
    for size in args.sizes.split(","):
        rows += run_size(model, size, fractions, args.forwards, dtype, bw)
    log.info("GPU %s, torch %s, CUDA %s, %d layers %s, block %s, pinned H2D %.1f GB/s",
             props.name, torch.__version__, torch.version.cuda, args.layers, args.dtype,
             format_bytes(block_bytes), bw)
    log.info("| size | tokens | swapped | forward ms | ratio | H2D GB/s | stall ms/fwd | peak alloc | peak reserved | pinned | D2H |")
    log.info("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        log.info("| %s | %d | %d | %.1f | %.3f | %.1f | %.1f | %s | %s | %s | %d |", r["size"], r["tokens"],
                 r["blocks_swapped"], r["forward_ms"], r["ratio"], r["h2d_gb_s"], r["stall_ms_per_forward"],
                 format_bytes(r["peak_allocated"]), format_bytes(r["peak_reserved"]),
                 format_bytes(r["pinned_bytes"]), r["d2h_bytes"])
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
