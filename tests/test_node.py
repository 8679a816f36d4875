"""wan22BlockSwap inside ComfyUI's memory management.

Runs against the stand-in in tests/comfy_stub by default and against a real ComfyUI checkout when
COMFYUI_PATH is set (see conftest.py): the same assertions hold in both.
"""
import gc

import pytest
import torch

import comfy.model_management as mm
import comfy.sample
import comfy.sd
from comfy.patcher_extension import CallbacksMP, WrappersMP

from wan22_blockswap import tiny_wan
from wan22_blockswap.callbacks import KEY, StreamedUnit, _ENGINES
from wan22_blockswap.config import unwrap
from wan22_blockswap.nodes import WAN22BlockSwap
from wan22_blockswap.utils import host_rss_bytes

VARIANTS = ("t2v", "i2v", "vace", "ti2v22")


def load(variant="t2v", seed=0, layers=8):
    """A tiny WAN built by ComfyUI's loader from a state dict with ComfyUI's keys."""
    cfg = tiny_wan.tiny_config(variant, dim=128, num_heads=1, ffn_dim=256, num_layers=layers, text_dim=4096)
    sd = tiny_wan.WanModel(cfg).init_weights(seed).state_dict()
    return comfy.sd.load_diffusion_model_state_dict(sd)


def sample(model, steps=3, seed=0, frames=2):
    channels = model.model.diffusion_model.patch_embedding.weight.shape[1]
    out_ch = model.model.diffusion_model.head.head.weight.shape[0] // 4
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, out_ch, frames, 8, 8, generator=g)
    latent = torch.zeros_like(noise)
    pos = [[torch.randn(1, 8, 4096, generator=g), {}]]
    neg = [[torch.zeros(1, 8, 4096), {}]]
    assert channels in (16, 36, 48)
    return comfy.sample.sample(model, noise, steps, 4.0, "euler", "simple", pos, neg, latent,
                               seed=seed, disable_pbar=True)


def swap(model, blocks, **kw):
    args = dict(offload_txt_emb=False, offload_img_emb=False, use_non_blocking=True,
                vace_blocks_to_swap=0, prefetch_blocks=1, block_swap_debug=False)
    args.update(kw)
    return WAN22BlockSwap().apply(model, blocks_to_swap=blocks, **args, unique_id="7")[0]


def with_lora(model, strength=1.0, keys=("blocks.7.ffn.0.weight", "blocks.1.self_attn.q.weight",
                                         "blocks.5.cross_attn.k.weight")):
    """A LoRA-style weight patch ("diff") on streamed and resident keys, as LoraLoader adds one."""
    clone = model.clone()
    sd = clone.model.state_dict()
    patches = {}
    for i, k in enumerate(keys):
        key = f"diffusion_model.{k}"
        g = torch.Generator().manual_seed(100 + i)
        patches[key] = ("diff", (torch.randn(sd[key].shape, generator=g) * 0.05,))
    assert len(clone.add_patches(patches, strength)) == len(keys)
    return clone


pytestmark = pytest.mark.usefixtures("unload_models_after")  # conftest.py


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
def test_outputs_equal_no_swap(variant, lora):
    model = load(variant)
    base = with_lora(model) if lora else model
    reference = sample(base)
    for n in (0, 3, 8):
        extra = {"vace_blocks_to_swap": 1} if variant == "vace" else {}
        swapped = swap(model, n, offload_txt_emb=True, **extra)
        out = sample(with_lora(swapped) if lora else swapped)
        assert torch.equal(out, reference), f"{variant} N={n}: {(out - reference).abs().max()}"
        # the same output is also what streaming nothing gives: these units were copied into slots in this run
        units = {f"blocks.{i}" for i in range(8 - n, 8)} | {"text_embedding"} | ({"vace_blocks.1"} if extra else set())
        assert set(_ENGINES[model.model.diffusion_model].tracker.unit_copies) == units, (variant, n)


