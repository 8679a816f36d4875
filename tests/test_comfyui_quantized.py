"""ComfyUI's quantized checkpoints (fp8_scaled and every QuantizedTensor layout) through UNETLoader's own
loading function, streamed by the swap node: the same latents as without swap, LoRA included.

Real-ComfyUI tier only (COMFYUI_PATH): the QuantizedTensor weights, their file forms and the
mixed-precision layers are ComfyUI's. The files are tiny WAN t2v models written here in the three forms
users have: the old ``scaled_fp8`` + ``.scale_weight`` form of the official repackaged checkpoints, the
``_quantization_metadata`` header form, and inline ``.comfy_quant`` keys (one layer per layout).
"""
import gc
import json
import os
import re

import pytest
import torch

pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="set COMFYUI_PATH to a ComfyUI checkout")]

if os.environ.get("COMFYUI_PATH"):
    import comfy.model_management as mm
    import comfy.sd
    from comfy.quant_ops import QUANT_ALGOS, QuantizedTensor

from wan22_blockswap import tiny_wan
from wan22_blockswap.block_manager import packed_bytes
from wan22_blockswap.budget import auto_blocks_for
from wan22_blockswap.callbacks import _ENGINES, StreamedUnit
from wan22_blockswap.config import tensor_bytes
from test_node import sample, swap

_MATRIX = re.compile(r"^blocks\.\d+\.(self_attn|cross_attn)\.[qkvo]\.weight$|^blocks\.\d+\.ffn\.[02]\.weight$")
FORMS = ("scaled_fp8", "scaled_fp8_full_precision_mm", "quantization_metadata", "comfy_quant")


def _tiny_sd(seed=0):
    cfg = tiny_wan.tiny_config("t2v", dim=128, num_heads=1, ffn_dim=256, num_layers=8, text_dim=4096)
    return {k: v.half().contiguous() for k, v in tiny_wan.WanModel(cfg).init_weights(seed).state_dict().items()}


def _layers(sd):
    return sorted(k[:-len(".weight")] for k in sd if _MATRIX.match(k))


def _quantize(sd, layer, fmt):
    """ComfyUI's own serialization of ``layer`` quantized as ``fmt`` (what its savers write)."""
    w = sd.pop(f"{layer}.weight").float()
    qt = QuantizedTensor.from_float(w, QUANT_ALGOS[fmt]["comfy_tensor_layout"])
    for k, v in qt.state_dict(f"{layer}.weight").items():
        sd[k] = v.view(torch.uint8) if v.dtype == torch.float8_e8m0fnu else v.contiguous()


def _comfy_quant(conf):
    return torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)


