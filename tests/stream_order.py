"""A recording stand-in for the engine's CUDA runtime, and a checker of the stream order it records.

The engine issues every CUDA call through a runtime object (``cuda_runtime.CudaRuntime``). The
:class:`RecordingRuntime` has the same methods but runs on a CPU: streams and events are recorders,
copies are done at once and logged with their stream, page-locking is only noted. With it the engine
takes its asynchronous path (pinned masters, copy stream, events) on a machine without a GPU, and
:func:`check` verifies the protocol from the log, with happens-before computed as CUDA defines it:

* work on one stream runs in issue order;
* ``event.record(s)`` captures the work issued on ``s`` so far; ``s2.wait_event(event)`` makes work
  issued on ``s2`` afterwards start after what the event captured (its latest record);
* a blocking copy (pageable memory) and a synchronize return to the host only when that work is
  done, so everything the host issues afterwards follows it.

Rules checked for every slot (a device buffer of the ring):
  (A) each use of a slot (a block's kernels, or the slot transform) follows the copy that filled the
      slot with that block's weights;
  (B) each copy into a slot follows every use of what the slot held before, and the previous copy.
And for every staging buffer (host masters on file: units are read from their file into a pinned
staging buffer, then copied from it into a slot):
  (C) each host write into a staging buffer (a read from the file, recorded with :meth:`host_write`)
      follows every copy out of that buffer issued before it: the host must have waited for them.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch


@dataclass
class Op:
    kind: str  # copy | wait | record | use | sync | device_sync
    index: int
    stream: Optional["FakeStream"]
    clock: Dict[int, int] = field(default_factory=dict)  # stream id -> last op index known done before
    event: Optional["FakeEvent"] = None
    dst: int = 0  # copy: destination pointer; use: a pointer inside the slot used
    src: int = 0  # copy: source pointer (a host master)
    blocking: bool = False
    unit: str = ""


class FakeStream:
    def __init__(self, rt: "RecordingRuntime", sid: int):
        self.rt, self.id = rt, sid

    def wait_event(self, event: "FakeEvent") -> None:
        self.rt._wait(self, event)

    def synchronize(self) -> None:
        self.rt._sync_stream(self)

    def __repr__(self):
        return f"stream{self.id}"


class FakeEvent:
    def __init__(self, rt: "RecordingRuntime", timing: bool):
        self.rt, self.timing = rt, timing
        self.clock: Optional[Dict[int, int]] = None  # what the latest record captured

    def record(self, stream: Optional[FakeStream] = None) -> None:
        self.rt._record(self, stream if stream is not None else self.rt._current)

    def query(self) -> bool:
        return self.rt.events_complete

    def elapsed_time(self, other: "FakeEvent") -> float:
        return 0.01

    def synchronize(self) -> None:
        if self.clock is not None:
            self.rt._host = _merge(self.rt._host, self.clock)


def _merge(a: Dict[int, int], b: Dict[int, int]) -> Dict[int, int]:
    out = dict(a)
    for k, v in b.items():
        if out.get(k, -1) < v:
            out[k] = v
    return out


class RecordingRuntime:
    """The engine's runtime on a CPU, recording what it is asked to do (see the module doc)."""

    def __init__(self):
        self.ops: List[Op] = []
        self.streams: List[FakeStream] = []
        self._host: Dict[int, int] = {}  # work the host knows to be complete
        self._last: Dict[int, int] = {}  # last op index per stream
        self._stream_clock: Dict[int, Dict[int, int]] = {}
        self.default = self.new_stream(None)
        self._current = self.default
        self.registered: Dict[int, int] = {}
        self.register_rc = 0
        self.unregister_rc = 0
        self.cleared_errors = 0
        self.events_complete = True  # what Event.query answers (False: the device is still busy)
        self.streams_created = 0

    # ------------------------------------------------------------------ the runtime's interface
    def new_stream(self, device) -> FakeStream:
        s = FakeStream(self, len(self.streams))
        self.streams.append(s)
        self._stream_clock[s.id] = {}
        if len(self.streams) > 1:
            self.streams_created += 1
        return s

    def new_event(self, timing: bool = False) -> FakeEvent:
        return FakeEvent(self, timing)

    def current_stream(self, device) -> FakeStream:
        return self._current

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream: FakeStream, non_blocking: bool) -> None:
        dst.copy_(src)
        op = self._issue("copy", stream, dst=dst.data_ptr(), src=src.data_ptr(), blocking=not non_blocking)
        if op.blocking:  # the host waits for it
            self._host = _merge(self._host, {**op.clock, stream.id: op.index})

    def synchronize(self, device) -> None:
        self._issue("device_sync", None)
        self.events_complete = True
        self._host = _merge(self._host, self._last)

    def host_register(self, ptr: int, nbytes: int) -> int:
        if self.register_rc == 0:
            self.registered[ptr] = nbytes
        return self.register_rc

    def host_unregister(self, ptr: int) -> int:
        self.registered.pop(ptr, None)
        return self.unregister_rc

    def clear_error(self) -> None:
        self.cleared_errors += 1

    # ------------------------------------------------------------------ what the tests record
    @contextlib.contextmanager
    def on(self, stream: FakeStream):
        """Run the enclosed forward with ``stream`` as the current (compute) stream."""
        old, self._current = self._current, stream
        try:
            yield
        finally:
            self._current = old

    def use(self, unit: str, ptr: int) -> None:
        """Kernels of ``unit`` reading (or the slot transform writing) memory at ``ptr``."""
        self._issue("use", self._current, dst=ptr, unit=unit)

    def host_write(self, unit: str, ptr: int) -> None:
        """The host writes ``unit``'s bytes into host memory at ``ptr`` now (a read into staging)."""
        self._issue("host_write", None, dst=ptr, unit=unit)

    # ------------------------------------------------------------------ bookkeeping
    def _issue(self, kind: str, stream: Optional[FakeStream], **kw) -> Op:
        index = len(self.ops)
        clock = _merge(self._stream_clock[stream.id], self._host) if stream is not None else dict(self._host)
        op = Op(kind, index, stream, clock, **kw)
        self.ops.append(op)
        if stream is not None:
            self._last[stream.id] = index
            self._stream_clock[stream.id] = clock
        return op

    def _record(self, event: FakeEvent, stream: FakeStream) -> None:
        op = self._issue("record", stream, event=event)
        event.clock = {**op.clock, stream.id: op.index}

    def _wait(self, stream: FakeStream, event: FakeEvent) -> None:
        op = self._issue("wait", stream, event=event)
        if event.clock is not None:  # waiting on a never-recorded event waits for nothing
            self._stream_clock[stream.id] = _merge(self._stream_clock[stream.id], event.clock)
            op.clock = dict(self._stream_clock[stream.id])

    def _sync_stream(self, stream: FakeStream) -> None:
        self._issue("sync", None)
        if stream.id in self._last:
            self._host = _merge(self._host, {**self._stream_clock[stream.id], stream.id: self._last[stream.id]})


