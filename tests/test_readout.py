"""The per-run readout: node text and log after every sampling run, the debug detail and trace file.

Runs against the stand-in (or a real ComfyUI with COMFYUI_PATH). The node text is captured at
``callbacks.send_node_text``, so the test does not depend on a front end being connected.
"""
import gc
import json
import os
import sys
import types

import pytest
import torch

import comfy.model_management as mm

from wan22_blockswap import callbacks
from wan22_blockswap.block_manager import BlockSwapTracker
from wan22_blockswap.callbacks import _ENGINES
from wan22_blockswap.readout import format_run_text
from wan22_blockswap.readout import NODE_WIDTH, fit, node_text, short_bytes
from wan22_blockswap.utils import TRACE_PREFIX, __version__, format_bytes, write_trace
from test_node import load, sample, swap


@pytest.fixture(autouse=True)
def _unload_between_tests():
    yield
    mm.unload_all_models()
    gc.collect()


@pytest.fixture
def node_texts(monkeypatch):
    texts = []
    monkeypatch.setattr(callbacks, "send_node_text", lambda node_id, text: texts.append((node_id, text)))
    return texts


@pytest.fixture
def trace_dir(monkeypatch, tmp_path):
    """ComfyUI's folder_paths, pointing its output directory at a fresh folder."""
    fake = types.SimpleNamespace(get_output_directory=lambda: str(tmp_path / "comfy_out"))
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    return tmp_path / "comfy_out" / "wan22_blockswap_traces"


def _traces(directory):
    return sorted(p for p in directory.iterdir() if p.name.startswith(TRACE_PREFIX)) if directory.exists() else []


def test_node_text_and_log_after_a_run_have_the_fields(node_texts, caplog, trace_dir):
    model = load()
    swapped = swap(model, 4)
    with caplog.at_level("INFO", logger="wan22_blockswap"):
        sample(swapped)
    engine = _ENGINES[swapped.model.diffusion_model]
    t = engine.tracker
    cuda = swapped.load_device.type == "cuda"
    # the log: two full lines
    log_text = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Block swap run:"))
    line1, line2 = log_text.splitlines()
    assert "4 units streamed, 4 blocks resident" in line1
    assert f"{t.forwards} forwards, {format_bytes(t.h2d_bytes // t.forwards)} H2D per forward" in line1
    assert "copy " in line1 and ("stall " in line1 or "all stall" in line1)
    assert ("VRAM peak n/a (CPU)" in line2) != cuda
    assert f"host masters {format_bytes(t.host_bytes)} ({format_bytes(t.pinned_bytes)} pinned" in line2
    assert "RSS " in line2
    # the node: the plan made when the node ran, then this run, in lines that fit the node
    node, text = node_texts[-1]
    assert node == "7"
    lines = text.splitlines()
    assert lines[0] == "Plan: 4/8 blocks streamed"
    assert lines[1] == f"Run: {t.forwards} forwards, no VRAM (CPU)" if not cuda else lines[1].startswith(
        f"Run: {t.stalls} stalls, VRAM peak ")
    assert f"H2D {short_bytes(t.h2d_bytes // t.forwards)} per forward, {t.forwards} fwd" in lines
    assert f"Host copies {short_bytes(t.host_bytes)}" in "\n".join(lines)
    assert "Streams blocks 4-7" in lines and any(line.startswith("Ring 2 x ") for line in lines)
    assert all(len(line) <= NODE_WIDTH for line in lines), text
    assert _traces(trace_dir) == []  # no trace without block_swap_debug


def test_node_text_keeps_the_plan_and_the_warnings_with_every_run(node_texts, monkeypatch):
    model = load()
    swapped = swap(model, 4)
    controller = swapped.object_patches["diffusion_model.blocks.7"]._controller
    monkeypatch.setattr(controller, "readout_notes", ["a warning made when the node ran, long enough to be wrapped"])
    for run in range(2):
        sample(swapped)
        lines = node_texts[-1][1].splitlines()
        assert lines[0] == "Plan: 4/8 blocks streamed" and lines[1].startswith("Run: ")
        assert lines[-2:] == ["a warning made when the node ran, long", "enough to be wrapped"]


