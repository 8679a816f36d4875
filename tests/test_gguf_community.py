"""WAN GGUF files as the community files are made, and the pack's fixtures checked against them.

The city96 / QuantStack WAN GGUFs are made in three steps by ComfyUI-GGUF's tools: ``convert.py``
(gguf-py's writer; it sets the 5-D ``patch_embedding.weight`` aside), its patched ``llama-quantize``
(which quantizes the block matrices and keeps the tensor order) and ``fix_5d_tensors.py``, which
reads that file with gguf-py and writes a new one with gguf-py's writer: every tensor copied in
order, the 5-D kernel inserted as a true 5-D F32 tensor right after the tensor whose name is its own
with ``.weight`` -> ``.bias``, or appended at the end when there is none. ``community_file`` below
does those steps here with gguf-py directly (the quantize step as the patched llama-quantize
decides the types), independently of the pack's ``write_tiny_gguf``, so that

* the pack's readers and loader are checked on such a file (the header check used to refuse its
  5-D tensor: "5 dimensions; GGUF tensors have at most 4"), and
* ``write_tiny_gguf``, which every GGUF test, the fuzz corpus and the benchmarks use, is checked to
  write the same bytes.

K-quant data comes from ``write_tiny_gguf`` (gguf-py encodes no K-quant); its accuracy is checked
against gguf-py's own dequantization.
"""
import math
import os

import numpy as np
import pytest
import torch

from wan22_blockswap import tiny_wan
from wan22_blockswap.formats.gguf_dequant import block_size, dequantize
from wan22_blockswap.formats.gguf_header import check_gguf_header
from wan22_blockswap.formats.gguf_reader import GGUFTensor, load_gguf_state_dict, write_tiny_gguf
from wan22_blockswap.formats.weight_files import scan_weights

gguf = pytest.importorskip("gguf")

# llama-quantize's file types and the types it gives WAN's block matrices (lcpp.patch: the attention
# .v.weight and .ffn.2.weight matrices get Q6_K in the _M mixes)
FILE_TYPE = {"Q8_0": "MOSTLY_Q8_0", "Q4_K_M": "MOSTLY_Q4_K_M", "Q5_K_M": "MOSTLY_Q5_K_M"}


def block_type(quant, key):
    if quant.endswith("_M"):
        return "Q6_K" if key.endswith((".v.weight", ".ffn.2.weight")) else quant[:-2]
    return quant


def stored_type(key, t, quant, checkpoint="BF16"):
    """convert.py + llama-quantize: 2-D ``...weight`` inside blocks quantized (K-quants only with rows
    of a multiple of 256, else F16), 1-D / at most 1024 elements / ``.modulation`` F32, the rest in
    the checkpoint's precision."""
    if t.ndim == 2 and "blocks." in key and key.endswith("weight"):
        qtype = block_type(quant, key)
        return "F16" if qtype.endswith("_K") and t.shape[-1] % 256 else qtype
    if t.ndim <= 1 or t.numel() <= 1024 or ".modulation" in key:
        return "F32"
    return checkpoint


