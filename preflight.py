"""What a swap node checks and counts when it is applied, before it changes anything: the host RAM the
host copies need (every model the node prepares together), the pinned-memory budget ComfyUI leaves,
the VRAM the plan keeps on the card, and the model's full size behind any earlier node's stand-ins.

ComfyUI glue (ComfyUI is imported inside the functions that need it). The figures come from the
model, the verdicts and their wording from utils.
"""
from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from torch import nn

from .config import BlockSwapError, ModelLayout, SwapPlan, SwapSettings, leaf_tensors, plan_swap, tensor_bytes, unwrap
from .engine.file_masters import SliceFinder
from .engine.host_masters import packed_bytes
from .utils import (VRAM_LIMIT, choose_host_memory, device_total_memory, host_available_bytes, host_ram_message,
                    pin_budget_message, vram_message)


def _hidden(module: nn.Module) -> Optional[nn.Module]:
    """The real block behind a block-swap stand-in (it exposes it as ``swapped_module``), else None."""
    return getattr(module, "swapped_module", None)


def full_model_size(patcher) -> int:
    """Raw bytes of every parameter and buffer of the model, those behind stand-ins included, so a
    clone that went through a BlockSwap node before is not reduced twice. Counted from the tensors
    (not the state dict: ComfyUI-GGUF's holds placeholders for quantized weights)."""
    m = patcher.model
    visible = sum(tensor_bytes(t) for t in itertools.chain(m.parameters(), m.buffers()))
    hidden = sum(tensor_bytes(p) for mod in m.modules() if _hidden(mod) is not None
                 for p in _hidden(mod).parameters())
    return visible + hidden


def with_pin_budget(settings, engines: Mapping[nn.Module, object], model: Optional[nn.Module] = None):
    """Cap pinning at what ComfyUI still allows (it limits pinned RAM, e.g. about 40 % on Windows)
    unless the settings name a budget; beyond it masters stay pageable, with a log line. ``model``'s
    own engine is left out of what is already pinned (its masters are the ones being budgeted)."""
    if settings.pin_budget_bytes is not None:
        return settings
    left = pin_budget_left(engines, exclude=() if model is None else (id(model),))
    return settings if left is None else replace(settings, pin_budget_bytes=left)


def pin_budget_left(engines: Mapping[nn.Module, object], exclude: Iterable[int] = ()) -> Optional[int]:
    """Bytes that may still be pinned under ComfyUI's cap (``MAX_PINNED_MEMORY``; None: no cap):
    the cap less ComfyUI's own pins and less what the engines of other models pinned (our pins go
    through cudaHostRegister, not ComfyUI's registry, so its total does not include them).
    ``engines``: diffusion model -> its engine; ``exclude``: ids of models whose engines are not counted."""
    import comfy.model_management as mm

    cap = getattr(mm, "MAX_PINNED_MEMORY", -1)
    if cap is None or cap <= 0:
        return None
    skip = set(exclude)
    ours = sum(e.tracker.pinned_bytes for m, e in list(engines.items()) if id(m) not in skip)
    return max(0, int(cap - getattr(mm, "TOTAL_PINNED_MEMORY", 0) - ours))


def streamed_modules(patcher) -> List[nn.Module]:
    """The real blocks behind a block-swap clone's stand-ins (none for other patchers)."""
    return [_hidden(v) for v in patcher.object_patches.values() if _hidden(v) is not None]


def host_bytes_needed(modules: Iterable[nn.Module]) -> int:
    """Host RAM that packing the host masters of ``modules`` adds. The engine's own pack-time rule:
    a unit whose weights are already in host RAM is repacked in place, one unit at a time (its old
    storage is freed as it is rebound), so all such units together need one unit of headroom; a
    unit held elsewhere (on the GPU under --highvram / --gpu-only) needs all of its bytes. Masters
    that live engines already hold are in RAM, so they count only as that headroom."""
    moved = headroom = 0
    seen = set()
    for m in modules:
        if id(m) in seen:  # clones of one model stream the same modules
            continue
        seen.add(id(m))
        size = packed_bytes(m)
        if all(p.device.type == "cpu" for p in m.parameters()):
            headroom = max(headroom, size)
        else:
            moved += size
    return moved + headroom


def modules_with_others(diffusion_model: nn.Module, targets: Dict[str, nn.Module], others: Sequence):
    """The streamed modules of this model and of ``others`` (clones the same node prepared before it,
    not run yet), and the ids of the models they belong to."""
    prepared = [(o.model.diffusion_model, streamed_modules(o)) for o in others]
    prepared = [(dm, mods) for dm, mods in prepared if mods]
    modules = list(targets.values()) + [m for _, mods in prepared for m in mods]
    models = {id(dm) for dm, _ in prepared} | ({id(diffusion_model)} if targets else set())
    return modules, models


