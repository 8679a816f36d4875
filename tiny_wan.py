"""Tiny, pure-torch stand-in for ComfyUI's WAN 2.1 / 2.2 diffusion transformer.

Re-implements the *layout* of ``comfy/ldm/wan/model.py`` (ComfyUI v0.28, ``WanModel`` and
``VaceWanModel``) without importing ComfyUI or diffusers. It mirrors ComfyUI's module tree and
parameter names, so state dicts with ComfyUI keys (``blocks.3.self_attn.norm_q.weight``,
``head.modulation``, ``img_emb.proj.1.weight``, ``vace_blocks.0.before_proj.weight`` ...) load
with ``strict=True``; and it mirrors the forward's call structure: each main block runs through
``nn.Module.__call__`` (so a block-swap engine's module hooks fire) or through a
``transformer_options["patches_replace"]["dit"][("double_block", i)]`` patch, as in ComfyUI.
Used by demos, benchmarks and tests: ``tiny_config`` (CPU-sized), ``wan14b_config`` (real 14B
dims), ``make_inputs`` (matching forward kwargs).
"""
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["WanConfig", "WanModel", "WanAttentionBlock", "VaceWanAttentionBlock", "Head", "MLPProj",
           "tiny_config", "wan14b_config", "make_inputs", "vace_layer_indices"]

# (in_dim, out_dim) per variant; WAN 2.2 5B (ti2v22) is structurally a t2v model with 48 channels.
_VARIANT_CHANNELS = {"t2v": (16, 16), "i2v": (36, 16), "ti2v22": (48, 48), "vace": (16, 16)}
CLIP_TOKENS = 257  # CLIP-vision tokens fed to img_emb by ComfyUI for WAN 2.1 i2v


@dataclass
class WanConfig:
    """Hyper-parameters of a WAN transformer (names follow ComfyUI's WanModel arguments).

    ``vace_layers`` holds the main-block indices followed by a VACE block; ComfyUI stores only
    their count and spaces them as :func:`vace_layer_indices` does.
    """
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int
    out_dim: int
    text_dim: int
    freq_dim: int = 256
    patch_size: Tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    model_type: str = "t2v"
    vace_layers: Tuple[int, ...] = ()
    vace_in_dim: int = 96
    image_dim: int = 1280

    def __post_init__(self):
        self.patch_size = tuple(int(p) for p in self.patch_size)
        self.vace_layers = tuple(int(i) for i in self.vace_layers)
        if self.model_type not in _VARIANT_CHANNELS:
            raise ValueError(f"model_type must be one of {sorted(_VARIANT_CHANNELS)}, got {self.model_type!r}")
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise ValueError("dim must split into num_heads heads of even size (needed by RoPE)")
        idx = self.vace_layers
        if self.model_type == "vace" and (not idx or len(set(idx)) != len(idx)
                                          or not all(0 <= i < self.num_layers for i in idx)):
            raise ValueError("a vace model needs distinct vace_layers that are main-block indices")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


