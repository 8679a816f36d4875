"""What block swap holds in host RAM: freed with the model, and never more than the RAM there is.

* A model the graph no longer uses is garbage-collected with its engine, its host masters and their
  views (the engine registry and the engines hold models weakly). Runs on the stand-in and on a real
  ComfyUI (COMFYUI_PATH).
* The engine's host-RAM check refuses a plan that needs one byte more than is available and accepts
  one that needs exactly what is available (in-place units need one unit of headroom, units coming
  from another device all of their bytes).
"""
import gc
import weakref

import pytest
import torch


from conftest import comfy_layout_model
from wan22_blockswap.block_manager import BlockSwapEngine, packed_bytes
from wan22_blockswap.callbacks import _ENGINES
from wan22_blockswap.config import BlockSwapError, SwapSettings
from wan22_blockswap.utils import format_bytes
from test_node import load, sample, swap


pytestmark = pytest.mark.usefixtures("unload_models_after")  # conftest.py


def _everything_the_swap_holds(patcher):
    """Weak references to the diffusion model, its engine, every host master, host view and streamed
    parameter: when all are dead, the host copies' memory is free."""
    dm = patcher.model.diffusion_model
    engine = _ENGINES[dm]
    refs = [weakref.ref(dm), weakref.ref(engine)]
    for u in engine._units:
        assert u.master is not None
        refs.append(weakref.ref(u.master))
        refs += [weakref.ref(v) for v in u.host_views]
        refs += [weakref.ref(p) for p in u.module.parameters()]
    return refs


def test_a_model_the_graph_drops_is_freed_with_its_host_masters():
    model = load()
    reference = sample(model)
    swapped = swap(model, 6)
    assert torch.equal(sample(swapped), reference)
    refs = _everything_the_swap_holds(swapped)
    assert len(refs) > 2 + 6 * 3
    # another model keeps running meanwhile: the registry entry of the dropped one must not matter
    other_model = load(seed=1)
    other_reference = sample(other_model)
    other = swap(other_model, 4)
    assert torch.equal(sample(other), other_reference)
    del model, swapped
    gc.collect()
    alive = [r() for r in refs if r() is not None]
    assert not alive, f"{len(alive)} objects of the dropped model are still alive, e.g. {type(alive[0]).__name__}"
    assert torch.equal(sample(other), other_reference)  # and it still streams what it did
    assert _ENGINES[other.model.diffusion_model].tracker.copies == 3 * 4 + 1  # 3 forwards x 4 blocks, +1 preload


def test_the_engine_registry_forgets_dropped_models():
    models = [swap(load(seed=s), 3) for s in range(3)]
    for m in models:
        sample(m)
    before = len(_ENGINES)
    del models, m
    gc.collect()
    assert len(_ENGINES) == before - 3


def _engine(model, n, available):
    return BlockSwapEngine.from_settings(model, SwapSettings(blocks_to_swap=n), "cpu", host_available=available)


def test_host_ram_check_refuses_one_byte_short_and_accepts_the_exact_need():
    model, _ = comfy_layout_model("t2v")
    # units already on the host are repacked one at a time: the largest one is the headroom needed
    need = max(packed_bytes(model.blocks[i]) for i in range(4, 8))
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    with pytest.raises(BlockSwapError, match=rf"need {format_bytes(need)} but only {format_bytes(need - 1)}"):
        _engine(model, 4, need - 1).setup()
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs  # nothing touched
    engine = _engine(model, 4, need).setup()
    assert engine.is_setup and engine.tracker.host_bytes == 4 * need  # the four blocks are the same size
    engine.teardown()


def test_host_ram_check_counts_every_byte_of_units_on_another_device():
    """Units whose weights are elsewhere (here: storage-less ``meta`` tensors standing in for a GPU)
    need all of their host copies at once."""
    model = comfy_layout_model("t2v")[0].to("meta")
    need = sum(packed_bytes(model.blocks[i]) for i in range(5, 8))
    assert need > 2 * max(packed_bytes(model.blocks[i]) for i in range(5, 8))
    with pytest.raises(BlockSwapError, match=rf"3 streamed units need {format_bytes(need)} but only "
                                             rf"{format_bytes(need - 1)}"):
        _engine(model, 3, need - 1).setup()
    with pytest.raises(Exception) as past_the_check:  # meta tensors cannot be copied: packing fails
        _engine(model, 3, need).setup()
    assert "not enough host RAM" not in str(past_the_check.value)
