"""The host_memory choice on the nodes: auto / RAM / file, what reaches the engine, the readout, the
loaders reading straight from the file, two experts, LoRA, unloads, spill folder failures.

Runs on the stand-in by default and on a real ComfyUI with COMFYUI_PATH, like test_node.py. Available
RAM is "reported" by replacing the pack's own RAM probe; the expected choice is computed here from the
streamed blocks' bytes and the documented headroom (the larger of 2 GiB and a fifth of what is free).
"""
import gc
import logging
import re

import pytest
import torch

import comfy.model_management as mm

import wan22_blockswap.callbacks as cb
import wan22_blockswap.nodes as nodes
import wan22_blockswap.preflight as preflight
import wan22_blockswap.utils as utils
from wan22_blockswap.callbacks import _ENGINES
from wan22_blockswap.config import BlockSwapError, SwapSettings
from wan22_blockswap.engine.file_masters import TAG, SliceFinder
from wan22_blockswap.engine.host_masters import _page_span
from wan22_blockswap.nodes import NODE_CLASS_MAPPINGS, WAN22BlockSwapLoader, WAN22BlockSwapLooperModels, WANModelLoader
from test_loader import LOADER_ARGS, SWAP_ARGS, model_dir, tiny_sd, write_gguf, write_st  # noqa: F401,F811 (a fixture)
from test_node import load, sample, swap, with_lora

GIB = 1 << 30


pytestmark = pytest.mark.usefixtures("unload_models_after")  # conftest.py


def _report_ram(monkeypatch, nbytes):
    """What the OS "says" is available, everywhere the pack asks (the nodes import it from utils)."""
    for module in (preflight, cb, utils):
        monkeypatch.setattr(module, "host_available_bytes", lambda: nbytes)


