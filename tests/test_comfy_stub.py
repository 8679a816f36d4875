"""Self-checks of the fake ``comfy`` package in tests/comfy_stub: the ComfyUI behaviours the pack relies on."""
import gc
import sys
from pathlib import Path

import pytest
import torch

STUB = str(Path(__file__).resolve().parent / "comfy_stub")
if STUB not in sys.path:
    sys.path.insert(0, STUB)

import comfy  # noqa: E402

if not str(Path(comfy.__file__).resolve()).startswith(STUB):
    pytest.skip("a real ComfyUI is imported; these tests check the stand-in", allow_module_level=True)

import comfy.lora  # noqa: E402
import comfy.model_management as mm  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402
from comfy.model_patcher import LowVramPatch  # noqa: E402
from comfy.patcher_extension import CallbacksMP, WrappersMP  # noqa: E402
from wan22_blockswap import tiny_wan  # noqa: E402

Q = "diffusion_model.blocks.0.self_attn.q.weight"
FFN = "diffusion_model.blocks.1.ffn.0.weight"


@pytest.fixture(autouse=True)
def clean_state():
    mm.unload_all_models()
    yield
    mm.unload_all_models()
    mm.STUB_VRAM_BYTES = None
    mm.EXTRA_RESERVED_VRAM, mm.MINIMUM_INFERENCE_BASE = 400 * 1024 * 1024, 0.8 * 1024 ** 3
    mm.interrupt_current_processing(False)


def make(variant="t2v", seed=0):
    cfg = tiny_wan.tiny_config(variant)
    ref = tiny_wan.WanModel(cfg).init_weights(seed).eval()
    patcher = comfy.sd.load_diffusion_model_state_dict(ref.state_dict(), {"num_heads": cfg.num_heads})
    return patcher, ref, tiny_wan.make_inputs(cfg)


def record(patcher, log, *types):
    for t in types:
        patcher.add_callback(t, lambda *a, t=t: log.append((t, a)))


def sample(patcher, inputs, steps=2, cfg=5.0, **kw):
    x = inputs["x"]
    pos = [[inputs["context"], {}]]
    neg = [[torch.zeros_like(inputs["context"]), {}]]
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    return comfy.sample.sample(patcher, noise, steps, cfg, "euler", "simple", pos, neg, torch.zeros_like(x), **kw)


@pytest.mark.parametrize("variant", ["t2v", "i2v", "ti2v22", "vace"])
def test_loader_detects_variant_and_matches_tiny_forward(variant):
    patcher, ref, inputs = make(variant)
    dm = patcher.model.diffusion_model
    assert type(patcher.model).__name__ == {"vace": "WAN21_Vace", "ti2v22": "WAN22"}.get(variant, "WAN21")
    assert isinstance(dm, tiny_wan.WanModel) and dm.config == ref.config
    assert patcher.load_device == mm.get_torch_device() and patcher.offload_device == mm.unet_offload_device()
    kwargs = {k: v for k, v in inputs.items() if k not in ("x", "timestep", "context")}
    with torch.no_grad():
        assert torch.equal(dm(inputs["x"], inputs["timestep"], inputs["context"], **kwargs), ref(**inputs))


def test_clone_shares_model_and_copies_containers():
    p, _, _ = make()
    log = []
    record(p, log, CallbacksMP.ON_CLONE)

    class Attachment:
        def on_model_patcher_clone(self):
            return Attachment()

    p.set_attachments("a", Attachment())
    p.add_object_patch("obj", 1)
    p.model_options["transformer_options"]["x"] = [1]
    c = p.clone()
    assert c.model is p.model and c.is_clone(p) and c.parent is p
    assert c.backup is p.backup and c.object_patches_backup is p.object_patches_backup
    assert c.patches_uuid == p.patches_uuid
    assert log == [(CallbacksMP.ON_CLONE, (p, c))]
    assert c.get_attachment("a") is not p.get_attachment("a")
    c.add_object_patch("obj", 2)
    c.add_callback(CallbacksMP.ON_LOAD, print)
    c.model_options["transformer_options"]["x"].append(2)
    assert p.object_patches["obj"] == 1 and p.get_all_callbacks(CallbacksMP.ON_LOAD) == []
    assert p.model_options["transformer_options"]["x"] == [1]
    assert len(c.get_all_callbacks(CallbacksMP.ON_CLONE)) == 1  # callbacks copied, lists not shared
    c.add_patches({Q: ("diff", (torch.zeros(128, 128),))})
    assert c.patches_uuid != p.patches_uuid and Q not in p.patches


