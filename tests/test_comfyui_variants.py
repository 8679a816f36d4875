"""Every WAN variant ComfyUI supports streams bit-identically through the swap node, with fp8_scaled weights.

Real-ComfyUI tier only (COMFYUI_PATH). For each variant (plain t2v, i2v, first-last-frame i2v, Fun
Control, FlowRVS, WAN 2.2 TI2V 5B, CausalWan, VACE, Camera 2.1 and 2.2, S2V, HuMo, Animate, SCAIL,
SCAIL-2, WanDancer) a tiny model is built from ComfyUI's own classes: the ``comfy.supported_models``
class of that variant, dim 128, one head, 4 blocks, every parameter filled from a seeded generator (its
layers are built uninitialized or zero-initialized). Its state dict is turned into the official
fp8_scaled form (every 2-D matrix of a block or VACE block float8_e4m3fn with a per-tensor
``.scale_weight``, plus the ``scaled_fp8`` marker) and given to UNETLoader's loading function, which has
to detect the intended variant from the state dict alone (CausalWan and FlowRVS: plus the file's
``config`` metadata) and turn exactly the block matrices into ``QuantizedTensor``.

The diffusion model's forward, fed the conditioning its variant reads (CLIP features, VACE contexts,
camera poses, audio, reference/pose/mask latents, music, the AR KV cache, per-frame timesteps), gives
the same bits on the plain patcher as on the node's clone streaming 2 blocks and all of them (VACE: also
one VACE block, run twice per forward for two contexts); the engine copied every streamed unit in and
counted every forward; the outputs do depend on the streamed blocks (bypassing the last one changes
them), and the input model still gives the reference afterwards. Each model runs two forwards: one with
the transformer options ComfyUI's sampler builds (the node's DIFFUSION_MODEL wrapper brackets it) and
one bare, where the engine finds the forward boundary itself; CausalWan runs two AR chunks sharing a KV
cache, as ComfyUI's AR sampler calls it (bypassing the wrapper). Everything runs under
``torch.inference_mode`` with fp32 compute on the CPU, as ComfyUI's executor runs a prompt.

Deliberate limits: Animate has 5 blocks, not 4, because it has ``num_layers // 5`` face-adapter blocks
and ComfyUI detects it by the first one's key; it runs without face pixels, because its motion encoder
only takes 512x512 frames (seconds per forward on a CPU), and the face adapter is not a streamed unit.
ComfyUI's MultiTalk / InfiniteTalk support is a set of patches on a plain WAN model, not a model class.
"""
import copy
import json
import logging
import os
import re

import pytest
import torch

pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="set COMFYUI_PATH to a ComfyUI checkout")]

if os.environ.get("COMFYUI_PATH"):
    import comfy.model_management as mm
    import comfy.patcher_extension
    import comfy.sd
    import comfy.supported_models
    from comfy.quant_ops import QuantizedTensor

    from wan22_blockswap.callbacks import _ENGINES, StreamedUnit
    from test_node import swap

log = logging.getLogger(__name__)

# The shape of every tiny model: what ComfyUI's WAN detection reads back (num_heads = dim // 128).
BASE = dict(image_model="wan2.1", dim=128, num_heads=1, ffn_dim=256, num_layers=4, patch_size=(1, 2, 2),
            freq_dim=256, window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6,
            in_dim=16, out_dim=16)
F, H, W = 2, 8, 8  # latent frames, height, width
TEXT_TOKENS = 8


def _clip(tokens=6):
    return ("clip_fea", (1, tokens, 1280))