def write_form(path, form, seed=0):
    """A tiny WAN t2v file in ``form``. Returns the layer -> format map of its quantized layers."""
    from safetensors.torch import save_file

    sd = _tiny_sd(seed)
    layers = _layers(sd)
    metadata, formats = None, {}
    if form.startswith("scaled_fp8"):  # the official repackaged files: every block matrix fp8 + scale
        for layer in layers:
            w = sd[f"{layer}.weight"].float()
            scale = w.abs().max() / torch.finfo(torch.float8_e4m3fn).max
            sd[f"{layer}.weight"] = (w / scale).to(torch.float8_e4m3fn)
            sd[f"{layer}.scale_weight"] = scale.reshape(1)  # one element, as in the official files
            formats[layer] = "float8_e4m3fn"
        # two elements in the marker: "full_precision_matrix_mult" (dequantize, multiply in full precision)
        sd["scaled_fp8"] = torch.zeros(2 if form.endswith("_mm") else 0, dtype=torch.float8_e4m3fn)
    elif form == "quantization_metadata":  # the header form; every third matrix left unquantized
        for i, layer in enumerate(layers):
            if i % 3 != 2:
                formats[layer] = ("float8_e4m3fn", "float8_e5m2")[i % 3]
                _quantize(sd, layer, formats[layer])
        metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": {
            layer: {"format": fmt} for layer, fmt in formats.items()}})}
    elif form == "comfy_quant":  # inline keys, one layout after the other, some matrices left plain
        cycle = [f for f in ("float8_e4m3fn", "float8_e5m2", "nvfp4", "mxfp8", "int8_tensorwise", "convrot_w4a4")
                 if f in QUANT_ALGOS]
        for i, layer in enumerate(layers):
            fmt = cycle[i % (len(cycle) + 1)] if i % (len(cycle) + 1) < len(cycle) else None
            if fmt == "convrot_w4a4" and sd[f"{layer}.weight"].shape[1] % 256:
                fmt = "int8_tensorwise"  # ConvRot needs 256-wide input groups (only ffn.2 has them)
            if fmt is None:
                continue
            formats[layer] = fmt
            _quantize(sd, layer, fmt)
            conf = {"format": fmt}
            if i == 0:
                conf["full_precision_matrix_mult"] = True
            sd[f"{layer}.comfy_quant"] = _comfy_quant(conf)
        convrot = [layer for layer in layers if layer.endswith("ffn.2")][0]
        if "convrot_w4a4" in QUANT_ALGOS and formats.get(convrot) != "convrot_w4a4":
            formats[convrot] = "convrot_w4a4"  # make sure the one layout with a width rule is present
            sd.pop(f"{convrot}.weight_scale", None)
            sd[f"{convrot}.weight"] = _tiny_sd(seed)[f"{convrot}.weight"]
            _quantize(sd, convrot, "convrot_w4a4")
            sd[f"{convrot}.comfy_quant"] = _comfy_quant({"format": "convrot_w4a4"})
    else:
        raise ValueError(form)
    save_file(sd, str(path), metadata=metadata)
    return formats


def _lora(seed=5):
    """A LoRA on quantized matrices of streamed blocks (7, 6) and of a resident one (1)."""
    g = torch.Generator().manual_seed(seed)
    sd = _tiny_sd()
    lora = {}
    for key in ("blocks.7.ffn.0", "blocks.6.self_attn.q", "blocks.7.cross_attn.o", "blocks.1.cross_attn.k"):
        out_f, in_f = sd[f"{key}.weight"].shape
        lora[f"diffusion_model.{key}.lora_up.weight"] = torch.randn(out_f, 4, generator=g) * 0.1
        lora[f"diffusion_model.{key}.lora_down.weight"] = torch.randn(4, in_f, generator=g) * 0.1
        lora[f"diffusion_model.{key}.alpha"] = torch.tensor(4.0)
    return lora


def _with_lora(model, strength=0.8):
    return comfy.sd.load_lora_for_models(model, None, _lora(), strength, 0)[0]


@pytest.fixture(autouse=True)
def _unload_between_tests():
    yield
    mm.unload_all_models()
    gc.collect()


@pytest.mark.parametrize("form", FORMS)
def test_every_file_form_streams_bit_identically_with_and_without_lora(tmp_path, form):
    path = tmp_path / f"tiny_{form}.safetensors"
    formats = write_form(path, form)
    model = comfy.sd.load_diffusion_model(str(path))  # UNETLoader's loading function
    dm = model.model.diffusion_model
    found = {name[:-len(".weight")]: p._layout_cls for name, p in dm.named_parameters()
             if isinstance(p, QuantizedTensor)}
    assert set(found) == set(formats)  # every quantized layer became a QuantizedTensor
    assert {QUANT_ALGOS[f]["comfy_tensor_layout"] for f in formats.values()} == set(found.values())
    reference = sample(model)
    for n in (3, 8):
        out = sample(swap(model, n))
        assert torch.equal(out, reference), f"{form} N={n}: {(out - reference).abs().max()}"
    lora_ref = sample(_with_lora(model))
    assert not torch.equal(lora_ref, reference)
    for out in (sample(_with_lora(swap(model, 5))), sample(swap(_with_lora(model), 5))):
        assert torch.equal(out, lora_ref), f"{form} LoRA: {(out - lora_ref).abs().max()}"
    assert torch.equal(sample(swap(model, 8)), reference)  # the LoRA left no trace in the host masters


