"""Per-loop preparation and cleanup for WanVideoLooper / WanVideoLoraSequencer pipelines.

The looper's call pattern (SquirrelRat/WanVideoLooper): the same patchers every loop; per loop a
high-noise sampler call then a low-noise one (2-3 ``common_ksampler`` calls), other models (VAE,
CLIP vision) loaded in between; ComfyUI fires ON_CLEANUP after every sampler call and ON_LOAD only
when it really reloads. The design that is correct under exactly that pattern:

* each distinct model is prepared **once** (a clone with block swap) and reused by every loop, so
  no per-loop state exists to leak or to go stale: the host masters are packed on the first run
  and stay bound; every sampler call only re-checks them (ON_PRE_RUN);
* the models of one pipeline share **one device ring** (only one expert computes at a time): the
  model about to run takes the slots, the one that gave them up holds no device memory for its
  streamed blocks;
* the cleanup after each sampler call (``cleanup_loop_blockswap``) releases only what the next
  call cannot use (blocks still bound to slots, pending timing events) and keeps what it needs
  (masters, LoRA routing, the ring).
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from .block_manager import BlockSwapEngine, SharedRing
from .config import SwapSettings
from .utils import device_memory, format_bytes, get_logger, host_rss_bytes

log = get_logger("looper")


def is_model(x) -> bool:
    """A ComfyUI MODEL (a ModelPatcher or subclass), told by what the pack uses of it."""
    return hasattr(x, "clone") and hasattr(x, "model")


def prepare_model_for_loop(model, settings: SwapSettings, *, ring: Optional[SharedRing] = None,
                           prepared: Optional[Dict[int, Tuple[Any, Any]]] = None, debug: bool = False,
                           node_id: Optional[str] = None):
    """A block-swap clone of ``model`` for reuse in every loop (``None`` stays ``None``).

    ``prepared`` maps ``id(model)`` to ``(model, clone)``: a model that appears in several segments
    is prepared once and every segment gets the same clone. ``ring`` shares device slots with the
    other models of the pipeline.
    """
    if model is None:
        return None
    if prepared is not None and id(model) in prepared:
        return prepared[id(model)][1]
    if not is_model(model):
        raise TypeError(f"expected a ComfyUI MODEL (a ModelPatcher), got {type(model).__name__}")
    from .callbacks import apply_block_swap

    clone, text = apply_block_swap(model, settings, debug=debug, node_id=node_id, ring=ring)
    if debug:
        log.info("looper: %s", text)
    if prepared is not None:
        prepared[id(model)] = (model, clone)  # keeps `model` alive so its id cannot be reused
    return clone


def cleanup_loop_blockswap(engine: BlockSwapEngine, device=None) -> str:
    """After a sampler call: evict anything still bound to a slot (an interrupted run), read the
    finished timing events, and return the run's one-line summary. Masters, patch routing and the
    ring stay: the next loop needs them."""
    engine.end_run()
    t = engine.tracker
    plan = engine.plan
    text = (f"Block swap: {len(plan.units)} units streamed, {len(plan.resident_blocks)} blocks resident; "
            f"{format_bytes(t.h2d_bytes / max(1, t.forwards))} H2D per forward, {t.stalls} stalls")
    mem = device_memory(device) if device is not None else {}
    if mem:
        text += (f"; peak VRAM {format_bytes(mem['peak_allocated'])} allocated, "
                 f"{format_bytes(mem['peak_reserved'])} reserved")
    else:  # no device counters (CPU): the host side is what there is to show
        text += f"; host RSS {format_bytes(host_rss_bytes())}"
    return text


def reset_model_blockswap_state(patcher) -> None:
    """Remove this pack's stand-ins, callbacks and wrapper from ``patcher`` (a clone), so a model
    that went through a BlockSwap node before is prepared afresh, never twice."""
    from comfy.patcher_extension import CallbacksMP, WrappersMP

    from .callbacks import KEY, StreamedUnit

    for name in [k for k, v in patcher.object_patches.items() if isinstance(v, StreamedUnit)]:
        del patcher.object_patches[name]
    for cb_type in (CallbacksMP.ON_PRE_RUN, CallbacksMP.ON_CLEANUP, CallbacksMP.ON_DETACH):
        patcher.remove_callbacks_with_key(cb_type, KEY)
    patcher.remove_wrappers_with_key(WrappersMP.DIFFUSION_MODEL, KEY)


def validate_tensor_consistency(reference, candidate, what: str = "value",
                                attrs=("shape", "dtype", "device")) -> None:
    """Check that ``candidate`` keeps the structure of ``reference``: a latent dict keeps all its
    keys, and every tensor keeps its ``attrs`` (shape, dtype, device). Raises ValueError naming the
    first difference (a looper that loses ``noise_mask`` or moves ``samples`` silently degrades
    loop 2+). With ``block_swap_debug`` the pack checks every forward's output against its input."""
    if isinstance(reference, Mapping):
        if not isinstance(candidate, Mapping):
            raise ValueError(f"{what}: expected a dict, got {type(candidate).__name__}")
        missing = [k for k in reference if k not in candidate]
        if missing:
            raise ValueError(f"{what}: lost keys {missing}")
        for k in reference:
            validate_tensor_consistency(reference[k], candidate[k], f"{what}[{k!r}]", attrs)
    elif isinstance(reference, torch.Tensor):
        if not isinstance(candidate, torch.Tensor):
            raise ValueError(f"{what}: expected a tensor, got {type(candidate).__name__}")
        for attr in attrs:
            if getattr(reference, attr) != getattr(candidate, attr):
                raise ValueError(f"{what}: {attr} {getattr(candidate, attr)} != {getattr(reference, attr)}")


def prepare_sequence(sequence, settings: SwapSettings, *, debug: bool = False,
                     node_id: Optional[str] = None) -> List:
    """WanVideoLoraSequencer's ``model_clip_sequence`` with every model prepared: same length, each
    entry ``(model_high | None, model_low | None, clip | None)`` (``None`` entries kept), clips passed
    through, each distinct model prepared once, all sharing one device ring."""
    if not isinstance(sequence, (list, tuple)):
        raise TypeError("model_clip_sequence must be the list WanVideoLoraSequencer outputs, got "
                        f"{type(sequence).__name__}")
    for i, entry in enumerate(sequence):
        if entry is None:
            continue
        if not isinstance(entry, (list, tuple)) or len(entry) != 3:
            raise ValueError(f"model_clip_sequence[{i}] must be (model_high, model_low, clip) or None, got "
                             f"{type(entry).__name__}" + (f" of length {len(entry)}" if isinstance(entry, (list, tuple)) else ""))
        for j, m in enumerate(entry[:2]):
            if m is not None and not is_model(m):
                raise ValueError(f"model_clip_sequence[{i}][{j}] must be a MODEL or None, got {type(m).__name__}")
    ring = SharedRing()
    prepared: Dict[int, Tuple[Any, Any]] = {}
    out = []
    for entry in sequence:
        if entry is None:
            out.append(None)
            continue
        high, low, clip = entry
        out.append((prepare_model_for_loop(high, settings, ring=ring, prepared=prepared, debug=debug, node_id=node_id),
                    prepare_model_for_loop(low, settings, ring=ring, prepared=prepared, debug=debug, node_id=node_id),
                    clip))
    return out
