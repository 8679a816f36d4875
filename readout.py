"""The node readout: short lines of text shown on a node in ComfyUI's front end (pure, no ComfyUI).

The front end (1.45) shows a node's progress text in a box as wide as the node, in a 12 px font, and
breaks a line that does not fit anywhere, mid-word. At a swap node's default width about 40 characters
fit, and the box shows two lines before it scrolls (more when the user makes the node taller). So the
readout is built for that box: every line at most :data:`NODE_WIDTH` characters, the plan on the first
line, the last sampling run on the second, details below. The log keeps the full sentences
(callbacks.py, :func:`format_run_text`) and ``block_swap_debug`` the per-block detail (:func:`run_trace`).
Pure: nothing here imports ComfyUI.
"""
from __future__ import annotations

import textwrap
import time
from dataclasses import asdict
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import torch

from .engine.host_masters import packed_bytes
from .utils import (device_memory, device_name, device_total_memory, format_bytes, host_available_bytes,
                    host_rss_bytes, short_bytes)

NODE_WIDTH = 40  # characters a line may have to fit a swap node at its default width


def short_ms(ms: float) -> str:
    """A duration: ``42.5 ms``, ``5.00 s``, ``12.0 min``."""
    if ms < 1000:
        return f"{ms:.1f} ms" if ms < 100 else f"{ms:.0f} ms"
    s = ms / 1000
    return f"{s:.2f} s" if s < 60 else f"{s / 60:.1f} min"


def spans(indices: Sequence[int]) -> str:
    """``[3, 4, 5, 9]`` -> ``3-5, 9``."""
    out: List[str] = []
    items = sorted(indices)
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1] == items[j] + 1:
            j += 1
        out.append(str(items[i]) if i == j else f"{items[i]}-{items[j]}")
        i = j + 1
    return ", ".join(out)


def fit(text: str, width: int = NODE_WIDTH) -> str:
    """``text`` in lines of at most ``width`` characters: clauses separated by "; " go on lines of
    their own, longer lines are wrapped at spaces (a word longer than a line, e.g. a file name, is cut)."""
    lines: List[str] = []
    for line in text.splitlines():
        for clause in line.split("; "):
            lines.extend(textwrap.wrap(clause, width, break_on_hyphens=False) or ([""] if not clause else []))
    return "\n".join(lines)


def plan_lines(*, streamed_blocks: Sequence[int], num_blocks: int, vace_streamed: Sequence[int] = (),
               num_vace_blocks: int = 0, other_units: Iterable[str] = (), slots: int, slot_bytes: int,
               async_copies: bool, masters: Optional[str] = None) -> List[str]:
    """The plan: a summary line (what streams) and detail lines (the ring, where the host masters are
    and why, which blocks, copy mode)."""
    summary = f"Plan: {len(streamed_blocks)}/{num_blocks} blocks"
    if num_vace_blocks and vace_streamed:
        summary += f" + {len(vace_streamed)}/{num_vace_blocks} VACE"
    summary += " streamed"
    details = [f"Ring {slots} x {short_bytes(slot_bytes)}, " + ("pinned async copies" if async_copies
                                                               else "synchronous copies")]
    if masters:
        details.append(f"Masters: {masters}")
    what = [f"blocks {spans(streamed_blocks)}"] if streamed_blocks else []
    if vace_streamed:
        what.append(f"VACE {spans(vace_streamed)}")
    what.extend(u.replace("_", " ") for u in other_units)
    if what:
        details.append("Streams " + ", ".join(what))
    return [summary, *details]


def run_lines(f: Mapping[str, Any]) -> List[str]:
    """The last sampling run from :func:`run_figures`: a summary line (stalls and peak
    VRAM on a GPU), then bytes per forward, copy and stall time, host copies, process RAM."""
    m = f["memory"]
    vram = m.get("vram")
    if vram:
        peak = f"VRAM peak {short_bytes(vram['peak_allocated'])}"
        summary = (f"Run: {f['stalls']} stalls, {peak}" if f["overlapped_copies"]
                   else f"Run: sync copies, {peak}")
    else:
        summary = f"Run: {f['forwards']} forwards, no VRAM (CPU)"
    details = [f"H2D {short_bytes(f['h2d_per_forward'])} per forward, {f['forwards']} fwd",
               f"Copy {short_ms(f['copy_ms'])}, stall {short_ms(f['stall_ms'])}"
               + ("" if f["overlapped_copies"] else " (sync)")]
    host, pinned = m["host_master_bytes"], m["pinned_bytes"]
    if not f["overlapped_copies"]:
        details.append(f"Host copies {short_bytes(host)}")
    elif pinned >= host:
        details.append(f"Host copies {short_bytes(host)}, all pinned")
    else:
        details.append(f"Host copies {short_bytes(host)} ({short_bytes(host - pinned)} pageable)")
    if f.get("masters") == "file":
        details.append(f"Read {short_bytes(f['read_bytes'])} from file, {f['read_waits']} waits")
    details.append(f"Process RAM {short_bytes(m['host_rss_bytes'])}")
    return [summary, *details]


def node_text(plan: Sequence[str], run: Optional[Mapping[str, Any]] = None, notes: Sequence[str] = ()) -> str:
    """What the node shows: the plan's summary, then the last run's summary (both visible in the two
    lines a node shows at its default size), the run's details, the plan's details, the warnings."""
    lines = list(plan[:1])
    run_part = run_lines(run) if run is not None else []
    lines += run_part[:1] + run_part[1:] + list(plan[1:]) + list(notes)
    return fit("\n".join(lines))


# ---------------------------------------------------------------------------------------------------
# The figures behind the readout, the log's lines and the debug trace

