"""Browser tier: the pack in ComfyUI's real web UI, as a user meets it.

A real ComfyUI (``COMFYUI_PATH``, run with that ComfyUI's Python) serves its pinned front end
(``comfyui-frontend-package``) on ``--cpu``; Debian's ``chromium``, driven by Python ``playwright`` through
``executable_path`` (playwright's own browser download is not used), opens it headless. The tests:

* load every example workflow: no missing pack nodes, no console errors from the pack, no overlapping
  nodes or groups at the sizes the front end gives the nodes, widget values unchanged;
* load graphs saved before the V3 conversion (tests/fixtures): every value lands on the same input;
* show the GGUF workflow's missing pack by its id when ComfyUI-GGUF is not installed;
* open every node's help page: found where the front end looks first, no 404, nothing wider than the panel;
* search the node library for "block swap", "offload", "low VRAM", "WAN 2.2";
* build a tiny graph, press Run, wait for the run to finish and read the swap node's readout from the
  page: the plan and the last run on the first two lines, every line within the node's width.

Screenshots go to ``browser_screenshots/`` in the checkout (or ``$WAN22BS_SCREENSHOTS``). Marked
``browser``; skipped unless COMFYUI_PATH is set and playwright and a chromium executable
(``$CHROMIUM``, else ``chromium`` on PATH) are present. Command: README, "Tests".
"""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.browser
# what is missing, in the order a user sets it up (the whole module is skipped)
if not os.environ.get("COMFYUI_PATH"):
    pytest.skip("set COMFYUI_PATH to a ComfyUI checkout", allow_module_level=True)
if not CHROMIUM:
    pytest.skip("needs a chromium executable (apt-get install chromium, or $CHROMIUM)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="needs Python playwright (pip install playwright)")

from wan22_blockswap.nodes import DISPLAY_NAMES, NODE_CLASS_MAPPINGS  # noqa: E402
from wan22_blockswap.readout import NODE_WIDTH  # noqa: E402
from test_comfyui_real import _link, wait_until_serving  # noqa: E402
from test_workflow_compat import ADDED_SINCE_FIXTURE  # noqa: E402

HELPERS = ROOT.parent / "shared" / "tools" / "comfyui" / "comfy_test_helpers"
FIXTURES = ROOT / "tests" / "fixtures"
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
SHOTS = Path(os.environ.get("WAN22BS_SCREENSHOTS", ROOT / "browser_screenshots"))
MODEL = "wan22bs_browser_t2v.safetensors"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Settings of a user who has started ComfyUI before: no tutorial or templates dialog; no minimap over
# the graph; text drawn at every zoom level, so whole-graph screenshots stay readable.
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "LiteGraph.Canvas.MinFontSizeForLOD": 0}
PACK_MARKERS = ("wan22", "blockswap", *NODE_CLASS_MAPPINGS)
TEXT_WIDGET = "$$node-text-preview"  # the front end's widget for a node's progress text


# ------------------------------------------------------------------------------------------ server
def _write_model(comfy: Path) -> None:
    from safetensors.torch import save_file

    from wan22_blockswap import tiny_wan

    path = comfy / "models" / "diffusion_models" / MODEL
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = tiny_wan.tiny_config("t2v", dim=128, num_heads=1, ffn_dim=256, num_layers=8, text_dim=4096)
    save_file({k: v.contiguous() for k, v in tiny_wan.WanModel(cfg).init_weights(7).state_dict().items()}, str(path))


def _get(base: str, path: str):
    with urllib.request.urlopen(base + path, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    comfy = Path(os.environ["COMFYUI_PATH"]).resolve()
    _link(comfy, ROOT, "wan22_blockswap")
    _link(comfy, HELPERS, "test_helpers")
    _write_model(comfy)
    tmp = tmp_path_factory.mktemp("browser_tier")
    (tmp / "user" / "default").mkdir(parents=True)
    (tmp / "user" / "default" / "comfy.settings.json").write_text(json.dumps(SETTINGS))
    # Only this pack, the test helpers and ComfyUI-GGUF (when installed): another copy of the pack in
    # custom_nodes would register the same node ids.
    packs = ["wan22_blockswap", "test_helpers"]
    packs += [p for p in ("ComfyUI-GGUF",) if (comfy / "custom_nodes" / p).is_dir()]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp / "server.log"
    cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
           "--output-directory", str(tmp / "output"), "--user-directory", str(tmp / "user"),
           "--database-url", "sqlite:///:memory:", "--disable-all-custom-nodes", "--whitelist-custom-nodes", *packs]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=comfy, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    text = wait_until_serving(proc, base, log)
    assert "IMPORT FAILED" not in text and "Error while calling comfy_entrypoint" not in text, text[-3000:]
    yield {"base": base, "log": log, "packs": packs}
    proc.terminate()
    proc.wait(timeout=30)


