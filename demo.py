"""Demo: sample a tiny WAN transformer with and without block swap and compare.

Builds a small WAN 2.1 t2v transformer in ComfyUI's layout on the spot (random weights, no
download), runs a short flow-matching Euler sampler with CFG (two forwards per step) once with
every block resident and once with blocks streamed by the engine, then reports the block
placement, the bytes streamed, host/device memory and the largest difference between the two
outputs. Exit status 1 if the outputs differ.

    python demo.py [--blocks N] [--placement last|even] [--prefetch P] [--steps S] [--device D]
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _pack import import_pack  # noqa: E402

log = logging.getLogger("wan22_blockswap.demo")


def sample(model, inputs, steps: int, cfg: float = 5.0) -> torch.Tensor:
    """Flow-matching Euler with classifier-free guidance: two forwards per step, like KSampler."""
    x = inputs["x"].clone()
    uncond = torch.zeros_like(inputs["context"])
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    with torch.inference_mode():
        for i in range(steps):
            t = (sigmas[i] * 1000).expand(x.shape[0]).to(x.device)
            cond_v = model(x, t, inputs["context"])
            uncond_v = model(x, t, uncond)
            v = uncond_v + cfg * (cond_v - uncond_v)
            x = x + (sigmas[i + 1] - sigmas[i]).item() * v
    return x


def finish(device: torch.device) -> None:
    """Wait for the device's queued work before reading the host clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=6, help="blocks to stream (of 12)")
    ap.add_argument("--placement", choices=("last", "even"), default="last")
    ap.add_argument("--prefetch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    pack = import_pack()
    from wan22_blockswap.block_manager import BlockSwapEngine, place_resident
    from wan22_blockswap.config import SwapSettings
    from wan22_blockswap.tiny_wan import WanModel, make_inputs, tiny_config
    from wan22_blockswap.utils import format_bytes, memory_report

    device = torch.device(args.device)
    cfg = tiny_config("t2v", dim=256, ffn_dim=1024, num_heads=2, num_layers=12)
    model = WanModel(cfg).init_weights(seed=0).eval()
    inputs = make_inputs(cfg, frames=4, height=16, width=16, text_len=16, device=device)
    block_bytes = sum(p.numel() * p.element_size() for p in model.blocks[0].parameters())
    log.info("WAN 2.2 BlockSwap demo (%s): tiny WAN t2v, %d blocks of %s, dim %d, on %s, %d steps x 2 forwards",
             pack.__name__, cfg.num_layers, format_bytes(block_bytes), cfg.dim, device, args.steps)

    model.to(device)
    sample(model, inputs, 1)  # warm-up, so neither timed run pays for first-call costs
    t0 = time.perf_counter()
    reference = sample(model, inputs, args.steps)
    finish(device)  # CUDA runs asynchronously: the host clock counts only finished work
    t_resident = time.perf_counter() - t0
    model.to("cpu")

    settings = SwapSettings(blocks_to_swap=args.blocks, placement=args.placement,
                            prefetch_blocks=args.prefetch)
    engine = BlockSwapEngine.from_settings(model, settings, device).setup()
    place_resident(model, engine.plan, device)
    plan, t = engine.plan, engine.tracker
    log.info("placement: resident blocks %s; streamed blocks %s (%s); ring %d slots x %s on %s",
             list(plan.resident_blocks), list(plan.block_indices), args.placement, plan.slots,
             format_bytes(t.slot_bytes), device)
    t0 = time.perf_counter()
    swapped = sample(model, inputs, args.steps)
    finish(device)
    t_swapped = time.perf_counter() - t0
    log.info("streamed: %s", t.format_summary())
    log.info("memory: %s; host masters %s, device ring %s", memory_report(device),
             format_bytes(t.host_bytes), format_bytes(engine.device_bytes))
    log.info("time: resident %.3f s, swapped %.3f s (ratio %.2f)",
             t_resident, t_swapped, t_swapped / t_resident)
    engine.teardown()

    diff = (swapped.float() - reference.float()).abs().max().item()
    log.info("max |swapped - resident| = %g (%s)", diff, "bit-identical" if diff == 0 else "DIFFERENT")
    return 0 if diff == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