def _parse(text):
    value, unit = text.split()
    return float(value) * {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": GIB}[unit]


def _streamed_bytes(patcher, blocks):
    dm = patcher.model.diffusion_model
    n = len(dm.blocks)
    return sum(p.numel() * p.element_size() for i in range(n - blocks, n) for p in dm.blocks[i].parameters())


def _engine(patcher):
    return _ENGINES[patcher.model.diffusion_model]


def _from_file(engine):
    """The engine keeps every unit on file: no RAM master, every part read from a file, the parameters
    views of a file mapping the pack made (its loader's, or a spill file's). Only LoRA factors (the slot
    transform's extras) may be in RAM."""
    extras = sum(_page_span(u.extras) for u in engine._units if u.extras is not None)
    assert engine.settings.host_memory == "file" and engine.tracker.host_bytes == extras
    for u in engine._units:
        assert u.master is None and u.reads
        for p in u.module.parameters():
            assert getattr(torch.Tensor.untyped_storage(p), TAG, None) is not None or SliceFinder().find(p.data), u.name
    return True


def test_host_memory_inputs_are_optional_advanced_and_appended_on_every_swap_node():
    for node_id in ("wan22BlockSwap", "wan22BlockSwapLooperModels", "wan22BlockSwapSequencer",
                    "WAN22BlockSwapLooper", "wan22BlockSwapLooper", "WAN22BlockSwapLoader"):
        types = NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()
        optional = list(types["optional"])
        assert optional[optional.index("host_memory"):][:2] == ["host_memory", "spill_folder"], node_id
        assert optional.index("host_memory") > optional.index("vram_budget"), node_id  # appended, after older ones
        kind, opts = types["optional"]["host_memory"]
        assert kind == "COMBO" and list(opts["options"]) == ["auto", "RAM", "file"] and opts["default"] == "auto"
        assert opts["advanced"] and opts["tooltip"]
        kind, opts = types["optional"]["spill_folder"]
        assert kind == "STRING" and opts["default"] == "" and opts["advanced"] and opts["tooltip"]


@pytest.mark.parametrize("available_gib, expected", [(64, "RAM"), (0.05, "file")])
def test_auto_keeps_ram_when_the_copies_fit_with_headroom_and_reads_from_file_otherwise(
        monkeypatch, available_gib, expected):
    model = load()
    reference = sample(model)
    need = _streamed_bytes(model, 6)
    # the rule, computed here: RAM when the copies + max(2 GiB, a fifth) fit in what is available plus what
    # the blocks' weights hold in RAM now (this loader's copies: all of them)
    room = int(available_gib * GIB) + need
    assert (need + max(2 * GIB, room // 5) <= room) == (expected == "RAM")
    _report_ram(monkeypatch, int(available_gib * GIB))
    out = swap(model, 6)
    assert torch.equal(sample(out), reference)
    engine = _engine(out)
    assert engine.settings.host_memory == expected
    if expected == "file":
        assert _from_file(engine) and engine.tracker.read_bytes > 0
    else:
        assert engine.tracker.host_bytes >= need


def test_the_readout_says_where_the_masters_are_and_why(monkeypatch):
    sent = []
    monkeypatch.setattr(cb, "send_node_text", lambda node_id, text: sent.append(text))
    monkeypatch.setattr(nodes, "send_node_text", lambda node_id, text: sent.append(text), raising=False)
    _report_ram(monkeypatch, int(0.05 * GIB))
    out = swap(load(), 6)
    sample(out)
    masters = [m for t in sent for m in re.findall(r"Masters: file \(RAM ([\d.]+ \w+) < ([\d.]+ \w+)\)", t)]
    assert masters and all(_parse(room) < _parse(need) and _parse(need) >= 2 * GIB for room, need in masters), sent
    assert any("Read " in t and "from file" in t for t in sent)  # the run's figures


def test_ram_forced_is_today_refusal_and_file_forced_needs_no_ram(monkeypatch):
    model = load()
    reference = sample(model)
    _report_ram(monkeypatch, 1024)
    with pytest.raises(BlockSwapError, match="not enough host RAM.*host_memory to auto or file"):
        swap(model, 6, host_memory="RAM")
    out = swap(model, 6, host_memory="file")
    assert torch.equal(sample(out), reference) and _from_file(_engine(out))


def _file_backed(patcher, path):
    """The model's weights made views of a safetensors file (as ComfyUI's Dynamic VRAM loader leaves
    them): their copies would all be new RAM."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    dm = patcher.model.diffusion_model
    safetensors_torch.save_file({k: v.contiguous() for k, v in dm.state_dict().items()}, str(path))
    with safetensors_torch.safe_open(str(path), "pt") as f:
        dm.load_state_dict({k: f.get_tensor(k) for k in f.keys()}, assign=True)
    return patcher


def test_both_experts_get_one_choice_counting_both(monkeypatch, tmp_path):
    high, low = _file_backed(load(seed=0), tmp_path / "h.safetensors"), _file_backed(load(seed=1), tmp_path / "l.safetensors")
    refs = [sample(high), sample(low)]
    one = _streamed_bytes(high, 6)
    # room for one expert's copies with headroom, not for both: auto must see both at once
    available = one + 2 * GIB + one // 2
    assert one + max(2 * GIB, available // 5) <= available < 2 * one + max(2 * GIB, available // 5)
    _report_ram(monkeypatch, available)
    settings = SwapSettings(blocks_to_swap=6)
    assert cb.host_memory_for([high], settings, "auto")[0] == "RAM"  # one alone would fit
    assert cb.host_memory_for([high, low], settings, "auto")[0] == "file"
    h, lo = WAN22BlockSwapLooperModels.apply(high, low, blocks_to_swap=6, **SWAP_ARGS)
    assert [torch.equal(sample(h), refs[0]), torch.equal(sample(lo), refs[1])] == [True, True]
    assert _engine(h).settings.host_memory == _engine(lo).settings.host_memory == "file"


def test_lora_on_blocks_read_from_file_equals_no_swap():
    model = load()
    lora = with_lora(model)
    reference = sample(lora)
    out = with_lora(swap(model, 6, host_memory="file"))
    assert torch.equal(sample(out), reference)
    assert _from_file(_engine(out))
    assert torch.equal(sample(swap(model, 6, host_memory="file")), sample(model))  # the file was never written


def test_an_unloaded_model_on_file_copies_nothing_to_ram():
    model = load()
    reference = sample(model)
    out = swap(model, 6, host_memory="file")
    assert torch.equal(sample(out), reference)
    engine = _engine(out)
    views = {u.name: [p.data_ptr() for p in u.module.parameters()] for u in engine._units}
    mm.unload_all_models()  # ComfyUI unloads it (ON_DETACH): the ring goes, nothing comes back to RAM
    gc.collect()
    assert engine.device_bytes == 0 and engine.tracker.host_bytes == 0 and engine.tracker.staging_bytes == 0
    assert {u.name: [p.data_ptr() for p in u.module.parameters()] for u in engine._units} == views
    assert torch.equal(sample(out), reference)


def test_spill_failure_falls_back_to_ram_where_it_fits(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    model = load()
    reference = sample(model)
    with caplog.at_level(logging.WARNING, logger="wan22_blockswap"):
        out = swap(model, 6, host_memory="file", spill_folder=str(blocker / "spill"))
    assert torch.equal(sample(out), reference)
    engine = _engine(out)
    assert engine.settings.host_memory == "RAM" and engine.tracker.host_bytes > 0
    assert any("keeping the host masters in RAM instead" in r.getMessage() and str(blocker) in r.getMessage()
               for r in caplog.records)


def test_spill_failure_without_room_in_ram_is_an_error_naming_the_folder(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    model = load()
    _report_ram(monkeypatch, 1024)
    with pytest.raises(BlockSwapError, match=rf"spill folder {blocker / 'spill'}.*would need"):
        swap(model, 6, host_memory="file", spill_folder=str(blocker / "spill"))


# ------------------------------------------------------------------ the swap-at-load loader

@pytest.mark.parametrize("fmt, fp8, spilled", [("safetensors", "disabled", False), ("gguf", "disabled", False),
                                                ("safetensors", "e4m3fn", True)],
                         ids=["safetensors", "gguf-q8", "fp8-option"])
def test_the_loader_on_file_reads_streamed_blocks_from_the_model_file(model_dir, tmp_path, fmt, fp8, spilled):
    sd = tiny_sd(layers=12)
    write_st(model_dir, sd, "a.safetensors")
    write_gguf(model_dir, sd, name="b.gguf")
    files = ("a.safetensors", "b.gguf")
    args = dict(LOADER_ARGS, fp8_optimization=fp8)
    (plain,) = WANModelLoader().load(fmt, *files, **args)
    reference = sample(plain)
    outs = {}
    for mode in ("RAM", "file"):
        (m,) = WAN22BlockSwapLoader().load(fmt, *files, **args, blocks_to_swap=9, **SWAP_ARGS, unique_id="3",
                                           host_memory=mode, spill_folder=str(tmp_path / "spill"))
        outs[mode] = sample(m)
        if mode == "file":
            engine = _engine(m)
            assert _from_file(engine)
            # unchanged weights are read from the model file itself; the fp8 option's converted ones were
            # spilled by the loader as it read them (the engine found them as slices of its spill file)
            sources = {r.source for u in engine._units for r in u.reads}
            assert any(getattr(src, "spill", False) for src in sources) == spilled
            assert engine.tracker.spill_bytes == 0
            assert engine.files() == [str(model_dir / files[fmt == "gguf"])]
    assert torch.equal(outs["RAM"], reference) and torch.equal(outs["file"], reference)


def test_the_loader_falls_back_to_ram_when_its_spill_folder_fails(model_dir, tmp_path, caplog):
    write_st(model_dir, tiny_sd(layers=12), "a.safetensors")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    args = dict(LOADER_ARGS, fp8_optimization="e4m3fn")  # converted weights: they must be spilled
    (plain,) = WANModelLoader().load("safetensors", "a.safetensors", "none", **args)
    with caplog.at_level(logging.WARNING, logger="wan22_blockswap"):
        (m,) = WAN22BlockSwapLoader().load("safetensors", "a.safetensors", "none", **args, blocks_to_swap=9,
                                           **SWAP_ARGS, unique_id="3", host_memory="file",
                                           spill_folder=str(blocker / "spill"))
    assert _engine(m).settings.host_memory == "RAM" and torch.equal(sample(m), sample(plain))
    assert any("host masters in RAM instead" in r.getMessage() for r in caplog.records)


def test_the_sequencer_and_dynamic_vram_take_over_read_from_file():
    from wan22_blockswap.nodes import WAN22BlockSwapSequencer
    from test_node import _reload_tiny

    high, low = load(seed=0), load(seed=1)
    refs = [sample(high), sample(low)]
    (seq,) = WAN22BlockSwapSequencer.apply([(high, low, None), None, (high, None, "clip")], blocks_to_swap=6,
                                           **SWAP_ARGS, host_memory="file")
    assert seq[1] is None and seq[2][0] is seq[0][0] and seq[2][2] == "clip"
    assert torch.equal(sample(seq[0][0]), refs[0]) and torch.equal(sample(seq[0][1]), refs[1])
    assert _from_file(_engine(seq[0][0])) and _from_file(_engine(seq[0][1]))
    dynamic = load(seed=2)
    reference = sample(dynamic)
    dynamic.cached_patcher_init = (_reload_tiny, ("t2v", 2))
    dynamic.is_dynamic = lambda: True
    out = swap(dynamic, 6, dynamic_vram="block swap", host_memory="file")
    assert out is not dynamic and torch.equal(sample(out), reference) and _from_file(_engine(out))
