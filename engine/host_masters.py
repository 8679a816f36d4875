"""Host masters: each streamed unit's weights packed once into one flat host buffer, page-locked where
copies go to a CUDA device, and the unit's parameters bound to views of it between uses.

Pure torch. A *unit* is a module whose parameters stream together (a block, a VACE block, an
embedding). Its parameters' bytes (for a wrapper subclass such as ComfyUI's QuantizedTensor: its
inner tensors) are laid out one after another at :data:`ALIGN` steps; the same layout is used in the
device slots, so bringing a unit in is one contiguous copy. A loader may read a unit straight into a
buffer of this layout (:func:`host_arena`), which is then adopted as the master without a copy.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ..config import BlockSwapError, leaf_tensors, tensor_bytes
from .file_masters import Read, SliceFinder, SpillFile, merge_reads
from .swap_tracker import BlockSwapTracker
from ..utils import format_bytes, get_logger, host_available_bytes

log = get_logger("engine")

ALIGN = 256  # bytes; keeps every view aligned for any dtype and for vectorised kernels
PAGE = 4096  # host page: pinned masters start and end on page boundaries


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


def _page_span(master: torch.Tensor) -> int:
    """Host bytes a buffer occupies: whole pages when it starts a page-aligned buffer that spans them
    (:func:`host_arena`, what pinned masters and loader arenas are), its own bytes otherwise."""
    n = master.numel()
    storage = master.untyped_storage()
    rounded = (n + PAGE - 1) // PAGE * PAGE
    aligned = master.data_ptr() % PAGE == 0
    if aligned and storage.data_ptr() + storage.nbytes() >= master.data_ptr() + rounded:
        return rounded
    return n


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
    """A module whose parameters stream together, and where its bytes are."""

    def __init__(self, index: int, name: str, module: nn.Module):
        self.index = index
        self.name = name
        self.module = module
        self.entries: List[_Entry] = []
        self.nbytes = 0
        self.arena: Optional[torch.Tensor] = None  # a loader's buffer to adopt as the master (see collect)
        self.master: Optional[torch.Tensor] = None
        # Kept on file instead (file_masters): where each part's bytes are read from; the host views
        # are then views of the files' mappings.
        self.reads: Optional[Tuple[Read, ...]] = None
        self.spilled = 0  # bytes of it written to a spill file
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

    @property
    def packed(self) -> bool:
        """Its bytes have a host master: a buffer in RAM or a file."""
        return self.master is not None or self.reads is not None


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


def part_views(buf: torch.Tensor, e: _Entry) -> List[torch.Tensor]:
    return [buf[p.offset:p.offset + p.nbytes].view(p.dtype).view(p.size) for p in e.parts]


def bindings(buf: torch.Tensor, u: _Unit) -> List[torch.Tensor]:
    """What each parameter of ``u`` is bound to while its bytes are those in ``buf`` (the host master
    or a slot): a view for a plain parameter, a wrapper rebuilt around views otherwise. Callers cache
    them per buffer, so binding allocates nothing per step."""
    out = []
    for e in u.entries:
        views = part_views(buf, e)
        out.append(views[0] if e.wrapper is None else _rebuild(e, views))
    return out


def bind(u: _Unit, binds: List[torch.Tensor]) -> None:
    """Point ``u``'s parameters at ``binds`` (from :func:`bindings`)."""
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


