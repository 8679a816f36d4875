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

from .block_manager import BlockSwapEngine
from .device_ring import SharedRing
from .config import SwapSettings
from .utils import device_memory, format_bytes, get_logger, host_available_bytes, host_rss_bytes

log = get_logger("looper")


def is_model(x) -> bool:
    """A ComfyUI MODEL (a ModelPatcher or subclass), told by what the pack uses of it."""
    return hasattr(x, "clone") and hasattr(x, "model")


def prepare_model_for_loop(model, settings: SwapSettings, *, ring: Optional[SharedRing] = None,
                           prepared: Optional[Dict[int, Tuple[Any, Any, str]]] = None, debug: bool = False,
                           node_id: Optional[str] = None, note: str = ""):
    """A block-swap clone of ``model`` for reuse in every loop (``None`` stays ``None``).

    ``prepared`` maps ``id(model)`` to ``(model, clone, text)``: a model that appears in several
    segments is prepared once and every segment gets the same clone; the host RAM check counts the
    models in it together (none of them has run yet); the node shows the texts of all of them.
    ``ring`` shares device slots with the other models of the pipeline. ``note`` (e.g. the
    vram_budget choice) follows the plan in the node's text.
    """
    if model is None:
        return None
    if prepared is not None and id(model) in prepared:
        return prepared[id(model)][1]
    if not is_model(model):
        raise TypeError(f"expected a ComfyUI MODEL (a ModelPatcher), got {type(model).__name__}")
    from .callbacks import apply_block_swap, send_node_text

    # The models this node prepared before are not packed yet: the host RAM check covers them too.
    others = [entry[1] for entry in prepared.values()] if prepared else []
    clone, text = apply_block_swap(model, settings, debug=debug, node_id=node_id, ring=ring, others=others)
    if debug:
        log.info("looper: %s", text)
    tail = [note] if note else []  # the plan comes first: the node shows its first lines
    if prepared is None:
        send_node_text(node_id, "\n".join([text] + tail))
        return clone
    prepared[id(model)] = (model, clone, text)  # keeps `model` alive so its id cannot be reused
    # One node shows one text: every model prepared so far, identical descriptions once.
    send_node_text(node_id, "\n".join(list(dict.fromkeys(entry[2] for entry in prepared.values())) + tail))
    return clone


def cleanup_loop_blockswap(engine: BlockSwapEngine, device=None) -> Dict[str, Any]:
    """After a sampler call: evict anything still bound to a slot (an interrupted run), read the
    finished timing events, and return the run's figures (:func:`run_figures`: the log's
    :func:`format_run_text`, the node's ``readout.node_text``). Masters, patch routing and the ring
    stay: the next loop needs them."""
    engine.end_run()
    return run_figures(engine, device)


def run_figures(engine: BlockSwapEngine, device=None) -> Dict[str, Any]:
    """The figures of the run that just ended: what streamed, bytes moved, copy/stall time, peak
    VRAM (this run's: ON_PRE_RUN resets the peak), host masters, pinned bytes, process RSS."""
    t, plan = engine.tracker, engine.plan
    overlapped = engine.compute_device.type == "cuda" and engine.settings.use_non_blocking
    copy_ms = sum(t.copy_ms.values())
    mem = device_memory(device) if device is not None else {}
    return {
        "streamed_units": len(plan.units),
        "resident_blocks": len(plan.resident_blocks),
        "forwards": t.forwards,
        "h2d_bytes": t.h2d_bytes,
        "h2d_per_forward": t.h2d_bytes // max(1, t.forwards),
        "copies": t.copies,
        "stalls": t.stalls,
        "overlapped_copies": overlapped,
        "copy_ms": round(copy_ms, 3),
        # Without a copy stream every copy blocks the compute that needs it: all copy time is stall.
        "stall_ms": round(sum(t.stall_ms.values()) if overlapped else copy_ms, 3),
        "memory": {
            "vram": mem or None,  # None: no device counters (CPU)
            "host_master_bytes": t.host_bytes,
            "pinned_bytes": t.pinned_bytes,
            "pageable_reason": t.pageable_reason,
            "host_rss_bytes": host_rss_bytes(),
            "host_available_bytes": host_available_bytes(),
        },
    }


def format_run_text(f: Mapping[str, Any]) -> str:
    """Two lines for the log from :func:`run_figures`: streaming, then memory."""
    copies = (f"copy {f['copy_ms']:.1f} ms, stall {f['stall_ms']:.1f} ms ({f['stalls']} stalls)"
              if f["overlapped_copies"] else f"copy {f['copy_ms']:.1f} ms, synchronous (all stall)")
    line1 = (f"Block swap run: {f['streamed_units']} units streamed, {f['resident_blocks']} blocks resident; "
             f"{f['forwards']} forwards, {format_bytes(f['h2d_per_forward'])} H2D per forward; {copies}")
    m = f["memory"]
    vram = (f"VRAM peak {format_bytes(m['vram']['peak_allocated'])} allocated, "
            f"{format_bytes(m['vram']['peak_reserved'])} reserved" if m["vram"] else "VRAM peak n/a (CPU)")
    pinned = f"{format_bytes(m['pinned_bytes'])} pinned"
    if f["overlapped_copies"] and m["pinned_bytes"] < m["host_master_bytes"]:
        pinned += f", {format_bytes(m['host_master_bytes'] - m['pinned_bytes'])} pageable"
    line2 = (f"{vram}; host masters {format_bytes(m['host_master_bytes'])} ({pinned}), "
             f"RSS {format_bytes(m['host_rss_bytes'])}")
    return f"{line1}\n{line2}"


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
                     node_id: Optional[str] = None, note: str = "") -> List:
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
    prepared: Dict[int, Tuple[Any, Any, str]] = {}
    out = []
    for entry in sequence:
        if entry is None:
            out.append(None)
            continue
        high, low, clip = entry
        out.append((prepare_model_for_loop(high, settings, ring=ring, prepared=prepared, debug=debug, node_id=node_id,
                                           note=note),
                    prepare_model_for_loop(low, settings, ring=ring, prepared=prepared, debug=debug, node_id=node_id,
                                           note=note),
                    clip))
    return out
