"""The swap engine on CPU: same numbers, parameter identity, ring bound, memory, bad input."""
import gc

import pytest
import torch
from torch import nn

from wan22_blockswap.block_manager import BlockSwapEngine
from wan22_blockswap.config import BlockSwapError, SwapSettings
from wan22_blockswap.utils import host_rss_bytes
from conftest import comfy_layout_model, denoise, diffusers_layout_model, run_model

LAYOUTS = {"comfyui": comfy_layout_model, "diffusers": diffusers_layout_model}


def _snapshot(model):
    return {n: (p, p.detach().clone(), p.device, p.dtype, p.stride()) for n, p in model.named_parameters()}


def _assert_restored(model, snap):
    now = dict(model.named_parameters())
    assert now.keys() == snap.keys()
    for name, (obj, value, device, dtype, stride) in snap.items():
        p = now[name]
        assert p is obj, f"{name}: parameter object replaced"
        assert p.device == device and p.dtype == dtype and p.stride() == stride, name
        assert torch.equal(p.detach(), value), f"{name}: value changed"


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("placement", ["last", "even"])
@pytest.mark.parametrize("prefetch", [1, 2], ids=["K2", "K3"])
def test_outputs_bit_identical(layout, dtype, placement, prefetch):
    model, inputs = LAYOUTS[layout](dtype=dtype)
    reference = denoise(model, inputs)
    n = len(model.blocks)
    snap = _snapshot(model)
    for count in (0, 1, n // 2, n):
        engine = BlockSwapEngine.from_settings(
            model, SwapSettings(blocks_to_swap=count, placement=placement, prefetch_blocks=prefetch), "cpu")
        engine.setup()
        outs = denoise(model, inputs)
        t = engine.tracker
        engine.teardown()
        for step, (a, b) in enumerate(zip(reference, outs)):
            assert torch.equal(a, b), f"N={count} step {step}: max diff {(a - b).abs().max().item()}"
        assert t.d2h_bytes == 0
        assert t.forwards == len(reference)
        # A ring that holds every streamed block copies each once; a smaller one copies every block each
        # forward, plus the first `prefetch` of a next forward, preloaded at the end of the last.
        slots = min(max(2, prefetch + 1), count)
        copies = count if slots >= count else len(reference) * count + prefetch
        block = sum(-(-p.numel() * p.element_size() // 256) * 256 for p in model.blocks[-1].parameters())
        assert (t.copies, t.h2d_bytes) == (copies, copies * block), (count, t.copies, copies)
        _assert_restored(model, snap)


@pytest.mark.parametrize("variant", ["i2v", "vace", "ti2v22"])
def test_other_layouts_with_embeddings_and_vace_streamed(variant):
    model, inputs = comfy_layout_model(variant)
    reference = denoise(model, inputs)
    settings = SwapSettings(blocks_to_swap=5, placement="even", offload_txt_emb=True,
                            offload_img_emb=True, vace_blocks_to_swap=2 if variant == "vace" else 0)
    engine = BlockSwapEngine.from_settings(model, settings, "cpu").setup()
    expected_units = 5 + 1 + (variant == "i2v") + 2 * (variant == "vace")
    assert len(engine.unit_names()) == expected_units
    outs = denoise(model, inputs)
    engine.teardown()
    assert all(torch.equal(a, b) for a, b in zip(reference, outs))


def test_vace_order_is_learned_and_prefetch_then_never_stalls():
    """VACE blocks run interleaved with the main blocks; after the first forward the engine knows
    the real order, so every later unit is already in a slot when it runs."""
    model, inputs = comfy_layout_model("vace")
    engine = BlockSwapEngine.from_settings(
        model, SwapSettings(blocks_to_swap=8, vace_blocks_to_swap=2, prefetch_blocks=1), "cpu").setup()
    with torch.no_grad():
        run_model(model, inputs)
        run_model(model, inputs)
    assert engine.tracker.schedule_updates == 1  # the plan's guess was wrong exactly once
    engine.tracker.reset_counters()
    with torch.no_grad():
        run_model(model, inputs)
        run_model(model, inputs)
    t = engine.tracker
    assert t.stalls == 0 and t.prefetch_hits == 2 * 10 and t.schedule_updates == 0
    engine.teardown()


def test_ring_never_holds_more_than_k_blocks():
    model, inputs = comfy_layout_model("t2v", num_layers=8)
    engine = BlockSwapEngine.from_settings(
        model, SwapSettings(blocks_to_swap=6, placement="even", prefetch_blocks=2), "cpu").setup()
    k = engine.plan.slots
    assert k == 3 and len(engine.storages_in_slots()) == k
    slot_ranges = [(p, p + engine.tracker.slot_bytes) for p in engine.storages_in_slots()]
    seen = []

    def check(module, args):
        name = next(n for n, m in model.named_modules() if m is module)
        owners = [o for o in engine.tracker.slot_owner if o is not None]
        assert len(owners) <= k and len(set(owners)) == len(owners)
        bound = [n for n, loc in engine.tracker.location.items() if loc.startswith("slot")]
        assert bound == [name]  # only the running block points at device memory
        for p in module.parameters():
            assert any(lo <= p.data_ptr() < hi for lo, hi in slot_ranges), f"{name} not in a slot"
        seen.append(name)

    # registered after the engine's hooks, so it sees the state the block runs with
    handles = [model.get_submodule(n).register_forward_pre_hook(check) for n in engine.unit_names()]
    denoise(model, inputs, steps=2)
    for h in handles:
        h.remove()
    assert len(seen) == 2 * 6
    assert engine.tracker.max_bound_units == 1
    assert all(loc == "host" for loc in engine.tracker.location.values())
    engine.teardown()


def test_setup_and_teardown_are_idempotent_and_keep_identity():
    model, inputs = comfy_layout_model("i2v")
    snap = _snapshot(model)
    engine = BlockSwapEngine.from_settings(model, SwapSettings(blocks_to_swap=4, offload_img_emb=True), "cpu")
    engine.setup()
    engine.setup()
    assert all(model.get_parameter(n) is obj for n, (obj, *_rest) in snap.items())
    denoise(model, inputs, steps=1)
    engine.teardown()
    engine.teardown()
    _assert_restored(model, snap)
    assert engine.device_bytes == 0 and not engine.is_setup
    # and it can be set up again after a teardown
    engine.setup()
    denoise(model, inputs, steps=1)
    engine.teardown()
    _assert_restored(model, snap)


def test_non_contiguous_weights_keep_their_layout():
    model, inputs = comfy_layout_model("t2v")
    w = model.blocks[7].ffn[0].weight
    w.data = w.data.t().contiguous().t()  # column-major storage, same values
    stride = w.stride()
    reference = denoise(model, inputs)
    engine = BlockSwapEngine.from_settings(model, SwapSettings(blocks_to_swap=2), "cpu").setup()
    outs = denoise(model, inputs)
    engine.teardown()
    assert w.stride() == stride
    assert all(torch.equal(a, b) for a, b in zip(reference, outs))


def test_host_rss_after_setup_is_at_most_one_copy_of_swapped_weights():
    # Big enough that allocator noise is small against it: 8 blocks x ~9 MiB.
    model, inputs = comfy_layout_model("t2v", dim=512, ffn_dim=2048, num_heads=4, num_layers=8)
    swapped = sum(p.numel() * p.element_size() for b in model.blocks[2:] for p in b.parameters())
    gc.collect()
    baseline = host_rss_bytes()
    engine = BlockSwapEngine.from_settings(model, SwapSettings(blocks_to_swap=6), "cpu").setup()
    gc.collect()
    grown = host_rss_bytes() - baseline
    # masters replace the original storages one unit at a time; the CPU ring (2 slots) is extra
    assert grown <= swapped, f"RSS grew {grown} bytes for {swapped} swapped bytes"
    with torch.no_grad():
        run_model(model, inputs)
    engine.teardown()


def test_not_enough_host_ram_is_refused_before_touching_the_model():
    model, _ = comfy_layout_model("t2v")
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    engine = BlockSwapEngine.from_settings(model, SwapSettings(blocks_to_swap=8), "cpu",
                                           host_available=1024)
    with pytest.raises(BlockSwapError, match="not enough host RAM.*only 1.00 KiB"):
        engine.setup()
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs
    assert not engine.is_setup


def test_block_with_parameters_on_several_devices_is_refused():
    model, _ = comfy_layout_model("t2v")
    ffn = model.blocks[7].ffn[2]
    ffn.weight = nn.Parameter(torch.empty_like(ffn.weight, device="meta"), requires_grad=False)
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters() if not p.is_meta}
    engine = BlockSwapEngine.from_settings(model, SwapSettings(blocks_to_swap=2), "cpu")
    with pytest.raises(BlockSwapError, match=r"blocks\.7 has parameters on several devices \(cpu, meta\)"):
        engine.setup()
    assert {n: p.data_ptr() for n, p in model.named_parameters() if not p.is_meta} == ptrs


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_exception_inside_a_block_leaves_a_usable_model(exc):
    model, inputs = comfy_layout_model("t2v")
    reference = denoise(model, inputs)
    engine = BlockSwapEngine.from_settings(model, SwapSettings(blocks_to_swap=4), "cpu").setup()

    def boom(module, args):
        raise exc("user pressed cancel")

    handle = model.blocks[6].register_forward_pre_hook(boom)
    with pytest.raises(exc), torch.no_grad():
        run_model(model, inputs)
    handle.remove()
    if exc is RuntimeError:
        # torch runs always_call hooks for an Exception (not a BaseException): evicted at once
        assert all(loc == "host" for loc in engine.tracker.location.values())
    # for any exception (ComfyUI's interrupt is a BaseException) the next forward starts clean
    assert all(torch.equal(a, b) for a, b in zip(reference, denoise(model, inputs)))
    assert engine.tracker.max_bound_units == 1
    engine.teardown()


class _QuantTensor(torch.Tensor):
    """Shaped like ComfyUI-GGUF's GGMLTensor: raw bytes plus Python attributes."""


class _QuantLinear(nn.Module):
    def __init__(self, out_f, in_f, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        q = torch.randint(-127, 127, (out_f, in_f), generator=g, dtype=torch.int8).view(torch.uint8)
        w = nn.Parameter(_QuantTensor(q), requires_grad=False)
        w.tensor_type, w.tensor_shape, w.patches = "Q8_0", torch.Size((out_f, in_f)), []
        self.weight = w
        self.scale = nn.Parameter(torch.tensor(0.01), requires_grad=False)

    def forward(self, x):
        assert type(self.weight) is _QuantTensor and self.weight.tensor_type == "Q8_0"
        w = self.weight.data.view(torch.int8).to(x.dtype) * self.scale
        return x @ w.t()


class _Fp8Linear(nn.Module):
    def __init__(self, out_f, in_f, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(out_f, in_f, generator=g).to(torch.float8_e4m3fn),
                                   requires_grad=False)

    def forward(self, x):
        assert self.weight.dtype == torch.float8_e4m3fn
        return x @ self.weight.to(x.dtype).t()


class _StoredFormModel(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.blocks = nn.ModuleList(layer(16, 16, seed) for seed in range(4))

    def forward(self, x):
        for b in self.blocks:
            x = torch.tanh(b(x))
        return x


@pytest.mark.parametrize("layer", [_QuantLinear, _Fp8Linear], ids=["quantized-subclass", "fp8"])
def test_weights_stream_in_their_stored_form(layer):
    model = _StoredFormModel(layer)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    raw = [b.weight.data.view(torch.uint8).clone() for b in model.blocks]
    with torch.no_grad():
        reference = model(x)
    engine = BlockSwapEngine.from_settings(model, SwapSettings(blocks_to_swap=3), "cpu").setup()
    expected_bytes = 256 + 256  # one weight of 256 bytes (1 byte/elem) + a 4-byte scalar padded to 256
    if layer is _Fp8Linear:
        expected_bytes = 256
    assert engine.tracker.host_bytes == 3 * expected_bytes
    with torch.no_grad():
        out = model(x)
    engine.teardown()
    assert torch.equal(out, reference)
    for b, r in zip(model.blocks, raw):
        assert torch.equal(b.weight.data.view(torch.uint8), r)
        if layer is _QuantLinear:
            assert type(b.weight) is _QuantTensor and b.weight.tensor_type == "Q8_0"


def test_release_ring_keeps_masters_and_setup_reallocates():
    model, inputs = comfy_layout_model("t2v")
    reference = denoise(model, inputs)
    engine = BlockSwapEngine.from_settings(model, SwapSettings(blocks_to_swap=4), "cpu").setup(install_hooks=False)
    engine.attach_hooks()
    masters = [model.blocks[7].ffn[0].weight.data_ptr()]
    engine.release_ring()
    assert engine.device_bytes == 0 and engine.is_setup
    assert model.blocks[7].ffn[0].weight.data_ptr() == masters[0]  # still bound to the host master
    engine.setup()  # re-allocates the ring only
    assert engine.device_bytes > 0 and model.blocks[7].ffn[0].weight.data_ptr() == masters[0]
    assert all(torch.equal(a, b) for a, b in zip(reference, denoise(model, inputs)))
    engine.teardown()


def test_setup_again_repacks_only_units_moved_or_replaced_elsewhere():
    model, inputs = comfy_layout_model("t2v")
    reference = denoise(model, inputs)
    engine = BlockSwapEngine.from_settings(model, SwapSettings(blocks_to_swap=3), "cpu").setup()
    engine.release_ring()
    # someone else gives block 6 its own storage (ComfyUI loading another clone does this)
    w6 = model.blocks[6].ffn[0].weight
    w6.data = w6.data.clone()
    # ... and replaces a parameter object of block 7 by one viewing the same memory (a restored backup)
    old7 = model.blocks[7].ffn[2].weight
    model.blocks[7].ffn[2].weight = nn.Parameter(old7.data, requires_grad=False)
    ptr7 = old7.data_ptr()
    engine.setup()
    assert model.blocks[7].ffn[2].weight.data_ptr() == ptr7  # intact unit: nothing copied
    assert all(torch.equal(a, b) for a, b in zip(reference, denoise(model, inputs)))
    # the repacked unit follows the engine again: its weight points into a slot while it runs
    seen = {}
    h = model.blocks[6].register_forward_pre_hook(
        lambda m, a: seen.update(ptr=m.ffn[0].weight.data_ptr()))
    denoise(model, inputs, steps=1)
    h.remove()
    assert any(p <= seen["ptr"] < p + engine.tracker.slot_bytes for p in engine.storages_in_slots())
    engine.teardown()


def test_slot_transform_runs_once_per_fresh_copy():
    model, inputs = comfy_layout_model("t2v")
    calls = []
    # 2 streamed units, ring of 2: after the first forward both stay in their slots (reuse)
    engine = BlockSwapEngine.from_settings(model, SwapSettings(blocks_to_swap=2), "cpu")
    engine.slot_transform = calls.append
    engine.setup()
    denoise(model, inputs, steps=3)
    assert calls == ["blocks.6", "blocks.7"]
    engine.invalidate_slots()
    denoise(model, inputs, steps=1)
    assert calls[2:] == ["blocks.6", "blocks.7"]
    engine.teardown()


class _WrapperTensor(torch.Tensor):
    """A __torch_dispatch__ wrapper subclass that does not declare its inner tensors
    (no __tensor_flatten__), unlike ComfyUI's QuantizedTensor: the engine cannot pack it."""

    @staticmethod
    def __new__(cls, inner):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype)

    def __init__(self, inner):
        self.inner = inner

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        unwrap = lambda t: t.inner if isinstance(t, _WrapperTensor) else t  # noqa: E731
        out = func(*[unwrap(a) for a in args], **{k: unwrap(v) for k, v in (kwargs or {}).items()})
        # nn.Parameter needs detach() to keep the type, as a real quantized wrapper does
        return _WrapperTensor(out) if func is torch.ops.aten.detach.default else out


def test_wrappers_without_inner_tensors_are_refused_before_anything_is_touched():
    model, _ = comfy_layout_model("t2v")
    lin = model.blocks[7].ffn[0]
    lin.weight = nn.Parameter(_WrapperTensor(lin.weight.detach().clone()), requires_grad=False)
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters() if n != "blocks.7.ffn.0.weight"}
    engine = BlockSwapEngine.from_settings(model, SwapSettings(blocks_to_swap=3), "cpu")
    with pytest.raises(BlockSwapError, match=r"blocks\.7: _WrapperTensor weights do not declare their inner tensors"):
        engine.setup()
    assert {n: p.data_ptr() for n, p in model.named_parameters() if n != "blocks.7.ffn.0.weight"} == ptrs


def test_a_failed_pack_restores_earlier_units_and_leaves_the_failing_one_alone():
    model, inputs = comfy_layout_model("t2v")
    reference = denoise(model, inputs)
    model.blocks[7].to("meta")  # packing cannot copy out of meta tensors
    snap = {n: p.detach().clone() for n, p in model.named_parameters() if not p.is_meta}
    engine = BlockSwapEngine.from_settings(model, SwapSettings(blocks_to_swap=3), "cpu")
    with pytest.raises((NotImplementedError, RuntimeError)):
        engine.setup()
    assert all(p.is_meta for p in model.blocks[7].parameters())
    for n, p in model.named_parameters():
        if not p.is_meta:
            assert torch.equal(p.detach(), snap[n]), n
    assert not engine.is_setup and engine.device_bytes == 0
    del reference


def test_repack_after_a_dtype_change_does_not_reuse_old_views():
    model, inputs = comfy_layout_model("t2v")
    engine = BlockSwapEngine.from_settings(model, SwapSettings(blocks_to_swap=2), "cpu").setup()
    denoise(model, inputs, steps=1)
    engine.release_ring()
    bias = model.blocks[7].ffn[2].bias
    bias.data = bias.data.to(torch.bfloat16).float().to(torch.bfloat16)  # someone else changed it
    engine.teardown()
    expected = denoise(model, inputs)  # the model as it is now, no swapping
    engine.setup()
    engine.release_ring()
    bias.data = bias.data.clone()
    engine.setup()  # repacks block 7 with the same layout: cached slot views must not survive
    assert all(torch.equal(a, b) for a, b in zip(expected, denoise(model, inputs)))
    engine.teardown()


def test_a_failing_slot_transform_never_leaves_a_half_patched_slot():
    model, inputs = comfy_layout_model("t2v")
    reference = denoise(model, inputs)
    engine = BlockSwapEngine.from_settings(model, SwapSettings(blocks_to_swap=2), "cpu").setup()
    calls = []

    def transform(name):
        calls.append(name)
        block = model.get_submodule(name)
        block.ffn[0].weight.data.mul_(2)  # half of a patch...
        if len(calls) == 1:
            raise RuntimeError("patch failed")
        block.ffn[0].weight.data.div_(2)  # ...and a transform that, done fully, changes nothing

    engine.set_slot_transform(transform, tag="t")
    with pytest.raises(RuntimeError, match="patch failed"):
        denoise(model, inputs, steps=1)
    assert all(torch.equal(a, b) for a, b in zip(reference, denoise(model, inputs)))
    assert calls.count("blocks.6") >= 2  # the failed slot was copied and transformed again
    engine.teardown()


def test_ring_release_requested_inside_a_forward_waits_for_its_end():
    model, inputs = comfy_layout_model("t2v")
    reference = denoise(model, inputs)
    engine = BlockSwapEngine.from_settings(model, SwapSettings(blocks_to_swap=4), "cpu").setup()
    h = model.blocks[5].register_forward_pre_hook(lambda m, a: engine.release_ring())
    outs = denoise(model, inputs)
    h.remove()
    assert all(torch.equal(a, b) for a, b in zip(reference, outs))
    assert engine.device_bytes == 0  # released once the last forward ended
    engine.teardown()


def _into_arena(module):
    """What a loader does with host_arena: every parameter of ``module`` read into one buffer."""
    from wan22_blockswap.block_manager import arena_offset, host_arena

    params = list(module.parameters())
    arena = host_arena(sum(arena_offset(p.numel() * p.element_size()) for p in params))
    off = 0
    for p in params:
        n = p.numel() * p.element_size()
        view = arena[off:off + n].view(p.dtype).view(p.shape)
        view.copy_(p.data)
        p.data = view
        off += arena_offset(n)
    return arena


def test_a_loader_arena_is_adopted_as_the_master_without_a_copy():
    model, inputs = comfy_layout_model()
    reference = denoise(model, inputs)
    arenas = {i: _into_arena(model.blocks[i]) for i in (5, 6, 7)}
    ptrs = {i: [p.data_ptr() for p in model.blocks[i].parameters()] for i in arenas}
    model.blocks[4].norm3.weight.data = model.blocks[4].norm3.weight.data.clone()  # block 4: ordinary tensors
    engine = BlockSwapEngine.from_settings(model, SwapSettings(blocks_to_swap=4), "cpu")
    engine.pack_masters()
    for u in engine._units:
        i = int(u.name.split(".")[1])
        if i in arenas:  # adopted: the master is the arena, the weights did not move
            assert u.master.data_ptr() == arenas[i].data_ptr()
            assert [p.data_ptr() for p in model.blocks[i].parameters()] == ptrs[i]
        else:  # packed by copy, as before
            assert u.master.data_ptr() not in {a.data_ptr() for a in arenas.values()}
    engine.setup()
    outs = denoise(model, inputs)
    engine.teardown()
    assert all(torch.equal(a, b) for a, b in zip(reference, outs))
    assert not any(p.data_ptr() in ptrs[7] for p in model.blocks[7].parameters())  # restored: own storage again


def test_a_buffer_shared_with_other_modules_is_not_adopted():
    model, _ = comfy_layout_model()
    blocks = nn.ModuleList([model.blocks[6], model.blocks[7]])
    arena = _into_arena(blocks)  # two units in one buffer: neither unit owns it
    engine = BlockSwapEngine.from_settings(model, SwapSettings(blocks_to_swap=2), "cpu")
    engine.pack_masters()
    assert all(u.master.data_ptr() != arena.data_ptr() for u in engine._units)
    engine.teardown()


def test_forwards_are_found_without_begin_and_end_calls():
    """A forward that bypasses the model's entry point (ComfyUI's CausalWan under SamplerARVideo calls
    its blocks from forward_block, past the DIFFUSION_MODEL wrapper): the engine counts forwards from
    the learned order wrapping around, keeps preloading the next forward, and end_run closes the last."""
    model, inputs = comfy_layout_model("t2v")
    reference = denoise(model, inputs)
    results = {}
    for bracket in (True, False):
        engine = BlockSwapEngine.from_settings(model, SwapSettings(blocks_to_swap=3), "cpu")
        engine.setup(install_hooks=False)
        engine.attach_hooks(bracket_forwards=bracket)
        outs = denoise(model, inputs)
        engine.end_run()
        results[bracket] = (engine.tracker.summary(), outs)
        engine.teardown()
    for bracket, (s, outs) in results.items():
        assert all(torch.equal(a, b) for a, b in zip(reference, outs)), bracket
        assert s["forwards"] == len(reference), bracket
        # only the very first unit waits; every later one, across forwards too, was preloaded
        assert s["stalls"] == 1 and s["prefetch_hits"] == 3 * len(reference) - 1, (bracket, s)
    assert results[True][0]["h2d_bytes"] == results[False][0]["h2d_bytes"]


def test_a_ring_release_between_units_of_an_unbracketed_forward_waits_for_the_unit():
    model, inputs = comfy_layout_model("t2v")
    reference = denoise(model, inputs)
    engine = BlockSwapEngine.from_settings(model, SwapSettings(blocks_to_swap=3), "cpu")
    engine.setup(install_hooks=False)
    engine.attach_hooks(bracket_forwards=False)
    seen = []

    def release_inside(module, args):  # a garbage-collected clone's ON_DETACH, inside the block
        engine.release_ring()
        seen.append(engine.device_bytes)

    handle = model.blocks[6].register_forward_pre_hook(release_inside)
    outs = denoise(model, inputs)
    handle.remove()
    engine.end_run()
    assert all(b > 0 for b in seen)  # not freed under the running block
    assert all(torch.equal(a, b) for a, b in zip(reference, outs))
    engine.teardown()
