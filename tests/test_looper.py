"""WanVideoLooper pipelines: Looper Models, Sequencer, the legacy looper node, loop-aware helpers.

The driver reproduces WanVideoLooper's call pattern: the same two patchers every loop, a high-noise
sampler call (steps 0..k, leftover noise kept) then a low-noise call (k..end), another model loaded
between loops, the loop's output feeding the next loop.
"""

import pytest
import torch

import comfy.model_management as mm
import comfy.sample
from comfy.patcher_extension import CallbacksMP

from wan22_blockswap.callbacks import KEY, _ENGINES
from wan22_blockswap.config import unwrap
from wan22_blockswap.utils import validate_tensor_consistency
from wan22_blockswap.nodes import (WAN22BlockSwapLooper, WAN22BlockSwapLooperModels,
                                   WAN22BlockSwapSequencer)
from wan22_blockswap.utils import host_rss_bytes
from test_node import load, with_lora

SETTINGS = dict(blocks_to_swap=6, offload_txt_emb=False, offload_img_emb=False, use_non_blocking=True,
                vace_blocks_to_swap=0, prefetch_blocks=1, block_swap_debug=False)
STEPS, SWITCH = 4, 2


pytestmark = pytest.mark.usefixtures("unload_models_after")  # conftest.py


def _conds(seed):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 8, 4096, generator=g), {}]], [[torch.zeros(1, 8, 4096), {}]]


def run_loops(high, low, loops=10, other=None, on_loop=None):
    """WanVideoLooper's pattern; returns every loop's output."""
    latent = torch.zeros(1, 16, 2, 8, 8)
    outs = []
    for i in range(loops):
        pos, neg = _conds(i)
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1000 + i))
        x = comfy.sample.sample(high, noise, STEPS, 3.0, "euler", "simple", pos, neg, latent, seed=i,
                                start_step=0, last_step=SWITCH, force_full_denoise=False, disable_pbar=True)
        x = comfy.sample.sample(low, noise, STEPS, 3.0, "euler", "simple", pos, neg, x, seed=i,
                                disable_noise=True, start_step=SWITCH, last_step=10000,
                                force_full_denoise=True, disable_pbar=True)
        outs.append(x)
        latent = x * 0.5  # the next loop continues from this one
        if other is not None:  # VAE / CLIP vision / another model loaded between loops
            mm.load_models_gpu([other])
        if on_loop is not None:
            on_loop(i)
    return outs


