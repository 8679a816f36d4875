"""The tree draws the architecture, and the import arrows run one way:

* ``engine/`` (the parts ``block_manager.BlockSwapEngine`` composes) imports nothing from the pack's top
  level except ``config`` and ``utils``, nothing from ``formats/``, and nothing from ComfyUI;
* ``formats/`` (weight-file readers and checks) imports nothing from ``engine/`` and nothing from the
  pack's ComfyUI face (of the top level only ``config`` and ``utils``).

Every import counts, those inside functions too (the ComfyUI glue imports ComfyUI lazily, and a lazy
import is still an arrow). The checker is also run on made-up sources that break each rule, so it is
known to fail when it should.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALLOWED_TOP = {"config", "utils"}  # the design brief's shared modules, which both wings may use
COMFYUI = {"comfy", "comfy_api", "comfy_extras", "comfy_aimdo", "folder_paths", "server", "nodes", "execution",
           "comfy_execution", "latent_preview"}


def imports(source: str):
    """(level, module, names) of every import statement anywhere in ``source`` (functions included)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield 0, alias.name, ()
        elif isinstance(node, ast.ImportFrom):
            yield node.level, node.module or "", tuple(a.name for a in node.names)


def violations(source: str, wing: str):
    """The imports of a module in ``wing`` ("engine" or "formats") that break its rule."""
    other = {"engine": "formats", "formats": "engine"}[wing]
    bad = []
    for level, module, names in imports(source):
        if level == 0:
            root = module.split(".")[0]
            if wing == "engine" and root in COMFYUI:
                bad.append(f"import of ComfyUI's {module}")
            if root == "wan22_blockswap":
                bad.append(f"absolute import of the pack ({module})")
        elif level == 2:  # the pack's top level, or the other wing
            targets = [module.split(".")[0]] if module else list(names)
            for t in targets:
                if t == other:
                    bad.append(f"import from {other}/ ({'..' + module if module else t})")
                elif t not in ALLOWED_TOP:
                    bad.append(f"import from the top level's {t}")
        elif level > 2:
            bad.append(f"import from above the pack ({'.' * level}{module})")
    return bad


def _modules(wing):
    return sorted(p for p in (ROOT / wing).glob("*.py"))


@pytest.mark.parametrize("wing", ["engine", "formats"])
def test_the_wings_import_only_what_their_rule_allows(wing):
    found = {p.name: violations(p.read_text(), wing) for p in _modules(wing)}
    assert len(found) >= 5, found  # the wing holds its modules
    assert not {k: v for k, v in found.items() if v}, found


def test_the_top_level_is_the_comfyui_face_and_the_design_brief_modules():
    top = {p.stem for p in ROOT.glob("*.py")}
    engine = {p.stem for p in _modules("engine")} - {"__init__"}
    formats = {p.stem for p in _modules("formats")} - {"__init__"}
    assert {"host_masters", "device_ring", "swap_schedule", "swap_tracker", "cuda_runtime", "slot_patches"} <= engine
    assert {"safetensors_header", "gguf_header", "gguf_reader", "gguf_dequant", "weight_files", "quant_ops"} <= formats
    assert {"__init__", "nodes", "callbacks", "looper_helpers", "block_manager", "config", "utils", "preflight",
            "readout", "budget", "model_loader"} <= top
    assert not (top & (engine | formats))  # nothing left behind at the top level (no shims)


@pytest.mark.parametrize("wing, source, why", [
    ("engine", "def f():\n    import comfy.model_management as mm\n", "ComfyUI's comfy.model_management"),
    ("engine", "from ..callbacks import KEY\n", "top level's callbacks"),
    ("engine", "def f():\n    from ..formats.gguf_reader import GGUFTensor\n", "from formats/"),
    ("engine", "from .. import nodes\n", "top level's nodes"),
    ("formats", "def f():\n    from ..engine.host_masters import host_arena\n", "from engine/"),
    ("formats", "from ..preflight import preflight\n", "top level's preflight"),
    ("formats", "import wan22_blockswap.callbacks\n", "absolute import of the pack"),
])
def test_the_checker_finds_each_kind_of_wrong_arrow(wing, source, why):
    found = violations(source, wing)
    assert any(why in v for v in found), found


def test_allowed_arrows_pass_the_checker():
    ok = "from ..config import BlockSwapError\nfrom ..utils import get_logger\nfrom .host_masters import _Unit\nimport torch\n"
    assert violations(ok, "engine") == []
    assert violations("def f():\n    import comfy.ops\n" + ok.replace(".host_masters", ".gguf_reader"), "formats") == []