def test_object_patch_applied_at_load_and_restored_at_unpatch():
    p, _, _ = make()
    original = p.model.model_sampling
    replacement = torch.nn.Identity()
    p.add_object_patch("model_sampling", replacement)
    assert p.get_model_object("model_sampling") is replacement and p.model.model_sampling is original
    mm.load_models_gpu([p])
    assert p.model.model_sampling is replacement and p.get_model_object("model_sampling") is replacement
    assert p.object_patches_backup["model_sampling"] is original
    mm.unload_all_models()
    assert p.model.model_sampling is original and p.object_patches_backup == {}


def test_on_load_skipped_on_reuse_and_on_detach_false_for_replaced_entries():
    p, _, _ = make()
    log = []
    record(p, log, CallbacksMP.ON_LOAD, CallbacksMP.ON_DETACH)
    mm.load_models_gpu([p])
    assert log == [(CallbacksMP.ON_LOAD, (p, mm.get_torch_device(), 1e32, False, True))]
    log.clear()
    mm.load_models_gpu([p])  # the same patcher again: its own entry is detached (False), no ON_LOAD
    assert log == [(CallbacksMP.ON_DETACH, (p, False))]
    log.clear()
    c = p.clone()  # same patches_uuid: weights are reused, the parent's entry is detached
    mm.load_models_gpu([c])
    assert log == [(CallbacksMP.ON_DETACH, (p, False))]
    assert [lm.model for lm in mm.current_loaded_models] == [c]
    log.clear()
    c2 = p.clone()
    c2.add_patches({Q: ("diff", (torch.ones(128, 128),))})  # new uuid: unpatch + reload -> ON_LOAD
    mm.load_models_gpu([c2])
    assert [e[0] for e in log] == [CallbacksMP.ON_DETACH, CallbacksMP.ON_LOAD] and log[0][1] == (c, False)
    log.clear()
    mm.unload_all_models()
    assert log == [(CallbacksMP.ON_DETACH, (c2, True))] and p.loaded_size() == 0


def test_lora_diff_applied_at_load_and_removed_by_unpatch():
    p, ref, _ = make()
    orig = ref.blocks[0].self_attn.q.weight.detach().clone()
    diff = torch.randn(128, 128)
    c = p.clone()
    assert c.add_patches({Q: ("diff", (diff,)), "not.a.key": ("diff", (diff,))}, 0.5) == [Q]
    assert c.patches[Q] == [(0.5, ("diff", (diff,)), 1.0, None, None)]
    mm.load_models_gpu([c])
    q = c.model.diffusion_model.blocks[0].self_attn.q
    assert torch.allclose(q.weight, orig + 0.5 * diff) and q.comfy_patched_weights is True
    assert torch.equal(c.backup[Q].weight, orig)
    mm.unload_all_models()
    assert torch.equal(q.weight, orig) and not hasattr(q, "comfy_patched_weights") and c.backup == {}


def test_calculate_weight_strengths_and_lora_adapter():
    w = torch.ones(4, 3)
    up, down = torch.randn(4, 2), torch.randn(2, 3)
    lora = comfy.lora.LoRAAdapter.from_up_down(up, down, alpha=1.0)
    out = comfy.lora.calculate_weight([(2.0, lora, 0.5, None, None)], w.clone(), "k")
    assert torch.allclose(out, 0.5 * torch.ones(4, 3) + 2.0 * (1.0 / 2) * (up @ down))
    out = comfy.lora.calculate_weight([(1.0, (torch.full((4, 3), 3.0),), 1.0, None, None)], w.clone(), "k")
    assert torch.equal(out, torch.full((4, 3), 4.0))
    assert comfy.utils.string_to_seed("abc") == 891568578  # zlib.crc32(b"abc")


def test_full_load_accounting_and_load_list():
    p, _, _ = make()
    names = [e[2] for e in p._load_list()]
    assert "diffusion_model.blocks.0" not in names and "diffusion_model.head" not in names  # own modulation
    assert "diffusion_model.blocks.0.self_attn.q" in names and len(names[0]) and len(p._load_list()[0]) == 5
    mm.load_models_gpu([p])
    assert p.loaded_size() == p.model_size() == mm.module_size(p.model)
    assert p.model.model_lowvram is False and p.model.current_weight_patches_uuid == p.patches_uuid


