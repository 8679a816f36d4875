"""ComfyUI node classes (V3 schema: ``comfy_api.latest.io``): inputs, tooltips, validation; the work
is in callbacks.py and the engine.

Node ids and input names are a public contract (saved workflows store them, and widget values by
position): never rename or reorder them; new inputs go at the end, optional. ComfyUI builds the
widgets in the order of ``Schema.inputs``, exactly as it did from a V1 ``INPUT_TYPES`` dict.

ComfyUI registers the nodes through ``comfy_entrypoint`` in ``__init__.py`` (the V3 extension
entry point), which returns :class:`BlockSwapExtension`.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

from comfy_api.latest import ComfyExtension, io

from .config import SwapSettings

from .utils import get_logger

log = get_logger("nodes")

# One family in the node library and in search: every display name starts with "WAN BlockSwap", the
# category is "WAN BlockSwap" with loaders/ and looper/ under it. Display names may change between
# versions (saved graphs store ids); the names of earlier versions stay findable as search aliases.
CATEGORY = "WAN BlockSwap"
DISPLAY_NAMES = {
    "wan22BlockSwap": "WAN BlockSwap",
    "wan22BlockSwapLooperModels": "WAN BlockSwap Looper Models",
    "wan22BlockSwapSequencer": "WAN BlockSwap Sequencer",
    "WAN22BlockSwapLooper": "WAN BlockSwap Looper (Loop-Aware)",
    "wan22BlockSwapLooper": "WAN BlockSwap Looper (Loop-Aware, old id)",
    "WANModelLoader": "WAN BlockSwap Model Loader",
    "WAN22BlockSwapLoader": "WAN BlockSwap Model Loader (swap at load)",
}
SEARCH_ALIASES = ["block swap", "blockswap", "offload", "low VRAM", "WAN 2.2", "WAN 2.1"]
OLD_NAMES = {  # display names of earlier versions
    "wan22BlockSwap": ["WAN 2.2 BlockSwap"],
    "wan22BlockSwapLooperModels": ["WAN22 BlockSwap Looper Models", "WanVideoLooper"],
    "wan22BlockSwapSequencer": ["WAN22 BlockSwap Sequencer", "WanVideoLoraSequencer"],
    "WAN22BlockSwapLooper": ["WAN 2.2 BlockSwap Looper"],
    "wan22BlockSwapLooper": ["WAN 2.2 BlockSwap Looper"],
    "WANModelLoader": ["WAN Model Loader", "load diffusion model", "GGUF"],
    "WAN22BlockSwapLoader": ["WAN BlockSwap Model Loader", "load diffusion model", "GGUF"],
}


def aliases(node_id: str) -> list:
    return SEARCH_ALIASES + OLD_NAMES[node_id]


def swap_inputs() -> list:
    """The swap settings every node of the pack takes, in this order (saved workflows store widget
    values by position). ``advanced``: rarely changed; ComfyUI's Nodes 2.0 view and the properties
    panel fold them under "advanced inputs" (the classic canvas still draws them)."""
    return [
        io.Int.Input("blocks_to_swap", default=20, min=0, max=48, step=1, tooltip=
            "How many transformer blocks live in host RAM and stream to the GPU (the last N). "
            "WAN 1.3B/5B have 30 blocks, 14B/A14B 40; larger values are clamped. More blocks = "
            "less VRAM, more PCIe traffic. 0 = off."),
        io.Boolean.Input("offload_txt_emb", advanced=True, default=False, tooltip=
            "Also stream the text embedding (about 0.1 GB for 14B); saves a little VRAM."),
        io.Boolean.Input("offload_img_emb", advanced=True, default=False, tooltip=
            "Also stream the image (CLIP) embedding of i2v models; no effect on models without one."),
        io.Boolean.Input("use_non_blocking", advanced=True, default=True, tooltip=
            "Pinned host memory and asynchronous copies on a side stream, overlapped with "
            "compute (fast). Off: pageable memory and synchronous copies (slower; uses no "
            "page-locked RAM)."),
        io.Int.Input("vace_blocks_to_swap", advanced=True, default=0, min=0, max=15, step=1, tooltip=
            "How many VACE blocks stream (the last N; 14B VACE has 8). 0 = none: all VACE "
            "blocks stay on the GPU. Ignored for models without VACE."),
        io.Int.Input("prefetch_blocks", advanced=True, default=1, min=0, max=40, step=1, tooltip=
            "Blocks copied ahead while the current one computes. The GPU holds prefetch + 1 "
            "(at least 2) streamed blocks at a time. 1 is enough when a block computes longer "
            "than it copies; raise it for short clips or low resolutions."),
        io.Boolean.Input("block_swap_debug", advanced=True, default=False, tooltip=
            "Log a detailed summary after every sampling run: blocks resident/streamed, bytes "
            "moved, prefetch hits, stalls, copy and stall times, peak memory."),
    ]


def budget_input() -> io.Combo.Input:
    """The optional automatic mode (optional, so saved workflows without it keep loading)."""
    from .budget import AUTO_CHOICES

    return io.Combo.Input("vram_budget", options=list(AUTO_CHOICES), default="off", optional=True, tooltip=
        "off: swap blocks_to_swap blocks. auto: choose the count from the GPU memory free now (what "
        "ComfyUI could free, minus --reserve-vram). A card preset (e.g. 12 GB / 480p): choose it for "
        "that card. Both use the model's measured block sizes, the slot ring and an activation "
        "estimate for that video size at 81 frames (an estimate, not yet measured on a GPU); the "
        "choice and why are shown on the node and in the log.")


def dynamic_vram_input() -> io.Combo.Input:
    """What to do when ComfyUI's Dynamic VRAM manages the model (optional, last: saved workflows
    without it keep loading, and it defaults to what the node did before it existed)."""
    from .callbacks import DYNAMIC_VRAM_CHOICES, PASS_THROUGH

    return io.Combo.Input("dynamic_vram", options=list(DYNAMIC_VRAM_CHOICES), default=PASS_THROUGH, optional=True,
                          advanced=True, tooltip=
        "Only when ComfyUI's Dynamic VRAM is on (its default on NVIDIA): 'pass through' leaves the model "
        "to ComfyUI's own weight streaming; 'block swap' reloads it as a classic model (as core's "
        "TorchCompileModel does; the whole model in RAM, checked first) and streams the chosen blocks.")


def host_memory_inputs() -> list:
    """Where the streamed blocks' host copies live (optional, after dynamic_vram: saved workflows without
    them keep loading, with auto)."""
    from .utils import HOST_MEMORY_CHOICES

    return [
        io.Combo.Input("host_memory", options=list(HOST_MEMORY_CHOICES), default="auto", optional=True,
                       advanced=True, tooltip=
            "Where the streamed blocks wait between uses. RAM: a copy in host RAM (fastest; needs their "
            "size in free RAM). file: no copy in RAM; each block is read from the model file (or from a "
            "spill file, for weights converted at load) just before it is copied to the GPU, so both WAN "
            "2.2 experts run on machines with less RAM than they need; a fast SSD hides the reads. auto: "
            "RAM when the copies fit with headroom (2 GiB or a fifth of what is free), else file."),
        io.String.Input("spill_folder", default="", optional=True, advanced=True, tooltip=
            "host_memory file: the folder for weights that are not a slice of a file (converted at load), "
            "written once per model and deleted with it. Empty: ComfyUI's temp folder. Pick a fast disk."),
    ]


def on_oom_input() -> io.Combo.Input:
    """What a device out-of-memory error in a forward does (optional and last: saved workflows without it
    keep loading, with recovery on)."""
    from .recovery import OOM_CHOICES, RETRY

    return io.Combo.Input("on_oom", options=list(OOM_CHOICES), default=RETRY, optional=True, advanced=True, tooltip=
        "swap more and retry: when the GPU runs out of memory in a forward, stream as many more blocks as the "
        "failure shows are needed and run that forward again (same output); the count that worked stays for "
        "later runs and is shown on the node. fail: the error stops the run, as without this node.")


def on_oom(swap: dict) -> str:
    from .recovery import RETRY

    return swap.get("on_oom") or RETRY


def host_memory(swap: dict) -> str:
    """The node's host_memory choice (absent in workflows saved before it existed)."""
    return swap.get("host_memory") or "auto"


