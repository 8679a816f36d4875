"""Crafted weight files: each lie in a header is an error naming the file and the field, at once.

GGUF files are built byte by byte here (``gguf_bytes``), so a header can say anything; safetensors
files are a length, a JSON text and data. Every case goes through the pack's two GGUF readers
(``gguf_reader.load_gguf_state_dict``, memory-mapped, and ``weight_files.scan_weights``, the
loaders' scan) or the safetensors scan, with numpy warnings turned into errors and a watchdog, and
must fail in well under a second. The loader-level cases check that nothing reaches ComfyUI.
"""
from __future__ import annotations

import json
import re
import signal
import struct
import time
import warnings

import numpy as np
import pytest
import torch

import comfy.model_management as mm

from wan22_blockswap.config import BlockSwapError
from wan22_blockswap.formats.gguf_dequant import GGUFFormatError
from wan22_blockswap.formats.gguf_header import (MAX_ARRAY_DEPTH, MAX_ARRAY_ELEMENTS, MAX_DIMS, MAX_KV_PAIRS, MAX_TENSORS,
                                         check_gguf_header)
from wan22_blockswap.formats.gguf_reader import load_gguf_state_dict
from wan22_blockswap.model_loader import load_wan_model
from wan22_blockswap.formats.weight_files import WeightFileError, scan_weights

U8, U32, F32_VALUE, STRING, ARRAY = 0, 4, 6, 8, 9
F32, F16, Q8_0 = 0, 1, 8


class _Hang(BaseException):
    pass


def _alarm(signum, frame):
    raise _Hang()


