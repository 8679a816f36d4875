"""Real-ComfyUI tier: the pack loaded by a real ComfyUI server, API workflows on --cpu.

Skipped unless COMFYUI_PATH names a ComfyUI checkout; run it with that ComfyUI's Python (see the
README). It links this pack and the shared test-helper nodes (../shared/tools/comfyui) into
custom_nodes/, writes a tiny WAN model and a tiny LoRA into models/, starts `main.py --cpu` on a
free local port, queues API-format prompts over HTTP and compares the saved latents exactly.
"""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="set COMFYUI_PATH to a ComfyUI checkout")]

ROOT = Path(__file__).resolve().parents[1]
HELPERS = ROOT.parent / "shared" / "tools" / "comfyui" / "comfy_test_helpers"
MODEL = "wan22bs_tiny_t2v.safetensors"
LORA = "wan22bs_tiny_lora.safetensors"


def _write_assets(comfy: Path) -> None:
    from safetensors.torch import save_file

    from wan22_blockswap import tiny_wan

    models = comfy / "models" / "diffusion_models"
    loras = comfy / "models" / "loras"
    models.mkdir(parents=True, exist_ok=True)
    loras.mkdir(parents=True, exist_ok=True)
    cfg = tiny_wan.tiny_config("t2v", dim=128, num_heads=1, ffn_dim=256, num_layers=8, text_dim=4096)
    sd = tiny_wan.WanModel(cfg).init_weights(3).state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(models / MODEL))
    g = torch.Generator().manual_seed(5)
    lora = {}
    for key in ("blocks.7.ffn.0", "blocks.6.self_attn.q", "blocks.1.cross_attn.k"):  # streamed + resident
        out_f, in_f = sd[f"{key}.weight"].shape
        lora[f"diffusion_model.{key}.lora_up.weight"] = torch.randn(out_f, 4, generator=g) * 0.1
        lora[f"diffusion_model.{key}.lora_down.weight"] = torch.randn(4, in_f, generator=g) * 0.1
        lora[f"diffusion_model.{key}.alpha"] = torch.tensor(4.0)
    save_file(lora, str(loras / LORA))


def _link(comfy: Path, src: Path, name: str) -> None:
    dst = comfy / "custom_nodes" / name
    if dst.is_symlink() and dst.resolve() == src.resolve():
        return
    if dst.is_symlink():
        dst.unlink()
    dst.symlink_to(src, target_is_directory=True)


def _req(base, path, data=None):
    r = urllib.request.Request(base + path, data=None if data is None else json.dumps(data).encode(),
                               headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(r, timeout=60) as resp:
        body = resp.read()
        return json.loads(body) if body else None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    comfy = Path(os.environ["COMFYUI_PATH"]).resolve()
    assert HELPERS.is_dir(), f"missing {HELPERS}"
    _link(comfy, ROOT, "wan22_blockswap")
    _link(comfy, HELPERS, "test_helpers")
    _write_assets(comfy)
    out = tmp_path_factory.mktemp("comfy_out")
    log = out / "server.log"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                             "--disable-auto-launch", "--output-directory", str(out)],
                            cwd=comfy, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            _req(base, "/system_stats")
            break
        except OSError:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, "ComfyUI did not start"
            time.sleep(0.5)
    text = log.read_text()
    assert "IMPORT FAILED" not in text, text[-3000:]
    yield {"base": base, "out": out, "log": log, "pid": proc.pid}
    proc.terminate()
    proc.wait(timeout=30)


def _run(server, prompt):
    pid = _req(server["base"], "/prompt", {"prompt": prompt, "client_id": str(uuid.uuid4())})["prompt_id"]
    deadline = time.time() + 300
    while True:
        h = _req(server["base"], f"/history/{pid}") or {}
        status = h.get(pid, {}).get("status", {})
        if status.get("status_str") in ("success", "error"):
            assert status["status_str"] == "success", json.dumps(status)[-3000:]
            return h[pid]["outputs"]
        assert time.time() < deadline, "prompt timed out"
        time.sleep(0.2)


