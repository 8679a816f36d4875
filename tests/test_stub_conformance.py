"""The stand-in in tests/comfy_stub against a real ComfyUI: the same answers on a grid of inputs.

Real-ComfyUI tier only (COMFYUI_PATH): both are imported side by side (the stand-in's modules under
private names) and asked the same questions. The default tier's node and loader tests rest on these
answers, so a stand-in that drifts from ComfyUI fails here rather than hiding a bug. Covered: the
weight and compute dtype choice (``unet_dtype``, ``unet_manual_cast``; the card's abilities are
replaced in both by the same answers), WAN's supported dtypes in their order, the memory reserves.
"""
import importlib.util
import itertools
import os
import sys
import types
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="set COMFYUI_PATH to a ComfyUI checkout")]

STUB = Path(__file__).resolve().parent / "comfy_stub" / "comfy"


def _load_stub(name: str, monkeypatch):
    """The stand-in's ``comfy/<name>.py`` as a private module (its ``import comfy.x`` lines see the
    real package, which they do not use at import time)."""
    spec = importlib.util.spec_from_file_location(f"wan22bs_stub_{name}", STUB / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    if name == "model_detection":  # imports comfy.sd, whose real version needs nothing from it here
        monkeypatch.setitem(sys.modules, "comfy.sd", types.ModuleType("comfy.sd"))
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def real_mm():
    import comfy.model_management as mm

    assert not str(Path(mm.__file__).resolve()).startswith(str(STUB)), "this tier needs the real ComfyUI"
    return mm


DTYPES = [None, torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2]
SUPPORTED = [[torch.float16, torch.bfloat16, torch.float32], [torch.bfloat16, torch.float16, torch.float32],
             [torch.bfloat16, torch.float32], [torch.float32]]


def test_dtype_choice_matches_comfyui(real_mm, monkeypatch):
    stub = _load_stub("model_management", monkeypatch)
    assert stub.PRIORITIZE_FP16 == real_mm.PRIORITIZE_FP16
    assert stub.FLOAT8_TYPES == real_mm.FLOAT8_TYPES
    compared = 0
    for fp16, bf16, fp8 in itertools.product((False, True), repeat=3):
        for module in (stub, real_mm):
            monkeypatch.setattr(module, "should_use_fp16", lambda *a, _v=fp16, **k: _v)
            monkeypatch.setattr(module, "should_use_bf16", lambda *a, _v=bf16, **k: _v)
            monkeypatch.setattr(module, "supports_fp8_compute", lambda *a, _v=fp8, **k: _v)
            monkeypatch.setattr(module, "maximum_vram_for_weights", lambda *a, **k: 16 * 2 ** 30)
        for device, params, supported, weight in itertools.product(
                (None, torch.device("cpu")), (10 ** 6, 10 ** 10), SUPPORTED, DTYPES):
            case = dict(fp16=fp16, bf16=bf16, fp8=fp8, device=device, params=params, supported=supported, weight=weight)
            args = dict(device=device, model_params=params, supported_dtypes=supported, weight_dtype=weight)
            assert stub.unet_dtype(**args) == real_mm.unet_dtype(**args), case
            if weight is not None:
                assert (stub.unet_manual_cast(weight, device, supported)
                        == real_mm.unet_manual_cast(weight, device, supported)), case
            compared += 1
    assert compared == 8 * 2 * 2 * len(SUPPORTED) * len(DTYPES)


def test_the_cpu_answers_match_comfyui_unpatched(real_mm, monkeypatch):
    """On this machine (ComfyUI started with --cpu) without replacing anything."""
    stub = _load_stub("model_management", monkeypatch)
    for weight in DTYPES:
        for supported in SUPPORTED:
            args = dict(model_params=10 ** 6, supported_dtypes=supported, weight_dtype=weight)
            assert stub.unet_dtype(**args) == real_mm.unet_dtype(**args), (weight, supported)
            if weight is not None:
                cpu = torch.device("cpu")
                assert stub.unet_manual_cast(weight, cpu, supported) == real_mm.unet_manual_cast(weight, cpu, supported)
    assert stub.minimum_inference_memory() == real_mm.minimum_inference_memory()
    assert stub.extra_reserved_memory() == real_mm.extra_reserved_memory()


def test_wan_supported_dtypes_match_comfyui(monkeypatch):
    import comfy.supported_models as sm

    stub = _load_stub("model_detection", monkeypatch)
    for cls in (sm.WAN21_T2V, sm.WAN21_I2V, sm.WAN21_Vace, sm.WAN22_T2V):
        assert list(cls.supported_inference_dtypes) == stub.WanModelConfig.supported_inference_dtypes, cls.__name__