# ------------------------------------------------------------------------------------------ browser
class Page:
    """The open ComfyUI page, the console messages and failed requests seen since the last ``reset``."""

    def __init__(self, page, base):
        self.page, self.base = page, base
        self.console, self.failed, self.responses = [], [], []
        page.on("console", lambda m: self.console.append((m.type, m.text, (m.location or {}).get("url", ""))))
        page.on("pageerror", lambda e: self.console.append(("pageerror", str(e), getattr(e, "stack", "") or "")))
        page.on("response", self._response)

    def _response(self, r):
        self.responses.append((r.status, r.url))
        if r.status >= 400:
            self.failed.append((r.status, r.url))

    def reset(self):
        self.console.clear()
        self.failed.clear()
        self.responses.clear()

    def pack_errors(self):
        """Console errors and failed requests that concern this pack. Requests to other hosts (the
        front end asks the Comfy Registry about node packs) are left out: this machine is offline."""
        def ours(*texts):
            return any(m.lower() in t.lower() for t in texts for m in PACK_MARKERS)

        def offline(url):
            return not url.startswith(self.base)
        errors = [c for c in self.console if c[0] in ("error", "pageerror") and ours(c[1], c[2]) and not offline(c[2])]
        return errors + [f for f in self.failed if ours(f[1]) and not offline(f[1])]

    def js(self, code, arg=None):
        return self.page.evaluate(code, arg)

    def load(self, workflow):
        self.js("async (wf) => { await window.app.loadGraphData(wf); }", workflow)

    def frames(self, n=2):
        """Wait until the page has drawn ``n`` more frames (the canvas draws on animation frames)."""
        self.js("(n) => new Promise(done => { const step = k => k ? requestAnimationFrame(() => step(k - 1)) : done();"
                " step(n); })", n)

    def dismiss_overlays(self):
        """The missing-models notice (the example files are not on this machine) covers part of the graph."""
        for name in ("Dismiss",):
            button = self.page.get_by_role("button", name=name)
            if button.count():
                button.first.click()

    def screenshot(self, name, fit=True):
        if fit:
            self.js("() => window.app.extensionManager.command.execute('Comfy.Canvas.FitView')")
        self.frames(3)
        SHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SHOTS / f"{name}.png"))

    def select(self, node_id):
        """Select a node by clicking its title, as a user does. The page's first click on the canvas
        can go to focusing it, so the click is repeated until the canvas reports the selection."""
        for _attempt in range(3):
            self.page.mouse.click(*self.screen_xy(node_id, 40, -15))
            try:
                self.page.wait_for_function("(id) => !!window.app.canvas.selected_nodes[id]", arg=node_id, timeout=3000)
                return
            except sync_api.TimeoutError:
                continue
        raise AssertionError(f"node {node_id} could not be selected")

    def screen_xy(self, node_id, dx, dy):
        """Page coordinates of a point given relative to a node's body (dy < 0: its title bar)."""
        return self.js("""([id, dx, dy]) => { const c = window.app.canvas, n = window.app.graph.getNodeById(id);
            const p = c.ds.convertOffsetToCanvas([n.pos[0] + dx, n.pos[1] + dy]);
            const r = c.canvas.getBoundingClientRect(); return [r.left + p[0], r.top + p[1]]; }""", [node_id, dx, dy])


@pytest.fixture(scope="module")
def ui(server, tmp_path_factory):
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium_profile")), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 2000, "height": 1200})
        page = Page(context.pages[0] if context.pages else context.new_page(), server["base"])
        page.page.goto(server["base"])
        page.page.wait_for_function(
            "() => window.app && window.app.graph && window.LiteGraph"
            " && window.LiteGraph.registered_node_types['wan22BlockSwap']",
            timeout=120000)
        yield page
        context.close()


