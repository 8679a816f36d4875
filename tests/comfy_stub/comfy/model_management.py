"""Device / memory management (subset of comfy/model_management.py).

Stub knobs (not in ComfyUI):
* ``STUB_TORCH_DEVICE`` -- what ``get_torch_device()`` returns (default cpu; a GPU test may set cuda).
* ``STUB_VRAM_BYTES`` -- None (default): the load device is treated as ComfyUI treats a CPU
  (VRAMState.DISABLED -> always a full load, no free_memory). An int: the load device is treated as a
  NORMAL_VRAM GPU with that many bytes; free memory = budget - sum of ``model_loaded_weight_memory``
  of all live models, and ``load_models_gpu`` / ``free_memory`` run ComfyUI's budget formulas.
  Set ``EXTRA_RESERVED_VRAM`` / ``MINIMUM_INFERENCE_BASE`` to 0 to make small budgets meaningful.
"""
import contextlib
import logging
import sys
import threading
import weakref

import torch

STUB_TORCH_DEVICE = torch.device("cpu")
STUB_VRAM_BYTES = None
EXTRA_RESERVED_VRAM = 400 * 1024 * 1024
MINIMUM_INFERENCE_BASE = 0.8 * 1024 ** 3
MIN_WEIGHT_MEMORY_RATIO = 0.4  # 0.0 on NVIDIA in ComfyUI
NUM_STREAMS = 0  # ComfyUI: 2 on NVIDIA/AMD (enters load()'s offload-buffer estimate), 0 on CPU
lowvram_available = True
current_loaded_models = []  # list[LoadedModel], newest first
_LIVE_MODELS = weakref.WeakSet()  # torch models seen by a ModelPatcher (for the fake free memory)
LORA_COMPUTE_DTYPES = {}


class InterruptProcessingException(BaseException):  # BaseException, as in ComfyUI
    pass


interrupt_processing_mutex = threading.RLock()
interrupt_processing = False


def interrupt_current_processing(value=True):
    global interrupt_processing
    with interrupt_processing_mutex:
        interrupt_processing = value


def processing_interrupted():
    with interrupt_processing_mutex:
        return interrupt_processing


def throw_exception_if_processing_interrupted():
    global interrupt_processing
    with interrupt_processing_mutex:
        if interrupt_processing:
            interrupt_processing = False  # consumed, as in ComfyUI
            raise InterruptProcessingException()


def get_torch_device():
    return STUB_TORCH_DEVICE


def get_all_torch_devices(exclude_current=False):
    return [] if exclude_current else [get_torch_device()]


def unet_offload_device():
    return torch.device("cpu")


def intermediate_device():
    return torch.device("cpu")


def intermediate_dtype():
    return torch.float32


def is_device_cpu(device):
    return torch.device(device).type == "cpu"


def is_device_cuda(device):
    return device is not None and torch.device(device).type == "cuda"


def _fake_gpu(device):
    return STUB_VRAM_BYTES is not None or not is_device_cpu(device)


def get_free_memory(dev=None, torch_free_too=False):
    if STUB_VRAM_BYTES is not None:
        free = max(0, STUB_VRAM_BYTES - sum(getattr(m, "model_loaded_weight_memory", 0) for m in list(_LIVE_MODELS)))
    elif dev is not None and torch.device(dev).type == "cuda":
        free = torch.cuda.mem_get_info(dev)[0]
    else:
        free = 64 * 1024 ** 3  # "RAM": large
    return (free, free) if torch_free_too else free


def module_size(module):
    return sum(t.nbytes for t in module.state_dict().values())


def extra_reserved_memory():
    return EXTRA_RESERVED_VRAM


def minimum_inference_memory():
    return MINIMUM_INFERENCE_BASE + extra_reserved_memory()


def lora_compute_dtype(device):
    """fp16 where ComfyUI's should_use_fp16 would say so (approximated: any CUDA device), else fp32."""
    if device not in LORA_COMPUTE_DTYPES:
        LORA_COMPUTE_DTYPES[device] = torch.float16 if is_device_cuda(device) else torch.float32
    return LORA_COMPUTE_DTYPES[device]


