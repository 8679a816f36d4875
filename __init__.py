"""WAN 2.2 BlockSwap: ComfyUI custom nodes that stream WAN transformer blocks from host RAM.

ComfyUI (v0.28) loads a V3 node pack through ``comfy_entrypoint``: it awaits it, then registers the
classes of the returned extension's ``get_node_list()``. Importing the pack itself does no work:
``nodes`` (and with it ComfyUI's ``comfy_api``) is imported only when ComfyUI calls the entry point, so
the demo and the benchmarks import the pack outside ComfyUI. No torch allocations, no logging
configuration.
"""

WEB_DIRECTORY = "./web"  # web/docs/<node id>/en.md: the help page ComfyUI's front end shows per node


async def comfy_entrypoint():
    from .nodes import BlockSwapExtension

    return BlockSwapExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
