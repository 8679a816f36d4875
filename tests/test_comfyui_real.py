"""Real-ComfyUI tier: the pack loaded by a real ComfyUI server, API workflows on --cpu.

Skipped unless COMFYUI_PATH names a ComfyUI checkout; run it with that ComfyUI's Python (see the
README). It links this pack and the shared test-helper nodes (../shared/tools/comfyui) into
custom_nodes/, writes a tiny WAN model and a tiny LoRA into models/, starts `main.py --cpu` on a
free local port, queues API-format prompts over HTTP and compares the saved latents exactly.
The GGUF tests also need ComfyUI-GGUF in custom_nodes/ComfyUI-GGUF (and the `gguf` package); they write
a Q8_0 GGUF of the same tiny model and are skipped without it.
The WanVideoLooper test also needs SquirrelRat/WanVideoLooper in custom_nodes/WanVideoLooper (skipped
without it); for it the fixture writes tiny I2V experts, a tiny WAN 2.1 VAE and a generated test-node
pack (custom_nodes/wan22bs_test_fakes: a CLIP stand-in, an exact IMAGE saver, a sampler-call probe).
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

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="set COMFYUI_PATH to a ComfyUI checkout")]

ROOT = Path(__file__).resolve().parents[1]
HELPERS = ROOT.parent / "shared" / "tools" / "comfyui" / "comfy_test_helpers"
MODEL = "wan22bs_tiny_t2v.safetensors"
MODEL_LOW = "wan22bs_tiny_t2v_low.safetensors"  # a second expert (other weights) for high/low graphs
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
    low = tiny_wan.WanModel(cfg).init_weights(4).state_dict()
    save_file({k: v.contiguous() for k, v in low.items()}, str(models / MODEL_LOW))
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


def wait_until_serving(proc, base: str, log: Path, timeout: float = 180) -> str:
    """Poll a starting ComfyUI server until it answers (a failed start fails with its log); its log."""
    deadline = time.time() + timeout
    while True:
        try:
            _req(base, "/system_stats")
            return log.read_text()
        except OSError:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, "ComfyUI did not start"
            time.sleep(0.5)  # the server's own start-up: there is no event to wait on


def start_server(out: Path, packs=None, env=None):
    """A ComfyUI server on --cpu with this pack and the test helpers linked, the tiny models, looper
    assets and the generated test packs written (``packs``: folder name -> its __init__.py source),
    serving on a free port. Yields the server's figures; stops it afterwards."""
    comfy = Path(os.environ["COMFYUI_PATH"]).resolve()
    assert HELPERS.is_dir(), f"missing {HELPERS}"
    _link(comfy, ROOT, "wan22_blockswap")
    _link(comfy, HELPERS, "test_helpers")
    _write_assets(comfy)
    _write_looper_assets(comfy)
    for name, source in (packs or {}).items():
        (comfy / "custom_nodes" / name).mkdir(exist_ok=True)
        (comfy / "custom_nodes" / name / "__init__.py").write_text(source)
    log = out / "server.log"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                             "--disable-auto-launch", "--output-directory", str(out)],
                            cwd=comfy, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    text = wait_until_serving(proc, base, log)
    assert "IMPORT FAILED" not in text, text[-3000:]
    yield {"base": base, "out": out, "log": log, "pid": proc.pid}
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from start_server(tmp_path_factory.mktemp("comfy_out"))


def _run(server, prompt):
    pid = _req(server["base"], "/prompt", {"prompt": prompt, "client_id": str(uuid.uuid4())})["prompt_id"]
    deadline = time.time() + 300
    while True:
        h = _req(server["base"], f"/history/{pid}") or {}
        status = h.get(pid, {}).get("status", {})
        if status.get("status_str") in ("success", "error"):
            errors = [m[1] for m in status.get("messages", []) if m[0] == "execution_error"]
            assert status["status_str"] == "success", (
                "".join(errors[0].get("traceback", [])[-6:]) + errors[0].get("exception_message", "")
                if errors else json.dumps(status)[-3000:])
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


def _pack_loader(node, fmt, name, **extra):
    inputs = {"model_type": fmt, "safetensors_model": name if fmt == "safetensors" else "none",
              "gguf_model": name if fmt == "gguf" else "none", "wan_version": "auto", "model_variant": "auto",
              "fp8_optimization": "disabled", "weight_dtype": "auto", **extra}
    return {"class_type": node, "inputs": inputs}


PACK_GGUF = "wan22bs_tiny_t2v_pack_q8.gguf"


