"""Packaging: what the Comfy Registry, ComfyUI-Manager and ComfyUI's front end need, kept in step
with the code. Fast, offline, no ComfyUI needed.

Help pages (web/docs/<node id>/en.md, copied to web/docs/<node id>.md) are checked against nodes.NODE_CLASS_MAPPINGS, never against a
list kept here: every node has a page naming it and each of its inputs, every page has a node.
(The pages for ``WANModelLoader`` and ``WAN22BlockSwapLoader`` were written while those nodes were
being built; test_every_help_page_belongs_to_a_node is what tied them to the registered ids.)
"""
import fnmatch
import re
import subprocess
from pathlib import Path

import pytest

import wan22_blockswap as pack
from wan22_blockswap.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "web" / "docs"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT = PYPROJECT["project"]
COMFY = PYPROJECT["tool"]["comfy"]
NOT_RUNTIME = {"torch", "torchvision", "torchaudio"}  # ComfyUI users bring their own build


def _requirement(line: str) -> str:
    """A requirement with its name in canonical form (PEP 503) and the spaces dropped."""
    line = "".join(line.split())
    m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)(.*)", line)
    assert m, f"not a requirement: {line!r}"
    return re.sub(r"[-_.]+", "-", m.group(1)).lower() + m.group(2)


def _name(requirement: str) -> str:
    return re.match(r"[a-z0-9-]+", requirement).group(0)


