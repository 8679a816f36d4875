"""Dequantize GGUF tensor data with plain torch, on the device the quantized bytes are on.

Block swap streams GGUF weights to the GPU as stored (quantized), so they must be expanded there:
``dequantize(raw, qtype, shape)`` takes the raw bytes of one tensor as a uint8 torch tensor, on any
device, and returns the float tensor on that same device. Every type is vectorised over blocks (a
handful of elementwise kernels per chunk of blocks, no Python loop over blocks; chunks are 2**20
elements on the CPU, to stay in cache, and 2**24 on a GPU, to bound transient memory, written
straight into the output), uses only ops that have CPU and CUDA kernels (uint8 shifts/masks, dtype
views, float32 arithmetic), never synchronises with the host, and needs neither numpy nor ComfyUI.
The result never aliases ``raw``; the host byte order is assumed little-endian (x86, Arm, GPUs).

Types (``SUPPORTED``): F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.

Layout facts relied on (GGML block format; all multi-byte fields little-endian, fp16 = IEEE half):

* A tensor of torch shape ``(..., n)`` (GGUF lists the dims reversed) is stored row-major; the last
  dim is cut into blocks of ``block_size(qtype)[0]`` elements, each stored in
  ``block_size(qtype)[1]`` bytes, blocks back to back with no padding between rows. So the bytes
  are simply ``numel / elements_per_block`` consecutive blocks in element order.
* Legacy types, 32 elements per block. ``qs`` holds 4-bit codes: byte ``j`` (0..15) carries element
  ``j`` in its low nibble and element ``j + 16`` in its high nibble. ``qh`` (Q5_*) is a 32-bit word
  whose bit ``i`` is the fifth bit of element ``i`` (bit ``i % 8`` of byte ``i // 8``).

  ====== ===== ================================================ =============================
  type   bytes fields (byte offsets)                              value
  ====== ===== ================================================ =============================
  Q8_0   34    d f16 [0:2], qs int8 [2:34]                       d * q
  Q4_0   18    d [0:2], qs [2:18]                                 d * (q - 8)
  Q4_1   20    d [0:2], m [2:4], qs [4:20]                        d * q + m
  Q5_0   22    d [0:2], qh [2:6], qs [6:22]                       d * (q - 16), q = lo | hi << 4
  Q5_1   24    d [0:2], m [2:4], qh [4:8], qs [8:24]              d * q + m
  ====== ===== ================================================ =============================

* K-quants, 256 elements per super-block (QK_K):

  - Q2_K, 84 B: ``scales[0:16]`` (sub-block ``s`` of 16 elements: scale = low nibble, min = high
    nibble), ``qs[16:80]``, ``d`` f16 [80:82], ``dmin`` f16 [82:84]. Element ``128*h + 32*j + l``
    (h < 2, j < 4, l < 32) is bits ``2j..2j+1`` of ``qs[32*h + l]``.
    value = (d * scale_s) * q - (dmin * min_s).
  - Q3_K, 110 B: ``hmask[0:32]``, ``qs[32:96]``, ``scales[96:108]``, ``d`` f16 [108:110]. The low
    2 bits are laid out as in Q2_K; the third bit of element ``32*b + l`` is bit ``b`` of
    ``hmask[l]``; q = (low | high << 2) - 4 (a set high bit means no -4 offset). The 16 6-bit
    scales: low 4 bits of scale ``i`` = nibble ``i // 8`` of byte ``i % 8``, high 2 bits = bits
    ``2*(i // 4)..+1`` of byte ``8 + i % 4``; scale is stored + 32. value = (d * (sc - 32)) * q.
  - Q4_K, 144 B: ``d`` f16 [0:2], ``dmin`` f16 [2:4], ``scales[4:16]``, ``qs[16:144]``. 8
    sub-blocks of 32 with a 6-bit scale and min each, packed in the 12 bytes as a = [0:4],
    b = [4:8], c = [8:12]: for s < 4 scale = a & 63, min = b & 63; for s >= 4 (k = s - 4)
    scale = (c_k & 15) | (a_k >> 6) << 4, min = (c_k >> 4) | (b_k >> 6) << 4. Element
    ``64*c + 32*h + l`` is nibble ``h`` of ``qs[32*c + l]``.
    value = (d * scale_s) * q - (dmin * min_s).
  - Q5_K, 176 B: as Q4_K with ``qh[16:48]`` then ``qs[48:176]``; the fifth bit of element
    ``32*b + l`` is bit ``b`` of ``qh[l]``.
  - Q6_K, 210 B: ``ql[0:128]``, ``qh[128:192]``, ``scales`` int8 [192:208] (16 sub-blocks of 16),
    ``d`` f16 [208:210]. Element ``128*h + 64*k + m`` (m < 64) takes nibble ``k`` of
    ``ql[64*h + m]``; element ``128*h + 32*j + l`` takes bits ``2j..2j+1`` of ``qh[32*h + l]`` as
    bits 4-5. value = (d * scale_s) * (q - 32).

Arithmetic: fp16 scales are widened to float32 and every product/sum is a separate float32 op in the
order shown above (no fused multiply-add), which is how gguf-py's reference computes them, so the
float32 results are bit-identical to ``gguf.quants.dequantize`` and identical across CPU and CUDA.
Other output dtypes are a final rounding of that float32 result (F16/BF16 tensors convert directly,
which is the same rounding since the widening is exact).
"""
from __future__ import annotations