def device_supports_non_blocking(device):
    return is_device_cuda(device)


_OFFLOAD_STREAMS = {}


def current_stream(device):
    return torch.cuda.current_stream(device) if is_device_cuda(device) else None


def get_offload_stream(device):
    """ComfyUI's round robin of ``NUM_STREAMS`` offload streams per CUDA device (each new turn first
    waits for the current stream); None elsewhere, or with no offload streams (ComfyUI's CPU value)."""
    if not is_device_cuda(device) or NUM_STREAMS == 0:
        return None
    streams, turn = _OFFLOAD_STREAMS.setdefault(device, ([torch.cuda.Stream(device=device) for _ in range(NUM_STREAMS)], [0]))
    turn[0] = (turn[0] + 1) % len(streams)
    streams[turn[0]].wait_stream(current_stream(device))
    return streams[turn[0]]


def sync_stream(device, stream):
    if stream is not None and current_stream(device) is not None:
        current_stream(device).wait_stream(stream)


def cast_to(weight, dtype=None, device=None, non_blocking=False, copy=False, stream=None, r=None):
    """No copy when nothing changes and copy=False; otherwise a new tensor (or ``r``) on device/dtype,
    allocated and copied on ``stream`` when one is given (a CUDA stream)."""
    if device is None or weight.device == torch.device(device):
        if not copy and (dtype is None or weight.dtype == dtype):
            return weight
        return weight.to(dtype=dtype, copy=copy)
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        if r is None:
            r = torch.empty_like(weight, dtype=dtype, device=device)
        r.copy_(weight, non_blocking=non_blocking)
    return r


def cast_to_device(tensor, device, dtype, copy=False):
    return cast_to(tensor, dtype=dtype, device=device, non_blocking=device_supports_non_blocking(device), copy=copy)


def pin_memory(tensor):  # the stub never pins (ComfyUI: cudaHostRegister on NVIDIA/AMD)
    return False


def unpin_memory(tensor):
    return False


def soft_empty_cache(force=False):
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cleanup_models():
    for i in [i for i, m in enumerate(current_loaded_models) if m.real_model() is None][::-1]:
        current_loaded_models.pop(i)


class LoadedModel:
    """A weakref to a ModelPatcher; when a clone dies, it switches to the clone's parent."""

    def __init__(self, model):
        self._patcher_finalizer = None
        self._set_model(model)
        self.device = model.load_device
        self.real_model = None
        self.currently_used = True
        self.model_finalizer = None

    def _set_model(self, model):
        self._model = weakref.ref(model)
        if model.parent is not None:
            self._parent_model = weakref.ref(model.parent)
            self._patcher_finalizer = weakref.finalize(model, self._switch_parent)
            self._patcher_finalizer.atexit = False

    def _switch_parent(self):
        model = self._parent_model()
        if model is not None:
            self._set_model(model)
            self.device = model.load_device

    @property
    def model(self):
        return self._model()

    def model_memory(self):
        return self.model.model_size()

    def model_loaded_memory(self):
        return self.model.loaded_size()

    def model_offloaded_memory(self):
        return self.model.model_size() - self.model.loaded_size()

    def model_memory_required(self, device):
        if device == self.model.current_loaded_device():
            return self.model_offloaded_memory()
        return self.model_memory()

    def model_load(self, lowvram_model_memory=0, force_patch_weights=False):
        self.model.model_patches_to(self.device)
        self.model.model_patches_to(self.model.model_dtype())
        self.model_use_more_vram(lowvram_model_memory or 1e32, force_patch_weights=force_patch_weights)
        real_model = self.model.model
        self.real_model = weakref.ref(real_model)
        self.model_finalizer = weakref.finalize(real_model, cleanup_models)
        self.model_finalizer.atexit = False
        return real_model

    def model_use_more_vram(self, extra_memory, force_patch_weights=False):
        return self.model.partially_load(self.device, extra_memory, force_patch_weights=force_patch_weights)

    def model_unload(self, memory_to_free=None, unpatch_weights=True):
        if memory_to_free is not None and memory_to_free < self.model.loaded_size():
            if self.model.partially_unload(self.model.offload_device, memory_to_free) >= memory_to_free:
                return False
        self.model.detach(unpatch_weights)
        self.model_finalizer.detach()
        self.model_finalizer, self.real_model = None, None
        return True

    def is_dead(self):
        return self.real_model is not None and self.real_model() is not None and self.model is None

    def __eq__(self, other):
        return self.model is other.model

    def __del__(self):
        if self._patcher_finalizer is not None:
            self._patcher_finalizer.detach()