def test_lora_before_the_node_and_strength_changes_take_effect():
    model = load()
    for strength in (1.0, 0.4):
        reference = sample(with_lora(model, strength))
        assert torch.equal(sample(swap(with_lora(model, strength), 8)), reference)
        assert torch.equal(sample(with_lora(swap(model, 8), strength)), reference)
        # the LoRA'd blocks did stream (patched in the slot): every block was copied in the run
        assert set(_ENGINES[model.model.diffusion_model].tracker.unit_copies) == {f"blocks.{i}" for i in range(8)}
    assert torch.equal(sample(swap(model, 8)), sample(model))  # unpatched again


def test_input_model_and_other_clones_keep_working():
    model = load()
    reference = sample(model)
    swapped = swap(model, 5)
    other = swap(model, 2)
    assert not any(isinstance(v, StreamedUnit) for v in model.object_patches.values())
    for m in (swapped, model, other, model, swapped, other, swapped):  # two clones in one graph
        assert torch.equal(sample(m), reference)


def test_swapped_blocks_never_loaded_and_accounting_is_true():
    model = load()
    swapped = swap(model, 6)
    sample(swapped)
    dm = swapped.model.diffusion_model
    engine = _ENGINES[dm]
    real = [swapped.object_patches[f"diffusion_model.blocks.{i}"].swapped_module for i in range(2, 8)]
    masters = [(u.master.data_ptr(), u.master.data_ptr() + u.nbytes) for u in engine._units]
    for block in real:  # parameters are views of the host masters between runs
        for p in block.parameters():
            assert any(lo <= p.data_ptr() < hi for lo, hi in masters)
    resident = sum(t.numel() * t.element_size()
                   for t in [*swapped.model.parameters(), *swapped.model.buffers()])
    assert swapped.model.model_loaded_weight_memory == resident + engine.device_bytes
    assert swapped.model_size() == swapped.model.model_loaded_weight_memory
    # ComfyUI's own load list never contains a swapped module
    names = {e[2] for e in swapped._load_list()}
    assert not any(n.startswith(f"diffusion_model.blocks.{i}.") for n in names for i in range(2, 8))
    assert any(n.startswith("diffusion_model.blocks.1.") for n in names)


def test_state_dict_still_lists_swapped_keys_for_lora_loaders():
    model = load()
    swapped = swap(model, 8)
    sample(swapped)  # stand-ins are in the tree now
    keys = set(swapped.model.state_dict())
    assert "diffusion_model.blocks.7.ffn.0.weight" in keys
    assert torch.equal(sample(with_lora(swapped)), sample(with_lora(model)))


def test_reapplying_the_node_replaces_instead_of_stacking():
    model = load()
    twice = swap(swap(model, 8), 3)
    for cb in (CallbacksMP.ON_PRE_RUN, CallbacksMP.ON_CLEANUP, CallbacksMP.ON_DETACH):
        assert len(twice.get_callbacks(cb, KEY)) == 1
    assert len(twice.get_wrappers(WrappersMP.DIFFUSION_MODEL, KEY)) == 1
    units = sorted(k for k, v in twice.object_patches.items() if isinstance(v, StreamedUnit))
    assert units == [f"diffusion_model.blocks.{i}" for i in (5, 6, 7)]
    assert torch.equal(sample(twice), sample(model))
    off = swap(twice, 0)  # nothing streams; the node still watches for out-of-memory errors (on_oom)
    assert not any(isinstance(v, StreamedUnit) for v in off.object_patches.values())
    assert len(off.get_callbacks(CallbacksMP.ON_PRE_RUN, KEY)) == 1
    off = swap(twice, 0, on_oom="fail")  # and with on_oom fail, 0 is plain off
    assert not any(isinstance(v, StreamedUnit) for v in off.object_patches.values())
    assert off.get_callbacks(CallbacksMP.ON_PRE_RUN, KEY) == []