# variant id -> supported-model class, unet_config beyond BASE, file metadata "config" (or None),
# ComfyUI's diffusion model class, conditioning fed to the forward (name -> shape or value).
VARIANTS = {
    "t2v": ("WAN21_T2V", dict(model_type="t2v"), None, "WanModel", {}),
    "i2v": ("WAN21_I2V", dict(model_type="i2v", in_dim=36), None, "WanModel", dict([_clip()])),
    # first-last-frame i2v: its CLIP projection carries img_emb.emb_pos (the token count is read from it)
    "flf_i2v": ("WAN21_I2V", dict(model_type="i2v", in_dim=36, flf_pos_embed_token_number=8), None,
                "WanModel", dict([_clip(8)])),
    "fun_control": ("WAN21_FunControl2V", dict(model_type="i2v", in_dim=48), None, "WanModel", dict([_clip()])),
    "flow_rvs": ("WAN21_FlowRVS", dict(model_type="flow_rvs"), {"model_type": "flow_rvs"}, "WanModel", {}),
    # WAN 2.2 TI2V 5B layout: 48 latent channels in and out, per-frame timesteps (WAN22.process_timestep)
    "ti2v_5b": ("WAN22_T2V", dict(model_type="t2v", in_dim=48, out_dim=48), None, "WanModel",
                {"timestep": torch.tensor([[700.0, 0.0]])}),
    "causal_wan": ("WAN21_CausalAR_T2V", dict(model_type="t2v", causal_ar=True), {"causal_ar": True},
                   "CausalWanModel", {}),
    # two VACE contexts: every mapped VACE block runs twice per forward
    "vace": ("WAN21_Vace", dict(model_type="vace", vace_in_dim=96, vace_layers=2), None, "VaceWanModel",
             {"vace_context": (1, 2, 96, F, H, W), "vace_strength": [1.0, 0.5]}),
    "camera_2.1": ("WAN21_Camera", dict(model_type="camera", in_dim=32), None, "CameraWanModel",
                   dict([_clip(), ("camera_conditions", (1, 24, F, 8 * H, 8 * W))])),
    "camera_2.2": ("WAN22_Camera", dict(model_type="camera_2.2", in_dim=36), None, "CameraWanModel",
                   {"camera_conditions": (1, 24, F, 8 * H, 8 * W)}),
    "s2v": ("WAN22_S2V", dict(model_type="s2v"), None, "WanModel_S2V",
            {"audio_embed": (1, 25, 1024, 4 * F), "reference_latent": (1, 16, 1, H, W)}),
    "humo": ("WAN21_HuMo", dict(model_type="humo"), None, "HumoWanModel",
             {"audio_embed": (1, F, 8, 5, 1280)}),
    # 5 blocks: Animate has num_layers // 5 face-adapter blocks, and its detection key is the first one's
    "animate": ("WAN22_Animate", dict(model_type="animate", in_dim=36, num_layers=5), None, "AnimateWanModel",
                dict([_clip(), ("pose_latents", (1, 16, F - 1, H, W))])),
    "scail": ("WAN21_SCAIL", dict(model_type="scail", in_dim=20), None, "SCAILWanModel",
              dict([_clip(), ("reference_latent", (1, 20, 1, H, W)), ("pose_latents", (1, 20, F, H // 2, W // 2))])),
    "scail2": ("WAN21_SCAIL2", dict(model_type="scail2", in_dim=20), None, "SCAIL2WanModel",
               dict([_clip(), ("reference_latent", (1, 20, 1, H, W)), ("pose_latents", (1, 20, F, H // 2, W // 2)),
                     ("ref_mask_latents", (1, 28, 1 + F, H, W)), ("sam_latents", (1, 28, F, H // 2, W // 2))])),
    "wandancer": ("WAN22_WanDancer", dict(model_type="wandancer", in_dim=36), None, "WanDancerModel",
                  dict([_clip(), ("clip_fea_ref", (1, 4, 1280)), ("audio_embed", (1, 16, 35)), ("fps", 30)])),
}

_BLOCK_MATRIX = re.compile(r"^(vace_)?blocks\.\d+\..+\.weight$")


def _tensor_names(module):
    return {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}


def build_state_dict(variant, seed=0):
    """The variant's tiny model from ComfyUI's own classes, every parameter from a seeded generator (its
    layers are built uninitialized or zero-initialized). Returns its float32 state dict and the names of
    its parameters and buffers."""
    cls_name, extra, _, _, _ = VARIANTS[variant]
    mc = getattr(comfy.supported_models, cls_name)(dict(BASE, **extra))
    mc.set_inference_dtype(torch.float32, None)
    dm = mc.get_model({}).diffusion_model
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in dm.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            if name.endswith("casual_audio_encoder.weights"):  # S2V normalizes by silu(w).sum(): keep it away from 0
                p.abs_().add_(1.0)
    return {k: v.detach().clone() for k, v in dm.state_dict().items()}, _tensor_names(dm)


def to_scaled_fp8(sd):
    """The official fp8_scaled file form (as write_form in test_comfyui_quantized.py writes it): every 2-D
    block matrix float8_e4m3fn with a one-element float32 ``.scale_weight``, and the ``scaled_fp8`` marker.
    Returns the quantized layer names."""
    layers = []
    for key in [k for k in sd if _BLOCK_MATRIX.match(k) and sd[k].ndim == 2]:
        w = sd[key].float()
        scale = w.abs().max() / torch.finfo(torch.float8_e4m3fn).max
        sd[key] = (w / scale).to(torch.float8_e4m3fn)
        sd[key[:-len(".weight")] + ".scale_weight"] = scale.reshape(1)
        layers.append(key[:-len(".weight")])
    sd["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    return layers


def load_variant(variant):
    """UNETLoader's loading function on the variant's fp8_scaled state dict; checks what ComfyUI detected."""
    cls_name, extra, config, dm_cls, _ = VARIANTS[variant]
    sd, names = build_state_dict(variant)
    layers = to_scaled_fp8(sd)
    metadata = None if config is None else {"config": json.dumps({"transformer": config})}
    patcher = comfy.sd.load_diffusion_model_state_dict(sd, metadata=metadata)
    assert patcher is not None, f"ComfyUI did not detect {variant}"
    assert type(patcher.model.model_config).__name__ == cls_name
    dm = patcher.model.diffusion_model
    assert type(dm).__name__ == dm_cls
    assert _tensor_names(dm) == names  # the same module tree (FLF's emb_pos, the VACE blocks...)
    assert len(dm.blocks) == extra.get("num_layers", BASE["num_layers"])
    quantized = {n[:-len(".weight")] for n, p in dm.named_parameters() if isinstance(p, QuantizedTensor)}
    assert quantized == set(layers)  # every block matrix, and nothing else, became a QuantizedTensor
    return patcher


def make_inputs(variant, dm, seed=1):
    g = torch.Generator().manual_seed(seed)
    in_dim = dm.patch_embedding.weight.shape[1]
    inputs = {"x": torch.randn(1, in_dim, 1 if variant == "causal_wan" else F, H, W, generator=g),
              "timestep": torch.tensor([700.0]),
              "context": torch.randn(1, TEXT_TOKENS, 4096, generator=g)}
    for name, spec in VARIANTS[variant][4].items():
        if isinstance(spec, tuple):
            spec = torch.randn(spec, generator=g)
        inputs[name] = spec
    if variant == "causal_wan":  # the second AR chunk
        inputs["x_next"] = torch.randn(inputs["x"].shape, generator=g)
    return inputs


def sampler_options(patcher):
    """The transformer options ComfyUI's sampler hands the model: the patcher's, plus its wrappers."""
    opts = copy.copy(patcher.model_options.get("transformer_options", {}))
    opts["wrappers"] = {}
    comfy.patcher_extension.merge_nested_dicts(opts["wrappers"], patcher.wrappers, copy_dict1=False)
    return opts


def _fresh(inputs):
    return {k: v.clone() if isinstance(v, torch.Tensor) else copy.copy(v) for k, v in inputs.items()}


def run_forwards(patcher, variant, inputs):
    """Two forwards of the loaded diffusion model: (with the sampler's options, bare), or for CausalWan
    two AR chunks sharing one KV cache, as ComfyUI's AR sampler runs them. Loaded and begun as a
    sampler begins a run (load, then ``pre_run``: a run's figures start there)."""
    mm.load_models_gpu([patcher])
    patcher.pre_run()
    dm = patcher.model.diffusion_model
    if variant == "causal_wan":
        kw = _fresh(inputs)
        chunks = (kw.pop("x"), kw.pop("x_next"))
        frame_len = (H // 2) * (W // 2)
        state = {"kv_caches": dm.init_kv_caches(1, len(chunks) * frame_len, "cpu", torch.float32),
                 "crossattn_caches": dm.init_crossattn_caches(1, "cpu", torch.float32)}
        outs = []
        for i, x in enumerate(chunks):
            opts = dict(sampler_options(patcher), ar_state=dict(state, start_frame=i))
            outs.append(dm(x, transformer_options=opts, **kw))
        return outs
    return [dm(**_fresh(inputs), transformer_options=opts) for opts in (sampler_options(patcher), {})]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Models this small gain nothing from intra-op threads, and on a shared 2-core machine a second
    thread waiting for a busy core makes every small op ~50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _unload_between_tests():
    yield
    mm.unload_all_models()


@pytest.mark.parametrize("variant", list(VARIANTS))
@torch.inference_mode()
def test_variant_streams_bit_identically_with_fp8_scaled_weights(variant):
    patcher = load_variant(variant)
    dm = patcher.model.diffusion_model
    inputs = make_inputs(variant, dm)
    reference = run_forwards(patcher, variant, inputs)
    out_dim = BASE["out_dim"] if variant != "ti2v_5b" else 48
    for out in reference:
        assert out.dtype == torch.float32 and out.shape[1] == out_dim and out.shape[-2:] == (H, W)
        assert torch.isfinite(out).all() and out.abs().max() > 0
    if variant == "causal_wan":  # the second chunk attended to the first one's cached keys
        assert not torch.equal(reference[0], reference[1])
    else:  # both calls are one computation
        assert torch.equal(reference[0], reference[1])
    # the outputs depend on the blocks that will stream: without the last one they differ
    bypass = dm.blocks[-1].register_forward_hook(lambda module, args, out: args[0])
    try:
        assert not any(torch.equal(o, r) for o, r in zip(run_forwards(patcher, variant, inputs), reference))
    finally:
        bypass.remove()
    mm.unload_all_models()

    num_blocks = len(dm.blocks)
    extra = {"vace_blocks_to_swap": 1} if variant == "vace" else {}
    for n in (2, num_blocks):
        swapped = swap(patcher, n, **extra)
        outs = run_forwards(swapped, variant, inputs)
        engine = _ENGINES[dm]
        engine.end_run()
        streamed = n + len(extra)  # VACE: one VACE block too
        assert engine.plan.block_indices == tuple(range(num_blocks - n, num_blocks))
        assert engine.plan.vace_indices == ((1,) if extra else ())  # the last of the two VACE blocks
        assert len(engine.plan.units) == streamed
        # the forwards ran the node's stand-ins, and each streamed unit was copied in
        assert all(isinstance(dm.get_submodule(u), StreamedUnit) for u in engine.plan.units)
        assert sorted(engine.tracker.unit_copies) == sorted(engine.plan.units)
        assert min(engine.tracker.unit_copies.values()) > 0 and engine.tracker.copies >= streamed
        assert engine.tracker.forwards == len(outs)
        for i, (out, ref) in enumerate(zip(outs, reference)):
            assert torch.equal(out, ref), f"{variant} N={n} forward {i}: {(out - ref).abs().max()}"
        log.info("%s N=%d: %d copies over %d forwards", variant, n, engine.tracker.copies, engine.tracker.forwards)
        mm.unload_all_models()
    # the input model still gives the reference after the swapped clones ran
    assert all(torch.equal(o, r) for o, r in zip(run_forwards(patcher, variant, inputs), reference))
