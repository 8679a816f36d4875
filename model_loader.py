"""The pack's WAN loaders: a file (.safetensors or .gguf) -> a ComfyUI MODEL, built by ComfyUI itself.

ComfyUI glue (ComfyUI is imported inside the functions). The order is chosen so that a bad file or a
wrong choice fails before anything big is allocated, and nothing half-built is ever handed out:

1. ``formats.weight_files.scan_weights``: the header only (truncated/corrupt files, unsupported GGUF types).
2. ComfyUI's own detection (``comfy.model_detection.model_config_from_unet``) runs on storage-less
   ``meta`` stand-ins of the tensors: no hand-made configs. The result must be a WAN model;
   ``config.identify_wan`` names version and variant, and an explicit ``wan_version`` /
   ``model_variant`` that contradicts the file is an error.
3. The model is built with ComfyUI's operations for the chosen dtypes, extended by ``formats.quant_ops``
   (Linear weights start on ``meta``, so the big matrices are not allocated yet), and its key set is
   compared with the file's: missing or unexpected keys are an error naming them.
4. ``formats.weight_files.read_weights`` reads every tensor into memory this process owns, converting it
   as it goes (the model's dtype; with ``fp8_optimization`` the block matrices become fp8 with a
   per-tensor scale), and the tensors are assigned to the model (no second copy).
5. The result is a classic (non-dynamic) ``ModelPatcher`` (``formats.quant_ops.patcher_class``), so block swap
   works on it whether or not ComfyUI's Dynamic VRAM is on.

ComfyUI's quantized files (the official fp8_scaled checkpoints: ``scaled_fp8`` marker + ``.scale_weight``;
the ``_quantization_metadata`` header; inline ``.comfy_quant`` layer configs, with any layout: fp8,
MXFP8, NVFP4, INT8...) take steps 1-3 the same way on ComfyUI's own conversion of their keys, then are
read whole and built by ComfyUI's loading function (``comfy.sd.load_diffusion_model_state_dict``,
UNETLoader's): the same QuantizedTensor weights and mixed-precision layers, on a classic patcher.

fp8 option: only 2-D ``weight`` matrices inside ``blocks.N`` / ``vace_blocks.N`` (attention and FFN
projections: ~97 % of a 14B model's bytes) are quantized; norms, biases, modulation, embeddings and
the head keep their precision. The scale is a power of two per tensor, ``2**ceil(log2(amax / fp8
max))``: the largest magnitude fits the format, and multiplying by it is exact in any float dtype, so
dequantization adds no error beyond fp8's own rounding (relative 2**-4 for e4m3fn, 2**-3 for e5m2).
It halves the block weights' memory; the weights are dequantized at use, so it saves memory, not time.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .config import BlockSwapError, check_wan_choice, identify_wan
from .utils import format_bytes, get_logger
from .formats.weight_files import TensorEntry, WeightFileError, read_weights, scan_weights

log = get_logger("loader")

MODEL_TYPES = ("safetensors", "gguf")
FP8_CHOICES = ("disabled", "e4m3fn", "e5m2")
DTYPE_CHOICES = ("auto", "fp16", "bf16", "fp32")
NO_FILE = "none"  # first entry of each file list, so an unused list always validates
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_FP8 = {"e4m3fn": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_BLOCK_MATRIX = re.compile(r"^(vace_)?blocks\.\d+\..+\.weight$")
_SAFETENSORS_EXT = (".safetensors", ".sft")


# ---------------------------------------------------------------------------------------------
# fp8 (pure torch)

def fp8_quantize(w: torch.Tensor, fp8_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)`` with ``q * scale ~= w``: ``q`` in ``fp8_dtype``, ``scale`` a float32 power of
    two chosen so the largest magnitude fits (see the module docstring)."""
    wf = w.float()
    amax = float(wf.abs().max()) if wf.numel() else 0.0
    if not math.isfinite(amax):
        raise ValueError("the tensor holds inf or NaN values")
    fmax = torch.finfo(fp8_dtype).max
    exp = math.ceil(math.log2(amax / fmax)) if amax > 0 else 0
    scale = torch.tensor(2.0 ** exp, dtype=torch.float32)
    q = (wf / scale).clamp_(-fmax, fmax).to(fp8_dtype)
    return q, scale


