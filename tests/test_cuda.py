"""CUDA tier: pinned masters, copy stream, events, no synchronize, VRAM = resident + ring.

Skipped without a GPU; run with ``python -m pytest -m cuda`` on a CUDA machine.
"""
import pytest
import torch
from torch import nn

from wan22_blockswap.block_manager import BlockSwapEngine, place_resident
from wan22_blockswap.config import SwapSettings
from by_hand import stored_bytes
from conftest import comfy_layout_model, denoise

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEV = torch.device("cuda")


class _Stack(nn.Module):
    """Blocks of plain Linear layers: a forward that itself never synchronizes."""

    def __init__(self, n=8, dim=1024):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
                                    for _ in range(n))

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return x


def _block_bytes(model, names):
    return sum(p.numel() * p.element_size() for n in names for p in model.get_submodule(n).parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_outputs_equal_resident_and_weights_are_pinned(dtype):
    model, inputs = comfy_layout_model("t2v", dtype=dtype, num_layers=8)
    inputs = {k: v.to(DEV) for k, v in inputs.items()}
    model.to(DEV)
    reference = denoise(model, inputs)
    model.to("cpu")
    engine = BlockSwapEngine.from_settings(model, SwapSettings(blocks_to_swap=6, placement="even"), DEV).setup()
    place_resident(model, engine.plan, DEV)
    outs = denoise(model, inputs)
    engine.synchronize()  # waits for the device and reads every timing event
    t = engine.tracker
    assert all(torch.equal(a, b) for a, b in zip(reference, outs))
    # Both count whole pages: every master is laid out on page boundaries to be page-locked at its
    # exact (page-rounded) size, so with all of them pinned the two figures are the same bytes.
    pages = -(-stored_bytes(model.blocks[0]) // 4096) * 4096  # the 6 streamed blocks are alike
    assert t.pinned_bytes == t.host_bytes == 6 * pages and t.pageable_reason == ""
    assert t.d2h_bytes == 0 and t.setup_d2h_bytes == 0
    # CUDA events timed the copies of every streamed block, each a real copy (no zero-length timing)
    assert sorted(t.copy_ms) == sorted(engine.unit_names()) and all(ms > 0 for ms in t.copy_ms.values())
    engine.teardown()
    assert all(p.device.type == ("cuda" if not any(n.startswith(f"blocks.{i}.") for i in engine.plan.block_indices)
                                 else "cpu") for n, p in model.named_parameters())


def test_no_synchronize_in_steady_state():
    model = _Stack().to(torch.bfloat16)
    engine = BlockSwapEngine.from_settings(model, SwapSettings(blocks_to_swap=6, prefetch_blocks=2), DEV).setup()
    place_resident(model, engine.plan, DEV)
    x = torch.randn(64, 1024, device=DEV, dtype=torch.bfloat16)
    with torch.no_grad():
        model(x)  # first forward learns the order
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                model(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    engine.teardown()


def test_pin_budget_falls_back_to_pageable_with_reason():
    model = _Stack(n=4, dim=256)
    x = torch.randn(8, 256, device=DEV)
    model.to(DEV)
    with torch.no_grad():
        ref = model(x)
    model.to("cpu")
    one = _block_bytes(model, ["blocks.0"])
    engine = BlockSwapEngine.from_settings(
        model, SwapSettings(blocks_to_swap=4, pin_budget_bytes=one + one // 2), DEV).setup()
    place_resident(model, engine.plan, DEV)
    with torch.no_grad():
        out = model(x)
    # one master (whole pages) fits the budget of 1.5 blocks, the second does not
    assert engine.tracker.pinned_bytes == -(-stored_bytes(model.blocks[0]) // 4096) * 4096
    assert engine.tracker.pageable_reason == f"pin budget of {(one + one // 2) / 1024:.2f} KiB reached"
    assert torch.equal(out, ref)
    engine.teardown()


def test_swapped_blocks_never_allocated_on_device_and_vram_is_resident_plus_ring():
    model = _Stack(n=8, dim=1024)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    engine = BlockSwapEngine.from_settings(model, SwapSettings(blocks_to_swap=6), DEV).setup()
    place_resident(model, engine.plan, DEV)
    resident = _block_bytes(model, ["blocks.0", "blocks.1"])
    expected = resident + engine.device_bytes
    assert engine.device_bytes == engine.plan.slots * engine.tracker.slot_bytes
    assert torch.cuda.memory_allocated() - base == pytest.approx(expected, rel=0.01)
    assert torch.cuda.max_memory_allocated() - base <= expected * 1.01  # no load-time spike
    engine.teardown()


def test_setup_from_device_resident_model_frees_vram_and_teardown_restores():
    model = _Stack(n=6, dim=1024).to(DEV)
    x = torch.randn(4, 1024, device=DEV)
    with torch.no_grad():
        ref = model(x)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    engine = BlockSwapEngine.from_settings(model, SwapSettings(blocks_to_swap=4), DEV).setup()
    swapped = _block_bytes(model, engine.unit_names())
    assert before - torch.cuda.memory_allocated() == pytest.approx(swapped - engine.device_bytes, rel=0.01)
    assert engine.tracker.setup_d2h_bytes == swapped
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    engine.teardown()
    assert all(p.device.type == "cuda" for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_a_quantized_layer_left_on_the_host_is_cast_on_comfyuis_offload_stream(monkeypatch):
    """A GGUF / fp8-option layer that ComfyUI's partial load left in RAM: its stored bytes cross on
    ComfyUI's offload stream, asynchronously (no host synchronisation), as ComfyUI's own layers do."""
    import comfy.model_management as mm
    import comfy.ops

    if hasattr(mm, "STUB_VRAM_BYTES"):
        monkeypatch.setattr(mm, "NUM_STREAMS", 2)  # the stand-in's CPU default is 0; ComfyUI has 2 on NVIDIA

    from wan22_blockswap.formats.gguf_reader import GGUFTensor
    from wan22_blockswap.formats.quant_ops import make_ops
    from test_gguf_reader import q8

    ops = make_ops(comfy.ops.manual_cast)
    layer = ops.Linear(64, 32, bias=True)
    t, raw, _ = q8((32, 64))  # Q8_0 bytes
    ref = t.dequantize()
    layer.weight = nn.Parameter(GGUFTensor.wrap(raw.pin_memory(), "Q8_0", (32, 64)), requires_grad=False)
    layer.bias = nn.Parameter(torch.randn(32).pin_memory(), requires_grad=False)
    x = torch.randn(4, 64, device=DEV)
    expected = torch.nn.functional.linear(x, ref.to(DEV), layer.bias.to(DEV))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = layer(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(out, expected)
