"""An export prints its own progress lines only: no library's progress bar, notice or warning."""
from __future__ import annotations

import logging

import pytest

from edgediff.exporter.export import export_model


@pytest.mark.parametrize("family", ["sd1", "sd35m"])
@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_denoiser_export_prints_only_our_progress_lines(family, target, tiny_sources, sd3, tmp_path, capfd, caplog):
    """ONNX Runtime's U-Net and MMDiT optimizers draw tqdm bars, the MMDiT one warns about
    onnxruntime-gpu versions, and their shape inference warns about symbolic dimensions (logged:
    on the terminal outside pytest)."""
    source = tiny_sources["sd1"] if family == "sd1" else sd3["sd35m"][0]
    lines = []
    capfd.readouterr()
    caplog.set_level(logging.WARNING)
    export_model(str(source), tmp_path / "unet", precision="fp32" if target == "cpu" else "fp16",
                 optimize_for=target, graphs=("unet",), log=lines.append)
    printed = capfd.readouterr()
    assert any(line.endswith(f"unet: optimizing for {target}") for line in lines), lines
    assert printed.out == "" and printed.err == "", printed
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
