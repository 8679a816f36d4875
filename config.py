"""Validated swap settings, WAN layout detection and swap planning.

Pure Python + torch: nothing here imports ComfyUI, so the planner can be used and tested anywhere.

Two WAN implementations are recognised by their module tree:

* ComfyUI's ``WanModel`` (``comfy/ldm/wan/model.py``): ``blocks``, optional ``vace_blocks``,
  ``text_embedding``, optional ``img_emb``.
* diffusers' ``WanTransformer3DModel``: ``blocks``, ``condition_embedder.text_embedder``,
  optional ``condition_embedder.image_embedder``.

Any other module with a ``blocks`` ``ModuleList`` works too (only the main blocks can then stream).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
from torch import nn

PLACEMENTS = ("last", "even")
HOST_MEMORY = ("RAM", "file")  # the engine's kinds of host master ("auto" is the nodes' choice between them)

# (text embedding path, image embedding path) per known implementation, first match wins.
_EMBEDDING_PATHS = (
    ("comfyui", "text_embedding", "img_emb"),
    ("diffusers", "condition_embedder.text_embedder", "condition_embedder.image_embedder"),
)


class BlockSwapError(ValueError):
    """Bad input for block swapping. The message names the value and what would be valid."""


def unwrap(module: nn.Module) -> nn.Module:
    """The real module behind a stand-in that exposes it as ``swapped_module`` (the ComfyUI
    integration puts such stand-ins into a patched model's tree); any other module as is."""
    return getattr(module, "swapped_module", None) or module


def _get_submodule(model: nn.Module, path: str) -> Optional[nn.Module]:
    try:
        mod = unwrap(model.get_submodule(path))
    except AttributeError:
        return None
    # A module without parameters (e.g. an Identity placeholder) has nothing to stream.
    return mod if any(True for _ in mod.parameters()) else None


@dataclass(frozen=True)
class ModelLayout:
    """What a WAN-like module holds that can be streamed."""

    implementation: str  # "comfyui", "diffusers" or "generic"
    num_blocks: int
    num_vace_blocks: int = 0
    text_embedding: Optional[str] = None  # dotted module path, None when absent
    image_embedding: Optional[str] = None

    @property
    def block_names(self) -> List[str]:
        return [f"blocks.{i}" for i in range(self.num_blocks)]


def detect_layout(model: nn.Module) -> ModelLayout:
    """Inspect ``model`` and return its :class:`ModelLayout`.

    Raises :class:`BlockSwapError` when the module has no ``blocks`` ModuleList, so the caller
    learns what is wrong before anything is touched.
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        found = type(blocks).__name__ if blocks is not None else "nothing"
        raise BlockSwapError(
            f"{type(model).__name__} has no 'blocks' ModuleList (found {found}); block swap needs a "
            "WAN diffusion transformer (ComfyUI's WanModel or diffusers' WanTransformer3DModel)."
        )
    if len(blocks) == 0:
        raise BlockSwapError(f"{type(model).__name__}.blocks is empty: nothing to swap.")
    vace = getattr(model, "vace_blocks", None)
    num_vace = len(vace) if isinstance(vace, nn.ModuleList) else 0
    for impl, text_path, image_path in _EMBEDDING_PATHS:
        text = _get_submodule(model, text_path)
        if text is not None:
            image = _get_submodule(model, image_path)
            return ModelLayout(impl, len(blocks), num_vace, text_path,
                               image_path if image is not None else None)
    return ModelLayout("generic", len(blocks), num_vace)


@dataclass(frozen=True)
class SwapSettings:
    """User-facing swap options, validated against a layout by :func:`plan_swap`."""

    blocks_to_swap: int = 0
    placement: str = "last"  # "last": the last N blocks (the original pack's convention); "even": spread
    prefetch_blocks: int = 1  # blocks copied ahead of the one computing; the ring holds prefetch+1
    vace_blocks_to_swap: int = 0  # 0 streams no VACE block
    offload_txt_emb: bool = False
    offload_img_emb: bool = False
    use_non_blocking: bool = True  # pinned host masters + copies on a side stream (CUDA only)
    pin_budget_bytes: Optional[int] = None  # None: pin every master; above the budget: pageable
    # Where host masters live: "RAM" (a copy per streamed unit) or "file" (read from the model file, or
    # from a spill file in spill_dir, just ahead of use: see file_masters). None spill_dir: the OS temp folder.
    host_memory: str = "RAM"
    spill_dir: Optional[str] = None


@dataclass(frozen=True)
class SwapPlan:
    """Which units stream, in the order a forward is expected to run them."""

    layout: ModelLayout
    units: Tuple[str, ...]  # dotted module paths, expected execution order
    block_indices: Tuple[int, ...]
    vace_indices: Tuple[int, ...]
    slots: int  # device ring size K
    settings: SwapSettings = field(default_factory=SwapSettings)

    @property
    def resident_blocks(self) -> Tuple[int, ...]:
        swapped = set(self.block_indices)
        return tuple(i for i in range(self.layout.num_blocks) if i not in swapped)


def choose_blocks(num_blocks: int, count: int, placement: str = "last") -> Tuple[int, ...]:
    """Indices of the ``count`` blocks to stream out of ``num_blocks``.

    ``last`` takes the tail (what earlier WAN block-swap packs did, so saved workflows behave the
    same). ``even`` spreads them so resident blocks sit between streamed ones and give the copy
    engine compute to hide behind.
    """
    if placement not in PLACEMENTS:
        raise BlockSwapError(f"placement {placement!r} is not one of {', '.join(PLACEMENTS)}")
    if not 0 <= count <= num_blocks:
        raise BlockSwapError(f"blocks_to_swap={count} is outside 0..{num_blocks} for this model")
    if count == 0:
        return ()
    if placement == "last":
        return tuple(range(num_blocks - count, num_blocks))
    # Centre of each of `count` equal strides; strides are >= 1 block wide so indices are distinct.
    return tuple(int((i + 0.5) * num_blocks / count) for i in range(count))


def ring_size(prefetch_blocks: int, num_units: int) -> int:
    """K = prefetch depth + 1, at least 2, but never more slots than there are streamed units."""
    if num_units == 0:
        return 0
    return min(max(2, prefetch_blocks + 1), num_units)


def plan_swap(layout: ModelLayout, settings: SwapSettings) -> SwapPlan:
    """Validate ``settings`` against ``layout`` and decide what streams."""
    s = settings
    if isinstance(s.blocks_to_swap, bool) or not isinstance(s.blocks_to_swap, int):
        raise BlockSwapError(f"blocks_to_swap must be an integer, got {s.blocks_to_swap!r}")
    if not 0 <= s.blocks_to_swap <= layout.num_blocks:
        raise BlockSwapError(
            f"blocks_to_swap={s.blocks_to_swap} is outside 0..{layout.num_blocks} "
            f"(this model has {layout.num_blocks} blocks)")
    if not isinstance(s.prefetch_blocks, int) or s.prefetch_blocks < 0:
        raise BlockSwapError(f"prefetch_blocks={s.prefetch_blocks!r} must be an integer >= 0")
    if not 0 <= s.vace_blocks_to_swap <= layout.num_vace_blocks:
        raise BlockSwapError(
            f"vace_blocks_to_swap={s.vace_blocks_to_swap} is outside 0..{layout.num_vace_blocks} "
            f"(this model has {layout.num_vace_blocks} VACE blocks)")
    if s.pin_budget_bytes is not None and s.pin_budget_bytes < 0:
        raise BlockSwapError(f"pin_budget_bytes={s.pin_budget_bytes} must be >= 0 or None")
    if s.host_memory not in HOST_MEMORY:
        raise BlockSwapError(f"host_memory={s.host_memory!r} must be one of {', '.join(HOST_MEMORY)}")

    blocks = choose_blocks(layout.num_blocks, s.blocks_to_swap, s.placement)
    # VACE blocks are streamed from the end, like the main blocks' default.
    vace = tuple(range(layout.num_vace_blocks - s.vace_blocks_to_swap, layout.num_vace_blocks))
    units: List[str] = []
    # Expected execution order: embeddings, then main blocks. VACE blocks run interleaved with the
    # main blocks; the engine learns their real position from the first forward.
    if s.offload_txt_emb and layout.text_embedding:
        units.append(layout.text_embedding)
    if s.offload_img_emb and layout.image_embedding:
        units.append(layout.image_embedding)
    units += [f"blocks.{i}" for i in blocks]
    units += [f"vace_blocks.{i}" for i in vace]
    return SwapPlan(layout, tuple(units), blocks, vace, ring_size(s.prefetch_blocks, len(units)), s)


def is_wrapper_tensor(t: torch.Tensor) -> bool:
    """True for a wrapper tensor subclass (its own ``__torch_dispatch__``, e.g. ComfyUI's
    QuantizedTensor for fp8_scaled / NVFP4 / INT8 files): its bytes live in inner plain tensors, and
    its ``dtype`` / ``element_size`` are the logical ones, not what is stored."""
    return getattr(type(t), "__torch_dispatch__", None) is not torch.Tensor.__torch_dispatch__


def leaf_tensors(t: torch.Tensor) -> List[Tuple[str, torch.Tensor]]:
    """The plain tensors that hold ``t``'s bytes: ``[("", t)]`` for a plain tensor (subclasses with
    their own storage such as GGUF tensors included), the ``__tensor_flatten__`` inner tensors of a
    wrapper subclass (``_qdata``, the scales...). Raises :class:`BlockSwapError` for a wrapper that
    does not declare its inner tensors, or nests another wrapper."""
    if not is_wrapper_tensor(t):
        return [("", t)]
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is None or not hasattr(type(t), "__tensor_unflatten__"):
        raise BlockSwapError(
            f"{type(t).__name__} weights do not declare their inner tensors (__tensor_flatten__), so "
            "block swap cannot pack them; load the model in another format or swap fewer blocks.")
    names, _ctx = flatten()
    out = [(name, getattr(t, name)) for name in names]
    for name, inner in out:
        if is_wrapper_tensor(inner):
            raise BlockSwapError(f"{type(t).__name__}.{name} is itself a {type(inner).__name__}: nested "
                                 "wrapper tensors cannot be streamed by block swap.")
    return out


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor really stores: fp8 is 1 byte, GGUF raw bytes as they are, a wrapper subclass
    (ComfyUI's QuantizedTensor) the sum of its inner tensors, not its logical dtype's size."""
    if is_wrapper_tensor(t):
        return sum(tensor_bytes(inner) for _, inner in leaf_tensors(t))
    return torch.Tensor.numel(t) * torch.Tensor.element_size(t)


