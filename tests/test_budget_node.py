"""The vram_budget input of the swap nodes (the planner itself: test_budget.py)."""

import pytest


from wan22_blockswap.budget import AUTO_CHOICES, auto_blocks_for
from wan22_blockswap.nodes import NODE_CLASS_MAPPINGS, WAN22BlockSwap

from test_node import load, sample

SWAP_ARGS = dict(offload_txt_emb=False, offload_img_emb=False, use_non_blocking=True, vace_blocks_to_swap=0,
                 prefetch_blocks=1, block_swap_debug=False)


pytestmark = pytest.mark.usefixtures("unload_models_after")  # conftest.py


def test_budget_input_is_optional_on_every_swap_node():
    for node_id in ("wan22BlockSwap", "wan22BlockSwapLooperModels", "wan22BlockSwapSequencer",
                    "WAN22BlockSwapLooper", "wan22BlockSwapLooper", "WAN22BlockSwapLoader"):
        types = NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()
        assert "vram_budget" not in types["required"]  # saved graphs without it still validate
        typ, opts = types["optional"]["vram_budget"]  # a V3 combo: ("COMBO", {"options": [...], ...})
        assert typ == "COMBO" and tuple(opts["options"]) == AUTO_CHOICES
        assert opts["default"] == "off" and opts["tooltip"]


def test_preset_replaces_blocks_to_swap_and_explains(monkeypatch):
    model = load()
    plan = auto_blocks_for(model.model.diffusion_model, "8 GB / 480p", None)
    out = WAN22BlockSwap().apply(model, blocks_to_swap=8, **SWAP_ARGS, vram_budget="8 GB / 480p", unique_id="5")[0]
    streamed = sum(1 for name in out.object_patches if name.startswith("diffusion_model.blocks."))
    assert streamed == plan.blocks_to_swap == 0  # a tiny model fits any card: nothing to swap
    assert sample(out).equal(sample(model))
    off = WAN22BlockSwap().apply(model, blocks_to_swap=8, **SWAP_ARGS, vram_budget="off", unique_id="5")[0]
    assert sum(1 for name in off.object_patches if name.startswith("diffusion_model.blocks.")) == 8


def test_auto_without_a_gpu_is_a_clear_error():
    model = load()
    if model.load_device.type == "cuda":
        pytest.skip("a GPU is present: auto has free memory to plan with")
    with pytest.raises(ValueError, match="vram_budget 'auto .*preset|blocks_to_swap"):
        WAN22BlockSwap().apply(model, blocks_to_swap=8, **SWAP_ARGS, vram_budget="auto (free VRAM, 480p)")


def test_sequencer_plans_with_the_first_model():
    from wan22_blockswap.nodes import WAN22BlockSwapSequencer

    model = load()
    seq = [(None, None, None), (model, model, None)]
    out = WAN22BlockSwapSequencer().apply(seq, blocks_to_swap=8, **SWAP_ARGS, vram_budget="24 GB / 480p")[0]
    prepared = out[1][0]
    assert not any(name.startswith("diffusion_model.blocks.") for name in prepared.object_patches)  # fits: 0
    if model.load_device.type != "cuda":  # auto plans from free GPU memory: none on a CPU
        with pytest.raises(ValueError, match="vram_budget"):
            WAN22BlockSwapSequencer().apply(seq, blocks_to_swap=8, **SWAP_ARGS, vram_budget="auto (free VRAM, 720p)")
