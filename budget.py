"""Automatic swap budget: how many WAN blocks to stream so a run fits a device-memory budget.

Pure Python + torch (nothing from ComfyUI, nothing done at import), so it can be tested anywhere.

The plan rests on one sum. Peak device memory while sampling is about

    other weights (never streamed) + resident blocks + ring (K slots of the largest streamed block)
    + activations of one forward + a reserve

and :func:`plan_auto_blocks` picks the smallest number of streamed blocks (the last N, as the
engine streams them) for which that sum stays within the budget. The budget comes from free device
memory ("auto" choices) or from a named preset for a card size (:data:`PRESETS`); block and
other-weight sizes are measured on the loaded model (:func:`auto_blocks_for`) or, for planning
without one, estimated from the layout (:func:`block_bytes_estimate`, :func:`other_bytes_estimate`).

The activation figure is an *estimate from the model code*, not yet calibrated on a GPU; its
constants are named below so benchmark runs can correct them. Sizes in explanations are GiB
(2**30 bytes), the unit GPU tools and the "8 GB" card names actually mean.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, NamedTuple, Optional, Sequence, Tuple

from torch import nn

from .engine.host_masters import packed_bytes
from .config import BlockSwapError, ring_size, tensor_bytes, unwrap
from .utils import get_logger

log = get_logger("budget")

GiB = 1024 ** 3
MiB = 1024 ** 2

# --- Activation estimate (see estimate_activation_bytes). Units: one "hidden copy" is a
# [batch, tokens, dim] tensor in the compute dtype. Counted from ComfyUI 0.28's comfy/ldm/wan/model.py.
# Self-attention peak, while RoPE runs on k: the residual x, the modulated block input, the finished
# q, k's normed projection, and apply_rope1's fp32 copy of k and fp32 result (2 + 2 copies).
ATTN_LIVE_HIDDEN = 8.0
# FFN peak, while the GELU runs: x and the modulated input (dim wide) ...
FFN_LIVE_HIDDEN = 2.0
# ... plus the first Linear's output and the GELU's output (ffn_dim wide each).
FFN_LIVE_INTERMEDIATE = 2.0
# VACE keeps the patch-embedded input (x_orig) and the control stream alive through the forward.
VACE_LIVE_HIDDEN = 2.0
# The embedded text context and the cross-attention k and v computed from it.
CONTEXT_LIVE_COPIES = 3.0
# Unmodelled temporaries (the 5B's per-frame modulation expanded per token, norm internals,
# attention-backend workspaces, quantised q/k of SageAttention) and caching-allocator slack.
ACTIVATION_SAFETY = 1.5
# Resolution-independent: cuBLAS workspaces, embedding/head temporaries, the sampler's latents.
ACTIVATION_FIXED_BYTES = 256 * MiB

# CLIP-vision tokens WAN 2.1 i2v prepends to the text context; CLIP and VACE input widths.
CLIP_TOKENS = 257
CLIP_DIM = 1280
VACE_IN_DIM = 96

# ComfyUI runs cond and uncond in one batch only when its own estimate says both fit, else one after
# the other (comfy/samplers.py, _calc_cond_batch); at video token counts a forward is compute-bound,
# so planning for batch 1 keeps more blocks resident at almost no cost in speed.
DEFAULT_BATCH = 1
DEFAULT_RESERVE = 512 * MiB  # headroom for other processes and fragmentation beyond the estimate
# A card's nominal size minus what a process cannot use for tensors: the CUDA context with torch's
# kernels and a desktop the card may drive. Only presets subtract it; measured free memory already has.
PRESET_UNUSABLE_BYTES = 768 * MiB

# Stored bytes per weight of the large matrices, for estimates without a loaded model.
# GGUF: block bytes / block weights (Q8_0 34/32, Q6_K 210/256, Q5_K 176/256, Q4_K 144/256, ...).
BYTES_PER_PARAM: Dict[str, float] = {
    "fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0,
    "q8_0": 34 / 32, "q6_k": 210 / 256, "q5_k": 176 / 256, "q4_k": 144 / 256, "q4_0": 18 / 32,
    "q3_k": 110 / 256,
}


@dataclass(frozen=True)
class ModelDims:
    """The sizes of one WAN diffusion transformer that memory depends on."""

    dim: int
    ffn_dim: int
    num_heads: int
    num_blocks: int
    in_dim: int
    out_dim: int
    patch_size: Tuple[int, int, int] = (1, 2, 2)
    vae_stride: Tuple[int, int, int] = (4, 8, 8)  # (t, h, w) pixels per latent; WAN 2.2 5B: (4, 16, 16)
    text_len: int = 512  # umT5 tokens ComfyUI pads the prompt to
    num_vace_blocks: int = 0
    img_cross_attn: bool = False  # WAN 2.1 i2v/flf2v: k_img/v_img for CLIP tokens (2.2 dropped them)
    text_dim: int = 4096  # umT5-XXL width, input of text_embedding
    freq_dim: int = 256  # sinusoidal timestep width, input of time_embedding

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def from_module(cls, diffusion_model: nn.Module) -> "ModelDims":
        """Read the dims from a ComfyUI-layout ``WanModel`` (``model.diffusion_model``).

        Uses module attributes where ComfyUI sets them, else weight shapes in logical units
        (``tensor_shape`` of ComfyUI-GGUF tensors, whose storage holds raw quantised bytes). Raises :class:`BlockSwapError` when the module
        is not a WAN transformer.
        """
        m = unwrap(diffusion_model)
        blocks = getattr(m, "blocks", None)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise BlockSwapError(f"{type(m).__name__} has no non-empty 'blocks' ModuleList: "
                                 "auto budget needs a WAN diffusion transformer")
        b0 = unwrap(blocks[0])

        def shape(path: str, root: nn.Module = m) -> Optional[Tuple[int, ...]]:
            try:
                w = root.get_submodule(path).weight
            except AttributeError:
                return None
            # ComfyUI-GGUF keeps the logical shape in tensor_shape (its .shape reports it too)
            logical = getattr(w, "tensor_shape", None)
            return tuple(logical if logical is not None else w.shape)

        dim = getattr(m, "dim", None) or (shape("self_attn.q", b0) or (None,))[0]
        ffn = getattr(b0, "ffn_dim", None) or (shape("ffn.0", b0) or (None,))[0]
        heads = getattr(m, "num_heads", None) or getattr(getattr(b0, "self_attn", None), "num_heads", None)
        patch = getattr(m, "patch_size", None)
        pe = shape("patch_embedding")  # Conv3d: [dim, in_dim, pt, ph, pw]
        if patch is None and pe is not None:
            patch = pe[2:]
        if not all(isinstance(v, int) and v > 0 for v in (dim, ffn, heads)) or patch is None or pe is None:
            raise BlockSwapError(f"{type(m).__name__} does not look like a WAN transformer "
                                 "(could not read dim, ffn_dim, num_heads and patch_embedding)")
        patch = tuple(int(p) for p in patch)
        head = shape("head.head")
        out_dim = getattr(m, "out_dim", None) or (head[0] // math.prod(patch) if head else 16)
        vace = getattr(m, "vace_blocks", None)
        text = shape("text_embedding.0")
        time = shape("time_embedding.0")
        return cls(
            dim=int(dim), ffn_dim=int(ffn), num_heads=int(heads), num_blocks=len(blocks),
            in_dim=int(pe[1]), out_dim=int(out_dim), patch_size=patch,
            # ComfyUI tells the 5B (WAN 2.2 VAE, 16x spatial) apart by its 48 output channels, too.
            vae_stride=(4, 16, 16) if out_dim == 48 else (4, 8, 8),
            num_vace_blocks=len(vace) if isinstance(vace, nn.ModuleList) else 0,
            img_cross_attn=hasattr(getattr(b0, "cross_attn", None), "k_img"),
            text_dim=int(text[1]) if text else 4096, freq_dim=int(time[1]) if time else 256)


# Published configurations. The WAN 2.2 A14B model is two experts (high noise, low noise) with the
# 14B dims; they run one after the other, so each is planned on its own with the full budget.
REFERENCE_MODELS: Dict[str, ModelDims] = {
    "wan2.1-t2v-1.3b": ModelDims(dim=1536, ffn_dim=8960, num_heads=12, num_blocks=30, in_dim=16, out_dim=16),
    "wan2.1-t2v-14b": ModelDims(dim=5120, ffn_dim=13824, num_heads=40, num_blocks=40, in_dim=16, out_dim=16),
    "wan2.1-i2v-14b": ModelDims(dim=5120, ffn_dim=13824, num_heads=40, num_blocks=40, in_dim=36, out_dim=16,
                                img_cross_attn=True),
    "wan2.2-ti2v-5b": ModelDims(dim=3072, ffn_dim=14336, num_heads=24, num_blocks=30, in_dim=48, out_dim=48,
                                vae_stride=(4, 16, 16)),
    "wan2.2-t2v-a14b": ModelDims(dim=5120, ffn_dim=13824, num_heads=40, num_blocks=40, in_dim=16, out_dim=16),
    "wan2.2-i2v-a14b": ModelDims(dim=5120, ffn_dim=13824, num_heads=40, num_blocks=40, in_dim=36, out_dim=16),
}


def latent_tokens(dims: ModelDims, width: int, height: int, frames: int) -> int:
    """Transformer tokens of one video: VAE-compressed, then patchified (padded up, as ComfyUI)."""
    if min(width, height, frames) < 1:
        raise ValueError(f"width, height and frames must be >= 1, got {width}x{height}x{frames}")
    st, sh, sw = dims.vae_stride
    pt, ph, pw = dims.patch_size
    lat = ((frames - 1) // st + 1, max(1, height // sh), max(1, width // sw))
    return math.prod(-(-n // p) for n, p in zip(lat, (pt, ph, pw)))


def estimate_activation_bytes(dims: ModelDims, width: int, height: int, frames: int, *,
                              batch: int = DEFAULT_BATCH, dtype_bytes: int = 2) -> int:
    """Rough peak activation memory of one WAN forward in ComfyUI, in bytes.

    An estimate counted from the model code, NOT yet measured on a GPU. The peak sits inside one
    block (blocks run one after another and free their temporaries), at the larger of the
    self-attention peak (:data:`ATTN_LIVE_HIDDEN` dim-wide copies) and the FFN peak
    (:data:`FFN_LIVE_HIDDEN` dim-wide + :data:`FFN_LIVE_INTERMEDIATE` ffn-wide copies), per token and
    batch item. Attention is taken as memory-efficient (flash/xformers/SageAttention: no
    tokens x tokens matrix). Added: VACE's extra streams, the fp32 RoPE table, the text context with
    its cross-attention k/v, then the whole is scaled by :data:`ACTIVATION_SAFETY` and
    :data:`ACTIVATION_FIXED_BYTES` is added.

    For comparison, ComfyUI's own ``memory_required`` for WAN (:func:`comfyui_memory_required`)
    counts about 19 dim-wide copies per token and ignores ffn_dim: for the 14B at 832x480x81,
    batch 1, bf16 it gives 5.90 GiB where this gives 4.07 GiB; for the 1.3B, 1.77 against 2.22 GiB.
    """
    tokens = latent_tokens(dims, width, height, frames)
    per_token = max(ATTN_LIVE_HIDDEN * dims.dim,
                    FFN_LIVE_HIDDEN * dims.dim + FFN_LIVE_INTERMEDIATE * dims.ffn_dim)
    if dims.num_vace_blocks:
        per_token += VACE_LIVE_HIDDEN * dims.dim
    hidden = batch * tokens * per_token * dtype_bytes
    rope = tokens * dims.head_dim * 2 * 4  # fp32 [tokens, head_dim/2, 2, 2], shared by the batch
    ctx_len = dims.text_len + (CLIP_TOKENS if dims.img_cross_attn else 0)
    context = CONTEXT_LIVE_COPIES * batch * ctx_len * dims.dim * dtype_bytes
    return int(ACTIVATION_SAFETY * (hidden + rope + context)) + ACTIVATION_FIXED_BYTES


def comfyui_memory_required(dims: ModelDims, width: int, height: int, frames: int, *,
                            batch: int = 1, dtype_bytes: int = 2) -> int:
    """ComfyUI 0.28's ``BaseModel.memory_required`` for WAN with memory-efficient attention:
    latent voxels x dtype size x 0.01 MiB x ``memory_usage_factor`` (dim / 2222, x1.2 for VACE).

    ComfyUI keeps this (plus ``minimum_inference_memory``, 0.8 GiB + 0.4-0.7 GiB) free when it loads
    a model and offloads, per layer, whatever weights do not fit beside it; an integration that lets
    ComfyUI's loader decide can take the larger of this and :func:`estimate_activation_bytes`.
    """
    st, sh, sw = dims.vae_stride
    voxels = batch * ((frames - 1) // st + 1) * max(1, height // sh) * max(1, width // sw)
    factor = dims.dim / 2222 * (1.2 if dims.num_vace_blocks else 1.0)
    return int(voxels * dtype_bytes * 0.01 * factor * MiB)


def _small_bytes(bytes_per_param: float) -> float:
    # Biases, norms and modulations are kept in at least 16 bits by fp8 and GGUF files (GGUF: F32).
    return max(bytes_per_param, 2.0)


def block_bytes_estimate(dims: ModelDims, bytes_per_param: float) -> int:
    """Stored bytes of one main block when the real sizes cannot be measured.

    Self- and cross-attention q/k/v/o (8 dim^2, +2 dim^2 for CLIP k_img/v_img) and the FFN
    (2 dim x ffn_dim) at ``bytes_per_param``; biases, q/k norms, norm3 and the 6-way modulation at
    :func:`_small_bytes`. 14B: 0.70 GB in bf16, 0.35 GB in fp8, 0.20 GB in Q4_K.
    """
    d, f = dims.dim, dims.ffn_dim
    img = 1 if dims.img_cross_attn else 0
    matrices = (8 + 2 * img) * d * d + 2 * d * f
    # biases: 8 attention + ffn (f + d) + 2 img; norms: 4 q/k (+1 k_img) + norm3 2; modulation 6
    small = 8 * d + f + d + 4 * d + 2 * d + 6 * d + img * 3 * d
    return int(math.ceil(matrices * bytes_per_param + small * _small_bytes(bytes_per_param)))


def other_bytes_estimate(dims: ModelDims, bytes_per_param: float) -> int:
    """Stored bytes of everything but the main blocks (never streamed by the auto mode): patch
    embeddings (fp32 in ComfyUI), text/time embeddings, time projection, head, CLIP projector and
    the VACE blocks."""
    d, pp = dims.dim, math.prod(dims.patch_size)
    mats = (dims.text_dim * d + d * d          # text_embedding
            + dims.freq_dim * d + d * d        # time_embedding
            + d * 6 * d                        # time_projection
            + d * dims.out_dim * pp)           # head.head
    small = 2 * d + 2 * d + 6 * d + dims.out_dim * pp + 2 * d  # biases, head.modulation
    conv = dims.in_dim * pp * d + d            # patch_embedding, fp32
    if dims.img_cross_attn:  # img_emb.proj: LayerNorm, Linear, GELU, Linear, LayerNorm
        mats += CLIP_DIM * CLIP_DIM + CLIP_DIM * d
        small += 2 * CLIP_DIM + CLIP_DIM + d + 2 * d
    total = mats * bytes_per_param + small * _small_bytes(bytes_per_param) + conv * 4
    if dims.num_vace_blocks:  # VACE blocks: a t2v block + after_proj; the first also before_proj
        vace = ModelDims(d, dims.ffn_dim, dims.num_heads, 0, 0, 0)
        per = block_bytes_estimate(vace, bytes_per_param) + d * d * bytes_per_param + d * _small_bytes(bytes_per_param)
        total += dims.num_vace_blocks * per + d * d * bytes_per_param + d * _small_bytes(bytes_per_param)
        total += (VACE_IN_DIM * pp * d + d) * 4  # vace_patch_embedding, fp32
    return int(math.ceil(total))


@dataclass(frozen=True)
class AutoChoice:
    """What :func:`plan_auto_blocks` decided and why."""

    blocks_to_swap: int
    fits: bool
    num_blocks: int
    resident_bytes: int  # weights kept on the device: other weights + resident blocks
    ring_bytes: int  # device slots for streamed blocks (0 when nothing streams)
    activation_bytes: int
    reserve_bytes: int
    budget_bytes: int
    explanation: str  # one line for the log and the node's text

    @property
    def required_bytes(self) -> int:
        return self.resident_bytes + self.ring_bytes + self.activation_bytes + self.reserve_bytes


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def plan_auto_blocks(*, block_bytes: Sequence[int], resident_other_bytes: int, budget_bytes: int,
                     activation_bytes: int, prefetch_blocks: int = 1,
                     reserve_bytes: int = DEFAULT_RESERVE, label: str = "auto") -> AutoChoice:
    """The smallest number of streamed blocks (the last N) for which other weights + resident
    blocks + ring + activations + reserve fit ``budget_bytes``.

    The ring is :func:`config.ring_size` slots (prefetch + 1, at least 2, at most N) of the largest
    streamed block, as the engine allocates it; nothing streamed needs no ring. The smallest fitting
    N is taken (fewest copies), which also makes the choice monotone: a larger budget never swaps
    more. When nothing fits, all blocks are swapped and ``fits`` is False; the explanation says what
    to change. ``label`` starts the explanation (e.g. the node's choice).
    """
    sizes = [int(b) for b in block_bytes]
    n = len(sizes)
    if n == 0 or min(sizes) < 0:
        raise BlockSwapError(f"block_bytes must list one size >= 0 per block, got {list(block_bytes)!r}")
    for name, v in (("resident_other_bytes", resident_other_bytes), ("budget_bytes", budget_bytes),
                    ("activation_bytes", activation_bytes), ("reserve_bytes", reserve_bytes),
                    ("prefetch_blocks", prefetch_blocks)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise BlockSwapError(f"{name}={v!r} must be an integer >= 0")

    def parts(k: int) -> Tuple[int, int, int]:
        slots = ring_size(prefetch_blocks, k)
        slot = max(sizes[n - k:], default=0)
        return sum(sizes[:n - k]), slots, slots * slot

    fixed = resident_other_bytes + activation_bytes + reserve_bytes
    for k in range(n + 1):  # ends at k = n, all swapped, when nothing fits
        blocks, slots, ring = parts(k)
        if fixed + blocks + ring <= budget_bytes:
            break
    fits = fixed + blocks + ring <= budget_bytes

    ring_txt = f"{slots} x {_gib(ring // slots)} ring" if slots else "no ring"
    costs = (f"{_gib(resident_other_bytes)} other weights, {ring_txt}, {_gib(activation_bytes)} "
             f"activations, {_gib(reserve_bytes)} reserve")
    if not fits:
        text = (f"{label}: {_gib(budget_bytes)} budget is too small even with all {n} blocks swapped "
                f"(needs {_gib(fixed + ring)}: {costs}); lower the resolution or frame count, use a "
                f"smaller quantization (fp8, GGUF Q8..Q4) or a GPU with more free VRAM; swapping all {n}")
    else:
        room = budget_bytes - fixed - ring
        swapping = f"swapping the last {k}" if k else "swapping none"
        text = (f"{label}: {_gib(budget_bytes)} budget - {costs} leaves {_gib(room)}: "
                f"{n - k} of {n} blocks stay resident ({_gib(blocks)}), {swapping}")
    return AutoChoice(blocks_to_swap=k, fits=fits, num_blocks=n, resident_bytes=resident_other_bytes + blocks,
                      ring_bytes=ring, activation_bytes=activation_bytes, reserve_bytes=reserve_bytes,
                      budget_bytes=budget_bytes, explanation=text)


@dataclass(frozen=True)
class Preset:
    """A card size and the video it must run."""

    vram_gb: int
    width: int
    height: int
    frames: int = 81

    @property
    def budget_bytes(self) -> int:
        return self.vram_gb * GiB - PRESET_UNUSABLE_BYTES


_RESOLUTIONS = {"480p": (832, 480), "720p": (1280, 720)}
PRESETS: Dict[str, Preset] = {f"{gb} GB / {res}": Preset(gb, *_RESOLUTIONS[res])
                              for gb in (8, 12, 16, 24) for res in ("480p", "720p")}
AUTO_480P = "auto (free VRAM, 480p)"
AUTO_720P = "auto (free VRAM, 720p)"
# adaptive: starts where auto (480p) would, then follows each forward's measured peak (recovery.AdaptiveCount)
ADAPTIVE = "adaptive"
_AUTO = {AUTO_480P: _RESOLUTIONS["480p"], AUTO_720P: _RESOLUTIONS["720p"], ADAPTIVE: _RESOLUTIONS["480p"]}
AUTO_CHOICES: Tuple[str, ...] = ("off", AUTO_480P, AUTO_720P, *PRESETS, ADAPTIVE)


class Budget(NamedTuple):
    budget_bytes: int
    width: int
    height: int
    frames: int


def resolve_budget(choice: str, free_device_bytes: Optional[int]) -> Optional[Budget]:
    """The budget and video size a node choice stands for; None for "off".

    The auto choices need ``free_device_bytes`` (free memory of the compute device with this model
    not loaded); without it (no CUDA device) they raise a ValueError saying what to pick instead.
    """
    if choice == "off":
        return None
    if choice in _AUTO:
        if free_device_bytes is None:
            raise ValueError(f"{choice!r} needs the free memory of a CUDA device and none was found; "
                             "pick a card preset such as '12 GB / 480p' or set blocks_to_swap by hand")
        if isinstance(free_device_bytes, bool) or not isinstance(free_device_bytes, int) or free_device_bytes < 0:
            raise ValueError(f"free_device_bytes={free_device_bytes!r} must be an integer >= 0")
        return Budget(free_device_bytes, *_AUTO[choice], 81)
    preset = PRESETS.get(choice)
    if preset is None:
        raise ValueError(f"unknown budget choice {choice!r}; valid: {', '.join(AUTO_CHOICES)}")
    return Budget(preset.budget_bytes, preset.width, preset.height, preset.frames)


def auto_blocks_for(diffusion_model: nn.Module, choice: str, free_device_bytes: Optional[int], *,
                    prefetch_blocks: int = 1, batch: int = DEFAULT_BATCH,
                    dtype_bytes: int = 2) -> Optional[AutoChoice]:
    """Plan for a loaded model: measured block sizes (their packed slot size) and other weights,
    the activation estimate for the choice's video size. None for "off". Logs the explanation."""
    budget = resolve_budget(choice, free_device_bytes)
    if budget is None:
        return None
    m = unwrap(diffusion_model)
    dims = ModelDims.from_module(m)
    sizes = [packed_bytes(unwrap(b)) for b in m.blocks]  # the engine's slot size per block
    other = sum(tensor_bytes(p) for name, p in m.named_parameters() if not name.startswith("blocks."))
    act = estimate_activation_bytes(dims, budget.width, budget.height, budget.frames,
                                    batch=batch, dtype_bytes=dtype_bytes)
    result = plan_auto_blocks(block_bytes=sizes, resident_other_bytes=other, budget_bytes=budget.budget_bytes,
                              activation_bytes=act, prefetch_blocks=prefetch_blocks,
                              label=f"{choice} ({budget.width}x{budget.height}x{budget.frames})")
    log.info(result.explanation)
    return result
