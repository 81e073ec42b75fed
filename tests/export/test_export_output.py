"""An export prints its own progress lines only: no library's progress bar or version notice."""
from __future__ import annotations

import pytest

from edgediff.exporter.export import export_model


@pytest.mark.parametrize("family", ["sd1", "sd35m"])
def test_denoiser_export_prints_only_our_progress_lines(family, tiny_sources, sd3, tmp_path, capfd):
    """ONNX Runtime's U-Net and MMDiT optimizers draw tqdm bars, and the MMDiT one warns about
    onnxruntime-gpu versions, on every export fused for the CPU."""
    source = tiny_sources["sd1"] if family == "sd1" else sd3["sd35m"][0]
    lines = []
    capfd.readouterr()
    export_model(str(source), tmp_path / "unet", precision="fp32", optimize_for="cpu", graphs=("unet",),
                 log=lines.append)
    printed = capfd.readouterr()
    assert any(line.endswith("unet: optimizing for cpu") for line in lines), lines
    assert printed.out == "" and printed.err == "", printed
