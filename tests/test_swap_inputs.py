"""Every swap input of every node that has it reaches the engine, and its effect is checked, not only
the output (identical output is also what a node gives that streams nothing).

Each node runs as ComfyUI runs it (the per-execution class clone with the hidden node id, the widget
values as keyword arguments), then every prepared model samples once while hooks on the real modules
record, for each block, VACE block and embedding, whether its weights sat in a device slot when it ran,
and which units the slots held at that moment (told by their bytes, compared with each unit's host
copy). The expectations are computed here from the inputs and the model's layout:

* ``blocks_to_swap``: the last N blocks run from a slot, every other block from its own memory;
* ``offload_txt_emb`` / ``offload_img_emb``: the text / CLIP-image embedding runs from a slot, or not;
* ``vace_blocks_to_swap``: the last N VACE blocks run from a slot, the others not;
* ``prefetch_blocks``: the ring has ``max(2, prefetch + 1)`` slots and, while a unit runs, they hold
  exactly it and the next ``prefetch`` units of the forward's order (0: the one before it instead);
* ``use_non_blocking``: the engine gets a recording runtime (``tests/stream_order.py``) in place of
  the CUDA one, so its CUDA decisions run on a CPU: on = every host copy page-locked and every copy
  issued asynchronously on the copy stream; off = nothing page-locked, no copy through the runtime;
* ``block_swap_debug``: a trace file per sampling run, with the settings the engine got, and the
  per-unit lines in the log; none without it;
* ``vram_budget``: with the GPU's free memory stood in for, a budget nothing fits streams every block,
  one everything fits streams none, whatever ``blocks_to_swap`` says;
* ``dynamic_vram``: a Dynamic VRAM model is passed through unchanged, or streamed on a classic copy.

Two settings per node, so every boolean takes both values and the two embedding flags differ. The
pipeline nodes get a VACE model and an i2v model (each input has a model it acts on); WAN BlockSwap
gets each in its own run. Stand-in and real ComfyUI (COMFYUI_PATH).
"""
import json
import types

import pytest
import torch

import comfy.sample
import folder_paths
from comfy_api.latest import io

from wan22_blockswap import callbacks, nodes
from wan22_blockswap.block_manager import BlockSwapEngine
from wan22_blockswap.callbacks import StreamedUnit, _ENGINES
from wan22_blockswap.config import unwrap
from wan22_blockswap.nodes import NODE_CLASS_MAPPINGS
from wan22_blockswap.utils import TRACE_PREFIX
from stream_order import RecordingRuntime
from test_node import _reload_tiny, load

SWAP_NODES = ("wan22BlockSwap", "wan22BlockSwapLooperModels", "wan22BlockSwapSequencer", "WAN22BlockSwapLooper",
              "wan22BlockSwapLooper")
# Every input away from its default in one of the two, both values of every boolean, the embedding flags
# different from each other (an input wired to another's value shows).
SETTINGS = {
    "A": dict(blocks_to_swap=3, offload_txt_emb=True, offload_img_emb=False, use_non_blocking=False,
              vace_blocks_to_swap=1, prefetch_blocks=0, block_swap_debug=True),
    "B": dict(blocks_to_swap=5, offload_txt_emb=False, offload_img_emb=True, use_non_blocking=True,
              vace_blocks_to_swap=2, prefetch_blocks=2, block_swap_debug=False),
}
NODE_ID = "41"


pytestmark = pytest.mark.usefixtures("unload_models_after")  # conftest.py


@pytest.fixture
def runtimes(monkeypatch):
    """Engines the nodes make get a recording runtime: their CUDA path (page-locking, copy stream)
    runs on the CPU and is recorded."""
    made = []

    class RecordedEngine(BlockSwapEngine):
        def __init__(self, *args, **kwargs):
            rt = RecordingRuntime()
            made.append(rt)
            super().__init__(*args, runtime=rt, **kwargs)

    monkeypatch.setattr(callbacks, "BlockSwapEngine", RecordedEngine)
    return made


@pytest.fixture
def trace_dir(monkeypatch, tmp_path):
    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path / "out"))
    return tmp_path / "out" / "wan22_blockswap_traces"


def traces(directory):
    return sorted(p for p in directory.iterdir() if p.name.startswith(TRACE_PREFIX)) if directory.exists() else []


# ---------------------------------------------------------------------------------------------------
# driving the nodes

