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
* the cleanup after each sampler call (the swap clone's ON_CLEANUP, in callbacks.py) releases only
  what the next call cannot use (blocks still bound to slots, pending timing events) and keeps what
  it needs (masters, LoRA routing, the ring).

Imports go one way: this module uses callbacks.py's ``apply_block_swap``; callbacks.py needs nothing
from here.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

from .callbacks import PASS_THROUGH
from .recovery import RETRY
from .config import SwapSettings
from .engine.device_ring import SharedRing
from .utils import get_logger

log = get_logger("looper")


def is_model(x) -> bool:
    """A ComfyUI MODEL (a ModelPatcher or subclass), told by what the pack uses of it."""
    return hasattr(x, "clone") and hasattr(x, "model")


def masters_for(models, settings: SwapSettings, host_memory: str, dynamic_vram: str = PASS_THROUGH) -> Dict[str, Any]:
    """The host-memory choice for all ``models`` a node prepares, made once (``auto`` counts all of
    their host copies together, so every model of a pipeline gets the same kind of master), as
    keyword arguments for :func:`prepare_model_for_loop`. Models Dynamic VRAM keeps are left out:
    they pass through."""
    from .callbacks import host_memory_for, is_dynamic

    models = [m for m in models if m is not None and is_model(m) and not (dynamic_vram == PASS_THROUGH and is_dynamic(m))]
    mode, why = host_memory_for(models, settings, host_memory)
    return {"host_memory": mode, "masters_why": why}


def prepare_model_for_loop(model, settings: SwapSettings, *, ring: Optional[SharedRing] = None,
                           prepared: Optional[Dict[int, Tuple[Any, Any, str]]] = None, debug: bool = False,
                           node_id: Optional[str] = None, note: str = "", dynamic_vram: str = PASS_THROUGH,
                           host_memory: str = "auto", masters_why: Optional[str] = None, spill_folder: str = "",
                           on_oom: str = RETRY, memory=None):
    """A block-swap clone of ``model`` for reuse in every loop (``None`` stays ``None``).

    ``prepared`` maps ``id(model)`` to ``(model, clone, text)``: a model that appears in several
    segments is prepared once and every segment gets the same clone; the host RAM check counts the
    models in it together (none of them has run yet); the node shows the texts of all of them.
    ``ring`` shares device slots with the other models of the pipeline. ``note`` (e.g. the
    vram_budget choice) follows the plan in the node's text. ``dynamic_vram``, ``host_memory``,
    ``masters_why``, ``spill_folder``, ``on_oom``, ``memory``: see :func:`callbacks.apply_block_swap`
    (:func:`masters_for` makes one host-memory choice for all the models of a node; each model learns its
    own block count after an out-of-memory error or in adaptive mode).
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
    clone, text = apply_block_swap(model, settings, debug=debug, node_id=node_id, ring=ring, others=others,
                                   dynamic_vram=dynamic_vram, host_memory=host_memory, masters_why=masters_why,
                                   spill_folder=spill_folder, on_oom=on_oom, memory=memory)
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


def prepare_sequence(sequence, settings: SwapSettings, *, debug: bool = False,
                     node_id: Optional[str] = None, note: str = "", dynamic_vram: str = PASS_THROUGH,
                     host_memory: str = "auto", spill_folder: str = "", on_oom: str = RETRY,
                     memory: Optional[Callable[[Any], Any]] = None) -> List:
    """WanVideoLoraSequencer's ``model_clip_sequence`` with every model prepared: same length, each
    entry ``(model_high | None, model_low | None, clip | None)`` (``None`` entries kept), clips passed
    through, each distinct model prepared once, all sharing one device ring and one host-memory
    choice (:func:`masters_for`)."""
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
    masters = masters_for([m for entry in sequence if entry is not None for m in entry[:2]], settings, host_memory,
                          dynamic_vram)
    out = []
    for entry in sequence:
        if entry is None:
            out.append(None)
            continue
        high, low, clip = entry
        kw = dict(ring=ring, prepared=prepared, debug=debug, node_id=node_id, note=note, dynamic_vram=dynamic_vram,
                  spill_folder=spill_folder, on_oom=on_oom, **masters)
        out.append((prepare_model_for_loop(high, settings, memory=memory(high) if memory else None, **kw),
                    prepare_model_for_loop(low, settings, memory=memory(low) if memory else None, **kw), clip))
    return out
