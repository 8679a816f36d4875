"""The engine's asynchronous CUDA path, run on a CPU with a recording runtime, checked for stream order.

Every scenario forces the path a GPU takes (pinned masters, copy stream, copy-done and slot-free events)
and asserts, from the recorded calls, that each use of a slot follows the wait on its copy and each
copy into a slot follows the event after the slot's last use (see ``stream_order.check``); outputs
stay bit-identical. Sabotaged runtimes (a wait dropped, a record dropped) must make the check fail.
"""
import contextlib
import logging

import pytest
import torch

from wan22_blockswap.block_manager import BlockSwapEngine, SharedRing
from wan22_blockswap.config import SwapSettings
from conftest import comfy_layout_model, denoise
from by_hand import stored_bytes
from stream_order import RecordingRuntime, SabotagedRuntime, check


def _use_hooks(engine, rt):
    """Record each streamed unit's kernels as a use of the slot its parameters point into (hooks added
    after the engine's, so they run once the unit is bound)."""
    slots = [(s.data_ptr(), s.numel()) for s in engine._slots]

    def hook(name, module, args):
        ptrs = [p.data_ptr() for p in module.parameters()]
        ring = [(s.data_ptr(), s.numel()) for s in engine._slots]
        inside = [next((k for k, (lo, n) in enumerate(ring) if lo <= q < lo + n), None) for q in ptrs]
        assert len(set(inside)) == 1 and inside[0] is not None, f"{name} is not wholly in one slot"
        rt.use(name, ptrs[0])

    del slots
    return [u.module.register_forward_pre_hook(lambda m, a, n=u.name: hook(n, m, a)) for u in engine._units]


def _slots_and_masters(*engines):
    slots = {(s.data_ptr(), s.numel()) for e in engines for s in e._slots}
    masters = {u.master.data_ptr(): u.name for e in engines for u in e._units}
    return sorted(slots), masters


def _scenario(rt, variant="t2v", stream=None, transform=False, steps=3, **settings):
    model, inputs = comfy_layout_model(variant)
    reference = denoise(model, inputs, steps=steps)
    engine = BlockSwapEngine.from_settings(model, SwapSettings(**settings), "cpu", runtime=rt).setup()
    hooks = _use_hooks(engine, rt)
    if transform:
        def patch_in_slot(name):  # what LoRA does: rewrites the slot on the compute stream
            block = engine._units[engine.unit_names().index(name)].module
            with torch.no_grad():
                for p in block.parameters():
                    p.add_(0)
            rt.use(name, next(block.parameters()).data_ptr())
        engine.slot_transform = patch_in_slot
    with rt.on(stream) if stream is not None else contextlib.nullcontext():
        outs = denoise(model, inputs, steps=steps)
    engine.end_run()
    slots, masters = _slots_and_masters(engine)
    counts = check(rt, slots, masters)
    summary = engine.tracker.summary()
    for h in hooks:
        h.remove()
    engine.teardown()
    assert all(torch.equal(a, b) for a, b in zip(reference, outs))
    return counts, summary


