"""Layers and a model patcher for the pack's loaders: GGUF-quantized weights and the fp8 option's
per-tensor-scaled weights (ComfyUI's own quantized files load through ComfyUI's layers instead).

ComfyUI glue (imports ComfyUI inside functions only; importing this module does nothing).

* :func:`make_ops` extends the operations ComfyUI would pick for the model (``comfy.ops``) with a
  ``Linear`` that
  - allocates its weight on the ``meta`` device (the loader assigns the file's tensors, so a 14B model
    is never allocated twice, not even as untouched virtual memory);
  - takes the file's tensors as they are (``assign``): a :class:`GGUFTensor` keeps its quantized bytes,
    an fp8 weight made by the loader's ``fp8_optimization`` keeps its ``scale_weight``;
  - for those two, builds the real weight on the input's device and in its dtype at each call
    (GGUF: dequantize, then the LoRA patches attached to it; fp8: weight x per-tensor scale), then
    ComfyUI's lowvram ``weight_function`` patches; plain weights take ComfyUI's own path unchanged.
  - ``convert_weight`` / ``set_weight`` let ComfyUI's ``patch_weight_to_device`` bake LoRA into fp8
    weights (unscale, patch, rescale with ComfyUI's stochastic rounding), both for resident weights and
    in the block-swap slot.
* :func:`patcher_class` is a ``ModelPatcher`` subclass whose ``patch_weight_to_device`` attaches LoRA
  patches to GGUF weights (applied at dequantization; the quantized bytes are never rewritten) instead
  of casting the raw bytes, and whose ``unpatch_model`` takes them off again. Cloning keeps the class
  (ComfyUI builds clones from ``self.__class__``), and the block-swap integration recognises these
  weights as quantized (``callbacks.is_gguf_quantized``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .gguf_reader import GGUFTensor

__all__ = ["make_ops", "patcher_class"]


class _QuantLinear:
    """Mixed into ``<ComfyUI ops>.Linear`` by :func:`make_ops` (see the module docstring)."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device="meta", dtype=dtype)
        self.scale_weight: Optional[nn.Parameter] = None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        for name in ("weight", "bias"):
            key, current = prefix + name, getattr(self, name)
            if key not in state_dict:
                if current is not None:
                    missing_keys.append(key)
                continue
            value = state_dict[key]
            if current is not None and tuple(value.shape) != tuple(current.shape):
                error_msgs.append(f"size mismatch for {key}: the file has {tuple(value.shape)}, "
                                  f"the model expects {tuple(current.shape)}")
                continue
            setattr(self, name, nn.Parameter(value, requires_grad=False))
        if prefix + "scale_weight" in state_dict:
            self.scale_weight = nn.Parameter(state_dict[prefix + "scale_weight"].float(), requires_grad=False)
        for key in state_dict:
            rest = key[len(prefix):]
            if key.startswith(prefix) and "." not in rest and rest not in ("weight", "bias", "scale_weight"):
                unexpected_keys.append(key)

    def _is_special(self) -> bool:
        return isinstance(self.weight, GGUFTensor) or self.scale_weight is not None

    def dequantized_weight(self, dtype: torch.dtype, device, stored: Optional[torch.Tensor] = None,
                           scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The weight as a plain ``dtype`` tensor on ``device``, GGUF LoRA patches applied.
        ``stored`` / ``scale``: the weight's stored bytes and fp8 scale already on ``device`` (see
        :meth:`_bring`)."""
        w = self.weight
        if stored is not None:
            w = GGUFTensor.wrap(stored, w.tensor_type, w.tensor_shape) if isinstance(w, GGUFTensor) else stored
        if isinstance(w, GGUFTensor):
            out = w.dequantize(dtype, device)
            patches = self.weight.patches
            if patches:
                import comfy.lora

                for patch_list, key in patches:
                    out = comfy.lora.calculate_weight(patch_list, out, key)
                out = out.to(dtype)
            return out
        out = w.to(device=device, dtype=dtype)
        if self.scale_weight is not None:
            # power-of-two scales (our fp8 option) multiply exactly in any dtype
            out = out * (scale if scale is not None else self.scale_weight).to(device=device, dtype=dtype)
        return out

    def _bring(self, device):
        """``(stream, weight bytes, scale, bias)`` on ``device`` for a layer ComfyUI left on the host (a
        partial load): the stored bytes are copied on ComfyUI's offload stream, asynchronously, as its
        own layers' casts do, and the compute stream waits for that stream; all None for a layer
        already on ``device``."""
        import comfy.model_management as mm

        if self.weight.device == device:
            return None, None, None, None
        stream = mm.get_offload_stream(device)
        non_blocking = mm.device_supports_non_blocking(device)
        moved = [None if t is None else mm.cast_to(t.as_subclass(torch.Tensor), None, device,
                                                   non_blocking=non_blocking, stream=stream)
                 for t in (self.weight, self.scale_weight, self.bias)]
        mm.sync_stream(device, stream)
        return (stream, *moved)

    def forward(self, input, *args, **kwargs):
        if not self._is_special():
            return super().forward(input, *args, **kwargs)
        import comfy.model_management as mm
        import comfy.ops

        comfy.ops.run_every_op()  # ComfyUI's per-op interrupt check, as its own layers do
        stream, raw, scale, bias = self._bring(input.device)
        weight = self.dequantized_weight(input.dtype, input.device, stored=raw, scale=scale)
        attached = isinstance(self.weight, GGUFTensor) and bool(self.weight.patches)
        for fn in self.weight_function:
            # ComfyUI's partially_unload adds a LowVramPatch for a key whose LoRA the patcher had
            # attached (it finds no backup to restore): applying both would add the LoRA twice.
            if attached and getattr(fn, "is_lowvram_patch", False):
                continue
            weight = fn(weight)
        bias = bias if bias is not None else self.bias
        if bias is not None:
            bias = bias.to(device=input.device, dtype=input.dtype)
            for fn in self.bias_function:
                bias = fn(bias)
        out = F.linear(input, weight, bias)
        if stream is not None:  # the offload stream's buffers are reused only after this layer ran
            stream.wait_stream(mm.current_stream(input.device))
        return out

    # ComfyUI's patch_weight_to_device calls these (found by name) around comfy.lora.calculate_weight
    def convert_weight(self, weight, inplace=False, **kwargs):
        self._refuse_gguf()
        if self.scale_weight is None:
            return weight
        scale = self.scale_weight.to(device=weight.device, dtype=weight.dtype)
        return weight.mul_(scale) if inplace else weight * scale

    def set_weight(self, weight, inplace_update=False, seed=None, return_weight=False, **kwargs):
        import comfy.float

        self._refuse_gguf()
        if self.scale_weight is not None:
            weight = weight / self.scale_weight.to(device=weight.device, dtype=weight.dtype)
        out = comfy.float.stochastic_rounding(weight, self.weight.dtype, seed=seed)
        if return_weight:
            return out
        if inplace_update:
            self.weight.data.copy_(out)
        else:
            self.weight = nn.Parameter(out, requires_grad=False)

    def _refuse_gguf(self) -> None:
        if isinstance(self.weight, GGUFTensor):
            raise TypeError("GGUF weights cannot be rewritten in place: LoRA on them is applied when they "
                            "are dequantized (LoraLoaderModelOnly works); hook-based LoRA on GGUF weights "
                            "is not supported")


def make_ops(base):
    """``base`` (a ``comfy.ops`` operations class) with the pack's ``Linear``."""
    linear = type("Linear", (_QuantLinear, base.Linear), {})
    return type(f"WanLoader_{base.__name__}", (base,), {"Linear": linear})