class SabotagedRuntime(RecordingRuntime):
    """Drops one kind of call the engine makes: ``"wait"`` (a stream does not wait for an event),
    ``"record"`` (an event is not recorded) or ``"host_wait"`` (the host does not wait for an event).
    The checker must then find a violation."""

    def __init__(self, drop: str):
        super().__init__()
        self.drop = drop

    def new_event(self, timing: bool = False) -> FakeEvent:
        ev = super().new_event(timing)
        if self.drop == "host_wait":
            ev.synchronize = lambda: None
        return ev

    def _wait(self, stream, event):
        if self.drop != "wait":
            super()._wait(stream, event)

    def _record(self, event, stream):
        if self.drop != "record":
            super()._record(event, stream)


def happens_before(a: Op, b: Op) -> bool:
    if a.stream is None:  # host-side ops (synchronize) are not slot work
        return a.index < b.index
    if b.stream is not None and a.stream is b.stream:
        return a.index < b.index
    return b.clock.get(a.stream.id, -1) >= a.index


def check(rt: RecordingRuntime, slots: List[Tuple[int, int]], masters: Dict[int, str],
          staging: List[Tuple[int, int]] = ()) -> Dict[str, int]:
    """Assert rules (A), (B) and (C) (module doc) over the recorded log. ``slots``: (pointer, bytes) of
    every slot buffer; ``masters``: host master pointer -> unit name; ``staging``: (pointer, bytes) of
    every staging buffer, whose unit is the one last written into it. Returns counts of what was checked."""

    def slot_of(ptr: int) -> Optional[int]:
        return next((k for k, (lo, n) in enumerate(slots) if lo <= ptr < lo + n), None)

    def staging_of(ptr: int) -> Optional[int]:
        return next((k for k, (lo, n) in enumerate(staging) if lo <= ptr < lo + n), None)

    last_copy: Dict[int, Op] = {}
    uses_since: Dict[int, List[Op]] = {}
    staged: Dict[int, str] = {}  # staging buffer -> unit written into it last
    copies_out: Dict[int, List[Op]] = {}  # staging buffer -> copies out of it
    counts = {"copies": 0, "uses": 0, **({"host_writes": 0} if staging else {})}
    for op in rt.ops:
        if op.kind == "host_write":
            b = staging_of(op.dst)
            if b is None:
                continue
            for cp in copies_out.get(b, []):
                assert happens_before(cp, op), (f"(C) the read of {op.unit} into staging buffer {b} (op {op.index}) may "
                                                f"overwrite it while the copy of {cp.unit} out of it (op {cp.index}) runs")
            staged[b], copies_out[b] = op.unit, []
            counts["host_writes"] += 1
            continue
        if op.kind == "copy":
            k = slot_of(op.dst)
            if k is None:
                continue  # not a slot (a test's own copy)
            b = staging_of(op.src)
            op.unit = staged.get(b, "?") if b is not None else masters.get(op.src, "?")
            if b is not None:
                copies_out[b].append(op)
            prev = last_copy.get(k)
            assert prev is None or happens_before(prev, op), f"(B) copy of {op.unit} into slot {k} may overtake the previous copy ({prev.unit})"
            for use in uses_since.get(k, []):
                assert happens_before(use, op), (f"(B) copy of {op.unit} into slot {k} (op {op.index}) may overwrite it "
                                                 f"while {use.unit} still reads it (op {use.index} on {use.stream})")
            last_copy[k], uses_since[k] = op, []
            counts["copies"] += 1
        elif op.kind == "use":
            k = slot_of(op.dst)
            assert k is not None, f"{op.unit} ran from memory outside the ring"
            cp = last_copy.get(k)
            assert cp is not None and cp.unit == op.unit, (
                f"(A) {op.unit} used slot {k} holding {cp.unit if cp else 'nothing'}")
            assert happens_before(cp, op), (f"(A) {op.unit} (op {op.index} on {op.stream}) may read slot {k} "
                                            f"before its copy (op {cp.index} on {cp.stream}) is done")
            uses_since.setdefault(k, []).append(op)
            counts["uses"] += 1
    return counts