def spill_folder(swap: dict) -> str:
    return (swap.get("spill_folder") or "").strip()


def free_device_bytes(patcher) -> Optional[int]:
    """GPU memory this model may use: free now, plus what ComfyUI can unload, minus --reserve-vram.
    None on a CPU (auto needs a GPU)."""
    dev = patcher.load_device
    if dev.type != "cuda":
        return None
    import comfy.model_management as mm

    # entries whose patcher is gone ("dead": ComfyUI's own free_memory skips them too)
    reclaimable = sum(lm.model_loaded_memory() for lm in mm.current_loaded_models
                      if lm.device == dev and lm.model is not None and not lm.is_dead())
    return max(0, int(mm.get_free_memory(dev)) + int(reclaimable) - int(mm.extra_reserved_memory()))


def apply_budget(patcher, settings, choice: str):
    """``settings`` with blocks_to_swap chosen for ``choice`` (unchanged for "off"), and the node's
    lines about the choice ("" for "off"; the log has the explanation, see budget.auto_blocks_for)."""
    from dataclasses import replace

    from .budget import auto_blocks_for

    if choice in (None, "off"):
        return settings, ""
    try:
        result = auto_blocks_for(patcher.get_model_object("diffusion_model"), choice,
                                 free_device_bytes(patcher), prefetch_blocks=settings.prefetch_blocks)
    except ValueError as e:  # auto without a GPU
        raise ValueError(f"vram_budget {choice!r}: {e}") from e
    if result.fits:
        text = f"vram_budget: {choice}\nchose {result.blocks_to_swap} of {result.num_blocks} blocks to swap"
    else:
        text = (f"WARNING: vram_budget {choice} is too small even with all {result.num_blocks} blocks "
                "swapped (see the log)")
        log.warning("block swap: %s", result.explanation)
    return replace(settings, blocks_to_swap=result.blocks_to_swap), text