def test_wrappers_see_comfy_call_shape_and_run_inside_forward():
    p, _, inputs = make()
    seen = []
    dm = p.model.diffusion_model
    dm.register_forward_pre_hook(lambda m, a: seen.append("pre_hook"))

    def apply_wrapper(executor, *args, **kwargs):
        seen.append(("apply", executor.class_obj is p.model, len(args)))
        return executor(*args, **kwargs)

    def dm_wrapper(executor, x, timestep, context, clip_fea, time_dim_concat, transformer_options, **kwargs):
        seen.append(("dm", executor.class_obj is dm, sorted(kwargs), transformer_options["cond_or_uncond"]))
        return executor(x, timestep, context, clip_fea, time_dim_concat, transformer_options, **kwargs)

    p.add_wrapper(WrappersMP.APPLY_MODEL, apply_wrapper)
    p.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "swap", dm_wrapper)
    blocks = []
    p.set_model_patch_replace(lambda args, extra: (blocks.append(args["transformer_options"]["block_index"]),
                                                   extra["original_block"](args))[1], "dit", "double_block", 3)
    sample(p, inputs, steps=1)
    # APPLY_MODEL runs outside the WanModel call, DIFFUSION_MODEL inside it (after its forward pre-hooks).
    assert seen == [("apply", True, 6), "pre_hook", ("dm", True, ["control"], [1, 0])]
    assert blocks == [3]
    p.remove_wrappers_with_key(WrappersMP.DIFFUSION_MODEL, "swap")
    assert p.get_all_wrappers(WrappersMP.DIFFUSION_MODEL) == []


def test_sampler_lifecycle_and_interrupt():
    p, _, inputs = make()
    log = []
    record(p, log, CallbacksMP.ON_LOAD, CallbacksMP.ON_PRE_RUN, CallbacksMP.ON_CLEANUP)
    calls = []
    p.add_wrapper(WrappersMP.APPLY_MODEL, lambda ex, *a, **k: (calls.append(a[0].shape[0]), ex(*a, **k))[1])
    out = sample(p, inputs, steps=3)
    assert [e[0] for e in log] == [CallbacksMP.ON_LOAD, CallbacksMP.ON_PRE_RUN, CallbacksMP.ON_CLEANUP]
    assert calls == [2, 2, 2] and out.shape == inputs["x"].shape and out.dtype == torch.float32
    assert torch.equal(out, sample(p, inputs, steps=3))  # deterministic; 2nd run: no ON_LOAD
    assert [e[0] for e in log[3:]] == [CallbacksMP.ON_PRE_RUN, CallbacksMP.ON_CLEANUP]
    log.clear()
    mm.interrupt_current_processing()
    with pytest.raises(mm.InterruptProcessingException):
        sample(p, inputs)
    assert [e[0] for e in log] == [CallbacksMP.ON_PRE_RUN, CallbacksMP.ON_CLEANUP]
    assert not mm.processing_interrupted()  # raising consumes the flag, as in ComfyUI


def test_fake_vram_budget_gives_lowvram_with_lowvram_patches():
    p, _, inputs = make()
    c = p.clone()
    c.add_patches({FFN: ("diff", (torch.randn(256, 128),))})
    full = sample(c, inputs)
    mm.unload_all_models()
    mm.STUB_VRAM_BYTES, mm.EXTRA_RESERVED_VRAM, mm.MINIMUM_INFERENCE_BASE = 1_000_000, 0, 0
    log = []
    record(c, log, CallbacksMP.ON_LOAD)
    partial = sample(c, inputs)
    (_, (_, _, budget, _, full_load)), = log
    ffn = c.model.diffusion_model.blocks[1].ffn[0]
    assert not full_load and budget < c.model_size() and c.model.model_lowvram
    assert 0 < c.loaded_size() < c.model_size()
    assert ffn.comfy_cast_weights and isinstance(ffn.weight_function[0], LowVramPatch)
    assert torch.allclose(partial, full, atol=1e-5)
    mm.unload_all_models()
    assert ffn.comfy_cast_weights is False and ffn.weight_function == [] and not c.model.model_lowvram


def test_del_fires_on_detach_false_and_progress_text_recorded():
    p, _, _ = make()
    log = []
    c = p.clone()
    record(c, log, CallbacksMP.ON_DETACH)
    del c
    gc.collect()
    assert [a[1] for _, a in log] == [False]
    from server import PromptServer
    PromptServer.instance.reset()
    PromptServer.instance.send_progress_text("swap 3/8", "12")
    assert PromptServer.instance.progress_texts == [("swap 3/8", "12", None)]
    assert PromptServer.instance.messages[0][1] == b"\x00\x00\x00\x0212swap 3/8"
