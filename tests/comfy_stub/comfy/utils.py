"""Attribute helpers, seeds, copies, file loading and a progress bar (subset of comfy/utils.py)."""
import torch

ATTR_UNSET = {}
PROGRESS_BAR_HOOK = None


def resolve_attr(obj, attr):
    *path, name = attr.split(".")
    for p in path:
        obj = getattr(obj, p)
    return obj, name


def set_attr(obj, attr, value):
    """Sets a dotted attribute and returns the previous value (ATTR_UNSET if there was none;
    setting ATTR_UNSET deletes the attribute)."""
    obj, name = resolve_attr(obj, attr)
    prev = getattr(obj, name, ATTR_UNSET)
    if value is ATTR_UNSET:
        delattr(obj, name)
    else:
        setattr(obj, name, value)
    return prev


def set_attr_param(obj, attr, value):
    """Replaces a parameter by a new ``nn.Parameter(value, requires_grad=False)`` (new object)."""
    if not torch.is_inference_mode_enabled() and value.is_inference():
        value = value.clone()
    return set_attr(obj, attr, torch.nn.Parameter(value, requires_grad=False))


def copy_to_param(obj, attr, value):
    """In-place update: the Parameter object stays, its data is overwritten."""
    obj, name = resolve_attr(obj, attr)
    getattr(obj, name).data.copy_(value)


def get_attr(obj, attr: str):
    for name in attr.split("."):
        obj = getattr(obj, name)
    return obj


def string_to_seed(data):
    """CRC-32 (reflected, poly 0xEDB88320) over the characters' code points, as ComfyUI."""
    crc = 0xFFFFFFFF
    for ch in data:
        crc ^= ord(ch) if isinstance(ch, str) else ch
        for _ in range(8):
            crc = (crc >> 1) ^ 0xEDB88320 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


def deepcopy_list_dict(obj, memo=None):
    """Copies dicts and lists recursively (aliasing preserved via memo); other objects are shared."""
    memo = {} if memo is None else memo
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, dict):
        res = {deepcopy_list_dict(k, memo): deepcopy_list_dict(v, memo) for k, v in obj.items()}
    elif isinstance(obj, list):
        res = [deepcopy_list_dict(v, memo) for v in obj]
    else:
        res = obj
    memo[id(obj)] = res
    return res


def load_torch_file(ckpt, safe_load=False, device=None, return_metadata=False):
    """.safetensors (with metadata) or a torch pickle; simplified (no mmap tricks)."""
    metadata = None
    if str(ckpt).lower().endswith((".safetensors", ".sft")):
        from safetensors import safe_open
        with safe_open(str(ckpt), framework="pt", device=str(device or "cpu")) as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata()
    else:
        sd = torch.load(ckpt, map_location=device or "cpu", weights_only=True)
        sd = sd.get("state_dict", sd)
    return (sd, metadata) if return_metadata else sd


def set_progress_bar_global_hook(function):
    global PROGRESS_BAR_HOOK
    PROGRESS_BAR_HOOK = function


class ProgressBar:
    """Calls ``PROGRESS_BAR_HOOK(value, total, preview, node_id=...)`` on every update (no throttling)."""

    def __init__(self, total, node_id=None):
        self.total, self.current, self.node_id, self.hook = total, 0, node_id, PROGRESS_BAR_HOOK

    def update_absolute(self, value, total=None, preview=None):
        if total is not None:
            self.total = total
        self.current = min(value, self.total)
        if self.hook is not None:
            self.hook(self.current, self.total, preview, node_id=self.node_id)

    def update(self, value):
        self.update_absolute(self.current + value)
