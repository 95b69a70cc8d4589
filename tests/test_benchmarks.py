"""Smoke runs of the prepared benchmark scripts that CI cannot run for real (no GPU here)."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _table_rows(report: str, section: str) -> dict[str, list[str]]:
    body = report.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] not in ("variant", "---") and len(cells) > 1:
            rows[cells[0]] = cells[1:]
    return rows


def test_gpu_memory_script_runs_on_cpu_and_its_checks_pass(tmp_path):
    out = tmp_path / "gpu.md"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_memory.py"), "--device", "cpu"]
    cmd += ["--preset", "tiny", "--batch", "2", "--steps", "1", "--warmup", "0", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = out.read_text()
    assert "FAIL" not in report and report.count("PASS") >= 10
    mem = _table_rows(report, "Memory per transform")
    saved = {name: float(cells[2]) for name, cells in mem.items() if cells[2] != "–"}
    # The transforms did something: fewer bytes saved on the device than without them.
    assert saved["remat(nothing_saveable)"] < saved["remat(dots_saveable)"] < saved["none"]
    assert saved["offload(to='cpu')"] < saved["none"] / 4
    assert float(mem["offload(to='cpu')"][3]) > saved["none"] / 2  # ... because they went to host
    assert float(mem["remat(nothing_saveable)"][1]) < float(mem["none"][1])  # peak memory
    speed = _table_rows(report, "bf16 vs fp32 step time")
    assert len(speed) == 6 and all(float(cells[0]) > 0 for cells in speed.values())