def host_memory_mode(choice: str, modules: Sequence[nn.Module]) -> Tuple[str, str]:
    """``(mode, why)`` for ``choice`` ("auto" / "RAM" / "file") given every streamed module the node
    prepares (both WAN 2.2 experts: they are prepared before either runs): see
    :func:`utils.choose_host_memory`. The copies need all of their bytes; the RAM they may use is what
    is available plus what their weights hold in anonymous RAM now (a loader's copies, which masters on
    file would release; weights that are views of their file hold none)."""
    unique = list({id(m): m for m in modules}.values())
    need = sum(packed_bytes(m) for m in unique)
    finder = SliceFinder()
    held = sum(tensor_bytes(t) for m in unique for p in m.parameters() for _, t in leaf_tensors(p)
               if t.device.type == "cpu" and finder.find(t) is None)
    return choose_host_memory(choice, need, host_available_bytes() + held)


def preflight(patcher, diffusion_model: nn.Module, layout: ModelLayout, settings: SwapSettings,
              plan: SwapPlan, targets: Dict[str, nn.Module], engines: Mapping[nn.Module, object],
              others: Sequence = ()) -> List[str]:
    """Checks before the node changes anything. With host masters in RAM (``settings.host_memory``),
    raises :class:`BlockSwapError` when host RAM cannot hold the host copies of this model's streamed
    blocks together with those of ``others`` (clones prepared by the same node, not run yet: both WAN
    2.2 experts are prepared before either runs). Returns warnings: part of the masters (on file: the
    staging ring) will be pageable (ComfyUI's pin cap), the resident weights exceed 90 % of the card."""
    notes: List[str] = []
    modules, models = modules_with_others(diffusion_model, targets, others)
    if modules:
        what = "this model" if len(models) == 1 else f"the {len(models)} models this node prepares"
        on_file = settings.host_memory == "file"
        error = None if on_file else host_ram_message(host_bytes_needed(modules), host_available_bytes(), what)
        if error:
            raise BlockSwapError(error)
        if patcher.load_device.type == "cuda" and settings.use_non_blocking:
            budget = settings.pin_budget_bytes if settings.pin_budget_bytes is not None else pin_budget_left(engines, models)
            sizes = [packed_bytes(m) for m in {id(m): m for m in modules}.values()]
            # on file only the staging ring is pinned: as many buffers as slots, per model
            pinned = plan.slots * max(sizes) * len(models) if on_file else sum(sizes)
            note = pin_budget_message(pinned, budget)
            if note:
                notes.append(note)
    note = vram_preflight(patcher, diffusion_model, layout, settings, plan)
    if note:
        notes.append(note)
    return notes


def vram_preflight(patcher, diffusion_model: nn.Module, layout: ModelLayout, settings: SwapSettings,
                   plan: SwapPlan) -> Optional[str]:
    """On CUDA: a warning when the weights that stay on the GPU with ``plan`` (the resident part plus
    the ring) exceed 90 % of the card, with the smallest blocks_to_swap that fits, or a louder one
    when even streaming everything would not fit. Never raises: ComfyUI may still cope (lowvram)."""
    total = device_total_memory(patcher.load_device)
    if total is None:
        return None
    full = full_model_size(patcher)
    # every unit that could stream: the figures for "more blocks" and "everything swapped"
    everything = plan_swap(layout, replace(settings, blocks_to_swap=layout.num_blocks,
                                           vace_blocks_to_swap=layout.num_vace_blocks,
                                           offload_txt_emb=True, offload_img_emb=True))
    modules = {n: unwrap(diffusion_model.get_submodule(n)) for n in everything.units}
    raw = {n: sum(tensor_bytes(p) for p in m.parameters()) for n, m in modules.items()}
    slot = {n: packed_bytes(m) for n, m in modules.items()}

    def on_gpu(p: SwapPlan) -> int:
        return full - sum(raw[u] for u in p.units) + p.slots * max((slot[u] for u in p.units), default=0)

    need = on_gpu(plan)
    if need <= VRAM_LIMIT * total:
        return None
    fit = next((n for n in range(settings.blocks_to_swap + 1, layout.num_blocks + 1)
                if on_gpu(plan_swap(layout, replace(settings, blocks_to_swap=n))) <= VRAM_LIMIT * total), None)
    return vram_message(need, total, need_all_swapped=on_gpu(everything), fit_blocks=fit)