def adaptive_memory(patcher, choice: str):
    """vram_budget adaptive: what the controller reads of the device (the budget the planner used, each
    forward's peak); None for every other choice. Made per model (each expert learns its own count)."""
    from .budget import ADAPTIVE

    if choice != ADAPTIVE or patcher is None:
        return None
    from .callbacks import DeviceMemory

    free = free_device_bytes(patcher)
    if free is None:
        raise ValueError("vram_budget 'adaptive' needs a CUDA device; pick a card preset or set blocks_to_swap")
    return DeviceMemory(patcher.load_device, free)


def budget_for_first_model(items, settings, choice: str):
    """Sequences: one plan for all their models (a pipeline's segments use the same architecture),
    made for the first model found. Returns ``(settings, explanation)``."""
    if choice in (None, "off"):
        return settings, ""
    from .looper_helpers import is_model

    stack = [items]
    while stack:
        item = stack.pop(0)
        if is_model(item):
            return apply_budget(item, settings, choice)
        if isinstance(item, (list, tuple)):
            stack[:0] = list(item)
    return settings, ""


def dynamic_vram(swap: dict) -> str:
    """The node's dynamic_vram choice (absent in workflows saved before it existed)."""
    from .callbacks import PASS_THROUGH

    return swap.get("dynamic_vram") or PASS_THROUGH


def parse_swap(swap: dict, unique_id=None):
    """The swap widgets' values -> (SwapSettings, debug flag, node id for the readout)."""
    settings = SwapSettings(blocks_to_swap=int(swap["blocks_to_swap"]),
                            prefetch_blocks=int(swap["prefetch_blocks"]),
                            vace_blocks_to_swap=int(swap["vace_blocks_to_swap"]),
                            offload_txt_emb=bool(swap["offload_txt_emb"]),
                            offload_img_emb=bool(swap["offload_img_emb"]),
                            use_non_blocking=bool(swap["use_non_blocking"]))
    return settings, bool(swap["block_swap_debug"]), (str(unique_id) if unique_id is not None else None)