class PinnedMemory:
    """Page-locked host buffers at their exact size, within a budget, through the engine's runtime;
    unpinned again even when the engine is dropped without a teardown (a model garbage-collected in
    ComfyUI): registered memory must be unregistered before it is freed."""

    def __init__(self, runtime, budget: Optional[int], tracker: BlockSwapTracker):
        self.runtime, self.budget, self.tracker = runtime, budget, tracker
        self.ptrs: Dict[int, int] = {}  # data_ptr -> registered bytes
        self._finalizer = weakref.finalize(self, _unregister_all, self.ptrs, runtime)

    @property
    def total(self) -> int:
        return sum(self.ptrs.values())

    def holds(self, buf: torch.Tensor) -> bool:
        return buf.data_ptr() in self.ptrs

    def pin(self, buf: torch.Tensor) -> bool:
        """Page-lock ``buf`` at its exact size (the caching host allocator would round it up to a
        power of two). False, with the reason logged once, where pinning failed or the budget is
        spent."""
        if self.budget is not None and self.total + buf.numel() > self.budget:
            self._pageable(f"pin budget of {format_bytes(self.budget)} reached")
            return False
        rc = self.runtime.host_register(buf.data_ptr(), buf.numel())
        if rc != 0:
            self.runtime.clear_error()
            self._pageable(f"cudaHostRegister failed with CUDA error {rc}")
            return False
        self.ptrs[buf.data_ptr()] = buf.numel()
        self.tracker.pinned_bytes = self.total
        return True

    def unpin(self, buf: torch.Tensor) -> None:
        size = self.ptrs.pop(buf.data_ptr(), None)
        if size is not None:
            _unregister(self.runtime, buf.data_ptr(), size)
            self.tracker.pinned_bytes = self.total

    def buffer(self, nbytes: int) -> torch.Tensor:
        """A host buffer of ``nbytes`` that starts on a page boundary and spans whole pages, so two
        registrations never share a page (small allocations come from the heap and would), pinned
        where the budget allows."""
        buf = host_arena(nbytes)
        self.pin(buf)
        return buf[:nbytes]

    def _pageable(self, reason: str) -> None:
        if not self.tracker.pageable_reason:
            self.tracker.pageable_reason = reason
            log.warning("block swap: using pageable host memory for some blocks (%s); copies will "
                        "be slower and synchronous", reason)


def _unregister(rt, ptr: int, size: int) -> None:
    """Unpin one buffer; a failure is logged and its sticky CUDA error cleared here, not left to
    surface in unrelated code later."""
    rc = rt.host_unregister(ptr)
    if rc != 0:
        rt.clear_error()
        log.warning("block swap: cudaHostUnregister of a %s host copy failed with CUDA error %d; the "
                    "memory is released anyway", format_bytes(size), rc)


def _unregister_all(pinned: Dict[int, int], rt) -> None:
    """Finalizer: unpin whatever is still registered when its owner is garbage-collected."""
    for ptr, size in list(pinned.items()):
        _unregister(rt, ptr, size)
    pinned.clear()