# ---------------------------------------------------------------------------------------------
# WAN version / variant identification (the loaders' report and their check of explicit choices)

WAN_VERSIONS = ("auto", "2.1", "2.2")
WAN_VARIANTS = ("auto", "t2v", "i2v", "vace", "camera", "s2v", "humo", "animate")
_SIZE_LABELS = {1536: "1.3B", 3072: "5B", 5120: "14B"}
# ComfyUI's model_type -> (our variant, version when the type alone settles it)
_COMFY_TYPES = {"t2v": ("t2v", None), "i2v": ("i2v", "2.1"), "vace": ("vace", None),
                "camera": ("camera", "2.1"), "camera_2.2": ("camera", "2.2"), "s2v": ("s2v", "2.2"),
                "humo": ("humo", None), "animate": ("animate", "2.2")}


@dataclass(frozen=True)
class WanInfo:
    """What a WAN file is, from ComfyUI's detected unet config and the tensor shapes."""

    version: str  # "2.1", "2.2" or "2.1/2.2" where the architecture is the same in both
    variant: str  # one of WAN_VARIANTS[1:], or ComfyUI's model_type for other WAN derivatives
    size: str  # "1.3B", "5B", "14B" or "dim N"
    dim: int
    num_blocks: int
    num_vace_blocks: int
    in_dim: int
    out_dim: int
    accepts_variants: Tuple[str, ...]  # explicit model_variant values consistent with the file
    note: str = ""

    def describe(self) -> str:
        text = (f"WAN {self.version} {self.size} {self.variant}: {self.num_blocks} blocks"
                + (f" + {self.num_vace_blocks} VACE blocks" if self.num_vace_blocks else "")
                + f", dim {self.dim}, in/out channels {self.in_dim}/{self.out_dim}")
        return text + (f" ({self.note})" if self.note else "")