def test_pack_loaders_over_the_api(server):
    """WAN Model Loader and WAN BlockSwap Model Loader as a user runs them: file lists from ComfyUI's
    model folders, the same latents as UNETLoader (safetensors), swap and LoRA on their models."""
    from safetensors.torch import load_file

    from wan22_blockswap.formats.gguf_reader import write_tiny_gguf

    comfy = Path(os.environ["COMFYUI_PATH"]).resolve()
    models = comfy / "models" / "diffusion_models"
    write_tiny_gguf(str(models / PACK_GGUF), load_file(str(models / MODEL)))
    info = _req(server["base"], "/object_info/WANModelLoader")["WANModelLoader"]["input"]["required"]
    # V3 combos: ("COMBO", {"options": [...]})
    assert MODEL in info["safetensors_model"][1]["options"] and PACK_GGUF in info["gguf_model"][1]["options"]
    swap_inputs = dict(_swap(5)[1], vram_budget="off")
    tag = f"loaders{uuid.uuid4().hex[:6]}"
    _run(server, _graph(f"{tag}_core", {"plain": [], "lora": [LORA_NODE]}))
    _run(server, _graph(f"{tag}_st", {"plain": [], "swap3": [_swap(3)], "lora_swap": [LORA_NODE, _swap(5)]},
                        loader=_pack_loader("WANModelLoader", "safetensors", MODEL)))
    _run(server, _graph(f"{tag}_bs", {"plain": [], "lora": [LORA_NODE]},
                        loader=_pack_loader("WAN22BlockSwapLoader", "safetensors", MODEL, **swap_inputs)))
    plain, lora = _latent(server, f"{tag}_core_plain"), _latent(server, f"{tag}_core_lora")
    for name in ("st_plain", "st_swap3", "bs_plain"):
        assert torch.equal(_latent(server, f"{tag}_{name}"), plain), name
    for name in ("st_lora_swap", "bs_lora"):
        assert torch.equal(_latent(server, f"{tag}_{name}"), lora), name
    _run(server, _graph(f"{tag}_gg", {"plain": [], "swap8": [_swap(8)], "lora": [LORA_NODE]},
                        loader=_pack_loader("WANModelLoader", "gguf", PACK_GGUF)))
    _run(server, _graph(f"{tag}_ggbs", {"plain": [], "lora": [LORA_NODE]},
                        loader=_pack_loader("WAN22BlockSwapLoader", "gguf", PACK_GGUF, **swap_inputs)))
    q8 = _latent(server, f"{tag}_gg_plain")
    assert torch.isfinite(q8).all() and not torch.equal(q8, plain)  # quantized weights, close not equal
    assert (q8 - plain).abs().max() < 0.05 * plain.abs().max()
    assert torch.equal(_latent(server, f"{tag}_gg_swap8"), q8)
    assert torch.equal(_latent(server, f"{tag}_ggbs_plain"), q8)
    q8_lora = _latent(server, f"{tag}_gg_lora")
    assert not torch.equal(q8_lora, q8) and torch.equal(_latent(server, f"{tag}_ggbs_lora"), q8_lora)


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


def _write_gguf(path: Path, variant: str = "t2v", quant: str = "Q8_0", dim: int = 128, seed: int = 3) -> dict:
    """A tiny WAN model (by default the t2v of `_write_assets`) as the WAN GGUF files in circulation
    are laid out (``write_tiny_gguf``: ComfyUI-GGUF's convert.py + llama-quantize + fix_5d_tensors.py;
    arch "wan", no key prefix, block matrices in ``quant``, 1-D weights and modulations F32, other
    matrices BF16, the 5-D patch embedding a true 5-D F32 tensor). Returns {key: type name}, as gguf-py
    reads the file, in file order."""
    import gguf

    from wan22_blockswap import tiny_wan
    from wan22_blockswap.formats.gguf_reader import write_tiny_gguf

    cfg = tiny_wan.tiny_config(variant, dim=dim, num_heads=dim // 128, ffn_dim=2 * dim, num_layers=8, text_dim=4096)
    sd = tiny_wan.WanModel(cfg).init_weights(seed).state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    write_tiny_gguf(str(tmp), sd, quant=quant)
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp)).tensors}
    os.replace(tmp, path)  # a server that lists the folder never sees a half-written file
    return kinds


def _comfyui_gguf_dequantize():
    """ComfyUI-GGUF's own ``dequantize(data, qtype, shape, dtype)``, from its dequant.py in custom_nodes."""
    import importlib.util

    where = Path(os.environ["COMFYUI_PATH"]).resolve() / "custom_nodes" / "ComfyUI-GGUF" / "dequant.py"
    spec = importlib.util.spec_from_file_location("wan22bs_comfyui_gguf_dequant", where)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.dequantize


def _write_dequantized(gguf_path: Path, path: Path, by: str = "gguf-py") -> None:
    """The GGUF file's weights dequantized into an F32 safetensors file, what UNETLoader loads as the
    reference for the quantized model: by gguf-py (the reference reader), or by ComfyUI-GGUF's own
    dequantization as its layers do it on a CPU (``dequantize(..., dtype=None)``: its arithmetic in
    the blocks' fp16, then widened), which is the reference for the Unet Loader (GGUF) path."""
    import gguf
    from safetensors.torch import save_file

    comfyui_gguf = _comfyui_gguf_dequantize() if by == "ComfyUI-GGUF" else None
    sd = {}
    for t in gguf.GGUFReader(str(gguf_path)).tensors:
        shape = tuple(reversed(t.shape.tolist()))
        if comfyui_gguf is not None and t.tensor_type.name not in ("F32", "F16"):
            raw = torch.from_numpy(np.array(t.data))
            sd[t.name] = comfyui_gguf(raw, t.tensor_type, torch.Size(shape), dtype=None).float().reshape(shape)
        else:
            values = gguf.quants.dequantize(t.data, t.tensor_type)
            sd[t.name] = torch.from_numpy(np.array(values, dtype=np.float32)).reshape(shape)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp))
    os.replace(tmp, path)


@pytest.fixture(scope="module")
def gguf_model(server):
    why = _gguf_available()
    if why:
        pytest.skip(why)
    comfy = Path(os.environ["COMFYUI_PATH"]).resolve()
    kinds = _write_gguf(comfy / "models" / "diffusion_models" / GGUF_MODEL)
    assert sum(q == "Q8_0" for q in kinds.values()) == 8 * 10  # 4 self-attn + 4 cross-attn + 2 ffn per block
    assert kinds["patch_embedding.weight"] == "F32" and "BF16" in kinds.values()
    obj = _req(server["base"], "/object_info/UnetLoaderGGUF")
    assert "UnetLoaderGGUF" in obj, "ComfyUI-GGUF's nodes are not registered: " + server["log"].read_text()[-3000:]
    assert GGUF_MODEL in obj["UnetLoaderGGUF"]["input"]["required"]["unet_name"][0], obj
    return GGUF_MODEL


