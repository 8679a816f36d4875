"""LoRA on QuantizedTensor weights of streamed blocks, patched in the slot, in the default tier.

ComfyUI patches a quantized weight by dequantizing it (the layer's ``convert_weight``), adding the
LoRA delta and requantizing (``set_weight``, which recalculates the scale). In the slot the pack writes
that requantized weight over the slot copy with ``param.copy_``: the data *and* the new scale must land
in the slot. (``param.data.copy_`` would write the data into the slot but the scale into a detached
clone: the slot keeps the master's scale, silently.) ComfyUI's ops are the stand-in's here, so the
layer below adds ComfyUI's two functions (comfy/ops.py, ``MixedPrecisionOps.Linear``) to it; the
weights are comfy_kitchen's ``QuantizedTensor``, the package ComfyUI pins. The real-ComfyUI tier runs
the same through UNETLoader's files (``test_comfyui_quantized.py``).

The expectation is computed here: dequantize the original, add ``strength * alpha / rank * up @ down``,
requantize with comfy_kitchen; and the output is compared with the model holding those weights
resident, with no LoRA and no swap.
"""
import gc
import os

import pytest
import torch
from torch import nn

import comfy.model_management as mm
import comfy.utils

from quantized_like import CK_LAYOUTS, QuantizedTensor, ck_layout_params, inner_tensors
from test_node import load, sample, swap
from wan22_blockswap.callbacks import _ENGINES

pytestmark = pytest.mark.skipif(bool(os.environ.get("COMFYUI_PATH")),
                                reason="default tier: ComfyUI's own quantized ops run in test_comfyui_quantized.py")

STREAMED = ("blocks.7.ffn.0", "blocks.6.self_attn.q")  # the last 4 of 8 blocks stream
RESIDENT = ("blocks.1.ffn.0",)
STRENGTH, RANK, ALPHA = 0.8, 4, 2.0


class _ComfyQuantOps:
    """``convert_weight`` / ``set_weight`` as ComfyUI 0.28's ``MixedPrecisionOps.Linear`` has them."""

    def convert_weight(self, weight, inplace=False, **kwargs):
        return weight.dequantize() if isinstance(weight, QuantizedTensor) else weight

    def set_weight(self, weight, inplace_update=False, seed=None, return_weight=False, **kwargs):
        weight = self.weight.requantize_from_float(weight, scale="recalculate", stochastic_rounding=seed,
                                                   inplace_ops=True).to(self.weight.dtype)
        if return_weight:
            return weight
        self.weight = nn.Parameter(weight, requires_grad=False)


def _quantize_layers(patcher, layout):
    """The layers of STREAMED + RESIDENT become quantized layers with ComfyUI's convert/set functions.
    Returns layer name -> its (original) quantized weight."""
    name, kwargs = CK_LAYOUTS[layout]
    dm = patcher.model.diffusion_model
    out = {}
    for layer in STREAMED + RESIDENT:
        mod = dm.get_submodule(layer)
        mod.__class__ = type(f"Quant{type(mod).__name__}", (_ComfyQuantOps, type(mod)), {})
        mod.weight = nn.Parameter(QuantizedTensor.from_float(mod.weight.detach(), name, **kwargs), requires_grad=False)
        out[layer] = mod.weight
    return out


def _factors(weight, seed):
    g = torch.Generator().manual_seed(seed)
    out_f, in_f = weight.shape
    # large enough to move the weight's absolute maximum: the requantized scale must differ
    return torch.randn(out_f, RANK, generator=g), torch.randn(RANK, in_f, generator=g)


def _lora_adapter(up, down):
    try:
        from comfy.weight_adapter import LoRAAdapter  # ComfyUI
    except ImportError:
        from comfy.lora import LoRAAdapter  # the stand-in keeps it in comfy.lora
    return LoRAAdapter(set(), (up, down, ALPHA, None, None, None))


def _expected(original, up, down, key):
    """Dequantize, add the LoRA delta, requantize (the seed ComfyUI's set_weight passes)."""
    patched = original.dequantize().float() + (STRENGTH * (ALPHA / RANK)) * (up @ down)
    return original.requantize_from_float(patched, scale="recalculate",
                                          stochastic_rounding=comfy.utils.string_to_seed(key))


@pytest.fixture(autouse=True)
def _unload_between_tests():
    yield
    mm.unload_all_models()
    gc.collect()


@pytest.mark.parametrize("layout", ck_layout_params(["fp8_e4m3", "int8_tensorwise", "nvfp4"]))
def test_lora_on_quantized_weights_lands_in_the_slot_with_its_new_scale(layout):
    model = load()
    originals = _quantize_layers(model, layout)
    lora = model.clone()
    expected = {}
    for i, (layer, w) in enumerate(originals.items()):
        key = f"diffusion_model.{layer}.weight"
        up, down = _factors(w, 40 + i)
        assert lora.add_patches({key: _lora_adapter(up, down)}, STRENGTH) == [key]
        expected[layer] = _expected(w, up, down, key)
    for layer in STREAMED:  # the LoRA changes the scale too, so a stale scale cannot pass unseen
        new, old = expected[layer], originals[layer]
        assert not all(torch.equal(a, b) for a, b in zip(inner_tensors(new).values(), inner_tensors(old).values()))
        assert not torch.equal(inner_tensors(new)["_param_scale"], inner_tensors(old)["_param_scale"]), layer

    swapped = swap(lora, 4)
    dm = model.model.diffusion_model
    seen = {}

    def record(mod, args, layer):
        engine = _ENGINES[dm]
        slots = [(s.data_ptr(), s.data_ptr() + s.numel()) for s in engine._slots]
        inner = inner_tensors(mod.weight)
        in_slot = all(any(lo <= t.data_ptr() < hi for lo, hi in slots) for t in inner.values())
        seen.setdefault(layer, []).append((in_slot, {k: v.clone() for k, v in inner.items()}))

    hooks = [dm.get_submodule(layer).register_forward_pre_hook(lambda m, a, n=layer: record(m, a, n))
             for layer in STREAMED]
    try:
        out = sample(swapped, steps=2)
    finally:
        for h in hooks:
            h.remove()
    # one forward per step (the stand-in's sampler batches cond and uncond), each from the slot
    assert {layer: len(calls) for layer, calls in seen.items()} == {layer: 2 for layer in STREAMED}
    for layer, calls in seen.items():
        want = inner_tensors(expected[layer])
        for in_slot, got in calls:
            assert in_slot, f"{layer} did not compute from its slot"
            assert got.keys() == want.keys()
            for k in want:
                assert torch.equal(got[k], want[k]), f"{layer}.{k} in the slot is not the patched one"

    # the reference: the same model with the requantized weights resident, no LoRA, no swap
    mm.unload_all_models()
    ref_model = load()
    _quantize_layers(ref_model, layout)
    ref_dm = ref_model.model.diffusion_model
    for layer, qt in expected.items():
        ref_dm.get_submodule(layer).weight = nn.Parameter(qt, requires_grad=False)
    reference = sample(ref_model, steps=2)
    assert torch.equal(out, reference), f"max diff {(out - reference).abs().max().item()}"