def _latent(server, prefix):
    from safetensors.torch import load_file

    files = sorted(server["out"].glob(f"{prefix}*.latent"))
    assert files, prefix
    return load_file(str(files[-1]))["latent_tensor"]


def _graph(tag, branches):
    """One loader feeding several sampler branches (clones of one loaded model in one graph).
    ``branches``: name -> list of (class_type, inputs) applied to the model in order."""
    g = {"load": {"class_type": "UNETLoader", "inputs": {"unet_name": MODEL, "weight_dtype": "default"}},
         "pos": {"class_type": "TinyWanTextEmbeds", "inputs": {"seed": 1, "tokens": 16, "text_dim": 4096, "scale": 1.0}},
         "neg": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["pos", 0]}},
         "lat": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 64, "height": 64, "length": 9, "batch_size": 1}}}
    for name, chain in branches.items():
        src = ["load", 0]
        for i, (cls, inputs) in enumerate(chain):
            nid = f"{name}_{i}"
            g[nid] = {"class_type": cls, "inputs": {"model": src, **inputs}}
            src = [nid, 0]
        g[f"{name}_info"] = {"class_type": "TinyModelInfo", "inputs": {"model": src}}
        g[f"{name}_ks"] = {"class_type": "KSampler", "inputs": {
            "model": [f"{name}_info", 0], "seed": 42, "steps": 3, "cfg": 3.0, "sampler_name": "euler",
            "scheduler": "simple", "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["lat", 0],
            "denoise": 1.0}}
        g[f"{name}_save"] = {"class_type": "SaveLatent", "inputs": {"samples": [f"{name}_ks", 0],
                                                                  "filename_prefix": f"{tag}_{name}"}}
    return g


def _swap(n, debug=False):
    return ("wan22BlockSwap", {"blocks_to_swap": n, "offload_txt_emb": False, "offload_img_emb": False,
                               "use_non_blocking": True, "vace_blocks_to_swap": 0, "prefetch_blocks": 1,
                               "block_swap_debug": debug})


LORA_NODE = ("LoraLoaderModelOnly", {"lora_name": LORA, "strength_model": 0.8})


def test_ksampler_identical_at_several_block_counts_and_with_lora(server):
    tag = f"counts{uuid.uuid4().hex[:6]}"
    _run(server, _graph(tag, {
        "plain": [],
        "swap0": [_swap(0)], "swap3": [_swap(3)], "swap8": [_swap(8)],
        "lora": [LORA_NODE],
        "lora_swap": [LORA_NODE, _swap(5)],
        "swap_lora": [_swap(5), LORA_NODE],
    }))
    plain = _latent(server, f"{tag}_plain")
    for name in ("swap0", "swap3", "swap8"):
        assert torch.equal(_latent(server, f"{tag}_{name}"), plain), name
    lora = _latent(server, f"{tag}_lora")
    assert not torch.equal(lora, plain)  # the LoRA does something
    for name in ("lora_swap", "swap_lora"):
        assert torch.equal(_latent(server, f"{tag}_{name}"), lora), name


def test_twenty_queued_runs_with_free_stay_flat(server):
    import psutil

    proc = psutil.Process(server["pid"])
    rss, infos = [], []
    for i in range(20):
        tag = f"loop{i}_{uuid.uuid4().hex[:6]}"
        outputs = _run(server, _graph(tag, {"swap": [_swap(6, debug=True)]}))
        _req(server["base"], "/free", {"unload_models": True, "free_memory": True})
        time.sleep(0.5)  # /free is processed by the prompt worker between prompts
        info = json.loads(outputs["swap_info"]["text"][0])
        infos.append((info["callbacks"], info["wrappers"], info["model_size"]))
        rss.append(proc.memory_info().rss)
    assert len(set(map(json.dumps, infos))) == 1, infos[:2]
    growth = rss[-1] - rss[2]
    assert growth < 48 * 2**20, [r // 2**20 for r in rss]
    summaries = [line for line in server["log"].read_text().splitlines() if "units streamed" in line and "D2H" in line]
    assert len(summaries) >= 20 and all("D2H 0 B" in s for s in summaries)
    masters = {s.split("host masters ")[1].split(";")[0] for s in summaries[-20:]}
    assert len(masters) == 1, masters
