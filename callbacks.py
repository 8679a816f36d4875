"""The ComfyUI side of block swap: the engine inside ModelPatcher's memory management.

Mechanism, and why it is this one:

1. **Object patches hide the streamed units from ModelPatcher.** The node's clone gets one object patch
   per streamed unit (``diffusion_model.blocks.N``, ``diffusion_model.vace_blocks.N``, the text/image
   embeddings). Each replaces the unit by a :class:`StreamedUnit`: a module with no parameters that
   holds the real block outside the module tree and, when called, streams it in, runs it and
   evicts it. ComfyUI applies object patches before it loads (``patch_model``) and restores the
   originals when it unpatches, per clone. So ``_load_list()``, ``model.to()``, lowvram casting and
   LoRA baking never see the swapped blocks: they are never moved to the GPU at load (no spike),
   never patched behind our back, and the input MODEL and every other clone see the ordinary model.
   VACE blocks, which WAN calls directly rather than through ``patches_replace``, are covered the
   same way. No ComfyUI function is replaced; no module outside the clone's patches is touched.
2. **Keyed callbacks carry the lifecycle.** ON_PRE_RUN (every sampling run, after ComfyUI's load) packs
   host masters if needed, allocates the ring and fixes the accounting; it does not rely on ON_LOAD,
   which ComfyUI skips when a loaded model or a clone of it is reused. ON_CLEANUP (after every
   sampler call) writes the run summary to the log and the node (with ``block_swap_debug`` also
   per-unit detail and a JSON trace file for bug reports). ON_DETACH (clone switches, unload, ``__del__``; possibly
   twice) releases the device ring; host masters stay bound, so reuse costs nothing. All are keyed,
   idempotent and never raise out of a detach.
3. **A DIFFUSION_MODEL wrapper** brackets each forward (begin/end of the learned schedule, so the end
   of one forward prefetches the start of the next) and sets up lazily if no ON_PRE_RUN came.
4. **LoRA and other weight patches** on swapped keys are applied on the device, right after a block
   is copied into its slot, by ComfyUI's own ``patch_weight_to_device(key, return_weight=True)``: the
   same code, dtype and rounding as for resident weights, while the host master keeps the original
   weights (one copy in RAM, like ComfyUI's lowvram path). Changing LoRA makes a new clone with new
   patches; the next run applies those.
5. **Accounting.** The clone's ``size`` is the resident part plus the ring, and after each preparation
   ``model_loaded_weight_memory`` is set to the bytes really on the load device plus the ring. The
   clone gets its own ``patches_uuid``, so when another clone of the same weights was loaded
   last, ComfyUI unpatches and reloads rather than handing us someone else's patched weights.
6. **Pre-flight at apply time** (:func:`preflight`), before the clone exists: host RAM for the host
   copies of every model the node prepares (both WAN 2.2 experts together) or a clear error; a
   note when ComfyUI's pinned-memory cap leaves part of them pageable; a warning when the weights
   left on the GPU exceed 90 % of the card.
7. **Dynamic VRAM** (``ModelPatcherDynamic``, ComfyUI's default on NVIDIA): ComfyUI streams such a
   model's weights itself. Object patches do work on a dynamic clone (applied before its load; hidden
   modules are skipped); what makes streaming on top of it unsafe is per-module state an earlier
   dynamic load leaves behind (``_v`` VBAR slots, ``_pin*`` buffers, lowvram functions), pins outside
   ComfyUI's accounting, and ``model_loaded_weight_memory``, which its load zeroes. So the choice is
   explicit (``dynamic_vram``): by default the node passes the model through unchanged and says so;
   "block swap" takes over through core's own route to a classic patcher,
   ``clone(disable_dynamic=True)`` (:func:`classic_copy`), after a host-RAM check.
"""
from __future__ import annotations

import itertools
import time
import uuid
import weakref
from dataclasses import replace
from typing import Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

from .block_manager import BlockSwapEngine
from .engine.device_ring import SharedRing
from .engine.host_masters import check_streamable, packed_bytes
from .config import BlockSwapError, SwapPlan, plan_swap, tensor_bytes, unwrap
from .engine.file_masters import SpillError
from .preflight import modules_with_others, full_model_size, host_memory_mode, preflight, with_pin_budget
from .preflight import pin_budget_left as _pin_budget_left
from .readout import format_run_text, node_text, plan_lines, run_figures, run_trace
from .recovery import (OOM_CHOICES, RETRY, AdaptiveCount, Change, OOMFailure, blocks_needed, grow_settings,
                       run_with_recovery, streamable)
from .utils import (__version__, as_device, format_bytes, get_logger, host_available_bytes, trace_directory,
                    validate_tensor_consistency, write_trace)

log = get_logger("comfy")

KEY = "wan22_blockswap"  # callbacks/wrappers are registered under this key: re-applying replaces, never stacks

# One engine per diffusion model: clones share the module, so they share its host masters. Weak keys:
# the registry never keeps a model alive (engines hold their model weakly too).
_ENGINES: "weakref.WeakKeyDictionary[nn.Module, BlockSwapEngine]" = weakref.WeakKeyDictionary()


