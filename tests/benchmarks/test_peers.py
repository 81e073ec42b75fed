"""benchmarks/peers.py on a tiny model: each engine measured in its own process, a peer that cannot be
imported or whose Python is missing is a one-line skip, and the table says who is faster."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from edgediff.benchmarks import peers
from tiny_models import save_pipeline, save_sdxl_pipeline


@pytest.fixture(scope="module")
def document(tmp_path_factory):
    model = save_pipeline("sd1", tmp_path_factory.mktemp("tiny") / "sd1")
    out = tmp_path_factory.mktemp("peers-out")
    params = peers.PeersParams(model=str(model), resolution=32, steps=2, cache=tmp_path_factory.mktemp("cache"),
                               out=out, peer_python=sys.executable,
                               rows=("edgediff-fp32", "edgediff-fp32-low", "diffusers-fp32", "ov-fp32", "sdcpp-q8_0"))
    try:  # this environment may have the peers installed; the skip line is what is under test here
        import optimum.intel  # noqa: F401

        pytest.skip("optimum-intel is importable here: the skip path cannot be shown")
    except ImportError:
        pass
    return peers.run(params, log=lambda line: None), out


def test_engines_are_measured_in_their_own_processes(document):
    doc, _ = document
    rows = {row["key"]: row for row in doc["rows"]}
    for key in ("edgediff-fp32", "edgediff-fp32-low", "diffusers-fp32"):
        row = rows[key]
        assert not row.get("error") and not row.get("skipped"), row
        assert row["load_s"] > 0 and row["first_s"] > 0 and row["resident_s"] > 0, row
    # VmHWM per engine: the torch-free runtime's process stays far below diffusers'.
    assert rows["edgediff-fp32"]["peak_rss_bytes"] < rows["diffusers-fp32"]["peak_rss_bytes"]


def test_a_peer_that_cannot_be_imported_is_one_line(document):
    doc, _ = document
    rows = {row["key"]: row for row in doc["rows"]}
    assert rows["ov-fp32"]["skipped"].startswith("optimum-intel[openvino] cannot be imported here")
    assert "\n" not in rows["ov-fp32"]["skipped"] and "load_s" not in rows["ov-fp32"]


def test_missing_peer_python_is_a_skip_not_a_crash(tmp_path):
    result = peers.call_worker(str(tmp_path / "no-python"), "sdcpp", {}, tmp_path / "log", timeout_s=30)
    assert result["skipped"].startswith("cannot start ")


def test_table_and_summary(document):
    doc, out = document
    paths = peers.write_outputs(doc, out, out / "results.md")
    text = paths["markdown"].read_text()
    assert "| edgediff ONNX Runtime fp32 |" in text and "skipped: optimum-intel" in text
    ours = next(row for row in doc["rows"] if row["key"] == "edgediff-fp32")
    assert f"{ours['resident_s']:.1f} s" in text
    assert "against diffusers fp32" in text and "x (" in text
    lean = next(row for row in doc["rows"] if row["key"] == "edgediff-fp32-low")
    assert f"memory=low: edgediff's fastest lean row (edgediff ONNX Runtime fp32, memory=low, {lean['resident_s']:.1f} s" in text
    assert (out / "results.md").read_text().strip() == text.strip()


def test_sdxl_runs_through_the_same_rows(tmp_path_factory, monkeypatch):
    """The peers row on every family: an SDXL folder goes to each engine's XL pipeline (diffusers here;
    optimum-intel's and optimum's XL classes where installed), and stable-diffusion.cpp's single file
    is written in SDXL's original layout before its row is skipped or run."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "export"))  # its single-file writer
    model = save_sdxl_pipeline("sdxl", tmp_path_factory.mktemp("tiny") / "sdxl")
    params = peers.PeersParams(model=str(model), resolution=64, steps=2, cache=tmp_path_factory.mktemp("cache"),
                               out=tmp_path_factory.mktemp("peers-xl"), peer_python=sys.executable,
                               rows=("edgediff-fp32", "diffusers-fp32", "sdcpp-q8_0"))
    rows = {row["key"]: row for row in peers.run(params, log=lambda line: None)["rows"]}
    for key in ("edgediff-fp32", "diffusers-fp32"):
        assert rows[key].get("resident_s"), rows[key]
    from safetensors import safe_open

    single_file = next(params.cache.glob("*/single-file/model.safetensors"))  # beside the bench's copy
    with safe_open(str(single_file), "np") as checkpoint:
        assert any(name.startswith("conditioner.embedders.1.model.") for name in checkpoint.keys())


def test_a_killed_peer_export_leaves_no_temporary_files(tmp_path):
    """optimum-intel's SDXL export was killed for memory and left 13 GB in /tmp: a peer's preparation
    gets its own TMPDIR beside the model, deleted whatever becomes of the worker."""
    source = tmp_path / "model" / "diffusers"
    source.mkdir(parents=True)
    python = tmp_path / "python"  # writes into its TMPDIR, then dies as the OOM killer would leave it
    python.write_text(f'#!/bin/sh\necho "$TMPDIR" > {tmp_path}/tmpdir\n'
                      '[ -n "$TMPDIR" ] && head -c 1000000 /dev/zero > "$TMPDIR/work.bin"\nkill -9 $$\n')
    python.chmod(0o755)
    params = peers.PeersParams(peer_python=str(python))
    row = next(r for r in peers.ROWS if r.key == "ov-fp32")
    folder, why = peers.prepare(row, source, params, tmp_path / "logs", log=lambda line: None)
    assert folder is None and "killed" in why
    tmpdir = Path((tmp_path / "tmpdir").read_text().strip() or "/")
    assert tmpdir.parent == source.parent and not tmpdir.exists()
    assert sorted(p.name for p in source.parent.iterdir()) == ["diffusers"]
