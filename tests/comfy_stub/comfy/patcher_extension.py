"""Callback / wrapper registry (mirrors comfy/patcher_extension.py: same names, values, signatures)."""
from typing import Callable


class CallbacksMP:
    ON_CLONE = "on_clone"
    ON_DEEPCLONE_MULTIGPU = "on_deepclone_multigpu"
    ON_MATCH_MULTIGPU_CLONES = "on_match_multigpu_clones"
    ON_LOAD = "on_load_after"
    ON_DETACH = "on_detach_after"
    ON_CLEANUP = "on_cleanup"
    ON_PRE_RUN = "on_pre_run"
    ON_PREPARE_STATE = "on_prepare_state"
    ON_APPLY_HOOKS = "on_apply_hooks"
    ON_REGISTER_ALL_HOOK_PATCHES = "on_register_all_hook_patches"
    ON_INJECT_MODEL = "on_inject_model"
    ON_EJECT_MODEL = "on_eject_model"

    @classmethod
    def init_callbacks(cls):  # {"call_type": {key: [fn, ...]}}
        return {}


class WrappersMP:
    OUTER_SAMPLE = "outer_sample"
    PREPARE_SAMPLING = "prepare_sampling"
    SAMPLER_SAMPLE = "sampler_sample"
    PREDICT_NOISE = "predict_noise"
    CALC_COND_BATCH = "calc_cond_batch"
    APPLY_MODEL = "apply_model"
    DIFFUSION_MODEL = "diffusion_model"

    @classmethod
    def init_wrappers(cls):  # {"wrapper_type": {key: [fn, ...]}}
        return {}


def _options(transformer_options, is_model_options, create):
    if not is_model_options:
        return transformer_options
    if create:
        return transformer_options.setdefault("transformer_options", {})
    return transformer_options.get("transformer_options", {})


def _add(section, kind, key, fn, transformer_options, is_model_options):
    to = _options(transformer_options, is_model_options, True)
    to.setdefault(section, {}).setdefault(kind, {}).setdefault(key, []).append(fn)


def _get(section, kind, key, transformer_options, is_model_options):
    groups = _options(transformer_options, is_model_options, False).get(section, {}).get(kind, {})
    if key is not _ALL:
        return list(groups.get(key, []))
    return [fn for fns in groups.values() for fn in fns]


_ALL = object()


def add_callback(call_type: str, callback: Callable, transformer_options: dict, is_model_options=False):
    _add("callbacks", call_type, None, callback, transformer_options, is_model_options)


def add_callback_with_key(call_type: str, key: str, callback: Callable, transformer_options: dict, is_model_options=False):
    _add("callbacks", call_type, key, callback, transformer_options, is_model_options)


def get_callbacks_with_key(call_type: str, key: str, transformer_options: dict, is_model_options=False):
    return _get("callbacks", call_type, key, transformer_options, is_model_options)


def get_all_callbacks(call_type: str, transformer_options: dict, is_model_options=False):
    return _get("callbacks", call_type, _ALL, transformer_options, is_model_options)


def add_wrapper(wrapper_type: str, wrapper: Callable, transformer_options: dict, is_model_options=False):
    _add("wrappers", wrapper_type, None, wrapper, transformer_options, is_model_options)


def add_wrapper_with_key(wrapper_type: str, key: str, wrapper: Callable, transformer_options: dict, is_model_options=False):
    _add("wrappers", wrapper_type, key, wrapper, transformer_options, is_model_options)


def get_wrappers_with_key(wrapper_type: str, key: str, transformer_options: dict, is_model_options=False):
    return _get("wrappers", wrapper_type, key, transformer_options, is_model_options)


def get_all_wrappers(wrapper_type: str, transformer_options: dict, is_model_options=False):
    return _get("wrappers", wrapper_type, _ALL, transformer_options, is_model_options)


class WrapperExecutor:
    """Runs ``wrappers[idx](executor, *args, **kwargs)``; a wrapper calls ``executor(*args, **kwargs)`` to
    continue with the next wrapper, the last one reaching ``original``. ``class_obj`` is the object
    whose method is wrapped (the WanModel for DIFFUSION_MODEL, the BaseModel for APPLY_MODEL)."""

    def __init__(self, original: Callable, class_obj, wrappers: list, idx: int):
        self.original, self.class_obj, self.wrappers, self.idx = original, class_obj, list(wrappers), idx
        self.is_last = idx == len(wrappers)

    def __call__(self, *args, **kwargs):
        if self.idx + 1 > len(self.wrappers):
            raise Exception("Wrapper idx exceeded available wrappers; something went very wrong.")
        return type(self)(self.original, self.class_obj, self.wrappers, self.idx + 1).execute(*args, **kwargs)

    def execute(self, *args, **kwargs):
        """Starts the chain (for the code that owns the wrapped function, not for wrappers)."""
        if self.is_last:
            return self.original(*args, **kwargs)
        return self.wrappers[self.idx](self, *args, **kwargs)

    @classmethod
    def new_executor(cls, original: Callable, wrappers: list, idx=0):
        return cls(original, None, wrappers, idx)

    @classmethod
    def new_class_executor(cls, original: Callable, class_obj, wrappers: list, idx=0):
        return cls(original, class_obj, wrappers, idx)


class PatcherInjection:
    def __init__(self, inject: Callable, eject: Callable):
        self.inject, self.eject = inject, eject


def copy_nested_dicts(input_dict: dict):
    """Copies dicts recursively and lists one level (the list items are shared)."""
    out = input_dict.copy()
    for k, v in input_dict.items():
        if isinstance(v, dict):
            out[k] = copy_nested_dicts(v)
        elif isinstance(v, list):
            out[k] = v.copy()
    return out


def merge_nested_dicts(dict1: dict, dict2: dict, copy_dict1=True):
    """dict2 into dict1: dicts merged recursively, lists extended, other values replaced."""
    merged = copy_nested_dicts(dict1) if copy_dict1 else dict1
    for k, v in dict2.items():
        if isinstance(v, dict):
            merged[k] = merge_nested_dicts(merged.setdefault(k, {}), v)
        elif isinstance(v, list):
            merged.setdefault(k, []).extend(v)
        else:
            merged[k] = v
    return merged
