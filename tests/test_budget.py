"""Auto budget: layout dims, size and activation estimates, the planner, presets."""
import dataclasses
import logging

import pytest
import torch
from torch import nn

from wan22_blockswap import budget as B
from wan22_blockswap.block_manager import BlockSwapEngine
from wan22_blockswap.config import BlockSwapError, SwapSettings
from by_hand import ring_slots, stored_bytes, wan_activation_bytes
from conftest import comfy_layout_model, run_model

GiB = B.GiB
REF = B.REFERENCE_MODELS
Q4_K = B.BYTES_PER_PARAM["q4_k"]


def plan_reference(name, bytes_per_param, preset, prefetch=1):
    """Plan a published layout at a preset from estimated sizes (no model at hand)."""
    dims, p = REF[name], B.PRESETS[preset]
    return B.plan_auto_blocks(
        block_bytes=[B.block_bytes_estimate(dims, bytes_per_param)] * dims.num_blocks,
        resident_other_bytes=B.other_bytes_estimate(dims, bytes_per_param),
        budget_bytes=p.budget_bytes,
        activation_bytes=B.estimate_activation_bytes(dims, p.width, p.height, p.frames),
        prefetch_blocks=prefetch)


def need(sizes, k, other, act, reserve, prefetch):
    """Direct arithmetic: device bytes with the last k blocks streamed (the ring counted by hand)."""
    n = len(sizes)
    ring = ring_slots(prefetch, k) * max(sizes[n - k:], default=0)
    return other + sum(sizes[:n - k]) + ring + act + reserve


# ---------------------------------------------------------------- dims from a module

@pytest.mark.parametrize("variant,expect", [
    ("t2v", dict(in_dim=16, out_dim=16, vae_stride=(4, 8, 8), num_vace_blocks=0, img_cross_attn=False)),
    ("i2v", dict(in_dim=36, out_dim=16, vae_stride=(4, 8, 8), num_vace_blocks=0, img_cross_attn=True)),
    ("ti2v22", dict(in_dim=48, out_dim=48, vae_stride=(4, 16, 16), num_vace_blocks=0, img_cross_attn=False)),
    ("vace", dict(in_dim=16, out_dim=16, vae_stride=(4, 8, 8), num_vace_blocks=2, img_cross_attn=False)),
])
def test_dims_from_tiny_models(variant, expect):
    model, _ = comfy_layout_model(variant, num_layers=5, ffn_dim=384)  # not the tiny defaults
    d = B.ModelDims.from_module(model)
    assert (d.dim, d.ffn_dim, d.num_heads, d.num_blocks, d.patch_size) == (128, 384, 2, 5, (1, 2, 2))
    assert (d.text_dim, d.freq_dim, d.head_dim) == (64, 256, 64)
    for key, value in expect.items():
        assert getattr(d, key) == value, key


def test_dims_read_the_logical_shape_of_quantized_weights():
    from gguf_like import Q8, FakeGGMLTensor  # ComfyUI-GGUF stand-in: raw bytes + tensor_shape

    model, _ = comfy_layout_model("t2v")
    ffn0 = model.blocks[0].ffn[0]
    raw = torch.zeros(ffn0.weight.numel() + 7, dtype=torch.uint8)  # flat bytes: .size() says nothing
    ffn0.weight = FakeGGMLTensor.parameter(raw, Q8, tuple(ffn0.weight.shape))
    assert B.ModelDims.from_module(model).ffn_dim == 256


def test_dims_refuse_a_module_without_blocks():
    with pytest.raises(BlockSwapError, match="blocks"):
        B.ModelDims.from_module(nn.Linear(4, 4))


# ---------------------------------------------------------------- size estimates

@pytest.mark.parametrize("variant", ["t2v", "i2v", "ti2v22", "vace"])
def test_size_estimates_count_every_parameter_of_tiny_models(variant):
    model, _ = comfy_layout_model(variant, dtype=torch.float32)
    d = B.ModelDims.from_module(model)
    block = sum(p.numel() * 4 for p in model.blocks[0].parameters())
    other = sum(p.numel() * 4 for n, p in model.named_parameters() if not n.startswith("blocks."))
    assert B.block_bytes_estimate(d, 4) == block
    assert B.other_bytes_estimate(d, 4) == other
    bf16, _ = comfy_layout_model(variant, dtype=torch.bfloat16)
    assert B.block_bytes_estimate(d, 2) == sum(p.numel() * 2 for p in bf16.blocks[0].parameters())