class StreamedUnit(nn.Module):
    """Stands in for a streamed block inside the patcher's module tree.

    It has no parameters: the real block is kept as a plain attribute, not a submodule, so loading,
    ``.to()`` and parameter walks skip it. Calls run the real block through the engine; attribute
    lookups fall through to it; ``state_dict()`` includes its weights, so LoRA loaders and savers
    still see every key.
    """

    def __init__(self, target: nn.Module, controller: "SwapController", name: str):
        super().__init__()
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_controller", controller)
        self.unit_name = name

    def forward(self, *args, **kwargs):
        return self._controller.run_unit(self.unit_name, self._target, args, kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_target"), name)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination.update(self._target.state_dict(prefix=prefix, keep_vars=keep_vars))

    @property
    def swapped_module(self) -> nn.Module:
        """The real block (see :func:`config.unwrap`)."""
        return self._target

    def extra_repr(self) -> str:
        return f"streamed by block swap: {self.unit_name}"


class SwapController:
    """What one application of the node decided, and its ComfyUI callbacks.

    Shared by the node's clone and every clone made from it downstream (ModelSamplingSD3, LoRA
    loaders...), which copy its callbacks, wrapper and object patches.
    """

    def __init__(self, diffusion_model: nn.Module, plan: SwapPlan, *, debug: bool = False,
                 node_id: Optional[str] = None, ring: Optional[SharedRing] = None, on_oom: str = RETRY,
                 memory=None):
        self.ring = ring  # device slots shared with the other models of a looper pipeline
        self.debug = debug
        self.node_id = node_id
        self._model_ref = weakref.ref(diffusion_model)
        self._set_plan(plan)
        self._patcher_ref = None
        self._node_patcher = None  # the node's own clone: later clones copy its object patches
        self._slot_patches: Dict[str, list] = {}  # unit -> patched keys, see _set_weight_patches
        self._attached: List[str] = []  # GGUF keys whose tensors carry our attached patches
        # Out of memory: stream more and run the forward again (recovery.py), unless on_oom is "fail".
        self.on_oom = on_oom
        self.oom_at: Optional[int] = None  # the block count of the first out-of-memory error
        self.changes: List[Change] = []  # every change of the plan, for the log, readout and trace
        # vram_budget adaptive: the device's memory (budget, peaks) and the count that follows it
        self.memory = memory
        self.adaptive: Optional[AdaptiveCount] = None
        # the node readout's plan lines and warnings, shown again with every run's figures
        self.async_copies = False  # copies on a side stream from pinned memory (said on the node)
        self.masters = ""  # where the host masters are and why ("file (RAM 6.10 GiB < 21.8 GiB)")
        self.readout_notes: List[str] = []

    def _set_plan(self, plan: SwapPlan) -> None:
        model = self._model_ref()
        self.plan = plan
        self.targets: Dict[str, nn.Module] = {n: unwrap(model.get_submodule(n)) for n in plan.units}
        self._index = {n: i for i, n in enumerate(plan.units)}

    @property
    def readout_plan(self) -> List[str]:
        """The node's plan lines for the plan in force: after a change, the first line says why."""
        plan = self.plan
        layout = plan.layout
        if not plan.units:  # nothing streams (yet: an out-of-memory error would change that)
            return [f"Block swap off: all {layout.num_blocks} blocks resident."]
        lines = plan_lines(streamed_blocks=plan.block_indices, num_blocks=layout.num_blocks,
                           vace_streamed=plan.vace_indices, num_vace_blocks=layout.num_vace_blocks,
                           other_units=[u for u in plan.units if not u.startswith(("blocks.", "vace_blocks."))],
                           slots=plan.slots, slot_bytes=self.ring_bytes() // max(1, plan.slots),
                           async_copies=self.async_copies, masters=self.masters or None)
        if self.changes:
            note = (f"OOM at {self.oom_at}" if self.oom_at is not None and self.adaptive is None
                    else f"adaptive, {len(self.changes)} change{'s' if len(self.changes) > 1 else ''}")
            lines[0] += f" ({note})"
        return lines

    # ------------------------------------------------------------------ installation
    def install(self, patcher) -> None:
        """Object patches, keyed callbacks and the wrapper on ``patcher``: the node's own clone, from
        which :func:`reset_model_blockswap_state` removed any earlier ones."""
        from comfy.patcher_extension import CallbacksMP, WrappersMP

        self._install_units(patcher)
        for cb_type, fn in ((CallbacksMP.ON_PRE_RUN, self.on_pre_run),
                            (CallbacksMP.ON_CLEANUP, self.on_cleanup),
                            (CallbacksMP.ON_DETACH, self.on_detach)):
            patcher.add_callback_with_key(cb_type, KEY, fn)
        patcher.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, KEY, self.diffusion_model_wrapper)
        # Weights under this clone differ from other clones' (their streamed part lives elsewhere):
        # a fresh uuid makes ComfyUI unpatch another clone's weights before loading this one.
        patcher.patches_uuid = uuid.uuid4()
        self._patcher_ref = self._node_patcher = weakref.ref(patcher)

    def _install_units(self, patcher) -> None:
        """``patcher``'s stand-ins for exactly the units of the plan in force, and its size (the resident
        part plus the ring) to match."""
        for key in [k for k, v in patcher.object_patches.items() if isinstance(v, StreamedUnit)]:
            if key[len("diffusion_model."):] not in self.targets:
                del patcher.object_patches[key]
        for name, target in self.targets.items():
            key = f"diffusion_model.{name}"
            if not isinstance(patcher.object_patches.get(key), StreamedUnit):
                patcher.add_object_patch(key, StreamedUnit(target, self, name))
        streamed = sum(tensor_bytes(p) for t in self.targets.values() for p in t.parameters())
        patcher.size = max(0, full_model_size(patcher) - streamed) + self.ring_bytes()

    def _installed(self, patcher) -> set:
        return {k[len("diffusion_model."):] for k, v in patcher.object_patches.items() if isinstance(v, StreamedUnit)}

    def ring_bytes(self) -> int:
        return self.plan.slots * max((packed_bytes(t) for t in self.targets.values()), default=0)

    # ------------------------------------------------------------------ lifecycle
    def engine(self) -> Optional[BlockSwapEngine]:
        model = self._model_ref()
        return None if model is None else _ENGINES.get(model)

    def prepare(self, patcher) -> BlockSwapEngine:
        """Make the engine ready for a run of ``patcher``: masters, ring, patches, accounting."""
        engine = self._engine_for(patcher)
        engine.use_shared_ring(self.ring)
        engine.ring_listener = self._ring_changed
        self._make_room_for_ring(patcher, engine)
        try:
            engine.setup(install_hooks=False)
        except SpillError as err:
            engine = self._masters_in_ram_instead(patcher, err)
            engine.use_shared_ring(self.ring)
            engine.ring_listener = self._ring_changed
            engine.setup(install_hooks=False)
        self._patcher_ref = weakref.ref(patcher)
        self._set_weight_patches(patcher, engine)
        self.account(patcher, engine)
        return engine

    def pack_masters(self, patcher) -> BlockSwapEngine:
        """Only the host masters, now (the BlockSwap loader, right after reading the file; the swap
        node for masters on file, so the streamed blocks' RAM copies go at once): nothing is allocated
        on the device."""
        try:
            return self._engine_for(patcher).pack_masters()
        except SpillError as err:
            return self._masters_in_ram_instead(patcher, err).pack_masters()

    def _masters_in_ram_instead(self, patcher, err: Exception) -> BlockSwapEngine:
        """The spill folder failed (unwritable, full): host masters in RAM where they fit, with a log
        line and a note on the node; else the error, which names the folder."""
        from .preflight import host_bytes_needed

        need, available = host_bytes_needed(self.targets.values()), host_available_bytes()
        if need > available:
            raise BlockSwapError(f"{err} (host copies in RAM instead would need {format_bytes(need)}, but only "
                                 f"{format_bytes(available)} is available)") from err
        log.warning("block swap: %s; keeping the host masters in RAM instead (%s fit in %s)", err,
                    format_bytes(need), format_bytes(available))
        self.plan = replace(self.plan, settings=replace(self.plan.settings, host_memory="RAM"))
        self.masters = "RAM (spill failed)"
        self.readout_notes.append(f"Spill failed, masters in RAM: {err}")
        engine = _ENGINES.pop(self._model_ref(), None)
        if engine is not None:
            engine.teardown()
        return self._engine_for(patcher)

    def _engine_for(self, patcher) -> BlockSwapEngine:
        model = self._model_ref()
        if model is None:
            raise RuntimeError("block swap: the diffusion model this node prepared no longer exists")
        device = patcher.load_device
        # Host masters live in RAM even where ComfyUI keeps models on the GPU (--highvram).
        offload = patcher.offload_device if patcher.offload_device.type == "cpu" else torch.device("cpu")
        engine = _ENGINES.get(model)
        mine = self.plan.settings
        if engine is not None and (engine.settings.use_non_blocking != mine.use_non_blocking
                                   or engine.settings.host_memory != mine.host_memory
                                   or engine.settings.spill_dir != mine.spill_dir
                                   or engine.compute_device != as_device(device)):
            # Another BlockSwap node with other settings used these weights last, or another device
            # (cuda:0 -> cuda:1 must not keep a ring on the old GPU).
            engine.teardown(device=offload)
            engine = None
        elif engine is not None and (engine.plan.units != self.plan.units or engine.plan.slots != self.plan.slots):
            # another count (another node, or this one after an out-of-memory error): the masters both
            # plans stream are kept, the others packed or given back
            engine.replan(replace(self.plan, settings=replace(engine.settings, **_counts(mine))),
                          unit_modules=self.targets, device=offload)
        if engine is None:
            engine = BlockSwapEngine(model, replace(self.plan, settings=with_pin_budget(self.plan.settings, _ENGINES, model)),
                                     device, offload, unit_modules=self.targets)
            _ENGINES[model] = engine
        return engine

    def _make_room_for_ring(self, patcher, engine: BlockSwapEngine) -> None:
        """When ComfyUI could load the model only partially, its budget is already spent on resident
        modules, and a ring allocated on top would eat the activation reserve: ask ComfyUI to
        offload the ring's worth of resident weights first (its own partial-unload path)."""
        if engine.device_bytes or not getattr(patcher.model, "model_lowvram", False):
            return
        need = self.ring_bytes()
        freed = patcher.partially_unload(patcher.offload_device, need)
        log.info("block swap: model only partly fits; ComfyUI offloaded %s of resident weights to "
                 "make room for the %s ring", format_bytes(freed or 0), format_bytes(need))

    def _unit_of(self, key: str) -> Optional[str]:
        if not key.startswith("diffusion_model."):
            return None
        path = key[len("diffusion_model."):]
        return next((name for name in self.targets if path.startswith(name + ".")), None)

    def _param(self, key: str):
        unit = self._unit_of(key)
        return self.targets[unit].get_parameter(key[len("diffusion_model.") + len(unit) + 1:])

    def _set_weight_patches(self, patcher, engine: BlockSwapEngine) -> None:
        """Route the patcher's weight patches on streamed keys.

        Quantized GGUF weights carry their patches as a ``.patches`` attribute that ComfyUI-GGUF
        applies when it dequantizes; its own ``patch_weight_to_device`` attaches them (and the
        attribute survives our rebinding). Every other patched key is patched in the slot, from its
        patch tensors copied there with the block (the engine's extras: :mod:`engine.slot_patches`).
        """
        for group in getattr(patcher, "hook_patches", {}).values():
            streamed = [key for key in group if self._unit_of(key)]
            if streamed:  # ComfyUI applies these by replacing parameters of the hidden blocks
                raise BlockSwapError(
                    f"hook-based LoRA (Create Hook LoRA / conditioning hooks) patches streamed block "
                    f"weights ({streamed[0]}...), which block swap does not support yet; load the LoRA "
                    "with LoraLoaderModelOnly instead, or swap fewer blocks.")
        slot_keys: Dict[str, List[str]] = {}
        self._clear_attached()
        for key, patches in patcher.patches.items():
            unit = self._unit_of(key)
            if unit is None or not patches:
                continue
            if is_gguf_quantized(self._param(key)):
                patcher.patch_weight_to_device(key)
                self._attached.append(key)
            else:
                slot_keys.setdefault(unit, []).append(key)
        from .engine.slot_patches import patch_tensors

        # per unit: (key, its patches, where its tensors start in the unit's extras, how many)
        self._slot_patches = {}
        extras: Dict[str, List[torch.Tensor]] = {}
        for unit, keys in slot_keys.items():
            tensors = extras[unit] = []
            for key in keys:
                found = patch_tensors(patcher.patches[key])
                self._slot_patches.setdefault(unit, []).append((key, patcher.patches[key], len(tensors), len(found)))
                tensors += found
        # Slots patched for another patch set (or another node) must be copied again.
        engine.set_slot_transform(self._apply_patches if slot_keys else None,
                                  tag=(id(self), patcher.patches_uuid) if slot_keys else None, extras=extras)

    def _clear_attached(self) -> None:
        """Take back the GGUF patches we attached (ComfyUI-GGUF's unpatch cannot see hidden blocks)."""
        for key in self._attached:
            self._param(key).patches = []
        self._attached = []

    def _apply_patches(self, unit_name: str) -> None:
        """Patch a block just copied into its slot, from the patch tensors copied with it, computed
        as ComfyUI patches resident weights."""
        entries = self._slot_patches.get(unit_name)
        patcher, engine = self._patcher(), self.engine()
        if not entries or patcher is None or engine is None:
            return
        from .engine.slot_patches import with_tensors

        on_device = engine.slot_extras(unit_name)
        for key, patches, start, count in entries:
            patches = with_tensors(patches, iter(on_device[start:start + count]))
            patched = patched_weight(patcher, key, patches, patcher.load_device)
            # The parameter is bound to the slot right now. copy_, not .data.copy_: a quantized weight
            # (QuantizedTensor) then takes the requantized data *and* its new scale, both in the slot.
            with torch.no_grad():
                self._param(key).copy_(patched)

    def account(self, patcher, engine: BlockSwapEngine) -> None:
        """ComfyUI's figure of what is loaded = bytes really on the load device + the ring."""
        m = patcher.model
        dev = patcher.load_device
        on_device = sum(tensor_bytes(t) for t in itertools.chain(m.parameters(), m.buffers())
                        if t.device == dev)
        m.model_loaded_weight_memory = on_device + engine.device_bytes

    def _patcher(self):
        """The patcher that ran (or was prepared) last, if it still exists."""
        return self._patcher_ref() if self._patcher_ref else None

    @staticmethod
    def _adjust_loaded(patcher, delta: int) -> None:
        m = patcher.model
        m.model_loaded_weight_memory = max(0, getattr(m, "model_loaded_weight_memory", 0) + delta)

    def _ring_changed(self, delta: int) -> None:
        """Another model of the pipeline took the shared slots: ComfyUI's figure drops with them."""
        patcher = self._patcher()
        if patcher is not None:
            self._adjust_loaded(patcher, delta)

    def on_pre_run(self, patcher) -> None:
        if self._installed(patcher) != set(self.plan.units):
            # a clone made before the plan changed (more blocks after an out-of-memory error): ComfyUI
            # loaded it with the old stand-ins; load it again with the plan in force
            self._reload(patcher)
        self.prepare(patcher).reset_counters()
        if patcher.load_device.type == "cuda":  # the run summary's peak is this run's
            torch.cuda.reset_peak_memory_stats(patcher.load_device)

    def ready_engine(self) -> BlockSwapEngine:
        """The engine, prepared lazily when a forward comes without an ON_PRE_RUN before it
        (samplers that skip ``pre_run``) or after a detach released the ring."""
        engine = self.engine()
        if engine is None or not engine.is_setup or (engine.device_bytes == 0 and engine.plan.slots):
            patcher = self._patcher()
            if patcher is None:
                raise RuntimeError("block swap: no model patcher to prepare the engine with")
            engine = self.prepare(patcher)
        return engine

    def diffusion_model_wrapper(self, executor, *args, **kwargs):
        def forward():
            engine = self.ready_engine()
            if self.memory is not None:
                self.memory.reset_peak()
            engine.begin_forward()
            try:
                return executor(*args, **kwargs)
            finally:
                engine.end_forward()

        out = run_with_recovery(forward, self._stream_more, enabled=self.on_oom == RETRY)
        if self.adaptive is not None:  # between forwards: the count the measured peak asks for
            change = self.adaptive.after_forward(self.memory.peak())
            if change is not None:
                self._change_blocks(change.new, change.reason)
        if self.debug and args and isinstance(args[0], torch.Tensor):
            # metadata only (no device sync): a streamed block must not change dtype or device
            validate_tensor_consistency(args[0], out, "diffusion model output", attrs=("dtype", "device"))
        return out

    # ------------------------------------------------------------------ out of memory, adaptive
    def _stream_more(self, failure: OOMFailure) -> bool:
        """After an out-of-memory error in a forward: stream as many more units as the failure asks for
        (recovery.blocks_needed); False when everything already streams."""
        settings, layout = self.plan.settings, self.plan.layout
        now, every = streamable(settings, layout)
        block = max((packed_bytes(unwrap(self._model_ref().get_submodule(f"blocks.{i}")))
                     for i in self.plan.resident_blocks), default=0) or max(
                         (packed_bytes(t) for t in self.targets.values()), default=0)
        more = blocks_needed(failure, block, now, every)
        if more == 0:
            return False
        if self.oom_at is None:
            self.oom_at = len(self.plan.block_indices)
        grown = grow_settings(settings, layout, more)
        if self.adaptive is not None:
            self.adaptive.after_oom(grown.blocks_to_swap - settings.blocks_to_swap)
        self._replan(grown, f"out of memory with {len(self.plan.block_indices)} blocks streamed ({failure.describe()})")
        return True

    def _change_blocks(self, count: int, reason: str) -> None:
        self._replan(replace(self.plan.settings, blocks_to_swap=count), reason)

    def _replan(self, settings, reason: str) -> None:
        """Stream what ``settings`` says from the next forward on: ComfyUI loads the model again with the
        new stand-ins (its own unpatch and patch: LoRA, accounting and partial loading stay its own), the
        engine keeps the masters both plans share, and the node says what changed and why."""
        patcher = self._patcher()
        if patcher is None:
            raise RuntimeError("block swap: no model patcher to change the plan of")
        old = self.plan
        plan = plan_swap(old.layout, settings)
        self.changes.append(Change(self._forwards(), len(old.block_indices), len(plan.block_indices), reason))
        t0 = time.perf_counter()
        self._set_plan(plan)
        node = self._node_patcher() if self._node_patcher is not None else None
        if node is not None and node is not patcher:  # later clones of the node's model copy these
            self._install_units(node)
        self._reload(patcher)
        self.prepare(patcher)
        log.warning("block swap: %d -> %d blocks streamed%s (%s); reloaded in %.2f s. The count stays with this "
                    "model for later runs.", len(old.block_indices), len(plan.block_indices),
                    f" + {len(plan.vace_indices)} VACE" if plan.vace_indices else "", reason, time.perf_counter() - t0)

    def _reload(self, patcher) -> None:
        """ComfyUI's own unload and load of ``patcher`` (weights restored, LoRA patched again, accounting
        set), with its stand-ins made to match the plan in force in between."""
        lowvram = bool(getattr(patcher.model, "model_lowvram", False))
        budget = int(getattr(patcher.model, "model_loaded_weight_memory", 0)) if lowvram else 0
        patcher.unpatch_model(device_to=patcher.offload_device, unpatch_weights=True)
        self._install_units(patcher)
        patcher.patch_model(device_to=patcher.load_device, lowvram_model_memory=budget, load_weights=True)

    def _forwards(self) -> int:
        engine = self.engine()
        return engine.tracker.forwards if engine is not None else 0

    def run_unit(self, name: str, target: nn.Module, args, kwargs):
        engine = self.ready_engine()
        index = self._index[name]
        engine.before_unit(index)
        try:
            return target(*args, **kwargs)
        finally:
            engine.after_unit(index)

    def on_cleanup(self, patcher) -> None:
        """After every sampler call (a looper makes 2-3 a loop): evict anything still bound to a slot
        (an interrupted run), read the finished timing events, report the run. Masters, patch routing
        and the ring stay: the next call needs them."""
        engine = self.engine()
        if engine is None or not engine.is_setup:
            return
        engine.end_run()
        figures = run_figures(engine, patcher.load_device)
        log.info("%s", format_run_text(figures))
        if self.debug:
            t = engine.tracker
            log.info("block swap run detail: %s\n%s", t.format_summary(), t.format_units())
            self._write_trace(engine, patcher)
        # the front end replaces a node's text with each message: the plan goes with every run's figures
        send_node_text(self.node_id, node_text(self.readout_plan, figures, self.readout_notes))

    def _write_trace(self, engine: BlockSwapEngine, patcher) -> None:
        """The debug trace file; a trace that cannot be written is a warning, never a failed run."""
        try:
            path = write_trace(run_trace(self, engine, patcher, __version__), trace_directory(), self.node_id)
        except Exception as err:  # noqa: BLE001 - disk full, read-only dir, odd values...
            log.warning("block swap: could not write the debug trace (%s: %s); the run is not affected",
                        type(err).__name__, err)
            return
        log.info("block swap: debug trace written to %s", path)

    def on_detach(self, patcher, unpatch_all=True) -> None:
        """Release the device ring. Runs on clone switches, unloads and from ``__del__`` (maybe twice,
        maybe at interpreter exit), so it must never raise."""
        try:
            self._clear_attached()
            engine = self.engine()
            if engine is None or engine.device_bytes == 0:
                return
            held = engine.device_bytes
            engine.release_ring()  # deferred to the forward's end when one is running
            self._adjust_loaded(patcher, engine.device_bytes - held)
        except Exception:  # noqa: BLE001 - a detach must not fail; say what happened
            log.exception("block swap: releasing the device ring failed")