def _gguf_loader(name):
    return {"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": name}}


def _gguf_kinds(name) -> dict:
    """{tensor name: type name} of a GGUF file in ComfyUI's models folder, read with gguf-py."""
    import gguf

    path = Path(os.environ["COMFYUI_PATH"]).resolve() / "models" / "diffusion_models" / name
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


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
    counts = {}
    for name in _gguf_kinds(gguf_model).values():  # ComfyUI-GGUF lists the types in order of first use
        counts[name] = counts.get(name, 0) + 1
    expected = "gguf qtypes: " + ", ".join(f"{k} ({v})" for k, v in counts.items())
    assert expected in log, (expected, log[-3000:])
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


# --- WAN GGUF files as they are in circulation, through every entry point -------------------------
@pytest.mark.parametrize("quant,variant", [("Q8_0", "t2v"), ("Q8_0", "i2v"), ("Q4_K_M", "t2v"), ("Q4_K_M", "i2v")])
def test_community_gguf_identical_with_swap_through_every_entry_point(server, quant, variant, summary_lines):
    """A WAN GGUF laid out as city96's and QuantStack's files (the 5-D patch embedding a true 5-D F32
    tensor after its bias; Q4_K_M: Q4_K and Q6_K block matrices, dim 256 so their rows are whole
    K-quant blocks), loaded by WAN BlockSwap Model Loader, by WAN BlockSwap Model Loader (swap at
    load) and by ComfyUI-GGUF's Unet Loader (GGUF) followed by the swap node: each gives the same
    latent with swap on and off, and the pack's loaders the same latent as UNETLoader on the file's
    weights dequantized by gguf-py."""
    why = _gguf_available()
    if why:
        pytest.skip(why)
    models = Path(os.environ["COMFYUI_PATH"]).resolve() / "models" / "diffusion_models"
    name = f"wan22bs_tiny_{variant}_{quant.lower()}_community.gguf"
    kinds = _write_gguf(models / name, variant, quant, dim=256 if quant.startswith("Q4_K") else 128, seed=8)
    expected_types = {"Q8_0": {"Q8_0"}, "Q4_K_M": {"Q4_K", "Q6_K"}}[quant]
    assert {t for k, t in kinds.items() if k.startswith("blocks.") and k.endswith(".weight")
            and t not in ("F32",)} == expected_types
    names = list(kinds)
    assert names[names.index("patch_embedding.weight") - 1] == "patch_embedding.bias"
    ref_name = name.replace(".gguf", "_dequantized.safetensors")
    ref_gg_name = name.replace(".gguf", "_dequantized_by_comfyui_gguf.safetensors")
    _write_dequantized(models / name, models / ref_name)
    _write_dequantized(models / name, models / ref_gg_name, by="ComfyUI-GGUF")
    tag = f"community{quant}{variant}{uuid.uuid4().hex[:6]}"
    swap_inputs = dict(_swap(5)[1], vram_budget="off")
    for label, reference in (("ref", ref_name), ("refgg", ref_gg_name)):
        unet = {"class_type": "UNETLoader", "inputs": {"unet_name": reference, "weight_dtype": "default"}}
        _run(server, _graph(f"{tag}_{label}", {"plain": []}, loader=unet))
    _run(server, _graph(f"{tag}_gg", {"plain": [], "swap": [_swap(5)]}, loader=_gguf_loader(name)))
    _run(server, _graph(f"{tag}_pk", {"plain": [], "swap": [_swap(5)]},
                        loader=_pack_loader("WANModelLoader", "gguf", name)))
    _run(server, _graph(f"{tag}_bs", {"plain": []},
                        loader=_pack_loader("WAN22BlockSwapLoader", "gguf", name, **swap_inputs)))
    ref, ref_gg = _latent(server, f"{tag}_ref_plain"), _latent(server, f"{tag}_refgg_plain")
    assert torch.isfinite(ref).all() and ref.std() > 0
    gg, pk = _latent(server, f"{tag}_gg_plain"), _latent(server, f"{tag}_pk_plain")
    assert torch.equal(_latent(server, f"{tag}_gg_swap"), gg)
    assert torch.equal(_latent(server, f"{tag}_pk_swap"), pk)
    assert torch.equal(_latent(server, f"{tag}_bs_plain"), pk)
    assert torch.equal(pk, ref)  # the pack's dequantization is gguf-py's, bit for bit
    assert torch.equal(gg, ref_gg)  # Unet Loader (GGUF): its own dequantization of the same file
    diff = (ref_gg - ref).abs().max().item()  # what ComfyUI-GGUF's fp16 block arithmetic changes
    summary_lines.append(f"real ComfyUI, community {quant} {variant} GGUF: swap on = off through all three entry "
                         f"points, each = its dequantized reference exactly; ComfyUI-GGUF's dequantization vs "
                         f"gguf-py's: max |latent diff| {diff:.2e} (latent max {ref.abs().max().item():.1f})")


# --- WAN 2.2 high/low experts (KSamplerAdvanced split) --------------------------------------------
def _run_entry(server, prompt):
    """Like `_run`, but returns the whole history entry (outputs and status messages, which list the
    nodes ComfyUI took from its cache)."""
    pid = _req(server["base"], "/prompt", {"prompt": prompt, "client_id": str(uuid.uuid4())})["prompt_id"]
    deadline = time.time() + 600
    while True:
        h = _req(server["base"], f"/history/{pid}") or {}
        status = h.get(pid, {}).get("status", {})
        if status.get("status_str") in ("success", "error"):
            errors = [m[1] for m in status.get("messages", []) if m[0] == "execution_error"]
            assert status["status_str"] == "success", (
                "".join(errors[0].get("traceback", [])[-6:]) + errors[0].get("exception_message", "")
                if errors else json.dumps(status)[-3000:])
            return h[pid]
        assert time.time() < deadline, "prompt timed out"
        time.sleep(0.2)