def execute(node_id, **inputs):
    """The node as ComfyUI executes it: a per-execution class clone holding the hidden node id."""
    cls = NODE_CLASS_MAPPINGS[node_id]
    clone = cls.PREPARE_CLASS_CLONE({"hidden_inputs": {io.Hidden.unique_id: NODE_ID}})
    return getattr(clone, clone.FUNCTION)(**inputs)


def run_swap_node(node_id, models, form="list", **inputs):
    """``models`` prepared by ``node_id``, in the same order. ``form`` for the loop-aware node: a plain
    list of models, or WanVideoLoraSequencer's segments."""
    if node_id == "wan22BlockSwap":
        return [execute(node_id, model=m, **inputs)[0] for m in models]
    if node_id == "wan22BlockSwapLooperModels":
        out = execute(node_id, model_high=models[0], model_low=models[1], **inputs)
        return [out[0], out[1]]
    if node_id == "wan22BlockSwapSequencer" or form == "segments":
        key = "model_clip_sequence" if node_id == "wan22BlockSwapSequencer" else "models_list"
        seq = execute(node_id, **{key: [(models[0], models[1], None), None]}, **inputs)[0]
        assert seq[1] is None
        return list(seq[0][:2])
    return list(execute(node_id, models_list=list(models), **inputs)[0])


# ---------------------------------------------------------------------------------------------------
# what happened

def layout(model):
    """(blocks, VACE blocks, has a CLIP-image embedding) of a model, from its module tree."""
    dm = model.model.diffusion_model
    vace = getattr(dm, "vace_blocks", None)
    return len(dm.blocks), len(vace) if vace is not None else 0, getattr(dm, "img_emb", None) is not None


def expected_units(model, s):
    blocks, vace, img = layout(model)
    units = {f"blocks.{i}" for i in range(max(0, blocks - s["blocks_to_swap"]), blocks)}
    units |= {f"vace_blocks.{i}" for i in range(max(0, vace - s["vace_blocks_to_swap"]), vace)}
    if s["offload_txt_emb"]:
        units.add("text_embedding")
    if s["offload_img_emb"] and img:
        units.add("img_emb")
    return units


def streamed_patches(patcher):
    return {k[len("diffusion_model."):] for k, v in patcher.object_patches.items() if isinstance(v, StreamedUnit)}


