"""The block-swap engine: stream chosen WAN blocks from host RAM into a small ring of device slots.

Pure torch; importable without ComfyUI. Data path, per streamed unit (a main block, a VACE block, an
embedding):

* **Host master.** At setup every parameter of the unit is packed into one flat ``uint8`` buffer on the
  offload device (pinned with ``cudaHostRegister`` at its exact size when copies go to a CUDA device,
  pageable when pinning fails or would exceed the pin budget). Each parameter is then rebound to a view
  of that buffer with ``param.data = view``: the Parameter object, its Python type (quantized tensor
  subclasses) and its attributes survive, and the original storage is released.
* **Device ring.** ``K`` flat device buffers ("slots"), each as large as the largest unit. Bringing a unit
  in is one contiguous copy master -> slot, then rebinding its parameters to views of the slot.
  Weights never change during inference, so eviction is rebinding back to the host views: nothing is
  ever copied device -> host.
* **Streams and events (CUDA).** Copies run on a dedicated stream. The compute stream waits on the
  slot's copy-done event before the unit runs; a copy into a slot waits on the event recorded after the
  slot's last use. No device-wide synchronize and no host wait in the steady state.
* **Schedule.** While a unit computes, the next ``prefetch`` units of the expected order are copied. The
  order is learned from the previous forward (VACE blocks run interleaved and possibly several times),
  and wraps around, so the end of one forward preloads the first streamed units of the next one (CFG
  runs two forwards a step). A unit still in a slot from an earlier forward is reused without a copy.

On CPU (``offload_device == compute_device``) the same pack/copy/rebind path runs synchronously, which
is how the engine is tested on machines without a GPU.
"""
from __future__ import annotations

import functools
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

import torch
from torch import nn

from .config import BlockSwapError, SwapPlan, SwapSettings, detect_layout, leaf_tensors, plan_swap, tensor_bytes
from .cuda_runtime import CudaRuntime
from .utils import as_device, format_bytes, get_logger, host_available_bytes

log = get_logger("engine")

ALIGN = 256  # bytes; keeps every view aligned for any dtype and for vectorised kernels
PAGE = 4096  # host page: pinned masters start and end on page boundaries
MAX_PENDING_TIMINGS = 4096  # CUDA timing events waiting to be read; older ones are dropped
STALL_THRESHOLD_MS = 0.05  # a measured wait longer than this counts as a stall
_REPACK = object()  # a slot-transform tag no caller uses


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def host_arena(nbytes: int) -> torch.Tensor:
    """An unpinned host buffer laid out as the engine's masters are: it starts on a page boundary and
    spans whole pages, so it can be page-locked at its exact size without sharing a page with another
    registration. A loader that reads a unit's weights into one arena (views at :func:`arena_offset`
    steps) hands the engine a master it adopts in place, without a copy."""
    rounded = (nbytes + PAGE - 1) // PAGE * PAGE
    raw = torch.empty(rounded + PAGE, dtype=torch.uint8)
    start = (-raw.data_ptr()) % PAGE
    return raw[start:start + rounded]  # the view keeps `raw`'s storage alive


def arena_offset(nbytes: int) -> int:
    """Bytes a tensor of ``nbytes`` takes in a master or arena (the engine's alignment)."""
    return _align(nbytes)


def check_streamable(param: torch.Tensor, unit_name: str) -> None:
    """Raise :class:`BlockSwapError` for a parameter the engine cannot pack and rebind: a wrapper
    tensor subclass that does not declare its inner tensors (ComfyUI's QuantizedTensor does)."""
    try:
        leaf_tensors(param)
    except BlockSwapError as e:
        raise BlockSwapError(f"{unit_name}: {e}") from None


def packed_bytes(module: nn.Module) -> int:
    """Size of the flat buffer (host master or device slot) that holds ``module``'s parameters: every
    plain tensor holding their bytes (a quantized weight's data and scales), each aligned."""
    return sum(_align(tensor_bytes(t)) for p in module.parameters() for _, t in leaf_tensors(p))


def _dense_stride(size: Sequence[int], stride: Sequence[int]) -> Optional[Tuple[int, ...]]:
    """``stride`` if a tensor of ``size`` with it covers its memory exactly once, else None."""
    expected = 1
    for sz, st in sorted(zip(size, stride), key=lambda p: p[1]):
        if sz == 1:
            continue
        if st != expected:
            return None
        expected *= sz
    return tuple(stride)


@dataclass
class _Part:
    """One plain tensor holding a parameter's bytes, and where it sits in the unit's flat buffers."""

    name: str  # inner tensor of a wrapper subclass (``__tensor_flatten__``); "" for a plain tensor
    offset: int
    nbytes: int
    dtype: torch.dtype
    size: Tuple[int, ...]
    stride: Optional[Tuple[int, ...]]  # original layout, restored at teardown when dense


@dataclass
class _Entry:
    """One parameter of a unit: the plain tensors holding its bytes and how it is bound to them.

    A plain parameter (GGUF and fp8 tensors included) is rebound with ``param.data = view``: the
    Parameter object, its type and attributes stay. A wrapper subclass (ComfyUI's QuantizedTensor)
    cannot be: ``.data =`` does not reach its inner tensors (a silent no-op for ``_qdata``) and
    cannot change its device, so it is rebuilt around views with ``__tensor_unflatten__`` and
    registered again under its ``owners``' names.
    """

    param: torch.Tensor  # the tensor registered now (for plain parameters always the same object)
    owners: List[Tuple[nn.Module, str]]  # every (module, name) it is registered under
    parts: List[_Part]
    device: torch.device  # where it lived before setup
    wrapper: Optional[Tuple[object, Tuple[int, ...], Tuple[int, ...]]] = None  # (ctx, size, stride)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)