MODEL_TOOLTIP = ("A WAN 2.1 / 2.2 diffusion model (t2v, i2v, VACE, 5B, A14B high or low noise expert), "
                 "safetensors or GGUF.")


def _node_id(cls) -> Optional[str]:
    """The executing node's id (ComfyUI's hidden UNIQUE_ID), None when called outside an execution."""
    uid = cls.hidden.unique_id if cls.hidden is not None else None
    return str(uid) if uid is not None else None


ANY = io.Custom("ANY")  # the looper pipelines' link type, as the V1 nodes declared it (not V3's "*")


class WAN22BlockSwap(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="wan22BlockSwap", display_name=DISPLAY_NAMES["wan22BlockSwap"],
            search_aliases=aliases("wan22BlockSwap"), category=CATEGORY,
            description=(
                "Keeps the chosen WAN 2.1/2.2 transformer blocks in RAM and streams them to the GPU as they "
                "run: 14B models on 8-16 GB cards, same output."),
            inputs=[io.Model.Input("model", tooltip=MODEL_TOOLTIP), *swap_inputs(), budget_input(), dynamic_vram_input(),
                    *host_memory_inputs(), on_oom_input()],
            outputs=[io.Model.Output(tooltip="A clone of the model whose chosen blocks stream from host RAM. "
                                             "The input model and its other clones are unchanged.")],
            hidden=[io.Hidden.unique_id])

    @classmethod
    def execute(cls, model, vram_budget="off", **swap) -> io.NodeOutput:
        return io.NodeOutput(*cls.apply(model, unique_id=_node_id(cls), vram_budget=vram_budget, **swap))

    @classmethod
    def apply(cls, model, unique_id=None, vram_budget="off", **swap):
        from .callbacks import apply_block_swap, send_node_text

        settings, debug, node_id = parse_swap(swap, unique_id)
        settings, why = apply_budget(model, settings, vram_budget)
        out, text = apply_block_swap(model, settings, debug=debug, node_id=node_id, dynamic_vram=dynamic_vram(swap),
                                     host_memory=host_memory(swap), spill_folder=spill_folder(swap),
                                     on_oom=on_oom(swap), memory=adaptive_memory(model, vram_budget))
        send_node_text(node_id, f"{text}\n{why}" if why else text)
        return (out,)


class WAN22BlockSwapLooperModels(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="wan22BlockSwapLooperModels", display_name=DISPLAY_NAMES["wan22BlockSwapLooperModels"],
            search_aliases=aliases("wan22BlockSwapLooperModels"),
            category=CATEGORY + "/looper",
            description=(
                "Block swap for both WAN 2.2 A14B experts (WanVideoLooper or two samplers); they share one "
                "set of GPU slots."),
            inputs=[io.Model.Input("model_high", tooltip="WAN 2.2 high-noise expert (early steps)."),
                    io.Model.Input("model_low", tooltip="WAN 2.2 low-noise expert (late steps)."),
                    *swap_inputs(), budget_input(), dynamic_vram_input(), *host_memory_inputs(),
                    on_oom_input()],
            outputs=[io.Model.Output("model_high",
                                     tooltip="The high-noise expert, ready for WanVideoLooper's model_high."),
                     io.Model.Output("model_low",
                                     tooltip="The low-noise expert, ready for WanVideoLooper's model_low.")],
            hidden=[io.Hidden.unique_id])

    @classmethod
    def execute(cls, model_high, model_low, vram_budget="off", **swap) -> io.NodeOutput:
        return io.NodeOutput(*cls.apply(model_high, model_low, unique_id=_node_id(cls), vram_budget=vram_budget,
                                        **swap))

    @classmethod
    def apply(cls, model_high, model_low, unique_id=None, vram_budget="off", **swap):
        from .engine.device_ring import SharedRing
        from .looper_helpers import masters_for, prepare_model_for_loop

        settings, debug, node_id = parse_swap(swap, unique_id)
        # the experts have the same architecture and take turns on the GPU: one plan serves both
        settings, why = apply_budget(model_high, settings, vram_budget)
        kw = dict(ring=SharedRing(), prepared={}, debug=debug, node_id=node_id, note=why,
                  dynamic_vram=dynamic_vram(swap), spill_folder=spill_folder(swap), on_oom=on_oom(swap),
                  **masters_for([model_high, model_low], settings, host_memory(swap), dynamic_vram(swap)))
        return (prepare_model_for_loop(model_high, settings, memory=adaptive_memory(model_high, vram_budget), **kw),
                prepare_model_for_loop(model_low, settings, memory=adaptive_memory(model_low, vram_budget), **kw))