def _decide(key: str, dtype: Optional[torch.dtype], ndim: int, target: Dict[str, torch.dtype],
            fp8_dtype: Optional[torch.dtype]):
    """What loading does with one file tensor: ("keep", None), ("cast", dtype) or ("fp8", fp8 dtype).
    Each tensor gets the dtype ComfyUI gave the parameter it is assigned to (what a copying
    ``load_state_dict`` would produce), except GGUF-quantized bytes and fp8 weights (kept as stored),
    and the block matrices the fp8 option quantizes."""
    if dtype is None or not dtype.is_floating_point or dtype in _FP8_DTYPES:
        return "keep", None  # GGUF-quantized bytes, integer tensors, weights that already are fp8
    if fp8_dtype is not None and ndim == 2 and _BLOCK_MATRIX.match(key):
        return "fp8", fp8_dtype
    return "cast", target.get(key, dtype)


def _transform(target: Dict[str, torch.dtype], fp8_dtype: Optional[torch.dtype]):
    """Per-tensor conversion applied while reading (one tensor at a time, so the peak stays low)."""

    def apply(key: str, t: torch.Tensor) -> Dict[str, torch.Tensor]:
        kind, dtype = _decide(key, None if type(t) is not torch.Tensor else t.dtype, t.ndim, target,
                              fp8_dtype)
        if kind == "fp8":
            try:
                q, scale = fp8_quantize(t, dtype)
            except ValueError as e:
                raise BlockSwapError(f"fp8_optimization cannot quantize {key}: {e}; the file is damaged, "
                                     "or load it with fp8_optimization disabled") from e
            return {key: q, key[:-len("weight")] + "scale_weight": scale}
        if kind == "cast" and t.dtype != dtype:
            return {key: t.to(dtype)}
        return {key: t}

    return apply


def _loaded_bytes(e: TensorEntry, target, fp8_dtype) -> List[int]:
    """The bytes of the tensor(s) ``_transform`` makes from ``e`` (group buffers are sized by it)."""
    kind, dtype = _decide(e.key, e.dtype, len(e.shape), target, fp8_dtype)
    n = math.prod(e.shape)
    if kind == "keep":
        return [e.nbytes]
    if kind == "fp8":
        return [n * dtype.itemsize, 4]
    return [n * dtype.itemsize]


# ---------------------------------------------------------------------------------------------
# file lists for the nodes

def _model_dirs() -> List[str]:
    import folder_paths

    return list(folder_paths.get_folder_paths("diffusion_models"))


def list_model_files(kind: str) -> List[str]:
    """Files of ``kind`` ("safetensors" / "gguf") under ComfyUI's diffusion_models (and unet)
    folders, relative names as ComfyUI shows them, with :data:`NO_FILE` first."""
    exts = _SAFETENSORS_EXT if kind == "safetensors" else (".gguf",)
    names = set()
    for base in _model_dirs():
        if not os.path.isdir(base):
            continue
        for root, _dirs, files in os.walk(base, followlinks=True):
            for f in files:
                if f.lower().endswith(exts):
                    names.add(os.path.relpath(os.path.join(root, f), base).replace(os.sep, "/"))
    return [NO_FILE] + sorted(names, key=str.lower)


def resolve_model_file(kind: str, name: str) -> str:
    """Full path of a listed file; a clear error when none is chosen or it is gone."""
    if not name or name == NO_FILE:
        raise BlockSwapError(f"model_type is {kind} but no {kind} file is chosen: pick one in "
                             f"{kind}_model (files go in ComfyUI/models/diffusion_models).")
    for base in _model_dirs():
        path = os.path.join(base, name)
        if os.path.isfile(path):
            return path
    raise BlockSwapError(f"model file {name!r} not found in {', '.join(_model_dirs())}; "
                         "refresh the node (R) or check the file name.")


# ---------------------------------------------------------------------------------------------
# loading

def _probe_dtype(device: torch.device, dtype: torch.dtype, compute: torch.dtype) -> None:
    """Raise when ``device`` cannot hold ``dtype`` weights and compute with them in ``compute``."""
    try:
        w = torch.ones(2, 2, dtype=dtype, device=device)
        torch.nn.functional.linear(torch.ones(1, 2, dtype=compute, device=device), w.to(compute))
    except (RuntimeError, TypeError) as e:
        raise BlockSwapError(f"{device} cannot run {dtype} weights computed in {compute} ({e}); "
                             "choose another weight_dtype / fp8_optimization.") from e