def _slot_bytes(patcher, blocks):
    """Bytes a device slot needs for the largest of ``blocks``: its weights, then the tensors of its
    LoRA patches, each at 256-byte steps (the host copy's layout)."""
    def align(n):
        return -(-n // 256) * 256

    def tensors(x):
        if isinstance(x, torch.Tensor):
            return [x]
        return [t for v in x for t in tensors(v)] if isinstance(x, (list, tuple)) else []

    dm = patcher.model.diffusion_model
    sizes = []
    for i in blocks:
        weights = sum(align(torch.Tensor.numel(p) * torch.Tensor.element_size(p)) for p in unwrap(dm.blocks[i]).parameters())
        factors = sum(align(t.numel() * t.element_size()) for key, patches in patcher.patches.items()
                      if key.startswith(f"diffusion_model.blocks.{i}.") for t in tensors(patches))
        sizes.append(weights + factors)
    return max(sizes)


def _engine(patcher):
    return _ENGINES[patcher.model.diffusion_model]


@pytest.mark.parametrize("variant", ["plain", "lora_on_high", "gguf_low"])
def test_ten_loops_equal_no_swap_and_state_is_flat_from_loop_two(variant):
    high, low = load(seed=0), load(seed=1)
    if variant == "lora_on_high":
        high = with_lora(high)
    if variant == "gguf_low":
        from gguf_like import to_gguf_like

        low = to_gguf_like(low)
    other = load(seed=2, layers=2)
    reference = run_loops(high, low, other=other)
    ph, pl = WAN22BlockSwapLooperModels().apply(high, low, **SETTINGS)
    samples = []

    def record(i):
        eh, el = _engine(ph), _engine(pl)
        samples.append({
            "rss": host_rss_bytes(),
            "pinned": eh.tracker.pinned_bytes + el.tracker.pinned_bytes,
            "host": (eh.tracker.host_bytes, el.tracker.host_bytes),
            "device": (eh.device_bytes, el.device_bytes),
            "ring": el.shared_ring.nbytes,
            "callbacks": [len(p.get_callbacks(c, KEY)) for p in (ph, pl)
                          for c in (CallbacksMP.ON_PRE_RUN, CallbacksMP.ON_CLEANUP, CallbacksMP.ON_DETACH)],
            "bound": [loc for e in (eh, el) for loc in e.tracker.location.values() if loc != "host"],
            "loaded": (ph.model.model_loaded_weight_memory, pl.model.model_loaded_weight_memory),
        })

    outs = run_loops(ph, pl, other=other, on_loop=record)
    for i, (a, b) in enumerate(zip(reference, outs)):
        assert torch.equal(a, b), f"loop {i + 1}: max diff {(a - b).abs().max()}"
    eh, el = _engine(ph), _engine(pl)
    assert eh.shared_ring is el.shared_ring  # one ring for both experts
    first, rest = samples[1], samples[2:]
    for s in rest:
        for key in ("pinned", "host", "device", "ring", "callbacks", "bound", "loaded"):
            assert s[key] == first[key], (key, s[key], first[key])
    assert first["callbacks"] == [1] * 6 and first["bound"] == []
    # after a loop the low expert holds the slots (two, each for the largest streamed block of either
    # expert with its LoRA factors); the idle high expert holds none
    slot = max(_slot_bytes(p, range(2, 8)) for p in (ph, pl))
    assert first["device"][0] == 0 and first["device"][1] == first["ring"] == 2 * slot
    assert rest[-1]["rss"] - first["rss"] < 16 * 2**20


def test_experts_share_one_ring_and_accounting_follows_it():
    high, low = load(seed=0), load(seed=1)
    ph, pl = WAN22BlockSwapLooperModels().apply(high, low, **SETTINGS)
    run_loops(ph, pl, loops=1)
    eh, el = _engine(ph), _engine(pl)
    ring = el.shared_ring.nbytes
    resident_h = ph.model.model_loaded_weight_memory
    resident_l = pl.model.model_loaded_weight_memory
    assert eh.device_bytes == 0 and el.device_bytes == ring
    # the high expert's figure no longer includes the slots; the low expert's does
    assert resident_l - resident_h == ring


def test_sequencer_keeps_shape_prepares_each_model_once_and_shares_the_ring():
    a, b, c = load(seed=0), load(seed=1), load(seed=2)
    clip = object()
    seq = [(a, b, clip), None, (a, None, None), (c, b, clip)] + [None] * 6
    out, = WAN22BlockSwapSequencer().apply(seq, **SETTINGS)
    assert len(out) == 10 and out[1] is None and all(e is None for e in out[4:])
    assert out[0][2] is clip and out[2][1] is None and out[2][2] is None
    assert out[0][0] is out[2][0]  # `a` prepared once
    assert out[0][1] is out[3][1]  # `b` prepared once
    assert out[0][0] is not a and out[3][0] is not c  # clones, inputs untouched
    for prepared, original in ((out[0][0], a), (out[0][1], b), (out[3][0], c)):
        assert torch.equal(run_loops(prepared, prepared, loops=1)[0], run_loops(original, original, loops=1)[0])
    rings = {id(_engine(m).shared_ring) for m in (out[0][0], out[0][1], out[3][0])}
    assert len(rings) == 1


@pytest.mark.parametrize("bad,fragment", [
    ({"not": "a list"}, "must be the list WanVideoLoraSequencer outputs"),
    ([("only", "two")], r"model_clip_sequence\[0\] must be \(model_high, model_low, clip\) or None"),
    (["a string"], r"model_clip_sequence\[0\] must be"),
    ([None, (object(), None, None)], r"model_clip_sequence\[1\]\[0\] must be a MODEL or None"),
])
def test_sequencer_rejects_malformed_entries_clearly(bad, fragment):
    with pytest.raises((TypeError, ValueError), match=fragment):
        WAN22BlockSwapSequencer().apply(bad, **SETTINGS)


def test_legacy_looper_node_takes_model_lists_and_segments():
    a, b = load(seed=0), load(seed=1)
    models, = WAN22BlockSwapLooper().apply([a, b, a], **SETTINGS)
    assert len(models) == 3 and models[0] is models[2] and models[0] is not a
    segments, = WAN22BlockSwapLooper().apply([(a, b, None), None], **SETTINGS)
    assert segments[1] is None and len(segments[0]) == 3
    assert torch.equal(run_loops(*segments[0][:2], loops=1)[0], run_loops(a, b, loops=1)[0])
    for m in segments[0][:2]:  # and they streamed: the last 6 blocks were copied into slots in their call
        assert set(_engine(m).tracker.unit_copies) == {f"blocks.{i}" for i in range(2, 8)}


def test_validate_tensor_consistency_catches_lost_keys_and_moves():
    ref = {"samples": torch.zeros(1, 16, 2, 8, 8), "noise_mask": torch.ones(1, 1, 2, 8, 8)}
    validate_tensor_consistency(ref, {k: v.clone() for k, v in ref.items()})
    with pytest.raises(ValueError, match=r"lost keys \['noise_mask'\]"):
        validate_tensor_consistency(ref, {"samples": ref["samples"]})
    with pytest.raises(ValueError, match=r"\['samples'\]: dtype"):
        validate_tensor_consistency(ref, {**ref, "samples": ref["samples"].half()})
    # only the attributes asked for: a model output has other channels than its input
    validate_tensor_consistency(ref["samples"], torch.zeros(1, 48, 2, 8, 8), attrs=("dtype", "device"))