class WAN22BlockSwapSequencer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="wan22BlockSwapSequencer", display_name=DISPLAY_NAMES["wan22BlockSwapSequencer"],
            search_aliases=aliases("wan22BlockSwapSequencer"),
            category=CATEGORY + "/looper",
            description=(
                "Block swap for every model in WanVideoLoraSequencer's model_clip_sequence; one shared set "
                "of GPU slots."),
            inputs=[ANY.Input("model_clip_sequence", tooltip=
                        "WanVideoLoraSequencer's output: a list of (model_high, model_low, clip) per segment."),
                    *swap_inputs(), budget_input(), dynamic_vram_input(), *host_memory_inputs(),
                    on_oom_input()],
            outputs=[ANY.Output("model_clip_sequence", tooltip=
                        "The same list of (model_high, model_low, clip) segments with prepared models; "
                        "connect it to WanVideoLooper's model_clip_sequence.")],
            hidden=[io.Hidden.unique_id])

    @classmethod
    def execute(cls, model_clip_sequence, vram_budget="off", **swap) -> io.NodeOutput:
        return io.NodeOutput(*cls.apply(model_clip_sequence, unique_id=_node_id(cls), vram_budget=vram_budget,
                                        **swap))

    @classmethod
    def apply(cls, model_clip_sequence, unique_id=None, vram_budget="off", **swap):
        from .looper_helpers import prepare_sequence

        settings, debug, node_id = parse_swap(swap, unique_id)
        settings, why = budget_for_first_model(model_clip_sequence, settings, vram_budget)
        return (prepare_sequence(model_clip_sequence, settings, debug=debug, node_id=node_id, note=why,
                                 dynamic_vram=dynamic_vram(swap), host_memory=host_memory(swap),
                                 spill_folder=spill_folder(swap), on_oom=on_oom(swap),
                                 memory=lambda m: adaptive_memory(m, vram_budget)),)


class _LoopAware(io.ComfyNode):
    """The original pack's loop-aware looper node, registered under two ids (below). Never registered
    itself: ComfyUI caches schema values per class on first use, and a subclass would read a parent's."""

    NODE_ID = DESCRIPTION_TEXT = None
    DEPRECATED_ID = False

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=cls.NODE_ID, display_name=DISPLAY_NAMES[cls.NODE_ID], search_aliases=aliases(cls.NODE_ID),
            category=CATEGORY + "/looper",
            description=cls.DESCRIPTION_TEXT,
            inputs=[ANY.Input("models_list", tooltip=
                        "A list of MODELs, or WanVideoLoraSequencer's list of (model_high, model_low, clip)."),
                    *swap_inputs(), budget_input(), dynamic_vram_input(), *host_memory_inputs(),
                    on_oom_input()],
            outputs=[ANY.Output("prepared_models", tooltip="The input list with prepared models, same shape.")],
            hidden=[io.Hidden.unique_id], is_deprecated=cls.DEPRECATED_ID)

    @classmethod
    def execute(cls, models_list, vram_budget="off", **swap) -> io.NodeOutput:
        return io.NodeOutput(*cls.apply(models_list, unique_id=_node_id(cls), vram_budget=vram_budget, **swap))

    @classmethod
    def apply(cls, models_list, unique_id=None, vram_budget="off", **swap):
        from .looper_helpers import is_model, prepare_sequence

        settings, debug, node_id = parse_swap(swap, unique_id)
        settings, why = budget_for_first_model(models_list, settings, vram_budget)
        kw = dict(debug=debug, node_id=node_id, note=why, dynamic_vram=dynamic_vram(swap),
                  host_memory=host_memory(swap), spill_folder=spill_folder(swap), on_oom=on_oom(swap),
                  memory=lambda m: adaptive_memory(m, vram_budget))
        if isinstance(models_list, (list, tuple)) and models_list and all(
                e is None or is_model(e) for e in models_list):
            # a plain list of models: treat each as a segment's high expert, then unwrap
            seq = prepare_sequence([(m, None, None) for m in models_list], settings, **kw)
            return ([e[0] for e in seq],)
        return (prepare_sequence(models_list, settings, **kw),)


