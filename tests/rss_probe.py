"""Run in a subprocess by test_file_masters_memory.py: load a WAN file, stream it, report anonymous RAM.

    python rss_probe.py ROOT MODEL_DIR FILE {swap-at-load|swap-node} {RAM|file} SPILL_DIR

Prints one JSON line: RssAnon (``/proc/self/status``, bytes) before loading, after loading (and, for
``swap-node``, after the node ran), the largest value seen at any streamed unit's forward of three
sampling steps, and the engine's figures. Run with ``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors
go back to the OS and the figures mean what they say.
"""
import json
import sys
from pathlib import Path


def rss_anon() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def main():
    root, model_dir, name, how, mode, spill = sys.argv[1:7]
    sys.path[:0] = [root, str(Path(root) / "tests"), str(Path(root) / "tests" / "comfy_stub")]
    from _pack import import_pack

    import_pack()
    import torch

    import folder_paths
    from wan22_blockswap.callbacks import _ENGINES
    from wan22_blockswap.nodes import WAN22BlockSwap, WAN22BlockSwapLoader
    from test_node import sample

    folder_paths.folder_names_and_paths["diffusion_models"] = ([model_dir], {".safetensors"})
    torch.set_num_threads(1)
    loader = dict(wan_version="auto", model_variant="auto", fp8_optimization="disabled", weight_dtype="auto")
    swap = dict(offload_txt_emb=False, offload_img_emb=False, use_non_blocking=True, vace_blocks_to_swap=0,
                prefetch_blocks=1, block_swap_debug=False, host_memory=mode, spill_folder=spill)
    blocks = 14
    out = {"imported": rss_anon()}
    _warm_up(torch)
    out["before"] = rss_anon()
    if how == "swap-at-load":
        (model,) = WAN22BlockSwapLoader().load("safetensors", name, "none", **loader, blocks_to_swap=blocks, **swap)
        out["loaded"] = rss_anon()
    else:
        import comfy.sd

        plain = comfy.sd.load_diffusion_model(str(Path(model_dir) / name))
        out["loaded"] = rss_anon()
        model = WAN22BlockSwap().apply(plain, blocks_to_swap=blocks, **swap)[0]
        del plain
        out["node_ran"] = rss_anon()
    engine = _ENGINES[model.model.diffusion_model]
    peak = [0]

    def seen(*_):
        peak[0] = max(peak[0], rss_anon())

    hooks = [u.module.register_forward_pre_hook(seen) for u in engine._units]
    hooks += [u.module.register_forward_hook(seen) for u in engine._units]
    sample(model, steps=3)
    out["peak"] = max(peak[0], rss_anon())
    out["after"] = rss_anon()
    t = engine.tracker
    out.update(masters=t.masters, staging_bytes=t.staging_bytes, host_bytes=t.host_bytes, spill_bytes=t.spill_bytes,
               read_bytes=t.read_bytes, streamed_bytes=sum(u.nbytes for u in engine._units),
               units=len(engine._units), forwards=t.forwards)
    for h in hooks:
        h.remove()
    print(json.dumps(out))


def _warm_up(torch) -> None:
    """What the first forward of any model allocates once and keeps (torch's and oneDNN's thread-local
    buffers, lazily imported modules): run a one-block model of the same width first, so "before" is
    the baseline a second model starts from."""
    import gc

    import comfy.sd
    from wan22_blockswap import tiny_wan
    from test_node import sample

    cfg = tiny_wan.tiny_config("t2v", dim=512, num_heads=4, ffn_dim=2048, num_layers=1, text_dim=4096)
    warm = comfy.sd.load_diffusion_model_state_dict(tiny_wan.WanModel(cfg).init_weights(1).state_dict())
    sample(warm, steps=1)
    del warm
    gc.collect()


if __name__ == "__main__":
    main()
