"""Loader benchmark: peak host RSS and load time of the pack's WAN Model Loader against ComfyUI's own
loaders, on a synthetic WAN-shaped file (by default WAN 2.1 1.3B's dimensions and 30 blocks: ~2.6 GiB in bf16).

Needs a real ComfyUI (COMFYUI_PATH; run with that ComfyUI's Python). Each load runs in a fresh
subprocess, so every figure is that process' own: peak RSS is ``ru_maxrss`` after the load minus the
RSS just before it (imports done; Linux VmHWM, reset before the load). Before each load the file is read once (page cache warm), so the
loaders are compared on the same footing and the disk is out of the picture. Baselines:
UNETLoader's path (``comfy.sd.load_diffusion_model``) for safetensors, and ComfyUI-GGUF's
``UnetLoaderGGUF`` for GGUF when ComfyUI-GGUF is installed in ``custom_nodes``.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/bench_loader.py [--size 1.3b|14b] [--layers N] [--dir /tmp/wanbench] [--runs 3]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup_comfy():
    sys.path.insert(0, str(ROOT))
    from _pack import import_pack

    import_pack()
    comfy_path = os.environ["COMFYUI_PATH"]
    sys.path.insert(0, comfy_path)
    # --bf16-unet: the dtype ComfyUI picks on a GPU for a bf16 file (on --cpu it would convert to fp32)
    sys.argv = [sys.argv[0], "--cpu", "--bf16-unet"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.cli_args  # noqa: F401


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> None:
    """Linux: restart this process' peak-RSS counter (VmHWM). ``ru_maxrss`` cannot be used: a child
    starts with its parent's high-water mark."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def make_files(directory: Path, size: str, layers: int) -> dict:
    _setup_comfy()
    import torch
    from safetensors.torch import save_file

    from wan22_blockswap import tiny_wan
    from wan22_blockswap.formats.gguf_reader import write_tiny_gguf

    directory.mkdir(parents=True, exist_ok=True)
    stem = f"wan{size}_{layers}blocks"
    st, gg = directory / f"{stem}_bf16.safetensors", directory / f"{stem}_q8_0.gguf"
    if not (st.exists() and gg.exists()):
        if size == "14b":
            cfg = tiny_wan.wan14b_config(num_layers=layers)
        else:  # WAN 2.1 1.3B dimensions
            cfg = tiny_wan.WanConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=layers, in_dim=16,
                                     out_dim=16, text_dim=4096, model_type="t2v")
        with torch.device("meta"):
            model = tiny_wan.WanModel(cfg)
        model = model.to_empty(device="cpu")
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():  # values are irrelevant for load time; keep them finite
                p.normal_(0, 0.02, generator=g)
        sd = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
        del model
        save_file(sd, str(st))
        write_tiny_gguf(str(gg), sd, quant="Q8_0")
    return {"safetensors": str(st), "gguf": str(gg)}


