"""Host masters on file (file_masters.py, staging.py): the engine reads streamed units from the file their
bytes are a slice of, or from a spill file, into a small staging ring just ahead of use.

Every test checks the output against the same model run without block swap and with masters in RAM
(bit for bit), and that the units really came from a file: no RAM master, parameters that view a
read-only file mapping between uses, reads counted per unit, bytes spilled as computed here from the
parameters.
"""
import errno
import gc
import os
import threading

import pytest
import torch

from conftest import comfy_layout_model, denoise, diffusers_layout_model, run_model
from quantized_like import inner_tensors, layouts, quantize_blocks
from wan22_blockswap.block_manager import BlockSwapEngine
from wan22_blockswap.config import SwapSettings, is_wrapper_tensor, leaf_tensors, tensor_bytes
from wan22_blockswap.engine.file_masters import (TAG, FileReadError, SliceFinder, SpillError, SpillFile,
                                          remove_stale_spill_files)

safetensors_torch = pytest.importorskip("safetensors.torch")


def _engine(model, n, mode, tmp_path, **kw):
    settings = dict(blocks_to_swap=n, host_memory=mode, spill_dir=str(tmp_path / "spill"))
    settings.update(kw.pop("settings", {}))
    return BlockSwapEngine.from_settings(model, SwapSettings(**settings), "cpu", **kw)


def _raw_bytes(module):
    """Bytes of a unit's parameters as stored (quantized weights: their inner tensors), computed here."""
    return sum(tensor_bytes(t) for p in module.parameters() for _, t in leaf_tensors(p))


def _mapped_file_of(t):
    """(path or None, True) when ``t`` views a file mapping the pack made, else None."""
    tag = getattr(t.untyped_storage(), TAG, None)
    return None if tag is None else tag[0]


def _counting_reads(engine):
    """Wrap the staging ring's read: unit name -> [bytes read each time], and the reading threads."""
    reads, threads = {}, set()
    inner = engine._staging.read

    def read(unit, view):
        n = inner(unit, view)
        reads.setdefault(unit.name, []).append(n)
        threads.add(threading.get_ident())
        return n

    engine._staging.read = read
    return reads, threads


def _check_on_file(engine, reads, spilled_expected):
    """What must be true of a model whose masters are on file, after a run."""
    t = engine.tracker
    assert t.masters == "file" and t.host_bytes == 0  # nothing of the units in RAM
    assert all(u.master is None and u.reads for u in engine._units)
    assert set(reads) == {u.name for u in engine._units}  # every unit was read from its file
    assert sum(map(sum, reads.values())) == t.read_bytes > 0
    for u in engine._units:  # between uses: views of read-only file mappings
        for p in u.module.parameters():
            for _, leaf in leaf_tensors(p):
                assert _mapped_file_of(leaf) is not None or SliceFinder().find(leaf) is not None, u.name
    assert t.spill_bytes == spilled_expected


def _three_ways(make, n, tmp_path, steps=3, **kw):
    """Outputs with no swap, RAM masters and file masters (a fresh model each), and the file engine."""
    model, inputs = make()
    reference = denoise(model, inputs, steps)
    outs = {}
    for mode in ("RAM", "file"):
        model, inputs = make()
        engine = _engine(model, n, mode, tmp_path, **kw).setup()
        spill = sum(_raw_bytes(u.module) for u in engine._units)
        reads = _counting_reads(engine) if mode == "file" else None
        outs[mode] = denoise(model, inputs, steps)
        if mode == "file":
            _check_on_file(engine, reads[0], spill)
            file_engine = engine
        else:
            assert engine.tracker.host_bytes >= spill and engine.tracker.copies > 0
    for mode, out in outs.items():
        for step, (a, b) in enumerate(zip(reference, out)):
            assert torch.equal(a, b), f"{mode} step {step}: max diff {(a - b).abs().max().item()}"
    return file_engine


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("prefetch", [1, 2], ids=["K2", "K3"])
def test_spilled_units_stream_bit_identically(tmp_path, dtype, prefetch):
    """Weights in anonymous memory (built, converted at load) go to a spill file once."""
    engine = _three_ways(lambda: comfy_layout_model("t2v", dtype=dtype, num_layers=12), 9, tmp_path,
                         settings=dict(prefetch_blocks=prefetch))
    assert all(u.spilled == _raw_bytes(u.module) for u in engine._units)
    engine.teardown()


