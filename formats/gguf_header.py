"""Check a GGUF file's header against the file's real size before any parser trusts it.

Pure Python (``gguf`` is imported inside :func:`check_gguf_header` for the GGML type table only); no
torch, no ComfyUI.

Why: gguf-py's ``GGUFReader`` believes every count and length in the header. Reading past the end of
its memory map silently yields empty arrays, so a header that declares a metadata array of 2**61
elements makes it loop (and grow lists) until the machine runs out of memory, and a tensor count of
10**9 costs seconds and hundreds of MB before anything fails. :func:`check_gguf_header` walks the same
structure with every count and length checked against the bytes that remain, using plain Python
integers (no fixed-width overflow), so a lie in the header is a :class:`GGUFFormatError` naming the
file and the field, in time proportional to the bytes really there. Only then does gguf-py read it.

What it accepts is what the files in circulation are: the WAN GGUF files of city96 and QuantStack,
written by ComfyUI-GGUF's ``tools/convert.py`` (gguf-py's ``GGUFWriter``), quantized by its patched
``llama-quantize`` (ggml's C writer) and finished by ``tools/fix_5d_tensors.py`` (gguf-py's writer
again, which adds WAN's 5-D ``patch_embedding.weight`` back as a true 5-D F32 tensor). gguf-py and
ComfyUI-GGUF's ``Unet Loader (GGUF)`` read those files, so this check must too; where ggml's C reader
(``gguf.cpp``) is stricter than gguf-py, that is said below. The rules, each with the reason it
stays:

* Magic ``GGUF``; version 2 or 3: gguf-py reads no other version (1 is obsolete; every writer
  writes 3). A version whose low 16 bits are zero is a file of the other byte order: gguf-py reads
  those headers, but their tensor data is big-endian, which neither this pack's dequantization nor
  ComfyUI-GGUF (``torch.from_numpy`` refuses non-native byte order) can use, and none of the
  writers above writes one (they write the host's order: little-endian).
* Tensor and key-value counts, then the key-value pairs, then the tensor infos, then the data
  section at the next multiple of the alignment (the format itself).
* A key-value pair: key string, value type, value. Strings are a u64 length + UTF-8 bytes (keys and
  tensor names must decode: gguf-py decodes them and fails otherwise). Arrays are an element type, a
  u64 count and the elements. Arrays of arrays are read (gguf-py's writer writes them and its reader
  reads them; ggml's C reader refuses them), down to ``MAX_ARRAY_DEPTH`` levels. Keys are unique:
  gguf-py refuses a repeated key, and gguf-py's and ggml's writers keep one value per key.
* ``general.alignment``, when present, is a u32 power of two (default 32): gguf-py's own rule.
* A tensor info: name, u32 dimension count, that many u64 dimensions, u32 GGML type known to gguf-py
  (gguf-py fails on any other), u64 data offset. Names are unique (gguf-py refuses duplicates).
  The dimension count is at most ``MAX_DIMS`` = 64: gguf-py shapes every tensor as a numpy array, and
  64 is numpy's limit (numpy 2; with numpy 1 it is 32, and gguf-py's own error for 33-64 names the
  file too). ggml's C reader stops at 4 (``GGML_MAX_DIMS``), which is why ComfyUI-GGUF's converter
  sets WAN's 5-D Conv3d kernel aside for ``llama-quantize`` and ``fix_5d_tensors.py`` writes it back
  afterwards with gguf-py: every WAN GGUF in circulation has one 5-D F32 tensor, so a limit of 4
  would refuse them all. Each dimension and their product stay below 2**63 (ggml's C reader's bound;
  numpy's arithmetic would overflow beyond it). The first dimension is a multiple of the type's
  block size: gguf-py refuses other quantized shapes too (and ggml's C reader), and every writer
  stores whole blocks.
* Tensor data: each tensor starts where the previous one's data ends, padded to the alignment, in
  header order. That is ggml's C reader's rule (``gguf.cpp`` refuses any other offset); gguf-py
  accepts any offset, but every writer places tensors this way (gguf-py's ``GGUFWriter`` and ggml's
  writer both, so ``fix_5d_tensors.py``'s 5-D tensor, inserted after ``patch_embedding.bias``, has
  its info and its data at that place). With it no two tensors can overlap. Every tensor lies
  inside the file: the last one may end exactly at the end of the file (the padding after it is
  optional), not one byte past it.

Limits beyond the format (``MAX_*``): what gguf-py does with a header that *is* consistent still
costs memory per item (measured with gguf 0.19: about 3 KiB per key-value pair, 5 KiB per tensor and
1 KiB per metadata array element, at 10-80 us each). A consistent crafted file of a few MB could
still ask for GBs that way, so the counts are capped far above what a diffusion-model file holds
(WAN 14B: about 1,100-1,800 tensors; the files above carry three key-value pairs,
``general.architecture``, ``general.quantization_version`` and ``general.file_type``, and array
elements only for ``comfy.gguf.orig_shape.*``; names under 70 bytes, and convert.py refuses names
over 127), keeping gguf-py's worst case near 30 MB. ``MAX_ARRAY_DEPTH`` bounds nesting: gguf-py
reads an array of arrays with one recursive Python call per level, so Python's recursion limit
(1,000 frames, its callers' included) is its real bound; 64 levels stay far from it.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from .gguf_dequant import GGUFFormatError

__all__ = ["GGUFLayout", "GGUFTensorInfo", "check_gguf_header", "MAX_TENSORS", "MAX_KV_PAIRS",
           "MAX_ARRAY_ELEMENTS", "MAX_ARRAY_DEPTH", "MAX_NAME_BYTES", "MAX_DIMS", "DEFAULT_ALIGNMENT"]

DEFAULT_ALIGNMENT = 32
MAX_DIMS = 64  # numpy's limit, which gguf-py's reader meets (ggml's C reader: 4); module docstring
MAX_TENSORS = 4096
MAX_KV_PAIRS = 1024
MAX_ARRAY_ELEMENTS = 8192  # all metadata arrays together (inner arrays of arrays included)
MAX_ARRAY_DEPTH = 64  # arrays of arrays: gguf-py recurses once per level (module docstring)
MAX_NAME_BYTES = 65536  # a key or tensor name (WAN's are under 70 bytes)
_INT64_LIMIT = 2 ** 63

# GGUF value types: id -> (name, size in bytes); 8 = string and 9 = array have no fixed size
_STRING, _ARRAY = 8, 9
_SCALARS: Dict[int, Tuple[str, int]] = {
    0: ("UINT8", 1), 1: ("INT8", 1), 2: ("UINT16", 2), 3: ("INT16", 2), 4: ("UINT32", 4),
    5: ("INT32", 4), 6: ("FLOAT32", 4), 7: ("BOOL", 1), 10: ("UINT64", 8), 11: ("INT64", 8),
    12: ("FLOAT64", 8),
}
_U32 = 4
# The smallest possible key-value pair (empty key, u8 value) and tensor info (empty name, no dims):
# a count above remaining bytes / these sizes cannot be true, whatever follows.
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    type_id: int
    type_name: str
    dims: Tuple[int, ...]  # GGUF order: fastest-varying first (torch shape reversed)
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


@dataclass(frozen=True)
class GGUFLayout:
    version: int
    alignment: int
    data_start: int  # absolute offset of the data section
    file_size: int
    kv_count: int
    tensors: Tuple[GGUFTensorInfo, ...]


class _Cursor:
    """Reads little-endian fields from the mapped file; every read first checks the bytes remain."""

    def __init__(self, path: str, buf, size: int):
        self.path, self.buf, self.size, self.pos = path, buf, size, 0

    def fail(self, where: str, what: str) -> GGUFFormatError:
        return GGUFFormatError(f"{self.path}: truncated or corrupt GGUF file: {where}: {what}")

    @property
    def left(self) -> int:
        return self.size - self.pos

    def need(self, n: int, where: str, what: str = "") -> None:
        if n > self.left:
            detail = f"{what} needs {n} bytes" if what else f"needs {n} bytes"
            raise self.fail(where, f"{detail} at byte {self.pos}, but only {self.left} remain "
                                   f"(file size {self.size})")

    def u32(self, where: str) -> int:
        self.need(4, where, "a 4-byte field")
        (v,) = struct.unpack_from("<I", self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, where: str) -> int:
        self.need(8, where, "an 8-byte field")
        (v,) = struct.unpack_from("<Q", self.buf, self.pos)
        self.pos += 8
        return v

    def skip(self, n: int, where: str, what: str) -> None:
        self.need(n, where, what)
        self.pos += n

    def string(self, where: str, decode: bool) -> Optional[str]:
        n = self.u64(f"{where} (length)")
        start = self.pos
        self.need(n, where, f"a string of length {n}")
        self.pos += n
        if not decode:  # values are stepped over, never copied
            return None
        if n > MAX_NAME_BYTES:  # keys and names are copied (here and by gguf-py): keep that small
            raise self.fail(where, f"a name of {n} bytes; this loader reads names of at most {MAX_NAME_BYTES}")
        try:
            return bytes(self.buf[start:start + n]).decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(where, f"not valid UTF-8 ({e.reason} at byte {start + e.start})") from None


def _ggml_types():
    """{type id: (name, elements per block, bytes per block)} for every type gguf-py knows."""
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - a dependency of the pack
        raise ImportError("reading .gguf files needs the gguf package (pip install gguf)") from e
    return {int(t): (t.name, int(s[0]), int(s[1])) for t, s in gguf.GGML_QUANT_SIZES.items()}


def _pad(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def check_gguf_header(path) -> GGUFLayout:
    """Walk the header of the GGUF file at ``path`` and check it against the file (module docstring).

    Returns the layout (version, alignment, data section start, tensor infos with absolute offsets
    and byte sizes). Raises :class:`GGUFFormatError`, whose message names the file and the field,
    for anything the bytes do not support. Reads only the header's pages; never allocates in
    proportion to a count the header declares.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    if size < 4:
        raise GGUFFormatError(f"{path}: not a GGUF file ({size} bytes long)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        buf = memoryview(mm)
        try:
            return _walk(_Cursor(path, buf, size))
        finally:
            buf.release()


def _walk(c: _Cursor) -> GGUFLayout:
    if bytes(c.buf[:4]) != b"GGUF":
        raise GGUFFormatError(f"{c.path}: not a GGUF file (it starts with {bytes(c.buf[:4])!r}, expected b'GGUF')")
    c.pos = 4
    version = c.u32("version")
    if version & 0xFFFF == 0 and version:
        raise GGUFFormatError(f"{c.path}: the file is in the opposite byte order to this machine "
                              "(a big-endian GGUF); convert it to little-endian")
    if version not in (2, 3):
        raise c.fail("version", f"GGUF version {version}; this loader reads versions 2 and 3")
    n_tensors = c.u64("tensor count")
    n_kv = c.u64("key-value count")
    if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > c.left:
        raise c.fail("tensor and key-value counts",
                     f"the header declares {n_tensors} tensors and {n_kv} key-value pairs, which need "
                     f"at least {n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES} bytes, but "
                     f"only {c.left} follow")
    if n_kv > MAX_KV_PAIRS:
        raise c.fail("key-value count", f"{n_kv} key-value pairs; this loader reads at most "
                                        f"{MAX_KV_PAIRS} (diffusion-model files hold a handful)")
    if n_tensors > MAX_TENSORS:
        raise c.fail("tensor count", f"{n_tensors} tensors; this loader reads at most {MAX_TENSORS} "
                                     "(a WAN 14B file holds about 1,100-1,800)")

    alignment = DEFAULT_ALIGNMENT
    keys = set()
    elements = 0
    for i in range(n_kv):
        key, where = _unique_name(c, f"key-value pair {i + 1} of {n_kv}", "key", keys, "the key appears twice")
        vtype = c.u32(f"{where}, value type")
        if key == "general.alignment":
            if vtype != 4:
                raise c.fail(where, f"general.alignment must be a UINT32, it has value type {vtype}")
            alignment = c.u32(where)
            if alignment == 0 or alignment & (alignment - 1):
                raise c.fail(where, f"alignment {alignment} is not a power of two")
            continue
        elements += _skip_value(c, vtype, where)
        if elements > MAX_ARRAY_ELEMENTS:
            raise c.fail(where, f"metadata arrays hold {elements}+ elements; this loader reads at most "
                                f"{MAX_ARRAY_ELEMENTS} (a diffusion model's metadata holds a few dozen; "
                                "large vocabularies belong to text encoders and language models)")

    types = _ggml_types()
    infos: List[Tuple[str, int, str, Tuple[int, ...], int, int]] = []
    names = set()
    for i in range(n_tensors):
        name, where = _unique_name(c, f"tensor info {i + 1} of {n_tensors}", "name", names,
                                   "two tensors have this name")
        n_dims = c.u32(f"{where}, dimension count")
        if n_dims > MAX_DIMS:
            raise c.fail(where, f"{n_dims} dimensions; gguf-py reads tensors of at most {MAX_DIMS} "
                                "(numpy's limit)")
        dims = tuple(c.u64(f"{where}, dimension {j}") for j in range(n_dims))
        type_id = c.u32(f"{where}, type")
        if type_id not in types:
            raise c.fail(where, f"unknown GGML type id {type_id}")
        type_name, per_block, block_bytes = types[type_id]
        elems = span = 1
        for d in dims:
            elems *= d
            span *= max(d, 1)  # numpy refuses such a shape even when another dimension is 0
        if span * max(block_bytes, 8) >= _INT64_LIMIT:
            raise c.fail(where, f"dimensions {list(dims)} describe more bytes than any file can hold")
        ne0 = dims[0] if dims else 1
        if ne0 % per_block:
            raise c.fail(where, f"{type_name} rows of {ne0} elements are not a multiple of its block "
                                f"size {per_block}")
        offset = c.u64(f"{where}, data offset")
        infos.append((name, type_id, type_name, dims, offset, elems // per_block * block_bytes))

    data_start = _pad(c.pos, alignment)
    expected = 0
    tensors = []
    for name, type_id, type_name, dims, offset, nbytes in infos:
        if offset != expected:
            raise c.fail(f"tensor {name!r}, data offset",
                         f"{offset}, expected {expected}: tensor data must follow one another in header "
                         f"order, each padded to the {alignment}-byte alignment")
        end = data_start + offset + nbytes
        if end > c.size:
            raise GGUFFormatError(
                f"{c.path}: truncated or corrupt GGUF file: tensor {name!r} ({type_name} {list(dims)}) "
                f"needs bytes {data_start + offset}..{end}, but the file has {c.size}. If it was "
                "downloaded, download it again.")
        tensors.append(GGUFTensorInfo(name, type_id, type_name, dims, data_start + offset, nbytes))
        expected = offset + _pad(nbytes, alignment)
    return GGUFLayout(version, alignment, data_start, c.size, n_kv, tuple(tensors))


def _unique_name(c: _Cursor, where: str, field: str, seen: set, twice: str) -> Tuple[str, str]:
    """Read the string that names a key or a tensor; refuse one seen before. Returns it and ``where``
    with the name added, for the messages about what follows it."""
    name = c.string(f"{where}, {field}", decode=True)
    where = f"{where} ({name!r})"
    if name in seen:
        raise c.fail(where, twice)
    seen.add(name)
    return name, where


def _skip_value(c: _Cursor, vtype: int, where: str) -> int:
    """Step over one value of type ``vtype``; returns the array elements it holds (0 for scalars;
    for an array of arrays, its own elements and those of every array inside it)."""
    if vtype in _SCALARS:
        c.skip(_SCALARS[vtype][1], where, f"a {_SCALARS[vtype][0]} value")
        return 0
    if vtype == _STRING:
        c.string(where, decode=False)
        return 0
    if vtype != _ARRAY:
        raise c.fail(where, f"unknown value type {vtype}")
    # Arrays of arrays without recursion: ``open_`` holds, for every array of arrays being read, how
    # many of its elements (arrays themselves) are still to come; each loop reads one array header.
    elements = 0
    open_: List[int] = []
    while True:
        inner = f"{where}, array at depth {len(open_)}" if open_ else where
        etype = c.u32(f"{inner}, array element type")
        count = c.u64(f"{inner}, array length")
        if etype != _ARRAY and etype not in _SCALARS and etype != _STRING:
            raise c.fail(inner, f"array of unknown element type {etype}")
        # every element takes at least this many bytes (an inner array: its type and its length)
        name, item = ("ARRAY", 12) if etype == _ARRAY else _SCALARS.get(etype, ("STRING", 8))
        c.need(count * item, inner, f"an array of {count} {name} values")  # a lie about the length fails here
        if count > MAX_ARRAY_ELEMENTS:
            raise c.fail(inner, f"an array of {count} elements; this loader reads at most "
                                f"{MAX_ARRAY_ELEMENTS} (a diffusion model's metadata holds a few dozen)")
        elements += count
        if elements > MAX_ARRAY_ELEMENTS:
            raise c.fail(where, f"metadata arrays hold {elements}+ elements; this loader reads at most "
                                f"{MAX_ARRAY_ELEMENTS} (a diffusion model's metadata holds a few dozen; "
                                "large vocabularies belong to text encoders and language models)")
        if etype == _ARRAY:
            if len(open_) + 1 >= MAX_ARRAY_DEPTH:
                raise c.fail(where, f"arrays of arrays nested more than {MAX_ARRAY_DEPTH} deep; this loader "
                                    f"reads at most {MAX_ARRAY_DEPTH} levels (gguf-py reads each level "
                                    "with one recursive call)")
            if count:
                open_.append(count)
                continue  # its first element is an array: its header comes next
        elif etype == _STRING:
            for j in range(count):
                c.string(f"{inner}, element {j}", decode=False)
        else:
            c.skip(count * item, inner, f"an array of {count} {name} values")
        # this array is complete, and with it one element of the array holding it
        while open_:
            open_[-1] -= 1
            if open_[-1]:
                break
            open_.pop()
        if not open_:
            return elements
