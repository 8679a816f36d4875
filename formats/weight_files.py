"""Read diffusion-model weight files (.safetensors, .gguf) into torch tensors this process owns.

Pure torch (+ ``gguf`` for .gguf files, imported only when one is read); no ComfyUI.

Two phases, so a bad file is refused before anything is allocated:

* ``scan_weights(path)`` reads only the header and returns one :class:`TensorEntry` per tensor
  (key, stored type, logical shape, byte range), after checking that every byte range lies inside
  the file (a truncated download fails here, naming the file and the tensor).
* ``read_weights(path, entries, transform)`` copies each tensor's bytes into a tensor allocated for
  it (its byte range is memory-mapped, copied with torch's multi-threaded copy and unmapped again),
  then calls ``transform(key, tensor)`` (dtype conversion, fp8 quantization) before the next one.

Why copy tensor by tensor rather than keep a memory map of the whole file: a mapped file's pages
count in the process' RSS once touched, and a loader that maps the whole file and then copies it
into parameters holds both (about twice the file). Unmapping each range right after its copy keeps
the peak at about the file size (plus one tensor for a transform), the tensors are writable (a
read-only GGUF map faults on an in-place write), and nothing ties the model to the file afterwards.
Mapping + ``copy_`` measured 3-7x faster than ``readinto`` into fresh tensors (page faults are
taken in bulk). The OS page cache still caches the file, outside the process.

GGUF tensors of quantized types become :class:`gguf_reader.GGUFTensor` (raw bytes + type +
logical shape); F32/F16/BF16 become plain tensors. Keys lose a ``model.diffusion_model.`` /
``diffusion_model.`` prefix in both formats.
"""
from __future__ import annotations

import mmap
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .gguf_dequant import GGUFFormatError
from .gguf_reader import GGUFTensor, _strip_prefix
from .safetensors_header import SafetensorsHeaderError, read_safetensors_header
from ..utils import get_logger

log = get_logger("weights")

__all__ = ["WeightFileError", "TensorEntry", "Destination", "scan_weights", "read_weights", "file_format"]

# safetensors dtype names -> torch dtypes: every whole-byte dtype the safetensors library reads into
# torch (which ComfyUI's loaders use), where this torch has it. ComfyUI keeps weights in any of its
# float8 types (float8_e8m0fnu: MXFP8 block scales, --fp8_e8m0fnu-unet; the fnuz types) and its save
# nodes write them, so a file of such a model holds F8_E8M0 / F8_E4M3FNUZ / F8_E5M2FNUZ tensors.
# Not read: F4 (two values per byte, shape in values) and F6_*: torch has no whole-byte dtype for them,
# and no writer of WAN files uses them (ComfyUI stores NVFP4 weights as U8).
_ST_DTYPES = {name: dtype for name, dtype in {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": getattr(torch, "float8_e4m3fnuz", None), "F8_E5M2FNUZ": getattr(torch, "float8_e5m2fnuz", None),
    "F8_E8M0": getattr(torch, "float8_e8m0fnu", None), "C64": torch.complex64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": getattr(torch, "uint64", None), "U32": getattr(torch, "uint32", None), "U16": getattr(torch, "uint16", None),
    "U8": torch.uint8, "BOOL": torch.bool,
}.items() if dtype is not None}


class WeightFileError(ValueError):
    """A weight file that cannot be loaded; the message names the file and what is wrong."""


@dataclass(frozen=True)
class TensorEntry:
    key: str  # prefix stripped
    stored: str  # safetensors dtype name or GGUF type name
    shape: Tuple[int, ...]  # logical shape, torch order
    offset: int  # absolute byte offset in the file
    nbytes: int
    dtype: Optional[torch.dtype]  # torch dtype of the stored bytes; None for quantized GGUF types

    @property
    def quantized(self) -> bool:
        return self.dtype is None

    def meta(self) -> torch.Tensor:
        """A storage-less stand-in with the logical shape, for model detection before any read."""
        return torch.empty(self.shape, dtype=self.dtype or torch.uint8, device="meta")


