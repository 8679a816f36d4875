"""The prepared GPU check runs on a CPU (``--dry-run``) in the default tier, so it cannot rot before a GPU
is lent: it runs the CUDA test selection (all skipped here), every measuring row on tiny sizes, and
writes its JSON and markdown report. With COMFYUI_PATH it also runs ComfyUI's own offloading rows."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _dry_run(tmp_path, env=None):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(tmp_path),
                           "--forwards", "1"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    md = (tmp_path / "gpu_check.md").read_text()
    return report, md


def test_gpu_check_dry_run_writes_its_report(tmp_path):
    report, md = _dry_run(tmp_path, env={"COMFYUI_PATH": ""})
    assert report["dry_run"] is True
    t = report["tests"]
    assert t["tests"] > 0 and t["failures"] == t["errors"] == 0  # the CUDA selection was collected and ran
    rows = {(r["mode"], r.get("weights")): r for r in report["rows"]}
    resident, swap = rows[("(d) resident", "fp32")], rows[("(a) block swap", "fp32")]
    assert resident["ratio"] == 1.0 and swap["blocks_swapped"] >= 1 and swap["d2h_bytes"] == 0
    assert swap["h2d_bytes_per_forward"] > 0 and swap["forwards"] == 1
    lora = rows[("block swap + rank-64 LoRA in the slot", "fp32")]
    assert lora["h2d_bytes_per_forward"] > swap["h2d_bytes_per_forward"]  # the factors travel with the blocks
    for when in ("cold", "warm"):  # the same swap with the blocks read from a file of them
        row = rows[(f"(a) block swap, masters on file ({when})", "fp32")]
        assert row["host_bytes"] == 0 and row["h2d_bytes_per_forward"] == swap["h2d_bytes_per_forward"]
    oom = report["oom_recovery"]  # one injected out-of-memory error, recovered with more blocks
    assert len(oom["retries"]) == 1 and oom["blocks_swapped"] > oom["start_blocks"] == 1
    assert report["experts"]["host_bytes_both"] > 0
    assert report["budget"]["activation_estimate"] > 0
    assert all("unavailable" in r for r in report["rows"] if "ComfyUI" in r["mode"] or r["mode"].startswith(("(b)", "(c)")))
    assert "| row | weights | swapped |" in md and "dry run on CPU" in md


@pytest.mark.comfyui
@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="set COMFYUI_PATH to a ComfyUI checkout")
def test_gpu_check_dry_run_runs_comfyuis_rows(tmp_path):
    report, _ = _dry_run(tmp_path)
    rows = {r["mode"]: r for r in report["rows"]}
    for mode in ("(d) resident, ComfyUI", "(b) classic partial load", "(a) block swap node, ComfyUI"):
        assert "forward_ms" in rows[mode], rows[mode]
    assert rows["(a) block swap node, ComfyUI"]["blocks_swapped"] >= 1
    assert "Dynamic VRAM is not active" in rows["(c) Dynamic VRAM"]["unavailable"]  # CPU: never dynamic