def _file_weight_dtype(entries: List[TensorEntry]) -> Optional[torch.dtype]:
    """The float dtype holding most elements (ComfyUI's rule); None when quantized bytes dominate."""
    counts: Counter = Counter()
    for e in entries:
        counts[e.dtype] += math.prod(e.shape)
    dtype = counts.most_common(1)[0][0] if counts else None
    return dtype if dtype is not None and dtype.is_floating_point else None


def _check_keys(path: str, expected: set, found: set, allowed: set = frozenset()) -> None:
    """Every key the model needs is in the file, and the file holds nothing else but ``allowed``."""
    missing = sorted(expected - found)
    unexpected = sorted(found - expected - allowed)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:5])}"
                         f"{', ...' if len(unexpected) > 5 else ''})")
        raise BlockSwapError(f"{path}: the file's keys do not match the WAN model ComfyUI detected: "
                             f"{'; '.join(parts)}. The file is incomplete, or a format this loader does "
                             "not read (ComfyUI's mixed-precision quantized files load with UNETLoader).")


@dataclass
class Streamed:
    """What the block-swap loader says about the units that will stream, so their weights go straight
    to their host masters while the file is read (:mod:`load_targets`).

    ``units(diffusion_model)``: their names, once the model's structure is known. ``masters(need)``:
    "RAM" or "file", given the bytes of their host copies. ``spill_folder``: where weights that loading
    converts go when they are kept on file."""

    units: Callable[[Any], Sequence[str]]
    masters: Callable[[int], str] = lambda need: "RAM"
    spill_folder: str = ""


def load_wan_model(path, *, model_type: Optional[str] = None, wan_version: str = "auto",
                   model_variant: str = "auto", fp8_optimization: str = "disabled",
                   weight_dtype: str = "auto", for_swap: bool = False, streamed: Optional[Streamed] = None):
    """Load a WAN diffusion model file. Returns ``(patcher, info, text)``: a ComfyUI ModelPatcher,
    the :class:`config.WanInfo` and a one-line report (also logged).

    ``model_type`` ("safetensors" / "gguf"), when given, must match the file's content.
    ``for_swap``: keep every weight in host RAM even where ComfyUI keeps models on the GPU
    (``--highvram``), because the caller streams some blocks from there.
    ``streamed`` (optional, :class:`Streamed`): the units whose weights go straight to their host
    masters: read into one page-aligned buffer each (RAM), which the block-swap engine adopts in place,
    or left in the file (file: views of its mapping; converted weights in a spill file).
    Raises :class:`config.BlockSwapError` (a ValueError) naming the file for every bad input; nothing
    is registered with ComfyUI before the model is complete.
    """
    path = os.fspath(path)
    if fp8_optimization not in FP8_CHOICES:
        raise BlockSwapError(f"fp8_optimization must be one of {', '.join(FP8_CHOICES)}, got {fp8_optimization!r}")
    if weight_dtype not in DTYPE_CHOICES:
        raise BlockSwapError(f"weight_dtype must be one of {', '.join(DTYPE_CHOICES)}, got {weight_dtype!r}")
    try:
        fmt, entries, metadata = scan_weights(path)
    except WeightFileError as e:
        raise BlockSwapError(str(e)) from e
    if model_type is not None and fmt != model_type:
        raise BlockSwapError(f"{path} is a {fmt} file but model_type is {model_type}: set model_type "
                             f"to {fmt} and choose the file in {fmt}_model.")
    arch = metadata.get("general.architecture") if fmt == "gguf" else None
    if fmt == "gguf" and arch not in ("wan", ""):
        raise BlockSwapError(f"{path}: a GGUF file of architecture {arch!r}, not a WAN model")
    options = dict(model_type=model_type, wan_version=wan_version, model_variant=model_variant,
                   fp8_optimization=fp8_optimization, weight_dtype=weight_dtype)
    if fmt == "safetensors" and comfy_quantized(entries, metadata):
        patcher, info, dtypes = _load_comfy_quantized(path, entries, metadata, for_swap=for_swap, streamed=streamed,
                                                      **options)
    else:
        patcher, info, dtypes = _load_plain(path, fmt, entries, metadata, for_swap=for_swap,
                                            streamed=streamed, **options)
    # How ComfyUI rebuilds a model it must deep-copy (multi-GPU, training), as UNETLoader sets it
    patcher.cached_patcher_init = (_reload, (path, options))
    stored = Counter(e.stored for e in entries)
    text = (f"{info.describe()}; {os.path.basename(path)} ({fmt}, {format_bytes(os.path.getsize(path))}; "
            f"{', '.join(f'{n} x{c}' for n, c in stored.most_common())}); {dtypes}")
    log.info("WAN loader: %s", text)
    return patcher, info, text


