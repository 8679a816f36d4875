"""model_config_from_unet for WAN state dicts: comfy/model_detection.py's WAN 2.1 branch (via
``comfy.sd._detect_wan``) returning a config shaped like comfy/supported_models.py's WAN classes
(``unet_config`` with ComfyUI's ``image_model`` / ``model_type`` names, ``supported_inference_dtypes``,
``set_inference_dtype``, ``custom_operations``, ``get_model``, ``process_unet_state_dict``).

Simplified: only the WAN family; num_heads = dim // 128 (ComfyUI's rule); other architectures -> None.
"""
import torch

import comfy.sd


class WanModelConfig:
    supported_inference_dtypes = [torch.float16, torch.bfloat16, torch.float32]  # WAN21's, in its order

    def __init__(self, detected):
        self._detected = dict(detected)
        kind = detected["model_type"]
        self.unet_config = {
            "image_model": "wan2.1",
            "model_type": "t2v" if kind == "ti2v22" else kind,  # ComfyUI: the 5B is t2v + out_dim 48
            **{k: detected[k] for k in ("dim", "out_dim", "num_heads", "ffn_dim", "num_layers", "in_dim")},
        }
        if kind == "vace":
            self.unet_config["vace_layers"] = detected["vace_layers"]
        self.custom_operations = None
        self.manual_cast_dtype = None
        self.quant_config = None
        self.optimizations = {"fp8": False}

    def set_inference_dtype(self, dtype, manual_cast_dtype, device=None):
        self.unet_config["dtype"] = dtype
        self.manual_cast_dtype = manual_cast_dtype

    def process_unet_state_dict(self, state_dict):
        return state_dict

    def get_model(self, state_dict, prefix="", device=None):
        model = comfy.sd.build_model(comfy.sd.config_from_detected(self._detected),
                                     self.unet_config.get("dtype") or torch.float32, self.custom_operations)
        model.model_config = self
        model.manual_cast_dtype = self.manual_cast_dtype
        return model


def model_config_from_unet(state_dict, unet_key_prefix, use_base_if_no_match=False, metadata=None):
    sd = {k[len(unet_key_prefix):]: v for k, v in state_dict.items() if k.startswith(unet_key_prefix)}
    detected = comfy.sd._detect_wan(sd, metadata)
    return None if detected is None else WanModelConfig(detected)
