"""Tiny valid WAN weight files in every form the pack's loaders read, and seeded damaged copies of them.

Forms (``FORMS``): safetensors bf16; safetensors with fp8 block matrices; ComfyUI's older fp8_scaled
format (fp8 + ``scale_weight`` + ``scaled_fp8``); its newer mixed-precision format (fp8 +
``weight_scale`` + ``comfy_quant``; both load through ComfyUI's own conversion); GGUF laid out as
the WAN GGUF files in circulation (``gguf_reader.write_tiny_gguf``: ComfyUI-GGUF's convert.py +
llama-quantize + fix_5d_tensors.py; no key prefix, block matrices quantized, 1-D weights and
``.modulation`` F32, other matrices BF16, the 5-D ``patch_embedding.weight`` a true 5-D F32 tensor
after ``patch_embedding.bias``) in Q8_0 and in the Q4_K_M mix (Q4_K and Q6_K, dim 256 so that the
rows are whole K-quant blocks); and convert.py's other layout, tensors rearranged into rows of 256
with ``comfy.gguf.orig_shape`` arrays (Q8_0). ``write_form`` also writes ``gguf_f16`` (convert.py's
own F16 output), which is not fuzzed: its header has the Q8_0 form's structure. One WAN block, dim
128 (256 for Q4_K_M), text_dim 4096: the smallest model ComfyUI's own detection recognises.

:func:`mutants` makes the damaged copies, deterministically (``random.Random`` seeded by the form's
name): truncation at every structural boundary (and one byte either side), bytes appended, bit flips
and byte runs (mostly in the header, some in the data), every length and count field of the header
set to 2**31, 2**32, 2**61, 2**62 and 2**64 - 1, data offsets past the end, and, for safetensors,
rewritten headers (huge, negative, float and string dimensions, reversed, overlapping, shifted and
swapped byte ranges, duplicate names and fields, other dtypes, bad metadata, nesting and value
bombs); for the rearranged GGUF layout its ``orig_shape`` metadata only (fields, elements, cuts and
flips in the key-value section). The structure (where each field is) comes from the original file,
parsed by the reference readers (``json`` for safetensors, gguf-py for GGUF): never by the code under test.
"""
from __future__ import annotations

import json
import random
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import torch

from wan22_blockswap import tiny_wan
from wan22_blockswap.formats.gguf_reader import write_tiny_gguf

FORMS = ("st_bf16", "st_fp8", "st_fp8_scaled", "st_comfy_quant", "gguf_q8_0", "gguf_q4_k_m", "gguf_q8_0_orig_shape")
BIG = (2 ** 31, 2 ** 32, 2 ** 61, 2 ** 62, 2 ** 64 - 1)


@dataclass(frozen=True)
class Mutant:
    name: str  # what was done, e.g. "flip header byte 37 bit 2"
    data: bytes