def patched_weight(patcher, key: str, patches, device: torch.device) -> torch.Tensor:
    """``key``'s weight with ``patches`` applied on ``device``, stored as the weight is stored: the
    computation of ComfyUI's ``ModelPatcher.patch_weight_to_device(key, device, return_weight=True)``
    (its compute dtype, the layer's convert/set functions, its seeded stochastic rounding), reading
    the patches given instead of ``patcher.patches[key]``."""
    import comfy.float
    import comfy.lora
    import comfy.model_management as mm
    import comfy.utils
    from comfy.model_patcher import get_key_weight

    weight, set_func, convert_func = get_key_weight(patcher.model, key)
    temp = mm.cast_to_device(weight, device, mm.lora_compute_dtype(device), copy=True)
    if convert_func is not None:
        temp = convert_func(temp, inplace=True)
    out = comfy.lora.calculate_weight(patches, temp, key)
    seed = comfy.utils.string_to_seed(key)
    if set_func is None:
        return comfy.float.stochastic_rounding(out, weight.dtype, seed=seed)
    return set_func(out, inplace_update=False, seed=seed, return_weight=True)


def _counts(settings) -> dict:
    """The settings that say what streams (an engine keeps its other settings, e.g. its pin budget)."""
    return {k: getattr(settings, k) for k in ("blocks_to_swap", "vace_blocks_to_swap", "offload_txt_emb",
                                              "offload_img_emb", "prefetch_blocks", "placement")}


