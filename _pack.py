"""Import this folder as the package ``wan22_blockswap`` outside ComfyUI (demo, benchmarks, tests).

ComfyUI imports a custom node pack as a package, so the pack's modules use relative imports (a bare
``import utils`` would collide with ComfyUI's own ``utils`` package). Scripts run from a checkout
use this loader to get the same package context without installing anything.
"""
import importlib.util
import sys
from pathlib import Path

PACKAGE = "wan22_blockswap"
ROOT = Path(__file__).resolve().parent


def import_pack(name: str = PACKAGE):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
