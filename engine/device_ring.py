"""The device ring: K flat device buffers ("slots") the streamed units take turns in, the copy stream
that fills them and the events that order the copies against compute.

Pure torch. Filling a slot is one contiguous copy of a unit's host master (and of its extras, right
behind it) on the copy stream, after a wait on the event recorded when the slot was last used; the
copy records the slot's copy-done event, which compute waits on before it uses the unit. No
synchronize in the steady state. Without a runtime (CPU) the same copies run synchronously.
:class:`SharedRing` lets the models of a pipeline (the two WAN 2.2 experts) take turns with one set
of slots.
"""
from __future__ import annotations

import time
import weakref
from typing import Callable, List, Optional, Sequence, Set, Tuple

import torch

from ..config import tensor_bytes
from .host_masters import _align, _Unit, bind, bindings
from .staging import Staging
from .swap_tracker import BlockSwapTracker, TimingLog
from ..utils import as_device


class DeviceRing:
    """The slots of one engine. ``runtime`` None: synchronous copies (CPU). ``async_copies``: copies on
    a side stream with events (CUDA, or a recording runtime in tests)."""

    def __init__(self, units: Sequence[_Unit], count: int, device: torch.device, runtime, async_copies: bool,
                 timings: TimingLog, tracker: BlockSwapTracker, staging: Optional[Staging] = None):
        self.units, self.count, self.device = units, count, device
        self.staging = staging  # where units kept on file are read into before their copy (staging.py)
        self.rt, self.async_copies, self.timings, self.tracker = runtime, async_copies, timings, tracker
        self.slots: List[torch.Tensor] = []
        self.owner: List[Optional[int]] = []  # unit index per slot
        self.last_use: List[int] = []
        self._uses = 0
        self.copy_stream = None  # one per engine: a ring comes back on every expert switch
        self.copy_ev: List = []
        self.free_ev: List = []
        self.bound: Set[_Unit] = set()  # units whose parameters point into a slot right now
        self.deferred: Optional[Tuple[List[int], Set[int]]] = None  # pageable prefetches, see prefetch
        self.shared: Optional[SharedRing] = None
        self._on_taken_away: Optional[weakref.WeakMethod] = None

    def notify_taken_away(self, method: Callable[[], None]) -> None:
        """Call ``method`` (a bound method, held weakly: the ring never keeps its engine alive) when
        another ring takes the shared slots away; its owner must stop using them."""
        self._on_taken_away = weakref.WeakMethod(method)

    def taken_away(self) -> None:
        method = self._on_taken_away() if self._on_taken_away is not None else None
        if method is not None:
            method()

    @property
    def device_bytes(self) -> int:
        return sum(tensor_bytes(s) for s in self.slots)

    def alloc(self) -> None:
        k = self.count
        size = max((u.footprint for u in self.units), default=0)
        if self.shared is not None:
            self.slots = self.shared.take(self, k, size, self.device)
            size = tensor_bytes(self.slots[0]) if self.slots else 0
        else:
            self.slots = [torch.empty(size, dtype=torch.uint8, device=self.device) for _ in range(k)]
        self.owner, self.last_use = [None] * k, [0] * k
        self.tracker.slot_owner = [None] * k
        self.tracker.slot_bytes = size
        if self.staging is not None:
            self.staging.alloc(max((u.footprint for u in self.units if u.reads is not None), default=0))
        if self.async_copies:
            if self.copy_stream is None:
                self.copy_stream = self.rt.new_stream(self.device)
            self.copy_ev = [self.rt.new_event() for _ in range(k)]
            self.free_ev = [self.rt.new_event() for _ in range(k)]

    def release(self) -> None:
        """Free the slots (give them back to the shared ring) and forget what they held."""
        if self.shared is not None:
            self.shared.release(self)
        self.forget()

    def forget(self) -> None:
        if self.staging is not None:  # pinned RAM: an engine without slots holds none either
            self.staging.release()
        self.bound.clear()
        self.deferred = None
        self.slots = []
        self.owner, self.last_use = [], []
        self.copy_ev, self.free_ev = [], []
        self.tracker.slot_owner = []
        for u in self.units:
            u.slot, u.bound, u.slot_views, u.used_since_copy = None, False, {}, False
            u.extras_views = {}

    def fits(self) -> bool:
        """Slots exist and hold the largest unit (with its extras)."""
        return bool(self.slots) and max(u.footprint for u in self.units) <= self.tracker.slot_bytes

    # ------------------------------------------------------------------ filling a slot
    def fetch(self, u: _Unit, protect: Set[int]) -> None:
        """Copy ``u`` into a free slot, or the least recently used one outside ``protect``."""
        staged = None
        if u.reads is not None:  # kept on file: its bytes (weights, extras) are read into a staging buffer
            staged, src = self.staging.take(u)  # first: a failed read changes no slot
        k = self._pick(protect)
        old = self.owner[k]
        if old is not None:
            victim = self.units[old]
            assert not victim.bound, "a slot in use was chosen for eviction"
            victim.slot = None
        self.owner[k] = u.index
        self.tracker.slot_owner[k] = u.name
        u.slot, u.used_since_copy = k, False
        slot = self.slots[k]
        if staged is not None:
            copies = [(slot[:src.numel()], src, self.staging.all_pinned)]
        else:
            # the weights, then the extras right after them (a LoRA's factors travel with the block)
            copies = [(slot[:u.nbytes], u.master, u.pinned)]
            if u.extras is not None:
                base = _align(u.nbytes)
                copies.append((slot[base:base + u.extras.numel()], u.extras, u.extras_pinned))
        t = self.tracker
        if self.async_copies:
            cs = self.copy_stream
            cs.wait_event(self.free_ev[k])  # the slot's previous user has finished reading it
            start = self.timings.event(cs)
            # pinned: asynchronous; pageable: the host waits for it (see the engine's before_unit)
            for dst, src, pinned in copies:
                self.rt.copy(dst, src, cs, non_blocking=pinned)
            self.copy_ev[k].record(cs)
            if staged is not None:
                self.staging.copied(staged, cs)
            if start is not None:
                self.timings.add("copy", u.name, start, self.timings.event(cs))
        else:
            c0 = time.perf_counter()
            for dst, src, _ in copies:
                dst.copy_(src)
            dt = time.perf_counter() - c0
            t.copy_seconds += dt
            t.copy_ms[u.name] = t.copy_ms.get(u.name, 0.0) + dt * 1e3
        t.copies += 1
        t.unit_copies[u.name] = t.unit_copies.get(u.name, 0) + 1
        t.h2d_bytes += sum(src.numel() for _, src, _ in copies)

    def prefetch(self, indices: Sequence[int], protect: Set[int]) -> None:
        """Bring the units ``indices`` in ahead of use. A pageable master makes the host wait for its
        copy; issued now, before the running unit's kernels, it would leave the GPU idle: such
        copies wait for :meth:`prefetch_deferred`, called once those kernels are queued."""
        deferred = []
        for v in indices:
            w = self.units[v]
            if w.slot is None:
                if self.async_copies and not self._copies_at_once(w):
                    deferred.append(v)
                else:
                    self.fetch(w, protect)
        self.deferred = (deferred, protect) if deferred else None

    def _copies_at_once(self, u: _Unit) -> bool:
        """The copy of ``u`` can be issued without the host waiting: its source is pinned and, for a
        unit kept on file, already read."""
        if u.reads is not None:
            return self.staging.all_pinned and self.staging.ready(u)
        return u.all_pinned

    def prefetch_deferred(self) -> None:
        if self.deferred is not None:
            deferred, protect = self.deferred
            self.deferred = None
            for v in deferred:
                if self.units[v].slot is None:
                    self.fetch(self.units[v], protect)

    def _pick(self, protect: Set[int]) -> int:
        best = None
        for k, owner in enumerate(self.owner):
            if owner is None:
                return k
            if owner in protect:
                continue
            if best is None or self.last_use[k] < self.last_use[best]:
                best = k
        if best is None:  # cannot happen: the protected set is at most K units, one unslotted
            raise RuntimeError("block swap ring exhausted; this is a bug, please report it")
        return best

    # ------------------------------------------------------------------ using a slot
    def wait(self, u: _Unit, was_slotted: bool) -> None:
        """Make compute wait for ``u``'s copy; count it as a prefetch hit or a stall."""
        t = self.tracker
        if not self.async_copies:
            if was_slotted:
                t.prefetch_hits += 1
            else:
                t.stalls += 1
            return
        stream = self.rt.current_stream(self.device)
        # The host runs ahead of the GPU, so whether the copy is done *now* says nothing about a
        # stall; the timed wait, read later, does. Without timing a prefetched unit counts as a hit.
        start = self.timings.event(stream) if was_slotted else None
        stream.wait_event(self.copy_ev[u.slot])
        if not was_slotted:
            t.stalls += 1  # fetched on demand: compute certainly waits for this copy
        elif start is not None:
            self.timings.add("wait", u.name, start, self.timings.event(stream))
        else:
            t.prefetch_hits += 1

    def bind(self, u: _Unit) -> None:
        """Point ``u``'s parameters at its slot (views cached per slot) and mark the slot used now."""
        k = u.slot
        binds = u.slot_views.get(k)
        if binds is None:
            binds = u.slot_views[k] = bindings(self.slots[k], u)
        self._uses += 1
        self.last_use[k] = self._uses
        t = self.tracker
        if u.used_since_copy:
            t.slot_reuses += 1
        u.used_since_copy = True
        bind(u, binds)
        u.bound = True
        self.bound.add(u)
        t.location[u.name] = f"slot{k}"
        t.max_bound_units = max(t.max_bound_units, len(self.bound))

    def unbind(self, u: _Unit) -> None:
        """Point ``u``'s parameters back at its host master (no copy: weights never change)."""
        bind(u, u.host_views)
        u.bound = False
        self.bound.discard(u)
        self.tracker.location[u.name] = "host"

    def unbind_all(self) -> None:
        for u in list(self.bound):
            self.unbind(u)

    def record_free(self, k: int) -> None:
        """The work issued so far on the compute stream is the slot's last use."""
        if self.async_copies:
            self.free_ev[k].record(self.rt.current_stream(self.device))

    def vacate(self, u: _Unit) -> None:
        """Take ``u`` out of its slot; the slot is free once the work issued so far is done."""
        if u.bound:
            self.unbind(u)
        k = u.slot
        self.record_free(k)
        u.slot, u.used_since_copy = None, False
        self.owner[k] = None
        self.tracker.slot_owner[k] = None

    def extras_views(self, u: _Unit) -> List[torch.Tensor]:
        """``u``'s extras as they sit in its slot now (device tensors, in the order given)."""
        k = u.slot
        views = u.extras_views.get(k)
        if views is None:
            base = _align(u.nbytes)
            views = u.extras_views[k] = [self.slots[k][base + o:base + o + n].view(dt).view(size)
                                         for o, n, dt, size in u.extras_parts]
        return views