class _Unit:
    """A module whose parameters stream together."""

    def __init__(self, index: int, name: str, module: nn.Module):
        self.index = index
        self.name = name
        self.module = module
        self.entries: List[_Entry] = []
        self.nbytes = 0
        self.arena: Optional[torch.Tensor] = None  # a loader's buffer to adopt as the master (see _collect)
        self.master: Optional[torch.Tensor] = None
        self.pinned = False
        self.host_views: List[torch.Tensor] = []  # per entry: what it is bound to on the host
        self.slot_views: Dict[int, List[torch.Tensor]] = {}  # per slot, likewise
        self.slot: Optional[int] = None  # slot holding a copy of this unit's weights
        self.bound = False  # parameters currently point into ``slot``
        self.used_since_copy = False  # the slot's copy already served a run: a reuse, not a prefetch
        # Extras: tensors the slot transform needs (a LoRA's factors), packed in a host buffer of their
        # own and copied into the slot right after the weights, so they travel with the block.
        self.extras: Optional[torch.Tensor] = None
        self.extras_parts: List[Tuple[int, int, torch.dtype, Tuple[int, ...]]] = []  # offset, bytes, dtype, size
        self.extras_pinned = False
        self.extras_views: Dict[int, List[torch.Tensor]] = {}  # per slot

    @property
    def footprint(self) -> int:
        """Slot bytes the unit needs: its weights, then its extras."""
        return _align(self.nbytes) + (self.extras.numel() if self.extras is not None else 0)

    @property
    def all_pinned(self) -> bool:
        return self.pinned and (self.extras is None or self.extras_pinned)


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

    def reset_counters(self) -> None:
        """Zero the per-run counters; the plan and the live state stay."""
        for name in ("h2d_bytes", "d2h_bytes", "copies", "prefetch_hits", "stalls", "slot_reuses",
                     "forwards", "schedule_updates", "max_bound_units", "timings_dropped"):
            setattr(self, name, 0)
        self.hook_seconds = self.copy_seconds = 0.0
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


