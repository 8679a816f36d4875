"""Patch maths (comfy/lora.py ``calculate_weight``) and a LoRA adapter (comfy/weight_adapter/lora.py).

A patch is ``(strength_patch, value, strength_model, offset, function)`` as stored by
``ModelPatcher.add_patches``. ``value`` is a ``WeightAdapterBase`` (here only ``LoRAAdapter``), a tuple
``("diff", (tensor,))`` / ``(tensor,)`` / ``("set", (tensor,))`` / ``("model_as_lora", (target,))``, or
a list (nested patch chain).
"""
import logging

import torch

import comfy.model_management


class WeightAdapterBase:
    name = "base"

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        raise NotImplementedError


class LoRAAdapter(WeightAdapterBase):
    """Real signature: ``LoRAAdapter(loaded_keys, weights)``, ``weights = (up, down, alpha, mid,
    dora_scale, reshape)``; mid/dora/reshape must be None here. ``from_up_down`` is a stub helper."""
    name = "lora"

    def __init__(self, loaded_keys, weights):
        self.loaded_keys, self.weights = loaded_keys, tuple(weights) + (None,) * (6 - len(weights))
        if any(w is not None for w in self.weights[3:]):
            raise NotImplementedError("stub LoRAAdapter: mid / dora_scale / reshape are not supported")

    @classmethod
    def from_up_down(cls, up, down, alpha=None):
        return cls(set(), (up, down, alpha, None, None, None))

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        up, down, alpha = self.weights[:3]
        mat1 = comfy.model_management.cast_to_device(up, weight.device, intermediate_dtype)
        mat2 = comfy.model_management.cast_to_device(down, weight.device, intermediate_dtype)
        scale = alpha / mat2.shape[0] if alpha is not None else 1.0  # alpha / rank
        try:
            diff = torch.mm(mat1.flatten(start_dim=1), mat2.flatten(start_dim=1)).reshape(weight.shape)
            weight += function(((strength * scale) * diff).type(weight.dtype))
        except Exception as e:  # ComfyUI logs and leaves the weight unchanged
            logging.error("ERROR {} {} {}".format(self.name, key, e))
        return weight


def calculate_weight(patches, weight, key, intermediate_dtype=torch.float32, original_weights=None):
    """Applies ``patches`` to ``weight`` IN PLACE where possible and returns it. Per patch:
    ``weight *= strength_model`` (if != 1), then ``weight += function(strength * delta)``."""
    cast = comfy.model_management.cast_to_device
    for strength, v, strength_model, offset, function in patches:
        function = function or (lambda a: a)
        old_weight = None
        if offset is not None:
            old_weight, weight = weight, weight.narrow(offset[0], offset[1], offset[2])
        if strength_model != 1.0:
            weight *= strength_model
        if isinstance(v, list):  # nested chain: [(base, convert_func), *patches] -> a diff
            base = v[0][1](cast(v[0][0], weight.device, intermediate_dtype, copy=True), inplace=True)
            v = (calculate_weight(v[1:], base, key, intermediate_dtype=intermediate_dtype),)
        if isinstance(v, WeightAdapterBase):
            out = v.calculate_weight(weight, key, strength, strength_model, offset, function,
                                     intermediate_dtype, original_weights)
            if out is None:
                logging.warning("Calculate Weight Failed: {} {}".format(v.name, key))
            else:
                weight = out if old_weight is None else old_weight
            continue
        patch_type, data = ("diff", v) if len(v) == 1 else (v[0], v[1])
        if patch_type == "diff":
            diff = data[0]
            if strength != 0.0:
                if diff.shape != weight.shape:
                    logging.warning("WARNING SHAPE MISMATCH {} WEIGHT NOT MERGED {} != {}".format(key, diff.shape, weight.shape))
                else:
                    weight += function(strength * cast(diff, weight.device, weight.dtype))
        elif patch_type == "set":
            weight.copy_(data[0])
        elif patch_type == "model_as_lora":
            diff = cast(data[0], weight.device, intermediate_dtype) - \
                cast(original_weights[key][0][0], weight.device, intermediate_dtype)
            weight += function(strength * cast(diff, weight.device, weight.dtype))
        else:
            logging.warning("patch type not recognized {} {}".format(patch_type, key))
        if old_weight is not None:
            weight = old_weight
    return weight