def test_detach_twice_and_garbage_collection_are_safe():
    model = load()
    reference = sample(model)
    swapped = swap(model, 8)
    sample(swapped)
    cb = swapped.get_callbacks(CallbacksMP.ON_DETACH, KEY)[0]
    cb(swapped, True)
    cb(swapped, False)
    engine = _ENGINES[swapped.model.diffusion_model]
    assert engine.device_bytes == 0
    assert torch.equal(sample(swapped), reference)  # the next run prepares again
    block = sum(-(-p.numel() * p.element_size() // 256) * 256 for p in unwrap(model.model.diffusion_model.blocks[7]).parameters())
    assert engine.device_bytes == 2 * block and engine.tracker.copies == 3 * 8 + 1  # a ring again, streaming
    del swapped, engine
    gc.collect()
    assert torch.equal(sample(model), reference)


def test_interrupt_mid_run_leaves_a_usable_model():
    model = load()
    reference = sample(model)
    swapped = swap(model, 6)
    block = swapped.object_patches["diffusion_model.blocks.6"].swapped_module
    calls = {"n": 0}

    def interrupt(module, args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise mm.InterruptProcessingException()

    handle = block.register_forward_pre_hook(interrupt)
    with pytest.raises(mm.InterruptProcessingException):
        sample(swapped)
    handle.remove()
    assert torch.equal(sample(swapped), reference)


def test_node_readout_and_debug_summary(caplog):
    model = load()
    swapped = swap(model, 4, block_swap_debug=True)
    with caplog.at_level("INFO", logger="wan22_blockswap"):
        sample(swapped)
    assert any("4 units streamed" in r.getMessage() and "D2H 0 B" in r.getMessage() for r in caplog.records)


def test_clamps_block_count_to_the_model():
    model = load(layers=6)
    swapped = swap(model, 40)
    units = [k for k, v in swapped.object_patches.items() if isinstance(v, StreamedUnit)]
    assert len(units) == 6
    assert torch.equal(sample(swapped), sample(model))


def test_dynamic_vram_patcher_is_passed_through():
    model = load()
    model.is_dynamic = lambda: True  # an instance attribute: what ModelPatcherDynamic answers
    node_out = swap(model, 10)
    assert node_out is model


def test_twenty_runs_with_unloads_stay_flat():
    model = load()
    swapped = swap(model, 6)
    reference = sample(model)
    rss, callbacks, hosts = [], [], []
    for i in range(20):
        out = sample(swapped)
        mm.unload_all_models()
        gc.collect()
        assert torch.equal(out, reference)
        engine = _ENGINES[swapped.model.diffusion_model]
        rss.append(host_rss_bytes())
        callbacks.append(sum(len(swapped.get_callbacks(c, KEY))
                             for c in (CallbacksMP.ON_PRE_RUN, CallbacksMP.ON_CLEANUP, CallbacksMP.ON_DETACH)))
        hosts.append((engine.tracker.host_bytes, engine.tracker.pinned_bytes, engine.device_bytes))
    assert len(set(callbacks)) == 1 and callbacks[0] == 3
    assert len(set(hosts[1:])) == 1 and hosts[-1][2] == 0  # ring released at every unload
    assert rss[-1] - rss[1] < 8 * 2**20, rss


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
def test_gguf_like_quantized_weights_stream_as_stored_and_keep_patches(lora):
    from gguf_like import FakeGGMLTensor, Q8, to_gguf_like

    model = to_gguf_like(load())
    keys = ("blocks.7.ffn.0.weight", "blocks.6.self_attn.q.weight", "blocks.1.cross_attn.k.weight")
    base = with_lora(model, keys=keys) if lora else model
    reference = sample(base)
    swapped = swap(model, 6)
    assert type(swapped).__name__ == "FakeGGUFModelPatcher"
    out = sample(with_lora(swapped, keys=keys) if lora else swapped)
    assert torch.equal(out, reference)
    engine = _ENGINES[swapped.model.diffusion_model]
    w = swapped.object_patches["diffusion_model.blocks.7"].swapped_module.ffn[0].weight
    assert type(w) is FakeGGMLTensor and w.tensor_type is Q8  # type and attributes survive
    assert w.dtype == torch.uint8 and engine.tracker.h2d_bytes > 0  # raw bytes were streamed
    assert w.patches == []  # attached LoRA patches are taken back at detach / next preparation
    assert torch.equal(sample(model), sample(swap(model, 6)))  # no stale LoRA afterwards


def test_chaining_the_node_does_not_shrink_the_size_twice():
    model = load()
    assert swap(swap(model, 8), 3).model_size() == swap(model, 3).model_size()
    assert swap(swap(model, 8), 0).model_size() == swap(model, 0).model_size()


def test_unstreamable_weights_are_refused_at_the_node_and_the_input_keeps_working():
    from test_engine import _WrapperTensor

    model = load()
    reference = sample(model)
    dm = model.model.diffusion_model
    lin = dm.blocks[7].ffn[0]
    original = lin.weight
    lin.weight = torch.nn.Parameter(_WrapperTensor(original.detach().clone()), requires_grad=False)
    with pytest.raises(ValueError, match="do not declare their inner tensors"):
        swap(model, 4)
    lin.weight = original
    assert torch.equal(sample(model), reference)


def test_partial_load_makes_room_for_the_ring(caplog, monkeypatch):
    if not hasattr(mm, "STUB_VRAM_BYTES"):
        pytest.skip("needs the stand-in's simulated VRAM budget (a real CPU never loads partially)")
    model = load()
    reference = sample(model)
    mm.unload_all_models()
    swapped = swap(model, 4)
    # a card that holds only part of the resident blocks: ComfyUI loads partially (lowvram)
    monkeypatch.setattr(mm, "STUB_VRAM_BYTES", swapped.model_size() // 2)
    monkeypatch.setattr(mm, "EXTRA_RESERVED_VRAM", 0)
    monkeypatch.setattr(mm, "MINIMUM_INFERENCE_BASE", 0)
    with caplog.at_level("INFO", logger="wan22_blockswap"):
        out = sample(swapped)
    assert torch.equal(out, reference)
    assert swapped.model.model_lowvram
    assert any("make room for the" in r.getMessage() for r in caplog.records)


def test_hook_lora_on_streamed_blocks_is_refused_clearly():
    model = load()
    swapped = swap(model, 4).clone()
    swapped.hook_patches = {"hook": {"diffusion_model.blocks.7.ffn.0.weight": [("diff", None)]}}
    with pytest.raises(ValueError, match="hook-based LoRA .* LoraLoaderModelOnly"):
        sample(swapped)


def test_an_engine_is_not_reused_on_another_gpu():
    """cuda:0 -> cuda:1 (a model moved to another card) must not keep a ring on the old GPU: the
    engine is keyed by the full device, not its type (built only, nothing runs on a GPU here)."""
    import copy

    model = load()
    swapped = swap(model, 4)
    controller = next(v for v in swapped.object_patches.values() if isinstance(v, StreamedUnit))._controller
    first = copy.copy(swapped)
    first.load_device = torch.device("cuda", 0)
    second = copy.copy(swapped)
    second.load_device = torch.device("cuda", 1)
    e0 = controller._engine_for(first)
    assert controller._engine_for(first) is e0
    e1 = controller._engine_for(second)
    assert e1 is not e0 and e1.compute_device == torch.device("cuda", 1)


def test_lora_factors_travel_with_their_block():
    """A streamed block's patch tensors are packed once into the unit's extras and copied into the slot
    with its weights; the slot transform reads those copies, not the patcher's tensors in RAM."""
    model = load()
    keys = ("blocks.7.ffn.0.weight", "blocks.6.self_attn.q.weight", "blocks.1.cross_attn.k.weight")
    reference = sample(with_lora(model, keys=keys))
    patched = with_lora(swap(model, 4), keys=keys)
    assert torch.equal(sample(patched), reference)
    engine = _ENGINES[patched.model.diffusion_model]
    units = {u.name: u for u in engine._units}
    diff7 = patched.patches["diffusion_model.blocks.7.ffn.0.weight"][0][1][1][0]
    assert units["blocks.7"].extras.numel() >= diff7.numel() * diff7.element_size()
    assert units["blocks.4"].extras is None  # no patch on it: nothing extra to carry
    per_forward = engine.tracker.h2d_bytes // engine.tracker.forwards
    assert per_forward >= sum(u.nbytes for u in units.values()) + units["blocks.7"].extras.numel()
    # Wreck the patcher's copy of the factors: the next run still patches from the packed copies.
    for key in keys[:2]:
        patched.patches[f"diffusion_model.{key}"][0][1][1][0].zero_()
    assert torch.equal(sample(patched), reference)


def _reload_tiny(variant, seed, disable_dynamic=False):
    """A loader's ``cached_patcher_init`` target: the same tiny model again (classic when asked)."""
    return load(variant, seed)


def test_dynamic_vram_take_over_makes_a_classic_copy_and_streams_it():
    from wan22_blockswap.callbacks import apply_block_swap
    from wan22_blockswap.config import SwapSettings

    model = load()
    reference = sample(model)
    model.cached_patcher_init = (_reload_tiny, ("t2v", 0))
    model.is_dynamic = lambda: True  # an instance attribute: what ModelPatcherDynamic answers
    out, text = apply_block_swap(model, SwapSettings(blocks_to_swap=4), dynamic_vram="block swap")
    assert out is not model and not out.is_dynamic() and out.model is not model.model  # a new, classic model
    assert "classic copy" in text
    units = [k for k, v in out.object_patches.items() if isinstance(v, StreamedUnit)]
    assert len(units) == 4
    assert torch.equal(sample(out), reference)
    passed, note = apply_block_swap(model, SwapSettings(blocks_to_swap=4))  # the default: pass through
    assert passed is model and "dynamic_vram" in note


def test_dynamic_vram_take_over_without_a_reload_recipe_passes_through_with_the_reason():
    from wan22_blockswap.callbacks import apply_block_swap
    from wan22_blockswap.config import SwapSettings

    model = load()
    model.cached_patcher_init = None
    model.is_dynamic = lambda: True
    out, text = apply_block_swap(model, SwapSettings(blocks_to_swap=4), dynamic_vram="block swap")
    assert out is model and "cached_patcher_init" in text


def test_dynamic_vram_take_over_checks_host_ram_first(monkeypatch):
    import wan22_blockswap.callbacks as cb
    from wan22_blockswap.config import BlockSwapError, SwapSettings

    model = load()
    model.cached_patcher_init = (_reload_tiny, ("t2v", 0))
    model.is_dynamic = lambda: True
    monkeypatch.setattr(cb, "host_available_bytes", lambda: 1024)  # the pack's own RAM probe
    with pytest.raises(BlockSwapError, match="classic copy of this model needs"):
        cb.apply_block_swap(model, SwapSettings(blocks_to_swap=4), dynamic_vram="block swap")


def test_the_swap_nodes_pass_their_dynamic_vram_choice_on():
    from wan22_blockswap.nodes import WAN22BlockSwapLooperModels

    model = load()
    reference = sample(model)
    model.cached_patcher_init = (_reload_tiny, ("t2v", 0))
    model.is_dynamic = lambda: True
    assert swap(model, 4) is model  # no choice made (a graph saved before the input): pass through
    out = swap(model, 4, dynamic_vram="block swap")
    assert out is not model and not out.is_dynamic() and torch.equal(sample(out), reference)
    high, low = WAN22BlockSwapLooperModels.apply(model, model, blocks_to_swap=4, offload_txt_emb=False,
                                                 offload_img_emb=False, use_non_blocking=True, vace_blocks_to_swap=0,
                                                 prefetch_blocks=1, block_swap_debug=False, dynamic_vram="block swap")
    assert high is low and not high.is_dynamic()  # one model in both places: prepared once
