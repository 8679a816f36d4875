"""ModelPatcher (classic, non-dynamic) -- mirrors comfy/model_patcher.py for the subset a block-swap
pack touches: clone semantics, weight/object patches, callbacks/wrappers/attachments, the load list,
load / partially_load / partially_unload / unpatch_model / detach and their callbacks.
Not implemented: hooks (apply_hooks returns {}), injections, additional_models, multigpu, pinning
(pin_memory always fails), weight_wrapper_patches, set_func/convert_func ops, ModelPatcherDynamic.
"""
import collections
import logging
import uuid

import torch

import comfy.float
import comfy.lora
import comfy.model_management
import comfy.patcher_extension
import comfy.utils
from comfy.patcher_extension import CallbacksMP, WrappersMP  # noqa: F401  (re-exported like ComfyUI)

LOWVRAM_PATCH_ESTIMATE_MATH_FACTOR = 2
Dimension = collections.namedtuple("Dimension", ["weight", "inplace_update"])  # a backup entry


def set_model_options_patch_replace(model_options, patch, name, block_name, number, transformer_index=None):
    """Copy-on-write of transformer_options / patches_replace / [name], then [(block_name, number)] = patch."""
    to = model_options["transformer_options"].copy()
    to["patches_replace"] = dict(to.get("patches_replace", {}))
    to["patches_replace"][name] = dict(to["patches_replace"].get(name, {}))
    block = (block_name, number) if transformer_index is None else (block_name, number, transformer_index)
    to["patches_replace"][name][block] = patch
    model_options["transformer_options"] = to
    return model_options


def create_model_options_clone(orig_model_options: dict):
    return comfy.patcher_extension.copy_nested_dicts(orig_model_options)


def wipe_lowvram_weight(m):
    if hasattr(m, "prev_comfy_cast_weights"):
        m.comfy_cast_weights = m.prev_comfy_cast_weights
        del m.prev_comfy_cast_weights
    if hasattr(m, "weight_function"):
        m.weight_function = []
    if hasattr(m, "bias_function"):
        m.bias_function = []


def move_weight_functions(m, device):
    if device is None:
        return 0
    return sum(f.move_to(device=device) for f in getattr(m, "weight_function", []) + getattr(m, "bias_function", [])
               if hasattr(f, "move_to"))


class LowVramPatch:
    """Applies ``patches[key]`` (looked up at call time) to a weight that ops cast for one forward."""
    is_lowvram_patch = True

    def __init__(self, key, patches, convert_func=None, set_func=None):
        self.key, self.patches, self.convert_func, self.set_func = key, patches, convert_func, set_func
        self.prepared_patches = None

    def __call__(self, weight):
        patches = self.prepared_patches if self.prepared_patches is not None else self.patches[self.key]
        return comfy.lora.calculate_weight(patches, weight, self.key, intermediate_dtype=weight.dtype)


def low_vram_patch_estimate_vram(model, key):
    weight = get_key_weight(model, key)[0]
    if weight is None:
        return 0
    dtype = getattr(model, "manual_cast_dtype", torch.float32) or weight.dtype
    return weight.numel() * dtype.itemsize * LOWVRAM_PATCH_ESTIMATE_MATH_FACTOR


def get_key_weight(model, key):
    """(weight, set_func, convert_func); the funcs are the op's ``set_<param>`` / ``convert_<param>``."""
    if "." not in key:
        return comfy.utils.get_attr(model, key), None, None
    op_path, param = key.rsplit(".", 1)
    op = comfy.utils.get_attr(model, op_path)
    return getattr(op, param), getattr(op, "set_" + param, None), getattr(op, "convert_" + param, None)


