"""``from comfy_api.latest import ComfyExtension, io``: the part of ComfyUI's V3 node API the pack uses.

In ComfyUI (v0.28) ``comfy_api/latest/__init__.py`` defines ``ComfyExtension`` (``on_load`` and the
abstract ``get_node_list``, both async) and exposes ``comfy_api/latest/_io.py`` as ``io``. A custom node
package's ``comfy_entrypoint()`` returns a ``ComfyExtension``; ComfyUI registers each class of
``get_node_list()`` under ``GET_SCHEMA().node_id`` and ``schema.display_name``.
"""
from abc import ABC, abstractmethod

from . import _io as io

IO = io


class ComfyExtension(ABC):
    async def on_load(self) -> None:
        """Called when the extension is loaded, before ``get_node_list``."""

    @abstractmethod
    async def get_node_list(self) -> list:
        """The node classes (``io.ComfyNode`` subclasses) of the extension."""


__all__ = ["ComfyExtension", "io", "IO"]