def reset_model_blockswap_state(patcher) -> None:
    """Remove this pack's stand-ins, callbacks and wrapper from ``patcher`` (a clone), so a model
    that went through a BlockSwap node before is prepared afresh, never twice."""
    from comfy.patcher_extension import CallbacksMP, WrappersMP

    for name in [k for k, v in patcher.object_patches.items() if isinstance(v, StreamedUnit)]:
        del patcher.object_patches[name]
    for cb_type in (CallbacksMP.ON_PRE_RUN, CallbacksMP.ON_CLEANUP, CallbacksMP.ON_DETACH):
        patcher.remove_callbacks_with_key(cb_type, KEY)
    patcher.remove_wrappers_with_key(WrappersMP.DIFFUSION_MODEL, KEY)


def is_gguf_quantized(param) -> bool:
    """A ComfyUI-GGUF tensor holding quantized bytes (its F32/F16 tensors behave as plain ones)."""
    qtype = getattr(param, "tensor_type", None)
    return qtype is not None and getattr(qtype, "name", str(qtype)) not in ("F32", "F16")


def send_node_text(node_id: Optional[str], text: str) -> None:
    """Show ``text`` on the node in the ComfyUI front end, where a server runs, in lines that fit the
    node (:func:`readout.fit`); the log has the long form."""
    from .readout import fit

    if not node_id:
        return
    text = fit(text)
    try:
        from server import PromptServer
    except ImportError:
        return
    send = getattr(getattr(PromptServer, "instance", None), "send_progress_text", None)
    if send is None:  # headless runners without a front end
        return
    try:
        send(text, node_id)
    except Exception:  # noqa: BLE001 - a readout must never break a run
        log.debug("block swap: could not send node text", exc_info=True)