def vace_layer_indices(num_layers: int, count: int) -> Tuple[int, ...]:
    """Main-block indices ComfyUI attaches ``count`` VACE blocks to."""
    return tuple(range(0, num_layers, max(1, num_layers // count)))[:count]


def tiny_config(variant: str = "t2v", **overrides) -> WanConfig:
    """CPU-sized config: dim 128, ffn 256, 2 heads (head_dim 64), 8 layers, text_dim 64."""
    if variant not in _VARIANT_CHANNELS:
        raise ValueError(f"unknown variant {variant!r}")
    in_dim, out_dim = _VARIANT_CHANNELS[variant]
    cfg = dict(dim=128, ffn_dim=256, num_heads=2, num_layers=8, in_dim=in_dim, out_dim=out_dim,
               text_dim=64, model_type=variant)
    cfg.update(overrides)
    if variant == "vace" and "vace_layers" not in overrides:
        cfg["vace_layers"] = vace_layer_indices(cfg["num_layers"], 2)
    return WanConfig(**cfg)


def wan14b_config(num_layers: int = 40, variant: str = "t2v") -> WanConfig:
    """Real WAN 2.1 / 2.2 A14B dimensions (optionally fewer layers) for GPU benchmarks."""
    if variant not in ("t2v", "i2v", "vace"):
        raise ValueError("the 14B family exists as t2v, i2v and vace")
    in_dim, out_dim = _VARIANT_CHANNELS[variant]
    return WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=num_layers, in_dim=in_dim,
                     out_dim=out_dim, text_dim=4096, model_type=variant,
                     vace_layers=vace_layer_indices(num_layers, 8) if variant == "vace" else ())


def sinusoidal_embedding_1d(dim: int, position: torch.Tensor) -> torch.Tensor:
    """[N] positions -> [N, dim] fp32 embedding laid out as [cos | sin] (WAN convention)."""
    half = dim // 2
    position = position.to(torch.float32)
    inv = torch.pow(10000.0, -torch.arange(half, device=position.device, dtype=torch.float32) / half)
    angles = torch.outer(position, inv)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def rope_freqs(grid: Sequence[int], head_dim: int, theta: float = 10000.0, device=None) -> torch.Tensor:
    """3D RoPE rotation matrices over the (t, h, w) patch grid, fp32 [1, L, 1, head_dim // 2, 2, 2].

    Head dim split as in ComfyUI (``d - 4*(d//6)`` channels for t, ``2*(d//6)`` each for h and w),
    adjacent channel pairs; computed in float64 on the CPU so it does not depend on the device.
    """
    axes = (head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6))
    coords = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in grid], indexing="ij")
    angles = []
    for pos, axis_dim in zip(coords, axes):
        omega = theta ** -(torch.arange(0, axis_dim, 2, dtype=torch.float64) / axis_dim)
        angles.append(pos.reshape(-1, 1) * omega)
    ang = torch.cat(angles, dim=1)
    cos, sin = torch.cos(ang), torch.sin(ang)
    rot = torch.stack([cos, -sin, sin, cos], dim=-1).reshape(1, -1, 1, head_dim // 2, 2, 2)
    return rot.to(device=device, dtype=torch.float32)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of ``x`` [B, L, H, D] by ``freqs`` (in fp32)."""
    xf = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    out = freqs[..., 0] * xf[..., 0] + freqs[..., 1] * xf[..., 1]
    return out.reshape(x.shape).to(x.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head SDPA on [B, L, C] tensors (ComfyUI's ``optimized_attention`` contract)."""
    b, lq, c = q.shape
    q, k, v = (t.reshape(b, t.shape[1], heads, c // heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, lq, c)


def _pad_to_patch(x: torch.Tensor, patch: Sequence[int]) -> torch.Tensor:
    """Circularly pad the last three dims up to a multiple of the patch size (as ComfyUI)."""
    pad = []
    for size, p in zip(reversed(x.shape[2:]), reversed(patch)):
        pad += [0, (-size) % p]
    return F.pad(x, pad, mode="circular") if any(pad) else x


class WanSelfAttention(nn.Module):
    """q/k/v/o Linears with RMSNorm over the full dim on q and k (``norm_q``/``norm_k``), then RoPE."""

    def __init__(self, dim, num_heads, eps=1e-6, device=None, dtype=None):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.q, self.k = nn.Linear(dim, dim, **fk), nn.Linear(dim, dim, **fk)
        self.v, self.o = nn.Linear(dim, dim, **fk), nn.Linear(dim, dim, **fk)
        self.norm_q = nn.RMSNorm(dim, eps=eps, elementwise_affine=True, **fk)
        self.norm_k = nn.RMSNorm(dim, eps=eps, elementwise_affine=True, **fk)

    def forward(self, x, freqs):
        b, s, _ = x.shape
        q = apply_rope(self.norm_q(self.q(x)).view(b, s, self.num_heads, self.head_dim), freqs)
        k = apply_rope(self.norm_k(self.k(x)).view(b, s, self.num_heads, self.head_dim), freqs)
        return self.o(attention(q.view(b, s, -1), k.view(b, s, -1), self.v(x), self.num_heads))


class WanT2VCrossAttention(WanSelfAttention):
    """Cross-attention to the (embedded) text context; same parameters as self-attention."""

    def forward(self, x, context, context_img_len=None):
        q = self.norm_q(self.q(x))
        return self.o(attention(q, self.norm_k(self.k(context)), self.v(context), self.num_heads))


class WanI2VCrossAttention(WanSelfAttention):
    """Adds ``k_img``/``v_img``/``norm_k_img`` for the CLIP image tokens prepended to the context."""

    def __init__(self, dim, num_heads, eps=1e-6, device=None, dtype=None):
        super().__init__(dim, num_heads, eps, device=device, dtype=dtype)
        self.k_img = nn.Linear(dim, dim, device=device, dtype=dtype)
        self.v_img = nn.Linear(dim, dim, device=device, dtype=dtype)
        self.norm_k_img = nn.RMSNorm(dim, eps=eps, elementwise_affine=True, device=device, dtype=dtype)

    def forward(self, x, context, context_img_len=None):
        img, txt = context[:, :context_img_len], context[:, context_img_len:]
        q = self.norm_q(self.q(x))
        out = attention(q, self.norm_k(self.k(txt)), self.v(txt), self.num_heads)
        out = out + attention(q, self.norm_k_img(self.k_img(img)), self.v_img(img), self.num_heads)
        return self.o(out)


class WanAttentionBlock(nn.Module):
    """DiT block: adaLN self-attn, affine ``norm3`` + cross-attn, adaLN ffn.

    ``modulation`` [1, 6, dim] + the time projection ``e`` gives shift/scale/gate for attn and ffn.
    """

    def __init__(self, cross_attn_type, dim, ffn_dim, num_heads, eps=1e-6, device=None, dtype=None):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        cross_cls = WanI2VCrossAttention if cross_attn_type == "i2v_cross_attn" else WanT2VCrossAttention
        self.dim = dim
        self.norm1 = nn.LayerNorm(dim, eps, elementwise_affine=False, **fk)
        self.self_attn = WanSelfAttention(dim, num_heads, eps, **fk)
        self.norm3 = nn.LayerNorm(dim, eps, elementwise_affine=True, **fk)
        self.cross_attn = cross_cls(dim, num_heads, eps, **fk)
        self.norm2 = nn.LayerNorm(dim, eps, elementwise_affine=False, **fk)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim, **fk), nn.GELU(approximate="tanh"),
                                 nn.Linear(ffn_dim, dim, **fk))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim, **fk) / dim ** 0.5)

    def forward(self, x, e, freqs, context, context_img_len=257, transformer_options=None):
        """x [B, L, dim]; e [B, 1|L, 6, dim] (or [B, 6, dim]); returns a new tensor."""
        mod = self.modulation.to(dtype=x.dtype, device=x.device)
        chunks = (mod.unsqueeze(0) + e).unbind(2) if e.ndim == 4 else (mod + e).chunk(6, dim=1)
        shift1, scale1, gate1, shift2, scale2, gate2 = chunks
        x = x + self.self_attn(self.norm1(x) * (1 + scale1) + shift1, freqs) * gate1
        x = x + self.cross_attn(self.norm3(x), context, context_img_len=context_img_len)
        return x + self.ffn(self.norm2(x) * (1 + scale2) + shift2) * gate2


