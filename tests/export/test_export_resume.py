"""An interrupted export leaves no manifest and resumes, skipping the graphs it finished."""
from __future__ import annotations

import pytest

from edgediff.exporter import export as export_module
from edgediff.runtime.manifest import read_manifest


def test_interrupted_export_resumes(tiny_sources, tmp_path, monkeypatch):
    real = export_module._export_graph
    exported = []

    def crash_on_vae_decoder(pipe, spec, *args, **kwargs):
        if spec.name == "vae_decoder":
            raise KeyboardInterrupt  # the user pressed Ctrl-C mid-export
        exported.append(spec.name)
        return real(pipe, spec, *args, **kwargs)

    monkeypatch.setattr(export_module, "_export_graph", crash_on_vae_decoder)
    out = tmp_path / "model"
    with pytest.raises(KeyboardInterrupt):
        export_module.export_model(str(tiny_sources["sd1"]), out, precision="fp32", log=lambda line: None)
    assert not out.exists() and not list(tmp_path.rglob("manifest.json"))
    assert exported == ["text_encoder", "unet"]

    monkeypatch.setattr(export_module, "_export_graph", lambda pipe, spec, *a, **k: (exported.append(spec.name),
                                                                                     real(pipe, spec, *a, **k))[1])
    lines = []
    export_module.export_model(str(tiny_sources["sd1"]), out, precision="fp32", log=lines.append)
    assert exported == ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
    assert sum("already exported, skipping" in line for line in lines) == 2
    manifest = read_manifest(out)
    assert set(manifest.graphs) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    assert not (tmp_path / ".model.partial").exists()


def test_changed_settings_start_over(tiny_sources, tmp_path, monkeypatch):
    """Finished graphs made with other settings (here fp16) are not reused for an fp32 export."""
    real = export_module._export_graph

    def crash_after_text_encoder(pipe, spec, *args, **kwargs):
        if spec.name == "unet":
            raise KeyboardInterrupt
        return real(pipe, spec, *args, **kwargs)

    monkeypatch.setattr(export_module, "_export_graph", crash_after_text_encoder)
    with pytest.raises(KeyboardInterrupt):
        export_module.export_model(str(tiny_sources["sd1"]), tmp_path / "m", precision="fp16",
                                   optimize_for="cpu", log=lambda line: None)
    monkeypatch.setattr(export_module, "_export_graph", real)
    lines = []
    manifest = export_module.export_model(str(tiny_sources["sd1"]), tmp_path / "m", precision="fp32", log=lines.append)
    assert not any("skipping" in line for line in lines)
    assert manifest.graphs["text_encoder"].precision == "fp32"
