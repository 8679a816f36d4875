"""CPU benchmark: the engine's host overhead per streamed block, and forward time with/without swap.

Everything is measured side by side in one run (configurations interleaved, median of repeats), so
the ratios do not depend on what else the machine did between runs.

    python benchmarks/bench_cpu.py [--repeats 7] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _pack import import_pack  # noqa: E402

import_pack()
from wan22_blockswap.block_manager import BlockSwapEngine  # noqa: E402
from wan22_blockswap.config import SwapSettings  # noqa: E402
from wan22_blockswap.tiny_wan import WanModel, make_inputs, tiny_config  # noqa: E402

log = logging.getLogger("wan22_blockswap.bench_cpu")


def host_overhead(repeats: int) -> dict:
    """Engine time per streamed block use, copies excluded: a model of 40 tiny blocks (so the copy
    itself is negligible) with every block streamed; the tracker times the hooks and the copies."""
    cfg = tiny_config("t2v", dim=128, ffn_dim=128, num_heads=2, num_layers=40)
    model = WanModel(cfg).init_weights(0).eval()
    inputs = make_inputs(cfg, frames=1, height=2, width=2, text_len=2)
    engine = BlockSwapEngine.from_settings(model, SwapSettings(blocks_to_swap=40, prefetch_blocks=1), "cpu").setup()
    samples = []
    with torch.inference_mode():
        model(**inputs)  # learn the order
        for _ in range(repeats):
            engine.tracker.reset_counters()
            for _ in range(5):
                model(**inputs)
            t = engine.tracker
            uses = t.prefetch_hits + t.stalls
            samples.append((t.hook_seconds - t.copy_seconds) / uses * 1e3)
    engine.teardown()
    return {"ms_per_block": statistics.median(samples), "min_ms": min(samples), "blocks": 40}


def forward_ratio(repeats: int) -> list:
    """Forward time with N of 12 blocks streamed vs all resident, interleaved in one run."""
    cfg = tiny_config("t2v", dim=512, ffn_dim=2048, num_heads=4, num_layers=12)
    model = WanModel(cfg).init_weights(0).eval()
    inputs = make_inputs(cfg, frames=4, height=16, width=16, text_len=16)
    counts = (0, 6, 12)
    times = {n: [] for n in counts}
    with torch.inference_mode():
        for _ in range(repeats):
            for n in counts:
                engine = BlockSwapEngine.from_settings(model, SwapSettings(blocks_to_swap=n), "cpu").setup()
                model(**inputs)  # warm
                t0 = time.perf_counter()
                for _ in range(3):
                    model(**inputs)
                times[n].append((time.perf_counter() - t0) / 3)
                engine.teardown()
    base = statistics.median(times[0])
    return [{"blocks_swapped": n, "forward_ms": statistics.median(times[n]) * 1e3,
             "ratio": statistics.median(times[n]) / base} for n in counts]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    result = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "torch": torch.__version__, "host_overhead": host_overhead(args.repeats),
              "forward": forward_ratio(args.repeats)}
    h = result["host_overhead"]
    log.info("machine: %s, torch %s", result["machine"], result["torch"])
    log.info("host overhead per streamed block (copy excluded): median %.3f ms, min %.3f ms (target <= 0.5 ms)",
             h["ms_per_block"], h["min_ms"])
    log.info("| blocks swapped (of 12) | forward ms | ratio vs resident |")
    log.info("|---|---|---|")
    for row in result["forward"]:
        log.info("| %d | %.1f | %.3f |", row["blocks_swapped"], row["forward_ms"], row["ratio"])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