@pytest.fixture
def clean(ui):
    ui.js("() => window.app.graph.clear()")
    ui.reset()
    yield ui
    external = sorted({url.split("?")[0] for _status, url in ui.failed if not url.startswith(ui.base)}
                      | {c[2].split("?")[0] for c in ui.console if c[2] and not c[2].startswith(ui.base)})
    if external:
        SHOTS.mkdir(parents=True, exist_ok=True)
        with open(SHOTS / "offline_requests.txt", "a") as f:
            f.write("\n".join(external) + "\n")
    assert not ui.pack_errors(), ui.pack_errors()


def _overlap(a, b):
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def _layout(ui):
    return ui.js("""() => ({
        nodes: window.app.graph._nodes.map(n => ({id: n.id, type: n.type, title: n.title,
            box: Array.from(n.getBounding()), registered: n.type in window.LiteGraph.registered_node_types})),
        groups: window.app.graph._groups.map(g => ({title: g.title, box: Array.from(g._bounding)}))})""")


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_example_workflow_loads_cleanly(clean, server, path):
    ui = clean
    workflow = json.loads(path.read_text())
    if any(n["type"] == "UnetLoaderGGUF" for n in workflow["nodes"]) and "ComfyUI-GGUF" not in server["packs"]:
        pytest.skip("needs ComfyUI-GGUF in custom_nodes (test_gguf_workflow_names_its_pack runs without it)")
    ui.load(workflow)
    layout = _layout(ui)
    missing = [n["type"] for n in layout["nodes"] if not n["registered"]]
    assert not missing, f"missing node types: {missing}"
    nodes = layout["nodes"]
    for i, a in enumerate(nodes):  # boxes as the front end sized them, title bars included
        for b in nodes[i + 1:]:
            assert not _overlap(a["box"], b["box"]), f"{a['title']} overlaps {b['title']}: {a['box']} {b['box']}"
    groups = layout["groups"]
    for i, a in enumerate(groups):
        for b in groups[i + 1:]:
            assert not _overlap(a["box"], b["box"]), f"groups {a['title']} and {b['title']} overlap"
    for n in nodes:
        inside = [g for g in groups if _overlap(n["box"], g["box"])]
        assert len(inside) <= 1, f"{n['title']} straddles {[g['title'] for g in inside]}"
    saved = {n["id"]: n["widgets_values"] for n in workflow["nodes"]}
    now = {n["id"]: n.get("widgets_values") for n in ui.js("() => window.app.graph.serialize().nodes")}
    for node_id, values in saved.items():
        assert now[node_id] == values, f"node {node_id}: {values} became {now[node_id]}"
    ui.dismiss_overlays()
    ui.screenshot(f"workflow_{path.stem}")


def test_gguf_workflow_names_its_pack(clean):
    """Without ComfyUI-GGUF the front end lists its nodes under the pack id they carry: "comfyui-gguf",
    not "Unknown pack" (as the workflow shipped before did). Where ComfyUI-GGUF is installed its node
    type is unregistered in the page for this test and registered again after it."""
    ui = clean
    had = ui.js("""() => { window.__wan22bs_gguf = window.LiteGraph.registered_node_types['UnetLoaderGGUF'];
                          if (window.__wan22bs_gguf) window.LiteGraph.unregisterNodeType('UnetLoaderGGUF');
                          return !!window.__wan22bs_gguf; }""")
    try:
        shown = {}
        for name, path in (("now", ROOT / "workflows" / "wan22_a14b_t2v_gguf_blockswap.json"),
                           ("before", FIXTURES / "examples_before_v3" / "wan22_a14b_t2v_gguf_blockswap.json")):
            ui.js("() => window.app.graph.clear()")
            ui.load(json.loads(path.read_text()))
            ui.page.get_by_role("button", name=re.compile("Show missing|See errors|View", re.I)).first.click()
            ui.page.get_by_text(re.compile("Missing Node Packs")).first.wait_for(timeout=20000)
            shown[name] = ui.js("() => document.body.innerText")
            if name == "now":
                ui.screenshot("missing_pack_comfyui_gguf", fit=False)
            ui.page.get_by_role("button", name="Toggle properties panel").click()
        assert re.search(r"comfyui-gguf \(2\)", shown["now"]) and "Unknown pack" not in shown["now"]
        assert "Unknown pack" in shown["before"]  # what users saw: the check can tell the difference
    finally:
        if had:
            ui.js("() => window.LiteGraph.registerNodeType('UnetLoaderGGUF', window.__wan22bs_gguf)")