def test_reference_block_sizes_match_the_published_figures():
    # 14B block: 8 * 5120^2 attention + 2 * 5120 * 13824 FFN = 351.3M weights (+ 0.1M small ones)
    b14 = REF["wan2.1-t2v-14b"]
    assert B.block_bytes_estimate(b14, 2) == pytest.approx(0.703e9, rel=2e-3)
    assert B.block_bytes_estimate(b14, 1) == pytest.approx(0.352e9, rel=2e-3)
    assert B.block_bytes_estimate(b14, Q4_K) == pytest.approx(0.198e9, rel=5e-3)
    assert B.block_bytes_estimate(b14, B.BYTES_PER_PARAM["q8_0"]) == pytest.approx(0.373e9, rel=5e-3)
    # 2.1 i2v adds k_img/v_img (2 * 5120^2 bf16 = 104.9 MB); 2.2's A14B i2v does not
    extra = B.block_bytes_estimate(REF["wan2.1-i2v-14b"], 2) - B.block_bytes_estimate(b14, 2)
    assert extra == pytest.approx(2 * 5120 ** 2 * 2, rel=1e-3)
    assert B.block_bytes_estimate(REF["wan2.2-i2v-a14b"], 2) == B.block_bytes_estimate(b14, 2)
    # 1.3B: 8 * 1536^2 + 2 * 1536 * 8960 = 46.4M weights
    assert B.block_bytes_estimate(REF["wan2.1-t2v-1.3b"], 2) == pytest.approx(92.9e6, rel=2e-3)


# ---------------------------------------------------------------- tokens and activations

def test_latent_tokens():
    # 14B at 832x480x81: latent 21 x 60 x 104, patches 1x2x2 -> 21 * 30 * 52
    assert B.latent_tokens(REF["wan2.1-t2v-14b"], 832, 480, 81) == 32760
    # 5B at its native 1280x704x121 with the 16x VAE: latent (121-1)//4+1 = 31 frames,
    # 704/16 = 44 rows, 1280/16 = 80 columns; patches 2x2 -> 31 * 22 * 40 = 27280 tokens
    assert B.latent_tokens(REF["wan2.2-ti2v-5b"], 1280, 704, 121) == 27280
    # the same video through the 8x VAE would be 4x the tokens
    assert B.latent_tokens(REF["wan2.1-t2v-1.3b"], 1280, 704, 121) == 31 * 44 * 80
    # 720 / 16 = 45 latent rows: padded to 23 patch rows, as ComfyUI pads
    assert B.latent_tokens(REF["wan2.2-ti2v-5b"], 1280, 720, 81) == 21 * 23 * 40
    with pytest.raises(ValueError):
        B.latent_tokens(REF["wan2.1-t2v-14b"], 832, 480, 0)


def test_activation_estimate_formula_and_scaling():
    d = REF["wan2.1-t2v-14b"]
    tokens = 32760
    # 14B: the self-attention peak (8 dim-wide copies) beats the FFN (2 * 5120 + 2 * 13824 < 8 * 5120)
    hidden = tokens * B.ATTN_LIVE_HIDDEN * 5120 * 2
    rope = tokens * 128 * 8
    context = B.CONTEXT_LIVE_COPIES * 512 * 5120 * 2
    expected = int(B.ACTIVATION_SAFETY * (hidden + rope + context)) + B.ACTIVATION_FIXED_BYTES
    assert B.estimate_activation_bytes(d, 832, 480, 81) == expected
    # 1.3B: the FFN peak wins (2 * 1536 + 2 * 8960 > 8 * 1536)
    small = REF["wan2.1-t2v-1.3b"]
    per_token = (B.FFN_LIVE_HIDDEN * 1536 + B.FFN_LIVE_INTERMEDIATE * 8960) * 2
    got = B.estimate_activation_bytes(small, 832, 480, 81) - B.ACTIVATION_FIXED_BYTES
    assert got == pytest.approx(B.ACTIVATION_SAFETY * tokens * per_token, rel=0.03)
    # more pixels, frames, batch or a wider dtype never cost less; 720p costs ~2.3x 480p
    a480 = B.estimate_activation_bytes(d, 832, 480, 81)
    a720 = B.estimate_activation_bytes(d, 1280, 720, 81)
    assert 2.0 < (a720 - B.ACTIVATION_FIXED_BYTES) / (a480 - B.ACTIVATION_FIXED_BYTES) < 2.5
    assert B.estimate_activation_bytes(d, 832, 480, 121) > a480
    assert B.estimate_activation_bytes(d, 832, 480, 81, batch=2) > 1.9 * (a480 - B.ACTIVATION_FIXED_BYTES)
    assert B.estimate_activation_bytes(d, 832, 480, 81, dtype_bytes=4) > a480
    # VACE keeps two more streams; CLIP tokens lengthen the context
    vace = dataclasses.replace(d, num_vace_blocks=8)
    assert B.estimate_activation_bytes(vace, 832, 480, 81) > a480
    assert B.estimate_activation_bytes(REF["wan2.1-i2v-14b"], 832, 480, 81) > a480


