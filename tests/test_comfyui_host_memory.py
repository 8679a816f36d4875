"""Real-ComfyUI tier: host masters on file in a WAN 2.2 two-expert graph, with less RAM than the experts
need (skipped unless COMFYUI_PATH names a ComfyUI checkout; run with that ComfyUI's Python).

A server of its own runs on --cpu with a generated test pack (custom_nodes/wan22bs_test_ram) whose node
"reports" the available RAM to this pack (it replaces the pack's RAM probe, nothing of ComfyUI's) and
passes the spill folder on, so it runs before the nodes whose input it feeds. Graphs:

* two WAN BlockSwap Model Loaders (fp32 safetensors) -> WAN BlockSwap Looper Models -> two
  KSamplerAdvanced (high: steps 0-2, low: 2-4);
* the same with Load Diffusion Model (UNETLoader) and fp8_scaled files (ComfyUI's QuantizedTensor);
* two WAN BlockSwap Model Loaders (swap at load) straight into the samplers.

With available RAM reported below one expert's streamed blocks, ``auto`` picks file (the log says so),
the latents equal those of the same graph with host_memory RAM, and the server's anonymous memory
(``RssAnon`` of its process) after the run exceeds what it was before by at most the staging ring plus
the resident weights plus 64 MiB (plus the slot ring, which on --cpu is RAM too), while the RAM run holds
the streamed bytes. For the swap-at-load
loaders, which read nothing of a streamed block into RAM, the bound also holds for the peak seen while
the prompt runs (``/proc/<pid>/status`` read every 5 ms; the other graphs' loaders copy the whole file
first, which is their own business).
"""
import os
import threading
import uuid
from pathlib import Path

import pytest
import torch

from test_comfyui_real import _latent, _req, _run, start_server

pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="set COMFYUI_PATH to a ComfyUI checkout"),
              pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc for RssAnon")]

MIB = 1 << 20
BLOCKS, STREAMED = 12, 10
HIGH, LOW = "wan22bs_hm_high.safetensors", "wan22bs_hm_low.safetensors"
HIGH_FP8, LOW_FP8 = "wan22bs_hm_high_fp8.safetensors", "wan22bs_hm_low_fp8.safetensors"

PROBE = '''
import sys

_ORIGINAL = {}


class Wan22bsReportRam:
    """Makes the wan22_blockswap pack see ``available_bytes`` of free RAM (0: the real figure again)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"available_bytes": ("INT", {"default": 0, "min": 0, "max": 2 ** 62}),
                             "folder": ("STRING", {"default": ""}), "nonce": ("STRING", {"default": ""})}}

    RETURN_TYPES = ("STRING",)
    FUNCTION = "report"
    CATEGORY = "testing"

    def report(self, available_bytes, folder, nonce):
        for name, mod in list(sys.modules.items()):
            if name.endswith(("wan22_blockswap.utils", "wan22_blockswap.preflight", "wan22_blockswap.callbacks")) \\
                    and hasattr(mod, "host_available_bytes"):
                original = _ORIGINAL.setdefault(name, mod.host_available_bytes)
                mod.host_available_bytes = (lambda n=available_bytes: n) if available_bytes else original
        return (folder,)


NODE_CLASS_MAPPINGS = {"Wan22bsReportRam": Wan22bsReportRam}
'''


