"""Damaged weight files: every mutant of a tiny valid file is answered fast, in little memory, correctly.

For each form of ``file_corpus.FORMS`` the seeded corpus of ``file_corpus.mutants`` goes through the
pack's loader (``load_wan_model``: header checks, ComfyUI's detection, reading). Each mutant must be
answered in under ``MAX_SECONDS`` with under ``MAX_EXTRA_RSS`` of extra peak RSS, either

* refused with the pack's error (``BlockSwapError``) naming the file, or
* loaded, and then every weight of the model is exactly what the file holds: the tensor the
  reference reader (the ``safetensors`` library, gguf-py) reads from the same bytes, converted to
  the weight's dtype (quantized GGUF bytes compared as stored). A flipped weight byte cannot be
  detected without a checksum, so such loads just carry that byte; loads are counted as equal to
  the intact file's or not (a changed weight byte, or a header change no format can tell from a
  real file, such as two tensors of one size trading byte ranges).

No RuntimeWarning may be raised on the way (numpy overflow warnings mean arithmetic on a lie).

Peak RSS per mutant: the kernel's high-water mark (``VmHWM``) is reset to the current RSS before each
mutant (``/proc/self/clear_refs`` 5) and read after it, so an allocation is counted even if it is
freed before the loader returns. A watchdog (``SIGALRM``) turns a hang into a failure instead of a
stuck suite. The counts and worst figures are printed in the test summary.
"""
from __future__ import annotations

import gc
import re
import signal
import time
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch

import comfy.model_management as mm
import comfy.utils

from file_corpus import FORMS, mutants, write_form
from wan22_blockswap.config import BlockSwapError
from wan22_blockswap.formats.gguf_reader import GGUFTensor
from wan22_blockswap.model_loader import load_wan_model

# ComfyUI's quantized files load through ComfyUI's own conversion where it has one; without it (the
# stand-in) the pack refuses even the intact file, with its message naming the file.
REFUSED_FORMS = set() if hasattr(comfy.utils, "convert_old_quants") else {"st_fp8_scaled", "st_comfy_quant"}
# ComfyUI's conversion of the old fp8_scaled form renames these per-layer tensors
_RENAMED = {".weight_scale": ".scale_weight", ".input_scale": ".scale_input"}
MAX_SECONDS = 2.0
MAX_EXTRA_RSS = 64 * 2 ** 20
WATCHDOG_SECONDS = 20
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class _Hang(BaseException):  # not an Exception: no ``except Exception`` in the code under test hides it
    pass


class PeakRSS:
    """Extra peak RSS of a block of code: the high-water mark is reset before and read after."""

    def __init__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.exact = True
        except OSError:  # not Linux, or clear_refs not writable: RSS after the call only (weaker)
            self.exact = False

    @staticmethod
    def _status(field: str) -> int:
        import psutil

        if field == "VmRSS" or not Path("/proc/self/status").exists():
            return psutil.Process().memory_info().rss
        text = Path("/proc/self/status").read_text()
        return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1)) * 1024

    def __enter__(self):
        if self.exact:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        self.before = self._status("VmRSS")
        return self

    def __exit__(self, *exc):
        self.extra = self._status("VmHWM" if self.exact else "VmRSS") - self.before
        return False


def _on_alarm(signum, frame):
    raise _Hang()


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous()
    return t.reshape(-1).view(_INT_VIEW[t.element_size()])


def _reference_tensors(path: Path):
    """The file's tensors as the reference reader reads them: {name: (tensor or raw bytes, type)}."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return {k: (v, None) for k, v in load_file(str(path)).items()}
    import gguf

    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        data = torch.from_numpy(t.data.copy())
        name = t.tensor_type.name
        if name == "BF16":
            data = data.reshape(-1).view(torch.bfloat16)
        out[t.name] = (data, name if name not in ("F32", "F16", "BF16") else None)
    return out


def _holds_the_files_bytes(patcher, path: Path) -> str:
    """'' when every weight of the loaded model is the file's tensor (reference reader), else why not."""
    ref = _reference_tensors(path)
    for key, p in patcher.model.diffusion_model.state_dict().items():
        if key not in ref:
            old = next((key[:-len(new)] + was for new, was in _RENAMED.items() if key.endswith(new)), None)
            if old in ref:
                key = old
            elif key.endswith(".comfy_quant"):  # the layer config ComfyUI derives from the old form's marker
                continue
            else:
                return f"{key}: not in the file as the reference reader reads it"
        r, qtype = ref[key]
        if isinstance(p, GGUFTensor):
            raw = p.as_subclass(torch.Tensor)
            if qtype != p.tensor_type or not torch.equal(raw.reshape(-1), r.reshape(-1).view(torch.uint8)):
                return f"{key}: quantized bytes differ from the file's"
        elif qtype is not None:
            return f"{key}: the file holds {qtype} bytes, the model a plain {p.dtype} tensor"
        elif p.numel() != r.numel() or not torch.equal(_bits(p), _bits(r.to(p.dtype))):
            return f"{key}: {p.dtype} values differ from the file's"
    return ""


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        type(a[k]) is type(b[k]) and a[k].dtype == b[k].dtype
        and torch.equal(_bits(a[k].as_subclass(torch.Tensor)), _bits(b[k].as_subclass(torch.Tensor))) for k in a)


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz_originals")
    return {form: write_form(form, folder / f"{form}.{'gguf' if form.startswith('gguf') else 'safetensors'}")
            for form in FORMS}