class BlockSwapEngine:
    """Streams the units of a :class:`SwapPlan` through a ring of device slots.

    Typical pure-torch use::

        engine = BlockSwapEngine.from_settings(model, SwapSettings(blocks_to_swap=20), "cuda")
        engine.setup()                 # pack host masters, allocate the ring, install hooks
        place_resident(model, engine.plan, "cuda")
        out = model(...)               # hooks stream the swapped blocks
        engine.teardown()              # parameters back where they were, same objects

    Integrations that drive the schedule themselves call :meth:`begin_forward`,
    :meth:`before_unit`, :meth:`after_unit` and :meth:`end_forward` instead of installing hooks.
    """

    def __init__(self, model: nn.Module, plan: SwapPlan, compute_device, offload_device="cpu", *,
                 unit_modules: Optional[Mapping[str, nn.Module]] = None, timing: bool = True,
                 host_available: Optional[int] = None, runtime=None):
        # Weak: an integration may key a registry by the model; a strong reference would keep it alive.
        self._model_ref = weakref.ref(model)
        self.plan = plan
        self.compute_device = as_device(compute_device)
        self.offload_device = as_device(offload_device)
        self.settings: SwapSettings = plan.settings
        self.timing = timing
        self._host_available = host_available  # tests inject a figure; None asks the OS
        self.tracker = BlockSwapTracker(units=plan.units, resident_blocks=plan.resident_blocks,
                                        slots=plan.slots)
        # unit_modules: the real modules when the model's tree shows stand-ins in their place (ComfyUI)
        modules = dict(unit_modules or {})
        self._units = [_Unit(i, name, modules.get(name) or model.get_submodule(name))
                       for i, name in enumerate(plan.units)]
        # The CUDA calls (streams, events, page-locking) go through a runtime object; tests pass a
        # recording one to run the asynchronous path on a CPU. None: the synchronous CPU path.
        self._rt = runtime if runtime is not None else (CudaRuntime() if self.compute_device.type == "cuda" else None)
        self._async = self._rt is not None and self.settings.use_non_blocking
        self._slots: List[torch.Tensor] = []
        self._slot_owner: List[Optional[int]] = []
        self._slot_last_use: List[int] = []
        self._use_counter = 0
        self._copy_stream = None
        self._copy_ev: List = []
        self._free_ev: List = []
        self._pending_timings: List[Tuple[str, str, object, object]] = []
        self._order: List[int] = list(range(len(self._units)))
        self._trace: List[int] = []
        self._pos = 0
        self._bound: Set[_Unit] = set()  # units whose parameters point into a slot right now
        self._deferred: Optional[Tuple[List[int], Set[int]]] = None  # pageable prefetches for after_unit
        self._in_forward = False
        self._release_pending = False
        self._hooks: List = []
        self._is_setup = False
        self._packed = False  # host masters packed (pack_masters), maybe before the ring exists
        # Called as slot_transform(unit_name) right after a unit is bound to freshly copied slot
        # memory; it may rewrite the bound parameters in place (ComfyUI applies LoRA patches here).
        self.slot_transform: Optional[Callable[[str], None]] = None
        self._slot_tag = None
        self.shared_ring: Optional[SharedRing] = None
        # Told the change in device bytes when another engine takes the shared slots away.
        self.ring_listener: Optional[Callable[[int], None]] = None
        # Registered host memory must be unregistered before it is freed, even if this engine is
        # dropped without a teardown (a model garbage-collected in ComfyUI): the finalizer does it.
        self._pinned_ptrs: Dict[int, int] = {}
        self._finalizer = weakref.finalize(self, _unregister_all, self._pinned_ptrs, self._rt)

    @property
    def model(self) -> Optional[nn.Module]:
        return self._model_ref()

    @classmethod
    def from_settings(cls, model: nn.Module, settings: SwapSettings, compute_device,
                      offload_device="cpu", **kwargs) -> "BlockSwapEngine":
        return cls(model, plan_swap(detect_layout(model), settings), compute_device,
                   offload_device, **kwargs)

    # ------------------------------------------------------------------ lifecycle
    @property
    def is_setup(self) -> bool:
        return self._is_setup

    @property
    def device_bytes(self) -> int:
        """Device memory held by the ring."""
        return sum(tensor_bytes(s) for s in self._slots)

    def setup(self, install_hooks: bool = True) -> "BlockSwapEngine":
        """Pack host masters, allocate the ring and (optionally) install module hooks.

        Idempotent and incremental: on an engine already set up it re-packs only units whose
        parameters something else moved or replaced since (another user of the same weights), and
        re-allocates a released ring. Every check runs before the model is touched; if packing
        fails half-way, the units packed so far are restored and the error re-raised.
        """
        if self._is_setup:
            self._refresh()
        else:
            self.pack_masters()
            try:
                self._alloc_ring()
            except BaseException:
                self._restore_units(None)
                self._packed = False
                raise
            self._is_setup = True
        self._update_host_bytes()
        if install_hooks:
            self.attach_hooks()
        log.debug("block swap set up: %s", self.tracker.format_summary())
        return self

    def pack_masters(self) -> "BlockSwapEngine":
        """Pack the host masters only (no device memory): what a loader does right after reading the
        file, so the streamed blocks go to their pinned copies before anything runs. ``setup``
        calls it (a no-op once done) before allocating the ring."""
        if self._packed:
            return self
        for u in self._units:
            self._collect(u)
        self._check_host_ram(self._units)
        try:
            for u in self._units:
                self._pack(u)
        except BaseException:
            self._restore_units(None)
            raise
        self.tracker.location.update({u.name: "host" for u in self._units})
        self._packed = True
        self._update_host_bytes()
        return self

    def reset_counters(self) -> None:
        """Start a run's figures: zero the counters and drop timing events of earlier work, which
        would otherwise be read into this run's copy and stall times."""
        self._pending_timings.clear()
        self.tracker.reset_counters()

    def synchronize(self) -> None:
        """Wait for everything issued so far (copies and compute, every stream) and read all timing
        events: what a benchmark does before it reads the figures. Never needed in normal use."""
        self._sync()

    def end_run(self) -> None:
        """After a sampling run: evict whatever is still bound (an interrupted run), close a forward
        found without begin/end calls, and read the finished timing events. Keeps masters and
        slots for the next run."""
        self._evict_bound()
        if self._trace and not self._in_forward:
            self._finish_forward()
        if self._pending_timings:
            self._drain_timings()
        self._release_if_pending()

    def release_ring(self) -> None:
        """Free the device ring but keep the host masters bound: the model stays usable on the host
        and a later :meth:`setup` only re-allocates the ring. Inside a forward (a garbage-collected
        clone's ON_DETACH can fire anywhere) the release waits for the forward's end, or, without
        begin/end calls, for the running unit's end."""
        if self._in_forward or self._bound:
            self._release_pending = True
            return
        if not self._slots:
            return
        self._sync()
        self._evict_bound()
        self._free_ring()

    def invalidate_slots(self) -> None:
        """Forget what the slots hold (after the slot transform changed, e.g. new LoRA patches)."""
        self._evict_bound()
        for owner in self._slot_owner:
            if owner is not None:
                self._drop_slot(self._units[owner])

    def set_slot_transform(self, fn: Optional[Callable[[str], None]], tag=None,
                           extras: Optional[Mapping[str, Sequence[torch.Tensor]]] = None) -> None:
        """Install the slot transform; a different ``tag`` (e.g. another LoRA set) drops what the
        slots hold, since it was transformed for the old one. ``extras``: per unit name, tensors the
        transform reads (LoRA factors); they are packed once per tag into a host buffer per unit
        (pinned like the masters) and copied into the slot with the unit's weights, where the
        transform finds them with :meth:`slot_extras`."""
        if tag != self._slot_tag:
            self.invalidate_slots()
            self._pack_extras(extras or {})
            if self._slots and max(u.footprint for u in self._units) > self.tracker.slot_bytes:
                self._sync()
                self._evict_bound()
                self._free_ring()  # too small for weights + extras: the next unit brings a larger one
        self.slot_transform, self._slot_tag = fn, tag

    def slot_extras(self, unit_name: str) -> List[torch.Tensor]:
        """The unit's extras as they sit in its slot now (device tensors, in the order given)."""
        u = self._units[self._index_of(unit_name)]
        k = u.slot
        views = u.extras_views.get(k)
        if views is None:
            base = _align(u.nbytes)
            views = u.extras_views[k] = [self._slots[k][base + o:base + o + n].view(dt).view(size)
                                         for o, n, dt, size in u.extras_parts]
        return views

    def _index_of(self, unit_name: str) -> int:
        return self.plan.units.index(unit_name)

    def _pack_extras(self, extras: Mapping[str, Sequence[torch.Tensor]]) -> None:
        for u in self._units:
            self._drop_extras(u)
            tensors = list(extras.get(u.name, ()))
            if not tensors:
                continue
            parts, offset = [], 0
            for t in tensors:
                parts.append((offset, tensor_bytes(t), t.dtype, tuple(t.shape)))
                offset += _align(parts[-1][1])
            buf = self._host_buffer(offset)
            for (o, n, dt, size), t in zip(parts, tensors):
                buf[o:o + n].view(dt).view(size).copy_(t)
            u.extras, u.extras_parts = buf, parts
            u.extras_pinned = buf.data_ptr() in self._pinned_ptrs
        self._update_host_bytes()

    def _drop_extras(self, u: _Unit) -> None:
        if u.extras is not None and u.extras_pinned:
            self._unpin_buffer(u.extras)
        u.extras, u.extras_parts, u.extras_pinned, u.extras_views = None, [], False, {}

    def teardown(self, device=None) -> None:
        """Undo :meth:`setup`: every parameter gets its own storage again, with the same values, on
        ``device`` or, by default, where it was before setup. Idempotent."""
        if not (self._is_setup or self._packed):
            return
        self.detach_hooks()
        self._sync()
        self._restore_units(None if device is None else as_device(device))
        for u in self._units:
            self._drop_extras(u)
        self._slot_tag = _REPACK  # a later set_slot_transform packs its extras again, whatever its tag
        self._free_ring()
        self.tracker.location.clear()
        self.tracker.host_bytes = self.tracker.pinned_bytes = 0
        self._is_setup = self._packed = False

    def _sync(self) -> None:
        """Wait for in-flight copies and for kernels still reading slots, on every stream of the
        device: the forward may have run on any of them (never in the steady state: only before the
        ring or the masters are released)."""
        if self._rt is not None and (self._slots or self._pending_timings):
            self._rt.synchronize(self.compute_device)
            self._drain_timings()

    def _refresh(self) -> None:
        self._sync()  # old masters and slots may still be read by work in flight
        self._evict_bound()
        stale = [u for u in self._units if not self._intact(u)]
        if stale:
            log.info("block swap: %d streamed units were moved or replaced since the last run; "
                     "re-packing them", len(stale))
            for u in stale:
                self._collect(u)
            self._check_host_ram(stale)
            self.invalidate_slots()
            for u in stale:
                self._unpin(u)  # the old buffer may still be referenced elsewhere: just unpin it
                self._pack(u)
        if not self._slots or max(u.footprint for u in self._units) > self.tracker.slot_bytes:
            self._free_ring()
            self._alloc_ring()

    def _intact(self, u: _Unit) -> bool:
        """True when the unit's parameters still point at its host master. Parameter objects may
        have been replaced by equivalent ones viewing the same memory (ComfyUI restores backups
        that way); the entries then follow the new objects."""
        params = self._unit_params(u)
        if u.master is None or len(params) != len(u.entries):
            return False
        for (p, owners), e, bound in zip(params, u.entries, u.host_views):
            if owners != e.owners or (e.wrapper is not None and (
                    type(p) is not type(bound) or torch.Tensor.size(p) != torch.Tensor.size(bound))):
                return False
            leaves, expected = leaf_tensors(p), leaf_tensors(bound)
            if [(n, t.data_ptr(), t.dtype, t.shape) for n, t in leaves] != \
                    [(n, t.data_ptr(), t.dtype, t.shape) for n, t in expected]:
                return False
        for (p, _), e in zip(params, u.entries):
            e.param = p
        return True

    def _update_host_bytes(self) -> None:
        t = self.tracker
        # Bytes the masters take: whole pages where they are laid out to be page-locked, so that with
        # every master pinned, host_bytes == pinned_bytes (registrations cover whole pages).
        t.host_bytes = sum(_page_span(b) for u in self._units for b in (u.master, u.extras) if b is not None)
        t.pinned_bytes = sum(self._pinned_ptrs.values())

    def attach_hooks(self, bracket_forwards: bool = True) -> None:
        """Install per-instance module hooks (no global patching) that drive the schedule.
        ``bracket_forwards=False``: no hooks on the model itself, for callers whose forward does not
        go through ``model.forward``; the engine then finds forward boundaries on its own."""
        if self._hooks:
            return
        model = self.model
        if model is not None and bracket_forwards:
            self._hooks.append(model.register_forward_pre_hook(lambda m, a: self.begin_forward()))
            self._hooks.append(model.register_forward_hook(
                lambda m, a, o: self.end_forward(), always_call=True))
        for u in self._units:
            self._hooks.append(u.module.register_forward_pre_hook(
                functools.partial(self._pre_hook, u.index)))
            # always_call: an exception inside the block still evicts it, so the model stays usable.
            self._hooks.append(u.module.register_forward_hook(
                functools.partial(self._post_hook, u.index), always_call=True))

    def detach_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def _pre_hook(self, index, module, args):
        self.before_unit(index)

    def _post_hook(self, index, module, args, output):
        self.after_unit(index)

    # ------------------------------------------------------------------ schedule
    def begin_forward(self) -> None:
        self._in_forward = True
        self._deferred = None
        self._evict_bound()
        self._trace.clear()
        self._pos = 0

    def end_forward(self) -> None:
        self._evict_bound()  # normally empty; not after an exception inside a unit's hooks
        self._finish_forward()
        self._in_forward = False
        self._release_if_pending()

    def _finish_forward(self) -> None:
        """Learn the order the forward ran its units in and count it."""
        if self._trace and self._trace != self._order:
            self._order = list(self._trace)
            self.tracker.schedule_updates += 1
        self._trace.clear()
        self._pos = 0
        self.tracker.forwards += 1
        if self._pending_timings:
            self._drain_timings()

    def _release_if_pending(self) -> None:
        if self._release_pending and not self._in_forward and not self._bound:
            self._release_pending = False
            self.release_ring()

    def _implicit_boundary(self, index: int) -> bool:
        """Without begin/end calls (a forward that bypasses the wrapper, e.g. ComfyUI's CausalWan
        under SamplerARVideo): a new forward starts when the first unit of the learned order comes
        again after a whole order's worth of units ran."""
        return (not self._in_forward and bool(self._trace) and index == self._order[0]
                and len(self._trace) >= len(self._order))

    def before_unit(self, index: int) -> None:
        """Make unit ``index`` resident in a slot and point its parameters there; prefetch ahead."""
        t0 = time.perf_counter()
        if not self._slots:  # released since the last use: bring the ring back
            self._alloc_ring()
        if self._implicit_boundary(index):
            self._finish_forward()
        u = self._units[index]
        if len(self._trace) < 4 * len(self._order) + 16:  # bounded even if no forward ever ends
            self._trace.append(index)
        upcoming = self._upcoming(index)
        protect = {index, *upcoming}
        was_slotted = u.slot is not None
        if not was_slotted:
            self._fetch(u, protect)
        self._wait_copy(u, was_slotted)
        fresh = not u.used_since_copy
        self._bind_slot(u)
        # Prefetch before the slot transform, so the copies run while it computes. A pageable master
        # makes the host wait for its copy: that one is issued in after_unit, once this unit's
        # kernels are queued and the GPU has work while the host waits.
        deferred = []
        for v in upcoming:
            w = self._units[v]
            if w.slot is None:
                if self._async and not w.all_pinned:
                    deferred.append(v)
                else:
                    self._fetch(w, protect)
        self._deferred = (deferred, protect) if deferred else None
        if fresh and self.slot_transform is not None:
            try:
                self.slot_transform(u.name)
            except BaseException:
                self._drop_slot(u)  # half-patched: never reuse it
                raise
        self.tracker.hook_seconds += time.perf_counter() - t0

    def after_unit(self, index: int) -> None:
        """Unit ``index`` has been issued: mark its slot's last use and rebind it to the host."""
        t0 = time.perf_counter()
        u = self._units[index]
        if u.bound:
            if self._async:
                self._free_ev[u.slot].record(self._rt.current_stream(self.compute_device))
            self._bind_host(u)
        if self._deferred is not None:
            deferred, protect = self._deferred
            self._deferred = None
            for v in deferred:
                if self._units[v].slot is None:
                    self._fetch(self._units[v], protect)
        if self._release_pending:
            self._release_if_pending()
        self.tracker.hook_seconds += time.perf_counter() - t0

    def _evict_bound(self) -> None:
        for u in list(self._bound):
            self._bind_host(u)

    def _drop_slot(self, u: _Unit) -> None:
        """Take ``u`` out of its slot; the slot is free once the work issued so far is done."""
        k = u.slot
        if self._async:
            self._free_ev[k].record(self._rt.current_stream(self.compute_device))
        if u.bound:
            self._bind_host(u)
        u.slot, u.used_since_copy = None, False
        self._slot_owner[k] = None
        self.tracker.slot_owner[k] = None

    def _upcoming(self, index: int) -> List[int]:
        """The next distinct units expected after ``index`` (wrapping into the next forward)."""
        order = self._order
        try:
            p = order.index(index, self._pos)
        except ValueError:
            try:
                p = order.index(index)
            except ValueError:
                return []  # not in the learned order yet; the next forward will know it
        self._pos = p + 1
        want = min(self.settings.prefetch_blocks, len(self._slots) - 1)
        out: List[int] = []
        n = len(order)
        for j in range(1, n):
            if len(out) >= want:
                break
            v = order[(p + j) % n]
            if v != index and v not in out:
                out.append(v)
        return out

    # ------------------------------------------------------------------ data movement
    def _fetch(self, u: _Unit, protect: Set[int]) -> None:
        k = self._pick_slot(protect)
        old = self._slot_owner[k]
        if old is not None:
            victim = self._units[old]
            assert not victim.bound, "a slot in use was chosen for eviction"
            victim.slot = None
        self._slot_owner[k] = u.index
        self.tracker.slot_owner[k] = u.name
        u.slot, u.used_since_copy = k, False
        slot = self._slots[k]
        # the weights, then the extras right after them (a LoRA's factors travel with the block)
        copies = [(slot[:u.nbytes], u.master, u.pinned)]
        if u.extras is not None:
            base = _align(u.nbytes)
            copies.append((slot[base:base + u.extras.numel()], u.extras, u.extras_pinned))
        t = self.tracker
        if self._async:
            cs = self._copy_stream
            cs.wait_event(self._free_ev[k])  # the slot's previous user has finished reading it
            start = self._timing_event(cs)
            # pinned: asynchronous; pageable: the host waits for it (see before_unit for when)
            for dst, src, pinned in copies:
                self._rt.copy(dst, src, cs, non_blocking=pinned)
            self._copy_ev[k].record(cs)
            if start is not None:
                self._add_timing("copy", u.name, start, self._timing_event(cs))
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

    def _pick_slot(self, protect: Set[int]) -> int:
        best = None
        for k, owner in enumerate(self._slot_owner):
            if owner is None:
                return k
            if owner in protect:
                continue
            if best is None or self._slot_last_use[k] < self._slot_last_use[best]:
                best = k
        if best is None:  # cannot happen: the protected set is at most K units, one unslotted
            raise RuntimeError("block swap ring exhausted; this is a bug, please report it")
        return best

    def _wait_copy(self, u: _Unit, was_slotted: bool) -> None:
        t = self.tracker
        if not self._async:
            if was_slotted:
                t.prefetch_hits += 1
            else:
                t.stalls += 1
            return
        ev = self._copy_ev[u.slot]
        stream = self._rt.current_stream(self.compute_device)
        # The host runs ahead of the GPU, so whether the copy is done *now* says nothing about a
        # stall; the timed wait, read later, does. Without timing a prefetched unit counts as a hit.
        start = self._timing_event(stream) if was_slotted else None
        stream.wait_event(ev)
        if not was_slotted:
            t.stalls += 1  # fetched on demand: compute certainly waits for this copy
        elif start is not None:
            self._add_timing("wait", u.name, start, self._timing_event(stream))
        else:
            t.prefetch_hits += 1

    def _bind_slot(self, u: _Unit) -> None:
        k = u.slot
        binds = u.slot_views.get(k)
        if binds is None:
            binds = u.slot_views[k] = self._bindings(self._slots[k], u)
        if u.used_since_copy:
            self.tracker.slot_reuses += 1
        u.used_since_copy = True
        self._bind(u, binds)
        u.bound = True
        self._bound.add(u)
        self._use_counter += 1
        self._slot_last_use[k] = self._use_counter
        self.tracker.location[u.name] = f"slot{k}"
        if len(self._bound) > self.tracker.max_bound_units:
            self.tracker.max_bound_units = len(self._bound)

    def _bind_host(self, u: _Unit) -> None:
        self._bind(u, u.host_views)
        u.bound = False
        self._bound.discard(u)
        self.tracker.location[u.name] = "host"

    # ------------------------------------------------------------------ setup helpers
    def _collect(self, u: _Unit) -> None:
        """Record the unit's parameters and check they can be packed. Touches nothing."""
        entries: List[_Entry] = []
        offset = 0
        for p, owners in self._unit_params(u):
            check_streamable(p, u.name)
            parts = []
            for name, t in leaf_tensors(p):
                size = tuple(torch.Tensor.size(t))
                parts.append(_Part(name, offset, tensor_bytes(t), t.dtype, size,
                                   _dense_stride(size, torch.Tensor.stride(t))))
                offset += _align(parts[-1].nbytes)
            wrapper = None
            if parts[0].name:  # a wrapper subclass: what rebuilds it around other inner tensors
                wrapper = (p.__tensor_flatten__()[1], tuple(torch.Tensor.size(p)), tuple(torch.Tensor.stride(p)))
            entries.append(_Entry(p, owners, parts, p.device, wrapper))
        devices = {t.device for e in entries for _, t in leaf_tensors(e.param)}
        if len(devices) > 1:
            raise BlockSwapError(
                f"{u.name} has parameters on several devices ({', '.join(sorted(map(str, devices)))}); "
                "load the model fully onto one device before enabling block swap.")
        u.arena = self._arena_of(entries) if entries else None
        if u.arena is not None:  # adopt the loader's arena: the tensors keep their places in it
            lo = u.arena.data_ptr()
            for e in entries:
                for part, (_, t) in zip(e.parts, leaf_tensors(e.param)):
                    part.offset = t.data_ptr() - lo
            offset = max(p.offset + p.nbytes for e in entries for p in e.parts)
        u.entries, u.nbytes = entries, offset
        u.slot_views = {}  # the layout may have changed: views of the old one are wrong

    def _arena_of(self, entries: List[_Entry]) -> Optional[torch.Tensor]:
        """The page-aligned host buffer holding all of a unit's parameters and nothing else (a
        :func:`host_arena` a loader filled), as a uint8 view of whole pages; None otherwise."""
        if self.offload_device.type != "cpu" or any(e.device.type != "cpu" for e in entries):
            return None
        leaves = [(part, t) for e in entries for part, (_, t) in zip(e.parts, leaf_tensors(e.param))]
        storage = leaves[0][1].untyped_storage()
        if any(t.untyped_storage().data_ptr() != storage.data_ptr() or part.stride is None
               or not t.is_contiguous() for part, t in leaves):
            return None
        spans = sorted((t.data_ptr(), t.data_ptr() + part.nbytes) for part, t in leaves)
        lo, hi = spans[0][0], max(end for _, end in spans)
        if lo % PAGE or any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
            return None
        if hi - lo > sum(_align(part.nbytes) for part, _ in leaves):  # not tight: someone's bigger buffer
            return None
        rounded = (hi - lo + PAGE - 1) // PAGE * PAGE
        start = lo - storage.data_ptr()
        if start + rounded > storage.nbytes() or storage.nbytes() > rounded + PAGE:
            return None  # past the end, or the storage holds more than this unit (it would stay alive)
        return torch.empty(0, dtype=torch.uint8).set_(storage, start, (rounded,))

    @staticmethod
    def _unit_params(u: _Unit) -> List[Tuple[torch.Tensor, List[Tuple[nn.Module, str]]]]:
        """Each distinct parameter of the unit with every (module, name) it is registered under."""
        found: Dict[int, Tuple[torch.Tensor, List[Tuple[nn.Module, str]]]] = {}
        for mod in u.module.modules():
            for name, p in mod._parameters.items():
                if p is not None:
                    found.setdefault(id(p), (p, []))[1].append((mod, name))
        return list(found.values())

    def _check_host_ram(self, units: Sequence[_Unit]) -> None:
        off = self.offload_device
        if off.type != "cpu":
            return
        moved = sum(u.nbytes for u in units if u.entries and u.entries[0].device != off)
        in_place = max((u.nbytes for u in units if u.entries and u.entries[0].device == off),
                       default=0)
        # Units already on the host are repacked one at a time (the old storage is freed as each
        # unit is rebound), so they need one unit of headroom; units on the device need it all.
        need = moved + in_place
        avail = host_available_bytes() if self._host_available is None else self._host_available
        if need > avail:
            raise BlockSwapError(
                f"not enough host RAM for block swap: the host copies of {len(units)} streamed "
                f"units need {format_bytes(need)} but only {format_bytes(avail)} is available. "
                "Swap fewer blocks, close other programs, or use a smaller (fp8/GGUF) model.")

    def _pack(self, u: _Unit) -> None:
        if u.arena is not None:  # the loader already read the unit into a master-shaped buffer
            if self._async:
                self._pin(u.arena)
            master, u.arena = u.arena[:u.nbytes], None
            binds = self._bindings(master, u)
            self._bind(u, binds)  # the same memory, now viewed through the master
            u.master, u.host_views, u.pinned = master, binds, master.data_ptr() in self._pinned_ptrs
            return
        # Filled before it is attached to the unit: if a copy fails, the unit keeps its old
        # storage and nothing is restored from a half-filled buffer.
        master = self._host_buffer(u.nbytes)
        try:
            for e in u.entries:
                # .data: a plain parameter's bytes as a plain tensor (a GGUF tensor's raw bytes)
                sources = [e.param.data] if e.wrapper is None else [t for _, t in leaf_tensors(e.param)]
                for v, src in zip(self._part_views(master, e), sources):
                    v.copy_(src)
        except BaseException:
            self._unpin_buffer(master)
            raise
        for e in u.entries:
            if e.device.type != "cpu" and self.offload_device.type == "cpu":
                self.tracker.setup_d2h_bytes += e.nbytes
        binds = self._bindings(master, u)
        self._bind(u, binds)
        u.master, u.host_views, u.pinned = master, binds, master.data_ptr() in self._pinned_ptrs

    @staticmethod
    def _part_views(buf: torch.Tensor, e: _Entry) -> List[torch.Tensor]:
        return [buf[p.offset:p.offset + p.nbytes].view(p.dtype).view(p.size) for p in e.parts]

    def _bindings(self, buf: torch.Tensor, u: _Unit) -> List[torch.Tensor]:
        """What each parameter of ``u`` is bound to while its bytes are those in ``buf`` (the host
        master or a slot): a view for a plain parameter, a wrapper rebuilt around views otherwise.
        Made once per buffer and cached, so binding allocates nothing per step."""
        out = []
        for e in u.entries:
            views = self._part_views(buf, e)
            out.append(views[0] if e.wrapper is None else _rebuild(e, views))
        return out

    @staticmethod
    def _bind(u: _Unit, binds: List[torch.Tensor]) -> None:
        for e, b in zip(u.entries, binds):
            if e.wrapper is None:
                e.param.data = b
            else:
                # Only where our tensor is still registered: one that someone else put there since
                # (ComfyUI's LoRA patching of a model that is not streaming now) is theirs, as a
                # plain parameter's replacement is unaffected by ``.data =`` on our object.
                for mod, name in e.owners:
                    if mod._parameters.get(name) is e.param:
                        mod._parameters[name] = b
                e.param = b

    def _host_buffer(self, nbytes: int) -> torch.Tensor:
        """A host master of ``nbytes``. Where it will be pinned it starts on a page boundary and
        spans whole pages, so two registrations never share a page (small allocations come from
        the heap and would); then it is registered at that exact size."""
        if not (self._async and self.offload_device.type == "cpu" and nbytes > 0):
            return torch.empty(nbytes, dtype=torch.uint8, device=self.offload_device)
        master = host_arena(nbytes)
        self._pin(master)
        return master[:nbytes]

    def _unpin_buffer(self, master: torch.Tensor) -> None:
        ptr = master.data_ptr()
        size = self._pinned_ptrs.pop(ptr, None)
        if size is not None:
            _unregister(self._rt, ptr, size)
            self.tracker.pinned_bytes -= size

    def _pin(self, master: torch.Tensor) -> bool:
        """Page-lock ``master`` at its exact size (the caching host allocator would round it up to a
        power of two). Returns False, with the reason logged once, where pinning failed or the
        budget is spent."""
        t = self.tracker
        budget = self.settings.pin_budget_bytes
        if budget is not None and t.pinned_bytes + master.numel() > budget:
            self._pageable(f"pin budget of {format_bytes(budget)} reached")
            return False
        rc = self._rt.host_register(master.data_ptr(), master.numel())
        if rc != 0:
            self._rt.clear_error()
            self._pageable(f"cudaHostRegister failed with CUDA error {rc}")
            return False
        t.pinned_bytes += master.numel()
        self._pinned_ptrs[master.data_ptr()] = master.numel()
        return True

    def _unpin(self, u: _Unit) -> None:
        if u.pinned:
            self._unpin_buffer(u.master)
            u.pinned = False

    def _pageable(self, reason: str) -> None:
        if not self.tracker.pageable_reason:
            self.tracker.pageable_reason = reason
            log.warning("block swap: using pageable host memory for some blocks (%s); copies will "
                        "be slower and synchronous", reason)

    def use_shared_ring(self, ring: Optional["SharedRing"]) -> None:
        """Take device slots from ``ring`` (shared with other engines) instead of owning a ring."""
        if ring is not self.shared_ring:
            self.release_ring()
            self.shared_ring = ring

    def _alloc_ring(self) -> None:
        k = self.plan.slots
        size = max((u.footprint for u in self._units), default=0)
        if self.shared_ring is not None:
            self._slots = self.shared_ring.take(self, k, size, self.compute_device)
            size = self.tracker.slot_bytes = tensor_bytes(self._slots[0]) if self._slots else 0
        else:
            self._slots = [torch.empty(size, dtype=torch.uint8, device=self.compute_device) for _ in range(k)]
        self._slot_owner = [None] * k
        self._slot_last_use = [0] * k
        self.tracker.slot_owner = [None] * k
        self.tracker.slot_bytes = size
        if self._async:
            if self._copy_stream is None:  # one per engine: a ring comes back on every expert switch
                self._copy_stream = self._rt.new_stream(self.compute_device)
            self._copy_ev = [self._rt.new_event() for _ in range(k)]
            self._free_ev = [self._rt.new_event() for _ in range(k)]

    def _free_ring(self) -> None:
        if self.shared_ring is not None:
            self.shared_ring.release(self)
        self._forget_ring()

    def _give_back_ring(self) -> None:
        """Another engine takes the shared slots: finish what reads them, then forget them."""
        lost = self.device_bytes
        self._sync()
        self._evict_bound()
        self._forget_ring()
        if self.ring_listener is not None and lost:
            self.ring_listener(-lost)

    def _forget_ring(self) -> None:
        self._slots = []
        self._deferred = None
        self._slot_owner, self._slot_last_use = [], []
        self._copy_ev, self._free_ev = [], []
        self.tracker.slot_owner = []
        self._bound.clear()
        for u in self._units:
            u.slot, u.bound, u.slot_views, u.used_since_copy = None, False, {}, False

    def _restore_units(self, device: Optional[torch.device]) -> None:
        """Give every packed parameter its own storage again and release the masters."""
        for u in self._units:
            if u.master is None:
                continue
            own = []
            for e in u.entries:
                dev = device or e.device
                inner = []
                for part, v in zip(e.parts, self._part_views(u.master, e)):
                    if part.stride is not None:
                        out = torch.empty_strided(part.size, part.stride, dtype=part.dtype, device=dev)
                    else:
                        out = torch.empty(part.size, dtype=part.dtype, device=dev)
                    out.copy_(v)
                    inner.append(out)
                own.append(inner[0] if e.wrapper is None else _rebuild(e, inner))
            self._bind(u, own)
            self._unpin(u)
            u.master, u.host_views, u.bound = None, [], False

    # ------------------------------------------------------------------ timing (CUDA)
    def _timing_event(self, stream):
        if not self.timing:
            return None
        ev = self._rt.new_event(timing=True)
        ev.record(stream)
        return ev

    def _add_timing(self, kind: str, name: str, start, end) -> None:
        if len(self._pending_timings) >= MAX_PENDING_TIMINGS:
            self._pending_timings.pop(0)
            self.tracker.timings_dropped += 1
        self._pending_timings.append((kind, name, start, end))

    def _drain_timings(self) -> None:
        """Read the timing events that have completed; never waits for the others."""
        keep = []
        for kind, name, start, end in self._pending_timings:
            if end.query():
                ms = start.elapsed_time(end)
                if kind == "copy":
                    self.tracker.copy_ms[name] = self.tracker.copy_ms.get(name, 0.0) + ms
                else:  # a wait: a stall if compute really waited for the copy
                    self.tracker.stall_ms[name] = self.tracker.stall_ms.get(name, 0.0) + ms
                    if ms > STALL_THRESHOLD_MS:
                        self.tracker.stalls += 1
                    else:
                        self.tracker.prefetch_hits += 1
            else:
                keep.append((kind, name, start, end))
        self._pending_timings = keep

    # ------------------------------------------------------------------ introspection
    def unit_names(self) -> List[str]:
        return [u.name for u in self._units]

    def storages_in_slots(self) -> Iterable[int]:
        """data_ptr of every slot buffer (tests check parameters point inside them)."""
        return [s.data_ptr() for s in self._slots]


