"""Right after an interrupted run, no streamed unit is left bound to a device slot: every one points at
its own host copy again, and a teardown then gives every weight its own memory with the values it had.

Checked by address (a parameter's data pointer inside the unit's host copy, outside every slot) and by
value (against a copy taken before the node ran), not by the next run's output, which is the same when
the state is wrong (the next run binds every unit to a slot again before it computes). Interrupts come
from inside a streamed block (its weights are in a slot at that moment), and from a resident block
between two streamed ones (the slots are full of prefetched copies). ComfyUI's interrupt is a
BaseException: module hooks with ``always_call`` skip it, so the engine-level test also covers a unit
that the interrupt really leaves bound. Stand-in and real ComfyUI (COMFYUI_PATH).
"""

import pytest
import torch

import comfy.model_management as mm

from wan22_blockswap.block_manager import BlockSwapEngine
from wan22_blockswap.callbacks import _ENGINES
from wan22_blockswap.config import SwapSettings
from conftest import comfy_layout_model, denoise
from test_node import load, sample, swap


pytestmark = pytest.mark.usefixtures("unload_models_after")  # conftest.py


def _span(t):
    return t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()


def assert_on_host_copies(engine):
    slots = [_span(s) for s in engine._slots]
    assert slots, "the ring was freed: nothing left to check against"
    for u in engine._units:
        lo, hi = _span(u.master)
        for name, p in u.module.named_parameters():
            ptr = torch.Tensor.data_ptr(p)
            assert not any(a <= ptr < b for a, b in slots), f"{u.name}.{name} is still bound to a slot"
            assert lo <= ptr < hi, f"{u.name}.{name} is not on its host copy"


def snapshot(modules):
    return {name: {n: p.detach().clone() for n, p in m.named_parameters()} for name, m in modules.items()}


def assert_own_memory_and_values(modules, before, old_buffers):
    for name, m in modules.items():
        for n, p in m.named_parameters():
            ptr = torch.Tensor.data_ptr(p)
            assert not any(a <= ptr < b for a, b in old_buffers), f"{name}.{n} still points into a master or slot"
            assert torch.equal(p.detach(), before[name][n]), f"{name}.{n} changed"


@pytest.mark.parametrize("where", ["inside_a_streamed_block", "between_streamed_blocks"])
def test_an_interrupted_run_leaves_every_unit_on_its_host_copy(where):
    model = load()
    reference = sample(model, steps=2)
    swapped = swap(model, 4)
    dm = model.model.diffusion_model
    blocks = {f"blocks.{i}": dm.blocks[i] for i in range(4, 8)}  # the real blocks (before any run)
    before = snapshot(blocks)
    target = dm.blocks[6] if where == "inside_a_streamed_block" else dm.blocks[3]
    calls = {"n": 0}

    def interrupt(module, args):
        calls["n"] += 1
        if calls["n"] == 2:  # in the second forward: the first one taught the engine the order
            raise mm.InterruptProcessingException()

    handle = target.register_forward_pre_hook(interrupt)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            sample(swapped, steps=2)
    finally:
        handle.remove()
    engine = _ENGINES[dm]
    assert engine.tracker.copies >= 5  # it was streaming when interrupted
    assert_on_host_copies(engine)
    assert all(loc == "host" for loc in engine.tracker.location.values()), engine.tracker.location
    kept = [u.master for u in engine._units] + list(engine._slots)  # alive, so no new tensor can reuse them
    old = [_span(t) for t in kept]
    engine.teardown()  # what another swap node's settings on these weights do first
    assert_own_memory_and_values(blocks, before, old)
    assert engine.device_bytes == 0 and engine.tracker.location == {}
    assert torch.equal(sample(swap(model, 2), steps=2), reference)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_teardown_right_after_an_interrupt_restores_every_weight(exc):
    """The engine on its own module hooks: a BaseException skips the hook that would unbind the running
    block, so it is still in a slot when the teardown comes."""
    model, inputs = comfy_layout_model("t2v")
    reference = denoise(model, inputs, steps=1)
    blocks = {f"blocks.{i}": model.blocks[i] for i in range(4, 8)}
    before = snapshot(blocks)
    engine = BlockSwapEngine.from_settings(model, SwapSettings(blocks_to_swap=4), "cpu").setup()

    def boom(module, args):
        raise exc("cancelled")

    handle = model.blocks[6].register_forward_pre_hook(boom)
    try:
        with pytest.raises(exc):
            denoise(model, inputs, steps=1)
    finally:
        handle.remove()
    bound = [n for n, loc in engine.tracker.location.items() if loc != "host"]
    assert bound == (["blocks.6"] if exc is KeyboardInterrupt else [])
    kept = [u.master for u in engine._units] + list(engine._slots)  # alive, so no new tensor can reuse them
    old = [_span(t) for t in kept]
    engine.teardown()
    assert_own_memory_and_values(blocks, before, old)
    assert engine.device_bytes == 0 and not engine.is_setup and engine.tracker.location == {}
    copies = engine.tracker.copies
    assert all(torch.equal(a, b) for a, b in zip(reference, denoise(model, inputs, steps=1)))
    assert engine.tracker.copies == copies  # its hooks are gone: the plain model ran