class WAN22BlockSwapLooper(_LoopAware):
    NODE_ID = "WAN22BlockSwapLooper"
    DESCRIPTION_TEXT = ("For graphs from the original pack: a list of models or (high, low, clip) segments in, "
                        "the same list with block swap out.")


class WAN22BlockSwapLooperLegacy(_LoopAware):
    """The same node under the original pack's id, so its saved workflows still load. V3's deprecation
    flag hides it from search and the node library. (V3's NodeReplace is no substitute: ComfyUI and its
    front end apply a replacement only to ids that are *not* registered, so old graphs would open with a
    missing-node dialog instead of loading unchanged.)"""

    NODE_ID = "wan22BlockSwapLooper"
    DEPRECATED_ID = True
    DESCRIPTION_TEXT = ("The Loop-Aware looper under the original pack's id, so old graphs load. New graphs: "
                        "WAN BlockSwap Looper Models or Sequencer.")


def loader_inputs() -> list:
    """The loader widgets, in this order (saved workflows store widget values by position). The
    file lists are read from ComfyUI's model folders each time ComfyUI asks for the schema (the
    node list, a refresh, every prompt's validation)."""
    from .config import WAN_VARIANTS, WAN_VERSIONS
    from .model_loader import DTYPE_CHOICES, FP8_CHOICES, MODEL_TYPES, list_model_files

    return [
        io.Combo.Input("model_type", options=list(MODEL_TYPES), default="safetensors", tooltip=
            "Which file list to load from: safetensors (fp16/bf16/fp8) or gguf (Q8_0 ... Q2_K). "
            "The file's content must match."),
        io.Combo.Input("safetensors_model", options=list_model_files("safetensors"), tooltip=
            "A WAN 2.1 / 2.2 diffusion model (.safetensors) from models/diffusion_models. Used when "
            "model_type is safetensors."),
        io.Combo.Input("gguf_model", options=list_model_files("gguf"), tooltip=
            "A WAN 2.1 / 2.2 GGUF model from models/diffusion_models or models/unet; it stays "
            "quantized in memory and is dequantized on the GPU as each layer runs. Used when "
            "model_type is gguf."),
        io.Combo.Input("wan_version", advanced=True, options=list(WAN_VERSIONS), default="auto", tooltip=
            "auto: detected from the tensor shapes. 2.1 / 2.2: also checks the file is that version "
            "(an error if it is not). A 14B t2v file fits both: WAN 2.2 A14B experts have the 2.1 "
            "14B architecture."),
        io.Combo.Input("model_variant", advanced=True, options=list(WAN_VARIANTS), default="auto", tooltip=
            "auto: detected from the file's keys and shapes. Anything else is checked against the "
            "file (an error if it disagrees)."),
        io.Combo.Input("fp8_optimization", options=list(FP8_CHOICES), default="disabled", tooltip=
            "Store the transformer blocks' large matrices in fp8 with one scale per tensor (norms, "
            "biases, modulation, embeddings and the head keep their precision). Halves those "
            "weights' memory and the bytes block swap moves; they are dequantized on the GPU at use, "
            "so it saves memory, not time. e4m3fn is more precise than e5m2. Ignored for weights "
            "that are already fp8 or GGUF-quantized."),
        io.Combo.Input("weight_dtype", advanced=True, options=list(DTYPE_CHOICES), default="auto", tooltip=
            "dtype of the unquantized weights. auto: ComfyUI's choice for this GPU and file (as "
            "UNETLoader). fp16/bf16/fp32 force one; an error if the GPU cannot run it."),
    ]