def test_vace_blocks_and_embeddings_stream_from_file(tmp_path):
    engine = _three_ways(lambda: comfy_layout_model("vace", num_layers=12), 6, tmp_path,
                         settings=dict(vace_blocks_to_swap=2, offload_txt_emb=True))
    assert {"text_embedding", "vace_blocks.1"} <= set(engine.plan.units)


def test_diffusers_layout_streams_from_file(tmp_path):
    model, inputs = diffusers_layout_model(num_layers=12)
    reference = run_model(model, inputs)
    engine = _engine(model, 8, "file", tmp_path).setup()
    reads, _ = _counting_reads(engine)
    assert torch.equal(run_model(model, inputs), reference)
    _check_on_file(engine, reads, engine.tracker.spill_bytes)
    assert engine.tracker.spill_bytes == sum(_raw_bytes(u.module) for u in engine._units)


@pytest.mark.parametrize("layout", layouts())
def test_quantized_weights_stream_from_file(tmp_path, layout):
    def make():
        overrides = dict(dim=256, ffn_dim=512, num_heads=2) if layout == "convrot_w4a4" else {}
        model, inputs = comfy_layout_model("t2v", dtype=torch.bfloat16, num_layers=12, **overrides)
        quantize_blocks(model, layout)
        return model, inputs

    engine = _three_ways(make, 10, tmp_path, steps=2)
    # the inner tensors (data and scales) are what is spilled and read: stored bytes, not logical ones
    params = [p for u in engine._units for p in u.module.parameters()]
    quantized = [p for p in params if is_wrapper_tensor(p)]
    assert quantized and all(_mapped_file_of(t) is not None for p in quantized for t in inner_tensors(p).values())
    assert engine.tracker.spill_bytes < sum(p.numel() * p.element_size() for p in params)


def _file_backed(tmp_path, n_layers=12, dtype=torch.float32):
    """A model whose weights are views of a safetensors file (safetensors maps it), as ComfyUI's loaders
    leave them when they do not convert: their bytes are read from that file, nothing is spilled."""
    model, inputs = comfy_layout_model("t2v", dtype=dtype, num_layers=n_layers)
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with safetensors_torch.safe_open(str(path), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    fresh, _ = comfy_layout_model("t2v", dtype=dtype, num_layers=n_layers, seed=9)
    fresh.load_state_dict(sd, assign=True)
    return fresh, inputs, path


def test_units_that_are_slices_of_their_file_are_read_from_it(tmp_path):
    model, inputs, path = _file_backed(tmp_path)
    reference = denoise(model, inputs)
    engine = _engine(model, 8, "file", tmp_path).setup()
    reads, _ = _counting_reads(engine)
    assert torch.equal(denoise(model, inputs)[-1], reference[-1])
    _check_on_file(engine, reads, 0)  # nothing spilled
    assert engine.files() == [str(path)]
    assert not os.path.exists(tmp_path / "spill") or not os.listdir(tmp_path / "spill")


def test_reads_run_on_a_worker_thread(tmp_path):
    model, inputs = comfy_layout_model("t2v", num_layers=12)
    reference = denoise(model, inputs)
    engine = _engine(model, 10, "file", tmp_path, read_threads=True).setup()
    reads, threads = _counting_reads(engine)
    out = denoise(model, inputs)
    assert torch.equal(out[-1], reference[-1])
    assert threads and threading.get_ident() not in threads
    _check_on_file(engine, reads, engine.tracker.spill_bytes)
    engine.teardown()
    assert engine._staging._executor is None  # the worker is gone with the engine's teardown


def test_reads_are_issued_ahead_as_far_as_the_staging_ring_allows(tmp_path):
    """With K slots and K staging buffers, while unit i is about to run, the reads of the next units
    that are not in a slot are already issued (in the learned order), and only the first forward
    (nothing staged yet) waits for reads."""
    model, inputs = comfy_layout_model("t2v", num_layers=12)
    engine = _engine(model, 12, "file", tmp_path, settings=dict(prefetch_blocks=2)).setup()
    order = []
    inner = engine._staging.read
    engine._staging.read = lambda unit, view: (order.append(unit.index), inner(unit, view))[1]
    issued_before = {}

    def note(index):
        issued_before.setdefault(index, len(order))  # a pre-hook's return value would replace the inputs

    for u in engine._units:
        u.module.register_forward_pre_hook(lambda m, a, i=u.index: note(i))
    denoise(model, inputs, steps=1)
    # reads happen in the model's block order, each unit once per forward, and run on into the next
    # forward (its first units are read while the last ones of this one compute)
    assert order[:12] == list(range(12)) and 0 < len(order) - 12 <= 2 + 3  # slot prefetch + staging ring
    assert order[12:] == list(range(len(order) - 12))
    # By hand (K = 3 slots, 3 staging buffers, prefetch 2): before unit 0 computes, units 0-2 were read
    # (the ring's first fill); before unit i >= 1, every unit up to i + 4: units i..i+2 are in slots, and
    # two more are read ahead into the staging buffers that the copies out of them have freed. Without
    # read-ahead it would be i + 3 (only what the slots take).
    assert [issued_before[i] for i in range(12)] == [3] + [i + 5 for i in range(1, 12)]


def test_the_idle_expert_holds_no_staging_and_no_ram(tmp_path):
    from wan22_blockswap.engine.device_ring import SharedRing

    ring = SharedRing()
    (m1, inputs), (m2, _) = comfy_layout_model("t2v", num_layers=12), comfy_layout_model("t2v", seed=1, num_layers=12)
    ref1, ref2 = denoise(m1, inputs, 1), denoise(m2, inputs, 1)
    e1, e2 = _engine(m1, 8, "file", tmp_path).setup(), _engine(m2, 8, "file", tmp_path).setup()
    e1.use_shared_ring(ring)
    e2.use_shared_ring(ring)
    for _ in range(2):
        assert torch.equal(denoise(m1, inputs, 1)[0], ref1[0])
        assert e1.tracker.staging_bytes > 0
        assert torch.equal(denoise(m2, inputs, 1)[0], ref2[0])
        assert e1.tracker.staging_bytes == 0 and e1.device_bytes == 0 and e1.tracker.host_bytes == 0
        assert not e1._staging.buffers
    e1.teardown()
    e2.teardown()


# ------------------------------------------------------------------ faults

def test_a_model_file_changed_between_runs_is_an_error_before_the_forward(tmp_path):
    model, inputs, path = _file_backed(tmp_path)
    engine = _engine(model, 8, "file", tmp_path).setup()
    denoise(model, inputs, 1)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))  # the file was written again
    with pytest.raises(FileReadError, match=rf"{path}: it was modified since block swap started reading"):
        engine.setup()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    engine.setup()  # the same file again: fine


