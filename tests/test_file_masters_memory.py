"""Anonymous RAM with host masters on file, measured in a subprocess (``rss_probe.py``): a model whose
streamed blocks are many times the staging ring, loaded and sampled with host_memory = file and = RAM.

On file, the process' anonymous memory (``RssAnon``) grows by at most the staging ring plus the resident
weights plus 64 MiB (activations, allocator, Python; on a CPU also the slot ring, which a GPU keeps in
VRAM: 2 x 16.8 MiB here) over the whole load and run, from a baseline taken after a warm-up forward;
in RAM it grows by at least the streamed bytes. A model from another loader (anonymous copies of everything) gives its
streamed blocks' RAM back when the swap node runs. The expected figures are computed here from the
file's tensors.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from wan22_blockswap import tiny_wan

safetensors_torch = pytest.importorskip("safetensors.torch")

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20
BLOCKS, STREAMED = 16, 14  # the probe streams the last 14 of 16 blocks
pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux) for RssAnon")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    cfg = tiny_wan.tiny_config("t2v", dim=512, num_heads=4, ffn_dim=2048, num_layers=BLOCKS, text_dim=4096)
    sd = tiny_wan.WanModel(cfg).init_weights(0).state_dict()
    folder = tmp_path_factory.mktemp("models")
    safetensors_torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "m.safetensors"))
    sizes = {k: v.numel() * v.element_size() for k, v in sd.items()}
    streamed = {f"blocks.{i}." for i in range(BLOCKS - STREAMED, BLOCKS)}
    in_streamed = sum(n for k, n in sizes.items() if any(k.startswith(p) for p in streamed))
    return folder, {"streamed": in_streamed, "resident": sum(sizes.values()) - in_streamed}


def _probe(model_file, tmp_path, how, mode):
    folder, _ = model_file
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "rss_probe.py"), str(ROOT), str(folder), "m.safetensors",
                          how, mode, str(tmp_path / "spill")], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_swap_at_load_on_file_keeps_anonymous_ram_within_the_staging_ring_and_resident_weights(model_file, tmp_path):
    expected = model_file[1]
    r = _probe(model_file, tmp_path, "swap-at-load", "file")
    assert r["masters"] == "file" and r["units"] == STREAMED and r["host_bytes"] == 0
    assert r["streamed_bytes"] >= 4 * r["staging_bytes"] > 0  # the blocks do not fit in the ring
    assert r["spill_bytes"] == 0  # fp32 file, fp32 model: every streamed byte is read from the model file
    assert r["forwards"] == 3 and r["read_bytes"] >= r["forwards"] * expected["streamed"]  # each unit each forward
    bound = r["staging_bytes"] + expected["resident"] + 64 * MIB
    for when in ("loaded", "peak", "after"):
        assert r[when] - r["before"] <= bound, (when, (r[when] - r["before"]) / MIB, bound / MIB)


def test_swap_at_load_in_ram_grows_by_the_streamed_bytes(model_file, tmp_path):
    expected = model_file[1]
    r = _probe(model_file, tmp_path, "swap-at-load", "RAM")
    assert r["masters"] == "RAM" and r["host_bytes"] >= expected["streamed"]
    assert r["peak"] - r["before"] >= expected["streamed"]


def test_a_model_from_another_loader_gives_its_streamed_blocks_ram_back_when_the_node_runs(model_file, tmp_path):
    expected = model_file[1]
    r = _probe(model_file, tmp_path, "swap-node", "file")
    assert r["loaded"] - r["before"] >= expected["streamed"] + expected["resident"] - 16 * MIB  # all in RAM first
    assert r["loaded"] - r["node_ran"] >= expected["streamed"] - 16 * MIB  # released by the node, spilled once
    assert r["spill_bytes"] >= expected["streamed"]
    bound = r["staging_bytes"] + expected["resident"] + 64 * MIB
    assert r["peak"] - r["before"] <= bound and r["after"] - r["before"] <= bound


def test_the_probe_measures_what_it_says(tmp_path):
    """RssAnon counts anonymous memory and not mapped file pages (the basis of the tests above), in a
    fresh process with the same allocator setting as the probe's."""
    path = tmp_path / "pages.bin"
    path.write_bytes(b"x" * (64 * MIB))
    code = ("import mmap, sys; sys.path.insert(0, sys.argv[1]); from rss_probe import rss_anon; import torch\n"
            "b = rss_anon(); x = torch.ones(64 * 2 ** 20 // 4); anon = rss_anon() - b\n"
            "f = open(sys.argv[2], 'rb'); m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ); b = rss_anon()\n"
            "s = sum(m[i] for i in range(0, len(m), 4096)); print(anon, rss_anon() - b)")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "tests"), str(path)], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    anon, mapped = map(int, out.stdout.split())
    assert anon >= 63 * MIB  # 64 MiB of tensor: anonymous
    assert mapped < 4 * MIB  # 64 MiB of mapped file pages read: not anonymous
