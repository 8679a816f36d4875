"""Out-of-memory recovery (on_oom) and adaptive mode (vram_budget = adaptive), driven through the nodes.

A fault-injection hook raises ``torch.OutOfMemoryError`` (with CUDA's message and figures) from inside a
chosen block's forward while fewer than N blocks are streamed, so the recovery runs on a CPU exactly as
it would after a real one. Each test compares the latents with a run that *started* with the count the
recovery reached (and with no swap): bit-identical. The counts expected are computed here from the
injected figures and the blocks' sizes, by the rule the README states.

Runs on the stand-in by default and on a real ComfyUI with COMFYUI_PATH, like test_node.py.
"""
import logging
import math

import pytest
import torch

import comfy.model_management as mm

from wan22_blockswap.callbacks import KEY, _ENGINES, StreamedUnit
from wan22_blockswap.config import SwapSettings, detect_layout, unwrap
from wan22_blockswap.recovery import (AdaptiveCount, OOMFailure, OutOfMemoryAfterAll, blocks_needed, grow_settings,
                                      parse_oom)
from test_node import load, sample, swap, with_lora

MIB = 1 << 20


pytestmark = pytest.mark.usefixtures("unload_models_after")  # conftest.py


def controller_of(patcher):
    from comfy.patcher_extension import CallbacksMP

    return patcher.get_callbacks(CallbacksMP.ON_PRE_RUN, KEY)[0].__self__


