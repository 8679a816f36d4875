"""Expectations for the planner and preflight tests, computed here from tensor shapes and the documented
rules, never with the pack's own helpers (``packed_bytes``, ``ring_size``, ``estimate_activation_bytes``,
``full_model_size``), so that a bug in one of those cannot cancel out of a test that would use it on
both sides. Only the planner's named constants are read from the pack."""
import torch

ALIGN = 256  # a host master / device slot lays each plain tensor out at 256-byte steps (host_masters doc)


def _leaves(p):
    """The plain tensors holding a parameter's bytes: a wrapper's (QuantizedTensor) inner tensors."""
    if hasattr(type(p), "__tensor_flatten__"):
        return [getattr(p, name) for name in p.__tensor_flatten__()[0]]
    return [p]


def stored_bytes(module) -> int:
    """Bytes of ``module``'s host copy (one slot): each plain tensor's bytes, rounded up to ALIGN."""
    return sum(-(-torch.Tensor.numel(t) * torch.Tensor.element_size(t) // ALIGN) * ALIGN
               for p in module.parameters() for t in _leaves(p))


def ring_slots(prefetch: int, streamed: int) -> int:
    """Device slots for ``streamed`` units: prefetch + 1, at least 2, never more than the units."""
    if streamed == 0:
        return 0
    return min(streamed, max(2, prefetch + 1))


def wan_activation_bytes(*, dim: int, ffn_dim: int, num_heads: int, tokens: int, text_len: int = 512,
                         dtype_bytes: int = 2) -> int:
    """The activation estimate of a WAN t2v forward as budget.estimate_activation_bytes documents it,
    batch 1, from its named constants (which calibration may change): the larger of the self-attention
    and the FFN peak per token, the fp32 RoPE table, the text context with its cross-attention k/v,
    times the safety factor, plus the fixed part."""
    from wan22_blockswap import budget as B

    per_token = max(B.ATTN_LIVE_HIDDEN * dim, B.FFN_LIVE_HIDDEN * dim + B.FFN_LIVE_INTERMEDIATE * ffn_dim)
    hidden = tokens * per_token * dtype_bytes
    rope = tokens * (dim // num_heads) * 2 * 4  # [tokens, head_dim / 2, 2, 2] fp32
    context = B.CONTEXT_LIVE_COPIES * text_len * dim * dtype_bytes
    return int(B.ACTIVATION_SAFETY * (hidden + rope + context)) + B.ACTIVATION_FIXED_BYTES
