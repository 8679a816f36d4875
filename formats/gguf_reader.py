"""Read GGUF diffusion-model files into a torch state dict, memory-mapped, quantized weights kept as stored.

Pure torch plus the ``gguf`` package (gguf-py), which is imported inside the functions that need it,
so importing this module costs nothing and needs neither gguf nor ComfyUI.

* ``load_gguf_state_dict(path)`` -> ``(state_dict, info)``. F32/F16/BF16 tensors become plain torch
  tensors, quantized ones become :class:`GGUFTensor` (raw bytes + type + logical shape). Nothing is
  copied: every tensor views the file through gguf-py's ``numpy.memmap``, so the bytes are paged in
  from the page cache when something reads them (host RAM grows only as data is actually touched
  and that memory is reclaimable file cache, not anonymous memory).
* ``GGUFTensor``: a ``torch.Tensor`` subclass whose storage is the quantized bytes (uint8) and which
  carries ``tensor_type`` / ``tensor_shape`` / ``patches``; ``.dequantize()`` expands it with
  ``gguf_dequant`` on whatever device the bytes are (or are moved to).
* ``write_tiny_gguf(path, state_dict)``: writes a GGUF file laid out as the WAN GGUF files in
  circulation are (tests, benchmarks; no downloads).

gguf-py facts relied on (gguf 0.19):

* **Shape order.** GGUF stores ``ne`` fastest-varying first, so ``ReaderTensor.shape`` is the torch
  shape reversed. ``ReaderTensor.data`` is already reshaped: for F32/F16 to the torch shape, for
  every other type (BF16 included, which gguf-py reads as raw bytes) to the *byte* shape ``(...,
  bytes per row)``. The logical torch shape is therefore always taken as ``reversed(shape)``.
* **Shapes the converters write.** WAN's Conv3d ``patch_embedding.weight`` (``[dim, in_channels, 1, 2,
  2]``) is stored as a true **5-D F32** tensor: ComfyUI-GGUF's ``tools/convert.py`` sets it aside
  because ``llama-quantize`` (ggml) takes at most 4 dims, and ``tools/fix_5d_tensors.py`` adds it back
  to the quantized file with gguf-py's writer, right after ``patch_embedding.bias`` (every WAN GGUF in
  circulation has it so; gguf-py reads any number of dims up to numpy's limit). A different case is
  convert.py's rearrangement for some image architectures (SD1/SDXL, not WAN): a tensor whose last
  dim is not a multiple of 256 is stored as rows of 256 elements and its real shape recorded as the
  INT32 array ``comfy.gguf.orig_shape.<tensor name>``. That shape wins when present; since the
  reshape is a row-major reinterpretation, a quantized tensor's bytes are simply its blocks in
  element order whatever the stored shape, which is why ``GGUFTensor.dequantize`` expands the flat
  bytes and then reshapes to ``tensor_shape``.
* **Read-only memmap.** ``GGUFReader`` maps the file with ``mode='r'`` (read-only shared mapping).
  ``torch.from_numpy`` on such an array warns "The given NumPy array is not writable, and PyTorch
  does not support non-writable tensors"; that one warning is silenced here, deliberately: the
  tensors **must not be written in place** (an in-place write faults, killing the process). Everything
  in this pack reads them (the block-swap engine copies them into its own host masters; LoRA
  patches are computed out of place). ``mode='c'`` (copy-on-write) would make them writable, but a
  private writable mapping is charged in full against the commit limit on Windows and under strict
  overcommit on Linux, which would make a 14B file "use" its whole size of commit: not worth it.
  The mapping stays alive as long as any tensor from it does; the file descriptor is closed at once.
* **Errors.** gguf-py trusts every count in the header (a metadata array said to hold 2**61
  elements makes it loop until memory runs out), so :func:`gguf_header.check_gguf_header` walks the
  header against the file's real size first, and gguf-py must then find the tensors where that walk
  did. What gguf-py still raises (plain ``ValueError``/``IndexError``/...) and every check here
  becomes ``gguf_dequant.GGUFFormatError`` naming the file.
"""
from __future__ import annotations

import itertools
import math
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from .gguf_dequant import SUPPORTED, GGUFFormatError, _type_name, block_size, check_raw, check_shape, dequantize
from .gguf_header import GGUFLayout, check_gguf_header

