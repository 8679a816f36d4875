"""The prepared GPU check: one command that runs the CUDA tests and the head-to-head benchmark on one GPU
and writes ``gpu_check.json`` and ``gpu_check.md`` into ``--out``.

    python benchmarks/gpu_check.py --out DIR            # on a CUDA machine, under 8 minutes on one GPU
    python benchmarks/gpu_check.py --dry-run --out DIR  # the same code on a CPU, tiny sizes (CI runs it)

What it measures (a WAN 14B-shaped synthetic model: 14B block dimensions, ``--layers`` blocks,
``--size`` pixels, bf16 and fp8 weights), each figure from this one run:

* **tests**: ``pytest -m cuda`` over the CUDA tests and the GGUF CUDA tests (pass/fail counts).
* **head-to-head at the same VRAM cap** (``--cap-gb``): (a) this pack's block swap with the blocks the
  planner streams to fit the cap, (d) everything resident (the baseline of every ratio); and, where a
  ComfyUI checkout is importable (``COMFYUI_PATH``), ComfyUI's own offloading on its own WanModel with
  the same cap (``--reserve-vram`` = card - cap): (b) classic partial loading
  (``--disable-dynamic-vram``), (c) Dynamic VRAM, plus (a) and (d) on that same model, each in a
  process of its own. Per row: forward time and ratio, H2D GB/s against the pinned link bandwidth
  measured here, D2H bytes, stalls, peak VRAM allocated/reserved, peak VRAM during load.
* **masters on file** (``host_memory`` = file): (a) again with the blocks read from a safetensors file of
  them, cold (page cache dropped) and warm.
* **out-of-memory recovery**: (a) started with a count too low for the cap (its weights fit, its
  activations do not), recovered by streaming more: the count reached next to the planner's, and the
  seconds the recovery cost.
* **two experts** (WAN 2.2 A14B: two models on one shared ring) vs one: the forward after the switch.
* **LoRA in the slot**: a rank-64 LoRA on every block matrix, applied in the slot from its factors
  copied with the block, bf16 and fp8, against the same swap without LoRA.
* **vram_budget**: the planner's activation estimate against the measured peak.

Targets the rows are judged by (written next to the figures): overhead <= 3 % of the resident step,
>= 80 % of the pinned link bandwidth, 0 D2H bytes, never slower than (b) or (c) at the same cap.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import bench_gpu as bg  # noqa: E402  (it imports the pack)
from bench_file_read import drop_page_cache  # noqa: E402

from wan22_blockswap.block_manager import BlockSwapEngine, SharedRing, place_resident  # noqa: E402
from wan22_blockswap.budget import ModelDims, estimate_activation_bytes, plan_auto_blocks  # noqa: E402
from wan22_blockswap.config import SwapSettings, is_wrapper_tensor, tensor_bytes  # noqa: E402
from wan22_blockswap.tiny_wan import WanConfig, tiny_config, wan14b_config  # noqa: E402
from wan22_blockswap.utils import format_bytes  # noqa: E402

log = logging.getLogger("wan22_blockswap.gpu_check")
GB = 1024 ** 3
TARGETS = {"overhead_max": 0.03, "link_fraction_min": 0.80, "d2h_bytes": 0}
CUDA_TESTS = ["tests/test_cuda.py", "tests/test_gguf_dequant.py", "tests/test_gguf_reader.py"]


# ---------------------------------------------------------------------------------------------------
# pieces

def run_cuda_tests(out: Path, timeout: int) -> Dict:
    """``pytest -m cuda`` over the CUDA tiers; counts from its JUnit report (all skipped on a CPU)."""
    xml = out / "cuda_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", *CUDA_TESTS, f"--junitxml={xml}", "-p", "no:cacheprovider"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    res = {"command": " ".join(cmd[1:]), "returncode": proc.returncode, "seconds": round(time.perf_counter() - t0, 1),
           "tail": proc.stdout[-2000:]}
    if xml.exists():
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        res.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
        res["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                         if c.find("failure") is not None or c.find("error") is not None]
    return res


def quantize_fp8(model) -> Optional[str]:
    """Every block matrix as ComfyUI's fp8 QuantizedTensor (e4m3fn, per-tensor scale), quantized on the
    GPU block by block; None on success, else why fp8 rows cannot run here."""
    try:
        from comfy_kitchen.tensor import QuantizedTensor
    except ImportError as e:
        return f"comfy_kitchen is not importable ({e})"
    dev = next(p.device for n, p in model.named_parameters() if not n.startswith("blocks."))
    for block in model.blocks:
        for mod in block.modules():
            if isinstance(mod, torch.nn.Linear):
                q = QuantizedTensor.from_float(mod.weight.detach().to(dev), "TensorCoreFP8Layout").to("cpu")
                mod.weight = torch.nn.Parameter(q, requires_grad=False)
    return None


def planned_blocks(model, inputs_size: str, cap: int, prefetch: int = 1) -> Dict:
    """The planner's choice for the cap (what vram_budget does), with its activation estimate."""
    h, w, f = (int(v) for v in inputs_size.split("x"))
    act = estimate_activation_bytes(ModelDims.from_module(model), w, h, f, batch=1)
    sizes = [sum(tensor_bytes(p) for p in b.parameters()) for b in model.blocks]
    other = sum(tensor_bytes(p) for n, p in model.named_parameters() if not n.startswith("blocks."))
    choice = plan_auto_blocks(block_bytes=sizes, resident_other_bytes=other, budget_bytes=cap,
                              activation_bytes=act, prefetch_blocks=prefetch, label=f"cap {format_bytes(cap)}")
    return {"blocks_to_swap": choice.blocks_to_swap, "fits": choice.fits, "activation_estimate": act,
            "explanation": choice.explanation, "weights_bytes": other + sum(sizes)}


