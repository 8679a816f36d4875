"""A streamed block computes from its device slot, never from its host master.

On a CPU the slot and the master are both host memory, so the numbers cannot tell them apart (the
output tests pass either way, except with LoRA, which is applied in the slot). Here every Linear of
every streamed block records where its weight is when it runs: the address must lie in one of the
engine's slots and outside every host master. Runs on the stand-in and on a real ComfyUI
(COMFYUI_PATH), through the node (plain and GGUF-like quantized weights) and the BlockSwap loader.
"""

import pytest
import torch
from torch import nn


from gguf_like import to_gguf_like
from wan22_blockswap.callbacks import _ENGINES
from test_node import load, sample, swap


pytestmark = pytest.mark.usefixtures("unload_models_after")  # conftest.py


def _spans(tensors):
    return [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors]


def _where_weights_were(patcher, run):
    """Run ``run()`` (the engine exists: after a first run) with a forward pre-hook on every
    Linear-like layer (a 2-D weight) of the streamed units; returns
    ``(engine, [(unit, layer, weight address, weight bytes)])``."""
    engine = _ENGINES[patcher.model.diffusion_model]
    seen, handles = [], []
    for u in engine._units:
        for name, m in u.module.named_modules():
            if isinstance(m, nn.Linear) or getattr(m, "weight", None) is not None and m.weight.ndim == 2:
                def record(mod, args, _u=u.name, _n=name):
                    w = mod.weight
                    seen.append((_u, _n, torch.Tensor.data_ptr(w),
                                 torch.Tensor.numel(w) * torch.Tensor.element_size(w)))
                handles.append(m.register_forward_pre_hook(record))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return engine, seen


def _assert_all_in_slots(engine, seen, expected_units):
    slots = _spans(engine._slots)
    masters = _spans([u.master for u in engine._units])
    assert slots and {u for u, _, _, _ in seen} == set(expected_units)
    for unit, layer, ptr, n in seen:
        assert any(lo <= ptr and ptr + n <= hi for lo, hi in slots), f"{unit}.{layer} ran outside the slots"
        assert not any(lo <= ptr < hi for lo, hi in masters), f"{unit}.{layer} ran from its host master"


@pytest.mark.parametrize("quantized", [False, True], ids=["plain", "gguf_like"])
def test_streamed_blocks_compute_from_their_slots(quantized):
    model = load()
    if quantized:
        to_gguf_like(model)
    swapped = swap(model, 5)
    reference = sample(model)
    assert torch.equal(sample(swapped), reference)  # the first run makes the engine (masters, ring)
    out = []
    engine, seen = _where_weights_were(swapped, lambda: out.append(sample(swapped)))
    assert torch.equal(out[0], reference)
    _assert_all_in_slots(engine, seen, [f"blocks.{i}" for i in range(3, 8)])
    assert len(seen) >= 5 * 2 * 3  # every streamed block's layers ran, in each of the forwards


def test_blocks_read_into_adopted_masters_still_compute_from_slots(tmp_path, monkeypatch):
    """The BlockSwap loader reads streamed blocks straight into buffers the engine adopts as masters:
    running must still go through the slots."""
    import folder_paths
    from safetensors.torch import save_file

    from file_corpus import tiny_state_dict
    from wan22_blockswap.nodes import WAN22BlockSwapLoader

    exts = folder_paths.folder_names_and_paths["diffusion_models"][1]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusion_models", ([str(tmp_path)], exts))
    sd = {k: v.contiguous() for k, v in tiny_state_dict().items()}
    save_file(sd, str(tmp_path / "m.safetensors"))
    (swapped,) = WAN22BlockSwapLoader().load(
        "safetensors", "m.safetensors", "none", wan_version="auto", model_variant="auto",
        fp8_optimization="disabled", weight_dtype="auto", blocks_to_swap=1, offload_txt_emb=True,
        offload_img_emb=False, use_non_blocking=True, vace_blocks_to_swap=0, prefetch_blocks=1,
        block_swap_debug=False, unique_id="9")
    sample(swapped)
    engine, seen = _where_weights_were(swapped, lambda: sample(swapped))
    _assert_all_in_slots(engine, seen, ["blocks.0", "text_embedding"])