class SharedRing:
    """Device slots shared by engines of which only one computes at a time (the two WAN 2.2
    experts): the engine about to run takes the slots, the engine that gave them up holds no device
    memory for its streamed blocks. Grows to the largest request; freed when its holder releases it."""

    def __init__(self):
        self._buffers: List[torch.Tensor] = []
        self._owner = None  # weakref to the engine holding the slots

    @property
    def nbytes(self) -> int:
        return sum(tensor_bytes(b) for b in self._buffers)

    def holder(self) -> Optional["BlockSwapEngine"]:
        return self._owner() if self._owner is not None else None

    def take(self, engine: "BlockSwapEngine", count: int, nbytes: int, device) -> List[torch.Tensor]:
        owner = self.holder()
        if owner is not None and owner is not engine:
            owner._give_back_ring()
        have = tensor_bytes(self._buffers[0]) if self._buffers else 0
        if (len(self._buffers) < count or have < nbytes
                or (self._buffers and self._buffers[0].device != as_device(device))):
            count, nbytes = max(count, len(self._buffers)), max(nbytes, have)
            self._buffers = []  # free the old slots before allocating the larger ones
            self._buffers = [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(count)]
        self._owner = weakref.ref(engine)
        return self._buffers[:count]

    def release(self, engine: "BlockSwapEngine") -> None:
        if self.holder() is engine:
            self._owner = None
            self._buffers = []