def free_memory(memory_required, device, keep_loaded=[], for_dynamic=False, pins_required=0, ram_required=0):
    """Unloads (fully or partially) models on ``device``, most offloaded first, until enough is free."""
    can_unload, unloaded = [], []
    for i in range(len(current_loaded_models) - 1, -1, -1):
        lm = current_loaded_models[i]
        if (device is None or lm.device == device) and lm not in keep_loaded and not lm.is_dead():
            can_unload.append((-lm.model_offloaded_memory(), sys.getrefcount(lm.model), lm.model_memory(), i))
            lm.currently_used = False
    for *_, i in sorted(can_unload):
        to_free = 0 if device is None else memory_required - get_free_memory(device)
        if to_free > 0 and current_loaded_models[i].model_unload(to_free):
            unloaded.append(i)
    out = [current_loaded_models.pop(i) for i in sorted(unloaded, reverse=True)]
    if out:
        soft_empty_cache()
    return out


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                    force_full_load=False):
    inference_memory = minimum_inference_memory()
    extra_mem = max(inference_memory, memory_required + extra_reserved_memory())
    if minimum_memory_required is None:
        minimum_memory_required = extra_mem
    else:
        minimum_memory_required = max(inference_memory, minimum_memory_required + extra_reserved_memory())

    unique = {}
    for m in models:  # order-preserving dedup, plus models referenced by patches (``.models()``)
        unique[m] = None
        for mm in m.model_patches_models():
            unique[mm] = None
    models = list(unique)[::-1]

    models_to_load = []
    for x in models:
        loaded = LoadedModel(x)
        if loaded in current_loaded_models:
            loaded = current_loaded_models[current_loaded_models.index(loaded)]
            loaded.currently_used = True
        else:
            logging.info(f"Requested to load {x.model.__class__.__name__}")
        models_to_load.append(loaded)

    # Every entry whose patcher shares the torch model (clones AND the very same patcher) is dropped
    # and detached without unpatching: weights stay where they are, ON_DETACH(unpatch_all=False) fires.
    for loaded in models_to_load:
        for i in [i for i, c in enumerate(current_loaded_models) if loaded.model.is_clone(c.model)][::-1]:
            old = current_loaded_models.pop(i)
            old.model.detach(unpatch_all=False)
            old.model_finalizer.detach()

    required = {}
    for loaded in models_to_load:
        required[loaded.device] = required.get(loaded.device, 0) + loaded.model_memory_required(loaded.device)
    for device, total in required.items():
        if _fake_gpu(device):
            free_memory(total * 1.1 + extra_mem, device)
            if get_free_memory(device) < minimum_memory_required:
                free_memory(minimum_memory_required, device)

    for loaded in models_to_load:
        dev = loaded.model.load_device
        lowvram_model_memory = 0
        if _fake_gpu(dev) and lowvram_available and not force_full_load:  # NORMAL_VRAM
            loaded_memory = loaded.model_loaded_memory()
            free = get_free_memory(dev) + loaded_memory
            lowvram_model_memory = max(0, free - minimum_memory_required,
                                       min(free * MIN_WEIGHT_MEMORY_RATIO, free - minimum_inference_memory()))
            lowvram_model_memory -= loaded_memory
            if lowvram_model_memory == 0:
                lowvram_model_memory = 0.1
        loaded.model_load(lowvram_model_memory, force_patch_weights=force_patch_weights)
        current_loaded_models.insert(0, loaded)


