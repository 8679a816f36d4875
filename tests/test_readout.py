"""The per-run readout: node text and log after every sampling run, the debug detail and trace file.

Runs against the stand-in (or a real ComfyUI with COMFYUI_PATH). The node text is captured at
``callbacks.send_node_text``, so the test does not depend on a front end being connected.

Every expected figure comes from what the test did, never from the tracker the text was made from:
the forwards it counted (a hook on the patch embedding, which runs once per forward), the bytes of a
streamed block (its parameters at the host copy's 256-byte alignment; every block of the tiny model
has the same), and how a run of F forwards over n streamed blocks in a ring of two copies them (every
block once per forward, the first once more: it is fetched when needed at the start and preloaded
for a next forward at the end), so F*n + 1 copies, 1 stall and F*n - 1 prefetch hits; times are
bounded by the run's own wall-clock time, memory by the test's own reading of /proc.
"""
import json
import os
import re
import sys
import tempfile
import time
import types
from pathlib import Path

import pytest
import torch


from wan22_blockswap import callbacks
from wan22_blockswap.callbacks import _ENGINES
from wan22_blockswap.readout import format_run_text
from wan22_blockswap.readout import NODE_WIDTH, fit, node_text, short_bytes, short_ms
from wan22_blockswap.utils import TRACE_PREFIX, __version__, format_bytes, write_trace
from test_node import load, sample, swap

