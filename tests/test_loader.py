"""The pack's loaders (model_loader.py, quant_ops.py, weight_files.py) inside ComfyUI.

Runs against the stand-in in tests/comfy_stub by default and against a real ComfyUI checkout when
COMFYUI_PATH is set (see conftest.py): the same assertions hold in both. Files are tiny WAN models
written on the spot (safetensors with the safetensors package, GGUF with gguf-py).
"""
import math

import pytest
import torch

import comfy.model_management as mm
import comfy.sd

from wan22_blockswap import tiny_wan
from wan22_blockswap.callbacks import _ENGINES
from wan22_blockswap.config import BlockSwapError, identify_wan
from wan22_blockswap.formats.gguf_reader import GGUFTensor, load_gguf_state_dict, write_tiny_gguf
from wan22_blockswap.model_loader import fp8_quantize, load_wan_model

from test_node import sample, swap, with_lora

safetensors_torch = pytest.importorskip("safetensors.torch")


def tiny_sd(variant="t2v", seed=0, layers=8, **overrides):
    cfg = tiny_wan.tiny_config(variant, **{"dim": 128, "num_heads": 1, "ffn_dim": 256, "num_layers": layers,
                                           "text_dim": 4096, **overrides})
    return tiny_wan.WanModel(cfg).init_weights(seed).state_dict()


def write_st(tmp_path, sd, name="m.safetensors"):
    path = tmp_path / name
    safetensors_torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return str(path)


def reference(sd):
    """ComfyUI's own loader (UNETLoader's path) on the same tensors."""
    return comfy.sd.load_diffusion_model_state_dict(dict(sd))


def forward(patcher, seed=0, frames=2):
    dm = patcher.model.diffusion_model
    g = torch.Generator().manual_seed(seed)
    in_ch = dm.patch_embedding.weight.shape[1]
    x = torch.randn(1, in_ch, frames, 8, 8, generator=g)
    ctx = torch.randn(1, 8, 4096, generator=g)
    with torch.no_grad():
        return dm(x, torch.tensor([500.0]), ctx)


pytestmark = pytest.mark.usefixtures("unload_models_after")  # conftest.py


# ---------------------------------------------------------------------------------------------
# safetensors

@pytest.mark.parametrize("variant", ["t2v", "i2v", "vace", "ti2v22"])
def test_safetensors_same_model_as_comfyui_loader(tmp_path, variant):
    sd = tiny_sd(variant)
    patcher, info, text = load_wan_model(write_st(tmp_path, sd))
    ref = reference(sd)
    if variant != "vace":  # ComfyUI's VACE forward needs VACE inputs: sample() gives them
        assert torch.equal(forward(patcher), forward(ref))
    assert sample(patcher).equal(sample(ref))
    ours = patcher.model.diffusion_model.state_dict()
    theirs = ref.model.diffusion_model.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(ours[k].dtype == theirs[k].dtype for k in ours)
    assert info.num_blocks == 8 and info.dim == 128
    assert "8 blocks" in text and "m.safetensors" in text


def test_identification_by_shapes(tmp_path):
    cases = {"t2v": ("t2v", "2.1/2.2"), "i2v": ("i2v", "2.1"), "vace": ("vace", "2.1/2.2"),
             "ti2v22": ("t2v", "2.2")}
    for variant, (want_variant, want_version) in cases.items():
        _, info, _ = load_wan_model(write_st(tmp_path, tiny_sd(variant), f"{variant}.safetensors"))
        assert (info.variant, info.version) == (want_variant, want_version), variant
    # WAN 2.2 A14B i2v: 36 input channels and no CLIP image embedding
    _, info, _ = load_wan_model(write_st(tmp_path, tiny_sd("t2v", in_dim=36), "i2v22.safetensors"))
    assert (info.variant, info.version) == ("i2v", "2.2")
    _, info, _ = load_wan_model(write_st(tmp_path, tiny_sd("vace"), "vace.safetensors"))
    assert info.num_vace_blocks == 2


def test_explicit_choice_that_contradicts_the_file_is_an_error(tmp_path):
    path = write_st(tmp_path, tiny_sd("ti2v22"))
    with pytest.raises(BlockSwapError, match=r"wan_version is set to 2\.1.*m\.safetensors|m\.safetensors.*wan_version is set to 2\.1"):
        load_wan_model(path, wan_version="2.1")
    with pytest.raises(BlockSwapError, match="model_variant is set to vace"):
        load_wan_model(path, model_variant="vace")
    load_wan_model(path, wan_version="2.2", model_variant="i2v")  # TI2V: both t2v and i2v are right
    t2v = write_st(tmp_path, tiny_sd("t2v"), "t2v.safetensors")
    for version in ("2.1", "2.2"):  # a 14B-style t2v file is either
        load_wan_model(t2v, wan_version=version, model_variant="t2v")


