"""vram_budget on the nodes with plans that stream some blocks, not none (test_budget_node.py's tiny
model fits every card preset, so there the plan is always 0).

The only thing a node takes from the GPU for ``auto`` is the free memory (``nodes.free_device_bytes``);
the test stands in for the card by returning a budget computed here by hand (tests/by_hand.py), from
the model's block shapes, its other weights, the documented activation estimate and the reserve, for a
chosen number of streamed blocks: the node must stream exactly the last that many, one more when the budget is one byte
smaller, every block (with a warning) when nothing fits. Stand-in and real ComfyUI (COMFYUI_PATH).
"""

import pytest


from wan22_blockswap import nodes
from wan22_blockswap.budget import AUTO_480P, DEFAULT_RESERVE
from wan22_blockswap.nodes import WAN22BlockSwap, WAN22BlockSwapLooperModels, WAN22BlockSwapSequencer
from by_hand import ring_slots, stored_bytes, wan_activation_bytes
from test_node import load, sample

ARGS = dict(offload_txt_emb=False, offload_img_emb=False, use_non_blocking=True, vace_blocks_to_swap=0,
            block_swap_debug=False)


pytestmark = pytest.mark.usefixtures("unload_models_after")  # conftest.py


def budget_for(patcher, streamed: int, prefetch: int) -> int:
    """Free bytes at which streaming the last ``streamed`` blocks just fits (480p, 81 frames)."""
    m = patcher.model.diffusion_model  # the input model: no stand-ins, plain weights
    sizes = [stored_bytes(b) for b in m.blocks]
    n = len(sizes)
    other = sum(p.numel() * p.element_size() for name, p in m.named_parameters() if not name.startswith("blocks."))
    b0 = m.blocks[0]
    # 832x480x81 through the 8x VAE and 1x2x2 patches: 21 x 30 x 52 tokens
    activations = wan_activation_bytes(dim=b0.self_attn.q.weight.shape[0], ffn_dim=b0.ffn[0].weight.shape[0],
                                       num_heads=b0.self_attn.num_heads, tokens=21 * 30 * 52)
    ring = ring_slots(prefetch, streamed) * max(sizes[n - streamed:], default=0)
    return other + activations + DEFAULT_RESERVE + sum(sizes[:n - streamed]) + ring


def streamed_blocks(patcher):
    return sorted(int(name.split(".")[2]) for name in patcher.object_patches
                  if name.startswith("diffusion_model.blocks."))


def _free(monkeypatch, nbytes):
    monkeypatch.setattr(nodes, "free_device_bytes", lambda patcher: nbytes)


# With equal blocks, streaming k costs (n - k + K) blocks (K = ring slots = prefetch + 1): fewer than
# nothing streamed only for k > K, so those are the counts a budget can ask for.
@pytest.mark.parametrize("prefetch,want", [(1, 3), (1, 5), (1, 7), (2, 4), (2, 6)])
def test_auto_streams_the_planned_last_blocks(monkeypatch, want, prefetch):
    model = load()
    budget = budget_for(model, want, prefetch)
    assert budget < budget_for(model, want - 1, prefetch)  # so ``want`` is the fewest that fit
    _free(monkeypatch, budget)
    out = WAN22BlockSwap().apply(model, blocks_to_swap=0, prefetch_blocks=prefetch, **ARGS,
                                 vram_budget=AUTO_480P, unique_id="5")[0]
    assert streamed_blocks(out) == list(range(8 - want, 8))
    _free(monkeypatch, budget - 1)  # one byte short: one more block streams
    tighter = WAN22BlockSwap().apply(model, blocks_to_swap=0, prefetch_blocks=prefetch, **ARGS,
                                     vram_budget=AUTO_480P, unique_id="5")[0]
    assert streamed_blocks(tighter) == list(range(8 - want - 1, 8))
    if (prefetch, want) == (1, 5):  # and the planned clone samples as the model does
        assert sample(out).equal(sample(model))


def test_nothing_fits_streams_every_block_and_warns(monkeypatch, caplog):
    model = load()
    _free(monkeypatch, budget_for(model, 8, 1) - 1)
    with caplog.at_level("WARNING"):
        out = WAN22BlockSwap().apply(model, blocks_to_swap=0, prefetch_blocks=1, **ARGS,
                                     vram_budget=AUTO_480P, unique_id="5")[0]
    assert streamed_blocks(out) == list(range(8))
    assert any("too small even with all 8 blocks swapped" in r.getMessage() for r in caplog.records)


def test_looper_models_and_sequencer_apply_the_plan_to_every_model(monkeypatch):
    high, low = load(seed=0), load(seed=1)
    _free(monkeypatch, budget_for(high, 4, 1))
    h, lo = WAN22BlockSwapLooperModels().apply(high, low, prefetch_blocks=1, blocks_to_swap=0, **ARGS,
                                                vram_budget=AUTO_480P)
    assert streamed_blocks(h) == streamed_blocks(lo) == [4, 5, 6, 7]
    seq = [(None, None, None), (high, low, None)]
    out = WAN22BlockSwapSequencer().apply(seq, prefetch_blocks=1, blocks_to_swap=0, **ARGS, vram_budget=AUTO_480P)[0]
    assert out[0] == (None, None, None)
    assert streamed_blocks(out[1][0]) == streamed_blocks(out[1][1]) == [4, 5, 6, 7]
