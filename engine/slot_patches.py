"""Weight patches (LoRA...) on streamed blocks, applied in the slot: the patch structures' tensors.

Pure torch. A streamed block's patch tensors (a LoRA's factors) are handed to the engine as the unit's
*extras*: packed once into a host buffer of their own, pinned like the masters, and copied into the
slot right behind the weights on the copy stream. The slot transform then patches the weights from
those device copies, never copying a factor from pageable RAM per weight (the patch computation itself
is ComfyUI's: ``callbacks.patched_weight``).

ComfyUI keeps a key's patches as a list of ``(strength, value, strength_model, offset, function)``
where ``value`` is a weight adapter (its tensors in ``.weights``), a tuple such as ``("diff",
(tensor,))``, or a nested list. :func:`patch_tensors` lists every tensor in that structure in a fixed
order, :func:`with_tensors` rebuilds the structure around other tensors (the slot's copies).
"""
from __future__ import annotations

import copy
from typing import Iterator, List

import torch


def patch_tensors(obj) -> List[torch.Tensor]:
    """Every tensor inside a patch structure, depth first."""
    out: List[torch.Tensor] = []
    _walk(obj, out.append)
    return out


def with_tensors(obj, tensors: Iterator[torch.Tensor]):
    """A copy of the patch structure ``obj`` whose tensors are the next ones of ``tensors`` (in
    :func:`patch_tensors` order); everything else (strengths, functions, adapter objects' other
    attributes) is shared."""
    return _walk(obj, lambda t: next(tensors))


def _walk(obj, leaf):
    if isinstance(obj, torch.Tensor):
        return leaf(obj)
    if isinstance(obj, list):
        return [_walk(v, leaf) for v in obj]
    if isinstance(obj, tuple):
        items = [_walk(v, leaf) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    if isinstance(obj, dict):
        return {k: _walk(v, leaf) for k, v in obj.items()}
    weights = getattr(obj, "weights", None)
    if isinstance(weights, (tuple, list)) and hasattr(obj, "calculate_weight"):  # a weight adapter
        new = copy.copy(obj)
        new.weights = _walk(weights, leaf)
        return new
    return obj