def lora_transform(rank: int, dtype):
    """A rank-``rank`` LoRA on every block matrix, applied in the slot from the factors the engine
    copied there with the block (its extras): W += up @ down (fp8: dequantize, add, requantize)."""
    def factors(engine):
        out = {}
        for u in engine._units:
            tensors = []
            for mod in u.module.modules():
                if isinstance(mod, torch.nn.Linear):
                    g = torch.Generator().manual_seed(len(tensors))
                    tensors += [torch.randn(mod.out_features, rank, generator=g).to(dtype) * 0.01,
                                 torch.randn(rank, mod.in_features, generator=g).to(dtype) * 0.01]
            out[u.name] = tensors
        return out

    def make(engine):
        def apply(name):
            u = engine._units[engine.unit_names().index(name)]
            extra = iter(engine.slot_extras(name))
            with torch.no_grad():
                for mod in u.module.modules():
                    if isinstance(mod, torch.nn.Linear):
                        up, down = next(extra), next(extra)
                        w = mod.weight
                        if is_wrapper_tensor(w):  # a QuantizedTensor: dequantize, add, requantize
                            w.copy_(type(w).from_float((w.dequantize() + up @ down).to(w.dtype), w._layout_cls))
                        else:
                            w.add_(up @ down)
        return apply
    return make, factors


def file_masters_rows(model, inputs, settings, args, device, bandwidth, out: Path) -> List[Dict]:
    """(a) with host masters on file (``host_memory`` = file): the blocks saved to a safetensors file in
    ``out`` and loaded back as views of it (as ComfyUI's loaders leave unconverted weights), then the same
    swap as (a) read from that file, cold (its pages dropped from the page cache first) and warm. The
    blocks get RAM copies back afterwards."""
    from safetensors.torch import safe_open, save_file

    path = out / "file_masters_blocks.safetensors"
    blocks = {k: v.detach().cpu().contiguous() for k, v in model.blocks.state_dict().items()}
    save_file(blocks, str(path))
    del blocks
    with safe_open(str(path), "pt") as f:
        model.blocks.load_state_dict({k: f.get_tensor(k) for k in f.keys()}, assign=True)
    rows = []
    for when in ("cold", "warm"):
        if when == "cold":
            drop_page_cache(path)
        row = bg.measure_swap(model, inputs, replace(settings, host_memory="file", spill_dir=str(out)), args.forwards,
                              device, bandwidth=bandwidth)
        row["mode"] = f"(a) block swap, masters on file ({when})"
        rows.append(row)
    for p in model.blocks.parameters():  # RAM copies again (the mapping is read-only; the fp8 rows rewrite weights)
        p.data = p.data.clone()
    path.unlink()
    return rows