__all__ = ["GGUFTensor", "TensorHeader", "read_headers", "load_gguf_state_dict", "write_tiny_gguf", "check_tensor_type",
           "ORIG_SHAPE_KEY", "KEY_PREFIXES"]

ORIG_SHAPE_KEY = "comfy.gguf.orig_shape.{}"
KEY_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
_FLOAT_TYPES = ("F32", "F16", "BF16")
_NOT_WRITABLE = "The given NumPy array is not writable"
_MAX_ORIG_DIMS = 8  # torch shapes of diffusion-model weights have at most 5


# ---------------------------------------------------------------------------------------------
# the quantized tensor type

# Torch functions whose result is still the whole quantized tensor (same bytes, maybe elsewhere).
_SAME_BYTES = frozenset({torch.Tensor.detach, torch.Tensor.clone, torch.Tensor.to, torch.Tensor.cpu,
                         torch.Tensor.cuda, torch.Tensor.contiguous, torch.Tensor.pin_memory,
                         torch.Tensor.data.__get__, torch.clone, torch.detach})


class GGUFTensor(torch.Tensor):
    """Quantized GGUF weight: the storage holds the raw bytes (uint8), attributes say what they are.

    Attributes: ``tensor_type`` (type name, e.g. ``"Q4_K"``), ``tensor_shape`` (logical
    ``torch.Size``, torch order) and ``patches`` (a list for LoRA-style patches attached by the
    model patcher; every tensor gets its own list, never a shared default).

    Shapes: ``.shape`` returns the *logical* shape (ComfyUI's model detection and
    ``load_state_dict``'s shape check read ``.shape``), while ``.size()``, ``torch.Tensor.size(t)``,
    ``.numel()``, ``.dtype`` (uint8), ``.stride()``, ``.nbytes`` describe the raw storage, which is
    what memory accounting and the block-swap engine's byte packing need.

    Derived tensors: ``detach``/``clone``/``to``/``cpu``/``cuda``/``contiguous``/``pin_memory`` and the
    ``.data`` getter return a ``GGUFTensor`` with the same type and shape and a *copy* of
    ``patches`` (when the result still is the whole byte tensor); every other op (slicing, views,
    arithmetic, dtype conversion) returns a plain ``torch.Tensor``, because its result is no longer
    "this quantized weight". In-place ops return the tensor itself.

    ``nn.Parameter(t, requires_grad=False)`` works and keeps the attributes: for a tensor subclass
    torch does not create a ``Parameter`` object but returns ``t.detach()`` (a ``GGUFTensor``, as
    ``detach`` is covered above, so ``p.patches`` is a copy of ``t.patches``) marked ``_is_param``, so
    ``isinstance(p, nn.Parameter)`` is true and ``type(p) is GGUFTensor``. ``requires_grad`` must be False (torch refuses gradients on uint8).
    ``param.data = other_uint8_tensor`` (how the block-swap engine moves weights between its host
    master and device slots) swaps the storage of the same Python object, so ``tensor_type``,
    ``tensor_shape`` and even the same ``patches`` list survive; ``other`` must hold the same bytes
    (the engine's views do), nothing checks that.
    """

    tensor_type: str
    tensor_shape: torch.Size
    patches: list

    @classmethod
    def wrap(cls, raw: torch.Tensor, tensor_type, shape: Sequence[int]) -> "GGUFTensor":
        """A GGUFTensor sharing ``raw``'s memory (no copy).

        ``raw``: contiguous uint8 tensor of exactly the bytes of ``shape`` in ``tensor_type`` (any
        shape: it is read as flat bytes, blocks in element order). ``tensor_type``: a name, a
        ``gguf.GGMLQuantizationType`` member or its id; must be in ``gguf_dequant.SUPPORTED``.
        ``shape``: logical shape, torch order. Raises GGUFFormatError otherwise.
        """
        name = _type_name(tensor_type)
        dims = torch.Size(check_shape(shape))
        if not isinstance(raw, torch.Tensor):
            raise GGUFFormatError(f"raw GGUF data must be a uint8 torch.Tensor, got {type(raw).__name__}")
        plain = raw.as_subclass(torch.Tensor) if type(raw) is not torch.Tensor else raw
        check_raw(plain, name, (math.prod(dims),))
        if not plain.is_contiguous():
            raise GGUFFormatError("raw GGUF data must be contiguous (it is read as flat bytes)")
        return cls._with_attrs(plain, name, dims, [])

    @classmethod
    def _with_attrs(cls, plain: torch.Tensor, tensor_type: str, tensor_shape: torch.Size,
                    patches: list) -> "GGUFTensor":
        out = torch.Tensor._make_subclass(cls, plain, False)
        out.tensor_type, out.tensor_shape, out.patches = tensor_type, tensor_shape, patches
        return out

    @property
    def shape(self) -> torch.Size:  # the logical shape; .size() stays the raw one
        shape = getattr(self, "tensor_shape", None)
        return shape if shape is not None else torch.Tensor.size(self)

    def dequantize(self, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """The weight as a plain ``dtype`` tensor of ``tensor_shape``, computed on ``device`` (default:
        where the bytes are; with another device the *quantized* bytes are copied there first, so
        only they cross the bus). ``patches`` are not applied: they are the patcher's business."""
        raw = self.as_subclass(torch.Tensor)
        if device is not None:
            raw = raw.to(device)
        dims = self.tensor_shape
        flat = dequantize(raw.reshape(-1), self.tensor_type, (math.prod(dims),), dtype)
        return flat.reshape(dims)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if kwargs is None:
            kwargs = {}
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        src = args[0] if args else None
        if (isinstance(src, GGUFTensor) and isinstance(out, torch.Tensor) and out is not src
                and func in _SAME_BYTES and out.dtype == torch.uint8
                and torch.Tensor.numel(out) == torch.Tensor.numel(src)):
            shape = getattr(src, "tensor_shape", None)
            return cls._with_attrs(out, getattr(src, "tensor_type", None),
                                   shape if shape is not None else torch.Tensor.size(src),
                                   list(getattr(src, "patches", ())))
        return out  # plain tensors (or self, for in-place ops)

    def __deepcopy__(self, memo):
        if id(self) in memo:
            return memo[id(self)]
        import copy

        with torch.no_grad():
            out = torch.Tensor._make_subclass(type(self), torch.Tensor.clone(self.as_subclass(torch.Tensor)),
                                              self.requires_grad)
        memo[id(self)] = out
        out.__dict__.update(copy.deepcopy(self.__dict__, memo))   # includes _is_param for parameters
        return out

    def __repr__(self, *, tensor_contents=None) -> str:
        shape = tuple(self.shape)
        return (f"GGUFTensor(type={getattr(self, 'tensor_type', None)}, shape={shape}, "
                f"raw_bytes={torch.Tensor.numel(self)}, device={self.device}, patches={len(getattr(self, 'patches', ()))})")


# ---------------------------------------------------------------------------------------------
# reading

def check_tensor_type(path, tensor_name: str, type_name: str) -> None:
    """Raise GGUFFormatError unless ``type_name`` is one this pack can dequantize."""
    if type_name not in SUPPORTED:
        raise GGUFFormatError(f"{path}: tensor {tensor_name!r} has type {type_name}, which cannot be "
                              f"loaded; supported types: {', '.join(SUPPORTED)}")


def _field_str(field) -> Optional[str]:
    if field is None or not field.data:
        return None
    try:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except (IndexError, UnicodeDecodeError, TypeError):
        return None


def _orig_shape(reader, gguf, tensor_name: str, path) -> Optional[Tuple[int, ...]]:
    field = reader.get_field(ORIG_SHAPE_KEY.format(tensor_name))
    if field is None:
        return None
    ints = {gguf.GGUFValueType.INT8, gguf.GGUFValueType.UINT8, gguf.GGUFValueType.INT16,
            gguf.GGUFValueType.UINT16, gguf.GGUFValueType.INT32, gguf.GGUFValueType.UINT32,
            gguf.GGUFValueType.INT64, gguf.GGUFValueType.UINT64}
    if len(field.types) != 2 or field.types[0] != gguf.GGUFValueType.ARRAY or field.types[1] not in ints:
        raise GGUFFormatError(f"{path}: metadata {ORIG_SHAPE_KEY.format(tensor_name)} must be an array of "
                              f"ints, got {[t.name for t in field.types]}")
    shape = tuple(int(field.parts[i][0]) for i in field.data)
    if not 1 <= len(shape) <= _MAX_ORIG_DIMS or min(shape) < 0:
        raise GGUFFormatError(f"{path}: metadata {ORIG_SHAPE_KEY.format(tensor_name)} must list 1 to "
                              f"{_MAX_ORIG_DIMS} dimensions >= 0, got {list(shape)[:_MAX_ORIG_DIMS + 1]}")
    return shape


def _strip_prefix(key: str) -> str:
    for prefix in KEY_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _open_reader(path: str):
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - a dependency of ComfyUI-GGUF and of the dev setup
        raise ImportError("reading .gguf files needs the gguf package (pip install gguf)") from e
    if not os.path.isfile(path):
        raise GGUFFormatError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFFormatError(f"{path}: not a GGUF file (it starts with {magic!r}, expected b'GGUF')")
    # gguf-py trusts the header's counts (a lie can make it loop until memory runs out): check them
    # against the file first
    layout = check_gguf_header(path)
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as e:  # noqa: BLE001 - gguf-py raises ValueError, IndexError, KeyError, ... on bad data
        raise GGUFFormatError(f"{path}: truncated or corrupt GGUF file ({type(e).__name__}: {e})") from e
    _same_tensors(path, layout, reader)
    return gguf, reader


def _same_tensors(path: str, layout: GGUFLayout, reader) -> None:
    """gguf-py must have read the tensors where the header check found them: two parsers that
    disagree about a file would make the check meaningless."""
    found = [(t.name, int(t.data_offset), int(t.n_bytes)) for t in reader.tensors]
    checked = [(t.name, t.offset, t.nbytes) for t in layout.tensors]
    if found != checked:
        ours, theirs = next(pair for pair in itertools.zip_longest(checked, found) if pair[0] != pair[1])
        raise GGUFFormatError(f"{path}: corrupt GGUF file: the header reads two ways (tensor name, offset, "
                              f"bytes: {theirs} by gguf-py, {ours} by the header check)")


@dataclass(frozen=True)
class TensorHeader:
    """One tensor of a GGUF file, checked: key (prefix stripped), type name, logical torch shape,
    and gguf-py's ``ReaderTensor`` (``data_offset``, ``n_bytes``, the memmap view ``data``)."""

    key: str
    type_name: str
    shape: Tuple[int, ...]
    tensor: Any


def read_headers(path, *, expected_arch: Optional[Iterable[str]] = ("wan",)
                 ) -> Tuple[Optional[str], List[TensorHeader], int]:
    """``(architecture, headers, file size)`` of a GGUF file, reading no tensor data. Every check of
    :func:`load_gguf_state_dict` (its docstring lists them) happens here, so the pack's memory-mapped
    reader and its copying loader (``weight_files``) refuse the same files with the same messages."""
    path = os.fspath(path)
    gguf, reader = _open_reader(path)
    file_size = os.path.getsize(path)
    if reader.byte_order != "I":
        raise GGUFFormatError(f"{path}: the file is in the opposite byte order to this machine "
                              "(a big-endian GGUF); convert it to little-endian")
    arch = _field_str(reader.get_field("general.architecture"))
    if expected_arch is not None:
        allowed = (expected_arch,) if isinstance(expected_arch, str) else tuple(expected_arch)
        if arch not in allowed:
            what = f"architecture {arch!r}" if arch is not None else "no general.architecture"
            raise GGUFFormatError(f"{path}: the file has {what}; expected {' or '.join(map(repr, allowed))}")
    for t in reader.tensors:  # types and sizes of all tensors first: the cheap, decisive checks
        check_tensor_type(path, t.name, t.tensor_type.name)
        if t.data_offset + t.n_bytes > file_size:  # the header check fails first; be sure anyway
            raise GGUFFormatError(f"{path}: truncated or corrupt GGUF file (tensor {t.name!r} runs past "
                                  f"the end: needs bytes up to {t.data_offset + t.n_bytes}, file has {file_size})")
    headers: List[TensorHeader] = []
    seen = set()
    for t in reader.tensors:
        key = _strip_prefix(t.name)
        if key in seen:
            raise GGUFFormatError(f"{path}: two tensors map to the key {key!r} (prefixes stripped)")
        seen.add(key)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        orig = _orig_shape(reader, gguf, t.name, path)
        if orig is not None:
            if math.prod(orig) != math.prod(shape):
                raise GGUFFormatError(f"{path}: tensor {t.name!r} has {math.prod(shape)} elements but its "
                                      f"{ORIG_SHAPE_KEY.format(t.name)} says {orig}")
            shape = orig
        headers.append(TensorHeader(key, t.tensor_type.name, shape, t))
    return arch, headers, file_size


def load_gguf_state_dict(path, *, expected_arch: Optional[Iterable[str]] = ("wan",)
                         ) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Read a GGUF diffusion model, memory-mapped, as ``(state_dict, info)``.

    ``state_dict``: F32/F16 tensors as plain tensors, BF16 as plain ``torch.bfloat16`` tensors, every
    quantized type as :class:`GGUFTensor` (raw bytes, logical shape); shapes in torch order, with
    ``comfy.gguf.orig_shape.*`` metadata honoured; a leading ``model.diffusion_model.`` or
    ``diffusion_model.`` is stripped from keys. All tensors view the file's read-only mapping: read
    them, never write them in place (see the module docstring).
    ``info``: ``{"architecture": str, "tensor_types": {type name: count}, "file_size": bytes}``.
    ``expected_arch``: accepted ``general.architecture`` values (``None`` accepts any).

    Raises GGUFFormatError (the message names the file) for: a missing file, a file that is not
    GGUF, a truncated or corrupt file, an unexpected architecture, a tensor type that cannot be
    dequantized (naming the tensor and listing the supported types), metadata that contradicts a
    tensor, or two tensors with the same key once prefixes are stripped.
    """
    path = os.fspath(path)
    arch, headers, file_size = read_headers(path, expected_arch=expected_arch)
    types = Counter(h.type_name for h in headers)
    sd: Dict[str, torch.Tensor] = {}
    with warnings.catch_warnings():
        # read-only memmap -> non-writable tensors, on purpose (module docstring)
        warnings.filterwarnings("ignore", message=_NOT_WRITABLE, category=UserWarning)
        for h in headers:
            sd[h.key] = _to_torch(h.tensor, h.shape)
    info = {"architecture": arch, "tensor_types": dict(types), "file_size": file_size}
    return sd, info


def _to_torch(t, shape: Tuple[int, ...]) -> torch.Tensor:
    name = t.tensor_type.name
    data = torch.from_numpy(t.data)  # a view of the memmap, no copy
    if name in ("F32", "F16"):
        return data.reshape(shape)
    if name == "BF16":  # gguf-py hands BF16 over as raw bytes (..., 2 * n)
        return data.reshape(-1).view(torch.bfloat16).reshape(shape)
    return GGUFTensor.wrap(data, name, shape)


# ---------------------------------------------------------------------------------------------
# writing (tests, benchmarks)
#
# How the WAN GGUF files in circulation (city96's, QuantStack's) are made, which write_tiny_gguf
# follows (read from ComfyUI-GGUF's tools/: convert.py, lcpp.patch for llama-quantize,
# fix_5d_tensors.py):
#
# 1. convert.py reads the checkpoint with safetensors (keys come sorted by name), strips the
#    ``model.diffusion_model.`` prefix and writes with gguf-py: tensors of more than 4 dims are set
#    aside (WAN: ``patch_embedding.weight``); 1-D tensors, tensors of at most 1024 elements and
#    ``.modulation`` become F32; everything else keeps the checkpoint's precision (BF16 from a bf16
#    checkpoint, F16 otherwise). Metadata: ``general.architecture`` "wan",
#    ``general.quantization_version``, ``general.file_type``.
# 2. llama-quantize (patched) keeps that tensor order and quantizes the 2-D ``...weight`` tensors
#    outside ``patch_embedding.``, ``text_embedding.``, ``time_embedding.``, ``time_projection.``,
#    ``img_emb.``, ``head.`` and ``modulation.``, i.e. the block matrices. A K-quant needs rows of a
#    multiple of 256 elements, else the tensor falls back to F16. The Q4_K_M / Q5_K_M mixes give the
#    attention ``.v.weight`` and ``.ffn.2.weight`` matrices Q6_K.
# 3. fix_5d_tensors.py copies every tensor into a new file with gguf-py's writer (metadata: the three
#    keys above only) and inserts each set-aside tensor as a true N-D F32 tensor right after the
#    tensor whose name is its own with ``.weight`` -> ``.bias`` (``patch_embedding.bias``); one
#    without such a tensor is appended at the very end.
#
# gguf-py's writer places the tensors' data in the order their infos were added, each padded to the
# 32-byte alignment.

# ``quant`` names: a GGML type (every quantized tensor gets it, as ``llama-quantize --pure`` gives),
# or a llama-quantize mix; their general.file_type (gguf.LlamaFileType member names)
_FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0",
               "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1",
               "Q2_K": "MOSTLY_Q2_K", "Q3_K": "MOSTLY_Q3_K_S", "Q4_K": "MOSTLY_Q4_K_S",
               "Q5_K": "MOSTLY_Q5_K_S", "Q6_K": "MOSTLY_Q6_K", "Q4_K_M": "MOSTLY_Q4_K_M",
               "Q5_K_M": "MOSTLY_Q5_K_M"}
_MIXES = {"Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K"}  # mix -> base type; v and ffn.2 matrices: Q6_K
_K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
_ENCODABLE_K = ("Q4_K", "Q5_K", "Q6_K")  # gguf-py quantizes no K-quant: encoded here
_SMALL = 1024  # convert.py's QUANTIZATION_THRESHOLD: tensors this small stay F32
_ROW = 256  # convert.py's rearranged rows (shape_fix)


def _default_quantize(key: str, t: torch.Tensor) -> bool:
    return t.ndim == 2 and "blocks." in key and key.endswith("weight")


def _quant_type(quant: str, key: str) -> str:
    if quant in _MIXES:
        return "Q6_K" if key.endswith((".v.weight", ".ffn.2.weight")) else _MIXES[quant]
    return quant


def write_tiny_gguf(path, state_dict: Mapping[str, torch.Tensor], quant: str = "Q8_0", arch: str = "wan",
                    quantize: Callable[[str, torch.Tensor], bool] = _default_quantize, *,
                    float_type: str = "BF16", nd_last: bool = False, shape_fix: bool = False,
                    sort: bool = True) -> str:
    """Write ``state_dict`` as a GGUF file laid out as the WAN GGUF files in circulation; returns the path.

    The layout (see the comment above this function for where each rule comes from): tensors in
    name order (``sort=False``: in ``state_dict``'s order) and without changing their names (pass
    un-prefixed keys for a community-like file); tensors for which ``quantize(key, tensor)`` is true
    (default: 2-D weights whose key contains ``blocks.``) in ``quant`` (a GGML type name, or the
    llama-quantize mixes ``Q4_K_M`` / ``Q5_K_M``; a K-quant tensor whose rows are not a multiple of
    256 elements is F16, as llama-quantize falls back); 1-D tensors, tensors of at most 1024
    elements and ``.modulation`` in F32; every other tensor of 4 dims or fewer in ``float_type``
    (the checkpoint's precision as convert.py keeps it: "BF16", "F16" or "F32"); tensors of more
    than 4 dims as true N-D F32 tensors, each placed after the tensor named like it with ``.weight``
    -> ``.bias`` (or, with ``nd_last`` or when there is none, at the end), as ``fix_5d_tensors.py``
    does. Metadata: ``general.architecture`` = ``arch``, ``general.quantization_version``,
    ``general.file_type``.

    ``shape_fix=True``: convert.py's rearrangement for SD-like architectures (never done for WAN):
    tensors of 2-4 dims with at least 512 elements, a multiple of 256 in all, whose last dim is not,
    are stored as rows of 256 with their shape in the INT32 array ``comfy.gguf.orig_shape.<key>``.

    gguf-py quantizes Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, F16, BF16; Q4_K, Q5_K and Q6_K are encoded here
    (round to nearest with per-sub-block scales and mins: valid blocks, not llama.cpp's searched
    ones). A :class:`GGUFTensor` value is written as stored, its bytes and type unchanged (any
    type, e.g. Q2_K from existing bytes); one whose shape GGML cannot hold is stored as rows of 256
    elements with ``comfy.gguf.orig_shape.<key>``.
    """
    import gguf
    import numpy as np

    if quant not in _FILE_TYPES:
        raise ValueError(f"quant must be one of {', '.join(_FILE_TYPES)}, got {quant!r}")
    if float_type not in ("BF16", "F16", "F32"):
        raise ValueError(f"float_type must be BF16, F16 or F32, got {float_type!r}")
    path = os.fspath(path)
    keys = sorted(state_dict) if sort else list(state_dict)
    nd = [k for k in keys if not isinstance(state_dict[k], GGUFTensor) and state_dict[k].ndim > 4]
    order: List[str] = []
    for key in keys:
        if key in nd:
            continue
        order.append(key)
        twin = key.replace(".bias", ".weight")  # fix_5d_tensors.py's pairing
        if not nd_last and twin in nd and twin not in order:
            order.append(twin)
    order += [k for k in nd if k not in order]

    writer = gguf.GGUFWriter(path, arch)
    try:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_file_type(gguf.LlamaFileType[_FILE_TYPES[quant]])
        for key in order:
            t = state_dict[key]
            if isinstance(t, GGUFTensor):
                name, logical = t.tensor_type, tuple(t.tensor_shape)
                stored = _stored_shape(logical, name, shape_fix, fallback=True)
                per_block, nbytes = block_size(name)
                raw = t.as_subclass(torch.Tensor).detach().cpu().contiguous().reshape(-1).numpy()
                data = raw.reshape(stored[:-1] + (stored[-1] // per_block * nbytes,))
            else:
                logical = tuple(t.shape)
                # convert.py rearranges before llama-quantize sees the rows: their length decides
                rows = logical if len(logical) > 4 else _stored_shape(logical, "F32", shape_fix)
                name = _tensor_type(key, t, rows, quant, quantize, float_type)
                stored = logical if len(logical) > 4 else _stored_shape(logical, name, shape_fix)
                arr = t.detach().to(torch.float32).cpu().contiguous().numpy().reshape(stored)
                data = _encode(arr, name, gguf, np)
            writer.add_tensor(key, data, raw_dtype=gguf.GGMLQuantizationType[name])
            if stored != logical:
                writer.add_array(ORIG_SHAPE_KEY.format(key), [int(d) for d in logical])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path


def _tensor_type(key: str, t: torch.Tensor, rows: Tuple[int, ...], quant: str, quantize, float_type: str) -> str:
    """The stored type of one tensor (stored, before any type, with the shape ``rows``), by the
    converters' rules (comment above write_tiny_gguf)."""
    if t.ndim > 4:
        return "F32"  # fix_5d_tensors.py
    if quantize(key, t):
        name = _quant_type(quant, key)
        if name in _K_QUANTS and (not rows or rows[-1] % _ROW):
            return "F16"  # llama-quantize's fallback for K-quant rows of another length
        return name
    if t.ndim <= 1 or t.numel() <= _SMALL or ".modulation" in key:
        return "F32"
    return float_type


def _encode(arr, name: str, gguf, np):
    """The bytes gguf-py's writer takes for ``arr`` (float32, stored shape) in type ``name``."""
    if name not in _ENCODABLE_K:
        return gguf.quants.quantize(arr, gguf.GGMLQuantizationType[name])
    per_block, nbytes = block_size(name)
    blocks = _encode_k(arr.reshape(-1, per_block), name, np)
    return blocks.reshape(arr.shape[:-1] + (arr.shape[-1] // per_block * nbytes,))


def _f16(x, np):
    """``x`` rounded to fp16 (what the block stores) and back to float32."""
    return x.astype(np.float16).astype(np.float32)


def _div(a, b, np):
    return np.divide(a, b, out=np.zeros_like(a), where=b > 0)


def _pack_nibbles(q, np):
    """(..., 2, L) values < 16 -> (..., L) bytes: the first in the low nibble, the second in the high."""
    return (q[..., 0, :] | (q[..., 1, :] << 4)).astype(np.uint8)


def _pack_fields(q, bits: int, np):
    """(..., 8 / bits, L) values < 2**bits -> (..., L) bytes, the first field in the lowest bits."""
    out = np.zeros(q.shape[:-2] + q.shape[-1:], dtype=np.uint8)
    for f in range(q.shape[-2]):
        out |= (q[..., f, :] << (bits * f)).astype(np.uint8)
    return out


def _encode_k(x, name: str, np):
    """Blocks of 256 float32 values (n, 256) -> (n, bytes per block) of Q4_K / Q5_K / Q6_K.

    Layouts (ggml's block_q4_K / q5_K / q6_K, as ``gguf_dequant`` reads them): Q4_K / Q5_K: fp16 d,
    fp16 dmin, 12 bytes of 6-bit scales and mins for 8 sub-blocks of 32, (Q5_K: 32 bytes of fifth
    bits), 128 bytes of 4-bit codes; value = d * scale * q - dmin * min. Q6_K: 128 bytes of low
    nibbles, 64 bytes of high 2-bit pairs, 16 int8 scales of sub-blocks of 16, fp16 d; value =
    d * scale * (q - 32)."""
    n = x.shape[0]
    if name == "Q6_K":
        sub = x.reshape(n, 16, 16)
        step = np.abs(sub).max(axis=2) / 31                                   # (n, 16)
        d = _f16(step.max(axis=1, keepdims=True) / 127, np)                   # (n, 1)
        sc = np.clip(np.rint(_div(step, d, np)), 0, 127)
        q = np.clip(np.rint(_div(sub, (d * sc)[..., None], np)), -32, 31).astype(np.int16) + 32
        q = q.astype(np.uint8).reshape(n, 2, 2, 64)                           # element 128c + 64h + l
        ql = _pack_nibbles(q & 0x0F, np).reshape(n, 128)
        qh = _pack_fields((q >> 4).reshape(n, 2, 4, 32), 2, np).reshape(n, 64)  # element 128c + 32f + l
        return np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8),
                               d.astype(np.float16).view(np.uint8)], axis=1)
    levels = 15 if name == "Q4_K" else 31
    sub = x.reshape(n, 8, 32)
    low = np.minimum(sub.min(axis=2), 0)
    step, mins = (sub.max(axis=2) - low) / levels, -low                        # (n, 8)
    d = _f16(step.max(axis=1, keepdims=True) / 63, np)
    dmin = _f16(mins.max(axis=1, keepdims=True) / 63, np)
    sc = np.clip(np.rint(_div(step, d, np)), 0, 63).astype(np.uint8)
    mc = np.clip(np.rint(_div(mins, dmin, np)), 0, 63).astype(np.uint8)
    q = np.rint(_div(sub + (dmin * mc)[..., None], (d * sc)[..., None], np))
    q = np.clip(q, 0, levels).astype(np.uint8)                                 # (n, 8, 32)
    scales = np.concatenate([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), mc[:, :4] | ((mc[:, 4:] >> 4) << 6),
                             (sc[:, 4:] & 0x0F) | ((mc[:, 4:] & 0x0F) << 4)], axis=1).astype(np.uint8)
    head = [d.astype(np.float16).view(np.uint8), dmin.astype(np.float16).view(np.uint8), scales]
    qs = _pack_nibbles((q & 0x0F).reshape(n, 4, 2, 32), np).reshape(n, 128)    # sub-block 2c + h
    if name == "Q5_K":
        head.append(_pack_fields(q >> 4, 1, np))                               # bit j: sub-block j
    return np.concatenate(head + [qs], axis=1)