def test_a_deleted_model_file_is_an_error_naming_it(tmp_path):
    model, inputs, path = _file_backed(tmp_path)
    engine = _engine(model, 8, "file", tmp_path).setup()
    os.rename(path, tmp_path / "elsewhere.safetensors")
    with pytest.raises(FileReadError, match=rf"{path}: it was deleted or moved"):
        engine.setup()


def test_a_read_error_mid_run_names_the_file_and_leaves_the_model_clean(tmp_path):
    model, inputs, path = _file_backed(tmp_path)
    reference = denoise(model, inputs, 1)
    engine = _engine(model, 8, "file", tmp_path).setup()
    handle = engine._units[0].reads[0].source
    calls = {"n": 0}
    real = type(handle).read_into

    def failing(self, dst, offset):
        calls["n"] += 1
        if calls["n"] == 5:  # mid-forward: the fifth of its eight units
            raise FileReadError(f"{self.path}: reading failed (Input/output error)")
        return real(self, dst, offset)

    type(handle).read_into = failing
    try:
        with pytest.raises(FileReadError, match=str(path)):
            denoise(model, inputs, 1)
    finally:
        type(handle).read_into = real
    engine.end_run()
    assert not engine._ring.bound and all(not u.bound for u in engine._units)
    for u in engine._units:  # every unit back on its file views
        for p, view in zip(u.module.parameters(), u.host_views):
            assert p.data_ptr() == view.data_ptr()
    assert torch.equal(denoise(model, inputs, 1)[0], reference[0])  # and the next run is right


def test_a_truncated_model_file_is_refused_before_reading(tmp_path):
    model, inputs, path = _file_backed(tmp_path)
    engine = _engine(model, 8, "file", tmp_path).setup()
    reads = engine._units[-1].reads
    # the check runs before any read: truncating would make a mapped view fault, so only the figures change
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 1)
    try:
        with pytest.raises(FileReadError, match=rf"{path}: its size changed from {size} to {size - 1} bytes"):
            engine.setup()
        # and a read past the new end (a file cut while a run reads it) is an error naming it
        last = max(reads, key=lambda r: r.offset)
        with pytest.raises(FileReadError, match=rf"{path}: the file ended at byte"):
            last.source.read_into(torch.empty(last.nbytes + 1, dtype=torch.uint8), size - last.nbytes)
    finally:
        with open(path, "r+b") as f:
            f.truncate(size)