def oom_recovery_row(model, inputs, args, device, plan: Dict, cap: int) -> Dict:
    """A deliberately low ``blocks_to_swap`` at a size that does not fit the cap, recovered by streaming
    more (recovery.py, as the nodes do after an out-of-memory error): the count reached against the one
    the planner picks, and what the recovery cost. On CUDA the cap is enforced
    (``set_per_process_memory_fraction``); the low count is the fewest blocks with which the weights
    alone fit, so the forward's activations are what does not. A dry run injects one out-of-memory error
    (CUDA's message) into the first forward instead, to run the same code."""
    from wan22_blockswap.config import plan_swap
    from wan22_blockswap.recovery import blocks_needed, grow_settings, run_with_recovery, streamable

    cuda = device.type == "cuda"
    sizes = [sum(tensor_bytes(p) for p in b.parameters()) for b in model.blocks]
    weights = sum(tensor_bytes(p) for p in model.parameters())
    start = next((n for n in range(len(sizes) + 1)
                  if weights - sum(sizes[len(sizes) - n:]) + 2 * max(sizes) <= 0.9 * cap), len(sizes))
    if not cuda:
        start = 1
    settings = SwapSettings(blocks_to_swap=start, prefetch_blocks=1)
    engine = BlockSwapEngine.from_settings(model, settings, device).setup()
    place_resident(model, engine.plan, device)
    layout, retries = engine.plan.layout, []
    injected = []
    hook = None
    if not cuda:
        def inject(module, args_):
            if not injected:
                injected.append(1)
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 MiB. GPU 0 has a total "
                                             "capacity of 1.00 GiB of which 0 bytes is free.")
        hook = model.blocks[0].register_forward_pre_hook(inject)

    def forward():
        with torch.inference_mode():
            return model(**inputs)

    def grow(failure) -> bool:
        now, every = streamable(engine.settings, layout)
        block = max((sizes[i] for i in engine.plan.resident_blocks), default=max(sizes))
        more = blocks_needed(failure, block, now, every)
        if not more:
            return False
        engine.replan(plan_swap(layout, grow_settings(engine.settings, layout, more)))
        if cuda:
            torch.cuda.empty_cache()
        retries.append({"failure": failure.describe(), "blocks": len(engine.plan.block_indices)})
        return True

    total = torch.cuda.get_device_properties(device).total_memory if cuda else 0
    if cuda:
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
    try:
        t0 = time.perf_counter()
        run_with_recovery(forward, grow)
        if cuda:
            torch.cuda.synchronize(device)
        first = time.perf_counter() - t0
        ms = bg.timed_forwards(model, inputs, args.forwards, device)
    finally:
        if cuda:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
        if hook is not None:
            hook.remove()
        reached = len(engine.plan.block_indices)
        engine.teardown(device="cpu")
        model.blocks.to("cpu")
        if cuda:
            torch.cuda.empty_cache()
    return {"mode": "(a) block swap from a count that does not fit, recovered", "start_blocks": start,
            "blocks_swapped": reached, "planned_blocks": plan["blocks_to_swap"], "retries": retries,
            "first_forward_s": round(first, 3), "recovery_s": round(first - ms / 1e3, 3) if retries else 0.0,
            "forward_ms": ms}