def requirements_txt() -> set:
    reqs = set()
    for raw in (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines():
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()  # pip's comment rule
        if line:
            assert not line.startswith("-"), f"requirements.txt: options/includes do not belong here: {raw!r}"
            reqs.add(_requirement(line))
    return reqs


def pyproject_dependencies() -> set:
    return {_requirement(d) for d in PROJECT.get("dependencies", [])}


# ---------------------------------------------------------------------------------- dependencies
def test_runtime_dependencies_are_the_same_in_pyproject_and_requirements_txt():
    req, dep = requirements_txt(), pyproject_dependencies()
    assert req == dep, (
        "requirements.txt (what ComfyUI-Manager and `pip install -r` install) and pyproject.toml "
        "[project].dependencies (what the Comfy Registry lists) must name the same packages.\n"
        f"  only in pyproject.toml:   {sorted(dep - req) or '-'}\n"
        f"  only in requirements.txt: {sorted(req - dep) or '-'}\n"
        "(gguf: the pack's loaders read .gguf files with it.)")


def test_torch_is_never_a_runtime_dependency():
    for where, reqs in (("requirements.txt", requirements_txt()),
                        ("pyproject.toml [project].dependencies", pyproject_dependencies())):
        found = {_name(r) for r in reqs} & NOT_RUNTIME
        assert not found, f"{where} lists {sorted(found)}: ComfyUI users bring their own torch"


# ---------------------------------------------------------------------------------- help pages
def _input_names(cls) -> list:
    spec = cls.INPUT_TYPES()
    return [name for section in ("required", "optional") for name in spec.get(section, {})]


@pytest.mark.parametrize("node_id", sorted(NODE_CLASS_MAPPINGS))
def test_every_node_has_a_help_page(node_id):
    """ComfyUI's front end (1.45) asks a custom node pack for ``docs/<node id>/<locale>.md`` first and
    falls back to ``docs/<node id>.md``: the English page is where it looks first (no 404 in the
    console), the flat copy serves every other locale, and both say the same."""
    page = DOCS / node_id / "en.md"
    assert page.is_file(), (f"no help page for node {node_id!r}: write web/docs/{node_id}/en.md (ComfyUI's "
                            "front end shows web/docs/<node id>/<locale>.md as the node's help)")
    fallback = DOCS / f"{node_id}.md"
    assert fallback.is_file() and fallback.read_bytes() == page.read_bytes(), (
        f"web/docs/{node_id}.md (the page for other locales) must be a copy of web/docs/{node_id}/en.md")


@pytest.mark.parametrize("node_id", sorted(NODE_CLASS_MAPPINGS))
def test_help_page_names_the_node_and_every_input(node_id):
    page = DOCS / node_id / "en.md"
    if not page.is_file():
        pytest.skip("no page (test_every_node_has_a_help_page fails)")
    text = page.read_text(encoding="utf-8")
    display = NODE_DISPLAY_NAME_MAPPINGS.get(node_id, node_id)
    assert display in text, f"web/docs/{node_id}/en.md does not name the node as ComfyUI shows it: {display!r}"
    missing = [n for n in _input_names(NODE_CLASS_MAPPINGS[node_id]) if f"`{n}`" not in text]
    assert not missing, f"web/docs/{node_id}/en.md does not describe the inputs {missing} (as `name`)"


@pytest.mark.parametrize("node_id", sorted(NODE_CLASS_MAPPINGS))
def test_help_page_fits_the_panel(node_id):
    """The help panel is about 280 px wide at its default size (front end 1.45): narrower than any table
    of input names and meanings (a table is as wide as its columns' longest unbreakable words, e.g.
    `vace_blocks_to_swap` plus `blocks_to_swap`). So inputs are a list, and no word is wider than the
    panel (tests/test_browser.py measures the rendered page)."""
    import re

    text = (DOCS / node_id / "en.md").read_text(encoding="utf-8")
    assert not [line for line in text.splitlines() if line.startswith("|")], f"web/docs/{node_id}/en.md has a table"
    assert re.search(r"^- \*\*`blocks_to_swap`\*\*|^- \*\*`model_type`\*\*", text, re.M), "the inputs list"
    shown = re.sub(r"\]\([^)]*\)", "]", text)  # a link shows its text, not its address
    long_words = [w for w in re.findall(r"`[^`]*`|\S+", shown) if " " not in w and len(w.strip("`*.,:;()[]")) > 30]
    assert not long_words, f"web/docs/{node_id}/en.md: words too wide for the panel: {long_words}"


def test_every_help_page_belongs_to_a_node():
    pages = {p.stem for p in DOCS.glob("*.md")} | {p.parent.name for p in DOCS.glob("*/*.md")}
    orphans = sorted(pages - set(NODE_CLASS_MAPPINGS))
    assert not orphans, (
        f"help pages without a node of that id in nodes.NODE_CLASS_MAPPINGS: {orphans}. Register the "
        "node under exactly that id, or rename/remove the page.")


def test_pages_whose_names_differ_only_in_case_are_identical():
    """`WAN22BlockSwapLooper` and its legacy id `wan22BlockSwapLooper` are one file on case-insensitive
    file systems (Windows, macOS): with identical bytes a checkout or an unpacked archive serves
    the right page for both ids."""
    by_lower = {}
    for p in sorted(DOCS.rglob("*")):
        if p.is_file():
            by_lower.setdefault(str(p.relative_to(DOCS)).lower(), []).append(p)
    for group in by_lower.values():
        for other in group[1:]:
            assert other.read_bytes() == group[0].read_bytes(), (
                f"{group[0].name} and {other.name} differ only in case, so they must be identical")


def test_pack_exports_the_web_directory():
    web = getattr(pack, "WEB_DIRECTORY", None)
    assert web == "./web" and "WEB_DIRECTORY" in getattr(pack, "__all__", ()), (
        "ComfyUI serves the help pages only when __init__.py exports the web folder: add "
        "`WEB_DIRECTORY = \"./web\"` to __init__.py and \"WEB_DIRECTORY\" to its __all__")
    assert (ROOT / web).resolve() == (ROOT / "web").resolve()


# ---------------------------------------------------------------------------------- .comfyignore
KEPT = ["__init__.py", "nodes.py", "callbacks.py", "block_manager.py", "config.py", "utils.py",
        "looper_helpers.py", "gguf_reader.py", "gguf_dequant.py", "README.md", "LICENSE",
        "pyproject.toml", "requirements.txt", "web/docs/wan22BlockSwap/en.md", "web/docs/wan22BlockSwap.md", "web/icon.svg",
        "workflows/wan21_14b_t2v_blockswap.json", "docs/BENCHMARKS.md"]


def _comfyignore() -> list:
    lines = (ROOT / ".comfyignore").read_text(encoding="utf-8").splitlines()
    return [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]


def test_comfyignore_leaves_tests_and_benchmarks_out():
    patterns = {p.lstrip("/") for p in _comfyignore()}
    for folder in ("tests/", "benchmarks/", ".ci/"):
        assert folder in patterns, f".comfyignore must leave {folder} out of the registry archive"


def test_comfyignore_keeps_what_users_need():
    """A conservative reading of each pattern (glob on the path and on its file name, directory
    prefixes): nothing the pack needs at run time, nor its help pages or example workflows."""
    for pattern in _comfyignore():
        p = pattern.lstrip("/")
        for path in KEPT:
            hit = (fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path.rsplit("/", 1)[-1], p)
                   or (p.endswith("/") and ("/" + path).find("/" + p) >= 0))
            assert not hit, f".comfyignore line {pattern!r} would drop {path} from the registry archive"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # newer pathspec renames gitwildmatch
def test_comfyignore_as_comfy_cli_reads_it():
    """comfy-cli reads .comfyignore with pathspec's gitwildmatch and matches git-tracked paths."""
    pathspec = pytest.importorskip("pathspec")
    try:
        tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True,
                                 check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    spec = pathspec.PathSpec.from_lines("gitwildmatch", _comfyignore())
    for path in tracked:
        ignored = spec.match_file(path)
        if path.startswith(("tests/", "benchmarks/", ".ci/")):
            assert ignored, f"{path} would be in the registry archive"
        elif path in KEPT or path.startswith(("web/", "workflows/")) or (
                "/" not in path and path.endswith(".py")):
            assert not ignored, f"{path} would be left out of the registry archive"