def test_debug_writes_per_unit_detail_and_a_json_trace(node_texts, caplog, trace_dir):
    model = load()
    swapped = swap(model, 4, block_swap_debug=True)
    with caplog.at_level("INFO", logger="wan22_blockswap"):
        sample(swapped)
    engine = _ENGINES[swapped.model.diffusion_model]
    messages = [r.getMessage() for r in caplog.records]
    assert any("blocks.7: " in m and " copies, copy " in m for m in messages)  # per-unit lines
    files = _traces(trace_dir)
    assert len(files) == 1 and "_node7" in files[0].name
    assert any(str(files[0]) in m for m in messages)  # the path is logged
    trace = json.loads(files[0].read_text())
    for key in ("pack_version", "torch_version", "device", "plan", "summary", "units", "memory", "settings"):
        assert key in trace, key
    assert trace["pack_version"] == __version__ and trace["torch_version"] == torch.__version__
    assert trace["device"]["name"]
    plan = trace["plan"]
    assert plan["units"] == [f"blocks.{i}" for i in range(4, 8)] and plan["resident_blocks"] == [0, 1, 2, 3]
    assert plan["slots"] == 2 and plan["slot_bytes"] == engine.tracker.slot_bytes > 0
    assert trace["settings"]["blocks_to_swap"] == 4
    assert trace["summary"]["copies"] == engine.tracker.copies > 0
    units = {u["unit"]: u for u in trace["units"]}
    assert set(units) == set(plan["units"])
    # per-unit copy counts add up to the engine's own total
    assert sum(u["copies"] for u in units.values()) == engine.tracker.copies
    for u in units.values():
        assert u["location"] == "host" and u["bytes"] > 0 and u["copy_ms"] >= 0 and u["stall_ms"] >= 0
    mem = trace["memory"]
    assert mem["host_master_bytes"] == engine.tracker.host_bytes and mem["host_rss_bytes"] > 0
    assert "pinned_bytes" in mem and "vram" in mem


def test_trace_files_are_capped_and_only_the_packs_are_deleted(tmp_path):
    (tmp_path / "notes.txt").write_text("user file")
    (tmp_path / "wan22_other.json").write_text("{}")
    paths = [write_trace({"i": i}, str(tmp_path), node_id="12:3", keep=20) for i in range(25)]
    kept = _traces(tmp_path)
    assert len(kept) == 20
    assert [json.loads(p.read_text())["i"] for p in kept] == list(range(5, 25))  # the newest stay
    assert all(not os.path.exists(p) for p in paths[:5])
    assert (tmp_path / "notes.txt").exists() and (tmp_path / "wan22_other.json").exists()
    assert all("_node12-3.json" in p.name for p in kept)  # the node id made file-name safe


