"""comfy.sample.sample: a small Euler flow-matching sampler with ComfyUI's call pattern.

Order per call (as ComfyUI's KSampler -> CFGGuider): model_options cloned and the patcher's wrappers /
callbacks merged into its transformer_options -> OUTER_SAMPLE wrappers -> PREPARE_SAMPLING wrappers ->
``load_models_gpu([model], memory_required=2x-batch estimate, minimum_memory_required=1x)`` (ON_LOAD
here, if it loads) -> ``pre_run()`` (ON_PRE_RUN) -> per step: interrupt check, ``prepare_state``
(ON_PREPARE_STATE), ONE batched ``apply_model`` for [uncond, cond] (cond_or_uncond == [1, 0]; cond only
when cfg == 1; two calls if the contexts cannot be concatenated) -> APPLY_MODEL -> DIFFUSION_MODEL
-> finally ``cleanup()`` (ON_CLEANUP). The model is NOT unloaded afterwards.
Simplified: "simple" scheduler and Euler for every sampler_name/scheduler; identity latent format;
no noise_mask, hooks, controlnets, area/mask conds, SAMPLER_SAMPLE/PREDICT_NOISE/CALC_COND_BATCH
wrappers; only the first entry of each conditioning list is used. Its dict goes through the model's
``extra_conds`` as in ComfyUI (concat_latent_image / concat_mask, clip_vision_output, vace_frames /
vace_mask / vace_strength; WAN21_Vace always adds vace_context and vace_strength).
"""
import math
import types

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
from comfy.patcher_extension import WrapperExecutor, WrappersMP, get_all_wrappers


def simple_sigmas(model_sampling, steps):
    ss = len(model_sampling.sigmas) / steps
    return torch.tensor([float(model_sampling.sigmas[-(1 + int(x * ss))]) for x in range(steps)] + [0.0])


def _sigmas(model_sampling, steps, denoise, start_step, last_step, force_full_denoise):
    if denoise is None or denoise > 0.9999:
        sigmas = simple_sigmas(model_sampling, steps)
    elif denoise <= 0.0:
        return torch.zeros(0)
    else:
        sigmas = simple_sigmas(model_sampling, int(steps / denoise))[-(steps + 1):]
    if last_step is not None and last_step < len(sigmas) - 1:
        sigmas = sigmas[:last_step + 1].clone()
        if force_full_denoise:
            sigmas[-1] = 0
    if start_step is not None:
        sigmas = sigmas[start_step:] if start_step < len(sigmas) - 1 else torch.zeros(0)
    return sigmas