def answered_fast(fn, *args, limit=1.0, **kwargs):
    """``fn``'s exception, after checking it came within ``limit`` seconds, with no warnings (a
    watchdog stops a hang after 10 s)."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, 10)
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # numpy's overflow warnings included
            fn(*args, **kwargs)
    except _Hang:
        pytest.fail(f"{fn.__name__} did not answer within 10 s")
    except Exception as e:  # noqa: BLE001 - returned for the caller's checks
        elapsed = time.perf_counter() - t0
        assert elapsed < limit, f"answered in {elapsed:.3f} s"
        return e
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    pytest.fail(f"{fn.__name__} accepted the file")


# ---------------------------------------------------------------------------------------------
# GGUF bytes

def s(text) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key, vtype, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def info(name, dims, ttype, offset) -> bytes:
    return s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) + \
        struct.pack("<IQ", ttype, offset)


def gguf_bytes(kvs=(), infos=(), data=b"", *, version=3, n_tensors=None, n_kv=None, alignment=32) -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + b"".join(infos)
    return head + b"\0" * (-len(head) % alignment) + data


def nested(levels: int, leaf: bytes = struct.pack("<IQ", U8, 1) + b"\7") -> bytes:
    """An array value ``levels`` arrays deep (each holding one array; the innermost ``leaf``)."""
    return struct.pack("<IQ", ARRAY, 1) * (levels - 1) + leaf


ARCH = kv("general.architecture", STRING, s("wan"))
ONE = info("a.weight", [4], F32, 0)
ONE_DATA = struct.pack("<4f", 1, 2, 3, 4) + b"\0" * 16


def crafted_gguf():
    """(id, file bytes, what the message must say)."""
    big_array = kv("k", ARRAY, struct.pack("<IQ", U8, 2 ** 61))
    yield "array of 2**61 (the issue's 46-byte kind)", gguf_bytes([big_array]), \
        r"key-value pair 1 of 1 \('k'\).*array of 2305843009213693952 UINT8 values needs"
    yield "array of 1e9", gguf_bytes([kv("k", ARRAY, struct.pack("<IQ", U32, 10 ** 9))]), \
        r"array of 1000000000 UINT32 values needs 4000000000 bytes"
    yield "array of 2**31 strings", gguf_bytes([kv("k", ARRAY, struct.pack("<IQ", STRING, 2 ** 31))]), \
        r"array of 2147483648 STRING values"
    yield "tensor count 2**62", gguf_bytes([ARCH], n_tensors=2 ** 62), r"declares 4611686018427387904 tensors"
    yield "key-value count 2**32", gguf_bytes([ARCH], n_kv=2 ** 32), r"4294967296 key-value pairs"
    yield "key length 2**63", gguf_bytes([s(b"")[:0] + struct.pack("<Q", 2 ** 63) + b"x" * 20]), \
        r"key-value pair 1 of 1, key: a string of length 9223372036854775808 needs"
    yield "string value length 2**62", gguf_bytes([kv("general.name", STRING, struct.pack("<Q", 2 ** 62) + b"abc")]), \
        r"'general.name'.*string of length 4611686018427387904"
    yield "tensor name length 2**32", gguf_bytes([ARCH], [struct.pack("<Q", 2 ** 32) + b"abc" * 10]), \
        r"tensor info 1 of 1, name: a string of length 4294967296"
    yield "arrays nested 65 deep", gguf_bytes([kv("k", ARRAY, nested(MAX_ARRAY_DEPTH + 1))]), \
        rf"'k'\): arrays of arrays nested more than {MAX_ARRAY_DEPTH} deep"
    yield "arrays nested 100000 deep", gguf_bytes([kv("k", ARRAY, nested(100_000))]), r"nested more than"
    yield "array of 2**61 arrays", gguf_bytes([kv("k", ARRAY, struct.pack("<IQ", ARRAY, 2 ** 61))]), \
        r"array of 2305843009213693952 ARRAY values needs"
    yield "inner array of 2**61", gguf_bytes([kv("k", ARRAY, struct.pack("<IQ", ARRAY, 1)
                                                  + struct.pack("<IQ", U8, 2 ** 61))]), \
        r"'k'\), array at depth 1: an array of 2305843009213693952 UINT8 values needs"
    yield "arrays of arrays of 8196 elements", gguf_bytes([kv("k", ARRAY, struct.pack("<IQ", ARRAY, 2) + (
        struct.pack("<IQ", U8, 4097) + b"\0" * 4097) * 2)]), r"metadata arrays hold 8196\+ elements"
    yield "unknown value type", gguf_bytes([kv("k", 13, b"\0" * 8)]), r"'k'\): unknown value type 13"
    yield "65 dimensions", gguf_bytes([ARCH], [info("a", [1] * (MAX_DIMS + 1), F32, 0)], ONE_DATA), \
        rf"'a'\): {MAX_DIMS + 1} dimensions; gguf-py reads tensors of at most {MAX_DIMS}"
    yield "2**31 dimensions", gguf_bytes([ARCH], [s("a") + struct.pack("<I", 2 ** 31) + b"\0" * 40]), \
        r"2147483648 dimensions"
    yield "dimensions overflow", gguf_bytes([ARCH], [info("a", [2 ** 32, 2 ** 32], F32, 0)], ONE_DATA), \
        r"dimensions \[4294967296, 4294967296\] describe more bytes"
    yield "zero and huge dimension", gguf_bytes([ARCH], [info("a", [0, 2 ** 62], F32, 0)]), \
        r"dimensions \[0, 4611686018427387904\] describe more bytes"
    yield "unknown ggml type", gguf_bytes([ARCH], [info("a", [4], 4, 0)], ONE_DATA), r"unknown GGML type id 4"
    yield "row not a block multiple", gguf_bytes([ARCH], [info("a", [33], Q8_0, 0)], b"\0" * 64), \
        r"Q8_0 rows of 33 elements are not a multiple of its block size 32"
    yield "offset past the end", gguf_bytes([ARCH], [info("a.weight", [4], F32, 2 ** 62)], ONE_DATA), \
        r"'a.weight', data offset: 4611686018427387904, expected 0"
    yield "data cut short", gguf_bytes([ARCH], [info("a.weight", [64], F32, 0)], ONE_DATA), \
        r"tensor 'a.weight' \(F32 \[64\]\) needs bytes .*but the file has"
    yield "offsets out of order", gguf_bytes([ARCH], [info("a", [8], F32, 32), info("b", [8], F32, 0)], b"\0" * 64), \
        r"'a', data offset: 32, expected 0"
    yield "overlapping tensors", gguf_bytes([ARCH], [info("a", [8], F32, 0), info("b", [8], F32, 0)], b"\0" * 64), \
        r"'b', data offset: 0, expected 32"
    yield "alignment 0", gguf_bytes([kv("general.alignment", U32, struct.pack("<I", 0))]), r"alignment 0 is not a power of two"
    yield "alignment 48", gguf_bytes([kv("general.alignment", U32, struct.pack("<I", 48))]), r"alignment 48"
    yield "alignment as a float", gguf_bytes([kv("general.alignment", F32_VALUE, struct.pack("<f", 32))]), \
        r"general.alignment must be a UINT32"
    yield "duplicate key", gguf_bytes([ARCH, ARCH]), r"key-value pair 2 of 2 \('general.architecture'\): the key appears twice"
    yield "duplicate tensor", gguf_bytes([ARCH], [info("a", [8], F32, 0), info("a", [8], F32, 32)], b"\0" * 64), \
        r"tensor info 2 of 2 \('a'\): two tensors have this name"
    yield "key not UTF-8", gguf_bytes([kv(b"\xff\xfe", U8, b"\0")]), r"key: not valid UTF-8"
    yield "version 1", gguf_bytes([ARCH], version=1), r"version: GGUF version 1; this loader reads versions 2 and 3"
    yield "big-endian", gguf_bytes([ARCH], version=3 << 24), r"opposite byte order"
    yield "too many elements in arrays", gguf_bytes([kv("k", ARRAY, struct.pack("<IQ", U8, MAX_ARRAY_ELEMENTS + 1)
                                                        + b"\0" * (MAX_ARRAY_ELEMENTS + 1))]), \
        rf"array of {MAX_ARRAY_ELEMENTS + 1} elements; this loader reads at most {MAX_ARRAY_ELEMENTS}"
    yield "too many key-value pairs", gguf_bytes([kv(f"k{i}", U8, b"\0") for i in range(MAX_KV_PAIRS + 1)]), \
        rf"{MAX_KV_PAIRS + 1} key-value pairs; this loader reads at most {MAX_KV_PAIRS}"
    yield "a 100000-byte key", gguf_bytes([kv("k" * 100_000, U8, b"\0")]), r"a name of 100000 bytes; this loader reads"
    yield "too many tensors", gguf_bytes([ARCH], [info(f"t{i}", [0], F32, 0) for i in range(MAX_TENSORS + 1)]), \
        rf"{MAX_TENSORS + 1} tensors; this loader reads at most {MAX_TENSORS}"


CRAFTED_GGUF = list(crafted_gguf())


@pytest.mark.parametrize("case,content,message", CRAFTED_GGUF, ids=[c[0] for c in CRAFTED_GGUF])
def test_crafted_gguf_is_an_error_naming_the_file_and_field(tmp_path, case, content, message):
    path = tmp_path / "crafted.gguf"
    path.write_bytes(content)
    for reader in (load_gguf_state_dict, scan_weights):
        err = answered_fast(reader, path)
        assert isinstance(err, (GGUFFormatError, WeightFileError)), repr(err)
        assert str(path) in str(err)
        assert re.search(message, str(err)), str(err)


def test_the_issues_crafted_gguf_through_the_loader(tmp_path):
    """The file from the issue (a key-value array of 2**61 elements): refused by WAN Model Loader's
    code in under a second, with a message naming the file, and nothing registered with ComfyUI."""
    path = tmp_path / "crafted.gguf"
    path.write_bytes(gguf_bytes([kv("k", ARRAY, struct.pack("<IQ", U8, 2 ** 61))]))
    before = len(mm.current_loaded_models)
    err = answered_fast(load_wan_model, path)
    assert isinstance(err, BlockSwapError) and str(path) in str(err) and "array" in str(err)
    assert len(mm.current_loaded_models) == before


def test_a_consistent_header_passes_and_the_layout_is_right(tmp_path):
    path = tmp_path / "ok.gguf"
    path.write_bytes(gguf_bytes([ARCH, kv("general.alignment", U32, struct.pack("<I", 64))],
                                [info("a.weight", [4], F32, 0), info("b.weight", [2], F16, 64)],
                                ONE_DATA + b"\0" * 32 + struct.pack("<2e", 5, 6), alignment=64))
    layout = check_gguf_header(path)
    assert layout.alignment == 64 and layout.data_start % 64 == 0
    assert [(t.name, t.offset - layout.data_start, t.nbytes) for t in layout.tensors] == \
        [("a.weight", 0, 16), ("b.weight", 64, 4)]
    sd, info_ = load_gguf_state_dict(path)
    assert sd["a.weight"].tolist() == [1, 2, 3, 4] and sd["b.weight"].tolist() == [5, 6]


def test_orig_shape_metadata_must_be_dimensions(tmp_path):
    """``comfy.gguf.orig_shape`` reshapes a tensor: negative entries (whose product can still match)
    and absurd dimension counts are refused before torch sees them."""
    for shape in ([-1, -4], [1] * 9):
        arr = struct.pack("<IQ", 5, len(shape)) + b"".join(struct.pack("<i", d) for d in shape)
        path = tmp_path / "orig.gguf"
        path.write_bytes(gguf_bytes([ARCH, kv("comfy.gguf.orig_shape.a.weight", ARRAY, arr)], [ONE], ONE_DATA))
        err = answered_fast(load_gguf_state_dict, path)
        assert str(path) in str(err) and "must list 1 to 8 dimensions >= 0" in str(err)


def test_arrays_of_arrays_are_read_as_gguf_py_reads_them(tmp_path):
    """gguf-py's writer writes metadata arrays of arrays and its reader reads them (ggml's C reader
    does not): the header check steps over them, down to MAX_ARRAY_DEPTH levels, and the file loads."""
    import gguf

    path = tmp_path / "nested.gguf"
    w = gguf.GGUFWriter(str(path), "wan")
    w.add_array("x.nested", [[1, 2, 3], [4], [5, 6]])        # gguf-py writes an ARRAY of INT32 arrays
    w.add_tensor("a.weight", np.arange(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    field = gguf.GGUFReader(str(path)).get_field("x.nested")
    assert [int(field.parts[i][0]) for i in field.data] == [1, 2, 3, 4, 5, 6]
    assert [t.name for t in check_gguf_header(path).tensors] == ["a.weight"]
    assert load_gguf_state_dict(path)[0]["a.weight"].tolist() == [0, 1, 2, 3]
    assert [e.key for e in scan_weights(path)[1]] == ["a.weight"]
    deep = tmp_path / "deep.gguf"                              # the deepest nesting read: MAX_ARRAY_DEPTH levels
    deep.write_bytes(gguf_bytes([ARCH, kv("k", ARRAY, nested(MAX_ARRAY_DEPTH))], [ONE], ONE_DATA))
    assert gguf.GGUFReader(str(deep)).get_field("k").parts[-1].tolist() == [7]
    assert load_gguf_state_dict(deep)[0]["a.weight"].tolist() == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------
# the size bound at its edge (a file one byte short), and keys that clash once prefixes are stripped

def _last_tensor_end(path) -> tuple:
    """(name, end) of the tensor whose data ends last, as gguf-py (the reference reader) reads it."""
    import gguf

    last = max(gguf.GGUFReader(str(path)).tensors, key=lambda t: int(t.data_offset) + int(t.n_bytes))
    return last.name, int(last.data_offset) + int(last.n_bytes)


@pytest.mark.parametrize("nd_last", [False, True], ids=["5-D after its bias", "5-D appended last"])
def test_a_gguf_one_byte_short_is_refused_by_the_header_check(tmp_path, nd_last):
    """A WAN GGUF as the converters write it, cut to exactly the end of its last tensor's data (the
    padding after it is optional: gguf-py reads such a file), loads; one byte less is refused by
    the header check itself, naming the file and the tensor, before gguf-py or anything later reads it.
    With the 5-D tensor appended last (fix_5d_tensors.py's case of a kernel without a bias), that
    tensor is the one cut."""
    from file_corpus import tiny_state_dict

    from wan22_blockswap.formats.gguf_reader import write_tiny_gguf

    full = write_tiny_gguf(tmp_path / "full.gguf", tiny_state_dict(), nd_last=nd_last)
    name, end = _last_tensor_end(full)
    assert (name == "patch_embedding.weight") == nd_last
    data = open(full, "rb").read()
    assert len(data) - 32 < end <= len(data)                   # at most the alignment's padding follows
    edge, short = tmp_path / "edge.gguf", tmp_path / "short.gguf"
    edge.write_bytes(data[:end])
    short.write_bytes(data[:end - 1])
    assert check_gguf_header(edge).tensors[-1].name == name
    assert [t.name for t in check_gguf_header(edge).tensors] == [t.name for t in check_gguf_header(full).tensors]
    assert [e.key for e in scan_weights(edge)[1]] == [e.key for e in scan_weights(full)[1]]
    load_wan_model(edge)
    message = rf"{re.escape(str(short))}: truncated or corrupt GGUF file: tensor '{re.escape(name)}' .*needs " \
              rf"bytes \d+\.\.{end}, but the file has {end - 1}"
    with pytest.raises(GGUFFormatError, match=message):
        check_gguf_header(short)
    for reader in (load_gguf_state_dict, scan_weights, load_wan_model):  # the header check's message, not a later one
        err = answered_fast(reader, short)
        assert re.search(message, str(err)), (reader.__name__, str(err))


def test_the_gguf_size_bound_at_its_edge_without_padding(tmp_path):
    """The last tensor's data (20 bytes, not a multiple of the alignment) ending exactly at the end of
    the file is read, by gguf-py and by the pack; one byte less is refused by the header check."""
    import gguf

    values = struct.pack("<5f", 1, 2, 3, 4, 5)
    exact, short = tmp_path / "exact.gguf", tmp_path / "short.gguf"
    exact.write_bytes(gguf_bytes([ARCH], [ONE, info("b.weight", [5], F32, 32)], ONE_DATA + values))
    short.write_bytes(gguf_bytes([ARCH], [ONE, info("b.weight", [5], F32, 32)], ONE_DATA + values[:-1]))
    assert gguf.GGUFReader(str(exact)).tensors[1].data.tolist() == [1, 2, 3, 4, 5]
    assert check_gguf_header(exact).tensors[1].offset + 20 == exact.stat().st_size
    assert load_gguf_state_dict(exact)[0]["b.weight"].tolist() == [1, 2, 3, 4, 5]
    with pytest.raises(GGUFFormatError, match=rf"{re.escape(str(short))}: .*tensor 'b.weight' \(F32 \[5\]\) needs "
                                              rf"bytes \d+\.\.{exact.stat().st_size}, but the file has "
                                              rf"{exact.stat().st_size - 1}"):
        check_gguf_header(short)


def _clash(sd: dict, key: str, prefix: str) -> dict:
    """``sd`` plus a second tensor for ``key`` under ``prefix`` (other values, so a load that kept
    either one silently would be wrong half the time)."""
    return {**sd, prefix + key: sd[key] + 1}


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "diffusion_model."])
def test_two_tensors_that_map_to_one_key_are_refused_safetensors(tmp_path, prefix):
    """``model.diffusion_model.x`` beside ``x`` in one safetensors file: valid JSON, distinct names, so
    only the loader's own check after stripping the prefix can see it; the error names the file."""
    from safetensors.torch import save_file

    from file_corpus import tiny_state_dict

    key = "blocks.0.ffn.0.bias"
    path = tmp_path / "clash.safetensors"
    save_file({k: v.contiguous() for k, v in _clash(tiny_state_dict(), key, prefix).items()}, str(path))
    with pytest.raises(WeightFileError, match=rf"{re.escape(str(path))}: two tensors map to the key '{key}'"):
        scan_weights(path)
    with pytest.raises(BlockSwapError, match=rf"{re.escape(str(path))}: two tensors map to the key '{key}'"):
        load_wan_model(path)
    both = tmp_path / "both_prefixes.safetensors"                 # the two prefixes against each other
    save_file({"model.diffusion_model.a": D16_T, "diffusion_model.a": D16_T + 1}, str(both))
    with pytest.raises(WeightFileError, match=rf"{re.escape(str(both))}: two tensors map to the key 'a'"):
        scan_weights(both)


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "diffusion_model."])
def test_two_tensors_that_map_to_one_key_are_refused_gguf(tmp_path, prefix):
    """The same in a GGUF file (gguf-py reads it: the names differ): refused by both GGUF readers and
    the loader, naming the file and the key."""
    from file_corpus import tiny_state_dict

    from wan22_blockswap.formats.gguf_reader import write_tiny_gguf

    key = "blocks.0.ffn.0.bias"
    path = write_tiny_gguf(tmp_path / "clash.gguf", _clash(tiny_state_dict(), key, prefix))
    message = rf"{re.escape(str(path))}: two tensors map to the key '{key}'"
    with pytest.raises(GGUFFormatError, match=message):
        load_gguf_state_dict(path)
    with pytest.raises(WeightFileError, match=message):
        scan_weights(path)
    with pytest.raises(BlockSwapError, match=message):
        load_wan_model(path)