def comfy_quantized(entries: List[TensorEntry], metadata: Dict[str, str]) -> bool:
    """True for ComfyUI's quantized checkpoint forms, recognised as its own loader does: the old
    ``scaled_fp8`` marker (fp8 matrices + ``.scale_weight``, the official repackaged fp8_scaled files),
    the ``_quantization_metadata`` header, or inline ``.comfy_quant`` layer configs."""
    return "_quantization_metadata" in metadata or any(
        e.key == "scaled_fp8" or e.key.endswith(".comfy_quant") for e in entries)


def _detect(path: str, stand_ins: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]],
            wan_version: str, model_variant: str):
    """ComfyUI's own detection on storage-less stand-ins: ``(model_config, info)``, or an error naming
    the file when it is not a WAN model or contradicts the explicit choices."""
    import comfy.model_detection

    try:
        model_config = comfy.model_detection.model_config_from_unet(stand_ins, "", metadata=metadata)
    except (KeyError, IndexError, AttributeError, TypeError) as e:  # a WAN-like file missing a key detection reads
        raise BlockSwapError(f"{path}: ComfyUI's model detection failed ({type(e).__name__}: {e}); the file "
                             "is incomplete or not a WAN diffusion model") from e
    image_model = getattr(model_config, "unet_config", {}).get("image_model") if model_config else None
    if image_model != "wan2.1":  # ComfyUI's family name for every WAN 2.1 / 2.2 transformer
        what = f"a {image_model} model" if image_model else "no diffusion model ComfyUI recognises"
        raise BlockSwapError(f"{path}: this is {what}, not a WAN 2.1/2.2 diffusion model "
                             "(text encoders, VAEs and whole checkpoints load with other nodes).")
    info = identify_wan(model_config.unet_config, "img_emb.proj.0.bias" in stand_ins)
    check_wan_choice(info, wan_version, model_variant, path)
    return model_config, info


def _structure(model_config, stand_ins, unet_dtype, manual_cast, load_device):
    """The model ComfyUI detected, built with its operations for these dtypes but with every Linear
    weight on ``meta`` (``quant_ops``): nothing big is allocated yet."""
    import comfy.ops

    from .formats.quant_ops import make_ops

    model_config.set_inference_dtype(unet_dtype, manual_cast, device=load_device)
    model_config.custom_operations = make_ops(comfy.ops.pick_operations(unet_dtype, manual_cast,
                                                                        load_device=load_device))
    return model_config.get_model(stand_ins, "")


def _destination(path: str, entries: List[TensorEntry], streamed: Optional[Streamed], diffusion_model,
                 loaded_bytes: Callable[[TensorEntry], List[int]], unchanged: Callable[[TensorEntry], bool],
                 ram_arenas: bool = True):
    """Where :func:`weight_files.read_weights` puts the streamed units' tensors (:mod:`load_targets`):
    their host masters in RAM (with ``ram_arenas``; else owned tensors, packed by the engine), or the
    file (and a spill file for what loading converts); None without ``streamed``."""
    if streamed is None:
        return None
    from .engine.file_masters import SpillFile
    from .engine.host_masters import arena_offset
    from .load_targets import FileTargets, HostArenas

    units = tuple(streamed.units(diffusion_model))

    def unit_of(key: str) -> Optional[str]:
        return next((u for u in units if key.startswith(u + ".")), None)

    group_bytes: Dict[str, int] = {}
    converted = 0
    for e in entries:
        unit = unit_of(e.key)
        if unit is not None:
            size = sum(arena_offset(n) for n in loaded_bytes(e))
            group_bytes[unit] = group_bytes.get(unit, 0) + size
            converted += 0 if unchanged(e) else size
    if streamed.masters(sum(group_bytes.values())) != "file":
        return HostArenas(unit_of, group_bytes, unchanged) if ram_arenas else None
    spill = SpillFile(streamed.spill_folder)
    if converted:
        spill.check_space(converted, len(group_bytes))
    return FileTargets(path, unit_of, group_bytes, unchanged, spill)