def test_a_trace_that_cannot_be_written_only_warns(node_texts, caplog, monkeypatch, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    fake = types.SimpleNamespace(get_output_directory=lambda: str(blocker / "output"))
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    model = load()
    reference = sample(model)
    swapped = swap(model, 4, block_swap_debug=True)
    with caplog.at_level("INFO", logger="wan22_blockswap"):
        out = sample(swapped)
    assert torch.equal(out, reference)
    assert any(r.levelname == "WARNING" and "could not write the debug trace" in r.getMessage()
               for r in caplog.records)
    assert node_texts and node_texts[-1][1].startswith("Plan: 4/8")  # the readout still reached the node


def test_engine_counts_copies_per_unit():
    model = load()
    swapped = swap(model, 4, block_swap_debug=True)
    sample(swapped)
    t = _ENGINES[swapped.model.diffusion_model].tracker
    assert set(t.unit_copies) == set(t.units) and all(n >= 1 for n in t.unit_copies.values())
    assert sum(t.unit_copies.values()) == t.copies  # every copy is some unit's
    detail = {d["unit"]: d for d in t.unit_detail()}
    assert {n: d["copies"] for n, d in detail.items()} == t.unit_copies
    assert f"{t.units[0]}: {t.unit_copies[t.units[0]]} copies" in t.format_units()
    t.reset_counters()
    assert t.unit_copies == {}

def test_run_text_with_device_counters_and_pageable_masters():
    gib = 2**30
    figures = {"streamed_units": 20, "resident_blocks": 20, "forwards": 10, "h2d_bytes": 140 * gib,
               "h2d_per_forward": 14 * gib, "copies": 200, "stalls": 3, "overlapped_copies": True,
               "copy_ms": 5000.0, "stall_ms": 42.5,
               "memory": {"vram": {"peak_allocated": 9 * gib, "peak_reserved": 10 * gib,
                                   "allocated": 0, "reserved": 0},
                          "host_master_bytes": 14 * gib, "pinned_bytes": 10 * gib, "pageable_reason": "cap",
                          "host_rss_bytes": 40 * gib, "host_available_bytes": 8 * gib}}
    line1, line2 = format_run_text(figures).splitlines()
    assert "20 units streamed, 20 blocks resident; 10 forwards, 14.00 GiB H2D per forward" in line1
    assert "copy 5000.0 ms, stall 42.5 ms (3 stalls)" in line1
    assert line2 == ("VRAM peak 9.00 GiB allocated, 10.00 GiB reserved; host masters 14.00 GiB "
                     "(10.00 GiB pinned, 4.00 GiB pageable), RSS 40.00 GiB")
    figures["overlapped_copies"] = False
    assert "synchronous (all stall)" in format_run_text(figures)
    assert "pageable" not in format_run_text(figures)  # nothing is pinned off the async path anyway


def test_pack_version_matches_pyproject():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert re.search(r'^version = "([^"]+)"', text, re.M).group(1) == __version__


def test_node_readout_lines_fit_the_node():
    """Figures at the widest they get (a 14B model, thousands of forwards, big memory, pageable part,
    VACE and embeddings streamed): every line fits, the plan and the run lead."""
    from wan22_blockswap.readout import plan_lines

    gib = 2**30
    plan = plan_lines(streamed_blocks=range(0, 40), num_blocks=40, vace_streamed=range(0, 15), num_vace_blocks=15,
                      other_units=["text_embedding", "img_emb"], slots=41, slot_bytes=int(1.23 * gib),
                      async_copies=True)
    figures = {"streamed_units": 57, "resident_blocks": 0, "forwards": 12345, "h2d_bytes": 999 * 1000 * gib,
               "h2d_per_forward": 999 * gib, "copies": 10**6, "stalls": 123456, "overlapped_copies": True,
               "copy_ms": 7.2e6, "stall_ms": 99999.0,
               "memory": {"vram": {"peak_allocated": 141 * gib, "peak_reserved": 141 * gib, "allocated": 0,
                                   "reserved": 0},
                          "host_master_bytes": 999 * gib, "pinned_bytes": 500 * gib, "pageable_reason": "cap",
                          "host_rss_bytes": 1020 * gib, "host_available_bytes": 8 * gib}}
    lines = node_text(plan, figures, ["WARNING: " + "x" * 90]).splitlines()
    assert lines[0] == "Plan: 40/40 blocks + 15/15 VACE streamed"
    assert lines[1] == "Run: 123456 stalls, VRAM peak 141 GiB"
    assert "Host copies 999 GiB (499 GiB pageable)" in lines
    assert "Streams blocks 0-39, VACE 0-14, text" in "\n".join(lines)
    assert all(len(line) <= NODE_WIDTH for line in lines), [line for line in lines if len(line) > NODE_WIDTH]
    # no figure is cut off by the wrapping: every number of the figures is on the node
    for figure in ("12345 fwd", "123456 stalls", "999 GiB per forward", "141 GiB", "1020 GiB", "120.0 min"):
        assert figure in "\n".join(lines), figure


def test_fit_wraps_at_spaces_and_splits_clauses():
    assert fit("short") == "short"
    text = fit("WAN 2.1/2.2 14B t2v: 40 blocks; a_file_name_longer_than_forty_characters.safetensors (13.3 GiB)")
    lines = text.splitlines()
    assert lines[0] == "WAN 2.1/2.2 14B t2v: 40 blocks" and all(len(line) <= NODE_WIDTH for line in lines)
    assert "".join(lines[1:3]).startswith("a_file_name_longer_than_forty_characters.safetensors")