from typing import Sequence

import torch


class GGUFFormatError(ValueError):
    """Raw GGUF tensor data that does not match its declared type or shape, or an unsupported type."""


SUPPORTED: tuple[str, ...] = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                              "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

_QK_K = 256
# (elements per block, bytes per block)
_SIZES: dict[str, tuple[int, int]] = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2),
    "Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24),
    "Q2_K": (_QK_K, 84), "Q3_K": (_QK_K, 110), "Q4_K": (_QK_K, 144), "Q5_K": (_QK_K, 176),
    "Q6_K": (_QK_K, 210),
}
# GGML type ids (ggml_type / gguf.GGMLQuantizationType values), so plain ints are accepted too.
_GGML_IDS = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0",
             10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 30: "BF16"}


def _unsupported(what) -> GGUFFormatError:
    return GGUFFormatError(f"unsupported GGUF tensor type {what!r}; supported: {', '.join(SUPPORTED)}")


def _type_name(qtype) -> str:
    """Normalise a type name, a gguf.GGMLQuantizationType member (its ``.name``) or a GGML id."""
    name = getattr(qtype, "name", None)
    if isinstance(name, str):
        key = name
    elif isinstance(qtype, str):
        key = qtype
    elif isinstance(qtype, int) and not isinstance(qtype, bool):
        if qtype not in _GGML_IDS:
            raise _unsupported(qtype)
        return _GGML_IDS[qtype]
    else:
        raise _unsupported(qtype)
    key = key.strip().upper()
    if key not in _SIZES:
        raise _unsupported(name if isinstance(name, str) else qtype)
    return key


def check_shape(shape) -> tuple[int, ...]:
    """``shape`` as a tuple of non-negative ints, or GGUFFormatError."""
    try:
        dims = tuple(int(s) for s in shape)
    except TypeError as e:
        raise GGUFFormatError(f"shape must be a sequence of ints, got {shape!r}") from e
    if any(s < 0 for s in dims):
        raise GGUFFormatError(f"shape has a negative dimension: {dims}")
    return dims


def block_size(qtype) -> tuple[int, int]:
    """(elements per block, bytes per block) of a GGUF type; (1, itemsize) for F32/F16/BF16."""
    return _SIZES[_type_name(qtype)]


def _layout(qtype, shape) -> tuple[str, tuple[int, ...], int, int]:
    name, dims = _type_name(qtype), check_shape(shape)
    per_block, nbytes = _SIZES[name]
    last = dims[-1] if dims else 1
    if last % per_block:
        raise GGUFFormatError(f"{name} tensor of shape {dims}: the last dim ({last}) must be a multiple of "
                              f"the {name} block size ({per_block} elements)")
    numel = 1
    for s in dims:
        numel *= s
    n_blocks = numel // per_block
    return name, dims, n_blocks, n_blocks * nbytes


def raw_nbytes(qtype, shape: Sequence[int]) -> int:
    """Bytes that a tensor of ``shape`` (torch order, last dim quantized) takes in type ``qtype``."""
    return _layout(qtype, shape)[3]


def check_raw(raw: torch.Tensor, qtype, shape: Sequence[int]) -> None:
    """Raise GGUFFormatError unless ``raw`` is a uint8 tensor holding exactly the bytes of ``shape``."""
    _check(raw, qtype, shape)