def test_graphs_saved_before_v3_load_unchanged(clean):
    """Graphs the V1 nodes saved (the fixtures' UI workflows) give the same API prompts in the V3 front
    end: every widget value lands on the input it was saved for."""
    ui = clean
    v1 = json.loads((FIXTURES / "v1_nodes_saved_graph.json").read_text())
    cases = [("v1 graph", v1["workflow"], v1["prompt"])]
    prompts = json.loads((FIXTURES / "examples_before_v3" / "api_prompts.json").read_text())["prompts"]
    cases += [(n, json.loads((FIXTURES / "examples_before_v3" / n).read_text()), p) for n, p in prompts.items()]
    for name, workflow, expected in cases:
        ui.js("() => window.app.graph.clear()")
        ui.load(workflow)
        prompt = ui.js("async () => (await window.app.graphToPrompt()).output")
        ours = [k for k, v in expected.items() if v["class_type"] in NODE_CLASS_MAPPINGS]
        assert ours, name
        for key in ours:
            assert prompt[key]["class_type"] == expected[key]["class_type"]
            got = dict(prompt[key]["inputs"])
            optional = NODE_CLASS_MAPPINGS[expected[key]["class_type"]].INPUT_TYPES().get("optional", {})
            for added in ADDED_SINCE_FIXTURE & set(got) - set(expected[key]["inputs"]):
                assert got.pop(added) == optional[added][1]["default"], f"{name}: node {key}: {added}"
            assert got == expected[key]["inputs"], f"{name}: node {key}"


@pytest.mark.parametrize("node_id", sorted(NODE_CLASS_MAPPINGS))
def test_help_page_is_found_first_try_and_fits_the_panel(clean, node_id):
    ui = clean
    nid = ui.js("(t) => { const n = window.LiteGraph.createNode(t); window.app.graph.add(n); n.pos = [100, 100]; "
                "window.app.canvas.ds.scale = 1; window.app.canvas.ds.offset = [100, 100]; "
                "window.app.canvas.setDirty(true, true); return n.id; }", node_id)
    ui.frames(3)
    ui.select(nid)
    info = ui.page.get_by_test_id("info-button")  # in the toolbox over the selected node
    info.wait_for(state="visible", timeout=20000)
    ui.frames(3)
    # force: the toolbox follows the node on every canvas frame, so Playwright may never see it "stable"
    info.click(force=True)
    title = DISPLAY_NAMES[node_id] if node_id != "wan22BlockSwapLooper" else DISPLAY_NAMES["WAN22BlockSwapLooper"]
    heading = ui.page.locator(".markdown-content h1").filter(has_text=title).first
    heading.wait_for(timeout=20000)
    docs = [(status, url) for status, url in ui.responses if "/docs/" in url]
    assert docs and docs[0] == (200, f"{ui.base}/extensions/wan22_blockswap/docs/{node_id}/en.md"), docs
    fit = ui.js("""() => { const c = document.querySelector('.markdown-content'); const r = c.getBoundingClientRect();
        const wide = Array.from(c.querySelectorAll('*')).filter(e => e.getBoundingClientRect().right > r.right + 1)
            .map(e => e.tagName + ': ' + e.textContent.slice(0, 40));
        return {client: c.clientWidth, scroll: c.scrollWidth, wide: wide}; }""")
    assert fit["scroll"] <= fit["client"] + 1 and not fit["wide"], fit
    if node_id == "wan22BlockSwap":
        ui.screenshot("help_wan22BlockSwap", fit=False)
    ui.page.get_by_role("button", name="Toggle properties panel").click()


