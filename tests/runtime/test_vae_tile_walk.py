"""Tiled VAE without models: the tile walk and blends on stand-in "decoders", and the manifest field."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edgediff.models import default_model_dir
from edgediff.runtime import ModelFolderError
from edgediff.runtime.manifest import read_manifest
from edgediff.runtime.vae_tiling import needs_tiling, tiled_decode, tiled_encode


def upsample(factor):
    """A pointwise 'decoder': nearest upsampling. Tiles of it must give back the whole result exactly."""
    return lambda x: np.repeat(np.repeat(x * 2.0 + 1.0, factor, axis=2), factor, axis=3)


@pytest.mark.parametrize("shape", [(1, 4, 40, 40), (2, 4, 24, 52), (1, 4, 16, 16), (1, 4, 7, 33)])
def test_tiles_of_a_pointwise_decoder_reassemble_the_whole(shape):
    z = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    calls = []

    def decode(tile):
        calls.append(tile.shape)
        return upsample(8)(tile)

    out = tiled_decode(decode, z, 16, 128)
    np.testing.assert_allclose(out, upsample(8)(z), rtol=1e-6, atol=1e-6)
    assert max(c[2] for c in calls) <= 16 and max(c[3] for c in calls) <= 16
    assert len(calls) == len(range(0, shape[2], 12)) * len(range(0, shape[3], 12))


def test_seams_blend_linearly_between_tiles():
    """A 'decoder' that paints each tile with its own constant: across a seam the value ramps."""
    z = np.zeros((1, 1, 1, 24), np.float32)
    values = iter([0.0, 8.0])
    out = tiled_decode(lambda tile: np.full((1, 1, tile.shape[2] * 2, tile.shape[3] * 2), next(values), np.float32),
                       z, 16, 32)
    # Tile 2 starts at latent 12 = pixel 24; the first 8 of its pixels ramp 0, 1, ..., 7.
    np.testing.assert_allclose(out[0, 0, 0, 24:32], np.arange(8.0))
    assert out.shape == (1, 1, 2, 48) and out[0, 0, 0, :24].max() == 0 and out[0, 0, 0, 32:].min() == 8


def test_encode_blends_log_variance():
    pixels = np.random.default_rng(1).standard_normal((1, 3, 80, 48)).astype(np.float32)

    def encode(tile):
        small = tile[:, :, ::8, ::8]
        return np.concatenate([small, small[:, :1]], axis=1), np.exp(0.5 * np.concatenate([small, small[:, :1]], axis=1))

    mean, std = tiled_encode(encode, pixels, 128, 16)
    expected = encode(pixels)
    np.testing.assert_allclose(mean, expected[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(std, expected[1], rtol=1e-4, atol=1e-5)


def test_needs_tiling():
    assert not needs_tiling(512, 512, 512, None) and needs_tiling(512, 520, 512, None)
    assert not needs_tiling(1024, 1024, 512, 4 * 512 * 512) and needs_tiling(1024, 1088, 512, 4 * 512 * 512)


def test_older_manifests_get_the_rule_from_the_default_size():
    manifest = read_manifest(default_model_dir())
    side = manifest.default_size
    assert manifest.vae_tiling == {"tile_latent": side // manifest.vae_scale_factor, "tile_pixels": side,
                                   "overlap": 0.25, "auto_above_pixels": 4 * side * side}


@pytest.mark.parametrize("tiling,field", [
    ({"tile_latent": 16, "tile_pixels": 100, "overlap": 0.25, "auto_above_pixels": 0}, "vae_tiling.tile_pixels"),
    ({"tile_latent": 16, "tile_pixels": 128, "overlap": 1.0, "auto_above_pixels": 0}, "vae_tiling.overlap"),
    ({"tile_latent": 1, "tile_pixels": 8, "overlap": 0.5, "auto_above_pixels": 0}, "vae_tiling.overlap"),
    ({"tile_latent": 0, "tile_pixels": 0, "overlap": 0.25, "auto_above_pixels": 0}, "vae_tiling.tile_latent"),
    ({"tile_latent": 16, "tile_pixels": 128, "overlap": 0.25}, "vae_tiling.auto_above_pixels"),
    ("tiles", "vae_tiling"),
])
def test_damaged_tiling_field_is_refused(tmp_path, tiling, field):
    folder = shutil.copytree(default_model_dir(), tmp_path / "model")
    data = json.loads((folder / "manifest.json").read_text())
    data["vae_tiling"] = tiling
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ModelFolderError, match=f"'{field}'"):
        read_manifest(folder)


def test_forced_tiling_halves_a_tile_that_covers_the_image():
    from types import SimpleNamespace

    from edgediff.runtime.pipeline import Pipeline

    sdxl = SimpleNamespace(manifest=SimpleNamespace(vae_tiling={
        "tile_latent": 128, "tile_pixels": 1024, "overlap": 0.25, "auto_above_pixels": 4 * 1024 * 1024}))
    plan = Pipeline._tile_plan
    assert (plan(sdxl, 1024, 1024)["tile_pixels"], plan(sdxl, 1024, 1024)["tile_latent"]) == (512, 64)
    assert plan(sdxl, 2048, 1536)["tile_pixels"] == 1024  # already more than one tile: the manifest's
    assert (plan(sdxl, 256, 256)["tile_pixels"], plan(sdxl, 256, 256)["tile_latent"]) == (128, 16)  # floor
    assert sdxl.manifest.vae_tiling["tile_pixels"] == 1024  # the manifest is left as it was