# ---------------------------------------------------------------------------------- registry metadata
def test_registry_name_follows_the_registry_rules():
    name = PROJECT["name"]
    assert len(name) < 100
    assert re.fullmatch(r"[a-z][a-z0-9]*(?:[._-][a-z0-9]+)*", name), (
        f"[project].name {name!r}: lowercase letters, digits and single '-', '_' or '.', starting with a letter")
    assert "comfy" not in name, "the registry asks not to put ComfyUI in the name"


def test_registry_fields_are_present():
    assert re.fullmatch(r"\d+\.\d+\.\d+", PROJECT["version"]), "version must be X.Y.Z"
    assert PROJECT.get("description"), "[project].description is empty"
    assert (ROOT / PROJECT["license"]["file"]).is_file(), "license = { file = ... } must name a file"
    assert PROJECT["urls"]["Repository"].startswith("https://"), "[project.urls].Repository is required"
    for key in ("PublisherId", "DisplayName", "Icon"):
        assert COMFY.get(key), f"[tool.comfy].{key} is empty"
    assert isinstance(COMFY.get("includes", []), list)


def test_requires_comfyui_and_classifiers_parse_as_comfy_cli_expects():
    # comfy-cli's validate_version pattern: [operator]X.Y.Z[-suffix], comma-separated
    for part in COMFY["requires-comfyui"].split(","):
        assert re.fullmatch(r"(?:(==|>=|<=|!=|~=|>|<|<>|=)\s*)?\d+\.\d+\.\d+(?:-[a-zA-Z0-9]+)?", part.strip())
    accelerators = {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend",
                    "GPU :: Apple Metal"}
    for c in PROJECT.get("classifiers", []):
        if c.startswith("Environment ::"):
            assert c[len("Environment :: "):] in accelerators, c
        if c.startswith("Operating System :: "):
            assert c.split(" :: ")[1] in {"Microsoft", "POSIX", "MacOS", "OS Independent"}, c


def test_icon_is_in_the_repository_and_within_the_registry_limits():
    m = re.fullmatch(r"https://raw\.githubusercontent\.com/[^/]+/[^/]+/[^/]+/(.+\.(svg|png|jpg|gif))", COMFY["Icon"])
    assert m, f"Icon {COMFY['Icon']!r}: an SVG/PNG/JPG/GIF address in this repository"
    icon = ROOT / m.group(1)
    assert icon.is_file(), f"Icon points at {m.group(1)}, which is not in the repository"
    if icon.suffix == ".svg":
        head = icon.read_text(encoding="utf-8")[:500]
        w, h = (int(re.search(rf'{a}="(\d+)"', head).group(1)) for a in ("width", "height"))
        assert w <= 800 and h <= 400, "the registry takes icons up to 800 x 400"


def test_readme_install_command_uses_the_registry_name():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"comfy node install {PROJECT['name']}" in readme


def test_every_node_is_described_and_every_input_and_output_has_a_tooltip():
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        assert cls.CATEGORY.startswith("WAN BlockSwap"), node_id
        # the description is the node title's tooltip: a sentence or two; the detail is in the help page
        assert node_id in NODE_DISPLAY_NAME_MAPPINGS and 60 <= len(cls.DESCRIPTION) <= 160, node_id
        types = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, spec in types.get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES) and all(cls.OUTPUT_TOOLTIPS), node_id


def test_one_naming_scheme_and_search_aliases():
    """One family in the node library and in search: the display names and the category share one
    prefix; searching "block swap", "offload", "low VRAM" or "WAN 2.2" finds every node; the names
    of earlier versions still find them."""
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        schema = cls.GET_SCHEMA()
        assert schema.display_name == NODE_DISPLAY_NAME_MAPPINGS[node_id]
        assert schema.display_name.startswith("WAN BlockSwap"), schema.display_name
        assert schema.category.split("/")[0] == "WAN BlockSwap"
        assert {"block swap", "offload", "low VRAM", "WAN 2.2"} <= set(schema.search_aliases), node_id
    assert "WAN 2.2 BlockSwap" in NODE_CLASS_MAPPINGS["wan22BlockSwap"].GET_SCHEMA().search_aliases
    assert "WAN Model Loader" in NODE_CLASS_MAPPINGS["WANModelLoader"].GET_SCHEMA().search_aliases
    assert len(set(NODE_DISPLAY_NAME_MAPPINGS.values())) == len(NODE_DISPLAY_NAME_MAPPINGS)
    legacy = NODE_CLASS_MAPPINGS["wan22BlockSwapLooper"]
    assert legacy.DEPRECATED is True and NODE_CLASS_MAPPINGS["WAN22BlockSwapLooper"].DEPRECATED is False


RARELY_CHANGED = {"offload_txt_emb", "offload_img_emb", "use_non_blocking", "vace_blocks_to_swap", "dynamic_vram",
                  "prefetch_blocks", "block_swap_debug", "wan_version", "model_variant", "weight_dtype", "host_memory",
                  "spill_folder", "on_oom"}


def test_rarely_changed_inputs_are_advanced():
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        types = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, (_typ, opts) in types.get(section, {}).items():
                assert bool(opts.get("advanced")) == (name in RARELY_CHANGED), f"{node_id}.{name}"
