"""Single-file checkpoints: a tiny pipeline written in the original LDM/CompVis layout exports to
graphs that reproduce the diffusers pipeline it came from (offline, config from --config).

The --config folder holds *other* weights (seed 1): the export must take the checkpoint's (seed 0).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgediff.cli import main
from edgediff.runtime.manifest import read_manifest
from original_format import save_original
from test_parity import FP32_TOLERANCE, diffusers_pixels, edgediff_pixels, start_noise
from tiny_models import build_pipeline, save_pipeline


def export(source, out, *args):
    result = CliRunner().invoke(main, ["export", str(source), str(out), *args])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def single_files(tmp_path_factory):
    """{kind: (checkpoint folder, config folder with seed-1 weights)}; checkpoints from seed 0."""
    root = tmp_path_factory.mktemp("single-file")
    out = {}
    for kind in ("sd1", "sd2"):
        folder = root / kind
        folder.mkdir()
        pipe = build_pipeline(kind, seed=0)
        save_original(pipe, folder / "model.safetensors")
        save_original(pipe, folder / "model.ckpt")
        out[kind] = folder, save_pipeline(kind, root / f"{kind}-config", seed=1)
    return out


def _check_matches_source(tiny_sources, kind, exported):
    latents = start_noise(exported)
    expected = diffusers_pixels(tiny_sources[kind], "euler", latents)
    actual = edgediff_pixels(exported, "euler", latents)
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).max() < FP32_TOLERANCE


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_safetensors_matches_diffusers(tiny_sources, single_files, tmp_path, kind):
    folder, config = single_files[kind]
    checkpoint = folder / "model.safetensors"
    out = export(checkpoint, tmp_path / "out", "--precision", "fp32", "--config", config)
    source = read_manifest(out).source
    assert source["kind"] == "single-file"
    assert source["path"] == str(checkpoint.resolve())
    _check_matches_source(tiny_sources, kind, out)


def test_pickled_ckpt_exports_with_allow_pickle(tiny_sources, single_files, tmp_path):
    folder, config = single_files["sd1"]
    out = export(folder / "model.ckpt", tmp_path / "out", "--precision", "fp32", "--config", config, "--allow-pickle")
    _check_matches_source(tiny_sources, "sd1", out)


def test_loaded_weights_are_the_checkpoints(single_files, tiny_sources):
    """Every tensor of every model comes from the checkpoint, none from the config folder."""
    from edgediff.exporter.load import load_pipeline

    folder, config = single_files["sd1"]
    loaded, origin = load_pipeline(str(folder / "model.safetensors"), config=config)
    assert origin["kind"] == "single-file"
    source = build_pipeline("sd1", seed=0)
    for name in ("unet", "vae", "text_encoder"):
        want, got = getattr(source, name).state_dict(), getattr(loaded, name).state_dict()
        assert set(got) == set(want), name
        assert all(torch.equal(got[key], want[key]) for key in want), name