# ---------------------------------------------------------------------------------------------
# safetensors

def st_bytes(header, data: bytes, raw: bytes = None) -> bytes:
    text = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def t(dtype, shape, start, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


D16 = bytes(range(16))
D16_T = torch.arange(16, dtype=torch.float32)


def crafted_safetensors():
    yield "overlapping ranges", st_bytes({"a": t("U8", [8], 0, 8), "b": t("U8", [8], 4, 12), "c": t("U8", [4], 12, 16)}, D16), \
        r"tensor 'b' starts at data byte 4 and overlaps 'a' \(which ends at data byte 8\)"
    yield "one range twice", st_bytes({"a": t("U8", [16], 0, 16), "b": t("U8", [16], 0, 16)}, D16), r"'b'.*overlaps 'a'"
    yield "a gap", st_bytes({"a": t("U8", [4], 0, 4), "b": t("U8", [8], 8, 16)}, D16), \
        r"tensor 'b' starts at data byte 8 and leaves a gap of 4 bytes after 'a'"
    yield "gap before the first", st_bytes({"a": t("U8", [8], 8, 16)}, D16), r"gap of 8 bytes after the header"
    yield "bytes after the last", st_bytes({"a": t("U8", [8], 0, 8)}, D16), r"8 bytes follow the last tensor's data"
    yield "duplicate name", st_bytes(None, D16, b'{"a":{"dtype":"U8","shape":[16],"data_offsets":[0,16]},'
                                              b'"a":{"dtype":"U8","shape":[16],"data_offsets":[0,16]}}'), \
        r"the name 'a' appears twice"
    yield "reversed offsets", st_bytes({"a": t("U8", [0], 16, 0)}, D16), r"byte range \[16, 0\] ends before it starts"
    yield "shape 2**62", st_bytes({"a": t("F32", [2 ** 62], 0, 16)}, D16), r"needs 18446744073709551616 bytes"
    yield "shape product overflows", st_bytes({"a": t("F32", [2 ** 40, 2 ** 40], 0, 16)}, D16), \
        r"more elements than any file can hold"
    yield "negative shape", st_bytes({"a": t("U8", [-16], 0, 16)}, D16), r"shape \[-16\]; a shape is a list of integers >= 0"
    yield "float shape", st_bytes({"a": t("U8", [16.0], 0, 16)}, D16), r"shape \[16.0\]"
    yield "bool offset", st_bytes({"a": t("U8", [16], False, 16)}, D16), r"data_offsets \[false, 16\]"
    yield "offsets past the end", st_bytes({"a": t("U8", [16], 2 ** 62, 2 ** 62 + 16)}, D16), \
        r"starts at data byte 4611686018427387904 and leaves a gap"
    yield "truncated", st_bytes({"a": t("U8", [8], 0, 8), "b": t("U8", [16], 8, 24)}, D16), \
        r"truncated file: tensor 'b' needs bytes up to"
    yield "header length 2**62", struct.pack("<Q", 2 ** 62) + b"{}", r"header length field says 4611686018427387904"
    yield "not UTF-8", st_bytes(None, D16, b'{"\xff":{}}'), r"not UTF-8"
    yield "nested 100000 deep", st_bytes(None, D16, b"[" * 100_000 + b"]" * 100_000), r"nested too deeply|corrupt"
    yield "300000 values", st_bytes(None, D16, b"[" + b"0," * 300_000 + b"0]"), r"about 30000\d JSON values; this loader reads at most 262144"
    yield "5000-digit integer", st_bytes(None, D16, b'{"a":{"dtype":"U8","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,16]}}'), \
        r"corrupt safetensors header"
    yield "metadata not strings", st_bytes({"__metadata__": {"format": 1}, "a": t("U8", [16], 0, 16)}, D16), \
        r"__metadata__ must map names to strings"
    yield "unknown dtype", st_bytes({"a": t("Q4", [16], 0, 16)}, D16), r"tensor 'a' has dtype Q4"


CRAFTED_ST = list(crafted_safetensors())


@pytest.mark.parametrize("case,content,message", CRAFTED_ST, ids=[c[0] for c in CRAFTED_ST])
def test_crafted_safetensors_is_an_error_naming_the_file_and_field(tmp_path, case, content, message):
    path = tmp_path / "crafted.safetensors"
    path.write_bytes(content)
    err = answered_fast(scan_weights, path)
    assert isinstance(err, WeightFileError) and str(path) in str(err), repr(err)
    assert re.search(message, str(err)), str(err)


def test_every_whole_byte_dtype_the_safetensors_library_writes_is_read(tmp_path):
    """ComfyUI's save nodes write whatever dtype a model holds through the safetensors library (an
    MXFP8 model's block scales are float8_e8m0fnu; ComfyUI also keeps weights in the fnuz float8
    types): the scan accepts each such file and the bytes read are the library's own reading.
    Two values per byte (float4_e2m1fn_x2, "F4") are refused by name."""
    from safetensors.torch import load_file, save_file

    from wan22_blockswap.formats.weight_files import read_weights

    names = ["float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
             "float8_e5m2fnuz", "float8_e8m0fnu", "complex64", "int64", "int32", "int16", "int8", "uint64",
             "uint32", "uint16", "uint8", "bool"]
    raw = torch.arange(96, dtype=torch.uint8).reshape(4, 24)
    tensors = {n: raw.view(getattr(torch, n)).clone() for n in names if hasattr(torch, n)}
    assert len(tensors) == len(names)                              # torch 2.13 has every one of them
    path = tmp_path / "dtypes.safetensors"
    save_file(tensors, str(path))
    ref = load_file(str(path))
    fmt, entries, _ = scan_weights(path)
    got = read_weights(path, entries)
    assert fmt == "safetensors" and set(got) == set(ref) == set(tensors)
    for n, t in ref.items():
        assert got[n].dtype == t.dtype and got[n].shape == t.shape, n
        assert torch.equal(got[n].view(torch.uint8), t.view(torch.uint8)), n
    f4 = tmp_path / "f4.safetensors"
    save_file({"w": raw.view(torch.float4_e2m1fn_x2)}, str(f4))
    with pytest.raises(WeightFileError, match=rf"{re.escape(str(f4))}: tensor 'w' has dtype F4, .*readable: .*F8_E8M0"):
        scan_weights(f4)


def test_the_reference_reader_refuses_the_ranges_the_pack_refuses(tmp_path):
    """The byte-range rules are the safetensors library's (what ComfyUI's own loader uses): it
    refuses the same overlap, gap and trailing-bytes files, and reads the tiled one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    for case, content, _ in CRAFTED_ST[:5]:
        path = tmp_path / "ref.safetensors"
        path.write_bytes(content)
        with pytest.raises(SafetensorError):
            load_file(str(path))
    path = tmp_path / "ok.safetensors"
    path.write_bytes(st_bytes({"b": t("U8", [8], 8, 16), "a": t("U8", [8], 0, 8)}, D16))  # any header order
    assert load_file(str(path))["b"].tolist() == list(range(8, 16))
    assert [(e.key, e.offset - path.stat().st_size + 16) for e in scan_weights(path)[1]] == [("b", 8), ("a", 0)]