def test_comfyui_estimate_is_reproduced_and_compared():
    # ComfyUI: latent voxels * 2 bytes * 0.01 MiB * dim / 2222 -> 21*60*104 voxels for the 14B at 480p
    d14, d13 = REF["wan2.1-t2v-14b"], REF["wan2.1-t2v-1.3b"]
    assert B.comfyui_memory_required(d14, 832, 480, 81) == int(21 * 60 * 104 * 2 * 0.01 * 5120 / 2222 * 2 ** 20)
    # as the docstring says: ComfyUI's figure is the larger for the 14B, ours for the 1.3B
    assert B.comfyui_memory_required(d14, 832, 480, 81) > B.estimate_activation_bytes(d14, 832, 480, 81)
    assert B.comfyui_memory_required(d13, 832, 480, 81) < B.estimate_activation_bytes(d13, 832, 480, 81)


# ---------------------------------------------------------------- presets and choices

def test_presets_and_choices():
    names = ["8 GB / 480p", "8 GB / 720p", "12 GB / 480p", "12 GB / 720p",
             "16 GB / 480p", "16 GB / 720p", "24 GB / 480p", "24 GB / 720p"]
    assert list(B.PRESETS) == names
    assert B.AUTO_CHOICES == ("off", "auto (free VRAM, 480p)", "auto (free VRAM, 720p)", *names, "adaptive")
    assert B.resolve_budget("adaptive", 5 * GiB) == (5 * GiB, 832, 480, 81)  # starts where auto (480p) would
    assert B.PRESETS["12 GB / 720p"] == B.Preset(12, 1280, 720, 81)
    assert B.PRESETS["8 GB / 480p"] == B.Preset(8, 832, 480, 81)
    assert B.resolve_budget("16 GB / 480p", None) == (16 * GiB - B.PRESET_UNUSABLE_BYTES, 832, 480, 81)
    assert B.resolve_budget("off", None) is None
    assert B.resolve_budget("auto (free VRAM, 720p)", 10 * GiB) == (10 * GiB, 1280, 720, 81)
    assert B.resolve_budget("auto (free VRAM, 480p)", 3 * GiB).budget_bytes == 3 * GiB
    with pytest.raises(ValueError, match="no.*CUDA|CUDA.*none"):
        B.resolve_budget("auto (free VRAM, 480p)", None)
    with pytest.raises(ValueError, match="12 GB / 480p"):
        B.resolve_budget("20 GB / 480p", None)


# ---------------------------------------------------------------- the planner on published layouts

def test_14b_bf16_swaps_most_on_8gb_and_fewer_on_24gb():
    small, big = plan_reference("wan2.1-t2v-14b", 2, "8 GB / 480p"), plan_reference("wan2.1-t2v-14b", 2, "24 GB / 480p")
    assert small.fits and big.fits
    assert 35 <= small.blocks_to_swap < 40
    assert 0 < big.blocks_to_swap < small.blocks_to_swap
    # fp8 halves the blocks: a 24 GB card keeps the whole 14B at 480p; Q4 needs fewer swaps than fp8
    assert plan_reference("wan2.1-t2v-14b", 1, "24 GB / 480p").blocks_to_swap == 0
    q4, fp8 = plan_reference("wan2.1-t2v-14b", Q4_K, "12 GB / 480p"), plan_reference("wan2.1-t2v-14b", 1, "12 GB / 480p")
    assert q4.blocks_to_swap < fp8.blocks_to_swap < plan_reference("wan2.1-t2v-14b", 2, "12 GB / 480p").blocks_to_swap
    # 720p needs more swapping than 480p on the same card
    assert plan_reference("wan2.1-t2v-14b", 1, "16 GB / 720p").blocks_to_swap > \
        plan_reference("wan2.1-t2v-14b", 1, "16 GB / 480p").blocks_to_swap


