"""WAN 2.2 BlockSwap: ComfyUI custom nodes that stream WAN transformer blocks from host RAM.

Exports the node mappings only. Importing the pack does no work beyond defining classes: no
ComfyUI imports at module level, no torch allocations, no logging configuration.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"  # web/docs/<node id>.md: the help page ComfyUI's front end shows per node

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
