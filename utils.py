"""Memory readouts, byte formatting, device helpers, pre-flight verdicts (pure functions of byte
counts) and debug trace files, shared by the engine, nodes and demo."""
from __future__ import annotations

import itertools
import json
import logging
import os
import re
import tempfile
import time
from typing import Dict, Mapping, Optional

import torch

__version__ = "0.1.0"  # the pack's version, written into debug traces; keep in step with pyproject.toml
LOGGER_NAME = "wan22_blockswap"


def get_logger(name: Optional[str] = None) -> logging.Logger:
    """The pack's logger (or a child). Handlers are the host application's business."""
    return logging.getLogger(LOGGER_NAME if not name else f"{LOGGER_NAME}.{name}")


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"  # unreachable; keeps type checkers calm


def host_rss_bytes() -> int:
    """Resident set size of this process."""
    import psutil  # runtime dependency; imported lazily so importing the pack stays cheap

    return psutil.Process(os.getpid()).memory_info().rss


def host_available_bytes() -> int:
    """Host RAM the OS says can be allocated without swapping."""
    import psutil

    return psutil.virtual_memory().available


def as_device(device) -> torch.device:
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    return d


def device_memory(device) -> Dict[str, int]:
    """Allocated / reserved / peak bytes of a CUDA device; empty for devices without counters."""
    d = torch.device(device)
    if d.type != "cuda" or not torch.cuda.is_available():
        return {}
    return {
        "allocated": torch.cuda.memory_allocated(d),
        "reserved": torch.cuda.memory_reserved(d),
        "peak_allocated": torch.cuda.max_memory_allocated(d),
        "peak_reserved": torch.cuda.max_memory_reserved(d),
    }


def memory_report(device) -> str:
    """One line: host RSS and, on CUDA, allocated/reserved device memory."""
    parts = [f"host RSS {format_bytes(host_rss_bytes())}"]
    mem = device_memory(device)
    if mem:
        parts.append(f"{device} allocated {format_bytes(mem['allocated'])}, "
                     f"reserved {format_bytes(mem['reserved'])}, "
                     f"peak {format_bytes(mem['peak_allocated'])}")
    return "; ".join(parts)


def device_name(device) -> str:
    """The GPU's name on CUDA, else the device type."""
    d = torch.device(device)
    if d.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(d)
    return d.type


def device_total_memory(device) -> Optional[int]:
    """Total memory of a CUDA device; None for devices without that figure (CPU)."""
    d = torch.device(device)
    if d.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(d).total_memory


# ------------------------------------------------------------------------------------------------
# Pre-flight verdicts. Pure functions of byte counts, so they are tested without a GPU or a big
# machine; callbacks.py gathers the numbers and decides what to do with the messages.

VRAM_LIMIT = 0.9  # weights above this share of the card leave too little for activations

_RAM_ADVICE = ("Set host_memory to auto or file (the blocks are then read from the model file), swap fewer "
               "blocks, use an fp8 or GGUF model, close other programs, or add swap space (a larger page "
               "file on Windows).")

HOST_MEMORY_CHOICES = ("auto", "RAM", "file")
GIB = 1 << 30
RAM_HEADROOM_MIN = 2 * GIB  # auto keeps this much, or RAM_HEADROOM_SHARE of what is available, free
RAM_HEADROOM_SHARE = 0.2


def ram_headroom(available: int) -> int:
    """RAM ``auto`` leaves free for the rest of the graph (text encoder, VAE, the OS): the larger of
    2 GiB and a fifth of what is available."""
    return max(RAM_HEADROOM_MIN, int(RAM_HEADROOM_SHARE * available))


def choose_host_memory(choice: str, need: int, available: int) -> "tuple[str, str]":
    """``(mode, why)``: where the host masters live for ``choice`` ("auto", "RAM", "file"), ``need``
    bytes of host copies and ``available`` RAM for them. auto keeps them in RAM when they fit with
    :func:`ram_headroom` to spare, and reads them from file otherwise. ``why`` is the readout's
    short reason."""
    if choice not in HOST_MEMORY_CHOICES:
        raise ValueError(f"host_memory must be one of {', '.join(HOST_MEMORY_CHOICES)}, got {choice!r}")
    if choice != "auto":
        return choice, "chosen"
    if need + ram_headroom(available) <= available:
        return "RAM", f"{short_bytes(need)} fits in {short_bytes(available)}"
    return "file", f"RAM {short_bytes(available)} < {short_bytes(need + ram_headroom(available))}"


