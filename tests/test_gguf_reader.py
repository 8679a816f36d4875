"""gguf_reader: GGUF files <-> torch state dicts (memory-mapped), the GGUFTensor type, bad files.

Files are made on the spot with write_tiny_gguf (gguf-py's GGUFWriter) from a tiny WAN state dict;
reference bytes and values come from gguf-py itself (gguf.quants.quantize / dequantize).
"""
import copy
import math
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from wan22_blockswap import tiny_wan
from wan22_blockswap.formats.gguf_dequant import SUPPORTED, GGUFFormatError, block_size
from wan22_blockswap.formats.gguf_reader import (GGUFTensor, check_tensor_type, load_gguf_state_dict,
                                         write_tiny_gguf)

gguf = pytest.importorskip("gguf")
ROOT = Path(__file__).resolve().parents[1]


def gtype(name):
    return gguf.GGMLQuantizationType[name]


@pytest.fixture(scope="module")
def wan_sd():
    cfg = tiny_wan.tiny_config("t2v", dim=128, num_heads=1, ffn_dim=256, num_layers=2, text_dim=4096)
    return tiny_wan.WanModel(cfg).init_weights(0).state_dict()


def is_quantized_key(key, t):  # llama-quantize's choice for WAN (write_tiny_gguf's default rule)
    return t.ndim == 2 and "blocks." in key and key.endswith("weight")


def community_type(key, t, quant="Q8_0", other="BF16"):
    """The type a WAN GGUF in circulation stores ``key`` in (ComfyUI-GGUF's convert.py, its patched
    llama-quantize, fix_5d_tensors.py): block matrices quantized, tensors of more than 4 dims F32,
    1-D / small / ``.modulation`` tensors F32, the other matrices in the checkpoint's precision."""
    if t.ndim > 4:
        return "F32"
    if is_quantized_key(key, t):
        return quant
    if t.ndim <= 1 or t.numel() <= 1024 or ".modulation" in key:
        return "F32"
    return other


def community_order(keys):
    """Tensor names in file order: sorted (safetensors hands convert.py sorted keys, llama-quantize
    keeps the order), the 5-D ``patch_embedding.weight`` right after ``patch_embedding.bias``."""
    rest = sorted(k for k in keys if k != "patch_embedding.weight")
    i = rest.index("patch_embedding.bias") + 1
    return rest[:i] + ["patch_embedding.weight"] + rest[i:]