def test_13b_fits_a_12gb_card_without_swapping():
    c = plan_reference("wan2.1-t2v-1.3b", 2, "12 GB / 480p")
    assert (c.blocks_to_swap, c.fits, c.ring_bytes) == (0, True, 0)
    assert c.resident_bytes == B.other_bytes_estimate(REF["wan2.1-t2v-1.3b"], 2) + \
        30 * B.block_bytes_estimate(REF["wan2.1-t2v-1.3b"], 2)


def test_5b_swaps_on_8gb_at_720p_only():
    assert plan_reference("wan2.2-ti2v-5b", 2, "16 GB / 720p").blocks_to_swap == 0
    c = plan_reference("wan2.2-ti2v-5b", 2, "8 GB / 720p")
    assert c.fits and 0 < c.blocks_to_swap < 30


def test_a14b_experts_are_planned_each_like_a_14b():
    # two experts with the 14B dims, run one after the other: each gets the 14B's plan
    for preset in ("12 GB / 480p", "24 GB / 720p"):
        t2v = plan_reference("wan2.2-t2v-a14b", 1, preset)
        assert t2v == plan_reference("wan2.1-t2v-14b", 1, preset)
        # the 2.2 i2v expert lacks 2.1's CLIP projections: never more swapping than 2.1 i2v
        assert plan_reference("wan2.2-i2v-a14b", 1, preset).blocks_to_swap <= \
            plan_reference("wan2.1-i2v-14b", 1, preset).blocks_to_swap
    assert plan_reference("wan2.2-i2v-a14b", 2, "16 GB / 480p").blocks_to_swap < \
        plan_reference("wan2.1-i2v-14b", 2, "16 GB / 480p").blocks_to_swap


@pytest.mark.parametrize("name,bpp", [("wan2.1-t2v-1.3b", 2), ("wan2.2-ti2v-5b", 2),
                                      ("wan2.1-t2v-14b", 2), ("wan2.1-t2v-14b", Q4_K),
                                      ("wan2.2-i2v-a14b", 1)])
@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_more_budget_never_swaps_more_and_the_choice_is_minimal(name, bpp, prefetch):
    dims = REF[name]
    sizes = [B.block_bytes_estimate(dims, bpp)] * dims.num_blocks
    other, act = B.other_bytes_estimate(dims, bpp), B.estimate_activation_bytes(dims, 1280, 720, 81)
    prev = None
    for budget in range(0, 32 * GiB, 96 * 2 ** 20):
        c = B.plan_auto_blocks(block_bytes=sizes, resident_other_bytes=other, budget_bytes=budget,
                               activation_bytes=act, prefetch_blocks=prefetch)
        k = c.blocks_to_swap
        assert c.fits == (need(sizes, k, other, act, B.DEFAULT_RESERVE, prefetch) <= budget)
        assert c.required_bytes == need(sizes, k, other, act, B.DEFAULT_RESERVE, prefetch)
        assert all(need(sizes, j, other, act, B.DEFAULT_RESERVE, prefetch) > budget for j in range(k))
        if prev is not None:
            assert k <= prev.blocks_to_swap and (c.fits or not prev.fits)
        prev = c
    if (name, bpp) != ("wan2.1-t2v-14b", 2):  # 26 GiB of bf16 14B blocks + 9 GiB at 720p: not in 32
        assert prev.blocks_to_swap == 0


def test_infeasible_budget_swaps_all_and_says_what_to_do():
    c = plan_reference("wan2.1-t2v-14b", 2, "8 GB / 720p")
    assert (c.blocks_to_swap, c.fits) == (40, False)
    assert c.required_bytes > c.budget_bytes
    assert "all 40 blocks" in c.explanation and "resolution" in c.explanation
    assert "quantization" in c.explanation and "VRAM" in c.explanation
    assert f"{c.activation_bytes / GiB:.2f} GiB activations" in c.explanation


