"""comfy.float.stochastic_rounding: exact for fp32/fp16/bf16; seeded stochastic rounding for fp8."""
import torch

_FP8 = {torch.float8_e4m3fn: (3, -6), torch.float8_e5m2: (2, -14)}  # mantissa bits, min normal exponent


def stochastic_rounding(value, dtype, seed=0):
    if dtype in (torch.float32, torch.float16, torch.bfloat16):
        return value.to(dtype=dtype)
    if dtype in _FP8:
        # Simplified (ComfyUI uses comfy_kitchen or a mantissa-level routine): add uniform noise of
        # one fp8 ulp, then round to nearest. Deterministic for a given seed and device.
        mbits, min_exp = _FP8[dtype]
        gen = torch.Generator(device=value.device).manual_seed(seed)
        v = value.float()
        ulp = torch.pow(2.0, torch.floor(torch.log2(v.abs().clamp_min(2.0 ** min_exp))) - mbits)
        v = v + (torch.rand(v.shape, generator=gen, device=v.device) - 0.5) * ulp
        info = torch.finfo(dtype)
        return v.clamp(info.min, info.max).to(dtype)
    return value.to(dtype=dtype)