def run_figures(engine, device=None) -> Dict[str, Any]:
    """The figures of the run that just ended: what streamed, bytes moved, copy/stall time, peak
    VRAM (this run's: ON_PRE_RUN resets the peak), host masters, pinned bytes, process RSS."""
    t, plan = engine.tracker, engine.plan
    overlapped = engine.compute_device.type == "cuda" and engine.settings.use_non_blocking
    copy_ms = sum(t.copy_ms.values())
    mem = device_memory(device) if device is not None else {}
    return {
        "streamed_units": len(plan.units),
        "resident_blocks": len(plan.resident_blocks),
        "forwards": t.forwards,
        "h2d_bytes": t.h2d_bytes,
        "h2d_per_forward": t.h2d_bytes // max(1, t.forwards),
        "copies": t.copies,
        "stalls": t.stalls,
        "overlapped_copies": overlapped,
        "copy_ms": round(copy_ms, 3),
        # Without a copy stream every copy blocks the compute that needs it: all copy time is stall.
        "stall_ms": round(sum(t.stall_ms.values()) if overlapped else copy_ms, 3),
        "masters": t.masters,
        "read_bytes": t.read_bytes,
        "read_ms": round(t.read_seconds * 1e3, 3),
        "read_waits": t.read_waits,
        "read_wait_ms": round(t.read_wait_seconds * 1e3, 3),
        "memory": {
            "vram": mem or None,  # None: no device counters (CPU)
            "host_master_bytes": t.host_bytes,
            "pinned_bytes": t.pinned_bytes,
            "pageable_reason": t.pageable_reason,
            "spill_bytes": t.spill_bytes,
            "staging_bytes": t.staging_bytes,
            "host_rss_bytes": host_rss_bytes(),
            "host_available_bytes": host_available_bytes(),
        },
    }


def format_run_text(f: Mapping[str, Any]) -> str:
    """Two lines for the log from :func:`run_figures`: streaming, then memory."""
    copies = (f"copy {f['copy_ms']:.1f} ms, stall {f['stall_ms']:.1f} ms ({f['stalls']} stalls)"
              if f["overlapped_copies"] else f"copy {f['copy_ms']:.1f} ms, synchronous (all stall)")
    line1 = (f"Block swap run: {f['streamed_units']} units streamed, {f['resident_blocks']} blocks resident; "
             f"{f['forwards']} forwards, {format_bytes(f['h2d_per_forward'])} H2D per forward; {copies}")
    m = f["memory"]
    vram = (f"VRAM peak {format_bytes(m['vram']['peak_allocated'])} allocated, "
            f"{format_bytes(m['vram']['peak_reserved'])} reserved" if m["vram"] else "VRAM peak n/a (CPU)")
    pinned = f"{format_bytes(m['pinned_bytes'])} pinned"
    if f["overlapped_copies"] and m["pinned_bytes"] < m["host_master_bytes"]:
        pinned += f", {format_bytes(m['host_master_bytes'] - m['pinned_bytes'])} pageable"
    line2 = (f"{vram}; host masters {format_bytes(m['host_master_bytes'])} ({pinned}), "
             f"RSS {format_bytes(m['host_rss_bytes'])}")
    if f.get("masters") == "file":
        line2 += (f"; masters on file: read {format_bytes(f['read_bytes'])} in {f['read_ms']:.1f} ms, waited "
                  f"{f['read_wait_ms']:.1f} ms ({f['read_waits']} waits), staging {format_bytes(m['staging_bytes'])}, "
                  f"spill file {format_bytes(m['spill_bytes'])}")
    return f"{line1}\n{line2}"


def run_trace(controller, engine, patcher, pack_version: str) -> dict:
    """The JSON-ready record of the run that just ended (``block_swap_debug``): the controller's plan,
    the engine's figures and per-unit detail, the patcher's device and accounting."""
    device = patcher.load_device
    plan, t = engine.plan, engine.tracker
    units = t.unit_detail()
    for d in units:
        target = controller.targets.get(d["unit"])
        d["bytes"] = packed_bytes(target) if target is not None else None
    return {
        "trace_format": 1,
        "pack_version": pack_version,
        "torch_version": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "comfyui_version": _comfyui_version(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "node_id": controller.node_id,
        "device": {"load_device": str(device), "name": device_name(device),
                   "total_memory": device_total_memory(device)},
        "model": {"patcher": type(patcher).__name__, "layout": asdict(plan.layout),
                  "size": getattr(patcher, "size", None),
                  "loaded_weight_memory": getattr(patcher.model, "model_loaded_weight_memory", None),
                  "lowvram": bool(getattr(patcher.model, "model_lowvram", False))},
        "plan": {"units": list(plan.units), "block_indices": list(plan.block_indices),
                 "vace_indices": list(plan.vace_indices), "resident_blocks": list(plan.resident_blocks),
                 "slots": plan.slots, "slot_bytes": t.slot_bytes, "ring_bytes": engine.device_bytes,
                 "shared_ring": engine.shared_ring is not None},
        "settings": asdict(engine.settings),
        # changes of the streamed count: after out-of-memory errors, or adaptive mode's moves
        "plan_changes": [asdict(c) for c in controller.changes],
        "oom_at": controller.oom_at,
        "adaptive": ({"ceiling": controller.adaptive.ceiling, "margin": controller.adaptive.margin,
                      "floor": controller.adaptive.floor, "count": controller.adaptive.count}
                     if controller.adaptive is not None else None),
        "summary": t.summary(),
        "units": units,
        "memory": run_figures(engine, device)["memory"],
    }


def _comfyui_version() -> Optional[str]:
    try:
        import comfyui_version  # ComfyUI's root module; absent outside ComfyUI
        return str(comfyui_version.__version__)
    except Exception:  # noqa: BLE001
        return None
