"""Example workflows open without missing nodes and with widget values the node definitions accept."""
import json
import os
from pathlib import Path

import pytest

from wan22_blockswap.nodes import NODE_CLASS_MAPPINGS

WORKFLOWS = sorted((Path(__file__).resolve().parents[1] / "workflows").glob("*.json"))
# Core ComfyUI node ids the examples use (checked against a real ComfyUI in the COMFYUI_PATH tier)
CORE = {"UNETLoader", "CLIPLoader", "CLIPTextEncode", "EmptyHunyuanLatentVideo", "VAELoader", "VAEDecode",
        "ModelSamplingSD3", "KSampler", "KSamplerAdvanced", "SaveAnimatedWEBP", "Note"}
# Nodes of other packs the README names
OTHER_PACKS = {"UnetLoaderGGUF": "ComfyUI-GGUF (city96)"}
WIDGET_TYPES = {"INT": int, "FLOAT": (int, float), "BOOLEAN": bool, "STRING": str}


def _widget_inputs(cls, optional=False):
    types = cls.INPUT_TYPES()
    spec = {**types["required"], **(types.get("optional", {}) if optional else {})}
    return [(name, s) for name, s in spec.items() if s[0] == "COMBO" or s[0] in WIDGET_TYPES]


def test_there_are_example_workflows():
    names = {p.name for p in WORKFLOWS}
    assert {"wan21_14b_t2v_blockswap.json", "wan22_a14b_t2v_highlow_blockswap.json",
            "wan22_a14b_t2v_gguf_blockswap.json", "wan22_a14b_t2v_gguf_pack_loader.json"} <= names


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_nodes_exist_and_widgets_match(path):
    wf = json.loads(path.read_text())
    nodes = {n["id"]: n for n in wf["nodes"]}
    for n in wf["nodes"]:
        assert n["type"] in CORE | set(NODE_CLASS_MAPPINGS) | set(OTHER_PACKS), n["type"]
        if n["type"] in NODE_CLASS_MAPPINGS:
            cls = NODE_CLASS_MAPPINGS[n["type"]]
            widgets = _widget_inputs(cls, optional=True)
            values = n["widgets_values"]
            # graphs saved before an optional widget existed lack its (trailing) value: both load
            assert len(values) in (len(_widget_inputs(cls)), len(widgets)), f"{path.name} node {n['id']}: widget count"
            for (name, (typ, opts)), v in zip(widgets, values):
                if typ == "COMBO":  # file lists depend on the user's folders
                    assert isinstance(v, str) and (name.endswith("_model") or v in opts["options"]), f"{name}={v!r}"
                    continue
                assert isinstance(v, WIDGET_TYPES[typ]), f"{name}={v!r}"
                if "min" in opts:
                    assert opts["min"] <= v <= opts["max"], f"{name}={v} out of range"
    for link_id, src, src_slot, dst, dst_slot, typ in wf["links"]:
        assert nodes[src]["outputs"][src_slot]["type"] == typ
        assert link_id in nodes[src]["outputs"][src_slot]["links"]
        assert nodes[dst]["inputs"][dst_slot]["link"] == link_id
        assert nodes[dst]["inputs"][dst_slot]["type"] == typ
    for n in wf["nodes"]:  # every input of a real node is connected
        for inp in n.get("inputs", []):
            assert inp["link"] is not None, f"{path.name}: {n['type']}.{inp['name']} unconnected"


def test_readme_names_the_other_packs():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for pack in OTHER_PACKS.values():
        assert pack.split(" ")[0] in readme


@pytest.mark.comfyui
@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="set COMFYUI_PATH to a ComfyUI checkout")
def test_core_nodes_exist_in_real_comfyui(comfy_nodes):
    for name in CORE - {"Note"}:  # Note is a front-end-only node
        assert name in comfy_nodes, name
