"""The block-swap engine: stream chosen WAN blocks from host RAM into a small ring of device slots.

Pure torch; importable without ComfyUI. The data path of one streamed unit (a main block, a VACE
block, an embedding), and the module that owns each step:

    file ──loader──▶ host master ──copy stream──▶ slot ──block forward──▶ back to the host views
         (model_loader)  (engine/host_masters)     (engine/device_ring)  (this engine)  (host_masters: no copy)

* **Host master** (:mod:`engine.host_masters`). At setup every parameter of the unit is packed into one flat
  ``uint8`` buffer on the host, page-locked at its exact size where copies go to a CUDA device, and
  the parameters are rebound to views of it; a loader may read the unit straight into such a buffer.
* **Device ring** (:mod:`engine.device_ring`). ``K`` flat device buffers ("slots"), each as large as the
  largest unit. Bringing a unit in is one contiguous copy master -> slot on a copy stream, ordered by
  events against compute, then rebinding its parameters to views of the slot. Weights never change
  during inference, so eviction is rebinding back to the host views: nothing is copied device -> host.
* **Schedule** (:mod:`engine.swap_schedule`). While a unit computes, the next ``prefetch`` units of the
  order learned from the previous forward are copied; it wraps around into the next forward.
* **Tracker** (:mod:`engine.swap_tracker`). What was done and where everything is, for readouts and tests.

The engine below composes them: :meth:`BlockSwapEngine.before_unit` / :meth:`~BlockSwapEngine.after_unit`
run around each unit's forward. On CPU (``offload_device == compute_device``, no runtime) the same
pack/copy/rebind path runs synchronously, which is how the engine is tested without a GPU; a recording
runtime runs the asynchronous path on a CPU too (``tests/test_stream_order.py``).
"""
from __future__ import annotations

import tempfile
import time
import weakref
from typing import Callable, Iterable, List, Mapping, Optional, Sequence

import torch
from torch import nn

from .config import SwapPlan, SwapSettings, detect_layout, plan_swap
from .engine.cuda_runtime import CudaRuntime
from .engine.device_ring import DeviceRing, SharedRing
from .engine.file_masters import FileReadError, files_of
from .engine.host_masters import (HostMasters, PinnedMemory, _Unit, arena_offset, check_streamable, host_arena,
                           packed_bytes)
from .engine.staging import Staging
from .engine.swap_schedule import Schedule
from .engine.swap_tracker import BlockSwapTracker, TimingLog
from .utils import as_device, get_logger

log = get_logger("engine")

# the engine's public names, wherever they live
__all__ = ["BlockSwapEngine", "BlockSwapTracker", "SharedRing", "arena_offset", "check_streamable",
           "host_arena", "packed_bytes", "place_resident"]

_REPACK = object()  # a slot-transform tag no caller uses