def block_bytes(patcher, i=0):
    """A block's bytes as the engine packs them (each tensor at 256-byte steps), computed here."""
    block = unwrap(patcher.model.diffusion_model.blocks[i])
    return sum((p.numel() * p.element_size() + 255) // 256 * 256 for p in block.parameters())


def oom_message(asked, free):
    return (f"CUDA out of memory. Tried to allocate {asked / MIB:.2f} MiB. GPU 0 has a total capacity of 8.00 GiB of "
            f"which {free / MIB:.2f} MiB is free. Of the allocated memory 6.50 GiB is allocated by PyTorch.")


def inject_oom(patcher, block, below, asked, free, calls=None):
    """Raise a device OOM from block ``block``'s forward while fewer than ``below`` blocks stream."""
    real = unwrap(patcher.model.diffusion_model.blocks[block])
    controller = controller_of(patcher)

    def hook(module, args):
        if calls is not None:
            calls.append(len(controller.plan.block_indices))
        if len(controller.plan.block_indices) < below:
            raise torch.OutOfMemoryError(oom_message(asked, free))

    return real.register_forward_pre_hook(hook)


def expected_after(patcher, start, asked, free, total):
    """The count after one recovery: start + ceil((asked - free + half a block) / block), at most total."""
    b = block_bytes(patcher)
    return min(total, start + math.ceil((asked - free + b // 2) / b))


def test_an_oom_streams_as_many_more_blocks_as_the_failure_asks_and_the_output_is_unchanged(caplog):
    model = load(layers=12)
    reference = sample(model)
    swapped = swap(model, 3)
    b = block_bytes(swapped)
    asked, free = int(3.4 * b), int(0.2 * b)
    n = expected_after(swapped, 3, asked, free, 12)
    assert n == 3 + 4  # ceil(3.2 + 0.5) = 4 more
    calls = []
    hook = inject_oom(swapped, block=1, below=n, asked=asked, free=free, calls=calls)
    with caplog.at_level(logging.INFO, logger="wan22_blockswap"):
        out = sample(swapped)
    hook.remove()
    assert torch.equal(out, reference)
    c = controller_of(swapped)
    assert len(c.plan.block_indices) == n and c.oom_at == 3 and len(c.changes) == 1
    assert c.plan.block_indices == tuple(range(12 - n, 12))  # the last N, as the node streams them
    assert calls[:2] == [3, n]  # the failed forward, then the same forward again with n streamed
    assert c.readout_plan[0] == f"Plan: {n}/12 blocks streamed (OOM at 3)"
    assert any(f"3 -> {n} blocks streamed" in r.getMessage() and "out of memory" in r.getMessage()
               for r in caplog.records)
    # remembered: the next run starts with n (the hook would fire again below n; it is gone, so count)
    calls.clear()
    hook = inject_oom(swapped, block=1, below=n, asked=asked, free=free, calls=calls)
    assert torch.equal(sample(swapped), reference)
    hook.remove()
    assert set(calls) == {n} and len(c.changes) == 1  # no second failure, no second change


def test_after_recovery_accounting_ring_and_host_copies_equal_a_fresh_model_at_that_count():
    model = load(layers=12)
    swapped = swap(model, 3)
    b = block_bytes(swapped)
    hook = inject_oom(swapped, block=2, below=8, asked=int(4.1 * b), free=0)
    sample(swapped)
    hook.remove()
    n = len(controller_of(swapped).plan.block_indices)
    assert n == expected_after(swapped, 3, int(4.1 * b), 0, 12) == 8
    fresh = swap(load(layers=12), n)
    sample(fresh)
    for patcher in (swapped, fresh):
        engine = _ENGINES[patcher.model.diffusion_model]
        patcher.figures = (patcher.model_size(), patcher.model.model_loaded_weight_memory, engine.device_bytes,
                           engine.tracker.host_bytes, engine.plan.units, engine.tracker.slot_bytes,
                           sorted(k for k, v in patcher.object_patches.items() if isinstance(v, StreamedUnit)))
    assert swapped.figures == fresh.figures
    # ComfyUI's figure is what is really on the device (here the CPU is the device: every resident byte)
    m = swapped.model  # the whole model ComfyUI loads (the sampling schedule's buffers too)
    resident = sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])
    assert m.model_loaded_weight_memory == resident + _ENGINES[m.diffusion_model].device_bytes


def test_lora_on_blocks_that_start_streaming_after_an_oom_is_applied_once():
    model = load(layers=12)
    lora = with_lora(model, keys=("blocks.5.ffn.0.weight", "blocks.10.self_attn.q.weight"))
    reference = sample(lora)
    swapped = with_lora(swap(model, 2), keys=("blocks.5.ffn.0.weight", "blocks.10.self_attn.q.weight"))
    b = block_bytes(swapped)
    hook = inject_oom(swapped, block=0, below=9, asked=6 * b, free=0)
    out = sample(swapped)
    hook.remove()
    assert len(controller_of(swapped).plan.block_indices) >= 9  # blocks.5 streams now, patched in the slot
    assert torch.equal(out, reference)


def test_a_clone_made_before_the_change_runs_with_the_count_that_worked():
    model = load(layers=12)
    reference = sample(model)
    swapped = swap(model, 3)
    earlier_clone = swapped.clone()  # e.g. ModelSamplingSD3 or a LoRA loader after the node
    b = block_bytes(swapped)
    hook = inject_oom(swapped, block=1, below=6, asked=2 * b, free=0)
    assert torch.equal(sample(swapped), reference)
    n = len(controller_of(swapped).plan.block_indices)
    calls = []
    hook.remove()
    hook = inject_oom(swapped, block=1, below=n, asked=2 * b, free=0, calls=calls)
    assert torch.equal(sample(earlier_clone), reference)  # loaded again with the new stand-ins first
    hook.remove()
    assert set(calls) == {n}
    units = sorted(k for k, v in earlier_clone.object_patches.items() if isinstance(v, StreamedUnit))
    assert len(units) == n


def test_everything_streamed_and_still_out_of_memory_is_a_clear_error_and_the_next_run_is_clean():
    model = load(layers=12)
    reference = sample(model)
    swapped = swap(model, 10)
    b = block_bytes(swapped)
    hook = inject_oom(swapped, block=0, below=99, asked=100 * b, free=0)  # never fits
    with pytest.raises(OutOfMemoryAfterAll, match=r"every block, VACE block and embedding streamed .*lower the "
                                                  r"resolution, the number of frames or the batch size"):
        sample(swapped)
    hook.remove()
    c = controller_of(swapped)
    assert len(c.plan.block_indices) == 12 and c.plan.settings.offload_txt_emb  # everything was tried
    engine = _ENGINES[swapped.model.diffusion_model]
    assert not engine._ring.bound and all(not u.bound for u in engine._units)
    assert torch.equal(sample(swapped), reference)


def test_on_oom_fail_lets_the_error_through_and_changes_nothing():
    model = load(layers=12)
    swapped = swap(model, 3, on_oom="fail")
    b = block_bytes(swapped)
    hook = inject_oom(swapped, block=1, below=8, asked=2 * b, free=0)
    with pytest.raises(torch.OutOfMemoryError) as err:
        sample(swapped)
    hook.remove()
    assert type(err.value) is torch.OutOfMemoryError  # ComfyUI's own, untouched
    assert len(controller_of(swapped).plan.block_indices) == 3 and not controller_of(swapped).changes


def test_a_non_oom_error_is_never_caught():
    model = load(layers=12)
    swapped = swap(model, 3)
    real = unwrap(swapped.model.diffusion_model.blocks[1])
    calls = []

    def broken(module, args):
        calls.append(1)
        raise RuntimeError("a bug in a custom node")

    hook = real.register_forward_pre_hook(broken)
    with pytest.raises(RuntimeError, match="a bug in a custom node"):
        sample(swapped)
    hook.remove()
    assert len(calls) == 1 and not controller_of(swapped).changes  # no retry, no change


def test_an_interrupt_during_the_retry_leaves_the_model_clean():
    model = load(layers=12)
    reference = sample(model)
    swapped = swap(model, 3)
    b = block_bytes(swapped)
    hook = inject_oom(swapped, block=1, below=6, asked=2 * b, free=0)
    c = controller_of(swapped)
    real = unwrap(swapped.model.diffusion_model.blocks[5])

    def interrupt(module, args):
        if c.changes:  # the retried forward
            raise mm.InterruptProcessingException()

    stop = real.register_forward_pre_hook(interrupt)
    with pytest.raises(mm.InterruptProcessingException):
        sample(swapped)
    stop.remove()
    hook.remove()
    engine = _ENGINES[swapped.model.diffusion_model]
    assert not engine._ring.bound and all(not u.bound for u in engine._units)
    for u in engine._units:
        assert [p.data_ptr() for p in u.module.parameters()] == [v.data_ptr() for v in u.host_views]
    assert torch.equal(sample(swapped), reference)


def test_two_experts_learn_their_counts_separately():
    from wan22_blockswap.nodes import WAN22BlockSwapLooperModels

    high, low = load(seed=0, layers=12), load(seed=1, layers=12)
    refs = [sample(high), sample(low)]
    h, lo = WAN22BlockSwapLooperModels.apply(high, low, blocks_to_swap=3, offload_txt_emb=False, offload_img_emb=False,
                                             use_non_blocking=True, vace_blocks_to_swap=0, prefetch_blocks=1,
                                             block_swap_debug=False)
    b = block_bytes(h)
    hook = inject_oom(h, block=1, below=6, asked=2 * b, free=0)
    for _ in range(2):  # the experts take turns twice, as a looper's loops do
        assert torch.equal(sample(h), refs[0]) and torch.equal(sample(lo), refs[1])
    hook.remove()
    assert len(controller_of(h).plan.block_indices) == expected_after(h, 3, 2 * b, 0, 12)
    assert len(controller_of(lo).plan.block_indices) == 3 and not controller_of(lo).changes
    assert len(controller_of(h).changes) == 1  # learned once, kept for the second turn


# ------------------------------------------------------------------ adaptive mode

class FakeMemory:
    """A device-memory reporter whose peaks the test scripts: ``peaks(count)`` -> bytes."""

    def __init__(self, ceiling, margin, peak_of):
        self.ceiling, self._margin, self.peak_of, self.count = ceiling, margin, peak_of, None
        self.resets = 0

    def budget(self):
        return self.ceiling

    def margin(self):
        return self._margin

    def reset_peak(self):
        self.resets += 1

    def peak(self):
        return self.peak_of(self.count())


def test_adaptive_mode_follows_the_measured_peaks_within_bounds_and_the_output_never_changes():
    from wan22_blockswap.callbacks import apply_block_swap

    model = load(layers=12)
    reference = sample(model)
    b = block_bytes(model)
    # Scripted peaks: each streamed block frees its bytes, and from the fourth sampler call on (a longer clip,
    # say) every forward needs 5 blocks' worth more. Target = ceiling - margin = 90 blocks' worth.
    phase = {"extra": 0}
    memory = FakeMemory(ceiling=100 * b, margin=10 * b, peak_of=lambda n: (90 - n) * b + phase["extra"])
    swapped, _ = apply_block_swap(model, SwapSettings(blocks_to_swap=9), memory=memory)
    c = controller_of(swapped)
    memory.count = lambda: len(c.plan.block_indices)
    counts = []
    for run in range(6):
        if run == 3:
            phase["extra"] = 5 * b
        assert torch.equal(sample(swapped), reference)
        counts.append(len(c.plan.block_indices))
    # by the rules, by hand: at 9 the peak is 81 (9 to spare: 4 fewer), at 5 it is 85 (5 to spare: 4 fewer),
    # at 1 it is 89 (1 to spare: stay); then +5: at 1 it is 94 (4 over: 4 more, and 1 is too few from now
    # on), at 5 it is 90 (stay)
    assert [(ch.old, ch.new) for ch in c.changes] == [(9, 5), (5, 1), (1, 5)]
    assert counts == [1, 1, 1, 5, 5, 5]
    assert c.adaptive.floor == 2  # never again 1 or fewer: no oscillation
    assert memory.resets == c.adaptive.forwards == 6 * 3  # every forward (3 steps, cond and uncond batched) measured
    assert c.readout_plan[0] == "Plan: 5/12 blocks streamed (adaptive, 3 changes)"


def test_adaptive_count_rules():
    """The rules of recovery.AdaptiveCount on figures computed by hand (block = 1, target = 90)."""
    a = AdaptiveCount(ceiling=100, margin=10, block_bytes=1, count=10, total=40)
    assert a.after_forward(peak=92).new == 12  # 2 over: 2 more, floor 11
    assert a.floor == 11
    assert a.after_forward(peak=89) is None  # 1 under: within the hysteresis (2 blocks)
    assert a.after_forward(peak=70).new == 11  # 20 under: 4 at most, never below the floor (11)
    assert a.after_forward(peak=70) is None  # at the floor: stays
    b = AdaptiveCount(ceiling=100, margin=10, block_bytes=1, count=20, total=40)
    assert b.after_forward(peak=60).new == 16  # 30 under: a step of at most 4
    assert b.after_forward(peak=64).new == 12
    assert b.after_oom(needed=3).new == 15 and b.floor == 15
    assert b.after_forward(peak=10) is None  # never below a count that was too few


def test_oom_figures_and_growth_rules():
    f = parse_oom(oom_message(2 * 1024 ** 3, 512 * MIB))
    assert f.asked == 2 * 1024 ** 3 and f.free == 512 * MIB
    real = parse_oom("CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 7.79 GiB of "
                     "which 3.12 MiB is free. Including non-PyTorch memory, this process has 7.78 GiB memory in use.")
    assert real.asked == 20 * MIB and real.free == int(3.12 * MIB)
    block = 100 * MIB
    assert blocks_needed(f, block, 10, 40) == math.ceil((2048 - 512 + 50) / 100)  # 16
    assert blocks_needed(f, block, 35, 40) == 5  # capped at what is left
    assert blocks_needed(OOMFailure(None, None, "out of memory"), block, 10, 40) == 4  # a tenth, not +1
    assert blocks_needed(f, block, 40, 40) == 0
    layout = detect_layout(load("vace", layers=12).model.diffusion_model)
    assert layout.num_blocks == 12 and layout.num_vace_blocks == 2
    s = grow_settings(SwapSettings(blocks_to_swap=10), layout, 3)  # main blocks first, then VACE blocks
    assert (s.blocks_to_swap, s.vace_blocks_to_swap, s.offload_txt_emb) == (12, 1, False)
    s = grow_settings(s, layout, 2)  # the last VACE block, then the text embedding
    assert (s.blocks_to_swap, s.vace_blocks_to_swap, s.offload_txt_emb) == (12, 2, True)
    assert grow_settings(s, layout, 5) == s  # a t2v-based VACE model has no image embedding: nothing left


def test_the_node_and_the_debug_trace_show_the_change(monkeypatch, tmp_path):
    import json
    import sys
    import types

    from wan22_blockswap import callbacks
    from wan22_blockswap.utils import TRACE_PREFIX

    texts = []
    monkeypatch.setattr(callbacks, "send_node_text", lambda node_id, text: texts.append(text))
    monkeypatch.setitem(sys.modules, "folder_paths", types.SimpleNamespace(get_output_directory=lambda: str(tmp_path)))
    model = load(layers=12)
    swapped = swap(model, 3, block_swap_debug=True)
    b = block_bytes(swapped)
    hook = inject_oom(swapped, block=1, below=7, asked=int(3.4 * b), free=int(0.2 * b))
    sample(swapped)
    hook.remove()
    assert texts[-1].splitlines()[0] == "Plan: 7/12 blocks streamed (OOM at 3)"
    traces = sorted((tmp_path / "wan22_blockswap_traces").glob(f"{TRACE_PREFIX}*.json"))
    trace = json.loads(traces[-1].read_text())
    assert trace["oom_at"] == 3 and trace["plan"]["block_indices"] == list(range(5, 12))
    (change,) = trace["plan_changes"]
    assert (change["old"], change["new"], change["forward"]) == (3, 7, 1)  # in the run's first forward
    assert "out of memory with 3 blocks streamed" in change["reason"]


def test_a_model_with_nothing_streamed_still_recovers():
    model = load(layers=12)
    reference = sample(model)
    swapped = swap(model, 0)  # everything resident: the node still watches for out-of-memory errors
    assert not any(isinstance(v, StreamedUnit) for v in swapped.object_patches.values())
    b = block_bytes(swapped)
    hook = inject_oom(swapped, block=1, below=3, asked=2 * b, free=0)
    assert torch.equal(sample(swapped), reference)
    hook.remove()
    c = controller_of(swapped)
    assert len(c.plan.block_indices) == 3 and c.readout_plan[0] == "Plan: 3/12 blocks streamed (OOM at 0)"
    from comfy.patcher_extension import CallbacksMP

    off = swap(model, 0, on_oom="fail")  # with fail, 0 blocks is plain off: no callbacks at all
    assert not off.get_callbacks(CallbacksMP.ON_PRE_RUN, KEY)


def test_on_oom_is_the_last_input_optional_and_advanced_on_every_swap_node():
    from wan22_blockswap.nodes import NODE_CLASS_MAPPINGS
    from wan22_blockswap.recovery import OOM_CHOICES

    for node_id in ("wan22BlockSwap", "wan22BlockSwapLooperModels", "wan22BlockSwapSequencer", "WAN22BlockSwapLooper",
                    "wan22BlockSwapLooper", "WAN22BlockSwapLoader"):
        types = NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()
        assert list(types["optional"])[-1] == "on_oom", node_id  # last: saved graphs keep their widget values
        kind, opts = types["optional"]["on_oom"]
        assert kind == "COMBO" and list(opts["options"]) == list(OOM_CHOICES) == ["swap more and retry", "fail"]
        assert opts["default"] == "swap more and retry" and opts["advanced"] and opts["tooltip"]
