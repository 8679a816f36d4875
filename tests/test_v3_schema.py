"""The V3 node API the pack uses, as ComfyUI 0.28 implements it.

By default ``comfy_api.latest`` is the stand-in in tests/comfy_stub; with COMFYUI_PATH it is ComfyUI's own
(see conftest.py). A probe node using every V3 feature the pack uses must report exactly what a real
ComfyUI 0.28 reported for it (tests/fixtures/v3_probe_node_info.json, recorded with
``record_probe()`` below under ComfyUI's Python): so the stand-in cannot drift from the real API, and
the real tier notices when ComfyUI changes it. Then the pack's own nodes run the way ComfyUI runs a V3
node: a per-execution class clone carrying the hidden ``unique_id``, ``EXECUTE_NORMALIZED``.
"""
import asyncio
import json
import sys
from pathlib import Path

import torch

from comfy_api.latest import ComfyExtension, io

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "v3_probe_node_info.json"


class Probe(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Wan22bsProbe", display_name="Probe", category="probe/sub", description="short",
            search_aliases=["alias one", "alias two"], is_deprecated=True,
            inputs=[io.Model.Input("model", tooltip="m"),
                    io.Int.Input("count", default=20, min=0, max=48, step=1, tooltip="n"),
                    io.Boolean.Input("flag", default=True, tooltip="b", advanced=True),
                    io.Int.Input("depth", default=1, min=0, max=40, step=1, tooltip="d", advanced=True),
                    io.Combo.Input("kind", options=["a", "b"], default="a", tooltip="k"),
                    io.Combo.Input("files", options=["none", "x.gguf"], tooltip="f"),
                    io.Custom("ANY").Input("items", tooltip="i"),
                    io.Combo.Input("later", options=["off", "on"], default="off", optional=True, tooltip="o"),
                    io.String.Input("folder", default="", optional=True, advanced=True, tooltip="s")],
            outputs=[io.Model.Output(tooltip="out"), io.Model.Output("second", tooltip="out 2"),
                     io.Custom("ANY").Output("listed", tooltip="out 3")],
            hidden=[io.Hidden.unique_id])

    @classmethod
    def execute(cls, **kwargs):
        return io.NodeOutput(cls.hidden.unique_id, kwargs)


def probe_info() -> dict:
    info = Probe.GET_NODE_INFO_V1()
    return json.loads(json.dumps(info))  # tuples -> lists, as /object_info sends it


def record_probe():  # pragma: no cover - run by hand under ComfyUI's Python with ComfyUI on sys.path
    FIXTURE.write_text(json.dumps(probe_info(), indent=1, sort_keys=True) + "\n")


def test_probe_node_info_is_what_comfyui_reports():
    expected = json.loads(FIXTURE.read_text())
    assert probe_info() == expected


def test_class_properties_come_from_the_schema():
    assert Probe.CATEGORY == "probe/sub" and Probe.DESCRIPTION == "short" and Probe.DEPRECATED is True
    assert list(Probe.RETURN_TYPES) == ["MODEL", "MODEL", "ANY"]
    assert list(Probe.RETURN_NAMES) == ["MODEL", "second", "listed"]
    assert list(Probe.OUTPUT_TOOLTIPS) == ["out", "out 2", "out 3"]
    assert Probe.FUNCTION == "EXECUTE_NORMALIZED"


def test_execution_clone_carries_the_hidden_node_id():
    clone = Probe.PREPARE_CLASS_CLONE({"hidden_inputs": {io.Hidden.unique_id: "12"}})
    out = getattr(clone, clone.FUNCTION)(count=3)
    assert isinstance(out, io.NodeOutput) and out[0] == "12" and out[1] == {"count": 3}
    assert Probe.hidden is None  # the class itself is left alone


def test_the_pack_registers_through_its_entry_point():
    import wan22_blockswap as pack
    from wan22_blockswap.nodes import NODE_CLASS_MAPPINGS

    extension = asyncio.run(pack.comfy_entrypoint())
    assert isinstance(extension, ComfyExtension)
    nodes = asyncio.run(extension.get_node_list())
    assert {cls.GET_SCHEMA().node_id: cls for cls in nodes} == NODE_CLASS_MAPPINGS


def test_importing_the_pack_does_not_import_the_nodes():
    """The demo and benchmarks import the pack outside ComfyUI: ``nodes`` (and ComfyUI's comfy_api)
    come in only through the entry point."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    code = ("import sys; sys.path.insert(0, %r); from _pack import import_pack; import_pack(); "
            "print('wan22_blockswap.nodes' in sys.modules, 'comfy_api' in sys.modules)" % str(root))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_a_node_runs_as_comfyui_runs_it(monkeypatch):
    """WAN22BlockSwap through the V3 execution path: the node id for its readout comes from the hidden
    input, the widgets arrive as keyword arguments."""
    from test_node import load

    from wan22_blockswap import callbacks
    from wan22_blockswap.callbacks import StreamedUnit
    from wan22_blockswap.nodes import WAN22BlockSwap

    texts = []
    monkeypatch.setattr(callbacks, "send_node_text", lambda node_id, text: texts.append(node_id))
    model = load()
    clone = WAN22BlockSwap.PREPARE_CLASS_CLONE({"hidden_inputs": {io.Hidden.unique_id: "31"}})
    out = getattr(clone, clone.FUNCTION)(model=model, blocks_to_swap=3, offload_txt_emb=False, offload_img_emb=False,
                                         use_non_blocking=True, vace_blocks_to_swap=0, prefetch_blocks=1,
                                         block_swap_debug=False)
    swapped = out[0]
    assert sorted(k for k, v in swapped.object_patches.items() if isinstance(v, StreamedUnit)) == [
        f"diffusion_model.blocks.{i}" for i in (5, 6, 7)]
    assert texts == ["31"]
    assert torch.is_tensor(swapped.model.diffusion_model.blocks[0].ffn[0].weight)
