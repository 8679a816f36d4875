"""Graphs saved before the V3 conversion still load unchanged: every widget value lands on the same input.

Saved UI workflows store widget values by position; the front end assigns them to the node's widgets
in the order the server lists the inputs (``input_order``: required, then optional), one widget per
INT / FLOAT / BOOLEAN / STRING / COMBO input. The fixtures (tests/fixtures) were saved by ComfyUI
0.28's front end from the V1 nodes, before the conversion, together with the API prompts that front end
made from them (inputs by name). Here the positions are mapped through the V3 schemas and must give the
same prompts; tests/test_browser.py repeats the check with the real front end.
"""
import json
from pathlib import Path

import pytest

from wan22_blockswap.nodes import NODE_CLASS_MAPPINGS

FIXTURES = Path(__file__).resolve().parent / "fixtures"
V1_GRAPH = json.loads((FIXTURES / "v1_nodes_saved_graph.json").read_text())
OLD_EXAMPLES = FIXTURES / "examples_before_v3"
OLD_PROMPTS = json.loads((OLD_EXAMPLES / "api_prompts.json").read_text())["prompts"]
WIDGET_TYPES = {"INT", "FLOAT", "BOOLEAN", "STRING", "COMBO"}
# The original pack's ids plus the ones this pack added; all must stay registered.
ORIGINAL_IDS = {"wan22BlockSwap", "wan22BlockSwapLooperModels", "wan22BlockSwapSequencer", "wan22BlockSwapLooper"}


def widget_names(cls) -> list:
    """The node's widgets in the order the front end creates them."""
    types = cls.INPUT_TYPES()
    names = []
    for section in ("required", "optional"):
        for name, (typ, opts) in types.get(section, {}).items():
            if typ in WIDGET_TYPES and not opts.get("forceInput"):
                names.append(name)
                if opts.get("control_after_generate"):
                    names.append("control_after_generate")  # the front end's extra widget after a seed
    return names


def values_by_name(node) -> dict:
    names = widget_names(NODE_CLASS_MAPPINGS[node["type"]])
    values = node["widgets_values"]
    # a graph saved before an optional widget existed has fewer values: the rest take their defaults
    assert len(values) <= len(names), f"node {node['id']} ({node['type']}): {len(values)} values, {len(names)} widgets"
    return dict(zip(names, values))


def test_every_saved_node_id_is_still_registered():
    saved = {n["type"] for n in V1_GRAPH["workflow"]["nodes"]}
    assert saved == set(V1_GRAPH["object_info"]) == set(NODE_CLASS_MAPPINGS)
    assert ORIGINAL_IDS <= set(NODE_CLASS_MAPPINGS)
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        assert cls.GET_SCHEMA().node_id == node_id


# Optional inputs added after the V1 graph was recorded (appended, so saved widget values keep their places)
ADDED_SINCE_FIXTURE = {"dynamic_vram", "host_memory", "spill_folder", "on_oom"}
ADDED_CHOICES = {"vram_budget": {"adaptive"}}  # choices appended to a combo since the fixture


@pytest.mark.parametrize("node_id", sorted(V1_GRAPH["object_info"]))
def test_inputs_keep_names_order_types_defaults_and_ranges(node_id):
    """What the V1 server reported (recorded in the fixture) and what the V3 schema reports now: the
    same inputs in the same order with the same types, defaults, ranges and choices."""
    old = V1_GRAPH["object_info"][node_id]["input"]
    new = NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()
    file_lists = {"safetensors_model", "gguf_model"}  # depend on the machine's model folders
    for section in ("required", "optional"):
        before, now = list(old.get(section, {})), list(new.get(section, {}))
        # inputs added since the fixture was recorded come last, optional, and only the known ones
        assert now[:len(before)] == before, (node_id, section)
        assert set(now[len(before):]) <= (ADDED_SINCE_FIXTURE if section == "optional" else set()), (node_id, section)
        for name, (old_type, old_opts) in old.get(section, {}).items():
            new_type, new_opts = new[section][name]
            if isinstance(old_type, list):  # a V1 combo lists its choices in place of the type
                assert new_type == "COMBO", name
                # choices may be appended (saved values stay valid), only the known ones
                appended = new_opts["options"][len(old_type):]
                assert name in file_lists or (new_opts["options"][:len(old_type)] == old_type
                                              and set(appended) <= ADDED_CHOICES.get(name, set())), name
            else:
                assert new_type == old_type, name
            for key in ("default", "min", "max", "step"):
                assert new_opts.get(key) == old_opts.get(key), (name, key)
            assert new_opts.get("tooltip"), f"{node_id}.{name} lost its tooltip"
    assert set(new.get("hidden", {})) == set(old.get("hidden", {})) == {"unique_id"}
    cls = NODE_CLASS_MAPPINGS[node_id]
    assert list(cls.RETURN_TYPES) == V1_GRAPH["object_info"][node_id]["output"]
    assert list(cls.RETURN_NAMES) == V1_GRAPH["object_info"][node_id]["output_name"]
    assert all(cls.OUTPUT_TOOLTIPS)


def test_v1_saved_graph_values_land_on_the_same_inputs():
    prompt = V1_GRAPH["prompt"]
    nodes = V1_GRAPH["workflow"]["nodes"]
    assert len(nodes) == len(prompt) == 25
    for node in nodes:
        expected = prompt[str(node["id"])]
        assert expected["class_type"] == node["type"]
        assert values_by_name(node) == expected["inputs"], f"node {node['id']} ({node['type']})"


@pytest.mark.parametrize("name", sorted(OLD_PROMPTS))
def test_old_example_workflows_values_land_on_the_same_inputs(name):
    workflow = json.loads((OLD_EXAMPLES / name).read_text())
    prompt = OLD_PROMPTS[name]
    ours = [n for n in workflow["nodes"] if n["type"] in NODE_CLASS_MAPPINGS]
    assert ours
    for node in ours:
        expected = prompt[str(node["id"])]["inputs"]
        got = values_by_name(node)
        # the front end fills a widget the graph has no value for with its default (vram_budget)
        names = widget_names(NODE_CLASS_MAPPINGS[node["type"]])
        types = NODE_CLASS_MAPPINGS[node["type"]].INPUT_TYPES()
        for missing in names[len(node["widgets_values"]):]:
            if missing in ADDED_SINCE_FIXTURE:  # the recorded prompt predates it
                continue
            got[missing] = {**types["required"], **types.get("optional", {})}[missing][1]["default"]
        widgets = {k: v for k, v in expected.items() if not isinstance(v, list)}  # links are [node, slot]
        assert got == widgets, f"{name} node {node['id']}"
