"""Real-ComfyUI tier: the pack loaded by a real ComfyUI server, API workflows on --cpu.

Skipped unless COMFYUI_PATH names a ComfyUI checkout; run it with that ComfyUI's Python (see the
README). It links this pack and the shared test-helper nodes (../shared/tools/comfyui) into
custom_nodes/, writes a tiny WAN model and a tiny LoRA into models/, starts `main.py --cpu` on a
free local port, queues API-format prompts over HTTP and compares the saved latents exactly.
The GGUF tests also need ComfyUI-GGUF in custom_nodes/ComfyUI-GGUF (and the `gguf` package); they write
a Q8_0 GGUF of the same tiny model and are skipped without it.
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

    # SaveLatent writes "<prefix>_<5-digit counter>_.latent"; match that exactly, or the prefix "t_lora"
    # would also pick up "t_lora_swap_00001_.latent" (sorted last) and compare a branch with itself.
    files = sorted(server["out"].glob(f"{prefix}_[0-9][0-9][0-9][0-9][0-9]_.latent"))
    assert files, prefix
    return load_file(str(files[-1]))["latent_tensor"]


def _graph(tag, branches, loader=None):
    """One loader feeding several sampler branches (clones of one loaded model in one graph).
    ``branches``: name -> list of (class_type, inputs) applied to the model in order.
    ``loader``: the loader node (default: UNETLoader of the tiny safetensors model)."""
    loader = loader or {"class_type": "UNETLoader", "inputs": {"unet_name": MODEL, "weight_dtype": "default"}}
    g = {"load": loader,
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


# --- GGUF (ComfyUI-GGUF's "Unet Loader (GGUF)") ---------------------------------------------------
# Needs city96/ComfyUI-GGUF in COMFYUI_PATH/custom_nodes/ComfyUI-GGUF (linked or cloned there before the
# server starts) and the `gguf` package in ComfyUI's environment; skipped otherwise.
GGUF_MODEL = "wan22bs_tiny_t2v_q8.gguf"


def _gguf_available() -> str:
    """'' when the GGUF tests can run, else the reason to skip."""
    comfy = Path(os.environ.get("COMFYUI_PATH", "")).resolve()
    if not (comfy / "custom_nodes" / "ComfyUI-GGUF").exists():
        return f"ComfyUI-GGUF is not installed at {comfy / 'custom_nodes' / 'ComfyUI-GGUF'}"
    try:
        import gguf  # noqa: F401
    except ImportError:
        return "the `gguf` package is not installed in ComfyUI's Python environment"
    return ""


def _write_gguf(path: Path) -> dict:
    """The tiny WAN t2v of `_write_assets` as a GGUF file: arch "wan" (ComfyUI-GGUF's loader checks
    general.architecture against its IMG_ARCH_LIST), every 2-D weight inside blocks.* quantized to Q8_0,
    everything else F32 (norms, biases, modulations, embeddings, head: ComfyUI's WAN detection reads
    their shapes). Returns {key: qtype name}."""
    import gguf

    from wan22_blockswap import tiny_wan

    cfg = tiny_wan.tiny_config("t2v", dim=128, num_heads=1, ffn_dim=256, num_layers=8, text_dim=4096)
    sd = tiny_wan.WanModel(cfg).init_weights(3).state_dict()
    Q = gguf.GGMLQuantizationType
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    w = gguf.GGUFWriter(str(tmp), arch="wan")
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    kinds = {}
    for k, v in sd.items():
        a = v.detach().float().contiguous().numpy()
        qt = Q.Q8_0 if (k.startswith("blocks.") and a.ndim == 2) else Q.F32
        data = gguf.quants.quantize(a, qt)
        w.add_tensor(k, data, raw_dtype=qt)
        kinds[k] = qt.name
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)  # a server that lists the folder never sees a half-written file
    return kinds


@pytest.fixture(scope="module")
def gguf_model(server):
    why = _gguf_available()
    if why:
        pytest.skip(why)
    comfy = Path(os.environ["COMFYUI_PATH"]).resolve()
    kinds = _write_gguf(comfy / "models" / "diffusion_models" / GGUF_MODEL)
    assert sum(q == "Q8_0" for q in kinds.values()) == 8 * 10  # 4 self-attn + 4 cross-attn + 2 ffn per block
    obj = _req(server["base"], "/object_info/UnetLoaderGGUF")
    assert "UnetLoaderGGUF" in obj, "ComfyUI-GGUF's nodes are not registered: " + server["log"].read_text()[-3000:]
    assert GGUF_MODEL in obj["UnetLoaderGGUF"]["input"]["required"]["unet_name"][0], obj
    return GGUF_MODEL


def _gguf_loader(name):
    return {"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": name}}


def test_gguf_q8_ksampler_identical_with_swap_and_lora(server, gguf_model):
    tag = f"gguf{uuid.uuid4().hex[:6]}"
    outputs = _run(server, _graph(tag, {
        "plain": [],
        "swap3": [_swap(3)], "swap8": [_swap(8)],
        "lora": [LORA_NODE],
        "lora_swap": [LORA_NODE, _swap(5)],
        "swap_lora": [_swap(5), LORA_NODE],
        "swap8_lora": [_swap(8), LORA_NODE],  # every LoRA key on a streamed quantized weight
    }, loader=_gguf_loader(gguf_model)))
    log = server["log"].read_text()
    assert "gguf qtypes: F32 (151), Q8_0 (80)" in log, log[-3000:]
    for name in ("plain", "swap8", "lora_swap"):  # ComfyUI-GGUF's patcher, ComfyUI's WAN 2.1 detection
        info = json.loads(outputs[f"{name}_info"]["text"][0])
        assert info["patcher"] == "GGUFModelPatcher", info
        assert info["model_base"] == "WAN21", info
        assert info["blocks"] == 8, info
    plain = _latent(server, f"{tag}_plain")
    assert torch.isfinite(plain).all()
    diffs = {}
    for name in ("swap3", "swap8"):
        out = _latent(server, f"{tag}_{name}")
        diffs[name] = (out - plain).abs().max().item()
    lora = _latent(server, f"{tag}_lora")
    assert not torch.equal(lora, plain)  # the LoRA reaches the quantized weights
    for name in ("lora_swap", "swap_lora", "swap8_lora"):
        diffs[name] = (_latent(server, f"{tag}_{name}") - lora).abs().max().item()
    assert all(d == 0 for d in diffs.values()), diffs  # max |diff| vs. the unswapped reference


def test_gguf_swapped_branch_keeps_gguf_patcher_and_streams_quantized_bytes(server, gguf_model):
    import gguf

    from wan22_blockswap.utils import format_bytes

    tag = f"ggufinfo{uuid.uuid4().hex[:6]}"
    outputs = _run(server, _graph(tag, {"swap": [_swap(6, debug=True)]}, loader=_gguf_loader(gguf_model)))
    info = json.loads(outputs["swap_info"]["text"][0])
    assert info["patcher"] == "GGUFModelPatcher", info
    assert info["model_base"] == "WAN21" and info["blocks"] == 8, info
    assert sum(info["wrappers"].values()) >= 1 and sum(info["callbacks"].values()) >= 1, info
    # One ring slot holds a block's bytes as stored in the file (Q8_0 weights, F32 rest), not dequantized.
    path = Path(os.environ["COMFYUI_PATH"]).resolve() / "models" / "diffusion_models" / gguf_model
    reader = gguf.GGUFReader(str(path))
    block_bytes = sum(int(t.n_bytes) for t in reader.tensors if t.name.startswith("blocks.0."))
    summary = [line for line in server["log"].read_text().splitlines()
               if "units streamed" in line and "D2H" in line][-1]
    assert "6 units streamed, 2 blocks resident" in summary, summary
    assert f"ring 2 x {format_bytes(block_bytes)}" in summary, (block_bytes, summary)
    assert "D2H 0 B" in summary, summary
