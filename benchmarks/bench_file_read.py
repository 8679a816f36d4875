"""Host masters on file: read throughput of the engine's read path against a plain sequential read of
the same file, cold and warm, and the forward time with masters on file against masters in RAM (CPU).

Everything is measured side by side in one run (interleaved rounds, medians):

* **plain**: the file read front to back with ``readinto`` in 64 MiB chunks into one buffer (what a
  disk gives a program that only reads);
* **engine**: every block of a model whose weights are views of that file (safetensors maps it, as
  ComfyUI's loaders leave them) read by the staging ring's read function, unit after unit in the
  model's order, into a staging buffer: the reads the worker thread does while the GPU computes;
* **cold**: the file's pages are dropped from the page cache first (``posix_fadvise(DONTNEED)``; Linux),
  so both read from the disk; **warm**: read again right away, from the page cache.

The forward-time ratio file / RAM is on a CPU, where the "device" is host memory and every read and
copy is synchronous: it shows what the read path costs, not GPU overlap.

    python benchmarks/bench_file_read.py [--mib 1024] [--rounds 5] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _pack import import_pack  # noqa: E402

import_pack()
from wan22_blockswap.block_manager import BlockSwapEngine  # noqa: E402
from wan22_blockswap.config import SwapSettings  # noqa: E402
from wan22_blockswap.engine.staging import _read_unit  # noqa: E402
from wan22_blockswap.tiny_wan import WanModel, make_inputs, tiny_config  # noqa: E402

log = logging.getLogger("wan22_blockswap.bench_file_read")
CHUNK = 64 << 20


def drop_page_cache(path) -> bool:
    """Drop ``path``'s pages from the page cache (Linux), written out first: a file written just now has
    dirty pages, which DONTNEED keeps. False where the OS has no such call (then reads may be warm)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def _model_file(folder: Path, mib: int):
    """A WAN-layout model of ~``mib`` MiB in fp16 blocks (dim 1024, ffn 4096: ~32 MiB a block), saved
    and loaded back as views of the file."""
    from safetensors.torch import safe_open, save_file

    per_block = 32
    cfg = tiny_config("t2v", dim=1024, ffn_dim=4096, num_heads=8, num_layers=max(2, mib // per_block))
    model = WanModel(cfg).init_weights(0).to(torch.float16).eval()
    path = folder / "bench_model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with safe_open(str(path), "pt") as f:
        model.load_state_dict({k: f.get_tensor(k) for k in f.keys()}, assign=True)
    return model, cfg, path


def read_throughput(mib: int, rounds: int, folder: Path) -> dict:
    model, cfg, path = _model_file(folder, mib)
    engine = BlockSwapEngine.from_settings(
        model, SwapSettings(blocks_to_swap=cfg.num_layers, host_memory="file", spill_dir=str(folder)), "cpu")
    engine.pack_masters()
    assert engine.tracker.spill_bytes == 0, "the blocks must be read from the model file itself"
    units = engine._units
    size = os.path.getsize(path)
    unit_bytes = sum(r.nbytes for u in units for r in u.reads)
    reads_per_unit = sum(len(u.reads) for u in units) / len(units)
    buf = torch.empty(max(CHUNK, max(u.footprint for u in units)), dtype=torch.uint8)

    def plain() -> int:
        view = memoryview(buf.numpy())
        with open(path, "rb", buffering=0) as f:
            n = 0
            while True:
                got = f.readinto(view[:CHUNK])
                if not got:
                    return n
                n += got

    def engine_reads() -> int:
        return sum(_read_unit(u, buf[:u.footprint]) for u in units)

    results = {(k, w): [] for k in ("plain", "engine") for w in ("cold", "warm")}
    cold_ok = True
    for _ in range(rounds):
        for kind, fn, nbytes in (("plain", plain, size), ("engine", engine_reads, unit_bytes)):
            cold_ok &= drop_page_cache(path)
            for when in ("cold", "warm"):
                t0 = time.perf_counter()
                got = fn()
                dt = time.perf_counter() - t0
                assert got == nbytes
                results[(kind, when)].append(nbytes / dt / 1e9)
    engine.teardown()
    out = {"file_mib": round(size / 2 ** 20), "units": len(units), "unit_mib": round(unit_bytes / len(units) / 2 ** 20, 1),
           "reads_per_unit": round(reads_per_unit, 1), "cold_cache_dropped": cold_ok}
    for when in ("cold", "warm"):
        p, e = statistics.median(results[("plain", when)]), statistics.median(results[("engine", when)])
        out[when] = {"plain_gb_s": round(p, 3), "engine_gb_s": round(e, 3), "ratio": round(e / p, 3)}
    return out


def forward_ratio(rounds: int, folder: Path) -> dict:
    """Forward time, every block streamed, masters on file vs in RAM (tiny WAN dim 512, 12 blocks fp32)."""
    cfg = tiny_config("t2v", dim=512, ffn_dim=2048, num_heads=4, num_layers=12)
    inputs = make_inputs(cfg, frames=4, height=16, width=16, text_len=16)
    times = {"RAM": [], "file": []}
    with torch.inference_mode():
        for _ in range(rounds):
            for mode in times:
                model = WanModel(cfg).init_weights(0).eval()
                engine = BlockSwapEngine.from_settings(
                    model, SwapSettings(blocks_to_swap=12, host_memory=mode, spill_dir=str(folder)), "cpu").setup()
                model(**inputs)  # warm: learn the order (and on file: spill once)
                t0 = time.perf_counter()
                for _ in range(3):
                    model(**inputs)
                times[mode].append((time.perf_counter() - t0) / 3)
                engine.teardown()
    ram, file = statistics.median(times["RAM"]), statistics.median(times["file"])
    return {"RAM_ms": round(ram * 1e3, 1), "file_ms": round(file * 1e3, 1), "ratio": round(file / ram, 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024, help="model file size to read")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", help="folder for the model file (default: the system temp folder)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        result = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                  "torch": torch.__version__, "read": read_throughput(args.mib, args.rounds, folder),
                  "forward": forward_ratio(args.rounds, folder)}
    log.info("%s", json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
