"""Memory readouts, byte formatting and device helpers shared by the engine, nodes and demo."""
from __future__ import annotations

import logging
import os
from typing import Dict, Optional

import torch

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
