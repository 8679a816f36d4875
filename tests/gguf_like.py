"""Test doubles shaped like ComfyUI-GGUF (city96), for the default tier where it is not installed.

What they reproduce (from its ops.py / nodes.py): weights are a torch.Tensor subclass holding raw
quantized bytes with ``tensor_type``/``tensor_shape``/``patches`` attributes; layers dequantize on
the input's device at every forward and apply ``patches`` (LoRA) then; the patcher's
``patch_weight_to_device(key, device_to=None, inplace_update=False)`` has no ``return_weight`` and
attaches patches to quantized weights instead of computing them; its ``unpatch_model`` clears
``patches`` on the parameters it can see.
"""
import torch
import torch.nn.functional as F
from torch import nn

import comfy.lora
import comfy.model_patcher
import comfy.utils


class QuantType:
    """Stands in for gguf.GGMLQuantizationType members (only ``.name`` is read)."""

    def __init__(self, name):
        self.name = name


Q8 = QuantType("Q8_0")


class FakeGGMLTensor(torch.Tensor):
    @staticmethod
    def parameter(raw: torch.Tensor, tensor_type, tensor_shape) -> nn.Parameter:
        # nn.Parameter of a subclass returns a detached copy of the object: set attributes after
        p = nn.Parameter(torch.Tensor._make_subclass(FakeGGMLTensor, raw, False), requires_grad=False)
        p.tensor_type, p.tensor_shape, p.patches = tensor_type, torch.Size(tensor_shape), []
        return p


def quantize_rows(w: torch.Tensor) -> torch.Tensor:
    """Per-row int8 with an fp16 scale: [rows, 2 + cols] bytes (a Q8_0-like layout)."""
    scale = (w.abs().amax(dim=1, keepdim=True) / 127).clamp_min(1e-8).to(torch.float16)
    q = torch.round(w / scale.float()).clamp(-127, 127).to(torch.int8)
    return torch.cat([scale.view(torch.uint8), q.view(torch.uint8)], dim=1).contiguous()


def dequantize_rows(raw: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    raw = raw.reshape(raw.shape[0], -1) if raw.dim() == 2 else raw
    scale = raw[:, :2].contiguous().view(torch.float16).float()
    return (raw[:, 2:].contiguous().view(torch.int8).float() * scale).to(dtype)


class FakeGGMLLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        self.weight = FakeGGMLTensor.parameter(quantize_rows(w), Q8, w.shape)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        w = self.weight
        assert type(w) is FakeGGMLTensor and w.tensor_type is Q8, "quantized weight lost its type"
        # .data: the raw bytes as a plain tensor, wherever the engine bound them
        deq = dequantize_rows(w.data.to(x.device)).view(w.tensor_shape)
        for patch_list, key in w.patches:
            deq = comfy.lora.calculate_weight(patch_list, deq, key)
        bias = None if self.bias is None else self.bias.to(x.device, x.dtype)
        return F.linear(x, deq.to(x.dtype), bias)


class FakeGGUFModelPatcher(comfy.model_patcher.ModelPatcher):
    def patch_weight_to_device(self, key, device_to=None, inplace_update=False):  # no return_weight
        if key not in self.patches:
            return
        weight = comfy.utils.get_attr(self.model, key)
        if isinstance(weight, FakeGGMLTensor):
            weight.patches = [(self.patches[key], key)]  # attached, applied at dequant time
            return
        super().patch_weight_to_device(key, device_to=device_to, inplace_update=inplace_update)

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        if unpatch_weights:
            for _, p in self.model.named_parameters():
                if isinstance(p, FakeGGMLTensor):
                    p.patches = []
        return super().unpatch_model(device_to=device_to, unpatch_weights=unpatch_weights)


def to_gguf_like(patcher):
    """Quantize every Linear inside the blocks and make the patcher a GGUF-like one."""
    for block in patcher.model.diffusion_model.blocks:
        for name, mod in list(block.named_modules()):
            for child_name, child in list(mod.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(mod, child_name, FakeGGMLLinear(child))
    patcher.__class__ = FakeGGUFModelPatcher
    patcher.size = 0
    return patcher