def loaded_text(info, file_name: str) -> str:
    """The loaders' node lines: what the file is (the log line has dims, stored types, dtypes)."""
    blocks = f"{info.num_blocks} blocks" + (f" + {info.num_vace_blocks} VACE" if info.num_vace_blocks else "")
    name = file_name.replace("\\", "/").rsplit("/", 1)[-1]  # the file, not its sub-folder in the list
    return f"WAN {info.version} {info.size} {info.variant}, {blocks}\n{name}"


def _load(model_type, safetensors_model, gguf_model, for_swap=False, **choices):
    from .model_loader import load_wan_model, resolve_model_file

    path = resolve_model_file(model_type, safetensors_model if model_type == "safetensors" else gguf_model)
    return load_wan_model(path, model_type=model_type, for_swap=for_swap, **choices)




class WANModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WANModelLoader", display_name=DISPLAY_NAMES["WANModelLoader"],
            search_aliases=aliases("WANModelLoader"), category=CATEGORY + "/loaders",
            description=(
                "Loads a WAN 2.1/2.2 .safetensors or .gguf diffusion model; block swap works on it even with "
                "ComfyUI's Dynamic VRAM on."),
            inputs=loader_inputs(),
            outputs=[io.Model.Output(tooltip="The WAN diffusion model; chain WAN BlockSwap, LoRA loaders and "
                                             "samplers after it.")],
            hidden=[io.Hidden.unique_id])

    @classmethod
    def execute(cls, model_type, safetensors_model, gguf_model, wan_version, model_variant, fp8_optimization,
                weight_dtype) -> io.NodeOutput:
        return io.NodeOutput(*cls.load(model_type, safetensors_model, gguf_model, wan_version, model_variant,
                                       fp8_optimization, weight_dtype, unique_id=_node_id(cls)))

    @classmethod
    def load(cls, model_type, safetensors_model, gguf_model, wan_version, model_variant,
             fp8_optimization, weight_dtype, unique_id=None):
        from .callbacks import send_node_text

        patcher, info, _text = _load(model_type, safetensors_model, gguf_model, wan_version=wan_version,
                                     model_variant=model_variant, fp8_optimization=fp8_optimization,
                                     weight_dtype=weight_dtype)
        send_node_text(str(unique_id) if unique_id is not None else None,
                       loaded_text(info, safetensors_model if model_type == "safetensors" else gguf_model))
        return (patcher,)