PASS_THROUGH, TAKE_OVER = "pass through", "block swap"
DYNAMIC_VRAM_CHOICES = (PASS_THROUGH, TAKE_OVER)


def is_dynamic(patcher) -> bool:
    """A ComfyUI Dynamic VRAM patcher (``ModelPatcherDynamic``): ComfyUI streams its weights itself."""
    return bool(getattr(patcher, "is_dynamic", lambda: False)())


def classic_copy(patcher):
    """``(classic patcher, note)`` for a Dynamic VRAM one, made the way core's own nodes make one
    (TorchCompileModel, hooks): ``clone(disable_dynamic=True)`` re-runs the loader that built the
    model (``cached_patcher_init``) without Dynamic VRAM, so it has fresh modules, none of the
    per-module state (``_v``, pins, lowvram functions) an earlier dynamic load left, and ComfyUI's
    classic accounting, which block swap keeps true. The copy holds every weight in host RAM: that is
    checked first. Without ``cached_patcher_init`` (a loader that does not say how to reload) the
    model is returned unchanged with the reason."""
    if getattr(patcher, "cached_patcher_init", None) is None:
        text = ("Dynamic VRAM is on and this model's loader does not say how to reload it without Dynamic "
                "VRAM (no cached_patcher_init), so block swap leaves it unchanged. Load it with Load "
                "Diffusion Model or the pack's loaders, or start ComfyUI with --disable-dynamic-vram.")
        log.warning("block swap: %s", text)
        return patcher, text
    need, available = full_model_size(patcher), host_available_bytes()
    if need > available:
        raise BlockSwapError(
            f"not enough host RAM for dynamic_vram = block swap: a classic copy of this model needs "
            f"{format_bytes(need)} of RAM, but only {format_bytes(available)} is available. Set dynamic_vram "
            "to pass through, use an fp8 or GGUF model, or close other programs.")
    classic = patcher.clone(disable_dynamic=True)
    text = (f"Dynamic VRAM is on: block swap runs on a classic copy of this model, reloaded from its file "
            f"({format_bytes(need)} in host RAM).")
    log.info("block swap: %s", text)
    return classic, text


