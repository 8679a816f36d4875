"""Real-ComfyUI tier: out-of-memory recovery over the HTTP API (skipped unless COMFYUI_PATH names a
ComfyUI checkout; run with that ComfyUI's Python).

A generated test pack (custom_nodes/wan22bs_test_oom) adds a node that passes a MODEL through and makes
one block of it raise ``torch.OutOfMemoryError`` (CUDA's message, with figures) while fewer than N blocks
are streamed: the same fault injection as tests/test_oom_recovery.py, in the server. Graphs: KSampler,
WAN 2.2's two experts with KSamplerAdvanced through WAN BlockSwap Looper Models, and WanVideoLooper
(when installed). Each must give the latents (images) of the same graph started with the count the
recovery reached, bit for bit, and the log must show the recovery.
"""
import os
import uuid

import pytest
import torch

from test_comfyui_real import (_latent, _looper_graph, _moe_graph, _images, _run, _swap, start_server,
                               wan_looper)  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="set COMFYUI_PATH to a ComfyUI checkout")]

INJECT = '''
import torch
from comfy.patcher_extension import WrappersMP


def _controller(model):
    from comfy.patcher_extension import CallbacksMP

    for fn in model.get_callbacks(CallbacksMP.ON_PRE_RUN, "wan22_blockswap"):
        return fn.__self__
    raise ValueError("not a block-swap model")


class Wan22bsInjectOOM:
    """Block ``block`` of the model raises a device out-of-memory error while fewer than ``below`` blocks stream."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "block": ("INT", {"default": 1, "min": 0, "max": 64}),
                             "below": ("INT", {"default": 6, "min": 0, "max": 64}),
                             "lacking_blocks": ("FLOAT", {"default": 2.0, "min": 0.0, "max": 64.0})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "inject"
    CATEGORY = "testing"

    def inject(self, model, block, below, lacking_blocks):
        controller = _controller(model)
        real = controller._model_ref().blocks[block]
        real = getattr(real, "swapped_module", real)
        size = sum((p.numel() * p.element_size() + 255) // 256 * 256 for p in real.parameters())
        asked = int(lacking_blocks * size)

        # The hook sits on the block module, which every clone of the loaded model shares (a branch of
        # the graph without swap too): it fires only inside a forward of the model this node returns.
        model = model.clone()
        armed = []

        def arm(executor, *args, **kwargs):
            armed.append(True)
            try:
                return executor(*args, **kwargs)
            finally:
                armed.pop()

        model.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "wan22bs_test_oom", arm)

        def hook(module, args):
            if armed and len(controller.plan.block_indices) < below:
                raise torch.OutOfMemoryError(
                    f"CUDA out of memory. Tried to allocate {asked / 2 ** 20:.2f} MiB. GPU 0 has a total capacity of "
                    "8.00 GiB of which 0 bytes is free.")

        for h in list(getattr(real, "_wan22bs_oom_hooks", [])):
            h.remove()
        real._wan22bs_oom_hooks = [real.register_forward_pre_hook(hook)]
        return (model,)


NODE_CLASS_MAPPINGS = {"Wan22bsInjectOOM": Wan22bsInjectOOM}
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from start_server(tmp_path_factory.mktemp("comfy_out_oom"), {"wan22bs_test_oom": INJECT})


def _inject(block, below, lacking):
    return ("Wan22bsInjectOOM", {"block": block, "below": below, "lacking_blocks": lacking})


def _reached(start, lacking, total=8):
    """start + ceil(lacking + half a block), the rule, by hand for lacking = 2.0 blocks: 3 more."""
    import math
    return min(total, start + math.ceil(lacking + 0.5))


def test_ksampler_recovers_and_matches_a_run_started_at_that_count(server):
    from test_comfyui_real import _graph

    tag = f"oom{uuid.uuid4().hex[:6]}"
    n = _reached(3, 2.0)
    start = len(server["log"].read_text())
    _run(server, _graph(tag, {"plain": [], "oom": [_swap(3), _inject(1, n, 2.0)], "at_n": [_swap(n)]}))
    log = server["log"].read_text()[start:]
    assert f"3 -> {n} blocks streamed" in log and "out of memory with 3 blocks streamed" in log, log[-3000:]
    plain = _latent(server, f"{tag}_plain")
    assert torch.equal(_latent(server, f"{tag}_oom"), _latent(server, f"{tag}_at_n"))
    assert torch.equal(_latent(server, f"{tag}_oom"), plain)


def _inject_high(graph, consumer, input_name):
    """Injects OOM into the high-noise expert only (after Looper Models), feeding ``consumer``'s input."""
    graph["inject_high"] = {"class_type": "Wan22bsInjectOOM",
                            "inputs": {"model": ["looper_prep", 0], "block": 1, "below": _reached(3, 2.0),
                                       "lacking_blocks": 2.0}}
    graph[consumer]["inputs"][input_name] = ["inject_high", 0]


def test_two_experts_with_ksampler_advanced_recover_each_on_its_own(server):
    tag = f"moeoom{uuid.uuid4().hex[:6]}"
    g = _moe_graph(tag, {"plain": "plain", "looper": ("looper", 3)})
    _inject_high(g, "looper_ks_high", "model")  # its KSamplerAdvanced fails first
    start = len(server["log"].read_text())
    _run(server, g)
    log = server["log"].read_text()[start:]
    assert log.count("blocks streamed (out of memory") == 1, log[-3000:]  # the high expert only
    assert torch.equal(_latent(server, f"{tag}_looper"), _latent(server, f"{tag}_plain"))


def test_wan_video_looper_recovers_once_and_keeps_the_count_for_every_loop(server, wan_looper):
    tag = f"wvloom{uuid.uuid4().hex[:6]}"
    g = _looper_graph(tag, {"plain": "plain", "looper": ("looper", 3)})
    _inject_high(g, "looper_looper", "model_high")
    start = len(server["log"].read_text())
    _run(server, g)
    log = server["log"].read_text()[start:]
    assert log.count("blocks streamed (out of memory") == 1, log[-3000:]  # loop 1 only: loops 2-3 keep the count
    assert torch.equal(_images(server, f"{tag}_looper"), _images(server, f"{tag}_plain"))
