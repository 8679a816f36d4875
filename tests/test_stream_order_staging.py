"""Host masters on file, on the asynchronous path, checked for stream order on a CPU.

A unit kept on file is read into a pinned staging buffer by the host, then copied from there into a
slot on the copy stream. Besides rules (A) and (B) of ``stream_order.check`` (slots), every read into a
staging buffer must come after the copies out of it are done (rule C): the reader waits (host side) on
the event recorded after that copy. A runtime whose host waits do nothing must be caught.
"""
import pytest
import torch

from wan22_blockswap.block_manager import BlockSwapEngine, SharedRing
from wan22_blockswap.config import SwapSettings
from conftest import comfy_layout_model, denoise
from stream_order import RecordingRuntime, SabotagedRuntime, check
from test_stream_order import _use_hooks


def _record_reads(engine, rt, buffers):
    """Log each read into staging as a host write, and note the staging buffers it wrote to."""
    staging = engine._staging
    inner = staging.read

    def read(unit, view):
        base = next(b for b in staging.buffers if b.data_ptr() <= view.data_ptr() < b.data_ptr() + b.numel())
        buffers.add((base.data_ptr(), base.numel()))
        rt.host_write(unit.name, view.data_ptr())
        return inner(unit, view)

    staging.read = read


def _file_scenario(rt, tmp_path, steps=3, **settings):
    model, inputs = comfy_layout_model("t2v", num_layers=12)
    reference = denoise(model, inputs, steps=steps)
    engine = BlockSwapEngine.from_settings(
        model, SwapSettings(host_memory="file", spill_dir=str(tmp_path), **settings), "cpu", runtime=rt).setup()
    hooks = _use_hooks(engine, rt)
    buffers = set()
    _record_reads(engine, rt, buffers)
    outs = denoise(model, inputs, steps=steps)
    engine.end_run()
    slots = sorted({(s.data_ptr(), s.numel()) for s in engine._slots})
    counts = check(rt, slots, {}, sorted(buffers))
    summary = engine.tracker.summary()
    staging = [b.numel() for b in engine._staging.buffers]
    assert summary["staging_bytes"] == sum((n + 4095) // 4096 * 4096 for n in staging)  # whole pages
    for h in hooks:
        h.remove()
    engine.teardown()
    assert all(torch.equal(a, b) for a, b in zip(reference, outs))
    return counts, summary, staging


@pytest.mark.parametrize("prefetch", [1, 2], ids=["ring2", "ring3"])
def test_reads_into_staging_wait_for_the_copies_out_of_it(tmp_path, prefetch):
    rt = RecordingRuntime()
    counts, s, staging = _file_scenario(rt, tmp_path, blocks_to_swap=9, prefetch_blocks=prefetch)
    assert counts["uses"] == 9 * 3 and counts["copies"] >= 9 * 3 and counts["host_writes"] >= 9 * 3
    assert len(staging) == prefetch + 1  # as many staging buffers as slots
    # the staging ring is the only pinned memory: no master is pinned (they are files)
    assert s["host_bytes"] == 0 and s["pinned_bytes"] == s["staging_bytes"] > sum(staging) - 4096 * len(staging)


def test_a_pageable_staging_ring_keeps_stream_order(tmp_path):
    rt = RecordingRuntime()
    counts, s, _ = _file_scenario(rt, tmp_path, blocks_to_swap=6, pin_budget_bytes=0)
    assert s["pinned_bytes"] == 0 and "pin budget" in s["pageable_reason"]
    copies = [op for op in rt.ops if op.kind == "copy"]
    assert copies and all(op.blocking for op in copies)
    assert counts["uses"] == 6 * 3


def test_two_experts_on_one_shared_ring_keep_stream_order_from_file(tmp_path):
    rt = RecordingRuntime()
    ring = SharedRing()
    (a, ia), (b, ib) = comfy_layout_model("t2v", seed=1, num_layers=12), comfy_layout_model("t2v", seed=2, num_layers=12)
    refs = [denoise(a, ia, steps=1), denoise(b, ib, steps=1)]
    engines, buffers = [], set()
    for m in (a, b):
        e = BlockSwapEngine.from_settings(m, SwapSettings(blocks_to_swap=6, host_memory="file", spill_dir=str(tmp_path)),
                                          "cpu", runtime=rt)
        e.use_shared_ring(ring)
        engines.append(e.setup())
        _record_reads(e, rt, buffers)
    hooks = [h for e in engines for h in _use_hooks(e, rt)]
    outs, seen_slots = [], set()
    for _ in range(2):
        for m, inputs, e in ((a, ia, engines[0]), (b, ib, engines[1])):
            outs.append(denoise(m, inputs, steps=1))
            seen_slots |= {(s.data_ptr(), s.numel()) for s in e._slots}
            other = engines[1] if e is engines[0] else engines[0]
            assert other.tracker.staging_bytes == 0  # the idle expert holds no staging buffers
    counts = check(rt, sorted(seen_slots), {}, sorted(buffers))
    assert counts["uses"] == 4 * 6
    for h in hooks:
        h.remove()
    for e in engines:
        e.teardown()
    assert all(torch.equal(x, y) for o, r in zip(outs, refs * 2) for x, y in zip(o, r))


def test_a_reader_that_does_not_wait_for_the_copy_is_caught(tmp_path):
    with pytest.raises(AssertionError, match=r"\(C\) the read of .* may overwrite it while the copy"):
        _file_scenario(SabotagedRuntime("host_wait"), tmp_path, blocks_to_swap=9, prefetch_blocks=1)


@pytest.mark.parametrize("drop", ["wait", "record"])
def test_dropped_stream_waits_are_caught_on_the_file_path_too(tmp_path, drop):
    with pytest.raises(AssertionError, match=r"\((A|B|C)\)"):
        _file_scenario(SabotagedRuntime(drop), tmp_path, blocks_to_swap=9, prefetch_blocks=1)