def plan_for(diffusion_model, settings):
    """``(layout, clamped settings, plan)`` for ``diffusion_model``: what :func:`apply_block_swap`
    streams, also asked by the BlockSwap loader before it reads the file."""
    from .config import detect_layout

    layout = detect_layout(diffusion_model)
    settings = clamp_settings(settings, layout)
    return layout, settings, plan_swap(layout, settings)


def apply_block_swap(patcher, settings, *, debug: bool = False, node_id: Optional[str] = None,
                     ring: Optional[SharedRing] = None, pack_masters: bool = False, others: Sequence = (),
                     dynamic_vram: str = PASS_THROUGH, host_memory: str = "auto", spill_folder: str = "",
                     masters_why: Optional[str] = None, on_oom: str = RETRY, memory=None):
    """The node's work: return a clone of ``patcher`` whose chosen units stream. Returns
    ``(model, text)`` with a description of what was done for the node's readout (the plan in short
    lines, then a line per pre-flight warning; the log gets the long form). ``pack_masters``: copy the
    streamed units into their host masters now, not at the first run. ``others``: block-swap clones the same node prepared before this one
    (the looper nodes): nothing of theirs is packed yet, so the host RAM check covers them too.
    ``dynamic_vram``: what to do with a Dynamic VRAM patcher (:data:`DYNAMIC_VRAM_CHOICES`; see
    :func:`classic_copy`). ``host_memory``: where the host masters live, "RAM", "file" or "auto" (RAM when
    the copies of this model and ``others`` fit with headroom, else file); ``masters_why``: the reason
    for a mode a multi-model node already chose with :func:`host_memory_for` (shown on the node).
    ``spill_folder``: where a model kept on file writes the bytes that are no file's ("": ComfyUI's
    temp folder). ``on_oom``: :data:`recovery.OOM_CHOICES` (stream more and run the forward again after
    a device out-of-memory error, or fail). ``memory``: a device-memory reporter (``budget()``,
    ``reset_peak()``, ``peak()``: :class:`DeviceMemory`) for ``vram_budget`` = adaptive: the block count
    then follows each forward's measured peak (recovery.AdaptiveCount).

    Raises :class:`BlockSwapError` before anything is changed (no clone, no engine) when the
    model cannot be swapped or the host RAM cannot hold the host copies (see :func:`preflight`)."""
    if dynamic_vram not in DYNAMIC_VRAM_CHOICES:
        raise BlockSwapError(f"dynamic_vram must be one of {', '.join(DYNAMIC_VRAM_CHOICES)}, got {dynamic_vram!r}")
    if on_oom not in OOM_CHOICES:
        raise BlockSwapError(f"on_oom must be one of {', '.join(OOM_CHOICES)}, got {on_oom!r}")
    dynamic_note = None
    if is_dynamic(patcher):
        if dynamic_vram == PASS_THROUGH:
            text = ("Dynamic VRAM is on: ComfyUI streams this model's weights itself, so block swap leaves "
                    "it unchanged. Set dynamic_vram to 'block swap' to stream it with this node, or start "
                    "ComfyUI with --disable-dynamic-vram.")
            log.warning("block swap: %s", text)
            return patcher, text
        patcher, dynamic_note = classic_copy(patcher)
        if is_dynamic(patcher):  # no way to make a classic copy: passed through, with the reason
            return patcher, dynamic_note
    diffusion_model = patcher.get_model_object("diffusion_model")
    layout, settings, plan = plan_for(diffusion_model, settings)
    targets = {name: unwrap(diffusion_model.get_submodule(name)) for name in plan.units}
    for name, target in targets.items():  # refuse what cannot stream now, not in the middle of a run
        for p in target.parameters():
            check_streamable(p, name)
    mode, why = host_memory, masters_why or "chosen"
    if host_memory == "auto":
        mode, why = host_memory_mode(host_memory, modules_with_others(diffusion_model, targets, others)[0])
    settings = replace(settings, host_memory=mode, spill_dir=spill_folder or default_spill_folder())
    plan = replace(plan, settings=settings)
    notes = preflight(patcher, diffusion_model, layout, settings, plan, targets, _ENGINES, others)
    if dynamic_note:
        notes.insert(0, dynamic_note)
    for note in notes:
        log.warning("block swap: %s", note)
    clone = patcher.clone()
    reset_model_blockswap_state(clone)
    clone.size = full_model_size(clone)
    if not plan.units and memory is None and on_oom != RETRY:
        text = f"Block swap off: all {layout.num_blocks} blocks resident."
        log.info("block swap: %s", text)
        return clone, "\n".join([text, *notes])
    # with nothing streamed yet the controller still watches: an out-of-memory error streams blocks then
    controller = SwapController(diffusion_model, plan, debug=debug, node_id=node_id, ring=ring, on_oom=on_oom,
                                memory=memory)
    if memory is not None:
        block = max((packed_bytes(t) for t in targets.values()), default=0)
        controller.adaptive = AdaptiveCount(memory.budget(), memory.margin(), block, settings.blocks_to_swap,
                                            layout.num_blocks)
    controller.install(clone)
    controller.async_copies = settings.use_non_blocking and patcher.load_device.type == "cuda"
    controller.masters = f"{mode} ({why})"
    if not plan.units:
        controller.readout_notes = list(notes)
        text = f"Block swap off: all {layout.num_blocks} blocks resident; an out-of-memory error streams some."
        log.info("block swap: %s", text)
        return clone, "\n".join([*controller.readout_plan, *notes])
    text = (f"Block swap: {len(plan.block_indices)} of {layout.num_blocks} blocks streamed "
            f"({', '.join(map(str, plan.block_indices)) or 'none'})"
            + (f", {len(plan.vace_indices)} of {layout.num_vace_blocks} VACE blocks" if layout.num_vace_blocks else "")
            + f"; ring {plan.slots} x {format_bytes(controller.ring_bytes() // max(1, plan.slots))}"
            + ("; pinned async copies" if settings.use_non_blocking and patcher.load_device.type == "cuda"
               else "; synchronous copies"))
    log.info("%s", text)
    log.info("block swap: host masters in %s (%s)%s", mode, why,
             f"; spill folder {settings.spill_dir}" if mode == "file" else "")
    controller.readout_notes = list(notes)
    if pack_masters or mode == "file":
        # On file: the streamed blocks' copies in RAM (another loader's) are released now, not at the
        # first run, so the next node (the other expert's loader) has that RAM.
        controller.pack_masters(clone)
    return clone, "\n".join([*controller.readout_plan, *controller.readout_notes])