def two_experts(config, dtype, device, inputs, settings, forwards) -> Dict:
    """High/low-noise experts on one shared ring: steady forward of one vs the first after a switch."""
    a, b = bg.build_model(config, dtype, device), bg.build_model(config, dtype, device)
    ring = SharedRing()
    engines = []
    for m in (a, b):
        e = BlockSwapEngine.from_settings(m, settings, device)
        e.use_shared_ring(ring)
        engines.append(e.setup())
        place_resident(m, e.plan, device)
    bg.timed_forwards(a, inputs, 1, device)  # warm-up, learns the order
    steady = bg.timed_forwards(a, inputs, forwards, device)
    switch = bg.timed_forwards(b, inputs, 1, device)  # takes the ring from a
    b_steady = bg.timed_forwards(b, inputs, forwards, device)
    res = {"one_expert_forward_ms": steady, "first_forward_after_switch_ms": switch,
           "second_expert_steady_ms": b_steady, "switch_overhead_ms": switch - b_steady,
           "host_bytes_both": sum(e.tracker.host_bytes for e in engines),
           "ring_bytes": ring.nbytes}
    for e in engines:
        e.teardown(device="cpu")
    del a, b
    if bg.is_cuda(device):
        torch.cuda.empty_cache()
    return res


# ---------------------------------------------------------------------------------------------------
# ComfyUI's own offloading, each mode in a process of its own (Dynamic VRAM is a process-wide choice)

COMFY_MODES = {"comfy_resident": "(d) resident, ComfyUI", "comfy_classic": "(b) classic partial load",
               "comfy_dynamic": "(c) Dynamic VRAM", "comfy_blockswap": "(a) block swap node, ComfyUI"}


def comfy_worker(mode: str, args) -> Dict:
    """Runs inside the subprocess: ComfyUI imported with the mode's flags, its WanModel built from the
    synthetic state dict, loaded under the cap by ComfyUI itself, forwards timed."""
    comfy_path = os.environ["COMFYUI_PATH"]
    sys.path.insert(0, comfy_path)
    device = torch.device(args.device)
    flags = ["--cpu"] if device.type == "cpu" else []
    if device.type == "cuda" and mode != "comfy_resident":
        total = torch.cuda.get_device_properties(device).total_memory
        flags += ["--reserve-vram", f"{max(0.0, (total - args.cap_gb * GB) / GB):.2f}"]
    if mode in ("comfy_classic", "comfy_blockswap", "comfy_resident"):
        flags.append("--disable-dynamic-vram")
    sys.argv = [sys.argv[0], *flags]
    import comfy.options
    comfy.options.enable_args_parsing()
    import comfy.model_management as mm
    import comfy.sd

    config = _config(args)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = bg.build_model(config, dtype, device)
    sd = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    del model
    patcher = comfy.sd.load_diffusion_model_state_dict(sd, disable_dynamic=(mode != "comfy_dynamic"))
    if mode == "comfy_dynamic" and not patcher.is_dynamic():
        return {"mode": COMFY_MODES[mode], "unavailable": "Dynamic VRAM is not active in this ComfyUI process "
                "(needs an NVIDIA GPU, torch >= 2.8 and comfy-aimdo)"}
    swapped = None
    if mode == "comfy_blockswap":
        from wan22_blockswap.callbacks import _ENGINES, apply_block_swap
        patcher, _ = apply_block_swap(patcher, SwapSettings(blocks_to_swap=args.comfy_swap))
        swapped = patcher
    bg._reset_peaks(device)
    mm.load_models_gpu([patcher])
    load_peak = bg._peaks(device)["peak_allocated"]
    inputs = bg.inputs_for(config, args.size, dtype, device)
    dm = patcher.model.diffusion_model
    call = {"x": inputs["x"], "timestep": inputs["timestep"], "context": inputs["context"]}
    bg.timed_forwards(dm, call, 1, device)  # warm-up
    bg._reset_peaks(device)
    ms = bg.timed_forwards(dm, call, args.forwards, device)
    row = {"mode": COMFY_MODES[mode], "forward_ms": ms, **bg._peaks(device), "peak_allocated_during_load": load_peak,
           "lowvram": bool(getattr(patcher.model, "model_lowvram", False)),
           "loaded_weight_memory": getattr(patcher.model, "model_loaded_weight_memory", None)}
    if swapped is not None:
        engine = _ENGINES[swapped.model.diffusion_model]
        engine.synchronize()
        t = engine.tracker
        row.update(blocks_swapped=len(engine.plan.block_indices), d2h_bytes=t.d2h_bytes, stalls=t.stalls)
    return row


