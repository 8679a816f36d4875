"""Pre-flight checks at node apply time: host RAM for every prepared model, ComfyUI's pin cap, the
90 % VRAM rule. RAM and VRAM figures are injected; nothing large is allocated."""
import math
import re

import pytest
import torch

import comfy.model_management as mm

from wan22_blockswap import preflight
from wan22_blockswap.callbacks import _ENGINES, apply_block_swap, pin_budget_left
from wan22_blockswap.config import BlockSwapError, SwapSettings
from wan22_blockswap.nodes import WAN22BlockSwapLooperModels, WAN22BlockSwapSequencer
from wan22_blockswap.utils import format_bytes, host_ram_message, pin_budget_message, vram_message
from by_hand import stored_bytes
from test_looper import SETTINGS
from test_node import load, sample, swap

GIB = 2**30
RAM_SETTINGS = dict(SETTINGS, host_memory="RAM")  # the RAM check applies to masters in RAM


pytestmark = pytest.mark.usefixtures("unload_models_after")  # conftest.py


def _available(monkeypatch, nbytes):
    monkeypatch.setattr(preflight, "host_available_bytes", lambda: nbytes)


def _snapshot(patcher):
    dm = patcher.model.diffusion_model
    return (dict(patcher.object_patches), patcher.model_size(),
            [(id(p), p.data_ptr(), p.device) for p in dm.parameters()])


def _blocks(patcher, indices):
    return [patcher.model.diffusion_model.blocks[i] for i in indices]


# --- host RAM ----------------------------------------------------------------------------------

def test_ram_check_fails_before_anything_changes(monkeypatch):
    """host_memory RAM: today's refusal (auto and file read from file instead: test_host_memory_nodes)."""
    model = load()
    reference = sample(model)
    before = _snapshot(model)
    _available(monkeypatch, 1000)  # less than one block: even an in-place repack cannot be done
    with pytest.raises(BlockSwapError, match=r"not enough host RAM for block swap: .* of this model need "
                       r"[0-9.]+ KiB more RAM, but only 1000 B is available\. Set host_memory to auto or file "
                       r"\(the blocks are then read from the model file\), swap fewer blocks, use an fp8 "
                       r"or GGUF model, close other programs, or add swap space"):
        swap(model, 4, host_memory="RAM")
    assert _snapshot(model) == before  # the input model is untouched
    assert model.model.diffusion_model not in _ENGINES  # no engine was made
    assert torch.equal(sample(model), reference)


def test_weights_already_in_host_ram_need_one_block_of_headroom(monkeypatch):
    # Units in RAM are repacked one at a time (the engine's rule), so two experts that already sit
    # in RAM are not refused for their full size.
    model = load()
    block = stored_bytes(model.model.diffusion_model.blocks[7])
    _available(monkeypatch, block)
    assert swap(model, 6, host_memory="RAM") is not model
    _available(monkeypatch, block - 1)
    with pytest.raises(BlockSwapError, match="not enough host RAM"):
        swap(model, 6, host_memory="RAM")


def _off_host(seed):
    """A model whose weights are not in host RAM (meta stands in for weights loaded on the GPU,
    --highvram / --gpu-only): its host copies need all their bytes."""
    model = load(seed=seed)
    model.model.diffusion_model.to("meta")
    return model


