"""gguf_dequant against gguf-py's numpy reference (gguf.quants.dequantize) on the same bytes.

Every comparison with the reference is bit-exact in float32: gguf-py widens the fp16 scales to
float32 and computes every type in float32 with separate multiplies/adds in the same order as
gguf_dequant, so no tolerance is needed anywhere (the F16/BF16 widening is exact too).

Data: types that gguf-py can quantize (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) are quantized
from random float32 data; every block type (legacy and K-quants, which gguf-py cannot quantize) is
also tested on random block bytes whose fp16 scale/min fields are overwritten with finite fp16
values (random bytes there could be NaN/Inf). fp16 field offsets used, in bytes within a block:
Q8_0 d[0:2]; Q4_0 d[0:2]; Q4_1 d[0:2] m[2:4]; Q5_0 d[0:2]; Q5_1 d[0:2] m[2:4];
Q2_K (84 B) d[80:82] dmin[82:84]; Q3_K (110 B) d[108:110]; Q4_K (144 B) d[0:2] dmin[2:4];
Q5_K (176 B) d[0:2] dmin[2:4]; Q6_K (210 B) d[208:210]. All other bytes (codes, packed 4/6/8-bit
scales, Q6_K's int8 scales) may take any value, so random bytes cover every code.
"""
import numpy as np
import pytest
import torch

from wan22_blockswap.formats import gguf_dequant
from wan22_blockswap.formats.gguf_dequant import (SUPPORTED, GGUFFormatError, block_size, check_raw, dequantize,
                                          raw_nbytes)

try:  # the reference (gguf-py); only the comparisons with it need it
    import gguf
    from gguf import quants
except ImportError:  # pragma: no cover
    gguf = quants = None
needs_gguf = pytest.mark.skipif(gguf is None, reason="needs gguf-py (pip install gguf), the reference")

FP16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2),
               "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
QUANTIZABLE = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
# 2-D with several rows, 1-D, and 3-D; widths are multiples of 256 so that every type fits
SHAPES = [(6, 512), (768,), (2, 3, 256)]


class QuantType:
    """Stands in for a gguf.GGMLQuantizationType member (only ``.name`` is read)."""

    def __init__(self, name):
        self.name = name


def gtype(name):
    return gguf.GGMLQuantizationType[name]


def random_blocks(name, n_blocks, seed):
    """Random block bytes with sane fp16 scale/min fields (offsets in FP16_FIELDS)."""
    rng = np.random.default_rng(seed)
    per_block, nbytes = block_size(name)
    blocks = rng.integers(0, 256, size=(n_blocks, nbytes), dtype=np.uint8)
    for off in FP16_FIELDS[name]:
        # magnitudes from tiny (some fp16 subnormals) to large, both signs
        vals = (rng.standard_normal(n_blocks) * 10.0 ** rng.uniform(-7, 1, n_blocks)).astype(np.float16)
        blocks[:, off:off + 2] = vals.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(-1)


def random_raw(name, shape, seed):
    """Bytes of a random tensor of any supported type, without gguf-py."""
    if name in FP16_FIELDS:
        return random_blocks(name, int(np.prod(shape)) // block_size(name)[0], seed)
    data = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    if name == "F16":
        data = data.astype(np.float16)
    elif name == "BF16":
        data = (data.view(np.uint32) >> 16).astype(np.uint16)
    return np.ascontiguousarray(data).view(np.uint8).reshape(-1)


def quantized_bytes(name, shape, seed):
    rng = np.random.default_rng(seed)
    data = (rng.standard_normal(shape) * rng.uniform(0.01, 3.0)).astype(np.float32)
    q = quants.quantize(data, gtype(name))
    return np.ascontiguousarray(q).view(np.uint8).reshape(-1)


def reference(np_bytes, name, shape):
    per_block, nbytes = block_size(name)
    rows = np_bytes.reshape(-1, shape[-1] // per_block * nbytes)   # byte rows, as gguf-py stores them
    return quants.dequantize(rows, gtype(name)).reshape(shape)


def assert_bit_exact(ours: torch.Tensor, ref: np.ndarray):
    assert ours.dtype == torch.float32
    ref_t = torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32))
    assert ours.shape == ref_t.shape
    assert not torch.isnan(ref_t).any()
    diff = (ours.view(torch.int32) != ref_t.view(torch.int32))
    bad = diff.flatten()
    assert not bad.any(), (f"{int(bad.sum())} of {bad.numel()} values differ; first: ours "
                           f"{ours.flatten()[bad][:4].tolist()} ref {ref_t.flatten()[bad][:4].tolist()}")


@needs_gguf
def test_block_sizes_match_gguf():
    for name in SUPPORTED:
        assert block_size(name) == tuple(gguf.GGML_QUANT_SIZES[gtype(name)]), name


@needs_gguf
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", [n for n in SUPPORTED if n in FP16_FIELDS])
def test_random_blocks_bit_exact(name, shape):
    n_blocks = int(np.prod(shape)) // block_size(name)[0]
    raw = random_blocks(name, n_blocks, seed=SUPPORTED.index(name) * 10 + SHAPES.index(shape))
    ours = dequantize(torch.from_numpy(raw.copy()), name, shape)
    assert_bit_exact(ours, reference(raw, name, shape))