class SharedRing:
    """Device slots shared by rings of which only one is used at a time (the two WAN 2.2 experts): the
    ring about to run takes the slots, the one that gave them up holds no device memory for its
    streamed blocks. Grows to the largest request; freed when its holder releases it."""

    def __init__(self):
        self._buffers: List[torch.Tensor] = []
        self._owner = None  # weakref to the ring holding the slots

    @property
    def nbytes(self) -> int:
        return sum(tensor_bytes(b) for b in self._buffers)

    def holder(self) -> Optional[DeviceRing]:
        return self._owner() if self._owner is not None else None

    def take(self, ring: DeviceRing, count: int, nbytes: int, device) -> List[torch.Tensor]:
        owner = self.holder()
        if owner is not None and owner is not ring:
            owner.taken_away()
        have = tensor_bytes(self._buffers[0]) if self._buffers else 0
        if (len(self._buffers) < count or have < nbytes
                or (self._buffers and self._buffers[0].device != as_device(device))):
            count, nbytes = max(count, len(self._buffers)), max(nbytes, have)
            self._buffers = []  # free the old slots before allocating the larger ones
            self._buffers = [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(count)]
        self._owner = weakref.ref(ring)
        return self._buffers[:count]

    def release(self, ring: DeviceRing) -> None:
        if self.holder() is ring:
            self._owner = None
            self._buffers = []