def test_weight_dtype_choice(tmp_path):
    patcher, _, text = load_wan_model(write_st(tmp_path, tiny_sd()), weight_dtype="bf16")
    dm = patcher.model.diffusion_model
    assert dm.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    assert dm.patch_embedding.weight.dtype == torch.float32  # ComfyUI keeps it fp32
    assert "bfloat16" in text


# ---------------------------------------------------------------------------------------------
# fp8

@pytest.mark.parametrize("fmt,bound", [(torch.float8_e4m3fn, 2 ** -4), (torch.float8_e5m2, 2 ** -3)])
def test_fp8_quantize_error_bound(fmt, bound):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 128, generator=g) * 0.02
    q, scale = fp8_quantize(w, fmt)
    assert q.dtype == fmt and scale.dtype == torch.float32
    assert math.log2(float(scale)).is_integer()  # a power of two: dequantizing is exact
    back = q.float() * scale
    # fp8 rounding: relative error <= 2^-(mantissa bits + 1) for normal values, plus the subnormal step
    tiny = float(scale) * torch.finfo(fmt).smallest_normal
    assert ((back - w).abs() <= bound * w.abs() + tiny).all()
    assert float(back.abs().max()) == pytest.approx(float(w.abs().max()), rel=bound)


@pytest.mark.parametrize("choice", ["e4m3fn", "e5m2"])
def test_fp8_option_only_block_matrices(tmp_path, choice):
    sd = tiny_sd()
    path = write_st(tmp_path, sd)
    plain, _, _ = load_wan_model(path)
    fp8, _, text = load_wan_model(path, fp8_optimization=choice)
    fmt = {"e4m3fn": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}[choice]
    a, b = plain.model.diffusion_model.state_dict(), fp8.model.diffusion_model.state_dict()
    quantized = [k for k in a if k.startswith("blocks.") and k.endswith(".weight") and a[k].ndim == 2]
    assert len(quantized) == 8 * 10  # q k v o, cross q k v o, ffn.0, ffn.2 per block
    for k in a:
        if k in quantized:
            assert b[k].dtype == fmt and k[:-6] + "scale_weight" in b
        else:
            assert torch.equal(a[k], b[k]), k  # norms, biases, modulation, embeddings, head unchanged
    # the numerical effect on the whole model: measured here 0.3-1 % (e4m3fn) / 1-3 % (e5m2)
    out_a, out_b = forward(plain), forward(fp8)
    rel = float((out_a - out_b).norm() / out_a.norm())
    assert 0 < rel < {"e4m3fn": 0.03, "e5m2": 0.08}[choice]
    fp8_bytes = sum(b[k].numel() * b[k].element_size() for k in quantized)
    assert fp8_bytes * 4 == sum(a[k].numel() * a[k].element_size() for k in quantized)  # fp32 -> fp8


def test_fp8_swap_and_lora_identical_to_resident(tmp_path):
    path = write_st(tmp_path, tiny_sd())
    model, _, _ = load_wan_model(path, fp8_optimization="e4m3fn")
    ref = sample(with_lora(model))
    for n in (3, 8):
        assert sample(with_lora(swap(model, n))).equal(ref)
        assert set(_ENGINES[model.model.diffusion_model].tracker.unit_copies) == {f"blocks.{i}" for i in range(8 - n, 8)}
    assert not sample(model).equal(ref)  # the LoRA changed something


# ---------------------------------------------------------------------------------------------
# GGUF

def write_gguf(tmp_path, sd, quant="Q8_0", name="m.gguf"):
    return write_tiny_gguf(str(tmp_path / name), sd, quant=quant)


def dequantized_reference(path):
    sd, _ = load_gguf_state_dict(path)
    return reference({k: v.dequantize(torch.float32) if isinstance(v, GGUFTensor) else v.float()
                      for k, v in sd.items()})


@pytest.mark.parametrize("quant,variant,dim,layers", [("Q8_0", "t2v", 128, 8), ("Q4_0", "t2v", 128, 8),
                                                      ("Q4_K_M", "i2v", 256, 4)])