@needs_gguf
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", QUANTIZABLE)
def test_quantized_data_bit_exact(name, shape):
    raw = quantized_bytes(name, shape, seed=len(shape) * 100 + SUPPORTED.index(name))
    assert raw.size == raw_nbytes(name, shape)
    ours = dequantize(torch.from_numpy(raw.copy()), gtype(name), shape)   # enum member accepted
    assert_bit_exact(ours, reference(raw, name, shape))


@pytest.mark.parametrize("name", [n for n in SUPPORTED if n in FP16_FIELDS])
def test_chunked_equals_single_pass(name, monkeypatch):
    """Large tensors are expanded in chunks of blocks; chunk edges (a ragged last one too) change nothing."""
    shape = (6, 512)
    raw = torch.from_numpy(random_raw(name, shape, seed=5))
    whole = dequantize(raw, name, shape)
    monkeypatch.setattr(gguf_dequant, "CPU_CHUNK_ELEMS", 1280)   # 5 K-blocks / 40 legacy blocks a chunk
    assert torch.equal(dequantize(raw, name, shape).view(torch.int32), whole.view(torch.int32))
    assert torch.equal(dequantize(raw, name, shape, dtype=torch.bfloat16), whole.to(torch.bfloat16))


def test_qtype_spellings_and_raw_layouts():
    raw = random_blocks("Q4_K", 4, seed=1)
    t = torch.from_numpy(raw)
    ref = dequantize(t, "Q4_K", (2, 512))
    assert torch.equal(dequantize(t, QuantType("Q4_K"), (2, 512)), ref)    # anything with .name
    assert torch.equal(dequantize(t, "q4_k", torch.Size([2, 512])), ref)
    assert torch.equal(dequantize(t, 12, [2, 512]), ref)                 # GGML type id
    assert torch.equal(dequantize(t.view(2, -1), "Q4_K", (2, 512)), ref)   # raw in any shape
    strided = torch.zeros(t.numel(), 2, dtype=torch.uint8)
    strided[:, 0] = t
    assert torch.equal(dequantize(strided[:, 0], "Q4_K", (2, 512)), ref)   # non-contiguous raw
    misaligned = torch.cat([torch.zeros(1, dtype=torch.uint8), torch.from_numpy(random_raw("F32", (8,), 0))])
    assert torch.equal(dequantize(misaligned[1:], "F32", (8,)), misaligned[1:].clone().view(torch.float32))


def test_result_never_aliases_raw():
    for name in ("F32", "F16", "Q8_0"):
        raw = torch.from_numpy(random_raw(name, (64,), 3))
        out = dequantize(raw, name, (64,))
        before = out.clone()
        raw.zero_()
        assert torch.equal(out, before), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", SUPPORTED)
def test_low_precision_output(name, dtype):
    shape = (3, 256)
    raw = torch.from_numpy(random_raw(name, shape, seed=7))
    out = dequantize(raw, name, shape, dtype=dtype)
    assert out.dtype == dtype and out.shape == shape
    assert torch.equal(out, dequantize(raw, name, shape).to(dtype))   # one rounding of the f32 result


def test_unsupported_type_lists_supported():
    with pytest.raises(GGUFFormatError) as e:
        dequantize(torch.zeros(256, dtype=torch.uint8), "IQ4_XS", (256,))
    msg = str(e.value)
    assert "IQ4_XS" in msg and all(n in msg for n in SUPPORTED)
    with pytest.raises(GGUFFormatError, match="Q6_K"):
        dequantize(torch.zeros(256, dtype=torch.uint8), QuantType("TQ2_0"), (256,))
    with pytest.raises(GGUFFormatError, match="supported"):
        block_size(23)                                                    # an id we do not handle
    assert issubclass(GGUFFormatError, ValueError)


def test_wrong_byte_count_and_shape():
    need = raw_nbytes("Q4_K", (4, 512))
    assert need == 8 * 144
    with pytest.raises(GGUFFormatError, match=rf"needs {need} bytes .* got {need - 1}"):
        dequantize(torch.zeros(need - 1, dtype=torch.uint8), "Q4_K", (4, 512))
    with pytest.raises(GGUFFormatError, match="multiple of the Q8_0 block size"):
        raw_nbytes("Q8_0", (4, 48))
    with pytest.raises(GGUFFormatError, match="uint8"):
        check_raw(torch.zeros(need, dtype=torch.int8), "Q4_K", (4, 512))
    check_raw(torch.zeros(need, dtype=torch.uint8), "Q4_K", (4, 512))
    assert raw_nbytes("F16", (3, 5)) == 30 and raw_nbytes("BF16", (7,)) == 14 and raw_nbytes("F32", ()) == 4


def test_empty_tensor():
    out = dequantize(torch.zeros(0, dtype=torch.uint8), "Q5_K", (0, 256), dtype=torch.bfloat16)
    assert out.shape == (0, 256) and out.dtype == torch.bfloat16


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", SUPPORTED)
def test_cuda_matches_cpu(name):
    shape = (16, 1024)
    raw = torch.from_numpy(random_raw(name, shape, seed=11))
    cpu = dequantize(raw, name, shape)
    gpu = dequantize(raw.cuda(), name, shape)
    assert gpu.device.type == "cuda"
    assert torch.equal(gpu.cpu().view(torch.int32), cpu.view(torch.int32))
    for dtype in (torch.float16, torch.bfloat16):
        assert torch.equal(dequantize(raw.cuda(), name, shape, dtype=dtype).cpu(), cpu.to(dtype))