def test_ring_is_counted_only_when_blocks_stream():
    kw = dict(block_bytes=[100] * 4, resident_other_bytes=10, activation_bytes=20, reserve_bytes=0)
    none = B.plan_auto_blocks(budget_bytes=430, **kw)  # everything resident: 400 + 30
    assert (none.blocks_to_swap, none.ring_bytes, none.fits) == (0, 0, True)
    # one byte less: streaming 1 or 2 blocks saves what their ring slots cost (1 slot for a single
    # streamed block, 2 from then on), so only 3 streamed blocks fit: 100 + 2 * 100 + 30
    c = B.plan_auto_blocks(budget_bytes=429, **kw)
    assert (c.blocks_to_swap, c.ring_bytes, c.resident_bytes) == (3, 200, 110)
    # a deeper prefetch (3 slots) makes 3 streamed blocks cost 100 + 300 + 30: all 4 must stream
    c = B.plan_auto_blocks(budget_bytes=429, prefetch_blocks=2, **kw)
    assert (c.blocks_to_swap, c.ring_bytes, c.fits) == (4, 300, True)
    # the slots are as large as the largest streamed block
    c = B.plan_auto_blocks(block_bytes=[10, 10, 10, 50], resident_other_bytes=0, budget_bytes=100,
                           activation_bytes=0, reserve_bytes=0)
    assert c.blocks_to_swap == 0
    c = B.plan_auto_blocks(block_bytes=[10, 10, 10, 50], resident_other_bytes=0, budget_bytes=79,
                           activation_bytes=0, reserve_bytes=0)
    assert (c.blocks_to_swap, c.fits, c.ring_bytes) == (4, False, 100)


def test_explanation_states_the_numbers():
    half = GiB // 2
    c = B.plan_auto_blocks(block_bytes=[half] * 40, resident_other_bytes=GiB, budget_bytes=16 * GiB,
                           activation_bytes=3 * GiB, prefetch_blocks=1, reserve_bytes=half)
    # 16 - 1 - 2 x 0.5 - 3 - 0.5 = 10.5 GiB: 21 resident blocks of 0.5 GiB
    assert (c.blocks_to_swap, c.fits) == (19, True)
    assert c.explanation == ("auto: 16.00 GiB budget - 1.00 GiB other weights, 2 x 0.50 GiB ring, "
                             "3.00 GiB activations, 0.50 GiB reserve leaves 10.50 GiB: 21 of 40 blocks "
                             "stay resident (10.50 GiB), swapping the last 19")
    assert "\n" not in c.explanation


def test_planner_rejects_bad_input():
    with pytest.raises(BlockSwapError):
        B.plan_auto_blocks(block_bytes=[], resident_other_bytes=0, budget_bytes=1, activation_bytes=0)
    with pytest.raises(BlockSwapError, match="budget_bytes"):
        B.plan_auto_blocks(block_bytes=[1], resident_other_bytes=0, budget_bytes=-1, activation_bytes=0)
    with pytest.raises(BlockSwapError, match="prefetch_blocks"):
        B.plan_auto_blocks(block_bytes=[1], resident_other_bytes=0, budget_bytes=1, activation_bytes=0,
                           prefetch_blocks=-1)


# ---------------------------------------------------------------- measured sizes of a real model

def test_auto_plan_on_a_tiny_model_matches_arithmetic_and_the_engine(caplog):
    model, inputs = comfy_layout_model("t2v", dtype=torch.float32)
    sizes = [stored_bytes(b) for b in model.blocks]  # by hand: every tensor at 256-byte steps
    assert len(set(sizes)) == 1
    other = sum(p.numel() * 4 for n, p in model.named_parameters() if not n.startswith("blocks."))
    b0 = model.blocks[0]
    # 832x480x81 through the 8x VAE and 1x2x2 patches: 21 x 30 x 52 tokens
    act = wan_activation_bytes(dim=b0.self_attn.q.weight.shape[0], ffn_dim=b0.ffn[0].weight.shape[0],
                               num_heads=b0.self_attn.num_heads, tokens=21 * 30 * 52)
    # room for 3 resident blocks and the 2-slot ring: the last 5 of 8 stream
    free = other + act + B.DEFAULT_RESERVE + 3 * sizes[0] + 2 * sizes[0]
    with caplog.at_level(logging.INFO, logger="wan22_blockswap"):
        c = B.auto_blocks_for(model, "auto (free VRAM, 480p)", free)
    assert (c.blocks_to_swap, c.fits, c.ring_bytes, c.activation_bytes) == (5, True, 2 * sizes[0], act)
    assert c.resident_bytes == other + 3 * sizes[0]
    assert c.explanation.startswith("auto (free VRAM, 480p) (832x480x81): ")
    assert c.explanation in caplog.text
    assert B.auto_blocks_for(model, "auto (free VRAM, 480p)", free - 1).blocks_to_swap == 6
    assert B.auto_blocks_for(model, "off", None) is None
    # the engine's ring for that plan is exactly what the planner counted
    engine = BlockSwapEngine.from_settings(model, SwapSettings(blocks_to_swap=c.blocks_to_swap), "cpu").setup()
    try:
        with torch.no_grad():
            run_model(model, inputs)
        assert engine.tracker.slots * engine.tracker.slot_bytes == c.ring_bytes
    finally:
        engine.teardown()
