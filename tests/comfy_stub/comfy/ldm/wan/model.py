"""comfy.ldm.wan.model.WanModel: the pack's pure-torch ``tiny_wan.WanModel`` (same module tree and
state-dict keys as ComfyUI's) given ComfyUI's forward signature, so that -- as in ComfyUI -- the
DIFFUSION_MODEL wrappers run INSIDE ``WanModel.forward`` (i.e. after the module's forward pre-hooks)
with ``executor.class_obj`` = this WanModel and positional args
``(x, timestep, context, clip_fea, time_dim_concat, transformer_options, **kwargs)``.
"""
import importlib.util
from pathlib import Path

import comfy.patcher_extension

try:
    from wan22_blockswap import tiny_wan
except ImportError:  # the pack was not registered yet: load it via its own loader (_pack.py)
    _spec = importlib.util.spec_from_file_location("_pack", Path(__file__).resolve().parents[5] / "_pack.py")
    _pack = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_pack)
    _pack.import_pack()
    from wan22_blockswap import tiny_wan  # noqa: E402


class WanModel(tiny_wan.WanModel):
    """Behaviour-free subclass; ``comfy.model_base.WAN21`` upgrades a plain tiny_wan.WanModel to it and
    sets the plain attribute ``dtype`` (ComfyUI: the construction dtype, never updated afterwards)."""

    def forward(self, x, timestep, context, clip_fea=None, time_dim_concat=None, transformer_options={}, **kwargs):
        return comfy.patcher_extension.WrapperExecutor.new_class_executor(
            self._forward, self,
            comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, transformer_options),
        ).execute(x, timestep, context, clip_fea, time_dim_concat, transformer_options, **kwargs)

    def _forward(self, x, timestep, context, clip_fea=None, time_dim_concat=None, transformer_options={}, **kwargs):
        if time_dim_concat is not None:
            raise NotImplementedError("stub WanModel: time_dim_concat")
        # Other kwargs (control, reference_latent, ...) are ignored, like WAN ignores unknown conds.
        return tiny_wan.WanModel.forward(self, x, timestep, context, clip_fea=clip_fea,
                                         vace_context=kwargs.get("vace_context"),
                                         vace_strength=kwargs.get("vace_strength", 1.0),
                                         transformer_options=transformer_options)

