"""Example workflows open without missing nodes, with widget values the node definitions accept, laid out
without overlaps, naming the files users download. (tests/test_browser.py loads them in ComfyUI's real
front end and measures the layout there.)"""
import json
import os
from pathlib import Path

import pytest

from wan22_blockswap.nodes import NODE_CLASS_MAPPINGS

WORKFLOWS = sorted((Path(__file__).resolve().parents[1] / "workflows").glob("*.json"))
# Core ComfyUI node ids the examples use (checked against a real ComfyUI in the COMFYUI_PATH tier)
CORE = {"UNETLoader", "CLIPLoader", "CLIPTextEncode", "EmptyHunyuanLatentVideo", "VAELoader", "VAEDecode",
        "ModelSamplingSD3", "KSampler", "KSamplerAdvanced", "SaveAnimatedWEBP"}
FRONTEND_ONLY = {"Note", "MarkdownNote"}  # nodes of the front end itself
# Nodes of other packs the README names, and the pack id the front end's missing-pack panel shows
OTHER_PACKS = {"UnetLoaderGGUF": "ComfyUI-GGUF (city96)"}
PACK_IDS = {"UnetLoaderGGUF": "comfyui-gguf"}
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
        assert n["type"] in CORE | FRONTEND_ONLY | set(NODE_CLASS_MAPPINGS) | set(OTHER_PACKS), n["type"]
        if n["type"] in NODE_CLASS_MAPPINGS:
            cls = NODE_CLASS_MAPPINGS[n["type"]]
            widgets = _widget_inputs(cls, optional=True)
            values = n["widgets_values"]
            # graphs saved before optional widgets existed lack their (trailing) values: they load with defaults
            assert len(_widget_inputs(cls)) <= len(values) <= len(widgets), f"{path.name} node {n['id']}: widget count"
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
    for name in CORE:
        assert name in comfy_nodes, name


# Files users download, exactly as Comfy-Org's repackaged repositories and QuantStack's GGUF repository
# name them (the front end offers these addresses when a file is missing).
DOWNLOADS = {
    "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors": "Comfy-Org/Wan_2.2_ComfyUI_Repackaged/resolve/main/split_files/diffusion_models/",
    "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors": "Comfy-Org/Wan_2.2_ComfyUI_Repackaged/resolve/main/split_files/diffusion_models/",
    "wan2.1_t2v_14B_fp8_scaled.safetensors": "Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files/diffusion_models/",
    "umt5_xxl_fp8_e4m3fn_scaled.safetensors": "Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files/text_encoders/",
    "wan_2.1_vae.safetensors": "Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files/vae/",
    "Wan2.2-T2V-A14B-HighNoise-Q4_K_M.gguf": "QuantStack/Wan2.2-T2V-A14B-GGUF/resolve/main/HighNoise/",
    "Wan2.2-T2V-A14B-LowNoise-Q4_K_M.gguf": "QuantStack/Wan2.2-T2V-A14B-GGUF/resolve/main/LowNoise/",
}
FILE_WIDGETS = {"UNETLoader": "unet_name", "UnetLoaderGGUF": "unet_name", "CLIPLoader": "clip_name",
                "VAELoader": "vae_name", "WAN22BlockSwapLoader": None, "WANModelLoader": None}


def _file_values(node):
    if node["type"] in ("WAN22BlockSwapLoader", "WANModelLoader"):
        kind, st, gguf = node["widgets_values"][:3]
        return [st if kind == "safetensors" else gguf]
    return [node["widgets_values"][0]]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_model_files_are_named_as_users_download_them(path):
    wf = json.loads(path.read_text())
    for n in wf["nodes"]:
        if n["type"] not in FILE_WIDGETS:
            continue
        models = {m["name"]: m for m in n["properties"].get("models", [])}
        for value in _file_values(n):
            assert value in DOWNLOADS, f"{path.name}: {n['type']} loads {value!r}, not a file users download"
            m = models.get(value)
            assert m, f"{path.name}: node {n['id']} has no download entry for {value}"
            assert m["url"] == "https://huggingface.co/" + DOWNLOADS[value] + value
            assert m["directory"] in ("diffusion_models", "text_encoders", "vae")
            # the note names every file the graph loads, with its folder
            notes = " ".join(x["widgets_values"][0] for x in wf["nodes"] if x["type"] in FRONTEND_ONLY)
            assert value in notes and f"models/{m['directory']}/" in notes, f"{path.name}: the note misses {value}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_every_node_names_its_pack(path):
    """The front end's missing-pack panel names a pack by the node's ``cnr_id`` ("Unknown pack" without)."""
    for n in json.loads(path.read_text())["nodes"]:
        if n["type"] in FRONTEND_ONLY:
            continue
        expected = ("wan22-blockswap" if n["type"] in NODE_CLASS_MAPPINGS else PACK_IDS.get(n["type"], "comfy-core"))
        assert n["properties"].get("cnr_id") == expected, f"{path.name}: {n['type']} {n['properties']}"


def _min_height(node) -> int:
    """The body height LiteGraph's computeSize gives a node (front end 1.45): 20 px per row of slots,
    24 px per widget, 14 px of margins (6 without widgets). Checked against the real front end by
    tests/test_browser.py."""
    slots = max(len([i for i in node.get("inputs", [])]), len(node.get("outputs", [])))
    if node["type"] in NODE_CLASS_MAPPINGS:
        widgets = len(_widget_inputs(NODE_CLASS_MAPPINGS[node["type"]], optional=True))
    else:
        widgets = len(node["widgets_values"])
    return slots * 20 + widgets * 24 + (14 if widgets else 6)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_layout_has_no_overlaps_and_room_for_every_widget(path):
    wf = json.loads(path.read_text())
    boxes = []
    for n in wf["nodes"]:
        x, y = n["pos"]
        w, h = n["size"]
        if n["type"] not in FRONTEND_ONLY:
            assert h >= _min_height(n), f"{path.name}: {n.get('title', n['type'])} is {h} px tall, needs {_min_height(n)}"
        boxes.append((n.get("title", n["type"]), (x, y - 30, w, h + 30)))  # the title bar is above pos

    def overlap(a, b):
        return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]

    for i, (name_a, a) in enumerate(boxes):
        for name_b, b in boxes[i + 1:]:
            assert not overlap(a, b), f"{path.name}: {name_a} overlaps {name_b}"
    groups = [(g["title"], g["bounding"]) for g in wf["groups"]]
    assert groups, "groups explain the layout"
    for i, (name_a, a) in enumerate(groups):
        for name_b, b in groups[i + 1:]:
            assert not overlap(a, b), f"{path.name}: groups {name_a} and {name_b} overlap"
    for name, box in boxes:  # a node is in one group entirely, or outside all of them
        inside = [g for g, gb in groups if overlap(box, gb)]
        assert len(inside) <= 1, f"{path.name}: {name} straddles {inside}"
        for g, gb in groups:
            if g in inside:
                assert gb[0] <= box[0] and box[0] + box[2] <= gb[0] + gb[2] and gb[1] <= box[1] \
                    and box[1] + box[3] <= gb[1] + gb[3], f"{path.name}: {name} sticks out of group {g}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_note_explains_dynamic_vram_without_telling_users_to_turn_it_off(path):
    wf = json.loads(path.read_text())
    notes = " ".join(x["widgets_values"][0] for x in wf["nodes"] if x["type"] in FRONTEND_ONLY)
    assert "Dynamic VRAM is on by default" in notes and "help page" in notes
    assert "--disable-dynamic-vram" not in notes
