"""Casting ops (subset of comfy/ops.py ``disable_weight_init``): Linear, Conv3d, LayerNorm, RMSNorm.

As in ComfyUI, a module casts its weight/bias to the input's device and dtype on every call (and applies
``weight_function`` / ``bias_function``, e.g. LowVramPatch) only when ``comfy_cast_weights`` is True or
it has such functions; otherwise the plain torch forward runs. Every call first checks the interrupt
flag (``run_every_op``). Simplified: no offload streams, cast buffers, quantized tensors or pinning.
"""
import torch
import torch.nn.functional as F

import comfy.model_management


def run_every_op():
    if not torch.compiler.is_compiling():
        comfy.model_management.throw_exception_if_processing_interrupted()


def cast_bias_weight(s, input=None, dtype=None, device=None, bias_dtype=None, offloadable=False):
    if input is not None:
        dtype = input.dtype if dtype is None else dtype
        bias_dtype = dtype if bias_dtype is None else bias_dtype
        device = input.device if device is None else device
    cast = comfy.model_management.cast_to
    weight = cast(s.weight, None, device, copy=len(s.weight_function) > 0)
    bias = getattr(s, "bias", None)
    if bias is not None:
        bias = cast(bias, None, device, copy=len(s.bias_function) > 0).to(dtype=bias_dtype)
        for f in s.bias_function:
            bias = f(bias)
    if s.weight_function or weight.dtype != dtype:
        weight = weight.to(dtype=dtype)
        for f in s.weight_function:
            weight = f(weight)
    return (weight, bias, None) if offloadable else (weight, bias)


class CastWeightBiasOp:
    comfy_cast_weights = False
    weight_function = []
    bias_function = []

    def _casting(self):
        return self.comfy_cast_weights or len(self.weight_function) > 0 or len(self.bias_function) > 0

    def forward(self, input, *args, **kwargs):
        run_every_op()
        if not self._casting():
            return super().forward(input, *args, **kwargs)
        if getattr(self, "weight", None) is None:  # e.g. LayerNorm(elementwise_affine=False)
            return self.forward_comfy_cast_weights(input, None, None)
        weight, bias = cast_bias_weight(self, input)
        return self.forward_comfy_cast_weights(input, weight, bias)


class disable_weight_init:
    class Linear(CastWeightBiasOp, torch.nn.Linear):
        def forward_comfy_cast_weights(self, input, weight, bias):
            return F.linear(input, weight, bias)

    class Conv3d(CastWeightBiasOp, torch.nn.Conv3d):
        def forward_comfy_cast_weights(self, input, weight, bias):
            return self._conv_forward(input, weight, bias)

    class LayerNorm(CastWeightBiasOp, torch.nn.LayerNorm):
        def forward_comfy_cast_weights(self, input, weight, bias):
            return F.layer_norm(input, self.normalized_shape, weight, bias, self.eps)

    class RMSNorm(CastWeightBiasOp, torch.nn.RMSNorm):
        def forward_comfy_cast_weights(self, input, weight, bias):
            return F.rms_norm(input, self.normalized_shape, weight, self.eps)


_ADOPT = {torch.nn.Linear: disable_weight_init.Linear, torch.nn.Conv3d: disable_weight_init.Conv3d,
          torch.nn.LayerNorm: disable_weight_init.LayerNorm, torch.nn.RMSNorm: disable_weight_init.RMSNorm}


def adopt_comfy_ops(model):
    """Stub-only: turn a plain torch model's Linear/Conv3d/LayerNorm/RMSNorm modules into the op
    classes above in place (ComfyUI builds WAN with these ops from the start). Idempotent."""
    for m in model.modules():
        if type(m) in _ADOPT:
            m.__class__ = _ADOPT[type(m)]
    return model


class manual_cast(disable_weight_init):
    class Linear(disable_weight_init.Linear):
        comfy_cast_weights = True

    class Conv3d(disable_weight_init.Conv3d):
        comfy_cast_weights = True

    class LayerNorm(disable_weight_init.LayerNorm):
        comfy_cast_weights = True

    class RMSNorm(disable_weight_init.RMSNorm):
        comfy_cast_weights = True


def pick_operations(weight_dtype, compute_dtype, load_device=None, disable_fast_fp8=False,
                    fp8_optimizations=False, model_config=None):
    """ComfyUI's fallback choice (no fp8 / cublas / mixed-precision ops in the stub)."""
    if compute_dtype is None or weight_dtype == compute_dtype:
        return disable_weight_init
    return manual_cast
