"""The swap engine's parts, composed by ``block_manager.BlockSwapEngine`` (the engine's front door, one
level up): host masters, the device ring, the learned schedule, the tracker, the CUDA runtime, the
patch structures of LoRA in the slot. Pure torch: these modules import nothing from ComfyUI and, of the
pack's top level, only ``config`` and ``utils`` (``tests/test_layout.py`` checks it)."""
