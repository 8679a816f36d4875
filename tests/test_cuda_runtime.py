"""The real CUDA runtime's stream discipline, checked on a CPU.

Every other engine test hands the engine a recording runtime (``stream_order.RecordingRuntime``), so
the real :class:`CudaRuntime` is only run on a GPU. Its methods are thin, but each one carries a
decision no CPU test would otherwise see: a copy issued outside ``torch.cuda.stream(stream)`` runs on
the compute stream and serializes every copy with compute; a stream or ``synchronize`` without the
device lands on the current device, not the compute one; a timing flag lost makes every event
timed (or none). Here ``torch.cuda``'s stream, event and synchronize entry points are replaced, for
the test only, by recorders, and the copy's destination records the stream current when it is
written.
"""
import contextlib

import pytest
import torch

from wan22_blockswap.engine.cuda_runtime import CudaRuntime


class _Cuda:
    """Stand-ins for the torch.cuda calls the runtime makes; ``log`` lists what was called, in order."""

    def __init__(self):
        self.log = []
        self.current = "default"

    @contextlib.contextmanager
    def stream(self, stream):
        old, self.current = self.current, stream
        self.log.append(("enter", stream))
        try:
            yield
        finally:
            self.current = old
            self.log.append(("exit", stream))

    def Stream(self, *args, **kwargs):
        self.log.append(("Stream", args, kwargs))
        return ("stream", args, tuple(sorted(kwargs.items())))

    def Event(self, *args, **kwargs):
        self.log.append(("Event", args, kwargs))
        return ("event", args, tuple(sorted(kwargs.items())))

    def current_stream(self, *args, **kwargs):
        self.log.append(("current_stream", args, kwargs))
        return ("current", args)

    def synchronize(self, *args, **kwargs):
        self.log.append(("synchronize", args, kwargs))


class _Dst:
    """A copy destination that records the stream current when ``copy_`` is called."""

    def __init__(self, cuda):
        self.cuda, self.copies = cuda, []

    def copy_(self, src, non_blocking=False):
        self.cuda.log.append(("copy_", src, non_blocking))
        self.copies.append((self.cuda.current, src, non_blocking))
        return self


@pytest.fixture
def cuda(monkeypatch):
    fake = _Cuda()
    for name in ("stream", "Stream", "Event", "current_stream", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    return fake


@pytest.mark.parametrize("non_blocking", [True, False], ids=["pinned", "pageable"])
def test_copy_is_issued_on_the_stream_it_is_given(cuda, non_blocking):
    rt = CudaRuntime()
    copy_stream = object()
    src = torch.arange(4)
    dst = _Dst(cuda)
    rt.copy(dst, src, copy_stream, non_blocking=non_blocking)
    assert dst.copies == [(copy_stream, src, non_blocking)]  # on the copy stream, not the current one
    assert cuda.log == [("enter", copy_stream), ("copy_", src, non_blocking), ("exit", copy_stream)]
    assert cuda.current == "default"  # and the current stream is the caller's again


def test_two_copies_on_two_streams_each_run_on_their_own(cuda):
    rt = CudaRuntime()
    first, second = object(), object()
    dst = _Dst(cuda)
    rt.copy(dst, "a", first, non_blocking=True)
    rt.copy(dst, "b", second, non_blocking=True)
    assert dst.copies == [(first, "a", True), (second, "b", True)]


def test_streams_events_and_synchronize_name_the_compute_device(cuda):
    rt = CudaRuntime()
    dev = torch.device("cuda", 1)  # not the current device: anything that drops it lands on cuda:0
    assert rt.new_stream(dev) == ("stream", (dev,), ())
    assert rt.current_stream(dev) == ("current", (dev,))
    rt.synchronize(dev)
    assert cuda.log[-1] == ("synchronize", (dev,), {})
    # copy-done / slot-free events are plain (cheap); only the tracker's timing events are timed
    assert rt.new_event() == ("event", (), (("enable_timing", False),))
    assert rt.new_event(timing=True) == ("event", (), (("enable_timing", True),))


def test_page_locking_registers_portable_memory_at_the_exact_size(monkeypatch):
    calls = []

    class _Cudart:
        def cudaHostRegister(self, ptr, nbytes, flags):
            calls.append(("register", ptr, nbytes, flags))
            return 0

        def cudaHostUnregister(self, ptr):
            calls.append(("unregister", ptr))
            return 712  # cudaErrorHostMemoryNotRegistered, say

    monkeypatch.setattr(torch.cuda, "cudart", lambda: _Cudart())
    rt = CudaRuntime()
    assert rt.host_register(0x1000, 8192) == 0
    assert rt.host_unregister(0x1000) == 712  # the error code comes back for the caller to report
    # cudaHostRegisterPortable (1): pinned for every CUDA context, as ComfyUI registers its pins
    assert calls == [("register", 0x1000, 8192, 1), ("unregister", 0x1000)]