def _cached_nodes(entry) -> set:
    return {n for kind, msg in entry["status"].get("messages", []) if kind == "execution_cached"
            for n in msg.get("nodes", [])}


def _looper_models(n, debug=False):
    return ("wan22BlockSwapLooperModels", {"blocks_to_swap": n, "offload_txt_emb": False, "offload_img_emb": False,
                                           "use_non_blocking": True, "vace_blocks_to_swap": 0, "prefetch_blocks": 1,
                                           "block_swap_debug": debug})


def _moe_graph(tag, variants, seed=42, shift=5.0):
    """WAN 2.2 A14B-style graph: two UNETLoaders (high-noise expert MODEL, low-noise expert MODEL_LOW),
    each through ModelSamplingSD3 (``shift`` None: no ModelSamplingSD3), then per variant
    KSamplerAdvanced high (add noise, steps 0-2 of 4, leftover noise returned) -> KSamplerAdvanced low
    (no noise, steps 2-end) -> SaveLatent "<tag>_<variant>". All variants share the two loaders.
    ``variants``: name -> "plain" | ("swap", n) (one wan22BlockSwap per expert) | ("looper", n) (one
    wan22BlockSwapLooperModels feeding both samplers, with block_swap_debug: one summary per sampler call)."""
    g = {"load_high": {"class_type": "UNETLoader", "inputs": {"unet_name": MODEL, "weight_dtype": "default"}},
         "load_low": {"class_type": "UNETLoader", "inputs": {"unet_name": MODEL_LOW, "weight_dtype": "default"}},
         "pos": {"class_type": "TinyWanTextEmbeds", "inputs": {"seed": 1, "tokens": 16, "text_dim": 4096, "scale": 1.0}},
         "neg": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["pos", 0]}},
         "lat": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 64, "height": 64, "length": 9, "batch_size": 1}}}
    high, low = ["load_high", 0], ["load_low", 0]
    if shift is not None:
        g["ms_high"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": high, "shift": shift}}
        g["ms_low"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": low, "shift": shift}}
        high, low = ["ms_high", 0], ["ms_low", 0]
    for name, how in variants.items():
        if how == "plain":
            h, lo = high, low
        elif how[0] == "swap":
            cls, inputs = _swap(how[1])
            g[f"{name}_swap_high"] = {"class_type": cls, "inputs": {"model": high, **inputs}}
            g[f"{name}_swap_low"] = {"class_type": cls, "inputs": {"model": low, **inputs}}
            h, lo = [f"{name}_swap_high", 0], [f"{name}_swap_low", 0]
        elif how[0] == "looper":
            cls, inputs = _looper_models(how[1], debug=True)
            g[f"{name}_prep"] = {"class_type": cls, "inputs": {"model_high": high, "model_low": low, **inputs}}
            h, lo = [f"{name}_prep", 0], [f"{name}_prep", 1]
        else:
            raise ValueError(how)
        common = {"noise_seed": seed, "steps": 4, "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple",
                  "positive": ["pos", 0], "negative": ["neg", 0]}
        g[f"{name}_ks_high"] = {"class_type": "KSamplerAdvanced", "inputs": {
            "model": h, "add_noise": "enable", **common, "latent_image": ["lat", 0],
            "start_at_step": 0, "end_at_step": 2, "return_with_leftover_noise": "enable"}}
        g[f"{name}_ks_low"] = {"class_type": "KSamplerAdvanced", "inputs": {
            "model": lo, "add_noise": "disable", **common, "latent_image": [f"{name}_ks_high", 0],
            "start_at_step": 2, "end_at_step": 10000, "return_with_leftover_noise": "disable"}}
        g[f"{name}_save"] = {"class_type": "SaveLatent", "inputs": {"samples": [f"{name}_ks_low", 0],
                                                                  "filename_prefix": f"{tag}_{name}"}}
    return g


def test_wan22_high_low_ksampler_advanced_identical_with_swap_and_looper_models(server):
    def log_since(n):
        return server["log"].read_text()[n:]

    def streamed(text):  # the per-sampler-call summaries of the LooperModels experts (debug on)
        return [s for s in text.splitlines() if "6 units streamed" in s and "D2H" in s]

    tag = f"moe{uuid.uuid4().hex[:6]}"
    start = len(server["log"].read_text())
    _run(server, _moe_graph(tag, {"plain": "plain", "swap": ("swap", 5), "looper": ("looper", 6)}))
    log = log_since(start)
    prepared = [s for s in log.splitlines() if "blocks streamed (" in s and "looper: " not in s]
    assert sum("Block swap: 5 of 8" in s for s in prepared) == 2, prepared  # one wan22BlockSwap per expert
    assert sum("Block swap: 6 of 8" in s for s in prepared) == 2, prepared  # LooperModels: both experts
    assert len(streamed(log)) == 2 and all("D2H 0 B" in s for s in streamed(log)), streamed(log)
    plain = _latent(server, f"{tag}_plain")
    assert torch.isfinite(plain).all()
    for name in ("swap", "looper"):
        out = _latent(server, f"{tag}_{name}")
        assert torch.equal(out, plain), (name, (out - plain).abs().max().item())

    # Three more runs, models kept loaded (/free with unload_models and free_memory false), each with
    # a new noise seed so the samplers run again while the loaders and the LooperModels node come
    # from ComfyUI's cache: the prepared expert clones are reused across prompts.
    seen = [plain]
    for i, seed in enumerate((7, 8, 9)):
        _req(server["base"], "/free", {"unload_models": False, "free_memory": False})
        t = f"{tag}_r{i}"
        start = len(server["log"].read_text())
        entry = _run_entry(server, _moe_graph(t, {"plain": "plain", "looper": ("looper", 6)}, seed=seed))
        cached = _cached_nodes(entry)
        assert {"load_high", "load_low", "looper_prep"} <= cached, sorted(cached)
        assert "looper_ks_high" not in cached and "looper_ks_low" not in cached, sorted(cached)
        log = log_since(start)
        assert "blocks streamed (" not in log, log[-3000:]  # nothing prepared again
        assert len(streamed(log)) == 2, streamed(log)  # the cached clones streamed in both sampler calls
        ref = _latent(server, f"{t}_plain")
        out = _latent(server, f"{t}_looper")
        assert torch.equal(out, ref), (seed, (out - ref).abs().max().item())
        assert all(not torch.equal(ref, s) for s in seen), seed  # a new seed gives a new latent
        seen.append(ref)

    # The low expert matters: the same graph with the high expert as the low one differs.
    one = _moe_graph(tag + "_one", {"plain": "plain"})
    one["load_low"]["inputs"]["unet_name"] = MODEL
    _run(server, one)
    assert not torch.equal(_latent(server, f"{tag}_one_plain"), plain)


# --- WanVideoLooper (SquirrelRat/WanVideoLooper) --------------------------------------------------
# Needs the WanVideoLooper pack in COMFYUI_PATH/custom_nodes/WanVideoLooper (cloned or linked there before
# the server starts); skipped otherwise. Its only pip requirement, color-matcher, is optional (used for
# colour matching only, which these graphs leave disabled). The looper takes a CLIP, a VAE and a start
# image besides the two experts: the VAE is a real ComfyUI WAN 2.1 VAE (VAELoader) with tiny random
# weights (dim 8); the CLIP is a stand-in from the generated pack below (a umT5 text encoder is 5.7B
# parameters with a fixed config, and ComfyUI's WAN reads 4096-dim text features). The experts are tiny
# WAN 2.2 I2V-A14B-shaped models (in_dim 36: noise + the VAE-encoded start frames + mask, no CLIP-vision
# projector), so every loop starts from the last frame of the previous one, as in real use.
I2V_HIGH = "wan22bs_tiny_i2v_high.safetensors"
I2V_LOW = "wan22bs_tiny_i2v_low.safetensors"
TINY_VAE = "wan22bs_tiny_wan21_vae.safetensors"
FAKES_PACK = "wan22bs_test_fakes"
FAKES_SRC = '''"""Generated by wan22_blockswap's tests/test_comfyui_real.py on every run; do not edit.

Test-only nodes for running WanVideoLooper headless with tiny models:
  Wan22bsFakeUMT5Clip    -> CLIP: tokenize/encode_from_tokens/clone; the encoding of a text is
                            randn(1, tokens, text_dim) seeded by crc32(text) (a umT5 stand-in).
  Wan22bsSaveImageTensor -> output node: saves an IMAGE tensor exactly as <prefix>.images.safetensors.
  Wan22bsCallProbe       -> MODEL: a clone with ON_PRE_RUN / ON_CLEANUP / ON_LOAD callbacks that print
                            "[wan22bs-probe] <label> <event> patcher=<id>" (no effect on the numbers).
"""
import json
import os
import zlib

import torch

import folder_paths


class FakeUMT5Clip:
    def __init__(self, tokens, text_dim, scale):
        self.tokens, self.text_dim, self.scale = tokens, text_dim, scale

    def clone(self):
        return FakeUMT5Clip(self.tokens, self.text_dim, self.scale)

    def tokenize(self, text, return_word_ids=False, **kwargs):
        return {"text": text or ""}

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        g = torch.Generator().manual_seed(zlib.crc32(tokens["text"].encode("utf-8")))
        cond = torch.randn(1, self.tokens, self.text_dim, generator=g) * self.scale
        if return_dict:
            return {"cond": cond, "pooled_output": None}
        return (cond, None) if return_pooled else cond

    def encode_from_tokens_scheduled(self, tokens, **kwargs):
        return [[self.encode_from_tokens(tokens), {"pooled_output": None}]]


class Wan22bsFakeUMT5Clip:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"tokens": ("INT", {"default": 16, "min": 1, "max": 512}),
                             "text_dim": ("INT", {"default": 4096, "min": 1, "max": 8192}),
                             "scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0})}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "make"
    CATEGORY = "testing/wan22bs"

    def make(self, tokens, text_dim, scale):
        return (FakeUMT5Clip(tokens, text_dim, scale),)


class Wan22bsSaveImageTensor:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "images"})}}

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"
    CATEGORY = "testing/wan22bs"

    def save(self, images, filename_prefix):
        from safetensors.torch import save_file

        path = os.path.join(folder_paths.get_output_directory(), f"{filename_prefix}.images.safetensors")
        save_file({"images": images.detach().cpu().contiguous()}, path)
        return {"ui": {"text": [json.dumps({"path": path, "shape": list(images.shape)})]}}


class Wan22bsCallProbe:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "label": ("STRING", {"default": "probe"})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "probe"
    CATEGORY = "testing/wan22bs"

    def probe(self, model, label):
        from comfy.patcher_extension import CallbacksMP

        m = model.clone()

        def say(event, patcher):
            print(f"[wan22bs-probe] {label} {event} patcher={id(patcher):#x}", flush=True)

        m.add_callback_with_key(CallbacksMP.ON_PRE_RUN, "wan22bs_probe", lambda p: say("pre_run", p))
        m.add_callback_with_key(CallbacksMP.ON_CLEANUP, "wan22bs_probe", lambda p: say("cleanup", p))
        m.add_callback_with_key(CallbacksMP.ON_LOAD, "wan22bs_probe", lambda p, *a: say("load", p))
        return (m,)


NODE_CLASS_MAPPINGS = {"Wan22bsFakeUMT5Clip": Wan22bsFakeUMT5Clip, "Wan22bsSaveImageTensor": Wan22bsSaveImageTensor,
                       "Wan22bsCallProbe": Wan22bsCallProbe}
'''


def _tiny_wan21_vae_sd(dim=8, seed=11) -> dict:
    """A WAN 2.1 VAE state dict with ``dim`` base channels (ComfyUI's VAE reads dim from
    decoder.head.0.gamma), random weights scaled by fan-in so activations stay O(1)."""
    import comfy.ldm.wan.vae as wan_vae

    shapes = wan_vae.WanVAE(dim=dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                            temperal_downsample=[False, True, True], image_channels=3,
                            conv_out_channels=3).state_dict()
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in shapes.items():
        if k.endswith("gamma"):
            sd[k] = torch.ones(v.shape)
        elif k.endswith("bias"):
            sd[k] = torch.zeros(v.shape)
        else:
            sd[k] = torch.randn(v.shape, generator=g) * (v[0].numel() ** -0.5)
    return sd


def _write_looper_assets(comfy: Path) -> None:
    """The two tiny I2V experts, the tiny VAE and the generated test-node pack (custom_nodes/FAKES_PACK)."""
    from safetensors.torch import save_file

    from wan22_blockswap import tiny_wan

    models = comfy / "models" / "diffusion_models"
    cfg = tiny_wan.tiny_config("t2v", dim=128, num_heads=1, ffn_dim=256, num_layers=8, text_dim=4096, in_dim=36)
    for name, seed in ((I2V_HIGH, 6), (I2V_LOW, 7)):
        sd = tiny_wan.WanModel(cfg).init_weights(seed).state_dict()
        save_file({k: v.contiguous() for k, v in sd.items()}, str(models / name))
    vae_dir = comfy / "models" / "vae"
    vae_dir.mkdir(parents=True, exist_ok=True)
    if str(comfy) not in sys.path:  # comfy.ldm.wan.vae builds the key layout
        sys.path.append(str(comfy))
    save_file(_tiny_wan21_vae_sd(), str(vae_dir / TINY_VAE))
    pack = comfy / "custom_nodes" / FAKES_PACK
    if pack.is_symlink():
        pack.unlink()
    pack.mkdir(exist_ok=True)
    (pack / "__init__.py").write_text(FAKES_SRC)


@pytest.fixture(scope="module")
def wan_looper(server):
    comfy = Path(os.environ["COMFYUI_PATH"]).resolve()
    where = comfy / "custom_nodes" / "WanVideoLooper"
    if not where.exists():
        pytest.skip(f"WanVideoLooper (github.com/SquirrelRat/WanVideoLooper) is not installed at {where}")
    obj = _req(server["base"], "/object_info/WanVideoLooper")
    assert "WanVideoLooper" in obj, "WanVideoLooper's nodes are not registered: " + server["log"].read_text()[-3000:]
    assert TINY_VAE in _req(server["base"], "/object_info/VAELoader")["VAELoader"]["input"]["required"]["vae_name"][0]
    return obj["WanVideoLooper"]


LOOPER_PROMPTS = ("a red fox in the snow", "the fox starts running", "the fox lies down and sleeps")


def _looper_graph(tag, variants, seed=42, prompts=LOOPER_PROMPTS):
    """WanVideoLooper graphs sharing the two I2V expert loaders, the VAE, the CLIP stand-in, the start
    image and the prompt list; one looper per variant, its IMAGE saved as "<tag>_<variant>".
    ``variants``: name -> "plain" (experts through a call probe) | ("looper", n) (wan22BlockSwapLooperModels)
    | "seq" (WanVideoLoraSequencer: segment 1 plain experts, segment 2 with the tiny LoRA, the rest the
    base experts) | ("seq_swap", n) (the same sequence through wan22BlockSwapSequencer) | ("seq_legacy", n)
    (the same sequence through the loop-aware WAN22BlockSwapLooper)."""
    g = {"load_high": {"class_type": "UNETLoader", "inputs": {"unet_name": I2V_HIGH, "weight_dtype": "default"}},
         "load_low": {"class_type": "UNETLoader", "inputs": {"unet_name": I2V_LOW, "weight_dtype": "default"}},
         "clip": {"class_type": "Wan22bsFakeUMT5Clip", "inputs": {"tokens": 16, "text_dim": 4096, "scale": 1.0}},
         "vae": {"class_type": "VAELoader", "inputs": {"vae_name": TINY_VAE}},
         "img": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0x9040C0}},
         "prompts": {"class_type": "WanVideoLooperPrompts", "inputs": {
             "prompts": "\n".join(prompts), "negative_prompt": "blurry, static", "enable_prefix_suffix": False,
             "prefix": "", "suffix": ""}}}
    high, low = ["load_high", 0], ["load_low", 0]
    if any(v == "seq" or v[0] in ("seq_swap", "seq_legacy") for v in variants.values()):
        lora = {"lora_name": LORA, "strength_model": 0.8}
        g["lora_high"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": high, **lora}}
        g["lora_low"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": low, **lora}}
        g["sequence"] = {"class_type": "WanVideoLoraSequencer", "inputs": {
            "model_high_1": high, "model_low_1": low, "model_high_2": ["lora_high", 0], "model_low_2": ["lora_low", 0]}}
    for name, how in variants.items():
        extra = {}
        h, lo = high, low
        if how == "plain":
            g[f"{name}_probe_high"] = {"class_type": "Wan22bsCallProbe", "inputs": {"model": high, "label": f"{tag}_{name}_high"}}
            g[f"{name}_probe_low"] = {"class_type": "Wan22bsCallProbe", "inputs": {"model": low, "label": f"{tag}_{name}_low"}}
            h, lo = [f"{name}_probe_high", 0], [f"{name}_probe_low", 0]
        elif how == "seq":
            extra = {"model_clip_sequence": ["sequence", 0]}
        elif how[0] == "looper":
            cls, inputs = _looper_models(how[1], debug=True)
            g[f"{name}_prep"] = {"class_type": cls, "inputs": {"model_high": high, "model_low": low, **inputs}}
            h, lo = [f"{name}_prep", 0], [f"{name}_prep", 1]
        elif how[0] == "seq_swap":
            cls, inputs = _looper_models(how[1], debug=True)
            g[f"{name}_prep"] = {"class_type": "wan22BlockSwapSequencer", "inputs": {
                "model_clip_sequence": ["sequence", 0], **inputs}}
            extra = {"model_clip_sequence": [f"{name}_prep", 0]}
        elif how[0] == "seq_legacy":
            cls, inputs = _looper_models(how[1], debug=True)
            g[f"{name}_prep"] = {"class_type": "WAN22BlockSwapLooper", "inputs": {
                "models_list": ["sequence", 0], **inputs}}
            extra = {"model_clip_sequence": [f"{name}_prep", 0]}
        else:
            raise ValueError(how)
        g[f"{name}_looper"] = {"class_type": "WanVideoLooper", "inputs": {
            "model_high": h, "model_low": lo, "clip": ["clip", 0], "vae": ["vae", 0], "start_image": ["img", 0],
            "positive_prompts": ["prompts", 0], "negative_prompt": ["prompts", 1], "seed": seed, "steps": 6,
            "cfg_motion_noise": 4.0, "cfg_noise": 3.0, "sampler_name": "euler", "scheduler": "simple",
            "model_switch_point": 0.9, "sigma_shift": 8.0, "denoise": 1.0, "width": 64, "height": 64,
            "frame_merge": 1, "duration_sec": 1, "color_match_method": "Disabled",
            "color_match_reference_frame": "First Frame", "color_match_strength": 1.0, "enable_dry_run": False,
            **extra}}
        g[f"{name}_save"] = {"class_type": "Wan22bsSaveImageTensor", "inputs": {
            "images": [f"{name}_looper", 0], "filename_prefix": f"{tag}_{name}"}}
    return g


def _images(server, prefix):
    from safetensors.torch import load_file

    return load_file(str(server["out"] / f"{prefix}.images.safetensors"))["images"]


def test_wan_video_looper_identical_with_looper_models_and_sequencer(server, wan_looper):
    import re

    tag = f"wvl{uuid.uuid4().hex[:6]}"
    start = len(server["log"].read_text())
    t0 = time.time()
    _run(server, _looper_graph(tag, {"plain": "plain", "looper": ("looper", 6), "seq": "seq",
                                     "seq_swap": ("seq_swap", 5), "seq_legacy": ("seq_legacy", 4)}))
    elapsed = time.time() - t0
    log = server["log"].read_text()[start:]
    loops = len(LOOPER_PROMPTS)
    frames = 17 + (loops - 1) * 16  # duration_sec 1 = 17 frames per loop, frame_merge 1 dropped after the first
    plain = _images(server, f"{tag}_plain")
    assert plain.shape == (frames, 64, 64, 3) and torch.isfinite(plain).all(), plain.shape
    assert plain.std() > 0.05  # not a flat image: the comparison below sees the pixels
    looper = _images(server, f"{tag}_looper")
    assert torch.equal(looper, plain), (looper - plain).abs().max().item()
    seq = _images(server, f"{tag}_seq")
    for name in ("seq_swap", "seq_legacy"):
        out = _images(server, f"{tag}_{name}")
        assert torch.equal(out, seq), (name, (out - seq).abs().max().item())
    # segment 1 of the sequence is the plain experts, segment 2 carries the LoRA
    assert torch.equal(seq[:17], plain[:17])
    assert not torch.equal(seq[17:33], plain[17:33])

    # The looper's call pattern, seen by the probe on the plain experts: per loop two high-noise
    # sampler calls (step 0 with cfg_motion_noise, then up to the switch step) and one low-noise
    # call, always on the same two patchers (it clones each expert once, before the first loop).
    probe = re.findall(rf"\[wan22bs-probe\] {tag}_plain_(high|low) (pre_run|cleanup|load) patcher=(0x[0-9a-f]+)", log)
    pre = [(e, p) for e, ev, p in probe if ev == "pre_run"]
    assert [e for e, _ in pre] == ["high", "high", "low"] * loops, probe
    assert len({p for e, p in pre if e == "high"}) == 1 and len({p for e, p in pre if e == "low"}) == 1, pre
    assert sum(ev == "cleanup" for _, ev, _ in probe) == 3 * loops, probe
    # every sampler call of the swapped variants ends with one block-swap summary (ON_CLEANUP): all
    # loops of the LooperModels variant (6 blocks), and segments 1-2 of the sequence variant (5
    # blocks; segment 3 is empty in the sequence, so the looper uses its unswapped base experts)
    summaries = [s for s in log.splitlines() if "units streamed" in s and "D2H" in s]
    assert sum("6 units streamed" in s for s in summaries) == 3 * loops, summaries
    assert sum("5 units streamed" in s for s in summaries) == 3 * 2, summaries
    assert sum("4 units streamed" in s for s in summaries) == 3 * 2, summaries
    assert all("D2H 0 B" in s for s in summaries), summaries
    loads = [line.split("Requested to load ")[1].strip() for line in log.splitlines() if "Requested to load" in line]
    print(f"\n[looper] 5 looper runs x {loops} loops in {elapsed:.1f} s; plain experts: "
          f"{sum(ev == 'pre_run' for _, ev, _ in probe)} sampler calls on 2 patchers, "
          f"{sum(ev == 'load' for _, ev, _ in probe)} ON_LOAD; 'Requested to load' in the prompt: {loads}")


# --- ComfyUI's quantized checkpoints (fp8_scaled) through Load Diffusion Model ------------------------
def test_fp8_scaled_unetloader_graph_identical_with_swap_and_lora(server):
    """The official repackaged form (fp8 block matrices + .scale_weight + a scaled_fp8 marker) through
    UNETLoader, as most users run WAN: the swap node streams its QuantizedTensor weights."""
    from test_comfyui_quantized import write_form

    comfy = Path(os.environ["COMFYUI_PATH"]).resolve()
    name = "wan22bs_tiny_t2v_fp8_scaled.safetensors"
    write_form(comfy / "models" / "diffusion_models" / name, "scaled_fp8", seed=3)
    loader = {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}}
    tag = f"fp8s{uuid.uuid4().hex[:6]}"
    _run(server, _graph(tag, {"plain": [], "swap3": [_swap(3)], "swap8": [_swap(8)], "lora": [LORA_NODE],
                              "lora_swap": [LORA_NODE, _swap(5)], "swap_lora": [_swap(5), LORA_NODE]},
                        loader=loader))
    plain = _latent(server, f"{tag}_plain")
    fp16 = _latent(server, f"{tag}_plain")
    for branch in ("swap3", "swap8"):
        assert torch.equal(_latent(server, f"{tag}_{branch}"), plain), branch
    lora = _latent(server, f"{tag}_lora")
    assert not torch.equal(lora, plain)
    for branch in ("lora_swap", "swap_lora"):
        assert torch.equal(_latent(server, f"{tag}_{branch}"), lora), branch
    del fp16


# --- A forward that bypasses the DIFFUSION_MODEL wrapper: CausalWan under SamplerARVideo ----------------
def test_causal_wan_ar_sampler_identical_and_counts_its_forwards(server):
    """ComfyUI's CausalWanModel (a WAN 2.1 file whose metadata says causal_ar) sampled by SamplerARVideo
    calls its blocks from forward_block, past the wrapper: the engine finds each forward itself."""
    from safetensors.torch import load_file, save_file

    comfy = Path(os.environ["COMFYUI_PATH"]).resolve()
    models = comfy / "models" / "diffusion_models"
    name = "wan22bs_tiny_causal_t2v.safetensors"
    save_file(load_file(str(models / MODEL)), str(models / name),
              metadata={"config": json.dumps({"transformer": {"causal_ar": True}})})
    tag = f"causal{uuid.uuid4().hex[:6]}"
    g = {"load": {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}},
         "pos": {"class_type": "TinyWanTextEmbeds", "inputs": {"seed": 1, "tokens": 16, "text_dim": 4096, "scale": 1.0}},
         "neg": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["pos", 0]}},
         "lat": {"class_type": "EmptyARVideoLatent", "inputs": {"width": 64, "height": 64, "length": 9, "batch_size": 1}},
         "sampler": {"class_type": "SamplerARVideo", "inputs": {"num_frame_per_block": 1}}}
    for branch, chain in (("plain", []), ("swap", [_swap(4, debug=True)])):
        src = ["load", 0]
        for i, (cls, inputs) in enumerate(chain):
            g[f"{branch}_{i}"] = {"class_type": cls, "inputs": {"model": src, **inputs}}
            src = [f"{branch}_{i}", 0]
        g[f"{branch}_sig"] = {"class_type": "BasicScheduler", "inputs": {"model": src, "scheduler": "simple",
                                                                       "steps": 3, "denoise": 1.0}}
        g[f"{branch}_ks"] = {"class_type": "SamplerCustom", "inputs": {
            # cfg 1: the AR sampler's KV cache holds one batch (distilled causal models run without CFG)
            "model": src, "add_noise": True, "noise_seed": 42, "cfg": 1.0, "positive": ["pos", 0],
            "negative": ["neg", 0], "sampler": ["sampler", 0], "sigmas": [f"{branch}_sig", 0],
            "latent_image": ["lat", 0]}}
        g[f"{branch}_save"] = {"class_type": "SaveLatent", "inputs": {"samples": [f"{branch}_ks", 0],
                                                                     "filename_prefix": f"{tag}_{branch}"}}
    _run(server, g)
    assert torch.equal(_latent(server, f"{tag}_swap"), _latent(server, f"{tag}_plain"))
    traces = sorted((server["out"] / "wan22_blockswap_traces").glob("*_nodeswap_0.json"))
    assert traces, "the debug trace of the swap branch was not written"
    trace = json.loads(traces[-1].read_text())
    s, units = trace["summary"], {d["unit"]: d["copies"] for d in trace["units"]}
    # 3 latent frames, one per AR block: 3 denoising steps + 1 KV-cache update each, 12 forwards (0 when
    # only the wrapper counted them)
    assert s["forwards"] == 12, s
    first, *rest = trace["plan"]["units"]
    # every streamed block is copied once per forward; the first once more, preloaded for a next one
    assert all(units[u] == s["forwards"] for u in rest) and units[first] == s["forwards"] + 1, (units, s)
    assert s["stalls"] == 1, s  # only the very first copy is waited for: the preload spans forwards