class VaceWanAttentionBlock(WanAttentionBlock):
    """VACE control block: a t2v block plus ``before_proj`` (first block only) and ``after_proj``."""

    def __init__(self, dim, ffn_dim, num_heads, eps=1e-6, block_id=0, device=None, dtype=None):
        super().__init__("t2v_cross_attn", dim, ffn_dim, num_heads, eps, device=device, dtype=dtype)
        self.block_id = block_id
        if block_id == 0:
            self.before_proj = nn.Linear(dim, dim, device=device, dtype=dtype)
        self.after_proj = nn.Linear(dim, dim, device=device, dtype=dtype)

    def forward(self, c, x, **kwargs):
        """Returns ``(c_skip, c)``: the hint added to the main stream and the updated control stream."""
        if self.block_id == 0:
            c = self.before_proj(c) + x
        c = super().forward(c, **kwargs)
        return self.after_proj(c), c


class Head(nn.Module):
    """Output head: non-affine ``norm``, ``head`` Linear to out_dim * prod(patch), 2-way ``modulation``."""

    def __init__(self, dim, out_dim, patch_size, eps=1e-6, device=None, dtype=None):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps, elementwise_affine=False, device=device, dtype=dtype)
        self.head = nn.Linear(dim, out_dim * math.prod(patch_size), device=device, dtype=dtype)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim, device=device, dtype=dtype) / dim ** 0.5)

    def forward(self, x, e):
        shift, scale = (self.modulation.to(dtype=x.dtype, device=x.device).unsqueeze(0) + e.unsqueeze(2)).unbind(2)
        return self.head(self.norm(x) * (1 + scale) + shift)


class MLPProj(nn.Module):
    """CLIP-vision projector for i2v: ``proj`` = LayerNorm, Linear, GELU, Linear, LayerNorm."""

    def __init__(self, in_dim, out_dim, device=None, dtype=None):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.proj = nn.Sequential(nn.LayerNorm(in_dim, **fk), nn.Linear(in_dim, in_dim, **fk), nn.GELU(),
                                  nn.Linear(in_dim, out_dim, **fk), nn.LayerNorm(out_dim, **fk))

    def forward(self, image_embeds):
        return self.proj(image_embeds)