def community_file(path, sd, quant, k_bytes_from=None):
    """``sd`` as a WAN GGUF in circulation, made in the converters' steps (module docstring).
    ``k_bytes_from``: a GGUF file to take K-quant tensors' bytes from."""
    Q = gguf.GGMLQuantizationType
    donor = {t.name: t.data for t in gguf.GGUFReader(str(k_bytes_from)).tensors} if k_bytes_from else {}
    # 1. convert.py + llama-quantize: sorted keys, 5-D set aside, types as decided above
    stage1 = f"{path}.quantized"
    w = gguf.GGUFWriter(stage1, "wan")
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_file_type(gguf.LlamaFileType[FILE_TYPE[quant]])
    set_aside = {}
    for key in sorted(sd):
        t = sd[key]
        if t.ndim > 4:
            set_aside[key] = t.float().numpy()
            continue
        qtype = Q[stored_type(key, t, quant)]
        if qtype.name.endswith("_K"):
            data = donor[key]
        else:
            data = gguf.quants.quantize(t.float().numpy(), qtype)
        w.add_tensor(key, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    # 2. fix_5d_tensors.py: a new file, every tensor copied, the 5-D ones inserted after their bias
    reader = gguf.GGUFReader(stage1)
    arch = bytes(reader.get_field("general.architecture").parts[-1]).decode()
    file_type = int(reader.get_field("general.file_type").parts[-1][0])
    w = gguf.GGUFWriter(None, arch)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_file_type(gguf.LlamaFileType(file_type))
    added = []
    for tensor in reader.tensors:
        w.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
        key5d = tensor.name.replace(".bias", ".weight")
        if key5d in set_aside:
            w.add_tensor(key5d, gguf.quants.quantize(set_aside[key5d], Q.F32), raw_dtype=Q.F32)
            added.append(key5d)
    for key, data in set_aside.items():
        if key not in added:
            w.add_tensor(key, gguf.quants.quantize(data, Q.F32), raw_dtype=Q.F32)
    w.write_header_to_file(path=str(path))
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.remove(stage1)
    return str(path)


def wan_sd(variant="t2v", dim=128, layers=2):
    cfg = tiny_wan.tiny_config(variant, dim=dim, num_heads=dim // 128, ffn_dim=2 * dim, num_layers=layers,
                               text_dim=4096)
    return tiny_wan.WanModel(cfg).init_weights(1).state_dict()


def test_a_wan_gguf_as_fix_5d_tensors_writes_it_is_read(tmp_path):
    """The issue's file: the pack's header check, both GGUF readers and the loader read it, the 5-D
    F32 kernel with its 5-D shape and exact values (the header check used to stop at its tensor info)."""
    from wan22_blockswap.model_loader import load_wan_model

    sd = wan_sd()
    path = community_file(tmp_path / "wan2.1-t2v-Q8_0.gguf", sd, "Q8_0")
    names = [t.name for t in gguf.GGUFReader(path).tensors]
    pe = names.index("patch_embedding.weight")
    assert names[pe - 1] == "patch_embedding.bias" and 0 < pe < len(names) - 1
    layout = check_gguf_header(path)
    info = layout.tensors[pe]
    assert info.name == "patch_embedding.weight" and info.type_name == "F32"
    assert info.dims == tuple(reversed(sd["patch_embedding.weight"].shape))        # 5 dims, GGUF order
    state, meta = load_gguf_state_dict(path)
    assert meta["architecture"] == "wan"
    assert torch.equal(state["patch_embedding.weight"], sd["patch_embedding.weight"])
    entries = {e.key: e for e in scan_weights(path)[1]}
    assert entries["patch_embedding.weight"].shape == tuple(sd["patch_embedding.weight"].shape)
    patcher, wan, _ = load_wan_model(path, model_type="gguf")
    assert wan.num_blocks == 2
    assert torch.equal(patcher.model.diffusion_model.patch_embedding.weight.float(), sd["patch_embedding.weight"])


@pytest.mark.parametrize("quant,variant,dim", [("Q8_0", "t2v", 128), ("Q8_0", "i2v", 128),
                                               ("Q4_K_M", "t2v", 256), ("Q5_K_M", "i2v", 256)])
def test_write_tiny_gguf_writes_the_community_files_bytes(tmp_path, quant, variant, dim):
    """write_tiny_gguf in one pass = the converters' steps: the same file, byte for byte (metadata,
    tensor order, types, shapes, offsets, padding, data; K-quant data taken from it)."""
    sd = wan_sd(variant, dim)
    ours = write_tiny_gguf(tmp_path / "ours.gguf", sd, quant=quant)
    theirs = community_file(tmp_path / "theirs.gguf", sd, quant, k_bytes_from=ours)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(theirs).tensors}
    if quant != "Q8_0":
        assert {"Q6_K", block_type(quant, "x")} <= set(types.values())   # the mix is really there
    assert open(ours, "rb").read() == open(theirs, "rb").read()


