"""weight_dtype "auto": the loaders store the weights in the dtype ComfyUI picks for the card and the file.

Runs on the stand-in and on a real ComfyUI (COMFYUI_PATH). Neither tier has a GPU, so the card is
described by what ComfyUI asks of it: ``should_use_fp16`` / ``should_use_bf16`` /
``supports_fp8_compute`` in ``comfy.model_management`` are replaced for the test (in the real
ComfyUI as in the stand-in); everything else is ComfyUI's own decision (WAN's supported dtypes,
fp16 first). The expectations are ComfyUI's documented choices, written out: the file's dtype
matters when the card computes in fp8 (an fp8 file stays fp8), so a loader that hands ComfyUI no
file dtype fails here.
"""
import math

import pytest
import torch

import comfy.model_management as mm

from file_corpus import tiny_state_dict
from wan22_blockswap.model_loader import load_wan_model

safetensors_torch = pytest.importorskip("safetensors.torch")

F8 = torch.float8_e4m3fn
CARDS = {  # fp16 compute, bf16 compute, fp8 compute
    "cpu": (False, False, False),
    "fp16+bf16 card": (True, True, False),
    "bf16-only card": (False, True, False),
    "fp8 card": (True, True, True),
}
FILES = ("fp16", "bf16", "fp32", "fp8")
# (card, file) -> (weight dtype, compute dtype when it differs, else None)
EXPECTED = {
    **{("cpu", f): (torch.float32, None) for f in FILES},
    **{("fp16+bf16 card", f): (torch.float16, None) for f in FILES},
    **{("bf16-only card", f): (torch.bfloat16, None) for f in FILES},
    **{("fp8 card", f): (torch.float16, None) for f in ("fp16", "bf16", "fp32")},
    ("fp8 card", "fp8"): (F8, torch.float16),
}


def _write(tmp_path, kind):
    """The tiny model in one dtype; "fp8": every matrix fp8 (most of the elements), the rest bf16."""
    sd = tiny_state_dict()
    if kind == "fp8":
        sd = {k: v.to(F8 if v.ndim == 2 else torch.bfloat16) for k, v in sd.items()}
    else:
        sd = {k: v.to({"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[kind]) for k, v in sd.items()}
    path = tmp_path / f"{kind}.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path, sum(math.prod(v.shape) for v in sd.values())


@pytest.fixture
def card(monkeypatch):
    def use(name):
        fp16, bf16, fp8 = CARDS[name]
        monkeypatch.setattr(mm, "should_use_fp16", lambda *a, **k: fp16)
        monkeypatch.setattr(mm, "should_use_bf16", lambda *a, **k: bf16)
        monkeypatch.setattr(mm, "supports_fp8_compute", lambda *a, **k: fp8)
    return use


@pytest.mark.parametrize("file_kind", FILES)
@pytest.mark.parametrize("card_name", list(CARDS))
def test_auto_weight_dtype_is_comfyuis_choice_for_the_card_and_the_file(tmp_path, card, card_name, file_kind):
    path, params = _write(tmp_path, file_kind)
    card(card_name)
    weights, compute = EXPECTED[(card_name, file_kind)]
    # ComfyUI's own functions agree with the table (the stand-in's are checked against a real
    # ComfyUI in test_stub_conformance.py)
    wan_dtypes = [torch.float16, torch.bfloat16, torch.float32]
    file_dtype = F8 if file_kind == "fp8" else {"fp16": torch.float16, "bf16": torch.bfloat16}.get(file_kind, torch.float32)
    assert mm.unet_dtype(model_params=params, supported_dtypes=wan_dtypes, weight_dtype=file_dtype) == weights
    patcher, _, text = load_wan_model(path)
    assert patcher.model_dtype() == weights
    assert patcher.model.manual_cast_dtype == compute
    assert str(weights).replace("torch.", "") in text
    q = patcher.model.diffusion_model.blocks[0].self_attn.q.weight
    assert q.dtype == (F8 if file_kind == "fp8" else weights)  # fp8 matrices stay as stored
