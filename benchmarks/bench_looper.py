"""Looper benchmark: per-loop time and memory for 10 WanVideoLooper-style loops, swap on vs off.

Each loop samples the high-noise expert then the low-noise expert (KSamplerAdvanced split), the
pattern WanVideoLooper uses; both runs (swap off, swap on) happen in one process, interleaved per
loop so machine noise hits both alike. Uses a real ComfyUI when COMFYUI_PATH is set (run with that
ComfyUI's Python), else the test stand-in.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/bench_looper.py [--loops 10] [--layers 12] [--dim 512]
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _pack import import_pack  # noqa: E402

import_pack()
COMFY = os.environ.get("COMFYUI_PATH")
if COMFY:
    sys.path.insert(0, COMFY)
    sys.argv = [sys.argv[0], "--cpu"] + sys.argv[1:]
    import comfy.options  # noqa: E402

    comfy.options.enable_args_parsing()
    import comfy.cli_args  # noqa: E402

    comfy.cli_args.args.cpu = True
    sys.argv = [sys.argv[0]] + [a for a in sys.argv[2:]]
else:
    sys.path.insert(0, str(ROOT / "tests" / "comfy_stub"))

import comfy.model_management as mm  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.sd  # noqa: E402

from wan22_blockswap import tiny_wan  # noqa: E402
from wan22_blockswap.callbacks import _ENGINES  # noqa: E402
from wan22_blockswap.nodes import WAN22BlockSwapLooperModels  # noqa: E402
from wan22_blockswap.utils import format_bytes, host_rss_bytes  # noqa: E402

log = logging.getLogger("wan22_blockswap.bench_looper")


def load(seed, dim, layers):
    cfg = tiny_wan.tiny_config("t2v", dim=dim, num_heads=dim // 128, ffn_dim=dim * 4, num_layers=layers,
                               text_dim=4096)
    return comfy.sd.load_diffusion_model_state_dict(tiny_wan.WanModel(cfg).init_weights(seed).state_dict())


def one_loop(high, low, latent, i, steps=4, switch=2):
    g = torch.Generator().manual_seed(i)
    pos = [[torch.randn(1, 16, 4096, generator=g), {}]]
    neg = [[torch.zeros(1, 16, 4096), {}]]
    noise = torch.randn(latent.shape, generator=g)
    x = comfy.sample.sample(high, noise, steps, 3.0, "euler", "simple", pos, neg, latent, seed=i,
                            start_step=0, last_step=switch, force_full_denoise=False, disable_pbar=True)
    return comfy.sample.sample(low, noise, steps, 3.0, "euler", "simple", pos, neg, x, seed=i,
                               disable_noise=True, start_step=switch, last_step=10000,
                               force_full_denoise=True, disable_pbar=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--loops", type=int, default=10)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--blocks", type=int, default=8)
    args = ap.parse_args(argv)
    # ComfyUI configures the root logger at import; keep its chatter out, ours in
    logging.basicConfig(format="%(message)s", force=True)
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("wan22_blockswap").setLevel(logging.INFO)
    torch.manual_seed(0)
    high, low = load(0, args.dim, args.layers), load(1, args.dim, args.layers)
    ph, pl = WAN22BlockSwapLooperModels().apply(
        high, low, blocks_to_swap=args.blocks, offload_txt_emb=False, offload_img_emb=False,
        use_non_blocking=True, vace_blocks_to_swap=0, prefetch_blocks=1, block_swap_debug=False)
    latent = {"off": torch.zeros(1, 16, 4, 16, 16), "on": torch.zeros(1, 16, 4, 16, 16)}
    rows = []
    with torch.inference_mode():
        for i in range(args.loops):
            row = {"loop": i + 1}
            for mode, (h, lo) in (("off", (high, low)), ("on", (ph, pl))):
                t0 = time.perf_counter()
                out = one_loop(h, lo, latent[mode], i)
                row[f"{mode}_s"] = time.perf_counter() - t0
                row[f"{mode}_rss"] = host_rss_bytes()
                latent[mode] = out * 0.5
            row["equal"] = torch.equal(latent["off"], latent["on"])
            eh, el = _ENGINES[ph.model.diffusion_model], _ENGINES[pl.model.diffusion_model]
            row["masters"] = eh.tracker.host_bytes + el.tracker.host_bytes
            row["ring"] = el.shared_ring.nbytes
            row["idle_expert_device"] = eh.device_bytes
            rows.append(row)
    block = sum(p.numel() * p.element_size() for p in high.model.diffusion_model.blocks[0].parameters())
    log.info("%s, %d threads, torch %s, ComfyUI: %s", platform.machine(), torch.get_num_threads(),
             torch.__version__, COMFY or "test stand-in")
    log.info("two experts of %d blocks x %s (fp32, dim %d), %d blocks streamed each, latent 16x4x16x16, "
             "4 steps split 2+2, CFG 3", args.layers, format_bytes(block), args.dim, args.blocks)
    log.info("| loop | off s | on s | ratio | RSS off→on | masters | ring | idle expert device | same output |")
    log.info("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        log.info("| %d | %.3f | %.3f | %.2f | %s | %s | %s | %s | %s |", r["loop"], r["off_s"], r["on_s"],
                 r["on_s"] / r["off_s"], format_bytes(r["on_rss"]), format_bytes(r["masters"]),
                 format_bytes(r["ring"]), format_bytes(r["idle_expert_device"]), r["equal"])
    later = rows[1:]
    log.info("loops 2-%d: median ratio %.3f; RSS change loop 2 -> %d: %s", args.loops,
             statistics.median(r["on_s"] / r["off_s"] for r in later), args.loops,
             format_bytes(rows[-1]["on_rss"] - rows[1]["on_rss"]))
    return 0 if all(r["equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
