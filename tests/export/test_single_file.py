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
from tiny_models import export_with_cli as export


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


def _one_line_error(*args):
    result = CliRunner().invoke(main, ["export", *map(str, args)])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code != 0 and "Traceback" not in result.stderr, result.stderr
    # progress lines ("loading ...") may come first; the failure itself is one "error:" line, the last
    assert lines[-1].startswith("error:") and sum(line.startswith("error:") for line in lines) == 1, lines
    return lines


def test_unreadable_pickles_fail_in_one_line(tmp_path):
    (tmp_path / "junk.ckpt").write_bytes(b"not a pickle")
    torch.save([1, 2], tmp_path / "list.ckpt")
    for name, fragment in (("junk.ckpt", "not a readable PyTorch checkpoint"), ("list.ckpt", "holds a list")):
        lines = _one_line_error(tmp_path / name, tmp_path / "out", "--allow-pickle")
        assert fragment in lines[-1], lines
        assert not (tmp_path / "out").exists()


def test_architecture_mismatch_suggests_config(single_files, tmp_path):
    """A checkpoint that is not SD 1.5-sized, read with the shipped config: the error names --config."""
    folder, _ = single_files["sd1"]
    lines = _one_line_error(folder / "model.safetensors", tmp_path / "out")
    assert "expected shape" in lines[-1] and "--config" in lines[-1], lines
    assert not (tmp_path / "out").exists()


def test_family_key_picks_the_shipped_config(single_files):
    """Without --config the SD 2.x-only OpenCLIP key picks sd21; our original-format writer emits it."""
    from edgediff.exporter.load import SD2_TEXT_KEY, _checkpoint_keys

    for kind, expected in (("sd1", False), ("sd2", True)):
        folder, _ = single_files[kind]
        for name in ("model.safetensors", "model.ckpt"):
            assert (SD2_TEXT_KEY in _checkpoint_keys(folder / name)) is expected, (kind, name)