def _can_concat(a, b):
    if a.keys() != b.keys():
        return False
    return all(a[k].shape == b[k].shape if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def _predict(model, x, sigma, conds, cfg, model_options):
    """CFG prediction of the denoised latent, batched and ordered as _calc_cond_batch does."""
    model.current_patcher.prepare_state(sigma, model_options)
    cfg1 = math.isclose(cfg, 1.0)  # ComfyUI skips the uncond pass (cfg1 optimisation)
    runs = [(conds["positive"], 0)] if cfg1 else [(conds["negative"], 1), (conds["positive"], 0)]
    batched = len(runs) == 1 or _can_concat(runs[0][0], runs[1][0])
    out = {}
    for group in ([runs] if batched else [[r] for r in runs]):
        to = comfy.patcher_extension.merge_nested_dicts(model.current_patcher.apply_hooks(None),
                                                        model_options["transformer_options"], copy_dict1=False)
        to.update(cond_or_uncond=[i for _, i in group], uuids=[None] * len(group), sigmas=sigma)
        c = {k: torch.cat([e[k] for e, _ in group]) if torch.is_tensor(v) else v for k, v in group[0][0].items()}
        c["transformer_options"] = to
        xs, ts, cou = torch.cat([x] * len(group)), sigma.repeat(len(group)), [i for _, i in group]
        if "model_function_wrapper" in model_options:
            res = model_options["model_function_wrapper"](model.apply_model, {"input": xs, "timestep": ts, "c": c, "cond_or_uncond": cou})
        else:
            res = model.apply_model(xs, ts, **c)
        out.update({i: r for (_, i), r in zip(group, res.chunk(len(group)))})
    return out[0] if cfg1 else out[1] + (out[0] - out[1]) * cfg


def sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise=1.0,
           disable_noise=False, start_step=None, last_step=None, force_full_denoise=False, noise_mask=None,
           sigmas=None, callback=None, disable_pbar=False, seed=None):
    if noise_mask is not None:
        raise NotImplementedError("stub sampler: noise_mask")
    inner = model.model
    if sigmas is None:
        sigmas = _sigmas(inner.model_sampling, steps, denoise, start_step, last_step, force_full_denoise)
    if sigmas.shape[-1] == 0:
        return latent_image
    model_options = comfy.model_patcher.create_model_options_clone(model.model_options)
    to = model_options["transformer_options"]
    comfy.patcher_extension.merge_nested_dicts(to.setdefault("wrappers", {}), model.wrappers, copy_dict1=False)
    comfy.patcher_extension.merge_nested_dicts(to.setdefault("callbacks", {}), model.callbacks, copy_dict1=False)

    def prepare_sampling(patcher, noise_shape, conds, model_options=None, force_full_load=False, force_offload=False):
        mem = patcher.model.memory_required([noise_shape[0] * 2] + list(noise_shape[1:]))
        min_mem = patcher.model.memory_required([noise_shape[0]] + list(noise_shape[1:]))
        comfy.model_management.load_models_gpu([patcher], memory_required=mem, minimum_memory_required=min_mem,
                                               force_full_load=force_full_load)
        return patcher.model, conds, []

    def outer_sample(noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
                     seed=None, latent_shapes=None):
        WrapperExecutor.new_executor(prepare_sampling, get_all_wrappers(WrappersMP.PREPARE_SAMPLING, model_options, is_model_options=True)
                                     ).execute(model, noise.shape, {"positive": positive, "negative": negative},
                                               model_options=model_options, force_full_load=False, force_offload=False)
        device = model.load_device
        try:
            x_noise, latent = noise.to(device, torch.float32), latent_image.to(device, torch.float32)
            s = sigmas.to(device)
            to["sample_sigmas"] = s
            model.pre_run()
            conds = {name: inner.extra_conds(noise=x_noise, latent_image=latent, device=device, cross_attn=cond[0][0], **cond[0][1])
                     for name, cond in (("positive", positive), ("negative", negative))}
            with torch.no_grad():  # k-diffusion samplers are @torch.no_grad()
                x = inner.model_sampling.noise_scaling(s[0], x_noise, latent)
                for i in range(len(s) - 1):
                    comfy.model_management.throw_exception_if_processing_interrupted()
                    denoised = _predict(inner, x, s[i].reshape(1).repeat(x.shape[0]), conds, cfg, model_options)
                    if callback is not None:
                        callback(i, denoised, x, len(s) - 1)
                    x = x + (x - denoised) / s[i] * (s[i + 1] - s[i])  # Euler step on d = (x - x0) / sigma
                return inner.model_sampling.inverse_noise_scaling(s[-1], x)
        finally:
            model.cleanup()

    guider = types.SimpleNamespace(model_patcher=model, model_options=model_options, cfg=cfg)  # stands in for CFGGuider
    out = WrapperExecutor.new_class_executor(outer_sample, guider, get_all_wrappers(WrappersMP.OUTER_SAMPLE, model_options, is_model_options=True)
                                             ).execute(noise, latent_image, sampler_name, sigmas, None, callback, disable_pbar, seed,
                                                       latent_shapes=[latent_image.shape])
    return out.to(device=comfy.model_management.intermediate_device(), dtype=comfy.model_management.intermediate_dtype())
