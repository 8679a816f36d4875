"""Where the block-swap loader puts the streamed blocks' tensors while it reads the file: straight into
the host masters the engine will adopt (RAM), or nowhere at all (file).

Glue between the file readers (``formats.weight_files.read_weights`` takes a ``Destination``) and the
engine's masters (``engine.host_masters``, ``engine.file_masters``); no ComfyUI. It sits at the top
level because it joins the two wings, which may not import each other.

* :class:`HostArenas` (host masters in RAM): one page-aligned buffer per streamed unit
  (``engine.host_masters.host_arena``), its tensors placed one after another at the engine's alignment; the
  engine adopts each buffer as the unit's master without copying it again.
* :class:`FileTargets` (host masters on file): a streamed unit's tensors that loading leaves as they are
  become views of a read-only mapping of the model file (nothing is read; the engine reads them from
  the file when they stream); tensors loading converts (dtype, the fp8 option) are written to a spill
  file as they come, one unit's region at a time, and become views of its mapping. No streamed block
  is kept in anonymous memory, not even while loading (one tensor is, while it is converted).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch

from .engine.file_masters import FileHandle, SpillFile, map_file
from .engine.host_masters import arena_offset, host_arena
from .formats.gguf_reader import GGUFTensor
from .formats.weight_files import Destination, TensorEntry
from .utils import get_logger

log = get_logger("loader")

__all__ = ["HostArenas", "FileTargets"]


class HostArenas(Destination):
    """Per-unit host buffers the engine adopts as its RAM masters (module docstring)."""

    _BUFFER = "buffer"  # what a unit's space is called in the log

    def __init__(self, group_of: Callable[[str], Optional[str]], group_bytes: Dict[str, int],
                 unchanged: Callable[[TensorEntry], bool]):
        self.group_of, self.group_bytes, self._unchanged = group_of, group_bytes, unchanged
        self.buffers: Dict[str, torch.Tensor] = {}
        self.used: Dict[str, int] = {}

    def unchanged(self, e: TensorEntry) -> bool:
        return self.group_of(e.key) is not None and self._unchanged(e)

    def _alloc(self, group: str) -> torch.Tensor:
        return host_arena(self.group_bytes[group])

    def _next(self, key: str, n: int) -> Optional[Tuple[str, int]]:
        """``key``'s unit and where its next ``n`` bytes go in that unit's buffer, or None (no unit, or
        no room left)."""
        group = self.group_of(key)
        if group is None:
            return None
        if group not in self.buffers:
            self.buffers[group], self.used[group] = self._alloc(group), 0
        off = self.used[group]
        if off + n > self.buffers[group].numel():  # a size estimate was wrong: keep the tensor as it is
            log.warning("loader: %s does not fit its unit's %s %r; it stays in RAM on its own", key, self._BUFFER,
                        group)
            return None
        self.used[group] = off + arena_offset(n)
        return group, off

    def reserve(self, key: str, n: int) -> Optional[torch.Tensor]:
        """The next ``n`` bytes of ``key``'s unit buffer, or None (no unit, or no room left)."""
        found = self._next(key, n)
        return None if found is None else self.buffers[found[0]][found[1]:found[1] + n]

    def place(self, key: str, t: torch.Tensor, direct: bool) -> torch.Tensor:
        if direct:  # read into its buffer already
            return t
        raw = _plain(t)
        dst = self.reserve(key, torch.Tensor.numel(raw) * raw.element_size())
        if dst is None:
            return t
        dst.copy_(raw.contiguous().reshape(-1).view(torch.uint8))
        return _like(dst, t)


class FileTargets(HostArenas):
    """Streamed units kept on file (module docstring): unchanged tensors view the model file,
    converted ones go to ``spill`` (one region per unit, sized like its host master)."""

    _BUFFER = "spill region"

    def __init__(self, path: str, group_of, group_bytes, unchanged, spill: SpillFile):
        super().__init__(group_of, group_bytes, unchanged)
        self.spill = spill
        self.handle = FileHandle(path)
        self._base: Optional[torch.Tensor] = None
        self._region_start: Dict[str, int] = {}  # file offset of each unit's spill region

    def mapped(self, e: TensorEntry) -> Optional[torch.Tensor]:
        itemsize = e.dtype.itemsize if e.dtype is not None else 1
        if e.offset % itemsize or e.offset + e.nbytes > self.handle.size:
            return None  # a dtype view needs an aligned start: read it (and spill it) instead
        if self._base is None:
            self._base = map_file(self.handle, 0, self.handle.size)
        return self._base[e.offset:e.offset + e.nbytes]

    def reserve(self, key: str, n: int) -> Optional[torch.Tensor]:
        return None  # what is not mapped is converted first, then placed

    def _alloc(self, group: str) -> torch.Tensor:
        self._region_start[group], region = self.spill.reserve(self.group_bytes[group])
        return region

    def place(self, key: str, t: torch.Tensor, direct: bool) -> torch.Tensor:
        if direct:  # a view of the model file
            return t
        raw = _plain(t)
        n = torch.Tensor.numel(raw) * raw.element_size()
        found = self._next(key, n)
        if found is None:  # a resident tensor, or one that does not fit
            return t
        group, off = found
        self.spill.write_at(self._region_start[group] + off, raw.contiguous())
        return _like(self.buffers[group][off:off + n], t)


def _plain(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a plain tensor (a GGUF tensor's stored bytes)."""
    return t.as_subclass(torch.Tensor) if isinstance(t, GGUFTensor) else t


def _like(dst: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``dst`` (uint8 bytes) viewed as ``t`` is: a GGUF tensor of the same type and shape, or a tensor
    of ``t``'s dtype and shape."""
    if isinstance(t, GGUFTensor):
        return GGUFTensor.wrap(dst, t.tensor_type, t.tensor_shape)
    return dst.view(t.dtype).view(t.shape)


