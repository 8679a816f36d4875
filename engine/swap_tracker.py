"""What block swap did and where everything is: the per-model record that readouts, debug traces and
tests read, and the CUDA timing events that fill its copy and stall times.

Pure Python + torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from ..utils import format_bytes

MAX_PENDING_TIMINGS = 4096  # CUDA timing events waiting to be read; older ones are dropped
STALL_THRESHOLD_MS = 0.05  # a measured wait longer than this counts as a stall


@dataclass
class BlockSwapTracker:
    """Per-model record of the swap plan and its live state. Debug output, readouts and tests read it."""

    units: Tuple[str, ...] = ()
    resident_blocks: Tuple[int, ...] = ()
    slots: int = 0
    slot_bytes: int = 0
    location: Dict[str, str] = field(default_factory=dict)  # unit -> "host" | "slot<k>"
    slot_owner: List[Optional[str]] = field(default_factory=list)
    host_bytes: int = 0
    pinned_bytes: int = 0
    pageable_reason: str = ""
    h2d_bytes: int = 0
    d2h_bytes: int = 0  # steady state; stays 0 by construction
    setup_d2h_bytes: int = 0  # one-time, only when swapped weights were on the device at setup
    copies: int = 0
    prefetch_hits: int = 0  # unit's weights were in a slot (and, on CUDA, copied) before it ran
    stalls: int = 0  # compute had to wait for (or issue) the unit's copy
    slot_reuses: int = 0  # unit still in a slot from an earlier use: no copy at all
    forwards: int = 0
    schedule_updates: int = 0
    max_bound_units: int = 0
    hook_seconds: float = 0.0  # host time inside the engine's per-unit hooks, copies included
    copy_seconds: float = 0.0  # host time spent in synchronous copies (CPU path)
    copy_ms: Dict[str, float] = field(default_factory=dict)  # per unit, summed (CUDA events / host clock)
    stall_ms: Dict[str, float] = field(default_factory=dict)  # per unit, summed (CUDA events)
    unit_copies: Dict[str, int] = field(default_factory=dict)  # per unit, this run
    timings_dropped: int = 0
    # host masters kept on file (file_masters, staging)
    masters: str = "RAM"  # "RAM" | "file"
    spill_bytes: int = 0  # bytes written to the spill file (units whose bytes are no file's)
    staging_bytes: int = 0  # the staging ring's buffers
    read_bytes: int = 0  # this run: bytes read from files into the staging ring
    read_seconds: float = 0.0  # this run: time the reads took (on the worker thread)
    read_waits: int = 0  # this run: a unit was needed before its read had finished
    read_wait_seconds: float = 0.0  # this run: host time spent waiting for reads

    def reset_counters(self) -> None:
        """Zero the per-run counters; the plan and the live state stay."""
        for name in ("h2d_bytes", "d2h_bytes", "copies", "prefetch_hits", "stalls", "slot_reuses",
                     "forwards", "schedule_updates", "max_bound_units", "timings_dropped", "read_bytes",
                     "read_waits"):
            setattr(self, name, 0)
        self.hook_seconds = self.copy_seconds = self.read_seconds = self.read_wait_seconds = 0.0
        self.copy_ms.clear()
        self.stall_ms.clear()
        self.unit_copies.clear()

    def summary(self) -> Dict[str, object]:
        return {
            "streamed_units": len(self.units),
            "resident_blocks": len(self.resident_blocks),
            "slots": self.slots,
            "slot_bytes": self.slot_bytes,
            "host_bytes": self.host_bytes,
            "pinned_bytes": self.pinned_bytes,
            "h2d_bytes": self.h2d_bytes,
            "d2h_bytes": self.d2h_bytes,
            "setup_d2h_bytes": self.setup_d2h_bytes,
            "copies": self.copies,
            "prefetch_hits": self.prefetch_hits,
            "stalls": self.stalls,
            "slot_reuses": self.slot_reuses,
            "forwards": self.forwards,
            "schedule_updates": self.schedule_updates,
            "max_bound_units": self.max_bound_units,
            "copy_ms": round(sum(self.copy_ms.values()), 3),
            "stall_ms": round(sum(self.stall_ms.values()), 3),
            "timings_dropped": self.timings_dropped,
            "pageable_reason": self.pageable_reason,
            "masters": self.masters,
            "spill_bytes": self.spill_bytes,
            "staging_bytes": self.staging_bytes,
            "read_bytes": self.read_bytes,
            "read_ms": round(self.read_seconds * 1e3, 3),
            "read_waits": self.read_waits,
            "read_wait_ms": round(self.read_wait_seconds * 1e3, 3),
        }

    def format_summary(self) -> str:
        s = self.summary()
        per_fwd = s["h2d_bytes"] / max(1, s["forwards"])
        text = (f"{s['streamed_units']} units streamed, {s['resident_blocks']} blocks resident, "
                f"ring {s['slots']} x {format_bytes(s['slot_bytes'])}; "
                f"{s['forwards']} forwards, {s['copies']} copies, {format_bytes(s['h2d_bytes'])} H2D "
                f"({format_bytes(per_fwd)}/forward), D2H {format_bytes(s['d2h_bytes'])}; "
                f"prefetch hits {s['prefetch_hits']}, stalls {s['stalls']}, reuses {s['slot_reuses']}; "
                f"host masters {format_bytes(s['host_bytes'])} ({format_bytes(s['pinned_bytes'])} pinned)")
        if self.masters == "file":
            text += (f"; masters on file: read {format_bytes(s['read_bytes'])} in {s['read_ms']:.1f} ms, "
                     f"{s['read_waits']} read waits ({s['read_wait_ms']:.1f} ms), staging "
                     f"{format_bytes(s['staging_bytes'])}, spilled {format_bytes(s['spill_bytes'])}")
        if self.copy_ms or self.stall_ms:
            text += f"; copy {s['copy_ms']:.1f} ms, stall {s['stall_ms']:.1f} ms"
        return text

    def unit_detail(self) -> List[Dict[str, object]]:
        """Per streamed unit: copies, copy and stall time of this run, and where its weights are (the
        host master; ``slot``: a device slot still holding a copy, reused without copying if the
        unit runs next)."""
        slot_of = {name: k for k, name in enumerate(self.slot_owner) if name is not None}
        return [{"unit": name,
                 "copies": self.unit_copies.get(name, 0),
                 "copy_ms": round(self.copy_ms.get(name, 0.0), 3),
                 "stall_ms": round(self.stall_ms.get(name, 0.0), 3),
                 "location": self.location.get(name, "not packed"),
                 "slot": slot_of.get(name)}
                for name in self.units]

    def format_units(self) -> str:
        """:meth:`unit_detail` as one line per unit, for the debug log."""
        return "\n".join(
            f"  {d['unit']}: {d['copies']} copies, copy {d['copy_ms']:.2f} ms, stall {d['stall_ms']:.2f} ms, "
            f"{d['location']}" + (f" (copy kept in slot {d['slot']})" if d["slot"] is not None else "")
            for d in self.unit_detail())


class TimingLog:
    """CUDA timing events around copies (copy time) and around compute's waits for them (stall time),
    read into the tracker once they have completed: never waits for the GPU."""

    def __init__(self, tracker: BlockSwapTracker, runtime, enabled: bool):
        self.tracker, self.runtime, self.enabled = tracker, runtime, enabled
        self.pending: List[Tuple[str, str, object, object]] = []

    def event(self, stream):
        """A timing event recorded on ``stream`` now; None when timing is off."""
        if not self.enabled:
            return None
        ev = self.runtime.new_event(timing=True)
        ev.record(stream)
        return ev

    def add(self, kind: str, name: str, start, end) -> None:
        """``kind`` "copy" (of unit ``name``) or "wait" (compute waiting for its copy)."""
        if len(self.pending) >= MAX_PENDING_TIMINGS:
            self.pending.pop(0)
            self.tracker.timings_dropped += 1
        self.pending.append((kind, name, start, end))

    def drain(self) -> None:
        """Read the events that have completed; keep the others."""
        t, keep = self.tracker, []
        for kind, name, start, end in self.pending:
            if not end.query():
                keep.append((kind, name, start, end))
                continue
            ms = start.elapsed_time(end)
            if kind == "copy":
                t.copy_ms[name] = t.copy_ms.get(name, 0.0) + ms
            else:  # a wait: a stall if compute really waited for the copy
                t.stall_ms[name] = t.stall_ms.get(name, 0.0) + ms
                if ms > STALL_THRESHOLD_MS:
                    t.stalls += 1
                else:
                    t.prefetch_hits += 1
        self.pending = keep

    def clear(self) -> None:
        self.pending.clear()
