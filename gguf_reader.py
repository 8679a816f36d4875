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
* ``write_tiny_gguf(path, state_dict)``: writes a GGUF file (tests, benchmarks; no downloads).

gguf-py facts relied on (gguf 0.19):

* **Shape order.** GGUF stores ``ne`` fastest-varying first, so ``ReaderTensor.shape`` is the torch
  shape reversed. ``ReaderTensor.data`` is already reshaped: for F32/F16 to the torch shape, for
  every other type (BF16 included, which gguf-py reads as raw bytes) to the *byte* shape ``(...,
  bytes per row)``. The logical torch shape is therefore always taken as ``reversed(shape)``.
* **More than 4 dims / rearranged rows.** GGML tensors have at most 4 dims, and quantizing needs the
  last dim to be a multiple of the block size; ComfyUI-GGUF's converter stores such tensors reshaped
  (WAN's 5-D ``patch_embedding.weight`` among them) and records the real shape as the metadata array
  ``comfy.gguf.orig_shape.<tensor name>`` (ints). That shape wins when present; since the reshape
  is a row-major reinterpretation, a quantized tensor's bytes are simply its blocks in element order
  whatever the stored shape, which is why ``GGUFTensor.dequantize`` expands the flat bytes and then
  reshapes to ``tensor_shape``.
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

def _default_quantize(key: str, t: torch.Tensor) -> bool:
    return t.ndim == 2 and "blocks." in key and key.endswith("weight")


def write_tiny_gguf(path, state_dict: Mapping[str, torch.Tensor], quant: str = "Q8_0", arch: str = "wan",
                    quantize: Callable[[str, torch.Tensor], bool] = _default_quantize) -> str:
    """Write ``state_dict`` as a GGUF file with gguf-py's GGUFWriter; returns the path.

    Tensors for which ``quantize(key, tensor)`` is true (default: 2-D weights whose key contains
    ``blocks.``) are quantized to ``quant`` with ``gguf.quants.quantize`` (gguf-py can quantize
    Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, BF16, F16); a :class:`GGUFTensor` value is written as stored, its
    bytes and type unchanged (so K-quant files can be made from existing bytes); every other tensor
    is written as F32. Tensors with more than 4 dims, or quantized ones whose last dim is not a
    multiple of the block size, are stored reshaped with their shape in ``comfy.gguf.orig_shape.*``
    metadata, as ComfyUI-GGUF's converter does. ``arch`` becomes ``general.architecture``.
    """
    import gguf
    import numpy as np

    path = os.fspath(path)
    writer = gguf.GGUFWriter(path, arch)
    try:
        for key, t in state_dict.items():
            if isinstance(t, GGUFTensor):
                qtype = gguf.GGMLQuantizationType[t.tensor_type]
                raw = t.as_subclass(torch.Tensor).detach().cpu().contiguous().reshape(-1).numpy()
                logical = tuple(t.tensor_shape)
                stored = _stored_shape(logical, t.tensor_type)
                per_block, nbytes = block_size(t.tensor_type)
                byte_shape = stored[:-1] + (stored[-1] // per_block * nbytes,)
                writer.add_tensor(key, raw.reshape(byte_shape), raw_dtype=qtype)
            elif quantize(key, t):
                qtype = gguf.GGMLQuantizationType[quant]
                logical = tuple(t.shape)
                stored = _stored_shape(logical, quant)
                arr = t.detach().to(torch.float32).cpu().contiguous().reshape(stored).numpy()
                writer.add_tensor(key, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
            else:
                logical = tuple(t.shape)
                stored = logical if len(logical) <= 4 else (logical[0], math.prod(logical[1:]))
                arr = t.detach().to(torch.float32).cpu().contiguous().reshape(stored).numpy()
                writer.add_tensor(key, np.ascontiguousarray(arr, dtype=np.float32))
            if stored != logical:
                writer.add_array(ORIG_SHAPE_KEY.format(key), [int(d) for d in logical])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path


def _stored_shape(shape: Tuple[int, ...], type_name: str) -> Tuple[int, ...]:
    """The shape a quantized tensor is written with: as is when GGML can hold it, else rows of one
    block each (a row-major reinterpretation, recorded as orig_shape)."""
    per_block = block_size(type_name)[0]
    if 1 <= len(shape) <= 4 and shape[-1] % per_block == 0:
        return shape
    n = math.prod(shape)
    if n % per_block:
        raise GGUFFormatError(f"cannot store a {type_name} tensor of shape {shape}: {n} elements are not a "
                              f"multiple of the block size ({per_block})")
    return (n // per_block, per_block)