_PATCHER = None


def patcher_class():
    """The pack's ``ModelPatcher`` subclass (created on first use: ComfyUI is imported then)."""
    global _PATCHER
    if _PATCHER is not None:
        return _PATCHER
    import comfy.utils
    from comfy.lora import calculate_weight
    from comfy.model_patcher import ModelPatcher

    class WanModelPatcher(ModelPatcher):
        """ModelPatcher that gives LoRA patches to GGUF weights as attachments (see module doc)."""

        def patch_weight_to_device(self, key, device_to=None, inplace_update=False, return_weight=False,
                                   force_cast=False):
            weight = comfy.utils.get_attr(self.model, key)
            if not isinstance(weight, GGUFTensor):
                return super().patch_weight_to_device(key, device_to=device_to, inplace_update=inplace_update,
                                                      return_weight=return_weight, force_cast=force_cast)
            patches = [(self.patches[key], key)] if self.patches.get(key) else []
            if return_weight:  # callers (saving, LoRA extraction) want the patched weight's values
                out = weight.dequantize(torch.float32, device_to if device_to is not None else weight.device)
                for patch_list, patch_key in patches:
                    out = calculate_weight(patch_list, out, patch_key)
                return out
            # The module is moved by ModelPatcher.load itself; here only the patches change.
            weight.patches = patches
            return None

        def unpatch_model(self, device_to=None, unpatch_weights=True):
            if unpatch_weights:
                for p in self.model.parameters():
                    if isinstance(p, GGUFTensor):
                        p.patches = []
            return super().unpatch_model(device_to, unpatch_weights)

    _PATCHER = WanModelPatcher
    return _PATCHER