def identify_wan(unet_config: dict, has_img_emb: bool) -> WanInfo:
    """Version and variant of a WAN model from ComfyUI's detected ``unet_config`` (``model_type``,
    ``dim``, ``num_layers``, ``in_dim``, ``out_dim``, ``vace_layers``) and whether it has a CLIP image
    embedding. Only facts the shapes settle are claimed: a 14B t2v file is either WAN 2.1 14B or a
    WAN 2.2 A14B expert (same architecture), so its version is "2.1/2.2"."""
    comfy_type = unet_config.get("model_type", "t2v")
    dim, in_dim, out_dim = (int(unet_config.get(k, 0)) for k in ("dim", "in_dim", "out_dim"))
    variant, version = _COMFY_TYPES.get(comfy_type, (comfy_type, None))
    accepts: Tuple[str, ...] = (variant,)
    note = ""
    if out_dim == 48:  # only WAN 2.2's TI2V 5B predicts 48 latent channels (its 16x VAE)
        version, accepts, note = "2.2", ("t2v", "i2v"), "TI2V: text and image to video"
    elif comfy_type == "t2v" and in_dim == 36 and not has_img_emb:
        # WAN 2.2 A14B i2v dropped the CLIP image embedding; ComfyUI runs it as its t2v class
        variant, version, accepts = "i2v", "2.2", ("i2v",)
    elif dim == 1536:
        version = "2.1"  # WAN 2.2 has no 1.3B model
    return WanInfo(version=version or "2.1/2.2", variant=variant, size=_SIZE_LABELS.get(dim, f"dim {dim}"),
                   dim=dim, num_blocks=int(unet_config.get("num_layers", 0)),
                   num_vace_blocks=int(unet_config.get("vace_layers", 0) or 0), in_dim=in_dim,
                   out_dim=out_dim, accepts_variants=accepts, note=note)


def check_wan_choice(info: WanInfo, wan_version: str, model_variant: str, path: str) -> None:
    """Raise BlockSwapError when an explicit choice contradicts what the file is."""
    if wan_version not in WAN_VERSIONS:
        raise BlockSwapError(f"wan_version must be one of {', '.join(WAN_VERSIONS)}, got {wan_version!r}")
    if model_variant not in WAN_VARIANTS:
        raise BlockSwapError(f"model_variant must be one of {', '.join(WAN_VARIANTS)}, got {model_variant!r}")
    if wan_version != "auto" and wan_version not in info.version.split("/"):
        raise BlockSwapError(f"{path}: wan_version is set to {wan_version}, but the file is "
                             f"{info.describe()}. Set wan_version to auto or {info.version}, or pick the right file.")
    if model_variant != "auto" and model_variant not in info.accepts_variants:
        raise BlockSwapError(f"{path}: model_variant is set to {model_variant}, but the file is "
                             f"{info.describe()}. Set model_variant to auto or {info.variant}, or pick the right file.")
