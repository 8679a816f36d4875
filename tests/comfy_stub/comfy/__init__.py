"""A small, faithful stand-in for the parts of ComfyUI (v0.28) that the WAN block-swap pack touches.

Put ``tests/comfy_stub`` on ``sys.path`` (after the pack has been registered as ``wan22_blockswap``,
or let ``comfy.ldm.wan.model`` register it through ``_pack.py``), then ``import comfy.model_patcher``,
``from server import PromptServer`` etc. Pure torch, CPU by default. Written against the real source
(``/work/comfyui``, notes in ``/work/notes/comfy_facts.md``); no ComfyUI code is copied.

Faithful (same names, signatures, order of effects):
* ``patcher_extension``: CallbacksMP / WrappersMP values, key-grouped registries, WrapperExecutor
  (``wrapper(executor, *args, **kwargs)``, ``executor.class_obj``), copy/merge_nested_dicts.
* ``model_patcher.ModelPatcher``: attributes; clone() (shares the torch model, ``backup`` and
  ``object_patches_backup``; copies patches, object_patches, callbacks/wrappers; keeps patches_uuid;
  deep-copies model_options with deepcopy_list_dict; attachments' on_model_patcher_clone; ON_CLONE);
  add_patches; object patches (applied by patch_model on every partially_load, backed up once,
  reverted by every unpatch_model); _load_list's leaf rule and tuple shape; load()'s budget /
  lowvram / LowVramPatch / comfy_patched_weights logic, full-load accounting (= model_size()) and
  ON_LOAD args; patch_weight_to_device's backup-once rule and dtype path; partially_load's
  patches_uuid logic and the early return (no ON_LOAD) for an already fully loaded model;
  detach / __del__ -> ON_DETACH(unpatch_all); pre_run / cleanup / prepare_state callbacks;
  ``model_patches_to`` (calls ``.to(device)`` AND ``.to(dtype)`` on patch objects and stores the result).
* ``model_management``: current_loaded_models, LoadedModel (weakref, parent switch), load_models_gpu
  incl. the clone rule (every loaded entry whose patcher shares the torch model -- including the very
  same patcher -- is popped and ``detach(unpatch_all=False)``'d before loading), the lowvram budget
  formula, free_memory ordering, unload_all_models -> detach(True), interrupt flag
  (InterruptProcessingException is a BaseException; throwing clears the flag).
* ``lora.calculate_weight`` (diff / set / model_as_lora / nested lists / adapters, strength and
  strength_model semantics, in-place), ``LoRAAdapter`` maths, ``float.stochastic_rounding`` for
  fp32/fp16/bf16, ``utils`` helpers (set_attr returns the previous value, set_attr_param makes a NEW
  Parameter, string_to_seed is ComfyUI's CRC-32).
* ``ops``: Linear / Conv3d / LayerNorm / RMSNorm cast only when ``comfy_cast_weights`` or weight
  functions are set; every op call checks the interrupt flag.
* ``model_base.WAN21.apply_model`` -> APPLY_MODEL wrappers -> ``_apply_model`` -> WanModel.forward
  (module __call__, so forward hooks fire) -> DIFFUSION_MODEL wrappers (class_obj = WanModel; args
  ``x, timestep, context, clip_fea, time_dim_concat, transformer_options, **kwargs``) -> tiny forward
  with ``patches_replace["dit"][("double_block", i)]`` handling.

Simplified / missing (see each module's docstring):
* Devices: ``get_torch_device()`` is ``STUB_TORCH_DEVICE`` (cpu). With the default
  ``STUB_VRAM_BYTES = None`` every load is a full load (ComfyUI's CPU behaviour: ON_LOAD gets
  ``(device, 1e32, False, True)``); set it to an int to simulate a NORMAL_VRAM GPU budget. No pinning,
  streams, cast buffers, dynamic VRAM (ModelPatcherDynamic), hooks, injections, additional models,
  multigpu, quantized ops, weight_wrapper_patches, manual_cast dtypes. partially_unload has no
  offload-buffer accounting. lora_compute_dtype: fp16 on CUDA, fp32 otherwise.
* ``LoRAAdapter(loaded_keys, weights)`` lives in comfy.lora (ComfyUI: comfy.weight_adapter.lora);
  ``LoRAAdapter.from_up_down(up, down, alpha)`` is a stub convenience. No LoCon mid / DoRA / reshape.
* fp8 stochastic rounding is a seeded ulp-noise + round-to-nearest, not ComfyUI's exact routine.
* ``sd.load_diffusion_model_state_dict`` builds the pack's ``tiny_wan`` model (see comfy/sd.py).
* ``sample.sample``: Euler + "simple" sigmas whatever the names; cond and uncond run as ONE batched
  apply_model (as ComfyUI does on CPU); OUTER_SAMPLE / PREPARE_SAMPLING wrappers only; no latent
  format scaling, masks, hooks or control; the tiny forward shallow-copies transformer_options (real
  WAN writes grid_sizes / block_index into the dict it receives).
* ``server.PromptServer.instance`` records ``send_progress_text`` calls in ``progress_texts``.
"""