class HostMasters:
    """Packs, adopts, checks and restores the host masters of a list of units.

    ``pinned``: a :class:`PinnedMemory` where copies go to a CUDA device (masters then page-locked),
    None for the synchronous path. ``host_available``: a figure tests inject; None asks the OS.
    ``spill_dir``: not None keeps the masters on file instead of in RAM (:mod:`file_masters`): each
    part is read from the file its bytes are a slice of, or from a spill file in that folder.
    """

    def __init__(self, offload_device: torch.device, pinned: Optional[PinnedMemory],
                 tracker: BlockSwapTracker, host_available: Optional[int] = None,
                 spill_dir: Optional[str] = None):
        self.offload_device = offload_device
        self.pinned = pinned
        self.tracker = tracker
        self.host_available = host_available
        self.on_file = spill_dir is not None
        self.spill = SpillFile(spill_dir) if self.on_file else None

    # ------------------------------------------------------------------ packing
    def collect(self, u: _Unit, finder: Optional[SliceFinder] = None) -> None:
        """Record the unit's parameters and check they can be packed. Touches nothing. With ``finder``
        (masters on file) the parts are laid out in the order their bytes have in their files, so
        tensors stored back to back are one read (:func:`file_masters.merge_reads`)."""
        entries: List[_Entry] = []
        offset = 0
        for p, owners in unit_params(u):
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
        u.arena = self._arena_of(entries) if entries and not self.on_file else None
        if u.arena is not None:  # adopt the loader's arena: the tensors keep their places in it
            lo = u.arena.data_ptr()
            for e in entries:
                for part, (_, t) in zip(e.parts, leaf_tensors(e.param)):
                    part.offset = t.data_ptr() - lo
            offset = max(p.offset + p.nbytes for e in entries for p in e.parts)
        if finder is not None:
            offset = _file_order(entries, finder)
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

    def check_ram(self, units: Sequence[_Unit]) -> None:
        off = self.offload_device
        if off.type != "cpu" or self.on_file:  # on file: the staging ring is all the RAM it takes
            return
        moved = sum(u.nbytes for u in units if u.entries and u.entries[0].device != off)
        in_place = max((u.nbytes for u in units if u.entries and u.entries[0].device == off),
                       default=0)
        # Units already on the host are repacked one at a time (the old storage is freed as each
        # unit is rebound), so they need one unit of headroom; units on the device need it all.
        need = moved + in_place
        avail = host_available_bytes() if self.host_available is None else self.host_available
        if need > avail:
            raise BlockSwapError(
                f"not enough host RAM for block swap: the host copies of {len(units)} streamed "
                f"units need {format_bytes(need)} but only {format_bytes(avail)} is available. "
                "Swap fewer blocks, close other programs, or use a smaller (fp8/GGUF) model.")

    def pack_all(self, units: Sequence[_Unit]) -> None:
        """Check, then pack every unit; if one fails, the ones packed so far are restored."""
        finder = SliceFinder() if self.on_file else None
        for u in units:
            self.collect(u, finder)
        self.check_ram(units)
        self._check_spill(units, finder)
        try:
            for u in units:
                self.pack(u, finder)
        except BaseException:
            self.restore(units, None)
            raise

    def _check_spill(self, units: Sequence[_Unit], finder: Optional[SliceFinder]) -> None:
        """On file: room in the spill folder for the parts that are no file's (checked before anything
        is written)."""
        if finder is None:
            return
        need = sum(part.nbytes for u in units for e in u.entries
                   for part, leaf in zip(e.parts, _leaves(e)) if finder.find(leaf) is None)
        if need:
            self.spill.check_space(need, len(units))

    def repack(self, units: Sequence[_Unit], before) -> None:
        """Pack again units whose parameters something else moved or replaced: checked first, then
        ``before()`` (the engine drops what its slots hold), then packed; their old buffers may still
        be referenced elsewhere, so those are only unpinned."""
        finder = SliceFinder() if self.on_file else None
        for u in units:
            self.collect(u, finder)
        self.check_ram(units)
        self._check_spill(units, finder)
        before()
        for u in units:
            self.unpin_master(u)
            u.reads = None
            self.pack(u, finder)

    def pack(self, u: _Unit, finder: Optional[SliceFinder] = None) -> None:
        if self.on_file:
            self._pack_on_file(u, finder or SliceFinder())
            return
        if u.arena is not None:  # the loader already read the unit into a master-shaped buffer
            if self.pinned is not None:
                self.pinned.pin(u.arena)
            master, u.arena = u.arena[:u.nbytes], None
            binds = bindings(master, u)
            bind(u, binds)  # the same memory, now viewed through the master
            self._attach(u, master, binds)
            return
        # Filled before it is attached to the unit: if a copy fails, the unit keeps its old
        # storage and nothing is restored from a half-filled buffer.
        master = self._buffer(u.nbytes)
        try:
            for e in u.entries:
                for v, src in zip(part_views(master, e), _leaves(e)):
                    v.copy_(src)
        except BaseException:
            self.unpin(master)
            raise
        for e in u.entries:
            if e.device.type != "cpu" and self.offload_device.type == "cpu":
                self.tracker.setup_d2h_bytes += e.nbytes
        binds = bindings(master, u)
        bind(u, binds)
        self._attach(u, master, binds)

    def _pack_on_file(self, u: _Unit, finder: SliceFinder) -> None:
        """Keep ``u`` on file: each part is read from the file its bytes already are a slice of, the
        others are written to the spill file once (one region per unit, laid out as the slot is, so a
        wholly spilled unit is one read). The parameters are then bound to views of the mappings: no
        copy of the unit stays in RAM."""
        reads: List[Read] = []
        views: List[List[Optional[torch.Tensor]]] = []
        spilled: List[Tuple[int, int, torch.Tensor, _Part]] = []
        for i, e in enumerate(u.entries):
            views.append([])
            for j, (part, leaf) in enumerate(zip(e.parts, _leaves(e))):
                found = finder.find(leaf)
                if found is None:
                    spilled.append((i, j, leaf, part))
                    views[i].append(None)
                else:
                    reads.append(Read(found.source, found.offset, part.nbytes, part.offset))
                    views[i].append(leaf.detach().view(part.dtype).view(part.size))
        if spilled:
            # the spilled parts keep their slot offsets (relative to the first of them)
            base = min(part.offset for _, _, _, part in spilled)
            size = max(part.offset + part.nbytes for _, _, _, part in spilled) - base
            start, region = self.spill.write([leaf.contiguous() for _, _, leaf, _ in spilled],
                                             [part.offset - base for _, _, _, part in spilled], size)
            handle = self.spill.handle
            for i, j, _, part in spilled:
                o = part.offset - base
                views[i][j] = region[o:o + part.nbytes].view(part.dtype).view(part.size)
                reads.append(Read(handle, start + o, part.nbytes, part.offset))
            u.spilled = sum(part.nbytes for _, _, _, part in spilled)
            self.tracker.spill_bytes += u.spilled
        binds = [v[0] if e.wrapper is None else _rebuild(e, v) for e, v in zip(u.entries, views)]
        bind(u, binds)
        u.reads = merge_reads(reads)
        u.master, u.host_views, u.pinned = None, binds, False

    def _attach(self, u: _Unit, master: torch.Tensor, binds: List[torch.Tensor]) -> None:
        u.master, u.host_views = master, binds
        u.pinned = self.pinned is not None and self.pinned.holds(master)

    def _buffer(self, nbytes: int) -> torch.Tensor:
        if self.pinned is None or self.offload_device.type != "cpu" or nbytes == 0:
            return torch.empty(nbytes, dtype=torch.uint8, device=self.offload_device)
        return self.pinned.buffer(nbytes)

    def unpin(self, buf: torch.Tensor) -> None:
        if self.pinned is not None:
            self.pinned.unpin(buf)

    def unpin_master(self, u: _Unit) -> None:
        if u.pinned:
            self.unpin(u.master)
            u.pinned = False

    # ------------------------------------------------------------------ extras (slot transform inputs)
    def pack_extras(self, units: Sequence[_Unit], extras: Mapping[str, Sequence[torch.Tensor]]) -> None:
        for u in units:
            self.drop_extras(u)
            tensors = list(extras.get(u.name, ()))
            if not tensors:
                continue
            parts, offset = [], 0
            for t in tensors:
                parts.append((offset, tensor_bytes(t), t.dtype, tuple(t.shape)))
                offset += _align(parts[-1][1])
            buf = self._buffer(offset)
            for (o, n, dt, size), t in zip(parts, tensors):
                buf[o:o + n].view(dt).view(size).copy_(t)
            u.extras, u.extras_parts = buf, parts
            u.extras_pinned = self.pinned is not None and self.pinned.holds(buf)

    def drop_extras(self, u: _Unit) -> None:
        if u.extras is not None and u.extras_pinned:
            self.unpin(u.extras)
        u.extras, u.extras_parts, u.extras_pinned, u.extras_views = None, [], False, {}

    # ------------------------------------------------------------------ state
    def intact(self, u: _Unit) -> bool:
        """True when the unit's parameters still point at its host master. Parameter objects may
        have been replaced by equivalent ones viewing the same memory (ComfyUI restores backups
        that way); the entries then follow the new objects."""
        params = unit_params(u)
        if not u.packed or len(params) != len(u.entries):
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

    @staticmethod
    def host_bytes(units: Sequence[_Unit]) -> int:
        """Bytes the masters and extras take: whole pages where they are laid out to be page-locked,
        so that with all of them pinned, host_bytes == pinned_bytes (registrations cover whole pages)."""
        return sum(_page_span(b) for u in units for b in (u.master, u.extras) if b is not None)

    def restore(self, units: Sequence[_Unit], device: Optional[torch.device], extras: bool = False) -> None:
        """Give every packed parameter its own storage again (on ``device``, or where it was) and
        release the masters (and, with ``extras``, the units' extras)."""
        for u in units:
            if extras:
                self.drop_extras(u)
            if u.reads is not None:
                self._restore_on_file(u, device)
                continue
            if u.master is None:
                continue
            own = []
            for e in u.entries:
                dev = device or e.device
                inner = []
                for part, v in zip(e.parts, part_views(u.master, e)):
                    if part.stride is not None:
                        out = torch.empty_strided(part.size, part.stride, dtype=part.dtype, device=dev)
                    else:
                        out = torch.empty(part.size, dtype=part.dtype, device=dev)
                    out.copy_(v)
                    inner.append(out)
                own.append(inner[0] if e.wrapper is None else _rebuild(e, inner))
            bind(u, own)
            self.unpin_master(u)
            u.master, u.host_views, u.bound = None, [], False

    def _restore_on_file(self, u: _Unit, device: Optional[torch.device]) -> None:
        """A unit kept on file keeps its mapped views (giving it RAM copies would undo the reason it
        is on file); only a device other than the host gets copies."""
        if device is not None and device.type != "cpu":
            own = []
            for e, v in zip(u.entries, u.host_views):
                inner = [t.to(device, copy=True) for _, t in leaf_tensors(v)] if e.wrapper is not None else [v.to(device, copy=True)]
                own.append(inner[0] if e.wrapper is None else _rebuild(e, inner))
            bind(u, own)
        self.tracker.spill_bytes -= u.spilled
        u.reads, u.spilled, u.host_views, u.bound = None, 0, [], False