def _rss_anon(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon")


def _write_models(models: Path) -> dict:
    """Two experts (fp32 and fp8_scaled forms); returns the bytes of one expert's streamed blocks and of
    its resident weights, as stored in each form."""
    from safetensors.torch import save_file

    from wan22_blockswap import tiny_wan

    cfg = tiny_wan.tiny_config("t2v", dim=512, num_heads=4, ffn_dim=2048, num_layers=BLOCKS, text_dim=4096)
    sizes = {}
    for name, fp8_name, seed in ((HIGH, HIGH_FP8, 3), (LOW, LOW_FP8, 4)):
        sd = {k: v.contiguous() for k, v in tiny_wan.WanModel(cfg).init_weights(seed).state_dict().items()}
        save_file(sd, str(models / name))
        q = {}
        for k, v in sd.items():  # the official fp8_scaled form: every block matrix fp8 + a scale
            if k.startswith("blocks.") and v.ndim == 2:
                scale = v.abs().max() / torch.finfo(torch.float8_e4m3fn).max
                q[k] = (v / scale).to(torch.float8_e4m3fn)
                q[k[:-len("weight")] + "scale_weight"] = scale.reshape(1)
            else:
                q[k] = v.half()
        q["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
        save_file(q, str(models / fp8_name))
        streamed = tuple(f"blocks.{i}." for i in range(BLOCKS - STREAMED, BLOCKS))
        sizes[name] = {"streamed": sum(v.numel() * v.element_size() for k, v in sd.items() if k.startswith(streamed)),
                       "total": sum(v.numel() * v.element_size() for v in sd.values())}
    return sizes


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    comfy = Path(os.environ["COMFYUI_PATH"]).resolve()
    models = comfy / "models" / "diffusion_models"
    models.mkdir(parents=True, exist_ok=True)
    sizes = _write_models(models)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # freed tensors go back to the OS: RSS means it
    for s in start_server(tmp_path_factory.mktemp("comfy_out_hm"), {"wan22bs_test_ram": PROBE}, env):
        yield dict(s, sizes=sizes, spill=tmp_path_factory.mktemp("spill"))


def _swap_inputs(n, host_memory):
    return {"blocks_to_swap": n, "offload_txt_emb": False, "offload_img_emb": False, "use_non_blocking": True,
            "vace_blocks_to_swap": 0, "prefetch_blocks": 1, "block_swap_debug": True, "vram_budget": "off",
            "host_memory": host_memory, "spill_folder": ["ram", 0]}


def _pack_loader(name, node="WANModelLoader", **extra):
    return {"class_type": node, "inputs": {"model_type": "safetensors", "safetensors_model": name, "gguf_model": "none",
                                           "wan_version": "auto", "model_variant": "auto",
                                           "fp8_optimization": "disabled", "weight_dtype": "auto", **extra}}


def _graph(tag, how, host_memory, available, folder, seed=42):
    """Two experts -> (Looper Models) -> KSamplerAdvanced high (0-2) -> low (2-4) -> SaveLatent."""
    g = {"ram": {"class_type": "Wan22bsReportRam", "inputs": {"available_bytes": available, "folder": folder,
                                                              "nonce": uuid.uuid4().hex}},
         "pos": {"class_type": "TinyWanTextEmbeds", "inputs": {"seed": 1, "tokens": 16, "text_dim": 4096, "scale": 1.0}},
         "neg": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["pos", 0]}},
         "lat": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 64, "height": 64, "length": 9, "batch_size": 1}}}
    if how == "swap-at-load":
        g["high"] = _pack_loader(HIGH, "WAN22BlockSwapLoader", **_swap_inputs(STREAMED, host_memory))
        g["low"] = _pack_loader(LOW, "WAN22BlockSwapLoader", **_swap_inputs(STREAMED, host_memory))
        high, low = ["high", 0], ["low", 0]
    else:
        if how == "pack-loaders":
            g["load_high"], g["load_low"] = _pack_loader(HIGH), _pack_loader(LOW)
        else:  # Load Diffusion Model with the fp8_scaled files
            g["load_high"] = {"class_type": "UNETLoader", "inputs": {"unet_name": HIGH_FP8, "weight_dtype": "default"}}
            g["load_low"] = {"class_type": "UNETLoader", "inputs": {"unet_name": LOW_FP8, "weight_dtype": "default"}}
        g["prep"] = {"class_type": "wan22BlockSwapLooperModels", "inputs": {
            "model_high": ["load_high", 0], "model_low": ["load_low", 0], **_swap_inputs(STREAMED, host_memory)}}
        high, low = ["prep", 0], ["prep", 1]
    common = {"noise_seed": seed, "steps": 4, "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple",
              "positive": ["pos", 0], "negative": ["neg", 0]}
    g["ks_high"] = {"class_type": "KSamplerAdvanced", "inputs": {
        "model": high, "add_noise": "enable", **common, "latent_image": ["lat", 0], "start_at_step": 0,
        "end_at_step": 2, "return_with_leftover_noise": "enable"}}
    g["ks_low"] = {"class_type": "KSamplerAdvanced", "inputs": {
        "model": low, "add_noise": "disable", **common, "latent_image": ["ks_high", 0], "start_at_step": 2,
        "end_at_step": 10000, "return_with_leftover_noise": "disable"}}
    g["save"] = {"class_type": "SaveLatent", "inputs": {"samples": ["ks_low", 0], "filename_prefix": tag}}
    return g