def test_node_library_search_finds_the_family(clean):
    ui = clean
    ui.page.get_by_role("button", name=re.compile("Node Library")).click()
    box = ui.page.get_by_placeholder(re.compile("Search", re.I)).first
    listed = {name for nid, name in DISPLAY_NAMES.items() if not NODE_CLASS_MAPPINGS[nid].DEPRECATED}
    for query in ("block swap", "blockswap", "offload", "low VRAM", "WAN 2.2"):
        box.fill(query)
        try:  # the list updates as the search runs: wait until it shows all of the family
            ui.page.wait_for_function("""(names) => { const lines = document.body.innerText.split('\\n').map(l => l.trim());
                return names.every(n => lines.includes(n)); }""", arg=sorted(listed), timeout=10000)
        except sync_api.TimeoutError:
            pass  # the assertion below says which names are missing
        text = ui.js("() => document.body.innerText")
        found = {name for name in listed if name in [line.strip() for line in text.splitlines()]}
        assert found == listed, f"{query!r}: {sorted(listed - found)} not found"
        if query == "offload":
            assert "KSampler (Advanced)" not in text  # the list is the search result, not the whole library
    ui.screenshot("node_library_search", fit=False)
    ui.page.get_by_role("button", name=re.compile("Node Library")).click()


def test_run_a_tiny_graph_and_read_the_readout(clean, server):
    """Build UNETLoader -> WAN BlockSwap -> KSampler on a tiny WAN model, press Run, and read what the
    swap node shows: at its default size, the plan and the last run are the first two lines, visible,
    and no line is wider than the node."""
    ui = clean
    ids = ui.js("""(model) => {
      const G = window.app.graph, L = window.LiteGraph;
      const add = (type, pos, vals) => { const n = L.createNode(type); G.add(n); n.pos = pos;
         for (const [k, v] of Object.entries(vals || {})) n.widgets.find(w => w.name === k).value = v; return n; };
      const unet = add('UNETLoader', [0, 0], {unet_name: model});
      const swap = add('wan22BlockSwap', [340, 0], {blocks_to_swap: 4});
      const pos = add('TinyWanTextEmbeds', [0, 420], {});
      const neg = add('ConditioningZeroOut', [420, 420], {});
      const lat = add('TinyEmptyVideoLatent', [0, 640], {});
      const ks = add('KSampler', [700, 0], {steps: 2, seed: 1, control_after_generate: 'fixed'});
      const stats = add('TinyLatentStats', [1040, 0], {});
      unet.connect(0, swap, 0); swap.connect(0, ks, 0); pos.connect(0, ks, 1); pos.connect(0, neg, 0);
      neg.connect(0, ks, 2); lat.connect(0, ks, 3); ks.connect(0, stats, 0);
      window.app.canvas.ds.scale = 1; window.app.canvas.ds.offset = [60, 120]; window.app.canvas.setDirty(true, true);
      return {swap: swap.id, width: swap.size[0]};
    }""", MODEL)
    ui.page.get_by_test_id("queue-button").click()  # the Run button
    # the readout after the run starts with the plan and has the run's line ("Run: ...")
    ui.page.wait_for_function("""([id, name]) => { const n = window.app.graph.getNodeById(id);
        const w = n.widgets && n.widgets.find(w => w.name === name); return w && /\\nRun: /.test(String(w.value)); }""",
                              arg=[ids["swap"], TEXT_WIDGET], timeout=300000)
    history = _get(server["base"], "/history")
    assert history and all(h["status"]["status_str"] == "success" for h in history.values()), history
    value = ui.js("([id, name]) => window.app.graph.getNodeById(id).widgets.find(w => w.name === name).value",
                  [ids["swap"], TEXT_WIDGET])
    ui.page.wait_for_function("""(text) => Array.from(document.querySelectorAll('.dom-widget'))
        .some(e => e.innerText.trim() === text.trim())""", arg=value, timeout=20000)
    # the text as the page shows it, with the size of its box and of each rendered line
    ui.screenshot("run_tiny_graph_readout", fit=False)
    shown = ui.js("""(text) => {
        const box = Array.from(document.querySelectorAll('.dom-widget')).find(e => e.innerText.trim() === text.trim());
        if (!box) return null;
        const span = box.querySelector('span') || box;
        const nodes = Array.from(span.childNodes).filter(n => n.nodeType === 3);
        const lines = nodes.map(t => { const r = document.createRange(); r.selectNodeContents(t);
            const rects = Array.from(r.getClientRects());
            return {text: t.textContent, rows: new Set(rects.map(x => Math.round(x.top))).size,
                    bottom: Math.max(...rects.map(x => x.bottom))}; });
        const b = box.getBoundingClientRect();
        return {text: box.innerText, lines: lines, bottom: b.bottom, width: b.width};
    }""", value)
    assert shown, f"the readout {value!r} is not on the page"
    lines = shown["text"].strip().splitlines()
    assert lines[0].startswith("Plan: 4/8 blocks streamed") and lines[1].startswith("Run: "), lines
    assert all(len(line) <= NODE_WIDTH for line in lines), lines
    assert [l["text"] for l in shown["lines"]] == lines
    wrapped = [l["text"] for l in shown["lines"] if l["rows"] > 1]
    assert not wrapped, f"lines wider than the node at its default width ({ids['width']:.0f} px): {wrapped}"
    # visible: the line box may reach into the box's bottom padding by a pixel or two (its glyphs end
    # 2 px above the line box's bottom at the front end's 12 px / 16 px line height)
    assert shown["lines"][1]["bottom"] <= shown["bottom"] + 2, "the run's line is not visible at the default size"