def _load_plain(path, fmt, entries, metadata, *, model_type, wan_version, model_variant, fp8_optimization,
                weight_dtype, for_swap, streamed):
    """fp16/bf16/fp32/fp8 safetensors and GGUF files: read into memory this process owns, converted
    per tensor as the model's dtypes (and the fp8 option) ask, assigned without a second copy."""
    import comfy.model_management as mm

    from .formats.quant_ops import patcher_class

    # 2. ComfyUI's detection on storage-less stand-ins
    meta = {e.key: e.meta() for e in entries}
    model_config, info = _detect(path, meta, metadata if fmt == "safetensors" else None, wan_version, model_variant)

    # 3. dtypes, operations, the model with its weights still unallocated
    load_device = mm.get_torch_device()
    offload_device = mm.unet_offload_device()
    supported = list(model_config.supported_inference_dtypes)
    params = sum(math.prod(e.shape) for e in entries)
    if weight_dtype == "auto":
        unet_dtype = mm.unet_dtype(model_params=params, supported_dtypes=supported,
                                   weight_dtype=_file_weight_dtype(entries))
    else:
        unet_dtype = _DTYPES[weight_dtype]
    manual_cast = mm.unet_manual_cast(unet_dtype, load_device, supported)
    compute = manual_cast or unet_dtype
    fp8_dtype = _FP8.get(fp8_optimization)
    for dtype in {unet_dtype, fp8_dtype} - {None}:
        _probe_dtype(load_device, dtype, compute)
    model = _structure(model_config, meta, unet_dtype, manual_cast, load_device)
    target = {k: t.dtype for k, t in model.diffusion_model.state_dict().items()}
    _check_keys(path, set(target), {e.key for e in entries})

    # 4. read, convert, assign
    def unchanged(e: TensorEntry) -> bool:  # _transform hands the tensor back as read
        return _decide(e.key, e.dtype, len(e.shape), target, fp8_dtype) in (("keep", None), ("cast", e.dtype))

    dest = _destination(path, entries, streamed, model.diffusion_model,
                        lambda e: _loaded_bytes(e, target, fp8_dtype), unchanged)
    try:
        sd = read_weights(path, entries, _transform(target, fp8_dtype), dest=dest)
    except WeightFileError as e:
        raise BlockSwapError(str(e)) from e
    sd = model.model_config.process_unet_state_dict(sd)
    try:
        missing, unexpected = model.diffusion_model.load_state_dict(sd, strict=False, assign=True)
    except RuntimeError as e:  # shape mismatches
        raise BlockSwapError(f"{path}: the file does not fit the detected model: {e}") from e
    left = [n for n, t in model.diffusion_model.state_dict().items() if t.is_meta]
    if missing or unexpected or left:
        raise BlockSwapError(f"{path}: loading left missing {sorted(set(missing) | set(left))[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")
    del sd

    # 5. the patcher
    patcher = patcher_class()(model, load_device=load_device, offload_device=offload_device)
    if not for_swap and offload_device.type != "cpu":
        model.to(offload_device)  # what ComfyUI's own loader does under --highvram / --gpu-only
    dtypes = (f"weights {_dtype_name(unet_dtype)}"
              + (f", block matrices fp8 {fp8_optimization} (per-tensor scale)" if fp8_dtype else "")
              + (f", computed in {_dtype_name(manual_cast)}" if manual_cast else ""))
    return patcher, info, dtypes


def _quant_formats(path: str, stand_ins: Dict[str, torch.Tensor]) -> Counter:
    """The quantization format of every layer config (``.comfy_quant``: a 1-D uint8 tensor of JSON
    naming a format ComfyUI knows), counted; an error naming the file and key for a damaged one."""
    from comfy.quant_ops import QUANT_ALGOS

    formats: Counter = Counter()
    for key, t in stand_ins.items():
        if not key.endswith(".comfy_quant"):
            continue
        try:
            if t.dtype != torch.uint8 or t.ndim != 1:
                raise ValueError(f"a {t.dtype} tensor of shape {tuple(t.shape)}, not 1-D uint8 JSON text")
            conf = json.loads(t.numpy().tobytes())
            fmt = conf.get("format") if isinstance(conf, dict) else None
            if fmt not in QUANT_ALGOS:
                raise ValueError(f"format {fmt!r} is not one of ComfyUI's ({', '.join(QUANT_ALGOS)})")
        except (ValueError, UnicodeDecodeError) as e:
            raise BlockSwapError(f"{path}: the layer config {key} is damaged: {e}") from e
        formats[fmt] += 1
    return formats