def load_model_gpu(model):
    return load_models_gpu([model])


def loaded_models(only_currently_used=False):
    return [m.model for m in current_loaded_models if m.currently_used or not only_currently_used]


def unload_all_models():
    for device in get_all_torch_devices():
        free_memory(1e30, device)


# ------------------------------------------------------------------ dtype choice
# ComfyUI's decisions in the same order (tests/test_stub_conformance.py checks them against a real
# ComfyUI on a grid of inputs); none of its --fp*-unet / --force-fp16 flags. What a device can do
# is asked from should_use_fp16 / should_use_bf16 / supports_fp8_compute, which answer as ComfyUI
# does for a CPU; a test stands in for a GPU by replacing them (in the real ComfyUI too).
PRIORITIZE_FP16 = False
FLOAT8_TYPES = [getattr(torch, name) for name in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2",
                                                  "float8_e5m2fnuz", "float8_e8m0fnu") if hasattr(torch, name)]


def _on_cpu(device):
    return is_device_cpu(get_torch_device() if device is None else device)


def should_use_fp16(device=None, model_params=0, prioritize_performance=True, manual_cast=False):
    return not _on_cpu(device) and torch.cuda.is_available()


def should_use_bf16(device=None, model_params=0, prioritize_performance=True, manual_cast=False):
    return not _on_cpu(device) and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def supports_fp8_compute(device=None):
    return not _on_cpu(device) and torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 9)


def get_total_memory(dev=None, torch_total_too=False):
    dev = get_torch_device() if dev is None else torch.device(dev)
    if dev.type == "cuda":
        total = torch.cuda.mem_get_info(dev)[1]
    else:
        import psutil

        total = psutil.virtual_memory().total
    return (total, total) if torch_total_too else total


def maximum_vram_for_weights(device=None):
    return get_total_memory(device) * 0.88 - minimum_inference_memory()


def unet_dtype(device=None, model_params=0, supported_dtypes=(torch.float16, torch.bfloat16, torch.float32),
               weight_dtype=None):
    """The dtype weights are stored in. fp8 files stay fp8 where the device computes in fp8 or the
    weights would not fit twice over in fp16; then fp16 for fp16 files; then the first of
    ``supported_dtypes`` the device runs natively, then one it runs with manual casting; fp32."""
    if model_params < 0:
        model_params = 10 ** 21
    if weight_dtype in FLOAT8_TYPES and (supports_fp8_compute(device)
                                         or model_params * 2 > maximum_vram_for_weights(device)):
        return weight_dtype
    if ((PRIORITIZE_FP16 or weight_dtype == torch.float16) and torch.float16 in supported_dtypes
            and should_use_fp16(device=device, model_params=model_params)):
        return torch.float16
    for manual_cast in (False, True):
        for dt in supported_dtypes:
            if dt == torch.float16 and should_use_fp16(device=device, model_params=model_params, manual_cast=manual_cast):
                return torch.float16
            if dt == torch.bfloat16 and should_use_bf16(device, model_params=model_params, manual_cast=manual_cast):
                return torch.bfloat16
    return torch.float32


def unet_manual_cast(weight_dtype, inference_device, supported_dtypes=(torch.float16, torch.bfloat16, torch.float32)):
    """None when ``inference_device`` computes in ``weight_dtype``; else the dtype it computes in."""
    if weight_dtype in (torch.float32, torch.float64):
        return None
    if weight_dtype == torch.float16 and should_use_fp16(inference_device, prioritize_performance=False):
        return None
    bf16_ok = should_use_bf16(inference_device)
    if weight_dtype == torch.bfloat16 and bf16_ok:
        return None
    fp16_ok = should_use_fp16(inference_device, prioritize_performance=True)
    if PRIORITIZE_FP16 and fp16_ok and torch.float16 in supported_dtypes:
        return torch.float16
    for dt in supported_dtypes:
        if dt == torch.float16 and fp16_ok:
            return torch.float16
        if dt == torch.bfloat16 and bf16_ok:
            return torch.bfloat16
    return torch.float32
