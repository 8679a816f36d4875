"""Out-of-memory recovery and the adaptive block count: the decisions, as pure functions of byte counts.

Block swap's output does not depend on how many blocks are streamed (bit for bit), so a forward that
ran out of device memory can run again with more blocks streamed and give exactly what a run started
with that count would have given. This module decides how many more (from what the failure shows, never
a blind +1), in which order the units join (main blocks, then VACE blocks, then the embeddings), and,
for ``vram_budget`` = adaptive, how the count follows the peak each forward really used.

Pure Python (+ torch for the exception type); the ComfyUI side (callbacks.py) applies the decisions and
the engine (block_manager.BlockSwapEngine.replan) changes the plan between forwards.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Callable, Optional, Tuple

import torch

from .config import ModelLayout, SwapSettings
from .utils import format_bytes

__all__ = ["RETRY", "FAIL", "OOM_CHOICES", "OOMFailure", "parse_oom", "is_device_oom", "grow_settings", "blocks_needed",
           "AdaptiveCount", "Change", "run_with_recovery", "OutOfMemoryAfterAll"]

RETRY, FAIL = "swap more and retry", "fail"
OOM_CHOICES = (RETRY, FAIL)
OOM_MARGIN = 256 << 20  # freed beyond what the failed allocation lacked (at most half a block): fragmentation
_SIZE = r"([\d.]+)\s*(B|KiB|MiB|GiB|TiB|bytes)"
_UNITS = {"B": 1, "bytes": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


class OutOfMemoryAfterAll(torch.OutOfMemoryError):
    """Device memory ran out with every unit streamed: block swap cannot make this run fit. A subclass of
    torch's error, so ComfyUI treats it as the out-of-memory error it is (it unloads its models)."""


@dataclass(frozen=True)
class OOMFailure:
    """What a device out-of-memory error said: bytes it tried to allocate and bytes that were free
    (None where the message does not say), and the message."""

    asked: Optional[int]
    free: Optional[int]
    message: str

    def describe(self) -> str:
        if self.asked is None:
            return self.message.splitlines()[0][:200] if self.message else "out of memory"
        free = f" with {format_bytes(self.free)} free" if self.free is not None else ""
        return f"an allocation of {format_bytes(self.asked)}{free} failed"


def _size(value: str, unit: str) -> int:
    return int(float(value) * _UNITS[unit])


def parse_oom(message: str) -> OOMFailure:
    """The figures of a CUDA out-of-memory message ("Tried to allocate 2.00 GiB. GPU 0 has a total
    capacity of 23.64 GiB of which 1.12 GiB is free. ...")."""
    asked = re.search(r"[Tt]ried to allocate " + _SIZE, message)
    free = re.search(r"of which " + _SIZE + r" is free", message)
    return OOMFailure(_size(*asked.groups()) if asked else None, _size(*free.groups()) if free else None, message)


