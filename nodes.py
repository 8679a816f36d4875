"""ComfyUI node classes: inputs, tooltips, validation; the work is in callbacks.py and the engine.

Node ids and input names are a public contract (saved workflows store them, and widget values by
position): never rename or reorder them.
"""
from __future__ import annotations

from .config import SwapSettings

CATEGORY = "WAN22 BlockSwap"


class WAN22BlockSwap:
    DESCRIPTION = (
        "Streams the chosen WAN 2.1/2.2 transformer blocks from host RAM to the GPU just before they "
        "run, so 14B models fit 8-16 GB cards. Put it after any model loader (UNETLoader, Unet Loader "
        "(GGUF), LoRA loaders) and before the sampler. Same outputs as without it; the log and this "
        "node show what is streamed. Inactive when ComfyUI's Dynamic VRAM is on (it streams weights "
        "itself); start ComfyUI with --disable-dynamic-vram to use it.")
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("A clone of the model whose chosen blocks stream from host RAM. The input model "
                       "and its other clones are unchanged.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "A WAN 2.1 / 2.2 diffusion model (t2v, i2v, VACE, 5B, "
                                               "A14B high or low noise expert), safetensors or GGUF."}),
                "blocks_to_swap": ("INT", {"default": 20, "min": 0, "max": 48, "step": 1, "tooltip":
                    "How many transformer blocks live in host RAM and stream to the GPU (the last N). "
                    "WAN 1.3B/5B have 30 blocks, 14B/A14B 40; larger values are clamped. More blocks = "
                    "less VRAM, more PCIe traffic. 0 = off."}),
                "offload_txt_emb": ("BOOLEAN", {"default": False, "tooltip":
                    "Also stream the text embedding (about 0.1 GB for 14B); saves a little VRAM."}),
                "offload_img_emb": ("BOOLEAN", {"default": False, "tooltip":
                    "Also stream the image (CLIP) embedding of i2v models; no effect on models without one."}),
                "use_non_blocking": ("BOOLEAN", {"default": True, "tooltip":
                    "Pinned host memory and asynchronous copies on a side stream, overlapped with "
                    "compute (fast). Off: pageable memory and synchronous copies (slower; uses no "
                    "page-locked RAM)."}),
                "vace_blocks_to_swap": ("INT", {"default": 0, "min": 0, "max": 15, "step": 1, "tooltip":
                    "How many VACE blocks stream (the last N; 14B VACE has 8). 0 = none: all VACE "
                    "blocks stay on the GPU. Ignored for models without VACE."}),
                "prefetch_blocks": ("INT", {"default": 1, "min": 0, "max": 40, "step": 1, "tooltip":
                    "Blocks copied ahead while the current one computes. The GPU holds prefetch + 1 "
                    "(at least 2) streamed blocks at a time. 1 is enough when a block computes longer "
                    "than it copies; raise it for short clips or low resolutions."}),
                "block_swap_debug": ("BOOLEAN", {"default": False, "tooltip":
                    "Log a detailed summary after every sampling run: blocks resident/streamed, bytes "
                    "moved, prefetch hits, stalls, copy and stall times, peak memory."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def apply(self, model, blocks_to_swap, offload_txt_emb, offload_img_emb, use_non_blocking,
              vace_blocks_to_swap, prefetch_blocks, block_swap_debug, unique_id=None):
        from .callbacks import apply_block_swap, send_node_text

        settings = SwapSettings(blocks_to_swap=int(blocks_to_swap), prefetch_blocks=int(prefetch_blocks),
                                vace_blocks_to_swap=int(vace_blocks_to_swap),
                                offload_txt_emb=bool(offload_txt_emb), offload_img_emb=bool(offload_img_emb),
                                use_non_blocking=bool(use_non_blocking))
        out, text = apply_block_swap(model, settings, debug=bool(block_swap_debug),
                                     node_id=str(unique_id) if unique_id is not None else None)
        send_node_text(unique_id, text)
        return (out,)


NODE_CLASS_MAPPINGS = {
    "wan22BlockSwap": WAN22BlockSwap,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "wan22BlockSwap": "WAN 2.2 BlockSwap",
}
