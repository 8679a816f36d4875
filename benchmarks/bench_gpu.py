"""GPU benchmark: WAN 14B-shaped blocks at 480p-like token counts, swapped vs resident.

For each blocks-swapped fraction it reports, from one run: forward time and the ratio to the
all-resident forward (the row with 0 blocks swapped, always measured), achieved H2D GB/s (bytes /
CUDA-event copy time) against the pinned bandwidth measured here, stall ms per forward, peak
allocated/reserved VRAM during the forwards and during setup, pinned bytes, D2H bytes.

    python benchmarks/bench_gpu.py [--layers 40] [--sizes 480x832x81,320x576x33] [--forwards 2]
        [--dtype bf16] [--json out.json]

Sizes are pixel height x width x frames; tokens = (frames-1)/4+1 x h/16 x w/16 as for WAN's VAE
(8x spatial, 4x temporal) and 1x2x2 patches. The model is built one block at a time on the GPU and
kept in host RAM, so a 40-block 14B model needs no more VRAM than its resident part. The functions
here are the measuring primitives of ``benchmarks/gpu_check.py`` too; on a CPU they run without the
CUDA-only figures (``gpu_check.py --dry-run``).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _pack import import_pack  # noqa: E402

import_pack()
from wan22_blockswap.block_manager import BlockSwapEngine, place_resident  # noqa: E402
from wan22_blockswap.config import SwapSettings, tensor_bytes  # noqa: E402
from wan22_blockswap.tiny_wan import WanModel, make_inputs, wan14b_config  # noqa: E402
from wan22_blockswap.utils import format_bytes  # noqa: E402

log = logging.getLogger("wan22_blockswap.bench_gpu")


def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def build_model(config, dtype, device) -> WanModel:
    """A WAN of ``config`` whose blocks live in host RAM: each block is drawn on ``device`` (fast),
    then moved out, so at most one block is on the GPU at a time; the rest stays on ``device``."""
    with torch.device("meta"):
        model = WanModel(config, dtype=dtype)
    for name, child in model.named_children():
        if name != "blocks":
            child.to_empty(device=device)
    model.init_weights(seed=0)
    for i, block in enumerate(model.blocks):
        block.to_empty(device=device)
        model.init_weights(seed=1 + i, only=block)
        block.to("cpu")
    if is_cuda(device):
        torch.cuda.empty_cache()
    return model.eval()


def inputs_for(config, size: str, dtype, device) -> Dict[str, torch.Tensor]:
    h, w, f = (int(v) for v in size.split("x"))
    return make_inputs(config, frames=(f - 1) // 4 + 1, height=h // 8, width=w // 8, text_len=512,
                       dtype=dtype, device=device)


def tokens_of(size: str) -> int:
    h, w, f = (int(v) for v in size.split("x"))
    return ((f - 1) // 4 + 1) * (h // 16) * (w // 16)


def pinned_bandwidth(nbytes: int, device) -> Optional[float]:
    """H2D GB/s of a plain pinned copy of ``nbytes`` (the link's practical limit); None on a CPU."""
    if not is_cuda(device):
        return None
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dev.copy_(host, non_blocking=True)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dev.copy_(host, non_blocking=True)
    end.record()
    end.synchronize()
    return 10 * nbytes / (start.elapsed_time(end) / 1e3) / 1e9


def timed_forwards(model, inputs, n: int, device, between=None) -> float:
    """Milliseconds per forward over ``n`` forwards, with all their work finished."""
    with torch.inference_mode():
        if is_cuda(device):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n):
                model(**inputs)
            end.record()
            torch.cuda.synchronize(device)  # every stream, the engine's copy stream included
            return start.elapsed_time(end) / n
        t0 = time.perf_counter()
        for _ in range(n):
            model(**inputs)
        return (time.perf_counter() - t0) * 1e3 / n


def _peaks(device) -> Dict[str, Optional[int]]:
    if not is_cuda(device):
        return {"peak_allocated": None, "peak_reserved": None}
    return {"peak_allocated": torch.cuda.max_memory_allocated(device),
            "peak_reserved": torch.cuda.max_memory_reserved(device)}