@pytest.mark.parametrize("prefetch", [1, 2], ids=["ring2", "ring3"])
@pytest.mark.parametrize("placement", ["last", "even"])
def test_ring_sizes_and_placements_keep_stream_order(prefetch, placement):
    rt = RecordingRuntime()
    counts, s = _scenario(rt, blocks_to_swap=5, prefetch_blocks=prefetch, placement=placement)
    # the ring is smaller than the 5 streamed blocks: each forward copies all 5, and the last one
    # preloads the first ``prefetch`` of a next forward
    assert counts == {"uses": 5 * 3, "copies": 5 * 3 + prefetch}
    model, _ = comfy_layout_model("t2v")
    pages = -(-stored_bytes(model.blocks[0]) // 4096) * 4096  # every master page-locked, whole pages each
    assert s["pinned_bytes"] == s["host_bytes"] == 5 * pages
    assert s["stalls"] == 1  # only the very first copy: the rest, across forwards, was prefetched


def test_vace_repeated_order_keeps_stream_order():
    rt = RecordingRuntime()
    counts, _ = _scenario(rt, variant="vace", blocks_to_swap=5, vace_blocks_to_swap=2, placement="even")
    assert counts["uses"] == 7 * 3


def test_slot_transforms_keep_stream_order():
    rt = RecordingRuntime()
    counts, _ = _scenario(rt, transform=True, blocks_to_swap=4)
    # the transform's writes were checked as uses too: one per copy of a block, before its kernels
    assert counts == {"uses": 4 * 3 * 2, "copies": 4 * 3 + 1}


def test_a_non_default_compute_stream_keeps_stream_order_and_teardown_waits_for_it():
    rt = RecordingRuntime()
    side = rt.new_stream(None)
    _scenario(rt, stream=side, blocks_to_swap=4)
    last_use = max(op.index for op in rt.ops if op.kind == "use")
    assert any(op.kind == "device_sync" and op.index > last_use for op in rt.ops), \
        "teardown freed the ring without waiting for the compute stream the forward ran on"


def test_pageable_masters_keep_stream_order_and_are_copied_after_the_running_block():
    rt = RecordingRuntime()
    counts, s = _scenario(rt, blocks_to_swap=5, pin_budget_bytes=0)
    assert s["pinned_bytes"] == 0 and "pin budget" in s["pageable_reason"]
    copies = [op for op in rt.ops if op.kind == "copy"]
    assert len(copies) == 5 * 3 + 1 and all(op.blocking for op in copies)
    # A pageable copy makes the host wait: issued before the running block's kernels it would leave the
    # GPU idle. So every copy is issued after the previous block's kernels: the next use is its unit.
    ops = [op for op in rt.ops if op.kind in ("copy", "use")]
    for i, op in enumerate(ops):
        if op.kind == "copy":
            nxt = next((o for o in ops[i + 1:] if o.kind == "use"), None)
            if nxt is not None:
                assert nxt.unit == op.unit, f"copy of {op.unit} issued before {nxt.unit} ran"
    assert counts["uses"] == 5 * 3 and s["stalls"] == 1


def test_two_engines_on_one_shared_ring_keep_stream_order():
    rt = RecordingRuntime()
    ring = SharedRing()
    (a, ia), (b, ib) = comfy_layout_model("t2v", seed=1), comfy_layout_model("t2v", seed=2)
    refs = [denoise(a, ia, steps=1), denoise(b, ib, steps=1)]
    engines = []
    for m in (a, b):
        e = BlockSwapEngine.from_settings(m, SwapSettings(blocks_to_swap=4), "cpu", runtime=rt)
        e.use_shared_ring(ring)
        engines.append(e.setup())
    hooks = [h for e in engines for h in _use_hooks(e, rt)]
    outs, seen_slots = [], set()
    for _ in range(2):  # the experts take turns, as WAN 2.2's high and low noise models do
        for m, inputs, e in ((a, ia, engines[0]), (b, ib, engines[1])):
            outs.append(denoise(m, inputs, steps=1))
            seen_slots |= {(s.data_ptr(), s.numel()) for s in e._slots}
    masters = {u.master.data_ptr(): u.name for e in engines for u in e._units}
    counts = check(rt, sorted(seen_slots), masters)
    assert counts["uses"] == 4 * 4
    assert rt.streams_created == 2  # one copy stream per engine, however often the ring changes hands
    for h in hooks:
        h.remove()
    for e in engines:
        e.teardown()
    assert all(torch.equal(x, y) for o, r in zip(outs, refs * 2) for x, y in zip(o, r))


@pytest.mark.parametrize("drop", ["wait", "record"])
def test_a_sabotaged_runtime_is_caught(drop):
    with pytest.raises(AssertionError, match=r"\((A|B)\)"):
        _scenario(SabotagedRuntime(drop), blocks_to_swap=5, prefetch_blocks=1)


def test_a_failed_unregister_is_reported_and_its_error_cleared(caplog):
    rt = RecordingRuntime()
    model, inputs = comfy_layout_model("t2v")
    engine = BlockSwapEngine.from_settings(model, SwapSettings(blocks_to_swap=2), "cpu", runtime=rt).setup()
    assert len(rt.registered) == 2
    rt.unregister_rc = 700  # cudaErrorIllegalAddress, say: sticky until read
    with caplog.at_level(logging.WARNING, logger="wan22_blockswap"):
        engine.teardown()
    assert rt.cleared_errors == 2
    assert sum("cudaHostUnregister" in r.getMessage() and "700" in r.getMessage() for r in caplog.records) == 2
    assert engine.tracker.pinned_bytes == 0


def test_reset_counters_drops_timings_of_earlier_work():
    """A benchmark's warm-up copies must not be read into the timed run (they were, when the counters
    were reset on the tracker alone): with the GPU still busy, the warm-up's timing events are pending."""
    rt = RecordingRuntime()
    model, inputs = comfy_layout_model("t2v")
    engine = BlockSwapEngine.from_settings(model, SwapSettings(blocks_to_swap=4), "cpu", runtime=rt).setup()
    rt.events_complete = False  # the device has not finished: nothing can be read yet
    denoise(model, inputs, steps=1)  # warm-up
    assert engine._pending_timings
    engine.reset_counters()
    denoise(model, inputs, steps=2)  # the timed run
    engine.synchronize()
    t = engine.tracker
    assert t.forwards == 2 and t.copies == sum(t.unit_copies.values())
    assert sum(t.copy_ms.values()) == pytest.approx(0.01 * t.copies)  # the fake's 0.01 ms per copy
    engine.teardown()