def file_format(path) -> str:
    """"safetensors" or "gguf", from the file's first bytes (not its name)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightFileError(f"model file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] == b"GGUF":
        return "gguf"
    if len(head) == 8:
        return "safetensors"
    raise WeightFileError(f"{path}: {len(head)} bytes long: not a model file (empty or truncated)")


def _scan_safetensors(path: str) -> Tuple[List[TensorEntry], Dict[str, str]]:
    try:  # every rule of the reference reader, plus unique names (safetensors_header's docstring)
        tensors, metadata = read_safetensors_header(path, {k: d.itemsize for k, d in _ST_DTYPES.items()})
    except SafetensorsHeaderError as e:
        raise WeightFileError(str(e)) from e
    entries: List[TensorEntry] = []
    seen = set()
    for t in tensors:
        key = _strip_prefix(t.name)
        if key in seen:
            raise WeightFileError(f"{path}: two tensors map to the key {key!r}")
        seen.add(key)
        entries.append(TensorEntry(key, t.dtype, t.shape, t.offset, t.nbytes, _ST_DTYPES[t.dtype]))
    return entries, metadata


def _scan_gguf(path: str) -> Tuple[List[TensorEntry], Dict[str, str]]:
    from . import gguf_reader

    try:  # the reader's checks: byte order, tensor types, truncation, orig_shape metadata, duplicate keys
        arch, headers, _size = gguf_reader.read_headers(path, expected_arch=None)
    except GGUFFormatError as e:
        raise WeightFileError(str(e)) from e
    floats = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    entries = [TensorEntry(h.key, h.type_name, h.shape, int(h.tensor.data_offset), int(h.tensor.n_bytes),
                           floats.get(h.type_name)) for h in headers]
    return entries, {"general.architecture": arch or ""}


def scan_weights(path) -> Tuple[str, List[TensorEntry], Dict[str, str]]:
    """``(format, entries, metadata)`` from the header alone; raises WeightFileError naming the file
    for a missing, empty, truncated or corrupt file, or an unsupported GGUF tensor type."""
    path = os.fspath(path)
    fmt = file_format(path)
    entries, metadata = (_scan_gguf if fmt == "gguf" else _scan_safetensors)(path)
    if not entries:
        raise WeightFileError(f"{path}: the file holds no tensors")
    return fmt, entries, metadata


Transform = Callable[[str, torch.Tensor], Dict[str, torch.Tensor]]


class Destination:
    """Where :func:`read_weights` puts tensors, for callers that want more than owned copies (the
    block-swap loaders, ``load_targets``). This base keeps every tensor as read and transformed."""

    def unchanged(self, e: TensorEntry) -> bool:
        """``e``'s tensor comes out of the transform as read (so it may be read straight to its place)."""
        return False

    def mapped(self, e: TensorEntry) -> Optional[torch.Tensor]:
        """``e``'s bytes (uint8) as a view of the file, read by no one now, or None: read them."""
        return None

    def reserve(self, key: str, nbytes: int) -> Optional[torch.Tensor]:
        """A buffer (uint8) to read ``key``'s bytes straight into, or None."""
        return None

    def place(self, key: str, t: torch.Tensor, direct: bool) -> torch.Tensor:
        """Where the final tensor ``t`` lives (``direct``: it was read into :meth:`reserve`'s buffer)."""
        return t


def _read_range(f, path: str, e: TensorEntry, raw: torch.Tensor) -> None:
    """Copy ``e``'s bytes from the open file ``f`` into ``raw`` (its byte range mapped, copied, unmapped)."""
    if not e.nbytes:
        return
    if os.fstat(f.fileno()).st_size < e.offset + e.nbytes:  # a map past the end would fault
        raise WeightFileError(f"{path}: the file ended inside tensor {e.key!r}; it changed "
                              "or was truncated while loading")
    start = e.offset - e.offset % mmap.ALLOCATIONGRANULARITY
    mapped = mmap.mmap(f.fileno(), e.offset + e.nbytes - start, offset=start, access=mmap.ACCESS_READ)
    try:
        src = torch.frombuffer(mapped, dtype=torch.uint8, offset=e.offset - start, count=e.nbytes)
        raw.copy_(src)
        del src  # the map cannot close while a tensor still exports it
    finally:
        mapped.close()


def read_weights(path, entries: List[TensorEntry], transform: Optional[Transform] = None, *,
                 dest: Optional[Destination] = None) -> Dict[str, torch.Tensor]:
    """Read ``entries`` (from :func:`scan_weights`) into owned CPU tensors, in file order.

    ``transform(key, tensor)`` may return replacement entries (e.g. a converted tensor, or an fp8
    weight plus its scale); it runs right after each read, so at most one untransformed tensor
    exists at a time. ``dest`` (a :class:`Destination`) may place tensors elsewhere: a view of the file
    instead of a read (:meth:`Destination.mapped`), a buffer read straight into for tensors the
    transform leaves unchanged (:meth:`Destination.reserve`), a home for each final tensor
    (:meth:`Destination.place`).
    Raises WeightFileError naming the file if it shrank since the scan.
    """
    path = os.fspath(path)
    out: Dict[str, torch.Tensor] = {}
    dest = dest or Destination()
    with open(path, "rb") as f, warnings.catch_warnings():
        # torch.frombuffer warns that a read-only map is not writable: it is only read from
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        for e in sorted(entries, key=lambda e: e.offset):
            unchanged = dest.unchanged(e)
            raw = dest.mapped(e) if unchanged else None
            direct = raw is not None  # a view of the file: nothing to read now
            if raw is None:
                raw = dest.reserve(e.key, e.nbytes) if unchanged else None
                direct = raw is not None
                if raw is None:
                    raw = torch.empty(e.nbytes, dtype=torch.uint8)
                _read_range(f, path, e, raw)
            if e.dtype is None:
                t = GGUFTensor.wrap(raw, e.stored, e.shape)
            else:
                t = raw.view(e.dtype).reshape(e.shape)
            results = transform(e.key, t) if transform else {e.key: t}
            del t, raw  # the untransformed tensor goes before the next one is read
            for key, value in results.items():
                out[key] = dest.place(key, value, direct and key == e.key)
    return out