def one_load(loader: str, path: str) -> dict:
    """Runs in the child process: one load, its time and peak RSS."""
    _setup_comfy()
    import gc

    with open(path, "rb") as f:  # warm the page cache (outside the measured window)
        while f.read(1 << 26):
            pass
    import comfy.model_detection  # noqa: F401 - imports outside the measured window for every loader
    import comfy.sd  # noqa: F401

    if loader == "ours":
        from wan22_blockswap.model_loader import load_wan_model

        load = lambda: load_wan_model(path)[0]  # noqa: E731
    elif loader == "ours-swap":  # WAN BlockSwap Model Loader: all but the first block packed into host masters
        from wan22_blockswap.callbacks import apply_block_swap
        from wan22_blockswap.config import SwapSettings
        from wan22_blockswap.model_loader import Streamed, load_wan_model

        from wan22_blockswap.callbacks import plan_for

        def load():  # what the node does with vram_budget off: streamed blocks read into their masters
            def units(dm):
                return plan_for(dm, SwapSettings(blocks_to_swap=len(dm.blocks) - 1))[2].units

            patcher = load_wan_model(path, for_swap=True, streamed=Streamed(units))[0]
            blocks = len(patcher.model.diffusion_model.blocks) - 1
            return apply_block_swap(patcher, SwapSettings(blocks_to_swap=blocks), pack_masters=True,
                                    host_memory="RAM")[0]
    elif loader == "unetloader":
        import comfy.sd

        load = lambda: comfy.sd.load_diffusion_model(path)  # noqa: E731
    elif loader == "comfyui-gguf":
        import importlib.util

        gguf_dir = Path(os.environ["COMFYUI_PATH"]) / "custom_nodes" / "ComfyUI-GGUF"
        spec = importlib.util.spec_from_file_location("comfyui_gguf", gguf_dir / "__init__.py",
                                                      submodule_search_locations=[str(gguf_dir)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["comfyui_gguf"] = mod
        spec.loader.exec_module(mod)
        from comfyui_gguf.loader import gguf_sd_loader
        from comfyui_gguf.nodes import GGUFModelPatcher
        from comfyui_gguf.ops import GGMLOps
        import comfy.sd

        def load():
            sd = gguf_sd_loader(path)
            m = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"custom_operations": GGMLOps()})
            return GGUFModelPatcher.clone(m)
    else:
        raise SystemExit(f"unknown loader {loader}")
    gc.collect()
    before = _rss()
    _reset_peak()
    t0 = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - t0
    peak = _peak()
    after = _rss()
    assert model is not None
    return {"seconds": seconds, "peak_delta": max(0, peak - before), "held_after": after - before}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", choices=("1.3b", "14b"), default="1.3b",
                    help="block dimensions: WAN 2.1 1.3B (default, 30 blocks = the real model, ~2.6 GiB bf16) or 14B")
    ap.add_argument("--layers", type=int, default=None, help="blocks (default: 30 for 1.3b, 3 for 14b)")
    ap.add_argument("--dir", default="/tmp/wanbench")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--one", nargs=2, metavar=("LOADER", "PATH"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one_load(*a.one)))
        return
    if not os.environ.get("COMFYUI_PATH"):
        raise SystemExit("set COMFYUI_PATH to a ComfyUI checkout and run with its Python")
    layers = a.layers or (30 if a.size == "1.3b" else 3)
    files = make_files(Path(a.dir), a.size, layers)
    has_gguf = (Path(os.environ["COMFYUI_PATH"]) / "custom_nodes" / "ComfyUI-GGUF" / "loader.py").exists()
    pairs = [("safetensors", "ours"), ("safetensors", "ours-swap"), ("safetensors", "unetloader"),
             ("gguf", "ours"), ("gguf", "ours-swap")]
    if has_gguf:
        pairs.append(("gguf", "comfyui-gguf"))
    results = {p: [] for p in pairs}
    for _ in range(a.runs):  # interleaved, so machine noise hits every loader alike
        for fmt, loader in pairs:
            out = subprocess.run([sys.executable, __file__, "--one", loader, files[fmt]], check=True,
                                 capture_output=True, text=True).stdout.strip().splitlines()[-1]
            results[(fmt, loader)].append(json.loads(out))
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, "
          f"{layers} blocks of WAN {a.size} dims, {a.runs} runs each (median), page cache warm")
    print("| file | loader | file size | load time s | peak RSS / file size | RSS held after / file size |")
    print("|---|---|---|---|---|---|")
    for (fmt, loader), runs in results.items():
        size = os.path.getsize(files[fmt])
        med = lambda k: statistics.median(r[k] for r in runs)  # noqa: E731
        print(f"| {fmt} | {loader} | {size / 2**30:.2f} GiB | {med('seconds'):.2f} | "
              f"{med('peak_delta') / size:.3f} | {med('held_after') / size:.3f} |")
    for fmt, base in (("safetensors", "unetloader"), ("gguf", "comfyui-gguf")):
        if (fmt, base) in results:
            t = statistics.median(r["seconds"] for r in results[(fmt, "ours")])
            b = statistics.median(r["seconds"] for r in results[(fmt, base)])
            print(f"{fmt}: load time ours / {base} = {t / b:.2f}")


if __name__ == "__main__":
    main()