def sample(model, steps=2, seed=0):
    """ComfyUI's sampling with CLIP-vision features for an i2v model, so its image embedding runs."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, 16, 2, 8, 8, generator=g)
    extra = {}
    if layout(model)[2]:
        extra["clip_vision_output"] = types.SimpleNamespace(
            penultimate_hidden_states=torch.randn(1, 257, 1280, generator=g))
    pos = [[torch.randn(1, 8, 4096, generator=g), dict(extra)]]
    neg = [[torch.zeros(1, 8, 4096), dict(extra)]]
    return comfy.sample.sample(model, noise, steps, 4.0, "euler", "simple", pos, neg, torch.zeros_like(noise),
                               seed=seed, disable_pbar=True)


class Watch:
    """Hooks on the real modules of a diffusion model: per call, the module, the forward it ran in,
    whether its weights were in a slot, the slot count and which streamed units the slots held.
    ``engine_of(dm)``: the engine streaming the model (ComfyUI's registry by default)."""

    SAMPLE = 256  # leading bytes of each weight matrix compared (the matrices are random)

    def __init__(self, dm, engine_of=_ENGINES.get):
        self.dm, self.engine_of = dm, engine_of
        self.calls = []
        self.forwards = 0
        self._layouts_key, self._layouts = None, []
        mods = {f"blocks.{i}": b for i, b in enumerate(dm.blocks)}
        mods.update({f"vace_blocks.{i}": b for i, b in enumerate(getattr(dm, "vace_blocks", None) or [])})
        mods["text_embedding"] = dm.text_embedding
        if getattr(dm, "img_emb", None) is not None:
            mods["img_emb"] = dm.img_emb
        mods = {n: unwrap(m) for n, m in mods.items()}  # the real modules, should stand-ins be in the tree
        self.names = set(mods)
        self.handles = [dm.patch_embedding.register_forward_pre_hook(self._forward)]
        self.handles += [m.register_forward_pre_hook(lambda mod, args, n=n: self._call(n, mod))
                         for n, m in mods.items()]

    def _forward(self, module, args):
        self.forwards += 1

    def _call(self, name, module):
        engine = self.engine_of(self.dm)
        slots = list(engine._slots) if engine is not None else []
        ptr = torch.Tensor.data_ptr(next(module.parameters()))
        in_slot = any(s.data_ptr() <= ptr < s.data_ptr() + s.numel() for s in slots)
        held = set()
        if in_slot:
            for s in slots:
                held |= self._held_by(s, engine)
        self.calls.append(dict(name=name, forward=self.forwards, in_slot=in_slot, slots=len(slots), held=held))

    def _held_by(self, slot, engine):
        """The unit whose copy the slot holds (a slot holds one; the bytes past a smaller unit's can be
        an earlier one's): the unit with the largest share of its weight matrices' leading bytes in
        the slot, more than half (a LoRA patched in the slot changes some). Units with the same layout
        are compared at once."""
        key = (id(engine), tuple(u.master.data_ptr() for u in engine._units))
        if self._layouts_key != key:
            groups = {}
            for u in engine._units:
                parts = tuple((p.offset, min(self.SAMPLE, p.nbytes)) for e in u.entries for p in e.parts
                              if len(p.size) == 2)
                groups.setdefault(parts, []).append(u)
            self._layouts = []
            for parts, units in groups.items():
                idx = torch.cat([torch.arange(o, o + n) for o, n in parts])
                self._layouts.append((idx, [n for _, n in parts], torch.stack([u.master[idx] for u in units]),
                                      [u.name for u in units]))
            self._layouts_key = key
        best, share = None, 0.5
        for idx, sizes, refs, names in self._layouts:
            if int(idx.max()) >= slot.numel():
                continue
            same = torch.stack([eq.all(dim=1) for eq in (slot[idx] == refs).split(sizes, dim=1)], dim=1)
            for name, k in zip(names, same.sum(dim=1).tolist()):
                if k / len(sizes) > share:
                    best, share = name, k / len(sizes)
        return {best} if best is not None else set()

    def close(self):
        for h in self.handles:
            h.remove()


def sample_watched(model, steps=2):
    w = Watch(model.model.diffusion_model)
    try:
        sample(model, steps=steps)
    finally:
        w.close()
    return w


def check_streaming(w, units, prefetch):
    """The units ran from slots and nothing else did; the ring size; what was copied ahead of each unit."""
    assert {c["name"] for c in w.calls} == w.names, "a hooked module never ran"
    from_slots = {c["name"] for c in w.calls if c["in_slot"]}
    assert from_slots == units, f"ran from slots: {sorted(from_slots)}, expected {sorted(units)}"
    assert all(c["in_slot"] for c in w.calls if c["name"] in units)
    streamed = [c for c in w.calls if c["name"] in units]
    slots = min(max(2, prefetch + 1), len(units))
    assert {c["slots"] for c in streamed} == {slots}, (prefetch, {c["slots"] for c in streamed})
    # the order of the forwards after the first (the first teaches the engine VACE's interleaving)
    assert w.forwards >= 2
    order = [c["name"] for c in streamed if c["forward"] == 2]
    assert sorted(order) == sorted(units)
    n = len(order)
    checked = 0
    for f in range(2, w.forwards + 1):
        ran = [c for c in streamed if c["forward"] == f]
        assert [c["name"] for c in ran] == order
        for j, c in enumerate(ran):
            if prefetch == 0:  # nothing ahead: the unit and the one before it (the previous forward's last)
                want = {order[j], order[j - 1]}
            else:
                want = {order[(j + i) % n] for i in range(min(prefetch, n - 1) + 1)}
            assert c["held"] == want, f"forward {f}, {c['name']}: slots hold {sorted(c['held'])}, expected {sorted(want)}"
            checked += 1
    assert checked >= n


def check_copy_path(engine, non_blocking):
    """What the engine did with its (recording) CUDA runtime: page-locked host copies and
    asynchronous copies on a side stream, or neither."""
    rt = engine._rt
    assert isinstance(rt, RecordingRuntime)
    masters = {u.master.data_ptr(): u.nbytes for u in engine._units}
    copies = [op for op in rt.ops if op.kind == "copy"]
    if non_blocking:
        assert set(masters) <= set(rt.registered), "a host copy was left pageable"
        assert all(rt.registered[p] >= n for p, n in masters.items())
        assert {op.src for op in copies} >= set(masters), "a unit was never copied through the copy stream"
        assert all(not op.blocking and op.stream is not rt.default for op in copies)
    else:
        assert rt.registered == {} and copies == [], "use_non_blocking off still pinned or issued async copies"


def check_debug(directory, caplog, debug, runs, s, models):
    files = traces(directory)
    detail = [r for r in caplog.records if r.getMessage().startswith("block swap run detail")]
    if not debug:
        assert files == [] and detail == []
        return
    assert len(files) == runs and len(detail) == runs
    assert all(f"_node{NODE_ID}.json" in p.name for p in files)
    for p, model in zip(files, models):
        settings = json.loads(p.read_text())["settings"]
        blocks, vace, _ = layout(model)
        assert settings["blocks_to_swap"] == min(blocks, s["blocks_to_swap"])
        assert settings["vace_blocks_to_swap"] == min(vace, s["vace_blocks_to_swap"])
        for key in ("prefetch_blocks", "use_non_blocking", "offload_txt_emb", "offload_img_emb"):
            assert settings[key] == s[key], key


def two_models():
    """A VACE model (VACE blocks) and an i2v model (a CLIP-image embedding), 8 blocks each."""
    return [load("vace", seed=0), load("i2v", seed=1)]


# ---------------------------------------------------------------------------------------------------
# the swap nodes

@pytest.mark.parametrize("which", sorted(SETTINGS))
@pytest.mark.parametrize("node_id", SWAP_NODES)
def test_every_swap_input_reaches_the_engine(node_id, which, runtimes, trace_dir, caplog):
    s = SETTINGS[which]
    models = two_models()
    form = "segments" if which == "B" else "list"  # the loop-aware node's two input forms
    prepared = run_swap_node(node_id, models, form=form, **s)
    assert len(prepared) == 2 and all(p is not m for p, m in zip(prepared, models))
    with caplog.at_level("INFO", logger="wan22_blockswap"):
        for model, out in zip(models, prepared):
            units = expected_units(model, s)
            assert streamed_patches(out) == units  # what ComfyUI's loader never sees
            w = sample_watched(out)
            check_streaming(w, units, s["prefetch_blocks"])
            check_copy_path(_ENGINES[out.model.diffusion_model], s["use_non_blocking"])
    check_debug(trace_dir, caplog, s["block_swap_debug"], 2, s, models)


def _dynamic(variant, seed):
    m = load(variant, seed)
    m.cached_patcher_init = (_reload_tiny, (variant, seed))
    m.is_dynamic = lambda: True  # what ModelPatcherDynamic answers
    return m


@pytest.mark.parametrize("node_id", SWAP_NODES + ("WAN22BlockSwapLoader",))
def test_the_optional_inputs_reach_every_node(node_id, monkeypatch, model_dir, caplog):
    """vram_budget, with the GPU's free memory stood in for: none at all (nothing fits: every block
    streams, with a warning) or far more than the model (nothing streams), whatever blocks_to_swap
    says. dynamic_vram (not on the loader, whose models are never dynamic): a Dynamic VRAM model is
    passed through unchanged, or reloaded as a classic copy whose last blocks stream."""
    s = dict(SETTINGS["B"], offload_img_emb=False, vace_blocks_to_swap=0, blocks_to_swap=3)
    for free, streamed in ((0, 8), (2**50, 0)):
        monkeypatch.setattr(nodes, "free_device_bytes", lambda patcher, free=free: free)
        caplog.clear()
        with caplog.at_level("WARNING", logger="wan22_blockswap"):
            if node_id == "WAN22BlockSwapLoader":
                out = [load_swapped(model_dir, "t2v", s, vram_budget="auto (free VRAM, 480p)")]
            else:
                out = run_swap_node(node_id, [load(seed=0), load(seed=1)], vram_budget="auto (free VRAM, 480p)", **s)
        for p in out:
            assert streamed_patches(p) == {f"blocks.{i}" for i in range(8 - streamed, 8)}, (free, node_id)
        too_small = [r for r in caplog.records if "too small even with all 8 blocks swapped" in r.getMessage()]
        assert bool(too_small) == (free == 0), (free, [r.getMessage() for r in caplog.records])
    if node_id == "WAN22BlockSwapLoader":
        return
    models = [_dynamic("t2v", 0), _dynamic("t2v", 1)]
    passed = run_swap_node(node_id, models, **s, dynamic_vram="pass through")
    assert all(p is m for p, m in zip(passed, models))
    assert all(streamed_patches(p) == set() for p in passed)
    taken = run_swap_node(node_id, models, **s, dynamic_vram="block swap")
    for p, m in zip(taken, models):  # a classic copy, reloaded, whose last blocks stream
        assert p is not m and p.model is not m.model and not p.is_dynamic()
        assert streamed_patches(p) == {"blocks.5", "blocks.6", "blocks.7"}


# ---------------------------------------------------------------------------------------------------
# WAN BlockSwap Model Loader (swap at load)

@pytest.fixture
def model_dir(tmp_path, monkeypatch):
    exts = folder_paths.folder_names_and_paths["diffusion_models"][1]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusion_models", ([str(tmp_path)], exts))
    return tmp_path


def write_model(directory, variant, seed=0, layers=8):
    from safetensors.torch import save_file

    from wan22_blockswap import tiny_wan

    name = f"{variant}_{layers}_{seed}.safetensors"
    if not (directory / name).exists():
        cfg = tiny_wan.tiny_config(variant, dim=128, num_heads=1, ffn_dim=256, num_layers=layers, text_dim=4096)
        sd = tiny_wan.WanModel(cfg).init_weights(seed).state_dict()
        save_file({k: v.contiguous() for k, v in sd.items()}, str(directory / name))
    return name


def load_swapped(directory, variant, s, layers=8, **extra):
    name = write_model(directory, variant, layers=layers)
    return execute("WAN22BlockSwapLoader", model_type="safetensors", safetensors_model=name, gguf_model="none",
                   wan_version="auto", model_variant="auto", fp8_optimization="disabled", weight_dtype="auto",
                   **s, **extra)[0]


def check_masters_read_at_load(patcher, units, groups):
    """Every streamed unit's weights were read straight into one buffer of their own (the loader's
    grouping by unit, checked key by key), which the engine adopted as the unit's host copy."""
    assert {unit for unit, _ in groups.values()} == units
    engine = _ENGINES[patcher.model.diffusion_model]
    for u in engine._units:
        storages = {storage for key, (unit, storage) in groups.items() if unit == u.name}
        assert len(storages) == 1, f"{u.name}'s weights were read into {len(storages)} buffers"
        lo, n = next(iter(storages))
        assert lo <= u.master.data_ptr() < lo + n, f"{u.name}'s host copy is not the buffer it was read into"
    owners = [next(iter({st for _, (unit, st) in groups.items() if unit == name})) for name in units]
    assert len(set(owners)) == len(units), "two units share a buffer"


@pytest.fixture
def read_groups(monkeypatch):
    """key -> (unit, (storage pointer, bytes)) for every tensor the loader read into a unit's buffer;
    the unit each key belongs to is asserted from the key itself (its first two names)."""
    from wan22_blockswap import model_loader

    groups = {}
    real = model_loader.read_weights

    def recording(path, entries, *args, dest=None, **kwargs):
        sd = real(path, entries, *args, dest=dest, **kwargs)
        group_of = getattr(dest, "group_of", None)
        if group_of is not None:
            groups.clear()
            for key, t in sd.items():
                unit = group_of(key)
                head = key.split(".")
                mine = ".".join(head[:2]) if head[0] in ("blocks", "vace_blocks") else head[0]
                assert unit in (None, mine), f"{key} was put into {unit}'s buffer"
                if unit is not None:
                    st = torch.Tensor.untyped_storage(t)
                    groups[key] = (unit, (st.data_ptr(), st.nbytes()))
        return sd

    monkeypatch.setattr(model_loader, "read_weights", recording)
    return groups


@pytest.mark.parametrize("which", sorted(SETTINGS))
def test_every_swap_input_of_the_swap_at_load_loader(which, model_dir, runtimes, trace_dir, caplog, read_groups):
    s = SETTINGS[which]
    outs = []
    for variant in ("vace", "i2v"):
        out = load_swapped(model_dir, variant, s)
        units = expected_units(out, s)
        assert streamed_patches(out) == units
        check_masters_read_at_load(out, units, read_groups)  # before any run: packed at load
        with caplog.at_level("INFO", logger="wan22_blockswap"):
            w = sample_watched(out)
        check_streaming(w, units, s["prefetch_blocks"])
        check_copy_path(_ENGINES[out.model.diffusion_model], s["use_non_blocking"])
        outs.append(out)
    check_debug(trace_dir, caplog, s["block_swap_debug"], 2, s, outs)