def _file_order(entries: List[_Entry], finder: SliceFinder) -> int:
    """Lay the parts out in the order of their bytes in their files (by file, then offset; parts that
    are no file's last), each at the engine's alignment. Returns the unit's bytes."""
    keyed = []
    for e in entries:
        for part, leaf in zip(e.parts, _leaves(e)):
            found = finder.find(leaf)
            keyed.append(((0, id(found.source), found.offset) if found is not None else (1, 0, len(keyed)), part))
    offset = 0
    for _, part in sorted(keyed, key=lambda kp: kp[0]):
        part.offset = offset
        offset += _align(part.nbytes)
    return offset


def _leaves(e: _Entry) -> List[torch.Tensor]:
    """The plain tensors holding ``e``'s bytes now (a plain parameter's ``.data``: a GGUF tensor's raw
    bytes), one per part."""
    return [e.param.data] if e.wrapper is None else [t for _, t in leaf_tensors(e.param)]


def unit_params(u: _Unit) -> List[Tuple[torch.Tensor, List[Tuple[nn.Module, str]]]]:
    """Each distinct parameter of the unit with every (module, name) it is registered under."""
    found: Dict[int, Tuple[torch.Tensor, List[Tuple[nn.Module, str]]]] = {}
    for mod in u.module.modules():
        for name, p in mod._parameters.items():
            if p is not None:
                found.setdefault(id(p), (p, []))[1].append((mod, name))
    return list(found.values())