def test_both_experts_are_summed_for_the_looper_models_node(monkeypatch):
    high, low = _off_host(0), _off_host(1)
    one = sum(stored_bytes(b) for b in _blocks(high, range(2, 8)))  # 6 streamed blocks
    _available(monkeypatch, one * 3 // 2)
    assert swap(high, 6, host_memory="RAM") is not high and swap(low, 6, host_memory="RAM") is not low  # each fits
    before = (_snapshot(high), _snapshot(low))
    with pytest.raises(BlockSwapError, match=rf"of the 2 models this node prepares need "
                       rf"{format_bytes(2 * one)} more RAM, but only {format_bytes(one * 3 // 2)}"):
        WAN22BlockSwapLooperModels().apply(high, low, **RAM_SETTINGS)
    assert (_snapshot(high), _snapshot(low)) == before
    assert high.model.diffusion_model not in _ENGINES and low.model.diffusion_model not in _ENGINES
    with pytest.raises(BlockSwapError, match="of the 2 models this node prepares"):
        WAN22BlockSwapSequencer().apply([(high, low, None), (high, None, None)] + [None] * 8, **RAM_SETTINGS)
    _available(monkeypatch, 2 * one)
    ph, pl = WAN22BlockSwapLooperModels().apply(high, low, **RAM_SETTINGS)  # both fit: prepared
    assert ph is not high and pl is not low


def test_clones_of_one_model_are_counted_once(monkeypatch):
    model = _off_host(0)
    one = sum(stored_bytes(b) for b in _blocks(model, range(2, 8)))
    _available(monkeypatch, one)
    ph, pl = WAN22BlockSwapLooperModels().apply(model, model.clone(), **RAM_SETTINGS)  # same weights
    assert ph is not pl
    _available(monkeypatch, one - 1)
    with pytest.raises(BlockSwapError, match="of this model need"):
        WAN22BlockSwapLooperModels().apply(model, model.clone(), **RAM_SETTINGS)


def test_ram_message_is_a_pure_function():
    assert host_ram_message(10, 10) is None
    msg = host_ram_message(30 * GIB, 12 * GIB, "the 2 models this node prepares")
    assert "need 30.00 GiB more RAM, but only 12.00 GiB is available" in msg
    for advice in ("Set host_memory to auto or file", "swap fewer blocks", "fp8 or GGUF", "close other programs",
                   "swap space"):
        assert advice in msg


# --- pinned memory -------------------------------------------------------------------------------

def _as_cuda(model, monkeypatch):
    """The patcher claims a CUDA load device; nothing runs, so no GPU is needed. The VRAM check
    is switched off here (its own tests inject a card size)."""
    model.load_device = torch.device("cuda", 0)
    monkeypatch.setattr(preflight, "device_total_memory", lambda device: None)
    return model


_SIZE = r"([0-9.]+ (?:B|KiB|MiB|GiB))"
_PIN_NOTE = re.compile(rf"^{_SIZE} of the {_SIZE} host copies exceed ComfyUI's pinned-memory cap \({_SIZE} left\) "
                       r"and stay pageable: those blocks copy slower and synchronously\. Swap fewer blocks or use "
                       r"an fp8/GGUF model to avoid it\.$")
_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def _assert_pin_note(line, pageable, masters, left):
    """``line`` is the pin note with these byte figures (shown to two decimals of their unit)."""
    found = _PIN_NOTE.match(line)
    assert found, line
    for shown, expected in zip(found.groups(), (pageable, masters, left)):
        value, unit = shown.split()
        assert abs(float(value) * _UNITS[unit] - expected) <= 0.005 * _UNITS[unit], (line, expected)
        assert 1 <= expected / _UNITS[unit] < 1024 or unit in ("B", "GiB"), (line, expected)


def _no_pin_note(text):
    return not any(_PIN_NOTE.match(line) or "pageable" in line for line in text.splitlines())


def test_pin_cap_is_reported_up_front(monkeypatch, caplog):
    model = _as_cuda(load(), monkeypatch)
    masters = sum(stored_bytes(b) for b in _blocks(model, range(4, 8)))
    monkeypatch.setattr(mm, "MAX_PINNED_MEMORY", masters // 4, raising=False)
    monkeypatch.setattr(mm, "TOTAL_PINNED_MEMORY", 0, raising=False)
    with caplog.at_level("WARNING", logger="wan22_blockswap"):
        _, text = apply_block_swap(model, SwapSettings(blocks_to_swap=4))
    note = text.splitlines()[-1]
    assert text.splitlines()[0] == "Plan: 4/8 blocks streamed"
    _assert_pin_note(note, masters - masters // 4, masters, masters // 4)
    assert sum(r.getMessage().count(note) for r in caplog.records) == 1  # logged once, in full
    # ComfyUI's own pins and other engines' pins come off the cap
    monkeypatch.setattr(mm, "TOTAL_PINNED_MEMORY", masters // 8, raising=False)
    _, text = apply_block_swap(model, SwapSettings(blocks_to_swap=4))
    left = masters // 4 - masters // 8
    _assert_pin_note(text.splitlines()[-1], masters - left, masters, left)
    monkeypatch.setattr(mm, "TOTAL_PINNED_MEMORY", 0, raising=False)
    # no pinning without asynchronous copies, and no note when the cap holds them exactly
    _, text = apply_block_swap(model, SwapSettings(blocks_to_swap=4, use_non_blocking=False))
    assert _no_pin_note(text)
    monkeypatch.setattr(mm, "MAX_PINNED_MEMORY", masters, raising=False)
    _, text = apply_block_swap(model, SwapSettings(blocks_to_swap=4))
    assert _no_pin_note(text)


def test_pin_note_counts_the_stored_bytes_of_quantized_blocks(monkeypatch):
    """The note is about what will be page-locked: the packed host copies, in their stored form. An
    fp8 model's logical bytes (its QuantizedTensor reports the bf16/fp32 dtype) are 2-4x that."""
    from quantized_like import CK_MISSING, quantize_blocks

    if CK_MISSING:
        pytest.skip(CK_MISSING)
    model = _as_cuda(load(), monkeypatch)
    quantize_blocks(model.model.diffusion_model, "fp8_e4m3")
    blocks = _blocks(model, range(4, 8))
    stored = sum(stored_bytes(b) for b in blocks)
    logical = sum(p.numel() * p.element_size() for b in blocks for p in b.parameters())
    assert 2 * stored < logical  # fp8 in an fp32 model: the two counts are far apart
    monkeypatch.setattr(mm, "TOTAL_PINNED_MEMORY", 0, raising=False)
    monkeypatch.setattr(mm, "MAX_PINNED_MEMORY", stored, raising=False)  # exactly room for them
    _, text = apply_block_swap(model, SwapSettings(blocks_to_swap=4))
    assert text.splitlines()[0] == "Plan: 4/8 blocks streamed" and _no_pin_note(text)
    cap = stored // 2
    monkeypatch.setattr(mm, "MAX_PINNED_MEMORY", cap, raising=False)
    _, text = apply_block_swap(model, SwapSettings(blocks_to_swap=4))
    _assert_pin_note(text.splitlines()[-1], stored - cap, stored, cap)


def test_pin_budget_counts_what_other_engines_pinned(monkeypatch):
    import types

    monkeypatch.setattr(mm, "MAX_PINNED_MEMORY", 10 * GIB, raising=False)
    monkeypatch.setattr(mm, "TOTAL_PINNED_MEMORY", 1 * GIB, raising=False)
    other = torch.nn.Linear(1, 1)
    monkeypatch.setitem(_ENGINES, other, types.SimpleNamespace(tracker=types.SimpleNamespace(pinned_bytes=4 * GIB)))
    assert pin_budget_left() == 5 * GIB
    assert pin_budget_left(exclude=[id(other)]) == 9 * GIB  # that model's own masters are being budgeted
    monkeypatch.setattr(mm, "MAX_PINNED_MEMORY", -1, raising=False)
    assert pin_budget_left() is None  # no cap: ComfyUI pins nothing itself, no limit to report
    assert pin_budget_message(GIB, None) is None and pin_budget_message(GIB, GIB) is None


# --- VRAM: 90 % of the card ----------------------------------------------------------------------

def test_vram_message_is_a_pure_function():
    assert vram_message(9 * GIB, 10 * GIB, need_all_swapped=GIB, fit_blocks=None) is None
    msg = vram_message(20 * GIB, 16 * GIB, need_all_swapped=4 * GIB, fit_blocks=30)
    assert "exceed 90% of the card's 16.00 GiB" in msg and "Set blocks_to_swap to at least 30" in msg
    assert "text embedding" in msg and "fp8 or GGUF" in msg and "resolution" in msg
    msg = vram_message(20 * GIB, 16 * GIB, need_all_swapped=14 * GIB, fit_blocks=None)
    assert "Swap all blocks and also the VACE blocks / embeddings" in msg
    msg = vram_message(20 * GIB, 16 * GIB, need_all_swapped=15 * GIB, fit_blocks=None)
    assert "even with every block swapped they would need 15.00 GiB" in msg
    assert "Not stopping" in msg and "lowvram" in msg


def _on_gpu(model, n, slots=2):
    """Resident weights + ring for the last ``n`` blocks streamed, counted independently."""
    m = model.model  # all ComfyUI loads: the diffusion model and the rest (model_sampling's tables)
    full = sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])  # fp32, no stand-ins
    blocks = _blocks(model, range(8 - n, 8))
    return (full - sum(p.numel() * p.element_size() for b in blocks for p in b.parameters())
            + slots * max(stored_bytes(b) for b in blocks))


def test_vram_check_at_apply_names_the_blocks_needed_and_never_raises(monkeypatch, caplog):
    model = _as_cuda(load(), monkeypatch)
    total = math.ceil(_on_gpu(model, 6) / 0.9)  # 6 streamed blocks just fit in 90 %, 5 do not
    assert 0.9 * (total - 1) < _on_gpu(model, 6) <= 0.9 * total and _on_gpu(model, 5) > 0.9 * total
    # one byte less of card and the 6 no longer fit: the check counts every byte the plan keeps
    monkeypatch.setattr(preflight, "device_total_memory", lambda device: total - 1)
    _, text = apply_block_swap(model, SwapSettings(blocks_to_swap=6))
    assert "Set blocks_to_swap to at least 7" in text
    monkeypatch.setattr(preflight, "device_total_memory", lambda device: total)
    with caplog.at_level("WARNING", logger="wan22_blockswap"):
        clone, text = apply_block_swap(model, SwapSettings(blocks_to_swap=2))
    assert "Set blocks_to_swap to at least 6" in text
    assert any("at least 6" in r.getMessage() for r in caplog.records)
    _, text = apply_block_swap(model, SwapSettings(blocks_to_swap=6))
    assert "blocks_to_swap" not in text
    _, text = apply_block_swap(model, SwapSettings(blocks_to_swap=0))  # off: still warned
    assert text.startswith("Block swap off") and "at least 6" in text
    monkeypatch.setattr(preflight, "device_total_memory", lambda device: 1000)  # hopeless: warn, go on
    clone, text = apply_block_swap(model, SwapSettings(blocks_to_swap=8))
    assert clone is not model and "even with every block swapped" in text