def _check(raw, qtype, shape):
    name, dims, n_blocks, need = _layout(qtype, shape)
    if not isinstance(raw, torch.Tensor):
        raise GGUFFormatError(f"raw GGUF data must be a torch.Tensor of uint8, got {type(raw).__name__}")
    if raw.dtype != torch.uint8:
        raise GGUFFormatError(f"raw GGUF data must be uint8 bytes, got dtype {raw.dtype}")
    if raw.numel() != need:
        per_block, nbytes = _SIZES[name]
        raise GGUFFormatError(f"{name} tensor of shape {dims} needs {need} bytes ({n_blocks} blocks of "
                              f"{per_block} elements x {nbytes} bytes), got {raw.numel()} bytes")
    return name, dims, n_blocks


# ---------------------------------------------------------------------------------------------
# helpers (all on the device of their input; no host round trips)

def _view(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret contiguous bytes as ``dtype``; copies first when the start is misaligned."""
    try:
        return x.view(dtype)
    except RuntimeError:
        return x.clone().view(dtype)


def _f16(blocks: torch.Tensor, off: int) -> torch.Tensor:
    """The fp16 field at byte ``off`` of every block, widened to float32: shape (n_blocks, 1)."""
    return blocks[:, off:off + 2].contiguous().view(torch.float16).float()


def _fields(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Split every byte of ``x`` (..., L) into its 8/bits bit fields, lowest first: (..., 8/bits, L)."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=x.device).view(-1, 1)
    return (x.unsqueeze(-2) >> shifts) & ((1 << bits) - 1)


def _nibbles(x: torch.Tensor) -> torch.Tensor:
    """(..., k, L) bytes -> (..., k, 2, L): low nibble, then high nibble."""
    return torch.stack((x & 0x0F, x >> 4), dim=-2)


# ---------------------------------------------------------------------------------------------
# legacy 32-element blocks

def _q8_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b, 0)
    return b[:, 2:].view(torch.int8).float().mul_(d)


def _q4_codes(qs: torch.Tensor) -> torch.Tensor:
    return _nibbles(qs).reshape(qs.shape[0], 32)            # j -> low nibble, j + 16 -> high


def _q5_codes(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    bit = torch.arange(8, dtype=torch.uint8, device=qh.device)
    high = ((qh.unsqueeze(-1) >> bit) & 1).reshape(qs.shape[0], 32)   # bit i of the LE word
    return _q4_codes(qs) | (high << 4)


def _q4_0(b):
    return _q4_codes(b[:, 2:18]).float().sub_(8).mul_(_f16(b, 0))


def _q4_1(b):
    return _q4_codes(b[:, 4:20]).float().mul_(_f16(b, 0)).add_(_f16(b, 2))


def _q5_0(b):
    return _q5_codes(b[:, 2:6], b[:, 6:22]).float().sub_(16).mul_(_f16(b, 0))


def _q5_1(b):
    return _q5_codes(b[:, 4:8], b[:, 8:24]).float().mul_(_f16(b, 0)).add_(_f16(b, 2))


# ---------------------------------------------------------------------------------------------
# K-quants: 256-element super-blocks

def _q2_k(b):
    n = b.shape[0]
    sc = b[:, 0:16]
    d, dmin = _f16(b, 80), _f16(b, 82)
    dl = (sc & 0x0F).float().mul_(d).unsqueeze(-1)          # (n, 16, 1)
    ml = (sc >> 4).float().mul_(dmin).unsqueeze(-1)
    q = _fields(b[:, 16:80].reshape(n, 2, 32), 2)            # (n, 2, 4, 32)
    return q.reshape(n, 16, 16).float().mul_(dl).sub_(ml).reshape(n, _QK_K)


def _q3_k(b):
    n = b.shape[0]
    sc = b[:, 96:108]
    low = _nibbles(sc[:, 0:8]).reshape(n, 16)                # scale i: nibble i // 8 of byte i % 8
    high = _fields(sc[:, 8:12], 2).reshape(n, 16)            # bits 2*(i // 4) of byte 8 + i % 4
    dl = (low | (high << 4)).float().sub_(32).mul_(_f16(b, 108)).unsqueeze(-1)
    ql = _fields(b[:, 32:96].reshape(n, 2, 32), 2).reshape(n, 16, 16)
    qh = _fields(b[:, 0:32], 1).reshape(n, 16, 16)
    return (ql | (qh << 2)).float().sub_(4).mul_(dl).reshape(n, _QK_K)


def _k_scale_min(sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 6-bit scales and mins packed in the 12 scale bytes of Q4_K / Q5_K."""
    a, m, c = sc[:, 0:4], sc[:, 4:8], sc[:, 8:12]
    scale = torch.cat((a & 0x3F, (c & 0x0F) | ((a >> 2) & 0x30)), dim=1)
    mins = torch.cat((m & 0x3F, (c >> 4) | ((m >> 2) & 0x30)), dim=1)
    return scale, mins


def _k_affine(b, q: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scale, mins = _k_scale_min(b[:, 4:16])
    dl = scale.float().mul_(_f16(b, 0)).unsqueeze(-1)        # (n, 8, 1)
    ml = mins.float().mul_(_f16(b, 2)).unsqueeze(-1)
    return q.float().mul_(dl).sub_(ml).reshape(n, _QK_K)


def _q4_k(b):
    n = b.shape[0]
    return _k_affine(b, _nibbles(b[:, 16:144].reshape(n, 4, 32)).reshape(n, 8, 32))


def _q5_k(b):
    n = b.shape[0]
    ql = _nibbles(b[:, 48:176].reshape(n, 4, 32)).reshape(n, 8, 32)
    qh = _fields(b[:, 16:48], 1)                             # (n, 8, 32)
    return _k_affine(b, ql | (qh << 4))


def _q6_k(b):
    n = b.shape[0]
    ql = _nibbles(b[:, 0:128].reshape(n, 2, 64)).reshape(n, 16, 16)
    qh = _fields(b[:, 128:192].reshape(n, 2, 32), 2).reshape(n, 16, 16)
    dl = b[:, 192:208].view(torch.int8).float().mul_(_f16(b, 208)).unsqueeze(-1)
    return (ql | (qh << 4)).float().sub_(32).mul_(dl).reshape(n, _QK_K)


# Blocks are expanded in chunks of about this many elements, written into the output as they are
# done: on the CPU a chunk's temporaries stay in cache and no tensor-sized float32 intermediate is
# allocated (fresh large allocations are page-faulted in, which dominated the time); on a GPU the
# chunk bounds the transient memory next to the output (~5 bytes per element of the chunk).
CPU_CHUNK_ELEMS = 1 << 20
DEVICE_CHUNK_ELEMS = 1 << 24


def _chunk_elems(device: torch.device) -> int:
    return CPU_CHUNK_ELEMS if device.type == "cpu" else DEVICE_CHUNK_ELEMS


_DEQUANT = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1,
            "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}
_FLOAT = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def dequantize(raw: torch.Tensor, qtype, shape: Sequence[int],
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Expand the GGUF bytes ``raw`` of a ``qtype`` tensor into a ``dtype`` tensor of ``shape``.

    ``raw``: uint8 tensor of exactly ``raw_nbytes(qtype, shape)`` bytes, any shape (read as flat,
    row-major bytes), on any device. ``qtype``: a name ("Q4_K"), a gguf.GGMLQuantizationType member
    or its int id. ``shape``: torch order (last dim = the quantized one, GGUF's ``ne`` reversed).
    Returns a new tensor (never a view of ``raw``) on ``raw.device``. Raises GGUFFormatError for an
    unsupported type or data that does not fit the type and shape.
    """
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    name, dims, n_blocks = _check(raw, qtype, shape)
    if type(raw) is not torch.Tensor:                        # e.g. a GGML tensor subclass or a Parameter
        raw = raw.as_subclass(torch.Tensor)
    flat = raw.detach().reshape(-1)
    if n_blocks == 0:
        return torch.empty(dims, dtype=dtype, device=raw.device)
    if name in _FLOAT:
        return _view(flat, _FLOAT[name]).reshape(dims).to(dtype, copy=True)
    per_block, nbytes = _SIZES[name]
    blocks, fn = flat.view(n_blocks, nbytes), _DEQUANT[name]
    step = max(1, _chunk_elems(raw.device) // per_block)
    if n_blocks <= step and dtype == torch.float32:
        return fn(blocks).reshape(dims)
    out = torch.empty((n_blocks, per_block), dtype=dtype, device=raw.device)
    for start in range(0, n_blocks, step):                   # a few large chunks, not blocks
        out[start:start + step].copy_(fn(blocks[start:start + step]))
    return out.reshape(dims)