class _Peak:
    """The largest RssAnon of a process seen while a block of code runs (read every 5 ms)."""

    def __init__(self, pid):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()

    def __enter__(self):
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_anon(self.pid))

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _free(server):
    """Unload every model and drop the cached node outputs that hold them (a new graph then loads anew)."""
    _req(server["base"], "/free", {"unload_models": True, "free_memory": True})
    _run(server, {"ram": {"class_type": "Wan22bsReportRam", "inputs": {"available_bytes": 0, "folder": "",
                                                                       "nonce": uuid.uuid4().hex}},
                  "show": {"class_type": "PreviewAny", "inputs": {"source": ["ram", 0]}}})


@pytest.mark.parametrize("how", ["pack-loaders", "unetloader-fp8", "swap-at-load"])
def test_auto_reads_from_file_with_little_ram_and_matches_the_ram_run(server, how):
    sizes = server["sizes"][HIGH]
    folder = str(server["spill"])
    one_expert = sizes["streamed"] if how != "unetloader-fp8" else sizes["streamed"] // 4
    available = one_expert // 2  # less than one expert's streamed blocks
    pid = server["pid"]
    _free(server)
    before = _rss_anon(pid)
    start = len(server["log"].read_text())
    tag = f"hm_{how}_{uuid.uuid4().hex[:6]}"
    with _Peak(pid) as peak:
        _run(server, _graph(f"{tag}_file", how, "auto", available, folder))
    after_file = _rss_anon(pid)
    log = server["log"].read_text()[start:]
    assert log.count("host masters in file") == 2, log[-3000:]  # both experts, chosen by auto
    assert "masters on file: read" in log
    # the resident weights of both experts stay in RAM (fp32 in the file; ComfyUI keeps the fp8 forms'
    # non-block weights in its own dtype); the staging ring goes with the expert that holds the slots, and
    # on --cpu so does the slot ring (a GPU holds it in VRAM): two buffers of one block each
    block = sizes["streamed"] // STREAMED
    resident = 2 * (sizes["total"] - sizes["streamed"])
    # two swap-at-load loaders are two swap nodes: no shared ring, and a CPU never unloads the idle one
    rings = 2 if how == "swap-at-load" else 1
    bound = rings * (2 * block + 2 * block) + resident + 64 * MIB
    assert after_file - before <= bound, ((after_file - before) / MIB, bound / MIB)
    if how == "swap-at-load":  # nothing of a streamed block in RAM, not even while loading
        assert peak.peak - before <= bound, ((peak.peak - before) / MIB, bound / MIB)
    file_latent = _latent(server, f"{tag}_file")
    _free(server)
    before_ram = _rss_anon(pid)
    _run(server, _graph(f"{tag}_ram", how, "RAM", 0, folder))
    assert _rss_anon(pid) - before_ram >= 2 * one_expert - 16 * MIB  # both experts' copies in RAM
    assert torch.equal(file_latent, _latent(server, f"{tag}_ram"))
