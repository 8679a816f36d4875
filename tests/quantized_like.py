"""Quantized weights for the default tier: ComfyUI's QuantizedTensor (comfy_kitchen, the package
ComfyUI v0.28 pins) in every layout it can build on CPU, plus a wrapper subclass of our own written
to the same protocol, so the engine is also checked against a second, independent implementation.

The facts the engine must respect, which both show: ``.data =`` does not reach the inner tensors,
``nn.Parameter(t)`` is ``t.detach()`` and detaching clones the scales, ``dtype`` is the logical one.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, Optional

import pytest
import torch
from torch import nn

# comfy_kitchen is a dev requirement (requirements-dev.txt). Without it its layouts are skipped, each
# with this reason, and test_quantized.py's test_comfy_kitchen_is_installed fails in the default tier.
try:
    from comfy_kitchen.tensor import QuantizedTensor
    from comfy_kitchen.tensor import base as ck_base
    CK_MISSING = None
except ImportError as err:  # a broken or missing wheel: say which, never drop the layouts silently
    QuantizedTensor = None
    CK_MISSING = (f"comfy_kitchen cannot be imported ({type(err).__name__}: {err}); it is a dev requirement: "
                  "pip install -r requirements-dev.txt")

# layout id -> (comfy_kitchen layout, quantize kwargs); ComfyUI v0.28 registers these (its E4M3 and
# E5M2 classes are comfy_kitchen's TensorCoreFP8Layout with the fp8 dtype fixed).
CK_LAYOUTS = {
    "fp8_e4m3": ("TensorCoreFP8Layout", {}),
    "fp8_e5m2": ("TensorCoreFP8Layout", {"dtype": torch.float8_e5m2}),
    "mxfp8": ("TensorCoreMXFP8Layout", {}),
    "nvfp4": ("TensorCoreNVFP4Layout", {}),
    "int8_tensorwise": ("TensorWiseINT8Layout", {}),
    "convrot_w4a4": ("TensorCoreConvRotW4A4Layout", {}),
}
# ConvRot rotates groups of 256 input features: only matrices with a multiple of 256 inputs
MIN_IN_FEATURES = {"convrot_w4a4": 256}


@dataclasses.dataclass(frozen=True)
class ScaledParams:
    scale: torch.Tensor
    orig_dtype: torch.dtype
    orig_shape: tuple


class ScaledInt8Tensor(torch.Tensor):
    """Our own wrapper: int8 data with a per-row float32 scale, laid out as ComfyUI's QuantizedTensor
    (``_qdata``, a frozen ``_params`` dataclass, ``__tensor_flatten__`` naming ``_param_scale``)."""

    @staticmethod
    def __new__(cls, qdata: torch.Tensor, params: ScaledParams):
        return torch.Tensor._make_wrapper_subclass(cls, params.orig_shape, dtype=params.orig_dtype,
                                                   device=qdata.device, requires_grad=False)

    def __init__(self, qdata, params):
        self._qdata = qdata
        self._params = params

    @classmethod
    def from_float(cls, w: torch.Tensor) -> "ScaledInt8Tensor":
        scale = (w.float().abs().amax(dim=1, keepdim=True) / 127).clamp_min(1e-12)
        q = (w.float() / scale).round().clamp(-127, 127).to(torch.int8)
        return cls(q, ScaledParams(scale, w.dtype, tuple(w.shape)))

    def dequantize(self) -> torch.Tensor:
        return (self._qdata.float() * self._params.scale).to(self._params.orig_dtype)

    def __tensor_flatten__(self):
        self._param_scale = self._params.scale
        return ["_qdata", "_param_scale"], {"orig_dtype": self._params.orig_dtype,
                                            "orig_shape": self._params.orig_shape}

    @staticmethod
    def __tensor_unflatten__(inner, ctx, outer_size, outer_stride):
        return ScaledInt8Tensor(inner["_qdata"], ScaledParams(inner["_param_scale"], **ctx))

    def __repr__(self):
        return f"ScaledInt8Tensor(shape={tuple(self.shape)})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        aten = torch.ops.aten
        if func is aten.detach.default:  # as ComfyUI's: a detached copy gets its own scale
            t = args[0]
            return cls(t._qdata.detach(), dataclasses.replace(t._params, scale=t._params.scale.clone()))
        if func is aten.copy_.default:
            dst, src = args[0], args[1]
            dst._qdata.copy_(src._qdata)
            dst._params.scale.copy_(src._params.scale)
            return dst
        if func is aten._to_copy.default:
            t = args[0]
            device = kwargs.get("device", t._qdata.device)
            return cls(t._qdata.to(device, copy=True), dataclasses.replace(
                t._params, scale=t._params.scale.to(device, copy=True)))

        def plain(a):
            return a.dequantize() if isinstance(a, cls) else a
        return func(*[plain(a) for a in args], **{k: plain(v) for k, v in kwargs.items()})


def ck_layout_params(ids: Optional[Iterable[str]] = None) -> list:
    """pytest params for comfy_kitchen layouts (all, or ``ids``); a visible skip naming the import
    error for each when comfy_kitchen is missing."""
    marks = [] if CK_MISSING is None else [pytest.mark.skip(reason=CK_MISSING)]
    return [pytest.param(i, id=i, marks=marks) for i in (CK_LAYOUTS if ids is None else ids)]


def layouts() -> list:
    """Every layout id as a pytest param: comfy_kitchen's (skipped with the reason when it cannot be
    imported) and our own."""
    return ck_layout_params() + [pytest.param("own_int8", id="own_int8")]


def quantize(w: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "own_int8":
        return ScaledInt8Tensor.from_float(w)
    name, kwargs = CK_LAYOUTS[layout]
    if layout == "fp8_e5m2" and "TensorCoreFP8E5M2Layout" in ck_base.LAYOUTS:
        # in a process that imported ComfyUI's quant_ops, "TensorCoreFP8Layout" is ComfyUI's E4M3 class
        # (no dtype argument) and E5M2 has a class of its own
        name, kwargs = "TensorCoreFP8E5M2Layout", {}
    return QuantizedTensor.from_float(w, name, **kwargs)


def quantize_blocks(model: nn.Module, layout: str, every: int = 1) -> Dict[str, torch.Tensor]:
    """Replace every ``every``-th 2-D weight inside ``blocks.N`` by a quantized Parameter (``every=2``:
    a mixed file, some layers quantized and some not). Returns the quantized tensors by name."""
    done = {}
    eligible = [(n, m) for n, m in model.named_modules() if n.startswith("blocks.") and isinstance(m, nn.Linear)
                and m.in_features % MIN_IN_FEATURES.get(layout, 1) == 0]
    for i, (name, mod) in enumerate(eligible):
        if i % every:
            continue
        q = quantize(mod.weight.detach(), layout)
        mod.weight = nn.Parameter(q, requires_grad=False)
        done[name + ".weight"] = mod.weight
    assert done, f"no weight could be quantized as {layout}"
    return done


def inner_tensors(t: torch.Tensor) -> Dict[str, torch.Tensor]:
    names, _ = t.__tensor_flatten__()
    return {n: getattr(t, n) for n in names}


def non_tensor_params(t: torch.Tensor) -> Optional[dict]:
    params = getattr(t, "_params", None)
    if params is None:
        return None
    return {f.name: getattr(params, f.name) for f in dataclasses.fields(params)
            if not isinstance(getattr(params, f.name), torch.Tensor)}