# Per-layer tensors of ComfyUI's quantized forms besides the weight (after its conversion of the old form)
_QUANT_EXTRAS = ("weight_scale", "weight_scale_2", "input_scale", "comfy_quant")


def _load_comfy_quantized(path, entries, metadata, *, model_type, wan_version, model_variant, fp8_optimization,
                          weight_dtype, for_swap, streamed):
    """ComfyUI's quantized files (fp8_scaled in all three forms, NVFP4, MXFP8, INT8...): checked and
    identified like the others before anything big is read, then read into owned memory and built by
    ComfyUI's own loading function, so the layers are exactly UNETLoader's (QuantizedTensor weights,
    mixed-precision operations), on a classic patcher that block swap can stream even with Dynamic
    VRAM on."""
    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils

    if not hasattr(comfy.utils, "convert_old_quants"):  # a ComfyUI from before its quantized formats
        raise BlockSwapError(f"{path} is a quantized checkpoint (fp8_scaled / mixed precision), which this "
                             "ComfyUI cannot load: update ComfyUI.")
    if fp8_optimization != "disabled":
        raise BlockSwapError(f"{path} is already quantized (ComfyUI's fp8_scaled / mixed-precision format): "
                             "set fp8_optimization to disabled for it.")
    # ComfyUI's conversion reads the values of a few tiny tensors (the marker, input scales, layer
    # configs); the rest stays storage-less until the key check passed.
    small = [e for e in entries if e.key == "scaled_fp8" or e.key.endswith((".scale_input", ".comfy_quant"))]
    try:
        values = read_weights(path, small)
    except WeightFileError as e:
        raise BlockSwapError(str(e)) from e
    try:
        stand_ins, _ = comfy.utils.convert_old_quants({e.key: values.get(e.key, e.meta()) for e in entries}, "",
                                                      metadata=dict(metadata))
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as e:  # damaged markers or metadata
        raise BlockSwapError(f"{path}: its quantization markers are damaged ({type(e).__name__}: {e})") from e
    formats = _quant_formats(path, stand_ins)
    model_config, info = _detect(path, stand_ins, metadata, wan_version, model_variant)
    load_device = mm.get_torch_device()
    if weight_dtype != "auto":
        _probe_dtype(load_device, _DTYPES[weight_dtype], _DTYPES[weight_dtype])
    # the plain structure names every weight the file must hold; quantized layers add their scales
    structure = _structure(model_config, stand_ins, torch.float32, None, load_device).diffusion_model
    expected = set(structure.state_dict())
    extras = {k[:-len("weight")] + x for k in expected if k.endswith(".weight") for x in _QUANT_EXTRAS}
    _check_keys(path, expected, set(stand_ins), allowed=extras)
    # ComfyUI builds the layers from the tensors as stored: kept on file, the streamed ones are views of it
    dest = _destination(path, entries, streamed, structure, lambda e: [e.nbytes], lambda e: True, ram_arenas=False)
    try:
        sd = read_weights(path, entries, dest=dest)
    except WeightFileError as e:
        raise BlockSwapError(str(e)) from e
    model_options = {} if weight_dtype == "auto" else {"dtype": _DTYPES[weight_dtype]}
    if for_swap:
        model_options["offload_device"] = torch.device("cpu")  # the streamed blocks' masters live in RAM
    try:
        patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options=model_options, metadata=dict(metadata),
                                                           disable_dynamic=True)
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as e:  # e.g. a scale of the wrong shape
        raise BlockSwapError(f"{path}: ComfyUI could not build the model from this file ({type(e).__name__}: "
                             f"{e}); the file is damaged") from e
    if patcher is None:  # cannot happen after _detect: the same detection on the same keys
        raise BlockSwapError(f"{path}: ComfyUI could not build the model it detected")
    model = patcher.model
    cast = getattr(model, "manual_cast_dtype", None)
    dtypes = (f"quantized layers {', '.join(f'{f} x{c}' for f, c in formats.most_common())} (ComfyUI's "
              f"mixed precision), other weights {_dtype_name(model.get_dtype())}"
              + (f", computed in {_dtype_name(cast)}" if cast else ""))
    return patcher, info, dtypes


def _reload(path, options: dict, disable_dynamic: bool = False):
    """``cached_patcher_init`` target: the same file with the same choices (the pack's patchers are
    never dynamic, so ``disable_dynamic`` changes nothing)."""
    return load_wan_model(path, **options)[0]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
