"""Swap planning: which blocks stream, ring size, validation of settings."""
import pytest
import torch

from wan22_blockswap.config import (BlockSwapError, ModelLayout, SwapSettings, choose_blocks,
                                    detect_layout, plan_swap, ring_size)
from conftest import comfy_layout_model, diffusers_layout_model


def test_last_placement_takes_the_tail():
    assert choose_blocks(40, 10, "last") == tuple(range(30, 40))
    assert choose_blocks(30, 0, "last") == ()
    assert choose_blocks(30, 30, "last") == tuple(range(30))


@pytest.mark.parametrize("num,count", [(40, 10), (40, 13), (30, 29), (30, 1), (8, 8), (8, 3)])
def test_even_placement_is_spread_and_distinct(num, count):
    idx = choose_blocks(num, count, "even")
    assert len(set(idx)) == count == len(idx)
    assert all(0 <= i < num for i in idx)
    assert list(idx) == sorted(idx)
    if count > 1:  # gaps differ by at most one block
        gaps = [b - a for a, b in zip(idx, idx[1:])]
        assert max(gaps) - min(gaps) <= 1


def test_ring_size_rules():
    assert ring_size(0, 10) == 2 and ring_size(1, 10) == 2 and ring_size(2, 10) == 3
    assert ring_size(5, 3) == 3  # never more slots than streamed units
    assert ring_size(1, 1) == 1 and ring_size(0, 1) == 1 and ring_size(3, 2) == 2  # ... even below 2
    assert ring_size(1, 0) == 0


def test_layout_detection_both_implementations():
    comfy, _ = comfy_layout_model("i2v")
    lay = detect_layout(comfy)
    assert (lay.implementation, lay.num_blocks, lay.text_embedding, lay.image_embedding) == \
        ("comfyui", 8, "text_embedding", "img_emb")
    vace, _ = comfy_layout_model("vace")
    assert detect_layout(vace).num_vace_blocks == 2
    diff, _ = diffusers_layout_model()
    lay = detect_layout(diff)
    assert (lay.implementation, lay.num_blocks, lay.text_embedding, lay.image_embedding) == \
        ("diffusers", 6, "condition_embedder.text_embedder", None)


def test_plan_units_in_expected_order():
    model, _ = comfy_layout_model("vace")
    plan = plan_swap(detect_layout(model), SwapSettings(blocks_to_swap=3, vace_blocks_to_swap=1,
                                                        offload_txt_emb=True, prefetch_blocks=2))
    assert plan.units == ("text_embedding", "blocks.5", "blocks.6", "blocks.7", "vace_blocks.1")
    assert plan.slots == 3 and plan.resident_blocks == (0, 1, 2, 3, 4)


@pytest.mark.parametrize("settings,fragment", [
    (SwapSettings(blocks_to_swap=9), "outside 0..8"),
    (SwapSettings(blocks_to_swap=-1), "outside 0..8"),
    (SwapSettings(prefetch_blocks=-1), "prefetch_blocks=-1"),
    (SwapSettings(vace_blocks_to_swap=1), "outside 0..0"),
    (SwapSettings(placement="middle"), "placement 'middle'"),
    (SwapSettings(pin_budget_bytes=-5), "pin_budget_bytes"),
])
def test_bad_settings_name_value_and_range(settings, fragment):
    with pytest.raises(BlockSwapError, match=fragment.replace(".", r"\.").replace("(", r"\(")):
        plan_swap(ModelLayout("generic", 8), settings)


def test_model_without_blocks_is_rejected():
    with pytest.raises(BlockSwapError, match="no 'blocks' ModuleList"):
        detect_layout(torch.nn.Linear(4, 4))