@pytest.fixture(scope="module")
def q8_file(wan_sd, tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny_q8.gguf", wan_sd)


def file_mappings(path):
    """(start, end, perms) of every mapping of ``path`` in this process (Linux /proc)."""
    real = os.path.realpath(path)
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip() == real:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                out.append((lo, hi, parts[1]))
    return out


# ---------------------------------------------------------------------------------------------
# round trip

def test_round_trip_tiny_wan_q8_0(wan_sd, q8_file):
    """The file is laid out as the WAN GGUFs in circulation (read back with gguf-py, the reference
    reader), and the pack reads every tensor as stored: F32 and BF16 as plain tensors, the 5-D
    patch embedding with its 5-D shape, Q8_0 as GGUFTensor bytes that dequantize like gguf-py's."""
    reader = gguf.GGUFReader(q8_file)
    meta = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert list(meta) == ["general.architecture", "general.quantization_version", "general.file_type"]
    assert bytes(meta["general.architecture"].parts[-1]).decode() == "wan"
    assert int(meta["general.quantization_version"].parts[-1][0]) == gguf.GGML_QUANT_VERSION
    assert int(meta["general.file_type"].parts[-1][0]) == gguf.LlamaFileType.MOSTLY_Q8_0
    assert [t.name for t in reader.tensors] == community_order(wan_sd)
    starts = [int(t.data_offset) for t in reader.tensors]
    assert starts == sorted(starts)                                 # data in header order
    pe = reader.tensors[[t.name for t in reader.tensors].index("patch_embedding.weight")]
    assert pe.tensor_type.name == "F32" and pe.shape.tolist() == list(reversed(wan_sd["patch_embedding.weight"].shape))
    expected_types = {k: community_type(k, t) for k, t in wan_sd.items()}
    assert {t.name: t.tensor_type.name for t in reader.tensors} == expected_types

    sd, info = load_gguf_state_dict(q8_file)
    assert list(sd) == community_order(wan_sd)
    quantized = {k for k, t in wan_sd.items() if is_quantized_key(k, t)}
    assert len(quantized) == 20                          # 2 blocks x (4 + 4 attention + 2 ffn)
    assert info == {"architecture": "wan", "file_size": os.path.getsize(q8_file),
                    "tensor_types": dict(Counter(expected_types.values()))}
    assert set(info["tensor_types"]) == {"F32", "BF16", "Q8_0"}
    for key, ref in wan_sd.items():
        t = sd[key]
        if expected_types[key] in ("F32", "BF16"):
            dtype = torch.float32 if expected_types[key] == "F32" else torch.bfloat16
            assert type(t) is torch.Tensor and t.dtype == dtype, key
            assert t.shape == ref.shape and torch.equal(t, ref.to(dtype)), key   # 5-D patch_embedding included
            continue
        assert type(t) is GGUFTensor and t.tensor_type == "Q8_0", key
        assert t.shape == ref.shape                                    # logical shape, torch order
        assert t.dtype == torch.uint8 and t.numel() == ref.numel() // 32 * 34
        assert tuple(torch.Tensor.size(t)) == (ref.shape[0], ref.shape[1] // 32 * 34)  # gguf-py byte shape
        expected = gguf.quants.quantize(ref.numpy(), gtype("Q8_0"))
        assert np.array_equal(t.as_subclass(torch.Tensor).numpy(), expected), key
        deq = t.dequantize()
        assert deq.dtype == torch.float32 and deq.shape == ref.shape
        # bit-exact against gguf-py's own dequantization of the same bytes
        assert np.array_equal(deq.numpy(), gguf.quants.dequantize(expected, gtype("Q8_0")))
        # Q8_0 error bound: per 32-block, |w - deq| <= half a step (amax/127/2) plus the fp16
        # rounding of the scale (<= 2**-11 relative, times |q| <= 127): amax/127 bounds both
        blocks, err = ref.reshape(-1, 32), (deq - ref).reshape(-1, 32)
        amax = blocks.abs().amax(dim=1, keepdim=True)
        assert bool((err.abs() <= amax / 127 + 1e-12).all()), key
        assert deq.dtype == torch.float32 and t.dequantize(torch.float16).dtype == torch.float16


@pytest.mark.parametrize("quant", ["Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_round_trip_other_gguf_py_quants(wan_sd, tmp_path, quant):
    path = write_tiny_gguf(tmp_path / f"{quant}.gguf", wan_sd, quant=quant)
    sd, info = load_gguf_state_dict(path)
    assert info["tensor_types"][quant] == 20
    key = "blocks.1.ffn.2.weight"
    ref = gguf.quants.quantize(wan_sd[key].numpy(), gtype(quant))
    t = sd[key]
    assert t.tensor_type == quant and t.shape == wan_sd[key].shape
    assert np.array_equal(t.as_subclass(torch.Tensor).numpy(), ref)
    assert np.array_equal(t.dequantize().numpy(), gguf.quants.dequantize(ref, gtype(quant)))


def test_f16_and_bf16_become_plain_tensors(wan_sd, tmp_path):
    # gguf-py reads F16 as float16 arrays but BF16 as raw bytes (..., 2n): both come back typed.
    # convert.py's own output: every big tensor in the checkpoint's precision, small ones F32
    for quant, dtype in (("F16", torch.float16), ("BF16", torch.bfloat16)):
        path = write_tiny_gguf(tmp_path / f"{quant}.gguf", wan_sd, quant=quant, float_type=quant)
        sd, info = load_gguf_state_dict(path)
        assert info["tensor_types"] == dict(Counter(community_type(k, t, quant, quant) for k, t in wan_sd.items()))
        for key in ("blocks.0.self_attn.q.weight", "text_embedding.0.weight"):
            t = sd[key]
            assert type(t) is torch.Tensor and t.dtype == dtype
            assert torch.equal(t, wan_sd[key].to(dtype))


def random_blocks(name, shape, seed):
    """Random block bytes with finite fp16 d/dmin fields, as a flat uint8 tensor."""
    fp16_fields = {"Q4_K": (0, 2), "Q6_K": (208,), "Q2_K": (80, 82)}[name]
    per_block, nbytes = block_size(name)
    n = math.prod(shape) // per_block
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(n, nbytes), dtype=np.uint8)
    for off in fp16_fields:
        blocks[:, off:off + 2] = (rng.standard_normal(n) * 0.01).astype(np.float16).view(np.uint8).reshape(n, 2)
    return torch.from_numpy(blocks.reshape(-1))


@pytest.mark.parametrize("name,shape", [("Q4_K", (8, 512)), ("Q6_K", (3, 256)),
                                        # last dim not a multiple of 256: stored as rows of 256,
                                        # real shape in comfy.gguf.orig_shape.*
                                        ("Q2_K", (4, 2, 128))])
def test_k_quant_bytes_written_as_stored(tmp_path, name, shape):
    raw = random_blocks(name, shape, seed=len(shape))
    src = GGUFTensor.wrap(raw, name, shape)
    path = write_tiny_gguf(tmp_path / "k.gguf", {"model.diffusion_model.blocks.0.w": src,
                                                 "model.diffusion_model.head.bias": torch.ones(4)})
    sd, info = load_gguf_state_dict(path)
    assert list(sd) == ["blocks.0.w", "head.bias"]                 # prefix stripped
    t = sd["blocks.0.w"]
    assert type(t) is GGUFTensor and t.tensor_type == name and t.shape == torch.Size(shape)
    assert torch.equal(t.as_subclass(torch.Tensor).reshape(-1), raw)
    ref = gguf.quants.dequantize(raw.numpy(), gtype(name)).reshape(shape)
    assert np.array_equal(t.dequantize().numpy(), ref)


def test_prefixes_stripped(tmp_path):
    sd_in = {"model.diffusion_model.a.weight": torch.ones(2, 3), "diffusion_model.b.weight": torch.zeros(3),
             "c.weight": torch.full((1,), 2.0)}
    sd, _ = load_gguf_state_dict(write_tiny_gguf(tmp_path / "p.gguf", sd_in, sort=False))
    assert list(sd) == ["a.weight", "b.weight", "c.weight"]
    clash = {"model.diffusion_model.a": torch.ones(1), "a": torch.ones(1)}
    with pytest.raises(GGUFFormatError, match="two tensors map to the key 'a'"):
        load_gguf_state_dict(write_tiny_gguf(tmp_path / "clash.gguf", clash))


# ---------------------------------------------------------------------------------------------
# memory mapping

def test_tensors_view_a_read_only_mapping_of_the_file(q8_file):
    if not os.path.exists("/proc/self/maps"):
        pytest.skip("needs Linux /proc to see mappings")
    sd, _ = load_gguf_state_dict(q8_file)
    maps = file_mappings(q8_file)
    assert maps, "the file is not mapped"
    assert all(perms.startswith("r-") for _, _, perms in maps)     # read-only: no private writable copy
    for key, t in sd.items():
        lo = torch.Tensor.data_ptr(t)
        hi = lo + torch.Tensor.numel(t) * torch.Tensor.element_size(t)
        assert any(a <= lo and hi <= b for a, b, _ in maps), f"{key} is not a view of the file"
    del sd, t                                                      # the mapping lives with the tensors
    import gc

    gc.collect()
    assert not file_mappings(q8_file)


def test_loading_does_not_read_the_data_and_hides_the_not_writable_warning(tmp_path):
    """In a fresh process (torch warns once per process): host RSS grows by far less than the file
    while loading, and torch's "NumPy array is not writable" warning is not shown."""
    path = write_tiny_gguf(tmp_path / "big.gguf", {f"blocks.{i}.w": torch.ones(1024, 2048) for i in range(8)},
                           quantize=lambda k, t: k.startswith("blocks.1"), float_type="F32")  # 7 x 8 MiB F32 + one Q8_0
    script = textwrap.dedent(f"""
        import gc, sys, warnings
        sys.path.insert(0, {str(ROOT)!r})
        from _pack import import_pack
        import_pack()
        import psutil, torch
        from wan22_blockswap.formats.gguf_reader import load_gguf_state_dict
        warnings.simplefilter("always")
        proc = psutil.Process()
        gc.collect()
        before = proc.memory_info().rss
        sd, info = load_gguf_state_dict({str(path)!r})
        grown = proc.memory_info().rss - before
        print("GROWN", grown, info["file_size"])
        total = sum(float(t.double().sum()) for k, t in sd.items() if k != "blocks.1.w")   # reads the file
        print("SUM", total)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "not writable" not in res.stderr
    grown, size = map(int, next(line for line in res.stdout.splitlines() if line.startswith("GROWN")).split()[1:])
    assert size > 50 * 2 ** 20 and grown < size / 10, (grown, size)
    assert float(res.stdout.split("SUM")[1]) == 7 * 1024 * 2048


# ---------------------------------------------------------------------------------------------
# GGUFTensor behaviour

def q8(shape=(4, 64), seed=0):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    raw = torch.from_numpy(gguf.quants.quantize(w.numpy(), gtype("Q8_0")))
    return GGUFTensor.wrap(raw, "Q8_0", shape), raw, w


def test_shape_is_logical_storage_is_raw():
    t, raw, w = q8()
    assert t.shape == torch.Size([4, 64]) and t.tensor_shape == t.shape
    assert t.size() == torch.Tensor.size(t) == torch.Size([4, 68])
    assert t.numel() == 272 and t.dtype == torch.uint8 and t.data_ptr() == raw.data_ptr()
    assert t.tensor_type == "Q8_0" and t.patches == []
    assert GGUFTensor.wrap(raw, gtype("Q8_0"), (4, 64)).tensor_type == "Q8_0"   # enum members too
    assert "Q8_0" in repr(t) and "(4, 64)" in repr(t)


def test_patches_lists_are_never_shared():
    a, b = q8()[0], q8()[0]
    a.patches.append("lora")
    assert b.patches == [] and a.patches is not b.patches
    moved = a.to("cpu", copy=True)
    assert type(moved) is GGUFTensor and moved.patches == ["lora"] and moved.patches is not a.patches


def test_same_bytes_ops_keep_the_type_others_return_plain_tensors():
    t = q8()[0]
    for derived in (t.detach(), t.clone(), t.contiguous(), t.cpu(), t.data, copy.deepcopy(t)):
        assert type(derived) is GGUFTensor and derived.tensor_type == "Q8_0" and derived.shape == t.shape
    assert t.to("cpu") is t                                        # a no-op returns the tensor itself
    for other in (t[0], t.view(-1), t.reshape(-1), t.float(), t.to(torch.float16), t + 1):
        assert type(other) is torch.Tensor
    assert torch.equal(t.clone().as_subclass(torch.Tensor), t.as_subclass(torch.Tensor))


def test_parameter_and_data_rebinding_keep_the_attributes():
    t, raw, w = q8()
    with pytest.raises(RuntimeError, match="floating point"):     # uint8 cannot require grad
        nn.Parameter(t)
    p = nn.Parameter(t, requires_grad=False)
    # torch returns t.detach() marked as a parameter for tensor subclasses, not a Parameter object
    assert isinstance(p, nn.Parameter) and type(p) is GGUFTensor and not p.requires_grad
    assert p.tensor_type == "Q8_0" and p.shape == torch.Size([4, 64]) and p.data_ptr() == raw.data_ptr()
    mod = nn.Module()
    mod.weight = p
    assert mod.weight is p and list(mod.parameters()) == [p]
    patches = p.patches
    patches.append("lora")
    # what the block-swap engine does: pack into a flat host master, rebind to a view of it
    master = torch.zeros(1024, dtype=torch.uint8)
    view = master[64:64 + p.numel()].view(torch.Tensor.size(p))
    view.copy_(p.data)
    p.data = view
    assert mod.weight is p and type(p) is GGUFTensor and p.data_ptr() == view.data_ptr()
    assert p.tensor_type == "Q8_0" and p.tensor_shape == torch.Size([4, 64]) and p.patches is patches
    assert torch.equal(p.dequantize(), t.dequantize())
    mod.to("cpu")                                                   # nn.Module._apply rebinds .data too
    assert mod.weight is p and p.tensor_type == "Q8_0" and p.patches is patches
    assert type(mod.state_dict()["weight"]) is GGUFTensor
    clone = copy.deepcopy(mod)
    assert type(clone.weight) is GGUFTensor and isinstance(clone.weight, nn.Parameter)
    assert clone.weight.patches == ["lora"] and clone.weight.data_ptr() != p.data_ptr()


def test_dequantize_options():
    t, raw, w = q8()
    ref = t.dequantize()
    assert torch.equal(t.dequantize(device="cpu"), ref)
    assert torch.equal(t.dequantize(torch.bfloat16), ref.to(torch.bfloat16))
    assert (ref - w).abs().max() <= w.abs().max() / 127


def test_wrap_rejects_bad_input():
    t, raw, w = q8()
    with pytest.raises(GGUFFormatError, match="needs 272 bytes"):
        GGUFTensor.wrap(raw[:2], "Q8_0", (4, 64))
    with pytest.raises(GGUFFormatError, match="uint8"):
        GGUFTensor.wrap(raw.float(), "Q8_0", (4, 64))
    with pytest.raises(GGUFFormatError, match="supported: F32"):
        GGUFTensor.wrap(raw, "IQ4_NL", (4, 64))
    with pytest.raises(GGUFFormatError, match="contiguous"):
        GGUFTensor.wrap(raw.t(), "Q8_0", (4, 64))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_move_and_dequantize(q8_file):
    sd, _ = load_gguf_state_dict(q8_file)
    t = sd["blocks.0.ffn.0.weight"]
    ref = t.dequantize()
    on_gpu = t.to("cuda")
    assert type(on_gpu) is GGUFTensor and on_gpu.is_cuda and on_gpu.tensor_type == "Q8_0"
    assert torch.equal(on_gpu.dequantize().cpu(), ref) and torch.equal(t.dequantize(device="cuda").cpu(), ref)
    p = nn.Parameter(t, requires_grad=False)
    p.data = on_gpu.as_subclass(torch.Tensor)
    assert p.is_cuda and p.tensor_type == "Q8_0" and torch.equal(p.dequantize().cpu(), ref)


# ---------------------------------------------------------------------------------------------
# bad files

def test_missing_file(tmp_path):
    path = tmp_path / "nope.gguf"
    with pytest.raises(GGUFFormatError, match="not found") as e:
        load_gguf_state_dict(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("content", [b"XXXX" + np.random.default_rng(0).bytes(4096), b"", b"GG"],
                         ids=["random", "empty", "short"])
def test_not_a_gguf_file(tmp_path, content):
    path = tmp_path / "random.gguf"
    path.write_bytes(content)
    with pytest.raises(GGUFFormatError, match="not a GGUF file") as e:
        load_gguf_state_dict(path)
    assert str(path) in str(e.value)


def test_truncated_file(q8_file, tmp_path):
    data = Path(q8_file).read_bytes()
    for cut in (len(data) // 2, 40, len(data) - 4096):   # in the tensor data / in the header / near the end
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(GGUFFormatError, match="truncated or corrupt") as e:
            load_gguf_state_dict(path)
        assert str(path) in str(e.value)


def test_corrupt_header(q8_file, tmp_path):
    data = bytearray(Path(q8_file).read_bytes())
    data[4:8] = (99).to_bytes(4, "little")                 # GGUF version 99
    path = tmp_path / "v99.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(GGUFFormatError, match="truncated or corrupt.*version 99"):
        load_gguf_state_dict(path)


def test_wrong_architecture(wan_sd, tmp_path):
    path = write_tiny_gguf(tmp_path / "flux.gguf", {"x.weight": torch.ones(2)}, arch="flux")
    with pytest.raises(GGUFFormatError, match="architecture 'flux'; expected 'wan'") as e:
        load_gguf_state_dict(path)
    assert str(path) in str(e.value)
    sd, info = load_gguf_state_dict(path, expected_arch=None)
    assert info["architecture"] == "flux" and list(sd) == ["x.weight"]
    assert load_gguf_state_dict(path, expected_arch=("wan", "flux"))[1]["architecture"] == "flux"


@pytest.mark.parametrize("qtype", ["IQ4_NL", "Q8_1", "I32"])
def test_unsupported_tensor_type(tmp_path, qtype):
    """A genuine file with a tensor type outside SUPPORTED, written with gguf-py's own writer:
    IQ4_NL / Q8_1 as raw block bytes (gguf-py writes any type given its bytes), I32 as int32 data."""
    path = tmp_path / f"{qtype}.gguf"
    w = gguf.GGUFWriter(str(path), "wan")
    w.add_tensor("blocks.0.ok.weight", np.ones((2, 32), dtype=np.float32))
    if qtype == "I32":
        w.add_tensor("blocks.0.bad.weight", np.arange(64, dtype=np.int32).reshape(2, 32))
    else:
        per_block, nbytes = gguf.GGML_QUANT_SIZES[gtype(qtype)]
        w.add_tensor("blocks.0.bad.weight", np.zeros((2, 64 // per_block * nbytes), dtype=np.uint8),
                     raw_dtype=gtype(qtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFFormatError) as e:
        load_gguf_state_dict(path)
    msg = str(e.value)
    assert str(path) in msg and "'blocks.0.bad.weight'" in msg and f"type {qtype}" in msg
    assert "supported types: " + ", ".join(SUPPORTED) in msg


def test_check_tensor_type():
    for name in SUPPORTED:
        check_tensor_type("f.gguf", "t", name)
    with pytest.raises(GGUFFormatError, match="f.gguf: tensor 't' has type TQ1_0"):
        check_tensor_type("f.gguf", "t", "TQ1_0")


def test_bad_orig_shape_metadata(tmp_path):
    path = tmp_path / "orig.gguf"
    w = gguf.GGUFWriter(str(path), "wan")
    w.add_tensor("a.weight", np.ones((2, 32), dtype=np.float32))
    w.add_array("comfy.gguf.orig_shape.a.weight", [3, 32])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFFormatError, match=r"64 elements but its comfy.gguf.orig_shape.a.weight says \(3, 32\)"):
        load_gguf_state_dict(path)
