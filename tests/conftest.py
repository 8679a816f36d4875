"""Shared fixtures: the pack imported as a package, tiny WAN models in both layouts."""
import gc
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _pack import import_pack  # noqa: E402

import_pack()  # registers `wan22_blockswap` so tests can `from wan22_blockswap.x import y`

from wan22_blockswap import tiny_wan  # noqa: E402

# The ComfyUI surface: a real checkout when COMFYUI_PATH names one (run this tier with that
# checkout's Python environment), else the stand-in in tests/comfy_stub. Never both: the stub's
# server.py would shadow ComfyUI's.
COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
if COMFYUI_PATH:
    sys.path.insert(0, COMFYUI_PATH)
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options  # noqa: E402

    comfy.options.enable_args_parsing()
    import comfy.cli_args  # noqa: E402,F401
else:
    sys.path.insert(0, str(ROOT / "tests" / "comfy_stub"))


def comfy_layout_model(variant="t2v", dtype=torch.float32, seed=0, **overrides):
    """ComfyUI's WanModel layout (tiny_wan mirrors its module tree and forward)."""
    cfg = tiny_wan.tiny_config(variant, **overrides)
    model = tiny_wan.WanModel(cfg).init_weights(seed).to(dtype).eval()
    return model, tiny_wan.make_inputs(cfg, dtype=dtype)


def diffusers_layout_model(dtype=torch.float32, seed=0, num_layers=6):
    """diffusers' WanTransformer3DModel: an independent WAN implementation."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32,
                                  in_channels=16, out_channels=16, text_dim=32, freq_dim=32,
                                  ffn_dim=128, num_layers=num_layers, rope_max_seq_len=64)
    model = model.to(dtype).eval()
    g = torch.Generator().manual_seed(seed + 1)
    inputs = {"hidden_states": torch.randn(1, 16, 2, 8, 8, generator=g).to(dtype),
              "timestep": torch.tensor([500]),
              "encoder_hidden_states": torch.randn(1, 8, 32, generator=g).to(dtype),
              "return_dict": False}
    return model, inputs


def run_model(model, inputs):
    out = model(**inputs)
    return out[0] if isinstance(out, tuple) else out


def denoise(model, inputs, steps=3):
    """A small Euler-style loop: every step feeds the previous output back in, so any difference
    in one forward propagates to the end."""
    key = "x" if "x" in inputs else "hidden_states"
    outs = []
    with torch.no_grad():
        x = inputs[key]
        for i in range(steps):
            args = dict(inputs)
            args[key] = x
            if key == "x":
                args["timestep"] = inputs["timestep"] * (1 - i / steps)
            v = run_model(model, args)
            x = x.clone()
            x[:, :v.shape[1]] -= 0.1 * v  # i2v: only the noise channels, not the image condition
            outs.append(x.clone())
    return outs


@pytest.fixture
def has_cuda():
    return torch.cuda.is_available()


@pytest.fixture
def comfy_nodes():
    """Node classes of the real ComfyUI (core + extras), for the COMFYUI_PATH tier."""
    import asyncio

    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    return nodes.NODE_CLASS_MAPPINGS


# Figures a test measured (fuzz counts, times): printed after the run, whatever its outcome.
_SUMMARY_LINES = []


@pytest.fixture(scope="session")
def summary_lines():
    return _SUMMARY_LINES


def pytest_terminal_summary(terminalreporter):
    if _SUMMARY_LINES:
        terminalreporter.section("measured figures")
        for line in _SUMMARY_LINES:
            terminalreporter.write_line(line)


@pytest.fixture
def unload_models_after():
    """After the test, ComfyUI unloads every model and dropped ones are collected (modules that load models
    use it for every test: ``pytestmark = pytest.mark.usefixtures("unload_models_after")``)."""
    yield
    import comfy.model_management as mm

    mm.unload_all_models()
    gc.collect()