def _page_span(master: torch.Tensor) -> int:
    """Host bytes a master occupies: whole pages when it starts a page-aligned buffer that spans them
    (:func:`host_arena`, what pinned masters and loader arenas are), its own bytes otherwise."""
    n = master.numel()
    storage = master.untyped_storage()
    rounded = (n + PAGE - 1) // PAGE * PAGE
    aligned = master.data_ptr() % PAGE == 0
    if aligned and storage.data_ptr() + storage.nbytes() >= master.data_ptr() + rounded:
        return rounded
    return n


def _unregister(rt, ptr: int, size: int) -> None:
    """Unpin one master; a failure is logged and its sticky CUDA error cleared here, not left to
    surface in unrelated code later."""
    rc = rt.host_unregister(ptr)
    if rc != 0:
        rt.clear_error()
        log.warning("block swap: cudaHostUnregister of a %s host copy failed with CUDA error %d; the "
                    "memory is released anyway", format_bytes(size), rc)


def _unregister_all(pinned: Dict[int, int], rt) -> None:
    """Finalizer: unpin whatever an engine still has registered when it is garbage-collected."""
    for ptr, size in list(pinned.items()):
        _unregister(rt, ptr, size)
    pinned.clear()


def _rebuild(e: _Entry, inner: List[torch.Tensor]) -> torch.Tensor:
    """``e``'s wrapper tensor rebuilt around ``inner`` (one tensor per part), marked a Parameter
    where it was one. Not through ``nn.Parameter(t)``: for a custom tensor that is ``t.detach()``,
    and ComfyUI's QuantizedTensor clones its scales when detached (they would leave the buffer), so
    it is marked the way ``nn.Parameter`` marks custom tensors."""
    ctx, size, stride = e.wrapper
    t = type(e.param).__tensor_unflatten__({p.name: v for p, v in zip(e.parts, inner)}, ctx, size, stride)
    if isinstance(e.param, nn.Parameter) and not isinstance(t, nn.Parameter):
        t._is_param = True
    return t


def place_resident(model: nn.Module, plan: SwapPlan, device) -> None:
    """Move every parameter and buffer that is not streamed to ``device`` (the pure-torch path; in
    ComfyUI the ModelPatcher does this). Parameter objects keep their identity."""
    device = as_device(device)
    streamed = {id(p) for name in plan.units for p in model.get_submodule(name).parameters()}
    for p in model.parameters():
        if id(p) not in streamed and p.device != device:
            p.data = p.data.to(device)
    for mod in model.modules():
        for key, b in mod._buffers.items():
            if b is not None and b.device != device:
                mod._buffers[key] = b.to(device)
