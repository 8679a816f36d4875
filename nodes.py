"""ComfyUI node classes: inputs, tooltips, validation; they call into the engine modules."""

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