ALIGN = 256  # each tensor's alignment in a host copy and a slot (host_masters.ALIGN)
STEPS = 3
VERSION = re.search(r'^version = "([^"]+)"', (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(),
                    re.M).group(1)


pytestmark = pytest.mark.usefixtures("unload_models_after")  # conftest.py


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


def _proc_kib(path, field):
    """A field of a /proc file, in bytes (read here, not through the pack's psutil helpers)."""
    for line in Path(path).read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def block_bytes(module):
    return sum(-(-p.numel() * p.element_size() // ALIGN) * ALIGN for p in module.parameters())


class Run:
    """One sampling run of ``patcher`` with what the test saw: forwards, wall time, RSS after it."""

    def __init__(self, patcher, streamed=4, steps=STEPS):
        dm = patcher.model.diffusion_model
        count = []
        handle = dm.patch_embedding.register_forward_pre_hook(lambda m, a: count.append(1))
        t0 = time.perf_counter()
        try:
            self.out = sample(patcher, steps=steps)
        finally:
            handle.remove()
        self.wall_ms = (time.perf_counter() - t0) * 1e3
        self.rss = _proc_kib("/proc/self/status", "VmRSS")
        self.forwards = len(count)
        self.block = block_bytes(real_block(patcher))
        self.streamed = streamed
        self.copies = self.forwards * streamed + 1
        self.h2d = self.copies * self.block
        self.per_forward = self.h2d // self.forwards


def real_block(patcher):
    stand_in = patcher.object_patches["diffusion_model.blocks.7"]
    return stand_in.swapped_module


def test_node_text_and_log_report_what_the_run_did(node_texts, caplog, trace_dir):
    model = load()
    swapped = swap(model, 4)
    with caplog.at_level("INFO", logger="wan22_blockswap"):
        run = Run(swapped)
    assert run.forwards == STEPS  # cond and uncond in one batch: one forward a step
    if swapped.load_device.type == "cuda":
        pytest.skip("the figures below are the CPU's (synchronous copies, no VRAM counters)")
    # the log: two full lines
    log_text = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Block swap run:"))
    line1, line2 = log_text.splitlines()
    m = re.fullmatch(rf"Block swap run: 4 units streamed, 4 blocks resident; {STEPS} forwards, "
                     rf"{re.escape(format_bytes(run.per_forward))} H2D per forward; "
                     r"copy ([0-9.]+) ms, synchronous \(all stall\)", line1)
    assert m, line1
    copy_ms = float(m.group(1))
    assert 0 < copy_ms <= run.wall_ms  # the copies took time, within the run
    m = re.fullmatch(rf"VRAM peak n/a \(CPU\); host masters {re.escape(format_bytes(4 * run.block))} "
                     r"\(0 B pinned\), RSS ([0-9.]+) (MiB|GiB)", line2)
    assert m, line2  # MiB under pytest alone, GiB in a process that has imported more (ComfyUI's)
    rss = float(m.group(1)) * (2**20 if m.group(2) == "MiB" else 2**30)
    assert abs(rss - run.rss) < 0.1 * run.rss
    # the node: the plan made when the node ran, then this run, in lines that fit the node
    node, text = node_texts[-1]
    assert node == "7"
    lines = text.splitlines()
    assert lines[:3] == ["Plan: 4/8 blocks streamed", f"Run: {STEPS} forwards, no VRAM (CPU)",
                         f"H2D {short_bytes(run.per_forward)} per forward, {STEPS} fwd"]
    m = re.fullmatch(r"Copy (.+), stall (.+) \(sync\)", lines[3])
    assert m and m.group(1) == m.group(2) == short_ms(copy_ms), lines[3]  # synchronous: all copy time stalls
    assert lines[4] == f"Host copies {short_bytes(4 * run.block)}"
    assert lines[5].startswith("Process RAM ")
    assert lines[6] == f"Ring 2 x {short_bytes(run.block)}, synchronous copies" and lines[8:] == ["Streams blocks 4-7"]
    # where the host masters are and why: RAM (auto; a tiny model's copies fit), 4 blocks' bytes
    assert re.fullmatch(rf"Masters: RAM \({re.escape(short_bytes(4 * run.block))} fits in [\d.]+ \wiB\)", lines[7]), lines[7]
    assert all(len(line) <= NODE_WIDTH for line in lines), text
    assert _traces(trace_dir) == []  # no trace without block_swap_debug


def test_node_text_keeps_the_plan_and_the_warnings_with_every_run(node_texts, monkeypatch):
    model = load()
    swapped = swap(model, 4)
    controller = swapped.object_patches["diffusion_model.blocks.7"]._controller
    monkeypatch.setattr(controller, "readout_notes", ["a warning made when the node ran, long enough to be wrapped"])
    for steps in (2, 1):
        run = Run(swapped, steps=steps)
        lines = node_texts[-1][1].splitlines()
        assert lines[0] == "Plan: 4/8 blocks streamed" and lines[1].startswith("Run: ")
        assert f"H2D {short_bytes(run.per_forward)} per forward, {steps} fwd" in lines  # this run's
        assert lines[-2:] == ["a warning made when the node ran, long", "enough to be wrapped"]


def test_debug_writes_per_unit_detail_and_a_json_trace(node_texts, caplog, trace_dir):
    model = load()
    resident = sum(t.numel() * t.element_size() for n, t in model.model.named_parameters()
                   if not re.match(r"diffusion_model\.blocks\.[4-7]\.", n))
    resident += sum(t.numel() * t.element_size() for t in model.model.buffers())
    swapped = swap(model, 4, block_swap_debug=True)
    with caplog.at_level("INFO", logger="wan22_blockswap"):
        run = Run(swapped)
    available = _proc_kib("/proc/meminfo", "MemAvailable")
    units = [f"blocks.{i}" for i in range(4, 8)]
    messages = [r.getMessage() for r in caplog.records]
    detail = next(m for m in messages if m.startswith("block swap run detail"))
    for i, u in enumerate(units):  # per-unit lines: this run's copies, back on the host copy
        assert re.search(rf"^  {u}: {STEPS + (i == 0)} copies, copy [0-9.]+ ms, stall 0\.00 ms, host", detail, re.M), u
    files = _traces(trace_dir)
    assert len(files) == 1 and "_node7" in files[0].name
    assert any(str(files[0]) in m for m in messages)  # the path is logged
    trace = json.loads(files[0].read_text())
    cpu = swapped.load_device.type == "cpu"
    if not cpu:
        pytest.skip("the figures below are the CPU's")
    assert trace["trace_format"] == 1 and trace["pack_version"] == VERSION
    assert trace["torch_version"] == torch.__version__ and trace["node_id"] == "7"
    assert trace["device"] == {"load_device": "cpu", "name": "cpu", "total_memory": None}
    assert trace["model"]["lowvram"] is False
    assert trace["model"]["loaded_weight_memory"] == resident + 2 * run.block  # resident part + the ring
    assert trace["plan"] == {"units": units, "block_indices": [4, 5, 6, 7], "vace_indices": [],
                             "resident_blocks": [0, 1, 2, 3], "slots": 2, "slot_bytes": run.block,
                             "ring_bytes": 2 * run.block, "shared_ring": False}
    assert trace["settings"] == {"blocks_to_swap": 4, "placement": "last", "prefetch_blocks": 1,
                                 "vace_blocks_to_swap": 0, "offload_txt_emb": False, "offload_img_emb": False,
                                 "use_non_blocking": True, "pin_budget_bytes": None, "host_memory": "RAM",
                                 # the spill folder outside ComfyUI's temp folder (this fixture's folder_paths has
                                 # none): the OS's temp folder
                                 "spill_dir": tempfile.gettempdir()}
    summary = dict(trace["summary"])
    copy_ms = summary.pop("copy_ms")
    assert 0 < copy_ms <= run.wall_ms
    assert summary == {"streamed_units": 4, "resident_blocks": 4, "slots": 2, "slot_bytes": run.block,
                       "host_bytes": 4 * run.block, "pinned_bytes": 0, "h2d_bytes": run.h2d, "d2h_bytes": 0,
                       "setup_d2h_bytes": 0, "copies": run.copies, "prefetch_hits": run.copies - 2, "stalls": 1,
                       "slot_reuses": 0, "forwards": STEPS, "schedule_updates": 0, "max_bound_units": 1,
                       "stall_ms": 0, "timings_dropped": 0, "pageable_reason": "",
                       # masters in RAM: nothing read from files, no staging ring, nothing spilled
                       "masters": "RAM", "spill_bytes": 0, "staging_bytes": 0, "read_bytes": 0, "read_ms": 0,
                       "read_waits": 0, "read_wait_ms": 0}
    detail = {u.pop("unit"): u for u in trace["units"]}
    assert sorted(detail) == units
    assert sum(u.pop("copy_ms") for u in detail.values()) == pytest.approx(copy_ms, abs=0.01)
    # the last forward ended on block 7 and preloaded block 4 for a next one: those two stay in the ring
    assert detail == {u: {"copies": STEPS + (u == "blocks.4"), "stall_ms": 0.0, "location": "host",
                          "slot": detail[u]["slot"], "bytes": run.block} for u in units}
    assert {u for u, d in detail.items() if d["slot"] is not None} == {"blocks.4", "blocks.7"}
    mem = trace["memory"]
    assert {k: mem[k] for k in ("vram", "host_master_bytes", "pinned_bytes", "pageable_reason")} == {
        "vram": None, "host_master_bytes": 4 * run.block, "pinned_bytes": 0, "pageable_reason": ""}
    assert abs(mem["host_rss_bytes"] - run.rss) < 0.1 * run.rss
    assert abs(mem["host_available_bytes"] - available) < 0.2 * available


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
        run = Run(swapped)
    assert torch.equal(run.out, reference)
    assert any(r.levelname == "WARNING" and "could not write the debug trace" in r.getMessage()
               for r in caplog.records)
    lines = node_texts[-1][1].splitlines()  # the readout still reached the node, with this run's figures
    assert lines[:3] == ["Plan: 4/8 blocks streamed", f"Run: {STEPS} forwards, no VRAM (CPU)",
                         f"H2D {short_bytes(run.per_forward)} per forward, {STEPS} fwd"]


def test_engine_counts_copies_per_unit():
    model = load()
    swapped = swap(model, 4, block_swap_debug=True)
    run = Run(swapped)
    t = _ENGINES[swapped.model.diffusion_model].tracker
    expected = {f"blocks.{i}": run.forwards + (i == 4) for i in range(4, 8)}  # the first: preloaded again
    assert t.unit_copies == expected
    assert {d["unit"]: d["copies"] for d in t.unit_detail()} == expected
    assert "  blocks.4: 4 copies, copy " in t.format_units()
    t.reset_counters()
    assert t.unit_copies == {} and [d["copies"] for d in t.unit_detail()] == [0, 0, 0, 0]


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