def run_comfy_rows(args, out: Path) -> List[Dict]:
    if not os.environ.get("COMFYUI_PATH"):
        return [{"mode": label, "unavailable": "no ComfyUI checkout: set COMFYUI_PATH to run ComfyUI's own offloading"}
                for label in COMFY_MODES.values()]
    rows = []
    for mode in COMFY_MODES:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", mode, "--out", str(out),
               *(["--dry-run"] if args.dry_run else []), "--layers", str(args.layers), "--size", args.size,
               "--cap-gb", str(args.cap_gb), "--forwards", str(args.forwards), "--comfy-swap", str(args.comfy_swap)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.worker_timeout, cwd=ROOT)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("GPU_CHECK_ROW ")]
            rows.append(json.loads(lines[-1][len("GPU_CHECK_ROW "):]) if lines else
                        {"mode": COMFY_MODES[mode], "unavailable": f"worker failed (rc {proc.returncode}): "
                         + (proc.stderr or proc.stdout)[-800:]})
        except subprocess.TimeoutExpired:
            rows.append({"mode": COMFY_MODES[mode], "unavailable": f"worker ran past {args.worker_timeout} s"})
    return rows


# ---------------------------------------------------------------------------------------------------
# report

def _fmt(v, kind="") -> str:
    if v is None:
        return "-"
    if kind == "bytes":
        return format_bytes(v)
    if isinstance(v, float):
        return f"{v:.3f}" if kind == "ratio" else f"{v:.1f}"
    return str(v)