def test_stored_bytes_of_quantized_blocks_are_the_files(tmp_path):
    """Planning, vram_budget, the RAM check and the readout count what the file stores, not the logical
    dtype the QuantizedTensor reports."""
    from safetensors import safe_open

    path = tmp_path / "tiny_comfy_quant.safetensors"
    formats = write_form(path, "comfy_quant")
    with safe_open(str(path), "pt") as f:
        file_bytes = {k: f.get_tensor(k).nbytes for k in f.keys()}
    model = comfy.sd.load_diffusion_model(str(path))
    swapped = swap(model, 8)
    sample(swapped)
    engine = _ENGINES[swapped.model.diffusion_model]
    blocks = [v.swapped_module for k, v in swapped.object_patches.items() if isinstance(v, StreamedUnit)]
    checked = 0
    for i, block in enumerate(blocks):
        for name, p in block.named_parameters():
            layer = f"blocks.{i}.{name[:-len('.weight')]}"
            if layer in formats:
                keys = [f"{layer}.weight", f"{layer}.weight_scale", f"{layer}.weight_scale_2"]
                assert tensor_bytes(p) == sum(file_bytes.get(k, 0) for k in keys), layer
                assert tensor_bytes(p) < p.numel() * p.element_size()
                checked += 1
    assert checked == len(formats)
    assert engine.tracker.host_bytes == sum(packed_bytes(b) for b in blocks)
    assert engine.tracker.slot_bytes == max(packed_bytes(b) for b in blocks)
    dm = model.model.diffusion_model
    plan = auto_blocks_for(dm, "16 GB / 480p", None)  # a tiny model fits: everything resident
    other = sum(tensor_bytes(p) for n, p in dm.named_parameters() if not n.startswith("blocks."))
    assert plan.blocks_to_swap == 0 and plan.resident_bytes == other + sum(packed_bytes(b) for b in blocks)


@pytest.mark.parametrize("form", FORMS)
def test_the_pack_loaders_read_every_form_as_unetloader_does(tmp_path, monkeypatch, form):
    import folder_paths

    from wan22_blockswap.nodes import WAN22BlockSwapLoader, WANModelLoader

    exts = folder_paths.folder_names_and_paths["diffusion_models"][1]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusion_models", ([str(tmp_path)], exts))
    name = f"tiny_{form}.safetensors"
    formats = write_form(tmp_path / name, form)
    reference = sample(comfy.sd.load_diffusion_model(str(tmp_path / name)))
    mm.unload_all_models()
    args = dict(wan_version="auto", model_variant="auto", fp8_optimization="disabled", weight_dtype="auto")
    (model,) = WANModelLoader().load("safetensors", name, "none", **args)
    assert not model.is_dynamic()  # a classic patcher: block swap works on it with Dynamic VRAM on
    layouts = {p._layout_cls for p in model.model.diffusion_model.parameters() if isinstance(p, QuantizedTensor)}
    assert layouts == {QUANT_ALGOS[f]["comfy_tensor_layout"] for f in formats.values()}
    assert torch.equal(sample(model), reference)
    assert torch.equal(sample(swap(model, 5)), reference)
    (swapped,) = WAN22BlockSwapLoader().load(
        "safetensors", name, "none", **args, blocks_to_swap=5, offload_txt_emb=False, offload_img_emb=False,
        use_non_blocking=True, vace_blocks_to_swap=0, prefetch_blocks=1, block_swap_debug=False, unique_id="3")
    engine = _ENGINES[swapped.model.diffusion_model]
    assert engine.plan.block_indices == (3, 4, 5, 6, 7) and engine.tracker.host_bytes > 0  # packed at load
    assert torch.equal(sample(swapped), reference)
    with pytest.raises(ValueError, match="already quantized"):
        WANModelLoader().load("safetensors", name, "none", **dict(args, fp8_optimization="e4m3fn"))
