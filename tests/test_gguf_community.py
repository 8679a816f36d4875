"""WAN GGUF files as the community files are made, read by the pack.

The city96 / QuantStack WAN GGUFs are made in three steps by ComfyUI-GGUF's tools: ``convert.py``
(gguf-py's writer; it sets the 5-D ``patch_embedding.weight`` aside), its patched ``llama-quantize``
(which quantizes the block matrices and keeps the tensor order) and ``fix_5d_tensors.py``, which
reads that file with gguf-py and writes a new one with gguf-py's writer: every tensor copied in
order, the 5-D kernel inserted as a true 5-D F32 tensor right after the tensor whose name is its own
with ``.weight`` -> ``.bias``, or appended at the end when there is none. ``community_file`` below
does those steps here with gguf-py directly (the quantize step as the patched llama-quantize
decides the types), independently of the pack's ``write_tiny_gguf``, so that the pack's readers
and loader are checked on such a file (the header check used to refuse its 5-D tensor: "5
dimensions; GGUF tensors have at most 4").
"""
import os

import pytest
import torch

from wan22_blockswap import tiny_wan
from wan22_blockswap.gguf_header import check_gguf_header
from wan22_blockswap.gguf_reader import load_gguf_state_dict
from wan22_blockswap.weight_files import scan_weights

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