def key_param_name_to_key(key, param):
    return param if len(key) == 0 else "{}.{}".format(key, param)


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
        self.size = size
        self.model = model
        if getattr(self.model, "device", None) is None:
            self.model.device = offload_device
        self.patches = {}
        self.backup = {}
        self.backup_buffers = {}
        self.object_patches = {}
        self.object_patches_backup = {}
        self.weight_wrapper_patches = {}
        self.model_options = {"transformer_options": {}}
        self.load_device = load_device
        self.offload_device = offload_device
        self.weight_inplace_update = weight_inplace_update
        self.force_cast_weights = False
        self.patches_uuid = uuid.uuid4()
        self.parent = None
        self.pinned = set()
        self.attachments = {}
        self.additional_models = {}
        self.callbacks = CallbacksMP.init_callbacks()
        self.wrappers = WrappersMP.init_wrappers()
        self.injections = {}
        self.hook_patches = {}
        self.forced_hooks = self.current_hooks = None
        self.cached_patcher_init = None
        self.clone_base_uuid = uuid.uuid4()
        # These live on the torch model, so every clone sees (and changes) the same values.
        for attr, default in (("model_loaded_weight_memory", 0), ("lowvram_patch_counter", 0), ("model_lowvram", False),
                              ("current_weight_patches_uuid", None), ("model_offload_buffer_memory", 0)):
            if not hasattr(self.model, attr):
                setattr(self.model, attr, default)
        comfy.model_management._LIVE_MODELS.add(self.model)

    def is_dynamic(self):
        return False

    def model_size(self):
        if self.size > 0:
            return self.size
        self.size = comfy.model_management.module_size(self.model)
        return self.size

    def loaded_size(self):
        return self.model.model_loaded_weight_memory

    def lowvram_patch_counter(self):
        return self.model.lowvram_patch_counter

    def current_loaded_device(self):
        return self.model.device

    def get_free_memory(self, device):
        return comfy.model_management.get_free_memory(device)

    def model_dtype(self):
        if hasattr(self.model, "get_dtype"):
            return self.model.get_dtype()

    def memory_required(self, input_shape):
        return self.model.memory_required(input_shape=input_shape)

    # ------------------------------------------------------------------ cloning
    def get_clone_model_override(self):
        return self.model, (self.backup, self.backup_buffers, self.object_patches_backup, self.pinned)

    def clone(self, disable_dynamic=False, model_override=None, force_deepcopy=False):
        if force_deepcopy:
            raise NotImplementedError("stub: clone(force_deepcopy=True) (reloads from disk in ComfyUI)")
        class_ = self.__class__
        if self.is_dynamic() and disable_dynamic:
            # core: a classic delegate of a dynamic model, built by re-running the loader that made it
            class_ = ModelPatcher
            if model_override is None:
                if self.cached_patcher_init is None:
                    raise RuntimeError("Cannot create non-dynamic delegate: cached_patcher_init is not initialized.")
                temp = self.cached_patcher_init[0](*self.cached_patcher_init[1], disable_dynamic=True)
                if len(self.cached_patcher_init) > 2:
                    temp = temp[self.cached_patcher_init[2]]
                model_override = temp.get_clone_model_override()
        model_override = model_override or self.get_clone_model_override()
        n = class_(model_override[0], self.load_device, self.offload_device, self.model_size(),
                   weight_inplace_update=self.weight_inplace_update)
        n.patches = {k: v[:] for k, v in self.patches.items()}
        n.patches_uuid = self.patches_uuid  # same uuid: a clone with equal patches reuses loaded weights
        n.object_patches = self.object_patches.copy()
        n.weight_wrapper_patches = self.weight_wrapper_patches.copy()
        n.model_options = comfy.utils.deepcopy_list_dict(self.model_options)
        n.parent = self
        n.force_cast_weights = self.force_cast_weights
        n.backup, n.backup_buffers, n.object_patches_backup, n.pinned = model_override[1]  # shared
        n.attachments = {k: a.on_model_patcher_clone() if hasattr(a, "on_model_patcher_clone") else a
                         for k, a in self.attachments.items()}
        n.callbacks = {t: {k: fns.copy() for k, fns in d.items()} for t, d in self.callbacks.items()}
        n.wrappers = {t: {k: fns.copy() for k, fns in d.items()} for t, d in self.wrappers.items()}
        n.cached_patcher_init = self.cached_patcher_init
        n.clone_base_uuid = self.clone_base_uuid
        for callback in self.get_all_callbacks(CallbacksMP.ON_CLONE):
            callback(self, n)
        return n

    def is_clone(self, other):
        return hasattr(other, "model") and self.model is other.model

    # ------------------------------------------------------------------ options / objects / patches
    def set_model_patch(self, patch, name):
        to = self.model_options["transformer_options"]
        to.setdefault("patches", {})
        to["patches"][name] = to["patches"].get(name, []) + [patch]

    def set_model_patch_replace(self, patch, name, block_name, number, transformer_index=None):
        self.model_options = set_model_options_patch_replace(self.model_options, patch, name, block_name, number,
                                                             transformer_index=transformer_index)

    def set_model_unet_function_wrapper(self, unet_wrapper_function):
        self.model_options["model_function_wrapper"] = unet_wrapper_function

    def add_object_patch(self, name, obj):
        self.object_patches[name] = obj

    def get_model_object(self, name):
        if name in self.object_patches:
            return self.object_patches[name]
        if name in self.object_patches_backup:
            return self.object_patches_backup[name]
        return comfy.utils.get_attr(self.model, name)

    def _patch_objects(self):
        """Entries of transformer_options["patches"] / ["patches_replace"] and model_function_wrapper."""
        to = self.model_options["transformer_options"]
        for lst in to.get("patches", {}).values():
            yield from ((lst, i) for i in range(len(lst)))
        for d in to.get("patches_replace", {}).values():
            yield from ((d, k) for k in list(d))
        if "model_function_wrapper" in self.model_options:
            yield self.model_options, "model_function_wrapper"

    def model_patches_to(self, device):
        """Calls ``.to(device)`` (device, or a dtype!) on patch objects that have it and STORES THE RESULT."""
        for container, k in self._patch_objects():
            if hasattr(container[k], "to"):
                container[k] = container[k].to(device)

    def model_patches_models(self):
        return [m for c, k in self._patch_objects() if hasattr(c[k], "models") for m in c[k].models()]

    def model_patches_call_function(self, function_name="cleanup", arguments={}):
        for c, k in self._patch_objects():
            if hasattr(c[k], function_name):
                getattr(c[k], function_name)(**arguments)

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        """Keys may be "key" or (key, offset[, function]); only keys of model.state_dict() are kept."""
        model_sd = self.model.state_dict()
        added = set()
        for k in patches:
            key, offset, function = (k, None, None) if isinstance(k, str) else (k[0], k[1], k[2] if len(k) > 2 else None)
            if key in model_sd:
                added.add(k)
                self.patches.setdefault(key, []).append((strength_patch, patches[k], strength_model, offset, function))
        self.patches_uuid = uuid.uuid4()
        return list(added)

    def model_state_dict(self, filter_prefix=None):
        sd = self.model.state_dict()
        return {k: v for k, v in sd.items() if filter_prefix is None or k.startswith(filter_prefix)}

    # ------------------------------------------------------------------ weights
    def patch_weight_to_device(self, key, device_to=None, inplace_update=False, return_weight=False, force_cast=False):
        weight, set_func, convert_func = get_key_weight(self.model, key)
        if key not in self.patches and not force_cast:
            return weight
        inplace_update = self.weight_inplace_update or inplace_update
        if key not in self.backup and not return_weight:  # backup only once: the original survives re-patching
            self.backup[key] = Dimension(weight.to(device=self.offload_device, copy=inplace_update), inplace_update)
        temp_dtype = comfy.model_management.lora_compute_dtype(device_to) if key in self.patches else None
        if device_to is not None:
            temp = comfy.model_management.cast_to_device(weight, device_to, temp_dtype, copy=True)
        else:
            temp = weight.to(temp_dtype, copy=True)
        if convert_func is not None:
            temp = convert_func(temp, inplace=True)
        out = comfy.lora.calculate_weight(self.patches[key], temp, key) if key in self.patches else temp
        if set_func is not None:
            return set_func(out, inplace_update=inplace_update, seed=comfy.utils.string_to_seed(key), return_weight=return_weight)
        if key in self.patches:
            out = comfy.float.stochastic_rounding(out, weight.dtype, seed=comfy.utils.string_to_seed(key))
        if return_weight:
            return out
        if inplace_update:
            comfy.utils.copy_to_param(self.model, key, out)
        else:
            comfy.utils.set_attr_param(self.model, key, out)

    def pin_weight_to_device(self, key):
        if comfy.model_management.pin_memory(get_key_weight(self.model, key)[0]):
            self.pinned.add(key)

    def unpin_weight(self, key):
        if key in self.pinned:
            comfy.model_management.unpin_memory(get_key_weight(self.model, key)[0])
            self.pinned.remove(key)

    def unpin_all_weights(self):
        for key in list(self.pinned):
            self.unpin_weight(key)

    def _load_list(self, for_dynamic=False, default_device=None):
        """(module_offload_mem, module_mem, name, module, params) for every module that owns ALL of its
        parameters (leaf-like) and is an op or has params. Non-leaf modules with their own parameters
        (WAN's ``blocks.N.modulation``, ``head.modulation``) are never listed."""
        loading = []
        for n, m in self.model.named_modules():
            params = dict(m.named_parameters(recurse=False))
            if any(name not in params for name, _ in m.named_parameters(recurse=True)):
                continue
            if not (hasattr(m, "comfy_cast_weights") or params):
                continue
            module_mem = comfy.model_management.module_size(m)
            offload_mem = module_mem
            if hasattr(m, "comfy_cast_weights"):
                for key in ("{}.weight".format(n), "{}.bias".format(n)):
                    if key in self.patches:
                        offload_mem += low_vram_patch_estimate_vram(self.model, key)
            loading.append((offload_mem, module_mem, n, m, params))
        return loading

    def _add_lowvram_patches(self, m, n, force_patch_weights):
        """For a module left on the offload device: bake its patches now (force_patch_weights) or append
        a LowVramPatch to weight_function / bias_function. Returns the number of LowVramPatches."""
        count = 0
        for param, attr in (("weight", "weight_function"), ("bias", "bias_function")):
            key = "{}.{}".format(n, param)
            if key in self.patches:
                if force_patch_weights:
                    self.patch_weight_to_device(key)
                else:
                    setattr(m, attr, list(getattr(m, attr)) + [LowVramPatch(key, self.patches)])
                    count += 1
        return count

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
        mem_counter = patch_counter = lowvram_counter = offload_buffer = 0
        loading = self._load_list()
        loading.sort(reverse=True)  # largest offload cost first
        load_completely, offloaded = [], []
        for i, (offload_mem, module_mem, n, m, params) in enumerate(loading):
            nxt = loading[i + 1:i + 1 + comfy.model_management.NUM_STREAMS]
            potential_offload = max(offload_buffer, offload_mem + sum(x[1] for x in nxt))
            lowvram_fits = mem_counter + module_mem + potential_offload < lowvram_model_memory
            lowvram_weight = False
            if not full_load and hasattr(m, "comfy_cast_weights") and not lowvram_fits:
                offload_buffer, lowvram_weight = potential_offload, True
                lowvram_counter += 1
                if hasattr(m, "prev_comfy_cast_weights"):  # already lowvram'd
                    continue
            cast_weight = self.force_cast_weights
            m.comfy_force_cast_weights = self.force_cast_weights
            if lowvram_weight:
                m.weight_function, m.bias_function = [], []
                patch_counter += self._add_lowvram_patches(m, n, force_patch_weights)
                cast_weight = True
                offloaded.append((module_mem, n, m, params))
            else:
                if hasattr(m, "comfy_cast_weights"):
                    wipe_lowvram_weight(m)
                if full_load or lowvram_fits:
                    mem_counter += module_mem
                    load_completely.append((module_mem, n, m, params))
                else:
                    offload_buffer = potential_offload
            if cast_weight and hasattr(m, "comfy_cast_weights"):
                m.prev_comfy_cast_weights = m.comfy_cast_weights
                m.comfy_cast_weights = True
            mem_counter += move_weight_functions(m, device_to)

        load_completely.sort(reverse=True)
        for _, n, m, params in load_completely:
            if getattr(m, "comfy_patched_weights", False) is True:
                continue  # already patched (by this or another clone with the same weights)
            for param in params:
                key = key_param_name_to_key(n, param)
                self.unpin_weight(key)
                self.patch_weight_to_device(key, device_to=device_to)
            m.comfy_patched_weights = True
        for _, n, m, params in load_completely:
            m.to(device_to)
        for _, n, m, params in offloaded:
            for param in params:
                self.pin_weight_to_device(key_param_name_to_key(n, param))

        if lowvram_counter > 0:
            logging.info("loaded partially; %.2f MB loaded, lowvram patches: %d", mem_counter / 2 ** 20, patch_counter)
            self.model.model_lowvram = True
        else:
            logging.info("loaded completely; %.2f MB loaded, full load: %s", mem_counter / 2 ** 20, full_load)
            self.model.model_lowvram = False
            if full_load:
                self.model.to(device_to)  # also moves non-listed params (modulation) and buffers
                mem_counter = self.model_size()
        self.model.lowvram_patch_counter += patch_counter
        self.model.device = device_to
        self.model.model_loaded_weight_memory = mem_counter
        self.model.model_offload_buffer_memory = offload_buffer
        self.model.current_weight_patches_uuid = self.patches_uuid
        for callback in self.get_all_callbacks(CallbacksMP.ON_LOAD):
            callback(self, device_to, lowvram_model_memory, force_patch_weights, full_load)

    def patch_model(self, device_to=None, lowvram_model_memory=0, load_weights=True, force_patch_weights=False):
        for k, obj in self.object_patches.items():
            old = comfy.utils.set_attr(self.model, k, obj)
            if k not in self.object_patches_backup:  # the backup (shared by clones) keeps the ORIGINAL
                self.object_patches_backup[k] = old
        if load_weights:
            self.load(device_to, lowvram_model_memory=lowvram_model_memory, force_patch_weights=force_patch_weights,
                      full_load=lowvram_model_memory == 0)
        return self.model

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        if unpatch_weights:
            self.unpin_all_weights()
            if self.model.model_lowvram:
                for m in self.model.modules():
                    move_weight_functions(m, device_to)
                    wipe_lowvram_weight(m)
                self.model.model_lowvram = False
                self.model.lowvram_patch_counter = 0
            for k, bk in self.backup.items():
                if bk.inplace_update:
                    comfy.utils.copy_to_param(self.model, k, bk.weight)
                else:
                    comfy.utils.set_attr_param(self.model, k, bk.weight)
            self.model.current_weight_patches_uuid = None
            self.backup.clear()
            if device_to is not None:
                self.model.to(device_to)
                self.model.device = device_to
            self.model.model_loaded_weight_memory = 0
            self.model.model_offload_buffer_memory = 0
            for m in self.model.modules():
                if hasattr(m, "comfy_patched_weights"):
                    del m.comfy_patched_weights
        for k, old in self.object_patches_backup.items():  # always: object patches are reverted
            comfy.utils.set_attr(self.model, k, old)
        self.object_patches_backup.clear()

    def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):
        """Smallest modules first: patched modules go back to device_to in lowvram mode (backups
        restored, LowVramPatch added) until memory_to_free (+ offload-buffer growth) is freed."""
        memory_freed = patch_counter = 0
        unload_list = sorted(self._load_list())
        offload_buffer = self.model.model_offload_buffer_memory
        ns = comfy.model_management.NUM_STREAMS
        factor = [min(offload_buffer / (ns + 1), unload_list[0][1])] * ns if unload_list else []
        for offload_mem, module_mem, n, m, params in unload_list:
            if memory_to_free + offload_buffer - self.model.model_offload_buffer_memory < memory_freed:
                break
            if getattr(m, "comfy_patched_weights", False) is not True:
                continue
            lowvram_possible = hasattr(m, "comfy_cast_weights")
            keys = [key_param_name_to_key(n, p) for p in params]
            if not lowvram_possible and any(k in self.backup for k in keys):
                continue  # a patched module that cannot cast stays where it is
            for key in keys:
                bk = self.backup.pop(key, None)
                if bk is not None:
                    (comfy.utils.copy_to_param if bk.inplace_update else comfy.utils.set_attr_param)(self.model, key, bk.weight)
            m.to(device_to)
            if lowvram_possible:
                patch_counter += self._add_lowvram_patches(m, n, force_patch_weights)
                m.prev_comfy_cast_weights = m.comfy_cast_weights
                m.comfy_cast_weights = True
            m.comfy_patched_weights = False
            memory_freed += module_mem
            offload_buffer = max(offload_buffer, offload_mem + sum(factor))
            factor = (factor + [module_mem])[1:]
        self.model.model_lowvram = True
        self.model.lowvram_patch_counter += patch_counter
        self.model.model_loaded_weight_memory -= memory_freed
        self.model.model_offload_buffer_memory = offload_buffer
        return memory_freed

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        # Weights are only unpatched when the resident ones came from different patches.
        unpatch_weights = self.model.current_weight_patches_uuid is not None and \
            (self.model.current_weight_patches_uuid != self.patches_uuid or force_patch_weights)
        used = self.model.model_loaded_weight_memory
        self.unpatch_model(self.offload_device, unpatch_weights=unpatch_weights)
        if unpatch_weights:
            extra_memory += used - self.model.model_loaded_weight_memory
        self.patch_model(load_weights=False)  # re-apply THIS patcher's object patches
        if extra_memory < 0 and not unpatch_weights:
            self.partially_unload(self.offload_device, -extra_memory, force_patch_weights=force_patch_weights)
            return 0
        if self.model.model_lowvram is False and self.model.model_loaded_weight_memory > 0:
            return 0  # already fully loaded: no load(), no ON_LOAD
        full_load = self.model.model_loaded_weight_memory + extra_memory > self.model_size()
        current_used = self.model.model_loaded_weight_memory
        try:
            self.load(device_to, lowvram_model_memory=current_used + extra_memory,
                      force_patch_weights=force_patch_weights, full_load=full_load)
        except Exception:
            self.detach()
            raise
        return self.model.model_loaded_weight_memory - current_used

    def detach(self, unpatch_all=True):
        self.model_patches_to(self.offload_device)
        if unpatch_all:
            self.unpatch_model(self.offload_device, unpatch_weights=unpatch_all)
        for callback in self.get_all_callbacks(CallbacksMP.ON_DETACH):
            callback(self, unpatch_all)
        return self.model

    # ------------------------------------------------------------------ run lifecycle
    def pre_run(self):
        if hasattr(self.model, "current_patcher"):
            self.model.current_patcher = self
        for callback in self.get_all_callbacks(CallbacksMP.ON_PRE_RUN):
            callback(self)

    def prepare_state(self, timestep, model_options):
        for callback in self.get_all_callbacks(CallbacksMP.ON_PREPARE_STATE):
            callback(self, timestep, model_options)

    def apply_hooks(self, hooks=None, transformer_options=None, force_apply=False):
        return {}  # hooks are not implemented in the stub

    def cleanup(self):
        self.model_patches_call_function(function_name="cleanup")
        if hasattr(self.model, "current_patcher"):
            self.model.current_patcher = None
        for callback in self.get_all_callbacks(CallbacksMP.ON_CLEANUP):
            callback(self)

    # ------------------------------------------------------------------ callbacks / wrappers / attachments
    def add_callback(self, call_type, callback):
        self.add_callback_with_key(call_type, None, callback)

    def add_callback_with_key(self, call_type, key, callback):
        self.callbacks.setdefault(call_type, {}).setdefault(key, []).append(callback)

    def remove_callbacks_with_key(self, call_type, key):
        self.callbacks.get(call_type, {}).pop(key, None)

    def get_callbacks(self, call_type, key):
        return self.callbacks.get(call_type, {}).get(key, [])

    def get_all_callbacks(self, call_type):
        return [c for cs in self.callbacks.get(call_type, {}).values() for c in cs]

    def add_wrapper(self, wrapper_type, wrapper):
        self.add_wrapper_with_key(wrapper_type, None, wrapper)

    def add_wrapper_with_key(self, wrapper_type, key, wrapper):
        self.wrappers.setdefault(wrapper_type, {}).setdefault(key, []).append(wrapper)

    def remove_wrappers_with_key(self, wrapper_type, key):
        self.wrappers.get(wrapper_type, {}).pop(key, None)

    def get_wrappers(self, wrapper_type, key):
        return self.wrappers.get(wrapper_type, {}).get(key, [])

    def get_all_wrappers(self, wrapper_type):
        return [w for ws in self.wrappers.get(wrapper_type, {}).values() for w in ws]

    def set_attachments(self, key, attachment):
        self.attachments[key] = attachment

    def remove_attachments(self, key):
        self.attachments.pop(key, None)

    def get_attachment(self, key):
        return self.attachments.get(key, None)

    def __del__(self):
        # ComfyUI: unpin_all_weights() + detach(unpatch_all=False) -> ON_DETACH(False) on garbage collection.
        # Guarded here because module globals may already be gone at interpreter exit.
        try:
            self.unpin_all_weights()
            self.detach(unpatch_all=False)
        except Exception:
            pass


CoreModelPatcher = ModelPatcher