class WAN22BlockSwapLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WAN22BlockSwapLoader", display_name=DISPLAY_NAMES["WAN22BlockSwapLoader"],
            search_aliases=aliases("WAN22BlockSwapLoader"), category=CATEGORY + "/loaders",
            description=(
                "Loads a WAN 2.1/2.2 model with block swap: the streamed blocks go from the file to RAM and "
                "never touch the GPU."),
            inputs=[*loader_inputs(), *swap_inputs(), budget_input(), *host_memory_inputs(), on_oom_input()],
            outputs=[io.Model.Output(tooltip="The WAN model with the chosen blocks streaming from host RAM.")],
            hidden=[io.Hidden.unique_id])

    @classmethod
    def execute(cls, model_type, safetensors_model, gguf_model, wan_version, model_variant, fp8_optimization,
                weight_dtype, vram_budget="off", **swap) -> io.NodeOutput:
        return io.NodeOutput(*cls.load(model_type, safetensors_model, gguf_model, wan_version, model_variant,
                                       fp8_optimization, weight_dtype, unique_id=_node_id(cls),
                                       vram_budget=vram_budget, **swap))

    @classmethod
    def load(cls, model_type, safetensors_model, gguf_model, wan_version, model_variant,
             fp8_optimization, weight_dtype, unique_id=None, vram_budget="off", **swap):
        from .callbacks import apply_block_swap, default_spill_folder, plan_for, send_node_text
        from .engine.file_masters import SpillError
        from .model_loader import Streamed
        from .utils import choose_host_memory, host_available_bytes

        settings, debug, node_id = parse_swap(swap, unique_id)
        budget = vram_budget not in (None, "off")
        choice, folder = host_memory(swap), spill_folder(swap) or default_spill_folder()
        masters = {"host_memory": choice, "masters_why": None}

        def streamed_units(diffusion_model):  # known before reading: their weights go straight to masters
            if budget:  # the count depends on the loaded sizes: every block is a candidate
                return plan_for(diffusion_model, replace(settings, blocks_to_swap=48, vace_blocks_to_swap=15))[2].units
            return plan_for(diffusion_model, settings)[2].units

        def decide(need: int) -> str:  # RAM or file, from the streamed units' bytes in the file's header
            masters["host_memory"], masters["masters_why"] = choose_host_memory(choice, need, host_available_bytes())
            return masters["host_memory"]

        # With vram_budget and RAM masters the count depends on the loaded sizes: those blocks are repacked once.
        streamed = None if budget and choice == "RAM" else Streamed(streamed_units, decide, folder)
        load = dict(for_swap=True, wan_version=wan_version, model_variant=model_variant,
                    fp8_optimization=fp8_optimization, weight_dtype=weight_dtype)
        try:
            patcher, info, _text = _load(model_type, safetensors_model, gguf_model, streamed=streamed, **load)
        except SpillError as err:  # the spill folder failed: host copies in RAM where they fit
            failure = err

            def in_ram(need: int) -> str:
                if need > host_available_bytes():
                    raise failure
                log.warning("block swap: %s; loading with the host masters in RAM instead", failure)
                masters["host_memory"], masters["masters_why"] = "RAM", "spill failed"
                return "RAM"

            patcher, info, _text = _load(model_type, safetensors_model, gguf_model,
                                         streamed=Streamed(streamed_units, in_ram, folder), **load)
        settings, why = apply_budget(patcher, settings, vram_budget)
        out, swap_text = apply_block_swap(patcher, settings, debug=debug, node_id=node_id, pack_masters=True,
                                          spill_folder=folder, on_oom=on_oom(swap),
                                          memory=adaptive_memory(patcher, vram_budget), **masters)
        loaded = loaded_text(info, safetensors_model if model_type == "safetensors" else gguf_model)
        send_node_text(node_id, "\n".join(t for t in (swap_text, why, loaded) if t))
        return (out,)


NODES = [WAN22BlockSwap, WAN22BlockSwapLooperModels, WAN22BlockSwapSequencer, WAN22BlockSwapLooper,
         WAN22BlockSwapLooperLegacy, WANModelLoader, WAN22BlockSwapLoader]


class BlockSwapExtension(ComfyExtension):
    """What ``comfy_entrypoint`` gives ComfyUI: the node classes."""

    async def get_node_list(self) -> list:
        return list(NODES)


# id -> class (the ids each schema declares; tests check they agree). ComfyUI reads ids and display
# names from the schemas through the extension; these are for tests and scripts.
NODE_CLASS_MAPPINGS = {
    "wan22BlockSwap": WAN22BlockSwap,
    "wan22BlockSwapLooperModels": WAN22BlockSwapLooperModels,
    "wan22BlockSwapSequencer": WAN22BlockSwapSequencer,
    "WAN22BlockSwapLooper": WAN22BlockSwapLooper,
    "wan22BlockSwapLooper": WAN22BlockSwapLooperLegacy,
    "WANModelLoader": WANModelLoader,
    "WAN22BlockSwapLoader": WAN22BlockSwapLoader,
}
NODE_DISPLAY_NAME_MAPPINGS = DISPLAY_NAMES