class DeviceMemory:
    """What adaptive mode reads of the CUDA device: the memory this model may use (its ceiling: what was
    allocated when the node ran plus the budget the planner used), and the peak of each forward. Tests
    hand the controller a stand-in with the same methods."""

    def __init__(self, device, budget: int):
        self.device = torch.device(device)
        self._ceiling = torch.cuda.memory_allocated(self.device) + int(budget)
        self._margin = max(512 << 20, int(0.1 * budget))

    def budget(self) -> int:
        return self._ceiling

    def margin(self) -> int:
        return self._margin

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)


def default_spill_folder() -> str:
    """ComfyUI's temp folder (emptied at every start), the OS's outside ComfyUI."""
    import os
    import tempfile

    try:
        import folder_paths  # ComfyUI's module
        return os.path.join(folder_paths.get_temp_directory(), "wan22_blockswap")
    except (ImportError, AttributeError):  # outside ComfyUI, or a folder_paths without that function
        return tempfile.gettempdir()


def host_memory_for(patchers: Sequence, settings, choice: str):
    """``(mode, why)`` for the models a multi-model node prepares together (both WAN 2.2 experts, a
    sequence's segments): "auto" counts the host copies of all of them at once, so they all get the
    same kind of master. Other choices are returned as they are."""
    if choice != "auto":
        return choice, "chosen"
    modules, seen = [], set()
    for p in patchers:
        if p is None or id(p) in seen:
            continue
        seen.add(id(p))
        dm = p.get_model_object("diffusion_model")
        plan = plan_for(dm, settings)[2]
        modules += [unwrap(dm.get_submodule(n)) for n in plan.units]
    return host_memory_mode(choice, modules)


def clamp_settings(settings, layout):
    """Counts above what the model has are clamped (with a log line), so one workflow serves
    30-block and 40-block models."""
    from dataclasses import replace

    changes = {}
    if settings.blocks_to_swap > layout.num_blocks:
        log.info("block swap: blocks_to_swap=%d clamped to this model's %d blocks",
                 settings.blocks_to_swap, layout.num_blocks)
        changes["blocks_to_swap"] = layout.num_blocks
    if settings.vace_blocks_to_swap > layout.num_vace_blocks:
        log.info("block swap: vace_blocks_to_swap=%d clamped to this model's %d VACE blocks",
                 settings.vace_blocks_to_swap, layout.num_vace_blocks)
        changes["vace_blocks_to_swap"] = layout.num_vace_blocks
    return replace(settings, **changes) if changes else settings


def pin_budget_left(exclude: Iterable[int] = ()) -> Optional[int]:
    """Bytes that may still be pinned under ComfyUI's cap, given this pack's live engines (see
    :func:`preflight.pin_budget_left`); ``exclude``: ids of models whose engines are not counted."""
    return _pin_budget_left(_ENGINES, exclude)