def markdown(report: Dict) -> str:
    env = report["environment"]
    lines = [f"# GPU check ({'dry run on CPU' if report['dry_run'] else 'GPU run'})", "",
             f"{env.get('gpu', 'no GPU')}, driver {env.get('driver', '-')}, torch {env['torch']}, CUDA {env.get('cuda')}, "
             f"{env['layers']} {'tiny WAN' if report['dry_run'] else 'WAN-14B-shaped'} blocks, {env['size']} "
             f"({env['tokens']} tokens), cap {env['cap_gb']} GB, "
             f"pinned H2D {_fmt(env.get('pinned_gb_s'))} GB/s.", ""]
    t = report["tests"]
    lines += [f"CUDA tests: {t.get('tests', '?')} run, {t.get('failures', '?')} failed, {t.get('errors', '?')} errors, "
              f"{t.get('skipped', '?')} skipped ({t['seconds']} s).", ""]
    lines += ["| row | weights | swapped | forward ms | ratio vs resident | H2D GB/s | link | stalls | D2H | peak alloc | peak reserved | peak during load |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if "unavailable" in r:
            lines.append(f"| {r['mode']} | {r.get('weights', '-')} | - | not run: {r['unavailable'][:120]} |||||||||")
            continue
        lines.append(f"| {r['mode']} | {r.get('weights', 'bf16')} | {_fmt(r.get('blocks_swapped'))} | {_fmt(r['forward_ms'])} | "
                     f"{_fmt(r.get('ratio'), 'ratio')} | {_fmt(r.get('h2d_gb_s'))} | {_fmt(r.get('link_fraction'), 'ratio')} | "
                     f"{_fmt(r.get('stalls'))} | {_fmt(r.get('d2h_bytes'))} | {_fmt(r.get('peak_allocated'), 'bytes')} | "
                     f"{_fmt(r.get('peak_reserved'), 'bytes')} | {_fmt(r.get('peak_allocated_during_load'), 'bytes')} |")
    e = report.get("experts", {})
    if e:
        lines += ["", f"Two experts on one ring: one expert {_fmt(e['one_expert_forward_ms'])} ms/forward; first forward "
                  f"after the switch {_fmt(e['first_forward_after_switch_ms'])} ms vs {_fmt(e['second_expert_steady_ms'])} ms "
                  f"steady ({_fmt(e['switch_overhead_ms'])} ms switch cost); host copies of both "
                  f"{_fmt(e['host_bytes_both'], 'bytes')}."]
    o = report.get("oom_recovery")
    if o:
        lines += ["", f"Out-of-memory recovery: started at {o['start_blocks']} blocks, reached {o['blocks_swapped']} "
                  f"after {len(o['retries'])} recover{'y' if len(o['retries']) == 1 else 'ies'} (the planner picks "
                  f"{o['planned_blocks']}); the recovery cost {_fmt(o['recovery_s'])} s, then "
                  f"{_fmt(o['forward_ms'])} ms/forward."]
    b = report.get("budget", {})
    if b:
        lines += ["", f"vram_budget: activation estimate {_fmt(b['activation_estimate'], 'bytes')}, measured "
                  f"{_fmt(b.get('activation_measured'), 'bytes')} (peak allocated minus resident weights and ring)."]
    lines += ["", f"Targets: overhead <= {TARGETS['overhead_max']:.0%}, link >= {TARGETS['link_fraction_min']:.0%} of "
              "pinned bandwidth, 0 D2H bytes, never slower than (b) or (c) at the same cap."]
    return "\n".join(lines) + "\n"


def _config(args) -> WanConfig:
    if args.dry_run:  # ComfyUI detects WAN with umT5-XXL text width and dim / 128 heads
        return tiny_config("t2v", num_layers=args.layers, text_dim=4096, num_heads=1)
    return wan14b_config(num_layers=args.layers)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for gpu_check.json / gpu_check.md")
    ap.add_argument("--dry-run", action="store_true", help="on the CPU, tiny sizes: checks the code, measures nothing")
    ap.add_argument("--layers", type=int, default=None, help="blocks of the synthetic model (GPU: 16, dry run: 4)")
    ap.add_argument("--size", default=None, help="height x width x frames (GPU: 480x832x81, dry run: 64x64x5)")
    ap.add_argument("--cap-gb", type=float, default=12.0, help="the VRAM cap every offloading row runs under")
    ap.add_argument("--forwards", type=int, default=2)
    ap.add_argument("--comfy-swap", type=int, default=None, help="blocks the ComfyUI block swap row streams (default: planned)")
    ap.add_argument("--test-timeout", type=int, default=240)
    ap.add_argument("--worker-timeout", type=int, default=150)
    ap.add_argument("--worker", choices=sorted(COMFY_MODES), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.layers = args.layers or (4 if args.dry_run else 16)
    args.size = args.size or ("64x64x5" if args.dry_run else "480x832x81")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.dry_run and not torch.cuda.is_available():
        log.error("no CUDA device: run with --dry-run on a CPU")
        return 2
    args.device = "cpu" if args.dry_run else f"cuda:{torch.cuda.current_device()}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.worker:  # inside a ComfyUI subprocess
        if args.comfy_swap is None:
            args.comfy_swap = args.layers // 2
        print("GPU_CHECK_ROW " + json.dumps(comfy_worker(args.worker, args)), flush=True)
        return 0

    t_start = time.perf_counter()
    device = torch.device(args.device)
    config = _config(args)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "layers": args.layers, "size": args.size, "tokens": bg.tokens_of(args.size), "cap_gb": args.cap_gb,
           "forwards": args.forwards}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, vram=props.total_memory, driver=_driver())
    report: Dict = {"dry_run": args.dry_run, "environment": env}
    report["tests"] = run_cuda_tests(out, args.test_timeout)
    log.info("CUDA tests: %s", {k: v for k, v in report["tests"].items() if k != "tail"})

    model = bg.build_model(config, dtype, device)
    inputs = bg.inputs_for(config, args.size, dtype, device)
    block_bytes = sum(tensor_bytes(p) for p in model.blocks[0].parameters())
    env["block_bytes"] = block_bytes
    env["pinned_gb_s"] = bg.pinned_bandwidth(block_bytes, device)
    cap = int(args.cap_gb * GB)
    plan = planned_blocks(model, args.size, cap)
    if args.dry_run:  # a tiny model fits any cap: stream more blocks than the ring holds, so copies run
        plan["blocks_to_swap"] = max(plan["blocks_to_swap"], min(args.layers, 3))
    if args.comfy_swap is None:
        args.comfy_swap = plan["blocks_to_swap"]
    rows: List[Dict] = []
    for weights in (str(dtype).replace("torch.bfloat16", "bf16").replace("torch.float32", "fp32"), "fp8"):
        if weights == "fp8":
            why = quantize_fp8(model)
            if why:
                rows.append({"mode": "(a)/(d) fp8", "weights": "fp8", "unavailable": why})
                continue
        group = [bg.measure_resident(model, inputs, args.forwards, device)]
        n = plan["blocks_to_swap"]
        if weights == "fp8" and not args.dry_run:  # smaller weights: the planner keeps more resident
            n = planned_blocks(model, args.size, cap)["blocks_to_swap"]
        settings = SwapSettings(blocks_to_swap=max(1, n), prefetch_blocks=1)
        group.append(bg.measure_swap(model, inputs, settings, args.forwards, device, bandwidth=env["pinned_gb_s"]))
        make, factors = lora_transform(64, dtype)
        lora = bg.measure_swap(model, inputs, settings, args.forwards, device, bandwidth=env["pinned_gb_s"],
                               slot_transform=make, extras=factors)
        lora["mode"] = "block swap + rank-64 LoRA in the slot"
        group.append(lora)
        for r in bg.with_ratios(group):
            r["weights"] = weights
            r["mode"] = {"resident": "(d) resident", "block swap": "(a) block swap"}.get(r["mode"], r["mode"])
        rows += group
        if weights != "fp8":
            for r in file_masters_rows(model, inputs, settings, args, device, env["pinned_gb_s"], out):
                r.update(weights=weights, ratio=r["forward_ms"] / group[0]["forward_ms"])
                rows.append(r)
            swap_row = group[1]
            weights_on_device = (plan["weights_bytes"] - swap_row["host_bytes"] + swap_row["ring_bytes"])
            report["budget"] = {"activation_estimate": plan["activation_estimate"], "planned_blocks": plan["blocks_to_swap"],
                                "explanation": plan["explanation"],
                                "activation_measured": (swap_row["peak_allocated"] - weights_on_device)
                                if swap_row.get("peak_allocated") is not None else None}
    report["oom_recovery"] = oom_recovery_row(model, inputs, args, device, plan, cap)
    log.info("OOM recovery: %s", report["oom_recovery"])
    del model
    report["experts"] = two_experts(config, dtype, device, inputs,
                                    SwapSettings(blocks_to_swap=max(1, plan["blocks_to_swap"]), prefetch_blocks=1),
                                    args.forwards)
    comfy = run_comfy_rows(args, out)
    base = next((r["forward_ms"] for r in comfy if r.get("mode", "").startswith("(d)") and "forward_ms" in r), None)
    for r in comfy:
        if base and "forward_ms" in r:
            r["ratio"] = r["forward_ms"] / base
    rows += comfy
    report["rows"] = rows
    report["targets"] = TARGETS
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "gpu_check.md").write_text(markdown(report))
    log.info("%s", markdown(report))
    log.info("wrote %s and %s in %.0f s", out / "gpu_check.json", out / "gpu_check.md", report["seconds"])
    failed = report["tests"].get("failures", 0) + report["tests"].get("errors", 0)
    return 1 if failed else 0


def _driver() -> Optional[str]:
    try:
        proc = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
        return proc.stdout.strip().splitlines()[0] if proc.returncode == 0 and proc.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


if __name__ == "__main__":
    sys.exit(main())
