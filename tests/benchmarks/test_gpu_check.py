"""benchmarks/gpu_check.sh: its CPU dry run measures for real and writes where it is told; without a GPU
and without --dry-run it stops with one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def run_script(*args, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "EDGEDIFF_PYTHON": sys.executable}
    return subprocess.run([str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)


def test_dry_run_measures_and_writes_the_table_where_told(tmp_path):
    real_results = REPO / "benchmarks" / "RESULTS.md"
    before = real_results.read_bytes()
    table = tmp_path / "results.md"
    table.write_text("# earlier results\n")
    done = run_script("--dry-run", "--out", str(tmp_path / "out"), "--results", str(table),
                      "--cache", str(tmp_path / "cache"), tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    document = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert document["dry_run"] is True and document["complete"] is True

    parity = {row["precision"]: row for row in document["parity"] if row["family"] == "sd1"}
    assert set(parity) == {"fp16", "int4"}, document["parity"]
    for precision, bound in (("fp16", 1e-2), ("int4", 1e-1)):
        row = parity[precision]
        # A computed difference: not zero (fp16 and 4-bit weights do move pixels), within its precision's bound.
        assert 0 < row["mean_abs"] <= row["max_abs"] < bound, row
    assert parity["fp16"]["max_abs"] != parity["int4"]["max_abs"]

    rows = document["full_size"]
    ours = [row for row in rows if row.get("engine") == "edgediff"]
    reference = [row for row in rows if row.get("engine") == "diffusers"]
    assert ours and reference, rows
    for row in ours:
        assert row["unet_per_step_s"] > 0 and row["total_s"] >= row["unet_per_step_s"] and row["peak_rss_bytes"] > 0
        # The cold process filled the session cache that the second one read.
        assert row["cold"]["session_load_s"] > 0 and set(row["session_cache"].values()) == {"hit"}, row
        assert set(row["cold"]["session_cache"].values()) == {"built"}, row["cold"]
    assert reference[0]["unet_per_step_s"] > 0
    bound = [row["iobinding"] for row in rows if "iobinding" in row]
    assert bound and bound[0]["step_off_s"] > 0 and bound[0]["step_on_s"] > 0, bound

    text = table.read_text()
    assert text.startswith("# earlier results\n"), "the table is appended, never overwrites"
    assert "## GPU check" in text and "dry run on the CPU" in text
    assert f"{parity['fp16']['max_abs']:.3g}" in text
    assert real_results.read_bytes() == before


def test_without_a_gpu_and_without_dry_run_it_stops_in_one_line(tmp_path):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        import pytest

        pytest.skip("this machine has CUDA: the script would run for real")
    done = run_script("--out", str(tmp_path / "out"), "--results", str(tmp_path / "r.md"), tmp_path=tmp_path)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA provider"), done.stderr
    assert not (tmp_path / "r.md").exists() and not (tmp_path / "out" / "gpu_check.json").exists()


def test_a_python_without_edgediff_is_one_line(tmp_path):
    env = {**os.environ, "EDGEDIFF_PYTHON": str(tmp_path / "no-such-python")}
    done = subprocess.run([str(SCRIPT), "--dry-run"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("gpu_check: edgediff is not installed"), done.stderr