def short_bytes(n: float) -> str:
    """Bytes with three significant digits: ``512 B``, ``3.43 MiB``, ``336 MiB``, ``14.0 GiB``."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1000 or unit == "GiB":  # 1000, not 1024: "1010 MiB" would be a 4-digit figure
            break
        n /= 1024
    if unit == "B":
        return f"{n:.0f} B"
    digits = 0 if abs(n) >= 100 else 1 if abs(n) >= 10 else 2
    return f"{n:.{digits}f} {unit}"


def host_ram_message(need: int, available: int, what: str = "this model") -> Optional[str]:
    """None when the host copies of the streamed blocks (``need`` bytes not yet in RAM) fit in
    ``available``; else the error message, with the figures and what to do."""
    if need <= available:
        return None
    return (f"not enough host RAM for block swap: the host copies of the streamed blocks of {what} "
            f"need {format_bytes(need)} more RAM, but only {format_bytes(available)} is available. "
            + _RAM_ADVICE)


def pin_budget_message(masters: int, budget_left: Optional[int]) -> Optional[str]:
    """None when all ``masters`` bytes can be pinned (``budget_left`` None: no cap); else a note
    saying how much will stay pageable."""
    if budget_left is None or masters <= budget_left:
        return None
    pageable = masters - max(0, budget_left)
    return (f"{format_bytes(pageable)} of the {format_bytes(masters)} host copies exceed ComfyUI's "
            f"pinned-memory cap ({format_bytes(max(0, budget_left))} left) and stay pageable: those "
            "blocks copy slower and synchronously. Swap fewer blocks or use an fp8/GGUF model to avoid it.")


def vram_message(need: int, total: int, *, need_all_swapped: int, fit_blocks: Optional[int],
                 limit: float = VRAM_LIMIT) -> Optional[str]:
    """None when ``need`` bytes (resident weights + ring) fit in ``limit`` of the card's ``total``;
    else a warning. ``need_all_swapped``: the same figure with every block, VACE block and embedding
    streamed; ``fit_blocks``: the smallest blocks_to_swap that fits (None: no count does)."""
    budget = limit * total
    if need <= budget:
        return None
    head = (f"the weights that stay on the GPU with this plan ({format_bytes(need)}, resident blocks + "
            f"ring) exceed {limit:.0%} of the card's {format_bytes(total)}, leaving too little for activations")
    tail = "offload the text embedding, use an fp8 or GGUF model, or lower the resolution / frame count."
    if need_all_swapped > budget:
        return (f"{head}; even with every block swapped they would need {format_bytes(need_all_swapped)}, "
                "so block swap alone cannot make this model fit. Not stopping: ComfyUI may still run it "
                "by offloading more weights itself (lowvram mode, much slower). Use an fp8 or GGUF model, "
                "or lower the resolution / frame count.")
    if fit_blocks is not None:
        return f"{head}. Set blocks_to_swap to at least {fit_blocks}, or " + tail
    return f"{head}. Swap all blocks and also the VACE blocks / embeddings, or " + tail


# ------------------------------------------------------------------------------------------------
# Debug traces: one JSON file per sampling run, for bug reports.

TRACE_PREFIX = "wan22_blockswap_trace_"  # only files named so are ever deleted by the cap
TRACE_KEEP = 20
_trace_counter = itertools.count()


def trace_directory() -> str:
    """``<ComfyUI output>/wan22_blockswap_traces`` inside ComfyUI (its temp folder is emptied at every
    start, and a trace is for attaching to a bug report later), the system's temp directory elsewhere."""
    try:
        import folder_paths  # ComfyUI's module; absent outside ComfyUI
        return os.path.join(folder_paths.get_output_directory(), "wan22_blockswap_traces")
    except Exception:  # noqa: BLE001 - ImportError, or a folder_paths without that function
        return tempfile.gettempdir()


def write_trace(data: dict, directory: str, node_id: Optional[str] = None, keep: int = TRACE_KEEP) -> str:
    """Write ``data`` as ``<directory>/wan22_blockswap_trace_<time>_<n>_node<id>.json`` and delete the
    oldest of this pack's traces beyond ``keep``. Returns the path; raises OSError / TypeError when
    the file cannot be written (the caller decides that a trace never fails a run)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    node = re.sub(r"[^A-Za-z0-9_-]", "-", str(node_id)) if node_id else "none"
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{TRACE_PREFIX}{stamp}_{next(_trace_counter):05d}_node{node}.json")
    text = json.dumps(data, indent=1, default=str)  # serialise first: no half-written file on a bad value
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    _prune_traces(directory, keep)
    return path


def _prune_traces(directory: str, keep: int) -> None:
    # Names start with a sortable timestamp and a per-process counter: name order is write order.
    ours = sorted(n for n in os.listdir(directory) if n.startswith(TRACE_PREFIX) and n.endswith(".json"))
    for name in ours[:max(0, len(ours) - keep)]:
        try:
            os.remove(os.path.join(directory, name))
        except OSError:  # removed meanwhile, or not ours to remove: the cap is best effort
            get_logger().debug("block swap: could not delete old trace %s", name, exc_info=True)


def validate_tensor_consistency(reference, candidate, what: str = "value",
                                attrs=("shape", "dtype", "device")) -> None:
    """Check that ``candidate`` keeps the structure of ``reference``: a latent dict keeps all its
    keys, and every tensor keeps its ``attrs`` (shape, dtype, device). Raises ValueError naming the
    first difference (a looper that loses ``noise_mask`` or moves ``samples`` silently degrades
    loop 2+). With ``block_swap_debug`` the pack checks every forward's output against its input."""
    if isinstance(reference, Mapping):
        if not isinstance(candidate, Mapping):
            raise ValueError(f"{what}: expected a dict, got {type(candidate).__name__}")
        missing = [k for k in reference if k not in candidate]
        if missing:
            raise ValueError(f"{what}: lost keys {missing}")
        for k in reference:
            validate_tensor_consistency(reference[k], candidate[k], f"{what}[{k!r}]", attrs)
    elif isinstance(reference, torch.Tensor):
        if not isinstance(candidate, torch.Tensor):
            raise ValueError(f"{what}: expected a tensor, got {type(candidate).__name__}")
        for attr in attrs:
            if getattr(reference, attr) != getattr(candidate, attr):
                raise ValueError(f"{what}: {attr} {getattr(candidate, attr)} != {getattr(reference, attr)}")