class WanModel(nn.Module):
    """WAN 2.1 / 2.2 backbone (t2v, i2v, ti2v22) and the VACE variant in one class.

    Mirrors ComfyUI's parameter names so state dicts load. Differences outside the state dict:
    no ``rope_embedder`` (RoPE has no parameters); ``vace_blocks``/``vace_patch_embedding`` are
    ``None`` and ``vace_layers_mapping`` empty for non-VACE variants; no ``attn1_patch``/
    ``attn2_patch`` support. As in ComfyUI the patch embeddings are created in fp32.
    """

    def __init__(self, config: WanConfig, device=None, dtype=None):
        super().__init__()
        c, fk = config, {"device": device, "dtype": dtype}
        self.config = c
        self.model_type, self.patch_size = c.model_type, c.patch_size
        self.dim, self.num_heads, self.out_dim, self.freq_dim = c.dim, c.num_heads, c.out_dim, c.freq_dim
        self.patch_embedding = nn.Conv3d(c.in_dim, c.dim, c.patch_size, stride=c.patch_size,
                                         device=device, dtype=torch.float32)
        self.text_embedding = nn.Sequential(nn.Linear(c.text_dim, c.dim, **fk), nn.GELU(approximate="tanh"),
                                            nn.Linear(c.dim, c.dim, **fk))
        self.time_embedding = nn.Sequential(nn.Linear(c.freq_dim, c.dim, **fk), nn.SiLU(),
                                            nn.Linear(c.dim, c.dim, **fk))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(c.dim, c.dim * 6, **fk))
        cross = "i2v_cross_attn" if c.model_type == "i2v" else "t2v_cross_attn"
        self.blocks = nn.ModuleList(WanAttentionBlock(cross, c.dim, c.ffn_dim, c.num_heads, c.eps, **fk)
                                    for _ in range(c.num_layers))
        self.head = Head(c.dim, c.out_dim, c.patch_size, c.eps, **fk)
        self.img_emb = MLPProj(c.image_dim, c.dim, **fk) if c.model_type == "i2v" else None
        self.vace_blocks, self.vace_patch_embedding, self.vace_layers_mapping = None, None, {}
        if c.model_type == "vace":
            self.vace_blocks = nn.ModuleList(
                VaceWanAttentionBlock(c.dim, c.ffn_dim, c.num_heads, c.eps, block_id=j, **fk)
                for j in range(len(c.vace_layers)))
            self.vace_layers_mapping = {i: j for j, i in enumerate(c.vace_layers)}
            self.vace_patch_embedding = nn.Conv3d(c.vace_in_dim, c.dim, c.patch_size, stride=c.patch_size,
                                                  device=device, dtype=torch.float32)

    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float = 0.02, only: Optional[nn.Module] = None) -> "WanModel":
        """Re-initialise deterministically without the global RNG: matrices/kernels ~ N(0, std),
        biases 0, norm weights 1, modulations ~ N(0, 1/dim). Values depend on the device type.
        ``only``: just this submodule (a benchmark builds a 14B model one block at a time)."""
        gens = {}
        for name, p in (only if only is not None else self).named_parameters():
            if p.is_meta:
                continue
            if p.device not in gens:
                gens[p.device] = torch.Generator(device=p.device).manual_seed(seed)
            gen = gens[p.device]
            if name.endswith("modulation"):
                p.normal_(0.0, self.dim ** -0.5, generator=gen)
            elif name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=gen)
        return self

    def _embed(self, conv, video, dtype):
        """Patchify [B, C, T, H, W] with ``conv`` in its own dtype; returns [B, dim, T', H', W'] in ``dtype``."""
        return conv(_pad_to_patch(video, self.patch_size).to(conv.weight.dtype)).to(dtype)

    def unpatchify(self, x, grid):
        """[B, L, out_dim * prod(patch)] -> [B, out_dim, T'*pt, H'*ph, W'*pw]."""
        b, c = x.shape[0], self.out_dim
        u = x[:, :math.prod(grid)].reshape(b, *grid, *self.patch_size, c)
        u = u.permute(0, 7, 1, 4, 2, 5, 3, 6)  # b f h w p q r c -> b c f p h q w r
        return u.reshape(b, c, *(g * p for g, p in zip(grid, self.patch_size)))

    @staticmethod
    def _original_block(block, context_img_len):
        """The ``original_block`` callable handed to a ``("double_block", i)`` replace patch."""
        def run(args):
            return {"img": block(args["img"], context=args["txt"], e=args["vec"], freqs=args["pe"],
                                 context_img_len=context_img_len, transformer_options=args["transformer_options"])}
        return run

    def forward(self, x, timestep, context, clip_fea=None, vace_context=None, vace_strength=1.0,
                transformer_options: Optional[dict] = None):
        """Denoise a video latent x [B, in_dim, T, H, W] -> [B, out_dim, T, H, W] (x's dtype).

        timestep [B] (or [B, L] per token); context [B, text_len, text_dim]; clip_fea [B, 257,
        image_dim] (i2v); vace_context [B, N, vace_in_dim, T, H, W] as ComfyUI stacks it, or a list
        of N [B, vace_in_dim, T, H, W]; vace_strength a float or N floats. Computes in the
        parameters' dtype. transformer_options is shallow-copied, then ``grid_sizes``,
        ``total_blocks``, ``block_type`` and ``block_index`` are set on the copy as in ComfyUI.
        """
        opts = dict(transformer_options or {})
        in_dtype, dtype = x.dtype, self.head.head.weight.dtype  # head: never streamed
        bs, _, t, h, w = x.shape
        x = self._embed(self.patch_embedding, x, dtype)
        grid = tuple(x.shape[2:])
        opts["grid_sizes"] = grid
        x = x.flatten(2).transpose(1, 2)
        freqs = rope_freqs(grid, self.config.head_dim, device=x.device)

        ts = torch.as_tensor(timestep, device=x.device)
        ts = ts.expand(bs) if ts.ndim == 0 else ts
        e = self.time_embedding(sinusoidal_embedding_1d(self.freq_dim, ts.flatten()).to(dtype))
        e = e.reshape(bs, -1, self.dim)                               # [B, 1|L, dim]
        e0 = self.time_projection(e).unflatten(2, (6, self.dim))     # [B, 1|L, 6, dim]

        context = self.text_embedding(context.to(dtype))
        context_img_len = None
        if clip_fea is not None:
            if self.img_emb is not None:
                context = torch.cat([self.img_emb(clip_fea.to(dtype)), context], dim=1)
            context_img_len = clip_fea.shape[-2]

        hints, strengths = [], []
        if self.vace_blocks is not None and vace_context is not None:
            if isinstance(vace_context, torch.Tensor):
                vace_context = list(vace_context.unbind(1)) if vace_context.ndim == 6 else [vace_context]
            c = self._embed(self.vace_patch_embedding, torch.cat(list(vace_context), dim=0), dtype)
            hints = list(c.flatten(2).transpose(1, 2).split(bs, dim=0))
            strengths = ([float(vace_strength)] * len(hints) if isinstance(vace_strength, (int, float))
                         else [float(s) for s in vace_strength])
        x_orig = x

        blocks_replace = opts.get("patches_replace", {}).get("dit", {})
        opts["total_blocks"], opts["block_type"] = len(self.blocks), "double"
        for i, block in enumerate(self.blocks):
            opts["block_index"] = i
            patch = blocks_replace.get(("double_block", i))
            if patch is not None:
                out = patch({"img": x, "txt": context, "vec": e0, "pe": freqs, "transformer_options": opts},
                            {"original_block": self._original_block(block, context_img_len)})
                x = out["img"]
            else:
                x = block(x, e=e0, freqs=freqs, context=context, context_img_len=context_img_len,
                          transformer_options=opts)
            j = self.vace_layers_mapping.get(i)
            if j is not None and hints:
                for k in range(len(hints)):
                    c_skip, hints[k] = self.vace_blocks[j](hints[k], x=x_orig, e=e0, freqs=freqs, context=context,
                                                           context_img_len=context_img_len, transformer_options=opts)
                    x = x + c_skip * strengths[k]

        x = self.unpatchify(self.head(x, e), grid)[:, :, :t, :h, :w]
        return x.to(in_dtype)


def make_inputs(config: WanConfig, batch=1, frames=2, height=8, width=8, text_len=8, seed=0,
                dtype=torch.float32, device="cpu") -> dict:
    """Random forward kwargs (sizes in latent pixels; drawn on the CPU, then moved): x, timestep
    (fp32, [0, 1000)), context, plus clip_fea (i2v, 257 tokens) or vace_context ([B, 1, ...], vace)."""
    for size, p, name in zip((frames, height, width), config.patch_size, ("frames", "height", "width")):
        if size % p:
            raise ValueError(f"{name}={size} is not divisible by patch size {p}")
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    out = {"x": rnd(batch, config.in_dim, frames, height, width),
           "timestep": (torch.rand(batch, generator=g) * 1000.0).to(device),
           "context": rnd(batch, text_len, config.text_dim)}
    if config.model_type == "i2v":
        out["clip_fea"] = rnd(batch, CLIP_TOKENS, config.image_dim)
    if config.model_type == "vace":
        out["vace_context"] = rnd(batch, 1, config.vace_in_dim, frames, height, width)
    return out
