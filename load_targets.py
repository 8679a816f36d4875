"""Where the block-swap loader puts the streamed blocks' tensors while it reads the file: straight into
the host masters the engine will adopt.

Glue between the file readers (``formats.weight_files.read_weights`` takes a ``Destination``) and the
engine's masters (``engine.host_masters``); no ComfyUI. It sits at the top level because it joins the
two wings, which may not import each other.

:class:`HostArenas`: one page-aligned buffer per streamed unit (``engine.host_masters.host_arena``), its tensors
placed one after another at the engine's alignment; the engine adopts each buffer as the unit's master
without copying it again.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from .engine.host_masters import arena_offset, host_arena
from .formats.gguf_reader import GGUFTensor
from .formats.weight_files import Destination, TensorEntry
from .utils import get_logger

log = get_logger("loader")

__all__ = ["HostArenas"]


class HostArenas(Destination):
    """Per-unit host buffers the engine adopts as its masters (module docstring). ``group_of(key)``: the
    unit a tensor belongs to (None: not streamed); ``group_bytes[unit]``: its buffer's size;
    ``unchanged(entry)``: loading leaves the tensor as read (it may be read straight into the buffer)."""

    def __init__(self, group_of: Callable[[str], Optional[str]], group_bytes: Dict[str, int],
                 unchanged: Callable[[TensorEntry], bool]):
        self.group_of, self.group_bytes, self._unchanged = group_of, group_bytes, unchanged
        self.buffers: Dict[str, torch.Tensor] = {}
        self.used: Dict[str, int] = {}

    def unchanged(self, e: TensorEntry) -> bool:
        return self.group_of(e.key) is not None and self._unchanged(e)

    def reserve(self, key: str, n: int) -> Optional[torch.Tensor]:
        """The next ``n`` bytes of ``key``'s unit buffer, or None (no unit, or no room left)."""
        group = self.group_of(key)
        if group is None:
            return None
        if group not in self.buffers:
            self.buffers[group], self.used[group] = host_arena(self.group_bytes[group]), 0
        off = self.used[group]
        if off + n > self.buffers[group].numel():  # a size estimate was wrong: keep the tensor as it is
            log.warning("loader: %s does not fit its unit's buffer %r; it stays separate", key, group)
            return None
        self.used[group] = off + arena_offset(n)
        return self.buffers[group][off:off + n]

    def place(self, key: str, t: torch.Tensor, direct: bool) -> torch.Tensor:
        if direct:  # read into its buffer already
            return t
        raw = t.as_subclass(torch.Tensor) if isinstance(t, GGUFTensor) else t
        dst = self.reserve(key, torch.Tensor.numel(raw) * raw.element_size())
        if dst is None:
            return t
        dst.copy_(raw.contiguous().reshape(-1).view(torch.uint8))
        if isinstance(t, GGUFTensor):
            return GGUFTensor.wrap(dst, t.tensor_type, t.tensor_shape)
        return dst.view(t.dtype).view(t.shape)