def test_gguf_equals_its_dequantized_weights(tmp_path, quant, variant, dim, layers):
    """A WAN GGUF laid out as the files in circulation (write_tiny_gguf: block matrices quantized, the
    K-quant mix with Q6_K, other matrices BF16, the 5-D patch embedding F32): the same model as
    ComfyUI's own loader builds from its dequantized weights."""
    sd = tiny_sd(variant, layers=layers, dim=dim, num_heads=dim // 128, ffn_dim=2 * dim)
    path = write_gguf(tmp_path, sd, quant)
    patcher, info, text = load_wan_model(path, model_type="gguf")
    q = patcher.model.diffusion_model.blocks[0].self_attn.q.weight
    stored = quant.removesuffix("_M")
    assert isinstance(q, GGUFTensor) and q.tensor_type == stored  # kept quantized in memory
    assert patcher.model.diffusion_model.patch_embedding.weight.dim() == 5
    ref = dequantized_reference(path)
    assert torch.equal(forward(patcher), forward(ref))
    assert sample(patcher).equal(sample(ref))
    assert stored in text and info.num_blocks == layers


def test_gguf_lora_and_swap(tmp_path):
    path = write_gguf(tmp_path, tiny_sd())
    model, _, _ = load_wan_model(path)
    ref_model = dequantized_reference(path)
    lora_ref = sample(with_lora(ref_model))
    out = sample(with_lora(model))
    assert torch.allclose(out, lora_ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(sample(model), lora_ref, atol=1e-3)
    plain = sample(model)
    for n in (3, 8):
        assert sample(swap(model, n)).equal(plain)
        assert sample(with_lora(swap(model, n))).equal(out)
        assert set(_ENGINES[model.model.diffusion_model].tracker.unit_copies) == {f"blocks.{i}" for i in range(8 - n, 8)}
    # the patches are taken off again: the plain model is unchanged afterwards
    assert sample(model).equal(plain)


# ---------------------------------------------------------------------------------------------
# bad input: an error naming the file; nothing registered with ComfyUI

def _loaded():
    return len(mm.current_loaded_models)


def test_bad_files(tmp_path):
    sd = tiny_sd()
    good = write_st(tmp_path, sd)
    data = open(good, "rb").read()
    cases = {}
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    cases["trunc.safetensors"] = "truncated"
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    cases["junk.safetensors"] = "not a safetensors file|corrupt"
    (tmp_path / "empty.safetensors").write_bytes(b"")
    cases["empty.safetensors"] = "not a model file"
    write_st(tmp_path, {"encoder.layer.0.weight": torch.zeros(4, 4)}, "other.safetensors")
    cases["other.safetensors"] = "not a WAN 2.1/2.2 diffusion model"
    write_st(tmp_path, {k: v for k, v in sd.items() if k != "blocks.3.ffn.2.bias"}, "missing.safetensors")
    cases["missing.safetensors"] = r"1 missing \(blocks\.3\.ffn\.2\.bias\)"
    write_st(tmp_path, {**sd, "blocks.0.extra.weight": torch.zeros(2)}, "extra.safetensors")
    cases["extra.safetensors"] = r"1 unexpected \(blocks\.0\.extra\.weight\)"
    write_st(tmp_path, {**sd, "blocks.0.self_attn.q.weight": torch.zeros(64, 128)}, "shape.safetensors")
    cases["shape.safetensors"] = "does not fit|size mismatch"
    gguf = write_gguf(tmp_path, sd)
    (tmp_path / "trunc.gguf").write_bytes(open(gguf, "rb").read()[:-1000])
    cases["trunc.gguf"] = "truncated|corrupt"
    before = _loaded()
    for name, message in cases.items():
        with pytest.raises(BlockSwapError, match=message) as err:
            load_wan_model(str(tmp_path / name))
        assert name in str(err.value)
        assert _loaded() == before
    with pytest.raises(BlockSwapError, match="gguf file but model_type is safetensors"):
        load_wan_model(gguf, model_type="safetensors")
    with pytest.raises(BlockSwapError, match="not found"):
        load_wan_model(str(tmp_path / "nope.safetensors"))


# ---------------------------------------------------------------------------------------------
# the nodes

def test_identify_wan_pure():
    base = dict(dim=5120, num_layers=40, in_dim=16, out_dim=16, model_type="t2v")
    assert identify_wan(base, False).version == "2.1/2.2"
    assert identify_wan({**base, "dim": 1536, "num_layers": 30}, False).version == "2.1"
    assert identify_wan({**base, "dim": 3072, "in_dim": 48, "out_dim": 48, "num_layers": 30}, False).version == "2.2"
    assert identify_wan({**base, "model_type": "s2v"}, False).version == "2.2"
    assert identify_wan({**base, "model_type": "i2v", "in_dim": 36}, True).version == "2.1"
    assert identify_wan({**base, "model_type": "camera_2.2"}, False).variant == "camera"


@pytest.fixture
def model_dir(tmp_path, monkeypatch):
    import folder_paths

    exts = folder_paths.folder_names_and_paths["diffusion_models"][1]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusion_models", ([str(tmp_path)], exts))
    return tmp_path


LOADER_ARGS = dict(wan_version="auto", model_variant="auto", fp8_optimization="disabled", weight_dtype="auto")
SWAP_ARGS = dict(offload_txt_emb=False, offload_img_emb=False, use_non_blocking=True, vace_blocks_to_swap=0,
                 prefetch_blocks=1, block_swap_debug=False)


def test_loader_nodes_list_files_and_load(model_dir):
    from wan22_blockswap.nodes import NODE_CLASS_MAPPINGS, WANModelLoader

    sd = tiny_sd()
    write_st(model_dir, sd, "a.safetensors")
    (model_dir / "sub").mkdir()
    write_gguf(model_dir / "sub", sd, name="b.gguf")
    inputs = NODE_CLASS_MAPPINGS["WANModelLoader"].INPUT_TYPES()["required"]
    assert inputs["safetensors_model"][1]["options"] == ["none", "a.safetensors"]  # V3 combo form
    assert inputs["gguf_model"][1]["options"] == ["none", "sub/b.gguf"]
    assert list(inputs) == ["model_type", "safetensors_model", "gguf_model", "wan_version", "model_variant",
                            "fp8_optimization", "weight_dtype"]
    assert all("tooltip" in spec[1] for spec in inputs.values())
    (plain,) = WANModelLoader().load("safetensors", "a.safetensors", "none", **LOADER_ARGS)
    assert sample(plain).equal(sample(reference(sd)))
    (q,) = WANModelLoader().load("gguf", "a.safetensors", "sub/b.gguf", **LOADER_ARGS)
    assert isinstance(q.model.diffusion_model.blocks[0].ffn[0].weight, GGUFTensor)
    with pytest.raises(BlockSwapError, match="no gguf file is chosen"):
        WANModelLoader().load("gguf", "a.safetensors", "none", **LOADER_ARGS)


@pytest.mark.parametrize("fmt", ["safetensors", "gguf"])
def test_blockswap_loader_packs_masters_at_load(model_dir, fmt):
    from wan22_blockswap.nodes import WAN22BlockSwapLoader, WANModelLoader

    sd = tiny_sd()
    write_st(model_dir, sd, "a.safetensors")
    write_gguf(model_dir, sd, name="b.gguf")
    files = ("a.safetensors", "b.gguf")
    (plain,) = WANModelLoader().load(fmt, *files, **LOADER_ARGS)
    (swapped,) = WAN22BlockSwapLoader().load(fmt, *files, **LOADER_ARGS, blocks_to_swap=5, **SWAP_ARGS,
                                             unique_id="3")
    dm = swapped.model.diffusion_model
    engine = _ENGINES[dm]
    raw = sum(torch.Tensor.numel(p) * p.element_size() for u in engine._units for p in u.module.parameters())
    # read straight into page-aligned buffers the engine adopted as masters (no second copy)
    assert all(u.master.data_ptr() % 4096 == 0 and u.nbytes <= u.master.numel() + 4096 for u in engine._units)
    # the streamed blocks already sit in their host masters, in their stored form (GGUF: quantized)
    assert engine.plan.block_indices == (3, 4, 5, 6, 7)
    # each block's buffer: its tensors at 256-byte steps, in whole 4 KiB pages (so it can be page-locked)
    aligned = [sum(-(-torch.Tensor.numel(p) * p.element_size() // 256) * 256 for p in u.module.parameters())
               for u in engine._units]
    assert engine.tracker.host_bytes == sum(-(-n // 4096) * 4096 for n in aligned)
    for u in engine._units:
        for p in u.module.parameters():
            assert u.master.data_ptr() <= p.data_ptr() < u.master.data_ptr() + u.master.numel()
    fp32 = sum(v.numel() * 4 for k, v in sd.items() if k.split(".")[:2] in [["blocks", str(i)] for i in range(3, 8)])
    assert (raw < fp32 / 3) if fmt == "gguf" else (raw == fp32)
    assert swapped.model_size() < plain.model_size()  # the streamed part is not counted as resident
    assert sample(swapped).equal(sample(plain))


def test_blockswap_loader_fp8_reads_into_adopted_masters(model_dir):
    from wan22_blockswap.nodes import WAN22BlockSwapLoader, WANModelLoader

    write_st(model_dir, tiny_sd(), "a.safetensors")
    args = dict(LOADER_ARGS, fp8_optimization="e4m3fn")
    (plain,) = WANModelLoader().load("safetensors", "a.safetensors", "none", **args)
    (swapped,) = WAN22BlockSwapLoader().load("safetensors", "a.safetensors", "none", **args, blocks_to_swap=4,
                                             **dict(SWAP_ARGS, offload_txt_emb=True), unique_id="3")
    engine = _ENGINES[swapped.model.diffusion_model]
    assert "text_embedding" in engine.plan.units
    for u in engine._units:  # fp8 matrices and their scales sit in the buffer they were read into
        assert u.master.data_ptr() % 4096 == 0
        assert all(u.master.data_ptr() <= p.data_ptr() < u.master.data_ptr() + u.master.numel()
                   for p in u.module.parameters())
    assert sample(swapped).equal(sample(plain))


def test_unsupported_gguf_type_lists_the_supported_ones(tmp_path):
    import numpy as np

    from wan22_blockswap.formats.gguf_dequant import SUPPORTED

    gguf = pytest.importorskip("gguf")
    path = tmp_path / "iq.gguf"
    w = gguf.GGUFWriter(str(path), "wan")
    qtype = gguf.GGMLQuantizationType.IQ4_NL
    per_block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    w.add_tensor("blocks.0.ffn.0.weight", np.zeros((2, 64 // per_block * nbytes), dtype=np.uint8), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(BlockSwapError) as e:
        load_wan_model(str(path))
    assert "iq.gguf" in str(e.value) and "IQ4_NL" in str(e.value)
    assert "supported types: " + ", ".join(SUPPORTED) in str(e.value)


def test_a_dtype_the_device_cannot_run_is_a_clear_error():
    from wan22_blockswap.model_loader import _probe_dtype

    _probe_dtype(torch.device("cpu"), torch.float8_e4m3fn, torch.float32)  # CPUs can cast fp8
    with pytest.raises(BlockSwapError, match="cpu cannot run torch.float4_e2m1fn_x2 weights .*choose another"):
        _probe_dtype(torch.device("cpu"), torch.float4_e2m1fn_x2, torch.float32)  # no CPU kernels


def test_gguf_lora_once_after_comfyui_partially_unloads(tmp_path):
    """ComfyUI's partially_unload (VRAM pressure, or the ring making room) adds a LowVramPatch for a
    key whose LoRA the pack's patcher attached to the GGUF weight: it must still apply once."""
    model, _, _ = load_wan_model(write_gguf(tmp_path, tiny_sd()))
    patched = with_lora(model)
    mm.load_models_gpu([patched])
    before = forward(patched)
    patched.partially_unload(patched.offload_device, 10 ** 12)
    q = patched.model.diffusion_model.blocks[1].self_attn.q
    assert q.weight.patches and any(getattr(f, "is_lowvram_patch", False) for f in q.weight_function)
    assert torch.equal(forward(patched), before)


def test_fp8_option_leaves_fp8_weights_alone(tmp_path):
    sd = tiny_sd()
    e4 = {k: v.to(torch.float8_e4m3fn) if k.startswith("blocks.") and v.ndim == 2 else v for k, v in sd.items()}
    path = write_st(tmp_path, e4)
    plain, _, _ = load_wan_model(path, weight_dtype="fp32")
    requant, _, _ = load_wan_model(path, fp8_optimization="e5m2", weight_dtype="fp32")
    a, b = plain.model.diffusion_model.state_dict(), requant.model.diffusion_model.state_dict()
    assert b["blocks.0.ffn.0.weight"].dtype == torch.float8_e4m3fn and "blocks.0.ffn.0.scale_weight" not in b
    assert all(torch.equal(a[k].float(), b[k].float()) for k in a)


def test_damaged_values_and_incomplete_wan_files_name_the_file(tmp_path):
    sd = tiny_sd()
    bad = dict(sd)
    bad["blocks.2.ffn.0.weight"] = sd["blocks.2.ffn.0.weight"].clone()
    bad["blocks.2.ffn.0.weight"][0, 0] = float("inf")
    with pytest.raises(BlockSwapError, match="cannot quantize blocks.2.ffn.0.weight: .*inf or NaN"):
        load_wan_model(write_st(tmp_path, bad, "inf.safetensors"), fp8_optimization="e4m3fn")
    partial = {k: v for k, v in sd.items() if k != "head.head.weight"}
    with pytest.raises(BlockSwapError, match="nohead.safetensors") as e:
        load_wan_model(write_st(tmp_path, partial, "nohead.safetensors"))
    assert "head.head.weight" in str(e.value)