def is_device_oom(err: BaseException) -> bool:
    """A device out-of-memory error: torch's type, and where ComfyUI is importable, what its own
    ``is_oom`` recognises (an accelerator error saying out of memory)."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    try:
        import comfy.model_management as mm
    except ImportError:
        return False
    is_oom = getattr(mm, "is_oom", None)
    return bool(is_oom(err)) if is_oom is not None and isinstance(err, Exception) else False


def blocks_needed(failure: OOMFailure, block_bytes: int, current: int, total: int) -> int:
    """How many more units to stream after ``failure``: enough resident blocks of ``block_bytes`` each
    to cover what the allocation lacked plus a margin (:data:`OOM_MARGIN`, at most half a block).
    Without figures in the message, a tenth of the model's units (at least one): a measured step, not
    a blind +1. At most what is left."""
    left = total - current
    if left <= 0:
        return 0
    if failure.asked is not None and block_bytes > 0:
        lacking = failure.asked - (failure.free or 0) + min(OOM_MARGIN, block_bytes // 2)
        n = math.ceil(max(lacking, 1) / block_bytes)
    else:
        n = max(1, math.ceil(total / 10))
    return min(left, max(1, n))


def grow_settings(settings: SwapSettings, layout: ModelLayout, extra: int) -> SwapSettings:
    """``settings`` with ``extra`` more units streamed: main blocks first (the count the user sets), then
    VACE blocks, then the text and image embeddings. Unchanged when everything already streams."""
    blocks = min(layout.num_blocks, settings.blocks_to_swap + extra)
    extra -= blocks - settings.blocks_to_swap
    vace = min(layout.num_vace_blocks, settings.vace_blocks_to_swap + max(0, extra))
    extra -= vace - settings.vace_blocks_to_swap
    changes = dict(blocks_to_swap=blocks, vace_blocks_to_swap=vace)
    for flag, present in (("offload_txt_emb", layout.text_embedding), ("offload_img_emb", layout.image_embedding)):
        if extra > 0 and present and not getattr(settings, flag):
            changes[flag] = True
            extra -= 1
    return replace(settings, **changes)


def streamable(settings: SwapSettings, layout: ModelLayout) -> Tuple[int, int]:
    """(units streamed now, units that could stream)."""
    now = (settings.blocks_to_swap + settings.vace_blocks_to_swap
           + bool(settings.offload_txt_emb and layout.text_embedding)
           + bool(settings.offload_img_emb and layout.image_embedding))
    every = layout.num_blocks + layout.num_vace_blocks + bool(layout.text_embedding) + bool(layout.image_embedding)
    return now, every


@dataclass(frozen=True)
class Change:
    """One change of the streamed count: at which forward of its sampling run (1: the first; the change
    applies from the next forward, or to the failed one's retry), from, to, and why."""

    forward: int
    old: int
    new: int
    reason: str


class AdaptiveCount:
    """``vram_budget`` = adaptive: after each forward, the main-block count that keeps the next forward's
    peak within ``ceiling`` less ``margin`` (the target).

    * Too tight (peak above the target, or an out-of-memory error): stream ``ceil(excess / block)`` more.
      The count that was too tight is remembered: the count never goes back to it or below (``floor``).
    * Room to spare (the target minus the peak is at least ``HYSTERESIS_BLOCKS`` blocks): stream
      ``floor(spare / block) - 1`` fewer, at most ``MAX_STEP`` at a time, never below ``floor``.
    * Otherwise unchanged. The floor only rises and a count is lowered only while no count at or above it
      has been too tight, so the count settles after at most one change of direction: it cannot oscillate.
    """

    HYSTERESIS_BLOCKS = 2
    MAX_STEP = 4

    def __init__(self, ceiling: int, margin: int, block_bytes: int, count: int, total: int):
        self.ceiling, self.margin = ceiling, margin  # the peak may reach ceiling - margin
        self.block_bytes, self.count, self.total = max(1, block_bytes), count, total
        self.floor = 0  # the fewest blocks known not to be too few
        self.forwards = 0

    @property
    def target(self) -> int:
        return self.ceiling - self.margin

    def after_forward(self, peak: int) -> Optional[Change]:
        """The change for the next forward (None: keep the count) after one that peaked at ``peak``."""
        self.forwards += 1
        excess = peak - self.target
        if excess > 0:
            self.floor = max(self.floor, min(self.total, self.count + 1))
            new = min(self.total, self.count + math.ceil(excess / self.block_bytes))
            why = f"peak {format_bytes(peak)} above the target {format_bytes(self.target)}"
        elif -excess >= self.HYSTERESIS_BLOCKS * self.block_bytes:
            step = min(self.MAX_STEP, -excess // self.block_bytes - 1)
            new = max(self.floor, self.count - step)
            why = f"peak {format_bytes(peak)}, {format_bytes(-excess)} below the target"
        else:
            return None
        return self._change(new, why)

    def after_oom(self, needed: int) -> Optional[Change]:
        """An out-of-memory error at this count: ``needed`` more units were found necessary."""
        self.floor = max(self.floor, min(self.total, self.count + needed))
        return self._change(min(self.total, self.count + needed), "out of memory")

    def _change(self, new: int, why: str) -> Optional[Change]:
        if new == self.count:
            return None
        change = Change(self.forwards, self.count, new, why)
        self.count = new
        return change


def run_with_recovery(run: Callable[[], object], on_oom: Callable[[OOMFailure], bool], *, enabled: bool = True,
                      limit: int = 64):
    """``run()``; on a device out-of-memory error, ``on_oom(failure)`` streams more (True) or cannot
    (False), then ``run()`` again, while it can. The error's traceback, which holds the failed
    forward's activations, is dropped before ``on_oom`` runs, so their memory is free by then. Any other
    error propagates untouched; so does the out-of-memory error when ``enabled`` is False."""
    for _ in range(limit):
        failure = None
        try:
            return run()
        except Exception as err:  # noqa: BLE001 - re-raised at once unless it is a device OOM
            if not enabled or not is_device_oom(err):
                raise
            failure = parse_oom(str(err))
        # outside the except block: the exception and its frames (the activations) are released here
        if not on_oom(failure):
            raise OutOfMemoryAfterAll(
                f"block swap: out of device memory with every block, VACE block and embedding streamed "
                f"({failure.describe()}). Block swap cannot make this run fit: lower the resolution, the "
                "number of frames or the batch size, use a smaller quantization (fp8, GGUF Q4), or close "
                "what else uses the GPU.")
    raise RuntimeError("block swap: out-of-memory recovery did not converge; this is a bug, please report it")