@pytest.fixture(autouse=True)
def _nothing_loaded_stays():
    before = len(mm.current_loaded_models)
    yield
    assert len(mm.current_loaded_models) == before  # the loader registers nothing with ComfyUI


@pytest.mark.parametrize("form", FORMS)
def test_every_mutant_is_answered_in_bounded_time_and_memory(form, originals, tmp_path, summary_lines):
    original = originals[form]
    data = original.read_bytes()
    if form in REFUSED_FORMS:
        with pytest.raises(BlockSwapError, match=re.escape(str(original))):
            load_wan_model(original)
        intact = None
    else:
        intact = load_wan_model(original)[0].model.diffusion_model.state_dict()
    path = tmp_path / f"mutant{original.suffix}"
    counts: Counter = Counter()
    failures, worst_s, worst_rss, total = [], 0.0, 0, 0
    old_handler = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        for i, m in enumerate(mutants(form, data, original)):
            total += 1
            path.write_bytes(m.data)
            patcher, error = None, None
            if i % 64 == 0:
                gc.collect()  # reference cycles of earlier loads go now, not during a measurement
            probe = PeakRSS()
            t0 = time.perf_counter()
            try:
                signal.setitimer(signal.ITIMER_REAL, WATCHDOG_SECONDS)
                with probe, warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    try:
                        patcher = load_wan_model(path)[0]
                    except BlockSwapError as e:
                        error = e
            except _Hang:
                failures.append(f"{m.name}: no answer after {WATCHDOG_SECONDS} s")
                continue
            except Exception as e:  # noqa: BLE001 - anything but the pack's error is a crash to report
                failures.append(f"{m.name}: crashed with {type(e).__name__}: {e}"[:300])
                continue
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            elapsed = time.perf_counter() - t0
            noisy = [w for w in caught if issubclass(w.category, RuntimeWarning)]
            if noisy:  # e.g. numpy's "overflow encountered": arithmetic on a header's lie
                failures.append(f"{m.name}: {noisy[0].category.__name__}: {noisy[0].message}")
            worst_s, worst_rss = max(worst_s, elapsed), max(worst_rss, probe.extra)
            if elapsed > MAX_SECONDS:
                failures.append(f"{m.name}: answered in {elapsed:.2f} s")
            if probe.extra > MAX_EXTRA_RSS:
                failures.append(f"{m.name}: {probe.extra / 2 ** 20:.1f} MiB extra RSS")
            if error is not None:
                counts["refused"] += 1
                if str(path) not in str(error):
                    failures.append(f"{m.name}: the error does not name the file: {error}")
                continue
            why = _holds_the_files_bytes(patcher, path)
            if why:
                failures.append(f"{m.name}: loaded, but {why}")
            elif intact is not None and _same_weights(patcher.model.diffusion_model.state_dict(), intact):
                counts["same"] += 1
            else:
                counts["changed"] += 1
            del patcher
    finally:
        signal.signal(signal.SIGALRM, old_handler)
    summary_lines.append(
        f"fuzz {form}: {total} mutants: {counts['refused']} refused with an error naming the file, "
        f"{counts['same']} loaded equal to the intact file, {counts['changed']} loaded with other weights, "
        f"exactly as the file holds them" + (f", {len(failures)} WRONG" if failures else "")
        + f"; slowest {worst_s * 1000:.1f} ms, most extra peak RSS {worst_rss / 2 ** 20:.1f} MiB"
        + ("" if PeakRSS().exact else " (RSS after each load: peak not measurable here)"))
    assert total >= (150 if form.endswith("_orig_shape") else 300)  # that form: its own metadata only
    assert counts["refused"] > 0
    assert not failures, f"{len(failures)} of {total} mutants answered wrongly:\n" + "\n".join(failures[:30])