def _reset_peaks(device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def measure_resident(model, inputs, forwards: int, device) -> Dict:
    """Everything on ``device``: the baseline every ratio is taken against."""
    model.to(device)
    with torch.inference_mode():
        model(**inputs)  # warm-up
    _reset_peaks(device)
    ms = timed_forwards(model, inputs, forwards, device)
    row = {"mode": "resident", "blocks_swapped": 0, "forward_ms": ms, **_peaks(device),
           "h2d_bytes_per_forward": 0, "d2h_bytes": 0, "stalls": 0}
    for b in model.blocks:
        b.to("cpu")
    if is_cuda(device):
        torch.cuda.empty_cache()
    return row


def measure_swap(model, inputs, settings: SwapSettings, forwards: int, device, *, bandwidth=None,
                 slot_transform=None, extras=None) -> Dict:
    """The pack's block swap with ``settings``: setup (its VRAM peak), a warm-up forward that learns
    the order, then ``forwards`` timed forwards whose figures are theirs alone."""
    _reset_peaks(device)
    engine = BlockSwapEngine.from_settings(model, settings, device).setup()
    place_resident(model, engine.plan, device)
    if slot_transform is not None:
        engine.set_slot_transform(slot_transform(engine), tag="bench", extras=extras(engine) if extras else None)
    load_peak = _peaks(device)["peak_allocated"]
    with torch.inference_mode():
        model(**inputs)  # warm-up; learns the order
    engine.synchronize()
    engine.reset_counters()
    _reset_peaks(device)
    ms = timed_forwards(model, inputs, forwards, device)
    engine.synchronize()
    t = engine.tracker
    copy_ms = sum(t.copy_ms.values())
    row = {"mode": "block swap", "blocks_swapped": len(engine.plan.block_indices), "forward_ms": ms,
           **_peaks(device), "peak_allocated_during_load": load_peak,
           "h2d_bytes_per_forward": t.h2d_bytes // max(1, t.forwards),
           "h2d_gb_s": (t.h2d_bytes / (copy_ms / 1e3) / 1e9) if copy_ms and is_cuda(device) else None,
           "pinned_gb_s": bandwidth, "copy_ms_per_forward": copy_ms / max(1, t.forwards),
           "stall_ms_per_forward": sum(t.stall_ms.values()) / max(1, t.forwards),
           "stalls": t.stalls, "prefetch_hits": t.prefetch_hits, "d2h_bytes": t.d2h_bytes,
           "setup_d2h_bytes": t.setup_d2h_bytes, "pinned_bytes": t.pinned_bytes,
           "host_bytes": t.host_bytes, "ring_bytes": engine.device_bytes, "forwards": t.forwards}
    engine.teardown(device="cpu")
    model.blocks.to("cpu")  # teardown put the streamed blocks back on the host; the resident ones too
    if is_cuda(device):
        torch.cuda.empty_cache()
    return row


def with_ratios(rows: List[Dict]) -> List[Dict]:
    """Each row's forward time over the resident row's (which must be among them)."""
    base = next(r for r in rows if r["mode"] == "resident")["forward_ms"]
    for r in rows:
        r["ratio"] = r["forward_ms"] / base
        if r.get("h2d_gb_s") and r.get("pinned_gb_s"):
            r["link_fraction"] = r["h2d_gb_s"] / r["pinned_gb_s"]
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--sizes", default="480x832x81,320x576x33")
    ap.add_argument("--fractions", default="0.25,0.5,0.75,1")
    ap.add_argument("--forwards", type=int, default=2)
    ap.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        log.error("no CUDA device: this benchmark needs a GPU (benchmarks/gpu_check.py --dry-run runs on a CPU)")
        return 2
    device = torch.device("cuda", torch.cuda.current_device())
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    config = wan14b_config(num_layers=args.layers)
    model = build_model(config, dtype, device)
    block_bytes = sum(tensor_bytes(p) for p in model.blocks[0].parameters())
    bw = pinned_bandwidth(block_bytes, device)
    props = torch.cuda.get_device_properties(device)
    info = {"gpu": props.name, "vram": props.total_memory, "torch": torch.__version__,
            "cuda": torch.version.cuda, "layers": args.layers, "dtype": args.dtype,
            "block_bytes": block_bytes, "pinned_gb_s": bw}
    log.info("%s", info)
    rows = []
    for size in args.sizes.split(","):
        inputs = inputs_for(config, size, dtype, device)
        size_rows = [measure_resident(model, inputs, args.forwards, device)]
        for frac in (float(x) for x in args.fractions.split(",")):
            n = round(frac * args.layers)
            size_rows.append(measure_swap(model, inputs, SwapSettings(blocks_to_swap=n, prefetch_blocks=1),
                                          args.forwards, device, bandwidth=bw))
        for r in with_ratios(size_rows):
            r.update(size=size, tokens=tokens_of(size))
            log.info("%s", r)
        rows += size_rows
    log.info("GPU %s, torch %s, CUDA %s, %d layers %s, block %s, pinned H2D %.1f GB/s",
             props.name, torch.__version__, torch.version.cuda, args.layers, args.dtype,
             format_bytes(block_bytes), bw)
    log.info("| size | tokens | swapped | forward ms | ratio | H2D GB/s | stall ms/fwd | peak alloc | peak reserved | D2H |")
    log.info("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        log.info("| %s | %d | %d | %.1f | %.3f | %s | %.1f | %s | %s | %d |", r["size"], r["tokens"],
                 r["blocks_swapped"], r["forward_ms"], r["ratio"],
                 f"{r['h2d_gb_s']:.1f}" if r.get("h2d_gb_s") else "-", r.get("stall_ms_per_forward", 0.0),
                 format_bytes(r["peak_allocated"]), format_bytes(r["peak_reserved"]), r["d2h_bytes"])
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
