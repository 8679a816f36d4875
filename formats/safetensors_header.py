"""Read and check the header of a ``.safetensors`` file: every rule the reference reader applies.

Pure Python; no torch, no ComfyUI.

Layout: an 8-byte little-endian header length ``n``, ``n`` bytes of UTF-8 JSON, then the data
section. The JSON maps tensor names to ``{"dtype", "shape", "data_offsets": [start, end]}`` (offsets
relative to the data section) and may hold ``"__metadata__"``, a map of strings to strings.

Rules, and why each may refuse a file: the writers of the files people load (the ``safetensors``
library, which ComfyUI's save nodes, kijai's and Comfy-Org's fp8 files and diffusers all go through;
ComfyUI reads them with it too) never produce what they refuse.

* The header length fits the file and the library's 100 MB limit; the JSON is a UTF-8 object; shapes
  are lists of integers >= 0, offsets two integers (no floats, no booleans); ``__metadata__`` maps
  strings to strings; a tensor's byte range holds exactly shape x element size bytes; sorted by
  offset, the byte ranges tile the data section: the first starts at 0, each starts where the one
  before ends (no overlap, no gap) and the last ends at the end of the file. These are the
  library's own checks: a file refused here is refused by ComfyUI's loader too. (The library pads
  the header with spaces to a multiple of 8 bytes: JSON whitespace, accepted.)
* A tensor name appears only once and no field repeats within an entry: beyond the library (its
  JSON parser keeps the last of two equal names), but no writer can produce either, since every one
  serialises a map; such a header was edited or damaged.
* The dtype is one the caller reads (``dtype_sizes``; for the loaders: every whole-byte dtype the
  library reads into torch, see ``weight_files``).

Bounds: the JSON text is parsed only after counting its structure outside strings, so a header of
millions of tiny values (a few bytes each in the file, tens of bytes each as Python objects) is an
error before it costs memory (``MAX_HEADER_VALUES``, 17 times a WAN 14B header's); every size is a
Python integer checked against the file's real size.
"""
from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from typing import Dict, List, Mapping, Tuple

__all__ = ["SafetensorsHeaderError", "SafetensorsTensor", "read_safetensors_header", "MAX_HEADER_BYTES",
           "MAX_HEADER_VALUES"]

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
# JSON values outside strings (a WAN 14B header has about 15,000; metadata strings do not count)
MAX_HEADER_VALUES = 262_144
_USIZE = 2 ** 64
_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


class SafetensorsHeaderError(ValueError):
    """A safetensors file whose header cannot be trusted; the message names the file and the field."""


@dataclass(frozen=True)
class SafetensorsTensor:
    name: str
    dtype: str
    shape: Tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


def _no_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate(key)
        out[key] = value
    return out


class _Duplicate(Exception):
    def __init__(self, key):
        super().__init__(key)
        self.key = key


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_safetensors_header(path, dtype_sizes: Mapping[str, int]
                            ) -> Tuple[List[SafetensorsTensor], Dict[str, str]]:
    """``(tensors in file order, metadata)`` of the safetensors file at ``path``, checked against the
    file (module docstring). ``dtype_sizes``: the dtype names the caller reads and their element
    sizes in bytes; any other dtype is an error naming it. Raises :class:`SafetensorsHeaderError`."""
    path = os.fspath(path)
    size = os.path.getsize(path)

    def fail(what: str) -> SafetensorsHeaderError:
        return SafetensorsHeaderError(f"{path}: {what}")

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise fail(f"{size} bytes long: not a safetensors file (empty or truncated)")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise fail(f"not a safetensors file, or a corrupt one (its header length field says {n} bytes; "
                       f"the file has {size})")
        raw = f.read(n)
    values = raw.count(b",") + raw.count(b"[") + raw.count(b"{") + 1
    if values > MAX_HEADER_VALUES:  # cheap upper bound first; strings only make it larger
        values = len(re.findall(rb"[,\[{]", _STRINGS.sub(b"", raw))) + 1
        if values > MAX_HEADER_VALUES:
            raise fail(f"corrupt safetensors header: about {values} JSON values; this loader reads at most "
                       f"{MAX_HEADER_VALUES} (a WAN 14B header holds about 15,000)")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as e:
        raise fail(f"corrupt safetensors header: not UTF-8 ({e.reason} at header byte {e.start})") from None
    except _Duplicate as e:
        raise fail(f"corrupt safetensors header: the name {e.key!r} appears twice in one JSON object") from None
    except RecursionError:
        raise fail("corrupt safetensors header: JSON nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, or an integer of more digits than Python converts
        raise fail(f"corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise fail(f"corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise fail("corrupt safetensors header: __metadata__ must map names to strings")

    data_start = 8 + n
    data_size = size - data_start
    tensors: List[SafetensorsTensor] = []
    ranges: List[Tuple[int, int, str]] = []
    for name, spec in header.items():
        if not isinstance(spec, dict) or not {"dtype", "shape", "data_offsets"} <= spec.keys():
            raise fail(f"corrupt safetensors header entry for {name!r}: needs dtype, shape and data_offsets")
        dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
        if dtype not in dtype_sizes:
            raise fail(f"tensor {name!r} has dtype {dtype}, which a diffusion model loader does not read "
                       f"(readable: {', '.join(dtype_sizes)})")
        if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d < _USIZE for d in shape):
            raise fail(f"corrupt safetensors header: tensor {name!r} has shape {_short(shape)}; a shape is "
                       "a list of integers >= 0")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(_is_int(o) and 0 <= o < _USIZE for o in offsets)):
            raise fail(f"corrupt safetensors header: tensor {name!r} has data_offsets {_short(offsets)}; "
                       "they are two integers >= 0")
        start, end = offsets
        if end < start:
            raise fail(f"corrupt safetensors header: tensor {name!r} byte range [{start}, {end}] ends before "
                       "it starts")
        elements = 1
        for d in shape:
            elements *= d
            if elements >= _USIZE:  # the reference computes in 64 bits and fails on overflow
                raise fail(f"corrupt safetensors header: tensor {name!r} shape {_short(shape)} has more "
                           "elements than any file can hold")
        need = elements * dtype_sizes[dtype]
        if end - start != need:
            raise fail(f"corrupt safetensors header: tensor {name!r} {dtype} {_short(shape)} needs {need} "
                       f"bytes, its byte range [{start}, {end}] holds {end - start}")
        tensors.append(SafetensorsTensor(name, dtype, tuple(shape), data_start + start, need))
        ranges.append((start, end, name))

    expected, previous = 0, None
    for start, end, name in sorted(ranges):
        if start != expected:
            what = (f"overlaps {previous!r} (which ends at data byte {expected})" if start < expected else
                    f"leaves a gap of {start - expected} bytes after "
                    + (repr(previous) if previous else "the header"))
            raise fail(f"corrupt safetensors header: tensor {name!r} starts at data byte {start} and {what}; "
                       "tensor byte ranges must follow one another without gaps or overlaps")
        expected, previous = end, name
    if expected > data_size:  # consistent ranges that the file does not reach: cut short
        last = next(r for r in sorted(ranges) if r[1] > data_size)
        raise fail(f"truncated file: tensor {last[2]!r} needs bytes up to {data_start + last[1]}, the file "
                   f"has {size}. Download it again.")
    if expected < data_size:
        raise fail(f"corrupt safetensors file: {data_size - expected} bytes follow the last tensor's data "
                   "(the format allows none; the file may be damaged or two files joined)")
    return tensors, metadata


def _short(value, limit: int = 80) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "...]"
