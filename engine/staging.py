"""The staging ring: a few pinned host buffers that units kept on file are read into just ahead of use,
and the reads that fill them.

Pure torch. A unit whose host master is a file (:mod:`file_masters`) streams in two steps: its bytes
are read from the file into a staging buffer (laid out as its slot will be: weights, then its extras),
then copied from there into the slot as any pinned master is (:mod:`device_ring`). Reads run on a
worker thread and are issued ahead, in the order the schedule expects the units, as far as the ring's
buffers allow; the device copies overlap compute as before.

A staging buffer is read by an asynchronous copy, so it is refilled only once that copy is done: the
copy records the buffer's event on the copy stream, and the worker waits on it (host side) before it
writes the buffer again. The compute stream never waits for a read; the host waits only when a unit
is needed and its read has not finished (counted as a read wait). Without a worker thread (the CPU
path and the stream-order tests) the same reads run synchronously when they are issued.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import List, Optional, Sequence, Set, Tuple

import torch

from .host_masters import _page_span

__all__ = ["Staging"]


class Staging:
    """``count`` buffers of the largest footprint among the units kept on file.

    ``pinned``: a :class:`host_masters.PinnedMemory` where copies go to a CUDA device (buffers then
    page-locked within its budget). ``runtime`` / ``async_copies``: as the ring's. ``threaded``: reads
    on a worker thread (else synchronously when issued)."""

    def __init__(self, count: int, tracker, runtime, async_copies: bool, pinned=None, threaded: bool = False):
        self.count = max(1, count)
        self.tracker, self.rt, self.async_copies, self.pinned = tracker, runtime, async_copies, pinned
        self.threaded = threaded
        self.buffers: List[torch.Tensor] = []
        self.holds: List[Optional[object]] = []  # the unit each buffer holds (or is being read into it)
        self.jobs: List[Optional[Future]] = []  # the read that fills each buffer
        self.free_ev: List = []  # per buffer: recorded after the copy that read it (async copies)
        self.copied_since_read: List[bool] = []  # free_ev covers the last use of the buffer's bytes
        self.counted: List[bool] = []  # the read's figures are in the tracker
        self._stamp: List[int] = []
        self._clock = 0
        self._executor: Optional[ThreadPoolExecutor] = None
        # Tests wrap this to see each read: read(unit, buffer view) fills the view with the unit's bytes.
        self.read = _read_unit

    # ------------------------------------------------------------------ memory
    @property
    def nbytes(self) -> int:
        """Host bytes the buffers take: whole pages (what page-locking registers)."""
        return sum(_page_span(b) for b in self.buffers)

    @property
    def all_pinned(self) -> bool:
        return self.pinned is not None and bool(self.buffers) and all(self.pinned.holds(b) for b in self.buffers)

    def alloc(self, nbytes: int) -> None:
        """Buffers of ``nbytes`` each (nothing when they are already that large)."""
        if self.buffers and self.buffers[0].numel() >= nbytes:
            return
        self.release()
        if nbytes == 0:
            return
        k = self.count
        self.buffers = [self.pinned.buffer(nbytes) if self.pinned is not None else torch.empty(nbytes, dtype=torch.uint8)
                        for _ in range(k)]
        self.holds, self.jobs, self.copied_since_read, self.counted = [None] * k, [None] * k, [False] * k, [False] * k
        self._stamp = [0] * k
        self.free_ev = [self.rt.new_event() for _ in range(k)] if self.async_copies else [None] * k
        self.tracker.staging_bytes = self.nbytes

    def release(self) -> None:
        """Free the buffers; the reads in flight finish first (they write into them)."""
        self.drain()
        if self.pinned is not None:
            for b in self.buffers:
                self.pinned.unpin(b)
        self.buffers, self.holds, self.jobs, self.free_ev, self.copied_since_read, self.counted, self._stamp = (
            [], [], [], [], [], [], [])
        self.tracker.staging_bytes = 0

    def drain(self) -> None:
        """Wait for every read in flight (errors are kept for :meth:`take`)."""
        for job in self.jobs:
            if job is not None:
                job.exception()

    def shutdown(self) -> None:
        self.release()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # ------------------------------------------------------------------ reads
    def staged(self, unit) -> Optional[int]:
        return next((b for b, u in enumerate(self.holds) if u is unit), None)

    def ready(self, unit) -> bool:
        """``unit``'s read has finished (successfully or not)."""
        b = self.staged(unit)
        return b is not None and self.jobs[b] is not None and self.jobs[b].done()

    def want(self, units: Sequence[object]) -> None:
        """Start reading the first ``count`` of ``units`` (in the order they will be needed) that are not
        staged yet, into buffers holding none of them (the least recently filled first)."""
        wanted = list(units[:self.count])
        keep = set(map(id, wanted))
        for u in wanted:
            if self.staged(u) is None:
                b = self._pick(keep)
                if b is None:
                    return
                self._issue(b, u)

    def take(self, unit) -> Tuple[int, torch.Tensor]:
        """The buffer holding ``unit``'s bytes, waiting for its read if it is still running. Raises the
        read's :class:`file_masters.FileReadError` (the buffer is then empty)."""
        b = self.staged(unit)
        if b is None:
            b = self._pick({id(unit)}, force=True)
            self._issue(b, unit)
        job = self.jobs[b]
        if not job.done():
            self.tracker.read_waits += 1
        t0 = time.perf_counter()
        try:
            seconds, nbytes = job.result()
        except BaseException:
            self.holds[b], self.jobs[b] = None, None
            raise
        finally:
            self.tracker.read_wait_seconds += time.perf_counter() - t0
        if not self.counted[b]:  # a unit taken twice from one read is one read
            self.counted[b] = True
            self.tracker.read_seconds += seconds
        return b, self.buffers[b][:unit.footprint]

    def copied(self, b: int, stream) -> None:
        """The copy out of buffer ``b`` has been issued on ``stream``: the buffer may be refilled once it
        is done."""
        if self.async_copies:
            self.free_ev[b].record(stream)
            self.copied_since_read[b] = True

    def clear(self) -> None:
        """Forget what the buffers hold (the units' extras changed): everything is read again."""
        self.drain()
        self.holds, self.jobs = [None] * len(self.buffers), [None] * len(self.buffers)

    def _pick(self, keep: Set[int], force: bool = False) -> Optional[int]:
        free = [b for b, u in enumerate(self.holds) if u is None or id(u) not in keep]
        if not free:
            if not force:
                return None
            free = list(range(len(self.holds)))
        return min(free, key=lambda b: (self.holds[b] is not None, self._stamp[b]))

    def _issue(self, b: int, unit) -> None:
        if self.jobs[b] is not None:
            self.jobs[b].exception()  # the buffer's last read must be over before it is reused
        if self.buffers[b].numel() < unit.footprint:  # its extras grew since the buffers were made
            self.alloc(unit.footprint)
        ev = self.free_ev[b] if self.copied_since_read[b] else None
        self.copied_since_read[b] = False
        self.holds[b], self.counted[b] = unit, False
        self._clock += 1
        self._stamp[b] = self._clock
        view = self.buffers[b][:unit.footprint]
        self.tracker.read_bytes += sum(r.nbytes for r in unit.reads)  # counted when asked for, on this thread
        if self.threaded:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wan22bs-read")
            self.jobs[b] = self._executor.submit(self._job, unit, view, ev)
        else:
            job: Future = Future()
            try:
                job.set_result(self._job(unit, view, ev))
            except BaseException as e:  # kept for take(): the error belongs to the unit that needs it
                job.set_exception(e)
            self.jobs[b] = job

    def _job(self, unit, view: torch.Tensor, ev) -> Tuple[float, int]:
        if ev is not None:
            ev.synchronize()  # the copy that read this buffer last has finished: it may be overwritten
        t0 = time.perf_counter()
        nbytes = self.read(unit, view)
        return time.perf_counter() - t0, nbytes


def _read_unit(unit, view: torch.Tensor) -> int:
    """Fill ``view`` (the unit's slot layout) with its bytes: every read of its file master, then its
    extras (LoRA factors, kept in RAM) right behind the weights. Returns the bytes read from files."""
    n = 0
    for r in unit.reads:
        r.source.read_into(view[r.dst:r.dst + r.nbytes], r.offset)
        n += r.nbytes
    if unit.extras is not None:
        base = unit.footprint - unit.extras.numel()
        view[base:base + unit.extras.numel()].copy_(unit.extras)
    return n