class BlockSwapEngine:
    """Streams the units of a :class:`SwapPlan` through a ring of device slots.

    Typical pure-torch use::

        engine = BlockSwapEngine.from_settings(model, SwapSettings(blocks_to_swap=20), "cuda")
        engine.setup()                 # pack host masters, allocate the ring, install hooks
        place_resident(model, engine.plan, "cuda")
        out = model(...)               # hooks stream the swapped blocks
        engine.teardown()              # parameters back where they were, with the same values

    Integrations that drive the schedule themselves call :meth:`begin_forward`,
    :meth:`before_unit`, :meth:`after_unit` and :meth:`end_forward` instead of installing hooks.
    """

    def __init__(self, model: nn.Module, plan: SwapPlan, compute_device, offload_device="cpu", *,
                 unit_modules: Optional[Mapping[str, nn.Module]] = None, timing: bool = True,
                 host_available: Optional[int] = None, runtime=None, read_threads: Optional[bool] = None):
        # Weak: an integration may key a registry by the model; a strong reference would keep it alive.
        self._model_ref = weakref.ref(model)
        self.plan = plan
        self.settings: SwapSettings = plan.settings
        self.compute_device = as_device(compute_device)
        self.offload_device = as_device(offload_device)
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
        self._timings = TimingLog(self.tracker, self._rt, timing and self._rt is not None)
        pinned = self._pinned = PinnedMemory(self._rt, self.settings.pin_budget_bytes, self.tracker) if self._async else None
        # Masters on file: nothing of the units in RAM; they are read into a staging ring (pinned,
        # the only pinned memory this needs) just ahead of their copies, on a worker thread on CUDA.
        on_file = self.settings.host_memory == "file"
        self.tracker.masters = self.settings.host_memory
        spill_dir = (self.settings.spill_dir or tempfile.gettempdir()) if on_file else None
        self._masters = HostMasters(self.offload_device, None if on_file else pinned, self.tracker, host_available,
                                    spill_dir)
        threaded = self.compute_device.type == "cuda" if read_threads is None else read_threads
        self._staging = Staging(plan.slots, self.tracker, self._rt, self._async, pinned, threaded) if on_file else None
        self._ring = DeviceRing(self._units, plan.slots, self.compute_device, self._rt, self._async,
                                self._timings, self.tracker, self._staging)
        self._ring.notify_taken_away(self._give_back_ring)
        self._schedule = Schedule(len(self._units))
        self._in_forward = False
        self._release_pending = False
        self._hooks: List = []
        self._bracket = True
        self._is_setup = False
        self._packed = False  # host masters packed (pack_masters), maybe before the ring exists
        # Called as slot_transform(unit_name) right after a unit is bound to freshly copied slot
        # memory; it may rewrite the bound parameters in place (ComfyUI applies LoRA patches here).
        self.slot_transform: Optional[Callable[[str], None]] = None
        self._slot_tag = None
        # Told the change in device bytes when another engine takes the shared slots away.
        self.ring_listener: Optional[Callable[[int], None]] = None

    @classmethod
    def from_settings(cls, model: nn.Module, settings: SwapSettings, compute_device,
                      offload_device="cpu", **kwargs) -> "BlockSwapEngine":
        return cls(model, plan_swap(detect_layout(model), settings), compute_device,
                   offload_device, **kwargs)

    @property
    def model(self) -> Optional[nn.Module]:
        return self._model_ref()

    @property
    def is_setup(self) -> bool:
        return self._is_setup

    @property
    def device_bytes(self) -> int:
        """Device memory held by the ring."""
        return self._ring.device_bytes

    @property
    def shared_ring(self) -> Optional[SharedRing]:
        return self._ring.shared

    # ------------------------------------------------------------------ lifecycle
    def setup(self, install_hooks: bool = True) -> "BlockSwapEngine":
        """Pack host masters, allocate the ring and (optionally) install module hooks.

        Idempotent and incremental: on an engine already set up it re-packs only units whose
        parameters something else moved or replaced since (another user of the same weights), and
        re-allocates a released ring. Every check runs before the model is touched; if packing
        fails half-way, the units packed so far are restored and the error re-raised.
        """
        self.check_files()
        if self._is_setup:
            self._refresh()
        else:
            self.pack_masters()
            try:
                self._ring.alloc()
            except BaseException:
                self._masters.restore(self._units, None)
                self._packed = False
                raise
            self._is_setup = True
        self._update_host_bytes()
        if install_hooks:
            self.attach_hooks()
        log.debug("block swap set up: %s", self.tracker.format_summary())
        return self

    def check_files(self) -> None:
        """Raise :class:`file_masters.FileReadError` naming the file when a weight file a unit is read
        from changed, was truncated or deleted since it was mapped: before a forward reads from it."""
        for u in self._units:
            for r in u.reads or ():
                problem = r.source.problem()
                if problem:
                    raise FileReadError(f"{r.source.path}: {problem} since block swap started reading "
                                        f"{u.name} from it; load the model again (re-queue after the loader "
                                        "runs), or keep the file unchanged while ComfyUI uses it.")

    def files(self) -> List[str]:
        """The weight files units are read from (spill files are not named)."""
        return sorted({path for u in self._units for path in files_of(u.reads or ())})

    def pack_masters(self) -> "BlockSwapEngine":
        """Pack the host masters only (no device memory): what a loader does right after reading the
        file, so the streamed blocks go to their pinned copies before anything runs. ``setup``
        calls it (a no-op once done) before allocating the ring."""
        if self._packed:
            return self
        self._masters.pack_all(self._units)
        self.tracker.location.update({u.name: "host" for u in self._units})
        self._packed = True
        self._update_host_bytes()
        return self

    def _refresh(self) -> None:
        """Setup again: re-pack the units something else moved or replaced, bring a ring back."""
        self._sync()  # old masters and slots may still be read by work in flight
        self._ring.unbind_all()
        stale = [u for u in self._units if not self._masters.intact(u)]
        if stale:
            log.info("block swap: %d streamed units were moved or replaced since the last run; "
                     "re-packing them", len(stale))
            self._masters.repack(stale, before=self.invalidate_slots)
        if not self._ring.fits():
            self._free_ring()
            self._ring.alloc()

    def teardown(self, device=None) -> None:
        """Undo :meth:`setup`: every parameter gets its own storage again, with the same values, on
        ``device`` or, by default, where it was before setup. Idempotent."""
        if not (self._is_setup or self._packed):
            return
        self.detach_hooks()
        self._sync()
        if self._staging is not None:
            self._staging.shutdown()
        self._masters.restore(self._units, None if device is None else as_device(device), extras=True)
        self._slot_tag = _REPACK  # a later set_slot_transform packs its extras again, whatever its tag
        self._free_ring()
        self.tracker.location.clear()
        self.tracker.host_bytes = self.tracker.pinned_bytes = 0
        self._is_setup = self._packed = False

    def replan(self, plan: SwapPlan, unit_modules: Optional[Mapping[str, nn.Module]] = None, device=None) -> None:
        """Stream the units of ``plan`` from now on (more blocks after an out-of-memory error, fewer or more
        in adaptive mode), between forwards. Units both plans stream keep their host masters; new ones are
        packed (checked first: a failure changes nothing); units ``plan`` drops get their own storage back,
        on ``device`` (default: where they were). The ring, the staging ring and the learned order are made
        for the new plan, and the slot transform's extras are packed again at its next installation: nothing
        of the old plan is left over. The settings other than the counts must stay as they are."""
        if self._in_forward or self._ring.bound:
            raise RuntimeError("block swap: the plan can only change between forwards")
        old = {u.name: u for u in self._units}
        modules = dict(unit_modules or {})
        model = self.model
        units = [old.get(name) or _Unit(i, name, modules.get(name) or model.get_submodule(name))
                 for i, name in enumerate(plan.units)]
        added = [u for u in units if u.name not in old]
        dropped = [u for u in self._units if u.name not in set(plan.units)]
        self._sync()
        if self._packed and added:
            self._masters.pack_all(added)  # checks before it packs; restores what it packed if it fails
        self._ring.unbind_all()
        self._free_ring()
        self._masters.restore(dropped, None if device is None else as_device(device), extras=True)
        for i, u in enumerate(units):
            u.index = i
        self._units = self._ring.units = units
        self._ring.count = plan.slots
        if self._staging is not None:
            self._staging.release()
            self._staging.count = max(1, plan.slots)
        self.plan, self.settings = plan, plan.settings
        self._schedule = Schedule(len(units))
        self._slot_tag = _REPACK
        t = self.tracker
        t.units, t.resident_blocks, t.slots = plan.units, plan.resident_blocks, plan.slots
        t.location = {u.name: "host" for u in units if u.packed}
        if self._hooks:  # per-instance hooks name the old units
            self.detach_hooks()
            self.attach_hooks(self._bracket)
        if self._is_setup:
            self._ring.alloc()
        self._update_host_bytes()
        log.info("block swap: plan changed to %d streamed units (%d added, %d dropped)", len(units), len(added),
                 len(dropped))

    def release_ring(self) -> None:
        """Free the device ring but keep the host masters bound: the model stays usable on the host
        and a later :meth:`setup` only re-allocates the ring. Inside a forward (a garbage-collected
        clone's ON_DETACH can fire anywhere) the release waits for the forward's end, or, without
        begin/end calls, for the running unit's end."""
        if self._in_forward or self._ring.bound:
            self._release_pending = True
            return
        if not self._ring.slots:
            return
        self._sync()
        self._ring.unbind_all()
        self._free_ring()

    def use_shared_ring(self, ring: Optional[SharedRing]) -> None:
        """Take device slots from ``ring`` (shared with other engines) instead of owning a ring."""
        if ring is not self._ring.shared:
            self.release_ring()
            self._ring.shared = ring

    def _free_ring(self) -> None:
        self._ring.release()

    def _give_back_ring(self) -> None:
        """Another engine takes the shared slots: finish what reads them, then forget them."""
        lost = self.device_bytes
        self._sync()
        self._ring.unbind_all()
        self._ring.forget()
        if self.ring_listener is not None and lost:
            self.ring_listener(-lost)

    def _sync(self) -> None:
        """Wait for in-flight copies and for kernels still reading slots, on every stream of the
        device: the forward may have run on any of them (never in the steady state: only before the
        ring or the masters are released)."""
        if self._rt is not None and (self._ring.slots or self._timings.pending):
            self._rt.synchronize(self.compute_device)
            self._timings.drain()

    def _update_host_bytes(self) -> None:
        self.tracker.host_bytes = self._masters.host_bytes(self._units)
        self.tracker.pinned_bytes = self._pinned.total if self._pinned is not None else 0

    # ------------------------------------------------------------------ runs
    def reset_counters(self) -> None:
        """Start a run's figures: zero the counters and drop timing events of earlier work, which
        would otherwise be read into this run's copy and stall times."""
        self._timings.clear()
        self.tracker.reset_counters()

    def synchronize(self) -> None:
        """Wait for everything issued so far (copies and compute, every stream) and read all timing
        events: what a benchmark does before it reads the figures. Never needed in normal use."""
        self._sync()

    def end_run(self) -> None:
        """After a sampling run: evict whatever is still bound (an interrupted run), close a forward
        found without begin/end calls, and read the finished timing events. Keeps masters and
        slots for the next run."""
        self._ring.unbind_all()
        if self._schedule.trace and not self._in_forward:
            self._finish_forward()
        self._timings.drain()
        self._release_if_pending()

    # ------------------------------------------------------------------ slot transform
    def invalidate_slots(self) -> None:
        """Forget what the slots hold (after the slot transform changed, e.g. new LoRA patches)."""
        self._ring.unbind_all()
        if self._staging is not None:
            self._staging.clear()  # staged bytes carry the old extras
        for owner in self._ring.owner:
            if owner is not None:
                self._ring.vacate(self._units[owner])

    def set_slot_transform(self, fn: Optional[Callable[[str], None]], tag=None,
                           extras: Optional[Mapping[str, Sequence[torch.Tensor]]] = None) -> None:
        """Install the slot transform; a different ``tag`` (e.g. another LoRA set) drops what the
        slots hold, since it was transformed for the old one. ``extras``: per unit name, tensors the
        transform reads (LoRA factors); they are packed once per tag into a host buffer per unit
        (pinned like the masters) and copied into the slot with the unit's weights, where the
        transform finds them with :meth:`slot_extras`."""
        if tag != self._slot_tag:
            self.invalidate_slots()
            self._masters.pack_extras(self._units, extras or {})
            self._update_host_bytes()
            if self._ring.slots and not self._ring.fits():
                self._sync()
                self._ring.unbind_all()
                self._free_ring()  # too small for weights + extras: the next unit brings a larger one
        self.slot_transform, self._slot_tag = fn, tag

    def slot_extras(self, unit_name: str) -> List[torch.Tensor]:
        """The unit's extras as they sit in its slot now (device tensors, in the order given)."""
        return self._ring.extras_views(self._units[self.plan.units.index(unit_name)])

    # ------------------------------------------------------------------ hooks
    def attach_hooks(self, bracket_forwards: bool = True) -> None:
        """Install per-instance module hooks (no global patching) that drive the schedule.
        ``bracket_forwards=False``: no hooks on the model itself, for callers whose forward does not
        go through ``model.forward``; the engine then finds forward boundaries on its own."""
        if not self._hooks:
            self._bracket = bracket_forwards
            self._hooks = _module_hooks(self, self.model if bracket_forwards else None)

    def detach_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # ------------------------------------------------------------------ the forward
    def begin_forward(self) -> None:
        self._in_forward = True
        self._ring.deferred = None
        self._ring.unbind_all()
        self._schedule.begin()

    def end_forward(self) -> None:
        self._ring.unbind_all()  # normally empty; not after an exception inside a unit's hooks
        self._finish_forward()
        self._in_forward = False
        self._release_if_pending()

    def _finish_forward(self) -> None:
        if self._schedule.finish():
            self.tracker.schedule_updates += 1
        self.tracker.forwards += 1
        self._timings.drain()

    def before_unit(self, index: int) -> None:
        """Make unit ``index`` resident in a slot and point its parameters there; prefetch ahead."""
        t0 = time.perf_counter()
        ring = self._ring
        if not ring.slots:  # released since the last use: bring the ring back
            ring.alloc()
        if not self._in_forward and self._schedule.boundary(index):
            self._finish_forward()
        u = self._units[index]
        self._schedule.ran(index)
        want = min(self.settings.prefetch_blocks, len(ring.slots) - 1)
        staging = self._staging
        ahead = self._schedule.upcoming(index, want + (staging.count if staging is not None else 0))
        upcoming = ahead[:want]
        if staging is not None:  # reads run ahead of the copies, as far as the staging ring allows
            staging.want([w for w in (u, *(self._units[v] for v in ahead)) if w.slot is None and w.reads is not None])
        protect = {index, *upcoming}
        was_slotted = u.slot is not None
        if not was_slotted:
            ring.fetch(u, protect)
        ring.wait(u, was_slotted)
        fresh = not u.used_since_copy
        ring.bind(u)
        ring.prefetch(upcoming, protect)  # before the slot transform: the copies run while it computes
        if fresh and self.slot_transform is not None:
            try:
                self.slot_transform(u.name)
            except BaseException:
                ring.vacate(u)  # half-patched: never reuse it
                raise
        self.tracker.hook_seconds += time.perf_counter() - t0

    def after_unit(self, index: int) -> None:
        """Unit ``index`` has been issued: mark its slot's last use and rebind it to the host."""
        t0 = time.perf_counter()
        u = self._units[index]
        if u.bound:
            self._ring.record_free(u.slot)
            self._ring.unbind(u)
        self._ring.prefetch_deferred()  # this unit's kernels are queued: the host may wait now
        if self._release_pending:
            self._release_if_pending()
        self.tracker.hook_seconds += time.perf_counter() - t0

    def _release_if_pending(self) -> None:
        if self._release_pending and not self._in_forward and not self._ring.bound:
            self._release_pending = False
            self.release_ring()

    # ------------------------------------------------------------------ introspection
    def unit_names(self) -> List[str]:
        return [u.name for u in self._units]

    def storages_in_slots(self) -> Iterable[int]:
        """data_ptr of every slot buffer (tests check parameters point inside them)."""
        return [s.data_ptr() for s in self._ring.slots]

    @property
    def _slots(self) -> List[torch.Tensor]:  # the ring's buffers (tests look at them)
        return self._ring.slots

    @property
    def _pending_timings(self) -> list:  # timing events not read yet (tests look at them)
        return self._timings.pending


def _module_hooks(engine: BlockSwapEngine, model: Optional[nn.Module]) -> List:
    """Hooks that run the engine around each unit's forward, and around the model's when given."""
    hooks = []
    if model is not None:
        hooks.append(model.register_forward_pre_hook(lambda m, a: engine.begin_forward()))
        hooks.append(model.register_forward_hook(lambda m, a, o: engine.end_forward(), always_call=True))
    for u in engine._units:
        hooks.append(u.module.register_forward_pre_hook(
            lambda m, a, index=u.index: engine.before_unit(index)))
        # always_call: an exception inside the block still evicts it, so the model stays usable.
        hooks.append(u.module.register_forward_hook(
            lambda m, a, o, index=u.index: engine.after_unit(index), always_call=True))
    return hooks


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