ADVANCED = ("offload_txt_emb", "offload_img_emb", "use_non_blocking", "vace_blocks_to_swap", "prefetch_blocks",
            "block_swap_debug", "wan_version", "model_variant", "weight_dtype")


@pytest.fixture
def nodes2(clean):
    """The front end's Nodes 2.0 view (Vue-rendered nodes), which folds advanced inputs away."""
    clean.js("async () => { await window.app.extensionManager.setting.set('Comfy.VueNodes.Enabled', true); }")
    yield clean
    clean.js("async () => { await window.app.extensionManager.setting.set('Comfy.VueNodes.Enabled', false); }")


def test_nodes2_view_folds_the_advanced_inputs_and_keeps_the_layout(nodes2, server):
    ui = nodes2
    ids = ui.js("""() => ['wan22BlockSwap', 'WAN22BlockSwapLoader'].map((t, i) => {
        const n = window.LiteGraph.createNode(t); window.app.graph.add(n); n.pos = [100 + 500 * i, 100];
        return n.id; })""")
    texts = {}
    for nid in ids:
        el = ui.page.locator(f'[data-node-id="{nid}"]')
        el.get_by_text("vram_budget").first.wait_for(timeout=20000)  # widgets render after the node's frame
        texts[nid] = el.inner_text()
    swap, loader = (texts[i] for i in ids)
    for text, shown in ((swap, ("blocks_to_swap", "vram_budget")),
                        (loader, ("model_type", "safetensors_model", "gguf_model", "fp8_optimization",
                                  "blocks_to_swap", "vram_budget"))):
        assert all(name in text for name in shown) and "Show advanced inputs" in text, text
        assert not [name for name in ADVANCED if name in text], text
    ui.screenshot("nodes2_advanced_folded", fit=False)
    for path in WORKFLOWS:
        workflow = json.loads(path.read_text())
        if any(n["type"] == "UnetLoaderGGUF" for n in workflow["nodes"]) and "ComfyUI-GGUF" not in server["packs"]:
            continue
        ui.js("() => window.app.graph.clear()")
        ui.load(workflow)
        count = len(workflow["nodes"])
        ui.page.wait_for_function("(n) => document.querySelectorAll('[data-node-id]').length === n", arg=count,
                                  timeout=20000)
        boxes = ui.js("""() => Array.from(document.querySelectorAll('[data-node-id]')).map(e => {
            const r = e.getBoundingClientRect();
            return [e.innerText.split('\\n')[0], [r.left, r.top, r.width, r.height]]; })""")
        for i, (name_a, a) in enumerate(boxes):
            for name_b, b in boxes[i + 1:]:
                assert not _overlap(a, b), f"{path.name} (Nodes 2.0): {name_a} overlaps {name_b}"
        if path.stem == "wan22_a14b_t2v_highlow_blockswap":
            ui.dismiss_overlays()
            ui.screenshot(f"nodes2_workflow_{path.stem}")
