"""The weight adapters ComfyUI holds are never changed by patching in the slot.

For a streamed block the pack rebuilds each LoRA adapter around the slot copies of its factors
(``slot_patches.with_tensors``). The rebuilt adapter must be a copy: ComfyUI's patch lists are
shared by every clone of a patcher (``clone()`` copies the lists, not the adapters), so an adapter
edited in place would make every other clone, the model without swap and a later run compute with
slot memory that another block has since overwritten. Stand-in and real ComfyUI (COMFYUI_PATH).
"""

import pytest
import torch


from test_node import load, sample, swap

# One LoRA per streamed block of swap(..., 4) (blocks 4-7), the same layer in each so that the slot
# a block leaves holds another block's factors at the same place, and one on a resident block.
LAYERS = ("blocks.4.ffn.0", "blocks.5.ffn.0", "blocks.6.ffn.0", "blocks.7.ffn.0", "blocks.1.ffn.0")


def _lora_adapter(up, down, alpha):
    try:
        from comfy.weight_adapter import LoRAAdapter  # ComfyUI
    except ImportError:
        from comfy.lora import LoRAAdapter  # the stand-in keeps it in comfy.lora
    return LoRAAdapter(set(), (up, down, alpha, None, None, None))


pytestmark = pytest.mark.usefixtures("unload_models_after")  # conftest.py


def test_adapters_are_untouched_and_clones_sharing_them_stay_correct():
    model = load()
    base = model.clone()
    sd = base.model.state_dict()
    adapters = {}
    for i, layer in enumerate(LAYERS):
        key = f"diffusion_model.{layer}.weight"
        out_f, in_f = sd[key].shape
        g = torch.Generator().manual_seed(60 + i)
        adapters[key] = _lora_adapter(torch.randn(out_f, 4, generator=g) * 0.2,
                                      torch.randn(4, in_f, generator=g) * 0.2, 4.0)
    assert sorted(base.add_patches(adapters, 1.0)) == sorted(adapters)
    held = {key: (a.weights, list(a.weights), [t.clone() for t in a.weights[:2]]) for key, a in adapters.items()}

    reference = sample(base, steps=1)  # ComfyUI patches every key itself: no swap
    assert not torch.equal(reference, sample(model, steps=1))  # the LoRA matters

    # two clones of one LoRA'd model (they share its adapters), with different plans for the same blocks
    first, second = swap(base, 4), swap(base, 6, prefetch_blocks=2)
    outs = [sample(m, steps=1) for m in (first, second, first, base)]
    for i, out in enumerate(outs):
        assert torch.equal(out, reference), f"run {i}: max diff {(out - reference).abs().max().item()}"

    for key, a in adapters.items():
        weights, items, values = held[key]
        assert a.weights is weights, f"{key}: the adapter's weights were replaced"
        assert all(x is y for x, y in zip(a.weights, items)), f"{key}: a factor of the adapter was replaced"
        assert all(torch.equal(t, v) for t, v in zip(a.weights[:2], values)), f"{key}: a factor was written"
    for key, patches in base.patches.items():  # and the patch lists still hold those adapters
        assert [p[1] for p in patches] == [adapters[key]]
        assert all(p[1] is adapters[key] for p in patches)
