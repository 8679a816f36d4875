"""load_diffusion_model_state_dict / load_diffusion_model for WAN state dicts with ComfyUI keys.

Detection follows comfy/model_detection.py (WAN 2.1 branch): dim from head.modulation, out_dim from
head.head.weight (// 4 for patch 1x2x2), ffn_dim, num_layers, in_dim, vace (vace_patch_embedding +
vace_blocks count), i2v (img_emb.proj.0.bias), num_heads = dim // 128, and
metadata["config"]["transformer"] overrides. Stub additions: text_dim / image_dim / freq_dim are read from the
weights (ComfyUI uses its defaults 4096 / 1280 / 256) and ``model_options["num_heads"]`` overrides the head
count (tiny models use head_dim 64). Dtype: ``model_options["dtype"]`` or the weights' dtype (ComfyUI
may pick another compute dtype per device). Weights loaded with strict=False, left-overs logged.
"""
import json
import logging
from collections import Counter

import torch

import comfy.ldm.wan.model
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.utils

tiny_wan = comfy.ldm.wan.model.tiny_wan


def _count_blocks(keys, prefix):
    n = 0
    while any(k.startswith(f"{prefix}{n}.") for k in keys):
        n += 1
    return n


def _detect_wan(sd, metadata=None):
    if "head.modulation" not in sd:
        return None
    dim = sd["head.modulation"].shape[-1]
    cfg = dict(dim=dim, out_dim=sd["head.head.weight"].shape[0] // 4, num_heads=dim // 128,
               ffn_dim=sd["blocks.0.ffn.0.weight"].shape[0], num_layers=_count_blocks(sd, "blocks."),
               in_dim=sd["patch_embedding.weight"].shape[1], text_dim=sd["text_embedding.0.weight"].shape[1],
               freq_dim=sd["time_embedding.0.weight"].shape[1], patch_size=(1, 2, 2), eps=1e-6)
    if "vace_patch_embedding.weight" in sd:
        cfg.update(model_type="vace", vace_in_dim=sd["vace_patch_embedding.weight"].shape[1],
                   vace_layers=_count_blocks(sd, "vace_blocks."))
    elif "img_emb.proj.0.bias" in sd:
        cfg.update(model_type="i2v", image_dim=sd["img_emb.proj.0.bias"].shape[0])
    else:
        cfg["model_type"] = "ti2v22" if cfg["out_dim"] == 48 else "t2v"  # ComfyUI: t2v + WAN22 class
    if metadata is not None and "config" in metadata:
        cfg.update(json.loads(metadata["config"]).get("transformer", {}))
    return cfg


def build_model(config, dtype, operations=None):
    """The WAN21 BaseModel around a tiny WanModel with uninitialised ``dtype`` weights. With
    ``operations`` (a ``model_config.custom_operations`` class) every Linear is built by
    ``operations.Linear`` and the other layers become its classes, as ComfyUI builds WAN with them."""
    with torch.device("meta"):
        wan = tiny_wan.WanModel(config)
    wan = wan.to_empty(device="cpu").to(dtype)
    wan.patch_embedding.float()  # fp32 patch embeddings, as ComfyUI
    if wan.vace_patch_embedding is not None:
        wan.vace_patch_embedding.float()
    if operations is not None:
        for parent in list(wan.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear:
                    setattr(parent, name, operations.Linear(child.in_features, child.out_features,
                                                            bias=child.bias is not None, dtype=dtype))
        comfy.ops.adopt_comfy_ops(wan)
    cls = {"vace": comfy.model_base.WAN21_Vace, "ti2v22": comfy.model_base.WAN22}.get(config.model_type, comfy.model_base.WAN21)
    return cls(wan, image_to_video=config.model_type == "i2v")


def config_from_detected(cfg):
    """tiny_wan.WanConfig from ``_detect_wan``'s dict (VACE: ComfyUI's block spacing)."""
    cfg = dict(cfg)
    if cfg["model_type"] == "vace":
        cfg["vace_layers"] = tiny_wan.vace_layer_indices(cfg["num_layers"], int(cfg["vace_layers"]))
    known = tiny_wan.WanConfig.__dataclass_fields__
    return tiny_wan.WanConfig(**{k: v for k, v in cfg.items() if k in known})


def load_diffusion_model_state_dict(sd, model_options={}, metadata=None, disable_dynamic=False):
    prefix = "model.diffusion_model." if sum(k.startswith("model.diffusion_model.") for k in sd) > 5 else "model."
    stripped = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    sd = stripped or sd
    cfg = _detect_wan(sd, metadata)
    if cfg is None:
        return None
    if "num_heads" in model_options:
        cfg["num_heads"] = model_options["num_heads"]
    if cfg["model_type"] == "vace":  # ComfyUI stores a count and spaces the blocks itself
        cfg["vace_layers"] = tiny_wan.vace_layer_indices(cfg["num_layers"], int(cfg["vace_layers"]))
    known = tiny_wan.WanConfig.__dataclass_fields__
    config = tiny_wan.WanConfig(**{k: v for k, v in cfg.items() if k in known})
    floats = Counter(t.dtype for t in sd.values() if t.is_floating_point())
    dtype = model_options.get("dtype") or (floats.most_common(1)[0][0] if floats else torch.float32)

    load_device = model_options.get("load_device", comfy.model_management.get_torch_device())
    offload_device = model_options.get("offload_device", comfy.model_management.unet_offload_device())
    model = build_model(config, dtype)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)
    missing, unexpected = model.diffusion_model.load_state_dict(sd, strict=False)
    if missing:
        logging.warning("missing diffusion model keys: %s", missing)
    if unexpected:
        logging.info("left over keys in diffusion model: %s", unexpected)
    return patcher


def load_diffusion_model(unet_path, model_options={}, disable_dynamic=False):
    sd, metadata = comfy.utils.load_torch_file(unet_path, return_metadata=True)
    model = load_diffusion_model_state_dict(sd, model_options=model_options, metadata=metadata)
    if model is None:
        raise RuntimeError("ERROR: Could not detect model type of: {}".format(unet_path))
    model.cached_patcher_init = (load_diffusion_model, (unet_path, model_options))
    return model