def test_a_kernel_without_its_bias_is_appended_last(tmp_path):
    """fix_5d_tensors.py's other case: no tensor to insert the 5-D one after, so it comes last (its
    info and its data); write_tiny_gguf does the same, and the header check reads it."""
    sd = {k: v for k, v in wan_sd().items() if k != "patch_embedding.bias"}
    ours = write_tiny_gguf(tmp_path / "ours.gguf", sd)
    theirs = community_file(tmp_path / "theirs.gguf", sd, "Q8_0")
    assert open(ours, "rb").read() == open(theirs, "rb").read()
    layout = check_gguf_header(ours)
    last = layout.tensors[-1]
    assert last.name == "patch_embedding.weight" and len(last.dims) == 5
    assert last.offset == max(t.offset for t in layout.tensors)
    assert last.offset + last.nbytes == os.path.getsize(ours)


@pytest.mark.parametrize("name,levels", [("Q4_K", 15), ("Q5_K", 31), ("Q6_K", 63)])
def test_k_quant_encoding_is_what_gguf_py_decodes(tmp_path, name, levels):
    """write_tiny_gguf's K-quant blocks, decoded by gguf-py: within one quantization step of each
    256-element block's range of the source, relative error below 2 / levels, and the pack's own
    dequantization gives gguf-py's values exactly."""
    g = torch.Generator().manual_seed(3)
    w = torch.cat([torch.randn(64, 512, generator=g) * 0.02,                 # WAN-like weights
                   torch.rand(32, 512, generator=g) - 0.25,                  # all positive / mixed signs
                   torch.zeros(8, 512), torch.full((8, 512), 0.5)])          # constant blocks
    path = write_tiny_gguf(tmp_path / "k.gguf", {"blocks.0.w.weight": w}, quant=name)
    (t,) = gguf.GGUFReader(path).tensors
    assert t.tensor_type.name == name
    deq = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
    ref = w.numpy()
    blocks = ref.reshape(-1, 256)
    spread = np.maximum(blocks.max(1), 0) - np.minimum(blocks.min(1), 0)      # the range each block's codes span
    err = np.abs(deq - ref).reshape(-1, 256)
    assert (err <= spread[:, None] / levels + 1e-7).all(), float((err - spread[:, None] / levels).max())
    assert np.linalg.norm(deq - ref) <= 2 / levels * np.linalg.norm(ref)
    assert (deq.reshape(-1, 256)[-32:-16] == 0).all()                        # zeros stay zeros
    raw = torch.from_numpy(t.data.copy()).reshape(-1)
    assert np.array_equal(dequantize(raw, name, tuple(w.shape)).numpy(), deq)
    assert torch.Tensor.numel(raw) == math.prod(w.shape) // 256 * block_size(name)[1]


@pytest.mark.parametrize("quant,q_type", [("Q8_0", "Q8_0"), ("Q4_K_M", "Q4_K")])
def test_convert_py_rearranged_rows_keep_their_shape(tmp_path, quant, q_type):
    """convert.py's other layout (SD-like architectures): matrices whose rows are not a multiple of 256
    stored as rows of 256 with an INT32 ``comfy.gguf.orig_shape`` array, which ComfyUI-GGUF reads.
    llama-quantize sees those rows of 256, so even 128-wide matrices take a K-quant."""
    sd = wan_sd()
    path = write_tiny_gguf(tmp_path / "rows.gguf", sd, quant=quant, shape_fix=True)
    reader = gguf.GGUFReader(path)
    field = reader.get_field("comfy.gguf.orig_shape.blocks.0.self_attn.q.weight")
    assert field.types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
    assert [int(field.parts[i][0]) for i in field.data] == [128, 128]
    q = next(t for t in reader.tensors if t.name == "blocks.0.self_attn.q.weight")
    assert q.shape.tolist() == [256, 64] and q.tensor_type.name == q_type    # rows of 256, GGUF order
    state, _ = load_gguf_state_dict(path)
    t = state["blocks.0.self_attn.q.weight"]
    assert isinstance(t, GGUFTensor) and t.shape == (128, 128)
    ref = gguf.quants.dequantize(q.data, q.tensor_type).reshape(128, 128)
    assert np.array_equal(t.dequantize().numpy(), ref)
    assert state["patch_embedding.weight"].shape == sd["patch_embedding.weight"].shape