def test_an_unwritable_spill_folder_is_an_error_naming_it_before_anything_changes(tmp_path):
    model, _ = comfy_layout_model("t2v", num_layers=12)
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the spill folder should be")
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    engine = BlockSwapEngine.from_settings(model, SwapSettings(blocks_to_swap=6, host_memory="file",
                                                               spill_dir=str(blocker / "spill")), "cpu")
    with pytest.raises(SpillError, match=rf"spill folder {blocker / 'spill'}"):
        engine.setup()
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs  # nothing touched


def test_a_full_spill_folder_is_refused_before_writing(tmp_path, monkeypatch):
    import shutil

    model, _ = comfy_layout_model("t2v", num_layers=12)
    need = sum(_raw_bytes(model.blocks[i]) for i in range(6, 12))
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=need - 1))
    engine = _engine(model, 6, "file", tmp_path)
    with pytest.raises(SpillError, match=r"only .* is free"):
        engine.setup()
    assert not os.listdir(tmp_path / "spill")  # no spill file was created


def test_a_disk_that_fills_up_while_spilling_leaves_no_partial_region(tmp_path):
    spill = SpillFile(str(tmp_path))
    start, first = spill.write([torch.ones(1000)], [0], 4000)
    size = spill.size
    handle = spill.handle
    real = handle._f.write
    written = {"n": 0}

    def fill_up(data):
        written["n"] += 1
        if written["n"] > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(data[:len(data) // 2])  # a short write, then the disk is full

    handle._f.write = fill_up
    with pytest.raises(SpillError, match=rf"could not write .* spill file in {tmp_path}.*No space left"):
        spill.write([torch.zeros(100000)], [0], 400000)
    handle._f.write = real
    assert spill.size == size and os.fstat(handle._f.fileno()).st_size == size
    assert torch.equal(first.view(torch.float32), torch.ones(1000))  # what was spilled before is intact


def test_spill_files_leave_no_name_behind_and_go_with_their_model(tmp_path):
    model, inputs = comfy_layout_model("t2v", num_layers=12)
    engine = _engine(model, 6, "file", tmp_path).setup()
    denoise(model, inputs, 1)
    assert not os.listdir(tmp_path / "spill")  # POSIX: nameless from the start (a killed process leaves nothing)

    def open_spill_files():
        fds = os.listdir("/proc/self/fd")
        return [fd for fd in fds if "wan22bs-spill-" in _readlink(f"/proc/self/fd/{fd}")]

    assert open_spill_files()
    del model, engine, inputs
    gc.collect()
    assert not open_spill_files()  # freed with the model: its disk space is returned


def _readlink(p):
    try:
        return os.readlink(p)
    except OSError:
        return ""


def test_stale_spill_files_of_dead_processes_are_removed_and_nothing_else(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    names = {f"wan22bs-spill-{dead}-0123456789abcdef.bin": False,  # a killed process's: removed
             f"wan22bs-spill-{os.getpid()}-0123456789abcdef.bin": True,  # this process's own
             f"wan22bs-spill-{os.getppid()}-0123456789abcdef.bin": True,  # a running process's
             "wan22bs-spill-notes.txt": True, "model.safetensors": True}  # not the pack's
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    removed = remove_stale_spill_files(str(tmp_path))
    assert removed == [n for n, keep in names.items() if not keep]
    assert sorted(os.listdir(tmp_path)) == sorted(n for n, keep in names.items() if keep)


# ------------------------------------------------------------------ memory

def test_ram_check_is_skipped_on_file_but_not_in_ram(tmp_path):
    from wan22_blockswap.config import BlockSwapError

    model, inputs = comfy_layout_model("t2v", num_layers=12)
    with pytest.raises(BlockSwapError, match="not enough host RAM"):
        _engine(model, 8, "RAM", tmp_path, host_available=1024).setup()
    engine = _engine(model, 8, "file", tmp_path, host_available=1024).setup()  # needs no RAM copies
    assert engine.tracker.host_bytes == 0
