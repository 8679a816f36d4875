"""Models with as many blocks as real WAN (40: 14B and the A14B experts; the 1.3B and 5B have 30),
narrow so they stay fast.

Below 10 blocks no block's name is a prefix of another's (``blocks.1`` of ``blocks.10``), a learned
order is short and wraps after a few units, and ring and buffer sizes are the same whichever block
they were sized for: code that groups by block name, wraps the order or sizes buffers behaves alike
there whether it is right or wrong. Here, with the last 39 of 40 blocks streamed (so ``blocks.1``,
``blocks.2`` and ``blocks.3`` stream next to ``blocks.10``-``39``):

* the swap-at-load loader reads every streamed block's weights into a buffer of its own, key by key
  the block the key names, and the engine adopts it as that block's host copy; a LoRA on blocks 1,
  10 and 39 is applied to those blocks (in the slot) and to no other;
* the engine streams 39 blocks, 8 VACE blocks interleaved with them and the text embedding through a
  ring of 4 slots as large as the largest unit, in the order it learned, wrapping across forwards;
* the looper helpers prepare two 40-block experts that share one ring, stream from it in every call
  and give the same output as without swapping.

Stand-in and real ComfyUI (COMFYUI_PATH).
"""

import pytest
import torch


from wan22_blockswap import tiny_wan
from wan22_blockswap.block_manager import BlockSwapEngine
from wan22_blockswap.callbacks import _ENGINES
from wan22_blockswap.config import SwapSettings, unwrap
from conftest import comfy_layout_model, denoise
from test_looper import run_loops
from test_node import load, with_lora
from test_swap_inputs import (Watch, check_masters_read_at_load, check_streaming, execute, load_swapped,  # noqa: F401
                              model_dir, read_groups, run_swap_node, sample, streamed_patches, write_model)

LAYERS = 40
ALIGN = 256  # the alignment of each tensor in a host copy and a slot (host_masters.ALIGN)


pytestmark = pytest.mark.usefixtures("unload_models_after")  # conftest.py


def packed(module):
    return sum(-(-p.numel() * p.element_size() // ALIGN) * ALIGN for p in unwrap(module).parameters())


def test_engine_on_40_blocks_with_vace_streams_in_the_learned_order():
    cfg = dict(dim=64, ffn_dim=64, num_heads=2, num_layers=LAYERS, text_dim=64,
               vace_layers=tiny_wan.vace_layer_indices(LAYERS, 8))
    model, inputs = comfy_layout_model("vace", **cfg)
    reference = denoise(model, inputs, steps=3)
    settings = SwapSettings(blocks_to_swap=39, vace_blocks_to_swap=8, offload_txt_emb=True, prefetch_blocks=3)
    engine = BlockSwapEngine.from_settings(model, settings, "cpu").setup()
    units = {f"blocks.{i}" for i in range(1, LAYERS)} | {f"vace_blocks.{i}" for i in range(8)} | {"text_embedding"}
    assert set(engine.unit_names()) == units
    # the ring: prefetch + 1 slots, each as large as the largest unit (a VACE block, with its projections)
    largest = max(packed(model.get_submodule(n)) for n in units)
    assert largest > packed(model.blocks[39])
    assert [s.numel() for s in engine._slots] == [largest] * 4
    w = Watch(model, engine_of=lambda dm: engine)
    try:
        outs = denoise(model, inputs, steps=3)
    finally:
        w.close()
    engine.teardown()
    assert all(torch.equal(a, b) for a, b in zip(reference, outs))
    check_streaming(w, units, prefetch=3)
    # the plan's order (blocks, then VACE blocks) was wrong: VACE blocks run among the main blocks
    order = [c["name"] for c in w.calls if c["name"] in units and c["forward"] == 2]
    assert order.index("vace_blocks.7") < order.index("blocks.39")


def test_swap_at_load_loader_on_40_blocks_groups_each_block_by_its_own_name(model_dir, read_groups):
    s = dict(blocks_to_swap=39, offload_txt_emb=True, offload_img_emb=False, use_non_blocking=True,
             vace_blocks_to_swap=0, prefetch_blocks=1, block_swap_debug=False)
    swapped = load_swapped(model_dir, "t2v", s, layers=LAYERS)
    units = {f"blocks.{i}" for i in range(1, LAYERS)} | {"text_embedding"}
    assert streamed_patches(swapped) == units
    check_masters_read_at_load(swapped, units, read_groups)
    plain = execute("WANModelLoader", model_type="safetensors", safetensors_model=write_model(model_dir, "t2v", layers=LAYERS),
                    gguf_model="none", wan_version="auto", model_variant="auto", fp8_optimization="disabled",
                    weight_dtype="auto")[0]
    keys = ("blocks.1.ffn.0.weight", "blocks.10.self_attn.q.weight", "blocks.39.cross_attn.k.weight",
            "blocks.0.ffn.0.weight")
    reference = sample(with_lora(plain, keys=keys), steps=2)
    assert not torch.equal(reference, sample(plain, steps=2))  # the LoRA changes the output
    lora = with_lora(swapped, keys=keys)
    w = Watch(lora.model.diffusion_model)
    try:
        out = sample(lora, steps=2)
    finally:
        w.close()
    assert torch.equal(out, reference)
    check_streaming(w, units, prefetch=1)


def test_looper_helpers_on_two_40_block_experts():
    high, low = load(seed=0, layers=LAYERS), load(seed=1, layers=LAYERS)
    reference = run_loops(high, low, loops=1)
    s = dict(blocks_to_swap=39, offload_txt_emb=False, offload_img_emb=False, use_non_blocking=True,
             vace_blocks_to_swap=0, prefetch_blocks=2, block_swap_debug=False)
    ph, pl = run_swap_node("wan22BlockSwapSequencer", [high, low], **s)
    units = {f"blocks.{i}" for i in range(1, LAYERS)}
    assert streamed_patches(ph) == streamed_patches(pl) == units
    watches = [Watch(ph.model.diffusion_model), Watch(pl.model.diffusion_model)]
    try:
        out = run_loops(ph, pl, loops=1)
    finally:
        for w in watches:
            w.close()
    assert torch.equal(out[0], reference[0])
    for w in watches:
        check_streaming(w, units, prefetch=2)
    eh, el = _ENGINES[ph.model.diffusion_model], _ENGINES[pl.model.diffusion_model]
    assert eh.shared_ring is el.shared_ring is not None
    slot = packed(high.model.diffusion_model.blocks[39])
    assert eh.device_bytes == 0 and el.device_bytes == 3 * slot  # the idle expert holds no slot
