"""BaseModel / WAN21 (subset of comfy/model_base.py) and the flow-matching ModelSampling WAN uses.

``WAN21(diffusion_model, shift=8.0)`` (ComfyUI: ``WAN21(model_config, ...)`` builds the WanModel
itself) adopts a tiny_wan.WanModel IN PLACE: its class becomes ``comfy.ldm.wan.model.WanModel`` and its
Linear/Conv3d/LayerNorm/RMSNorm modules become ``comfy.ops.disable_weight_init`` ops, as ComfyUI
builds them. The state dict therefore has ComfyUI's keys: ``diffusion_model.*`` + ``model_sampling.sigmas``.
"""
import math

import torch

import comfy.ldm.wan.model
import comfy.model_management
import comfy.ops
import comfy.patcher_extension


def time_snr_shift(alpha, t):
    if alpha == 1.0:
        return t
    return alpha * t / (1 + (alpha - 1) * t)


class ModelSamplingDiscreteFlow(torch.nn.Module):
    """CONST (flow) parameterisation: x_t = sigma * noise + (1 - sigma) * x0, model predicts velocity."""

    def __init__(self, shift=1.0, multiplier=1000, timesteps=1000):
        super().__init__()
        self.shift, self.multiplier = shift, multiplier
        self.register_buffer("sigmas", self.sigma(torch.arange(1, timesteps + 1, 1) / timesteps * multiplier))

    def timestep(self, sigma):
        return sigma * self.multiplier

    def sigma(self, timestep):
        return time_snr_shift(self.shift, timestep / self.multiplier)

    def calculate_input(self, sigma, noise):
        return noise

    def calculate_denoised(self, sigma, model_output, model_input):
        sigma = sigma.view(sigma.shape[:1] + (1,) * (model_output.ndim - 1))
        return model_input - model_output * sigma

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        return sigma * noise + (1.0 - sigma) * latent_image

    def inverse_noise_scaling(self, sigma, latent):
        return latent / (1.0 - sigma)


class BaseModel(torch.nn.Module):
    memory_usage_factor = 1.0

    def __init__(self, diffusion_model, shift=1.0, device=None):
        super().__init__()
        if isinstance(diffusion_model, comfy.ldm.wan.model.tiny_wan.WanModel):
            diffusion_model.__class__ = comfy.ldm.wan.model.WanModel
            if not hasattr(diffusion_model, "dtype"):
                diffusion_model.dtype = diffusion_model.text_embedding[0].weight.dtype
        self.diffusion_model = comfy.ops.adopt_comfy_ops(diffusion_model)
        self.model_sampling = ModelSamplingDiscreteFlow(shift=shift)
        self.device = device
        self.manual_cast_dtype = None
        self.current_patcher = None

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        return comfy.patcher_extension.WrapperExecutor.new_class_executor(
            self._apply_model, self,
            comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, transformer_options),
        ).execute(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    def _apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        sigma = t
        xc = self.model_sampling.calculate_input(sigma, x)
        if c_concat is not None:
            xc = torch.cat([xc, comfy.model_management.cast_to_device(c_concat, xc.device, xc.dtype)], dim=1)
        dtype = self.get_dtype_inference()
        xc = xc.to(dtype)
        t = self.process_timestep(self.model_sampling.timestep(t).float(), x=x)
        context = None if c_crossattn is None else comfy.model_management.cast_to_device(c_crossattn, xc.device, dtype)
        extra = {k: (v.to(device=xc.device, dtype=dtype if v.is_floating_point() else v.dtype)
                     if torch.is_tensor(v) else v) for k, v in kwargs.items()}
        transformer_options = transformer_options.copy()  # shallow copy, as ComfyUI
        transformer_options["prefetch_dynamic_vbars"] = self.current_patcher is not None and self.current_patcher.is_dynamic()
        out = self.diffusion_model(xc, t, context=context, control=control, transformer_options=transformer_options, **extra)
        return self.model_sampling.calculate_denoised(sigma, out.float(), x)

    def process_timestep(self, timestep, **kwargs):
        return timestep

    def get_dtype(self):
        return self.diffusion_model.dtype

    def get_dtype_inference(self):
        return self.manual_cast_dtype or self.get_dtype()

    def extra_conds_shapes(self, **kwargs):
        return {}

    def concat_cond(self, **kwargs):
        return None

    def extra_conds(self, **kwargs):
        """Model kwargs for one conditioning entry (kwargs: noise, cross_attn + the cond dict's items)."""
        out = {}
        concat = self.concat_cond(**kwargs)
        if concat is not None:
            out["c_concat"] = concat
        if kwargs.get("cross_attn") is not None:
            out["c_crossattn"] = kwargs["cross_attn"]
        return out

    def memory_required(self, input_shape, cond_shapes={}):
        """ComfyUI's non-flash-attention estimate: batch * prod(spatial) * 0.15 * factor MiB."""
        area = input_shape[0] * math.prod(input_shape[2:])
        return area * 0.15 * self.memory_usage_factor * 1024 * 1024


class WAN21(BaseModel):
    def __init__(self, diffusion_model, shift=8.0, image_to_video=False, device=None):
        super().__init__(diffusion_model, shift=shift, device=device)
        self.image_to_video = image_to_video
        self.memory_usage_factor = self.diffusion_model.dim / 2222  # supported_models.WAN21_T2V

    def concat_cond(self, noise=None, concat_latent_image=None, concat_mask=None, **kwargs):
        """Extra input channels (i2v: 36 = 16 + 4 mask + 16 image). Identity latent format, no resizing."""
        extra = self.diffusion_model.patch_embedding.weight.shape[1] - noise.shape[1]
        if extra == 0:
            return None
        image = concat_latent_image
        if image is None:
            image = torch.zeros((noise.shape[0], extra) + tuple(noise.shape[2:]), dtype=noise.dtype, device=noise.device)
        if extra != image.shape[1] + 4 and (not self.image_to_video or extra == image.shape[1]):
            return image
        image = image[:, :extra - 4]
        mask = concat_mask if concat_mask is not None else kwargs.get("denoise_mask")
        if mask is None:
            mask = torch.zeros_like(noise)[:, :4]
        else:
            mask = 1.0 - (mask if mask.shape[1] == 4 else mask.mean(dim=1, keepdim=True).expand(-1, 4, *mask.shape[2:]))
        return torch.cat((mask.to(image), image), dim=1)

    def extra_conds(self, **kwargs):
        out = super().extra_conds(**kwargs)
        clip_vision_output = kwargs.get("clip_vision_output")
        if clip_vision_output is not None:
            out["clip_fea"] = clip_vision_output.penultimate_hidden_states
        return out


class WAN21_Vace(WAN21):
    def extra_conds(self, **kwargs):
        """Always provides vace_context [B, N, 96, T, H, W] (zeros + ones mask by default) and vace_strength."""
        out = super().extra_conds(**kwargs)
        noise = kwargs["noise"]
        shape = list(noise.shape)
        frames = kwargs.get("vace_frames") or [noise.new_zeros([shape[0], 32] + shape[2:])]
        masks = kwargs.get("vace_mask") or [noise.new_ones([shape[0], 64] + shape[2:])] * len(frames)
        out["vace_context"] = torch.stack([torch.cat([f.to(noise), m.to(noise)], dim=1) for f, m in zip(frames, masks)], dim=1)
        out["vace_strength"] = kwargs.get("vace_strength", [1.0] * len(frames))
        return out


class WAN22(WAN21):  # WAN 2.2 TI2V-5B (48 latent channels); per-token timesteps not modelled
    pass