def tiny_state_dict(seed: int = 0, dim: int = 128) -> Dict[str, torch.Tensor]:
    cfg = tiny_wan.tiny_config("t2v", dim=dim, num_heads=dim // 128, ffn_dim=2 * dim, num_layers=1, text_dim=4096)
    return tiny_wan.WanModel(cfg).init_weights(seed).state_dict()


def _block_matrix(key: str, t: torch.Tensor) -> bool:
    return t.ndim == 2 and key.startswith("blocks.") and key.endswith(".weight")


def write_form(form: str, path) -> Path:
    """Write the tiny model in ``form`` to ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    sd = tiny_state_dict()
    if form.startswith("st_"):
        out: Dict[str, torch.Tensor] = {}
        metadata = {"format": "pt"}
        for k, v in sd.items():
            if form == "st_bf16" or not _block_matrix(k, v):
                out[k] = v.to(torch.bfloat16)
            elif form == "st_fp8":
                out[k] = v.to(torch.float8_e4m3fn)
            else:  # the fp8_scaled forms: per-tensor scale, not a power of two (as real files have)
                scale = (v.abs().max() / 448.0).float()
                out[k] = (v / scale).to(torch.float8_e4m3fn)
                if form == "st_fp8_scaled":
                    out[k[:-len("weight")] + "scale_weight"] = scale.reshape(1)
                else:
                    out[k[:-len("weight")] + "weight_scale"] = scale
                    conf = json.dumps({"format": "float8_e4m3fn"}).encode()
                    out[k[:-len("weight")] + "comfy_quant"] = torch.tensor(list(conf), dtype=torch.uint8)
        if form == "st_fp8_scaled":
            out["scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
        save_file({k: v.contiguous() for k, v in out.items()}, str(path), metadata=metadata)
        return path
    if form == "gguf_f16":  # convert.py's own output (from an fp16 checkpoint), 5-D tensor added back
        write_tiny_gguf(str(path), sd, quant="F16", float_type="F16")
    elif form == "gguf_q8_0":
        write_tiny_gguf(str(path), sd, quant="Q8_0")
    elif form == "gguf_q4_k_m":
        write_tiny_gguf(str(path), tiny_state_dict(dim=256), quant="Q4_K_M")
    elif form == "gguf_q8_0_orig_shape":
        write_tiny_gguf(str(path), sd, quant="Q8_0", shape_fix=True)
    else:
        raise ValueError(f"unknown form {form!r}")
    return path


# ---------------------------------------------------------------------------------------------
# structure of the original, from the reference readers

@dataclass(frozen=True)
class Layout:
    header_end: int  # first byte after the header (safetensors: 8 + n; GGUF: the data section start)
    boundaries: Tuple[int, ...]  # offsets where a structure starts or ends
    fields: Tuple[Tuple[str, int, int], ...]  # (name, offset, width in bytes) of numeric header fields
    tensor_fields: Tuple[Tuple[str, int, int], ...] = ()  # the same, of the GGUF tensor infos


def _safetensors_layout(data: bytes) -> Layout:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    bounds = {0, 1, 4, 7, 8, 9, 8 + n // 2, 8 + n - 1, 8 + n, len(data) - 1}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        start, end = (8 + n + o for o in spec["data_offsets"])
        bounds |= {start, start + 1, end - 1, end}
        pos = data.find(json.dumps(name).encode(), 8, 8 + n)  # the entry's place in the JSON text
        bounds |= {pos, pos + 1}
    return Layout(8 + n, tuple(sorted(b for b in bounds if 0 <= b < len(data))), (("header length", 0, 8),))


def _gguf_layout(path) -> Layout:
    import gguf

    reader = gguf.GGUFReader(str(path))
    base = reader.data.ctypes.data

    def at(part) -> int:
        return int(part.ctypes.data - base)

    fields: List[Tuple[str, int, int]] = [("version", 4, 4), ("tensor count", 8, 8), ("kv count", 16, 8)]
    bounds = {0, 2, 4, 8, 16, 24, reader.data_offset, len(reader.data) - 1}
    for name, f in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        bounds |= {f.offset, f.offset + 1}
        fields.append((f"{name}: key length", at(f.parts[0]), 8))
        fields.append((f"{name}: value type", at(f.parts[2]), 4))
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            fields.append((f"{name}: element type", at(f.parts[3]), 4))
            fields.append((f"{name}: array length", at(f.parts[4]), 8))
        elif f.types[0] == gguf.GGUFValueType.STRING:
            fields.append((f"{name}: string length", at(f.parts[3]), 8))
    tensor_fields: List[Tuple[str, int, int]] = []
    for t in reader.tensors:
        name_len, _name, n_dims, dims, dtype, offset = t.field.parts
        bounds |= {t.field.offset, t.field.offset + 1, t.data_offset, t.data_offset + t.n_bytes}
        tensor_fields += [(f"{t.name}: name length", at(name_len), 8), (f"{t.name}: dimension count", at(n_dims), 4),
                          (f"{t.name}: type", at(dtype), 4), (f"{t.name}: data offset", at(offset), 8)]
        tensor_fields += [(f"{t.name}: dimension {j}", at(dims) + 8 * j, 8) for j in range(len(dims))]
    size = len(reader.data)
    return Layout(reader.data_offset, tuple(sorted(b for b in bounds if 0 <= b < size)), tuple(fields),
                  tuple(tensor_fields))


# ---------------------------------------------------------------------------------------------
# the mutations

def _set(data: bytes, pos: int, width: int, value: int) -> bytes:
    value &= (1 << (8 * width)) - 1
    return data[:pos] + value.to_bytes(width, "little") + data[pos + width:]


def _byte_level(data: bytes, layout: Layout, rng: random.Random, n_header: int, n_data: int,
                tail: bytes = b"") -> Iterator[Mutant]:
    """Truncations, appended bytes, bit flips and byte runs of ``data``; with ``tail``, ``data`` is
    the first part of the file and ``tail`` the rest: only the first part is damaged (cuts stay in
    it), the rest follows unchanged."""
    size, hend = len(data), layout.header_end
    cuts = set()
    for b in layout.boundaries:  # in the header also one byte either side of each boundary
        cuts |= {b - 1, b, b + 1} if b <= hend else {b}
    for cut in sorted(c for c in cuts if 0 <= c < size):
        yield Mutant(f"truncated to {cut} bytes", data[:cut])
    if not tail:
        yield Mutant("1 zero byte appended", data + b"\0")
        yield Mutant("4096 random bytes appended", data + rng.randbytes(4096))
        yield Mutant("the file appended to itself", data + data)
    for i in range(n_header + n_data):
        pos = rng.randrange(hend) if i < n_header else rng.randrange(hend, size)
        bit = rng.randrange(8)
        yield Mutant(f"bit {bit} of byte {pos} flipped",
                     data[:pos] + bytes([data[pos] ^ (1 << bit)]) + data[pos + 1:] + tail)
    for i in range(n_header // 2 + n_data // 2):
        pos = rng.randrange(hend) if i < n_header // 2 else rng.randrange(hend, size)
        length = rng.choice((1, 2, 3, 4, 8, 16, 64))
        kind = rng.choice(("zero", "ff", "random", "7f"))
        run = {"zero": b"\0" * length, "ff": b"\xff" * length, "7f": b"\x7f" * length,
               "random": rng.randbytes(length)}[kind]
        run = run[:size - pos]
        yield Mutant(f"{len(run)} {kind} bytes at {pos}", data[:pos] + run + data[pos + len(run):] + tail)


def _field_values(name: str, width: int, original: int, size: int) -> List[int]:
    values = [v for v in BIG if v < 2 ** (8 * width)] + [2 ** (8 * width) - 1, original + 1]
    if width == 8 and "offset" in name:
        values += [size, size - 1, original + 32]
    if "dimension count" in name:
        values += [0, 4, 5, 6, 65]  # around 4 (ggml's C reader's limit) and past gguf-py's 64
    return sorted(set(values) - {original})


def _gguf_fields(data: bytes, layout: Layout, rng: random.Random) -> Iterator[Mutant]:
    """Every count and length of the file header and of the key-value pairs, every field of the 5-D
    ``patch_embedding.weight`` info, and 30 of the other tensor infos' fields, set to each of
    ``_field_values``."""
    nd = tuple(f for f in layout.tensor_fields if f[0].startswith("patch_embedding.weight:"))
    rest = [f for f in layout.tensor_fields if f not in nd]
    tensor = nd + tuple(rng.sample(rest, min(30, len(rest))))
    for name, pos, width in layout.fields + tensor:
        original = int.from_bytes(data[pos:pos + width], "little")
        for value in _field_values(name, width, original, len(data)):
            yield Mutant(f"{name} set to {value}", _set(data, pos, width, value))


def _safetensors_rewrites(data: bytes, rng: random.Random) -> Iterator[Mutant]:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    body = data[8 + n:]
    names = [k for k in header if k != "__metadata__"]

    def pack(h, raw: bytes = None) -> bytes:
        text = raw if raw is not None else json.dumps(h).encode()
        return struct.pack("<Q", len(text)) + text + body

    for value in (*BIG, 2 ** 64, 2 ** 31 - 1, 0, n - 1, n + 1, len(data), len(data) - 7):
        yield Mutant(f"header length set to {value}", _set(data, 0, 8, value))
    for name in rng.sample([k for k in names if header[k]["shape"]], 6):
        for value in (*BIG, 2 ** 64, -1, 0, 1.5, "8", True, None):
            h = json.loads(data[8:8 + n])
            h[name]["shape"][0] = value
            yield Mutant(f"{name}: shape[0] = {value!r}", pack(h))
        start, end = header[name]["data_offsets"]
        for label, offsets in (("reversed", [end, start]), ("end + 1", [start, end + 1]), ("start - 1", [start - 1, end]),
                               ("past the end", [len(body) + 1, len(body) + 1 + end - start]),
                               ("2**62", [2 ** 62, 2 ** 62 + end - start]), ("negative", [-1, end]),
                               ("one number", [start]), ("floats", [float(start), float(end)])):
            h = json.loads(data[8:8 + n])
            h[name]["data_offsets"] = offsets
            yield Mutant(f"{name}: data_offsets {label}", pack(h))
    ordered = sorted(names, key=lambda k: header[k]["data_offsets"])
    for a, b in zip(ordered, ordered[1:]):  # b overlapping a's last byte, and b moved one byte later
        sa, ea = header[a]["data_offsets"]
        sb, eb = header[b]["data_offsets"]
        if rng.random() < 0.2:
            h = json.loads(data[8:8 + n])
            h[b]["data_offsets"] = [sb - 1, eb - 1]
            yield Mutant(f"{b} overlaps {a} by one byte", pack(h))
            h[b]["data_offsets"] = [sb + 1, eb + 1]
            yield Mutant(f"{b} one byte after {a} (a gap)", pack(h))
    by_size: Dict[int, List[str]] = {}
    for k in names:
        by_size.setdefault(header[k]["data_offsets"][1] - header[k]["data_offsets"][0], []).append(k)
    a, b = next(v for v in by_size.values() if len(v) >= 2)[:2]
    # two tensors of one size trade places: a consistent file, which no format can tell apart
    h = json.loads(data[8:8 + n])
    h[a]["data_offsets"], h[b]["data_offsets"] = h[b]["data_offsets"], h[a]["data_offsets"]
    yield Mutant(f"{a} and {b} trade byte ranges", pack(h))
    h = json.loads(data[8:8 + n])
    h[b]["data_offsets"] = h[a]["data_offsets"]
    yield Mutant(f"{b} shares {a}'s byte range", pack(h))
    text = data[8:8 + n].decode()
    entry = json.dumps({names[0]: header[names[0]]})[1:-1]
    yield Mutant("a tensor name twice", pack(None, ("{" + entry + "," + text[1:]).encode()))
    yield Mutant("a field twice", pack(None, re.sub(r'"dtype"\s*:', '"dtype":"F32","dtype":', text, count=1).encode()))

    def in_shape(insert: str) -> bytes:  # ``insert`` placed at the start of the first shape list
        return pack(None, re.sub(r'"shape"\s*:\s*\[', lambda m: m.group(0) + insert, text, count=1).encode())

    for dtype in ("F16", "F32", "F64", "U8", "F8_E5M2", "Q4", "", 7):
        h = json.loads(data[8:8 + n])
        h[names[-1]]["dtype"] = dtype
        yield Mutant(f"{names[-1]}: dtype {dtype!r}", pack(h))
    for label, meta in (("a number", {"format": 1}), ("a list", ["pt"]), ("a huge string", {"x": "y" * 100_000})):
        h = json.loads(data[8:8 + n])
        h["__metadata__"] = meta
        yield Mutant(f"__metadata__ {label}", pack(h))
    yield Mutant("header padded with spaces", pack(None, text.encode() + b" " * 61))
    yield Mutant("header not an object", pack(None, b"[" + text.encode() + b"]"))
    yield Mutant("header not UTF-8", pack(None, text.encode().replace(b'"', b'\xff', 1)))
    yield Mutant("shape nested 100000 deep", in_shape("[" * 100_000))
    yield Mutant("300000 zeros in a shape", in_shape("0," * 300_000))
    yield Mutant("an integer of 5000 digits", in_shape("9" * 5000 + ","))
    yield Mutant("1e400 in a shape", in_shape("1e400,"))


def _orig_shape_metadata(data: bytes, layout: Layout, path, rng: random.Random) -> Iterator[Mutant]:
    """For the rearranged layout, what only it has: the ``comfy.gguf.orig_shape`` arrays. Their key
    and array fields (three arrays) set to each of ``_field_values``, each element of one array set
    to 0, -1, 2**31 - 1 and its neighbour's value, truncation at every key-value boundary (and one
    byte either side), and bit flips inside the key-value section."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    base = reader.data.ctypes.data
    arrays = [f for name, f in reader.fields.items() if name.startswith("comfy.gguf.orig_shape.")]
    chosen = {f.name for f in rng.sample(arrays, min(3, len(arrays)))}
    for name, pos, width in layout.fields:
        if name.split(":")[0] in chosen or name in ("tensor count", "kv count"):
            original = int.from_bytes(data[pos:pos + width], "little")
            for value in _field_values(name, width, original, len(data)):
                yield Mutant(f"{name} set to {value}", _set(data, pos, width, value))
    field = next(f for f in arrays if f.name in chosen)
    elements = [int(field.parts[i].ctypes.data - base) for i in field.data]
    for j, pos in enumerate(elements):
        neighbour = int.from_bytes(data[elements[j - 1]:elements[j - 1] + 4], "little")
        for value in (0, -1, 2 ** 31 - 1, neighbour):
            yield Mutant(f"{field.name}[{j}] set to {value}", _set(data, pos, 4, value))
    kv_end = min(t.field.offset for t in reader.tensors)
    kv = Layout(kv_end, tuple(b for b in layout.boundaries if b <= kv_end), ())
    yield from _byte_level(data[:kv_end], kv, rng, n_header=40, n_data=0, tail=data[kv_end:])


def mutants(form: str, data: bytes, path) -> Iterator[Mutant]:
    """The seeded corpus for ``form``'s original bytes ``data`` (written at ``path``), one at a time
    (each is a copy of the file). The rearranged GGUF layout (``..._orig_shape``) gets the mutants
    of its own metadata only: the rest of its structure is the same as the other GGUF forms'."""
    rng = random.Random(f"wan22-blockswap fuzz {form}")
    if form.startswith("st_"):
        layout = _safetensors_layout(data)
        yield from _byte_level(data, layout, rng, n_header=110, n_data=12)
        yield from _safetensors_rewrites(data, rng)
    elif form.endswith("_orig_shape"):
        yield from _orig_shape_metadata(data, _gguf_layout(path), path, rng)
    else:
        layout = _gguf_layout(path)
        yield from _byte_level(data, layout, rng, n_header=110, n_data=12)
        yield from _gguf_fields(data, layout, rng)