def _stored_shape(shape: Tuple[int, ...], type_name: str, shape_fix: bool, fallback: bool = False
                  ) -> Tuple[int, ...]:
    """The shape a tensor of 4 dims or fewer is written with (a row-major reinterpretation recorded as
    orig_shape when it differs). ``shape_fix``: convert.py's rearrangement into rows of 256 elements
    of a tensor of 2-4 dims and at least 512 elements, a multiple of 256, whose last dim is not.
    Otherwise as is, when GGML can hold it (rows of whole blocks); else, with ``fallback``, rows
    of 256 elements."""
    per_block = block_size(type_name)[0]
    n = math.prod(shape)
    if shape_fix and 2 <= len(shape) <= 4 and n >= 512 and n % _ROW == 0 and shape[-1] % _ROW:
        return (n // _ROW, _ROW)
    if (1 <= len(shape) <= 4 and shape[-1] % per_block == 0) or (not shape and per_block == 1):
        return shape
    if fallback and n and n % _ROW == 0 and _ROW % per_block == 0:
        return (n // _ROW, _ROW)
    raise GGUFFormatError(f"cannot store a {type_name} tensor of shape {shape}: GGML holds rows of whole "
                          f"blocks ({per_block} elements) in at most 4 dims, and convert.py rearranges only "
                          "tensors of a multiple of 256 elements")
