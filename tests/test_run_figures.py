"""The readout, the log and the debug trace report the run that just ended, not a running total.

Each run's expected figures come from what the test did and saw, never from the engine's tracker:
the forwards it counted (a hook on the model's patch embedding, which runs once per forward), the
bytes of one streamed block (its parameters, at the host copy's 256-byte alignment), and how a run of
F forwards over n streamed blocks in a ring of two copies them: every block once per forward, each
copy made while the block before it computes, the last block of a forward preloading the first of the
next one. Every sampling run starts with an empty ring (ComfyUI detaches the patcher it loads again at
the start of each run, and ON_DETACH frees the ring; two experts take the ring from each other), so a
run makes F*n + 1 copies: 1 stall (the very first block, fetched when it is needed) and F*n - 1
prefetch hits; each block is copied F times, the first F + 1.

Runs of different lengths one after another (3 steps, then 1, then 2 after an unload; two loops of
WanVideoLooper's pattern), each checked in the log, on the node and in the debug trace. Stand-in and
real ComfyUI (COMFYUI_PATH).
"""
import json

import pytest

import comfy.model_management as mm
import folder_paths

from wan22_blockswap import callbacks
from wan22_blockswap.callbacks import _ENGINES
from wan22_blockswap.config import unwrap
from wan22_blockswap.nodes import WAN22BlockSwapLooperModels
from wan22_blockswap.readout import short_bytes
from wan22_blockswap.utils import TRACE_PREFIX, format_bytes
from test_looper import SETTINGS as LOOPER_SETTINGS, run_loops
from test_node import load, sample, swap

ALIGN = 256  # the host copy's alignment of each tensor (host_masters.ALIGN)


pytestmark = pytest.mark.usefixtures("unload_models_after")  # conftest.py


@pytest.fixture
def node_texts(monkeypatch):
    texts = []
    monkeypatch.setattr(callbacks, "send_node_text", lambda node_id, text: texts.append(text))
    return texts


@pytest.fixture
def trace_dir(monkeypatch, tmp_path):
    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path / "out"))
    return tmp_path / "out" / "wan22_blockswap_traces"


def new_traces(directory, seen):
    """Trace files written since the last call (``seen``: the names already read)."""
    files = sorted(p for p in directory.iterdir() if p.name.startswith(TRACE_PREFIX)) if directory.exists() else []
    new = [p for p in files if p.name not in seen]
    seen.update(p.name for p in new)
    return [json.loads(p.read_text()) for p in new]


def block_bytes(module):
    return sum(-(-p.numel() * p.element_size() // ALIGN) * ALIGN for p in unwrap(module).parameters())


class ForwardCounter:
    def __init__(self, patcher):
        self.n = 0
        self.handle = patcher.model.diffusion_model.patch_embedding.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.n += 1

    def take(self):
        n, self.n = self.n, 0
        return n


def expected(forwards, streamed, nbytes):
    copies = forwards * streamed + 1
    return dict(forwards=forwards, copies=copies, h2d_bytes=copies * nbytes, stalls=1,
                prefetch_hits=forwards * streamed - 1, d2h_bytes=0)


def check_run(want, streamed_units, log_lines, node_text, trace):
    """The figures of one run in the log, on the node and in the trace, against ``want``."""
    f, per_forward = want["forwards"], want["h2d_bytes"] // want["forwards"]
    run_line = log_lines[0]
    assert f"{f} forwards, {format_bytes(per_forward)} H2D per forward" in run_line, run_line
    detail = log_lines[1]  # block_swap_debug's summary: the totals
    assert (f"{f} forwards, {want['copies']} copies, {format_bytes(want['h2d_bytes'])} H2D "
            f"({format_bytes(per_forward)}/forward), D2H 0 B; prefetch hits {want['prefetch_hits']}, "
            f"stalls {want['stalls']}") in detail, detail
    lines = node_text.splitlines()
    assert lines[1] == f"Run: {f} forwards, no VRAM (CPU)", node_text
    assert f"H2D {short_bytes(per_forward)} per forward, {f} fwd" in lines, node_text
    s = trace["summary"]
    assert {k: s[k] for k in want} == want
    # per block: once per forward; the first one once more when the run had to fetch it itself
    first = trace["plan"]["units"][0]
    copies = {u["unit"]: u["copies"] for u in trace["units"]}
    assert copies == {u: f + (u == first) for u in streamed_units}


def _run_logs(caplog, start):
    msgs = [r.getMessage() for r in caplog.records[start:]]
    return ([m for m in msgs if m.startswith("Block swap run:")], [m for m in msgs if m.startswith("block swap run detail")])


def test_each_run_reports_its_own_figures(node_texts, trace_dir, caplog):
    model = load()
    swapped = swap(model, 4, block_swap_debug=True)
    units = [f"blocks.{i}" for i in range(4, 8)]
    nbytes = block_bytes(model.model.diffusion_model.blocks[7])
    assert {block_bytes(model.model.diffusion_model.blocks[i]) for i in range(4, 8)} == {nbytes}
    counter = ForwardCounter(swapped)
    seen = set()
    try:
        for steps, unload_before in ((3, False), (1, False), (2, True)):
            if unload_before:
                mm.unload_all_models()
            start = len(caplog.records)
            with caplog.at_level("INFO", logger="wan22_blockswap"):
                sample(swapped, steps=steps)
            forwards = counter.take()
            assert forwards == steps  # cond and uncond in one batch: a forward per step
            runs, details = _run_logs(caplog, start)
            assert len(runs) == len(details) == 1
            traces = new_traces(trace_dir, seen)
            assert len(traces) == 1
            check_run(expected(forwards, len(units), nbytes), units, [runs[0], details[0]],
                      node_texts[-1], traces[0])
    finally:
        counter.handle.remove()
    assert _ENGINES[swapped.model.diffusion_model].tracker.d2h_bytes == 0


def test_each_looper_call_reports_its_own_figures(node_texts, trace_dir, caplog):
    """WanVideoLooper's pattern, two loops: each sampler call's figures are that call's, for both
    experts (they share one ring, so every call starts by taking it from the other)."""
    high, low = load(seed=0), load(seed=1)
    ph, pl = WAN22BlockSwapLooperModels().apply(high, low, **dict(LOOPER_SETTINGS, block_swap_debug=True))
    streamed = [f"blocks.{i}" for i in range(8 - LOOPER_SETTINGS["blocks_to_swap"], 8)]
    nbytes = block_bytes(high.model.diffusion_model.blocks[7])
    counters = [ForwardCounter(ph), ForwardCounter(pl)]
    seen, per_loop = set(), []
    del node_texts[:]  # what the node showed when it ran; the runs' texts follow

    def after_loop(i):  # each expert ran one sampler call in this loop
        per_loop.append([c.take() for c in counters])

    try:
        with caplog.at_level("INFO", logger="wan22_blockswap"):
            run_loops(ph, pl, loops=2, on_loop=after_loop)
    finally:
        for c in counters:
            c.handle.remove()
    runs, details = _run_logs(caplog, 0)
    traces = new_traces(trace_dir, seen)
    assert len(runs) == len(details) == len(traces) == len(node_texts) == 4  # high, low, high, low
    calls = [f for loop in per_loop for f in loop]
    assert all(f >= 2 for f in calls), calls
    for i, forwards in enumerate(calls):
        check_run(expected(forwards, len(streamed), nbytes), streamed, [runs[i], details[i]],
                  node_texts[i], traces[i])
