"""The CUDA calls the swap engine makes, behind one small object.

Pure torch. The engine never calls ``torch.cuda`` directly: it asks a runtime for streams and events,
issues its copies and page-locks its host masters through it. :class:`CudaRuntime` is the real one;
the test suite hands the engine a recording stand-in with the same methods, which lets the whole
asynchronous path (copy stream, events, pinned masters) run on a CPU and have its stream order
checked (``tests/test_stream_order.py``). Events and streams are torch's own objects, used through
their methods (``record``, ``wait_event``, ``query``, ``elapsed_time``).
"""
from __future__ import annotations

import torch

from ..utils import get_logger

log = get_logger("engine")

# cudaHostRegisterPortable: pinned for every CUDA context, as ComfyUI registers its own pins
_HOST_REGISTER_PORTABLE = 1


class CudaRuntime:
    """Streams, events, copies, page-locking and synchronization on CUDA devices."""

    def new_stream(self, device: torch.device):
        return torch.cuda.Stream(device)

    def new_event(self, timing: bool = False):
        return torch.cuda.Event(enable_timing=timing)

    def current_stream(self, device: torch.device):
        return torch.cuda.current_stream(device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream, non_blocking: bool) -> None:
        """``dst.copy_(src)`` issued on ``stream``. From pageable memory (``non_blocking=False``) the
        host waits for the copy; from pinned memory it returns at once."""
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=non_blocking)

    def synchronize(self, device: torch.device) -> None:
        """Wait for all work on ``device``, every stream (before memory that work reads is freed)."""
        torch.cuda.synchronize(device)

    def host_register(self, ptr: int, nbytes: int) -> int:
        """Page-lock host memory at its exact size; the CUDA error code (0: success)."""
        return int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, _HOST_REGISTER_PORTABLE))

    def host_unregister(self, ptr: int) -> int:
        return int(torch.cuda.cudart().cudaHostUnregister(ptr))

    def clear_error(self) -> None:
        """A failed cudaHostRegister/Unregister leaves the runtime's last error set, and torch's next
        kernel launch check would report it in unrelated code: read it off once, here."""
        try:
            torch.cuda.synchronize()
            torch.zeros(1, device="cuda").add_(1)
            torch.cuda.synchronize()
        except RuntimeError as err:  # the stale error surfaces here, where we expect it
            log.debug("block swap: cleared a CUDA error left by a failed (un)registration: %s", err)
