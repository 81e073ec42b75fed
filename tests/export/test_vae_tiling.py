"""Tiled VAE on a tiny exported model: parity with diffusers' ``vae.enable_tiling()``, closeness to
the whole decode (seams included), the automatic threshold and ``--vae-tiling`` from the CLI.

The tiny VAE has ``sample_size=32`` and a scale factor of 2: tiles of 16 latent / 32 image pixels
starting every 12 latent pixels, seams blended over 8 image pixels, automatic above 4 * 32 * 32 pixels.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from edgediff.cli import main
from edgediff.runtime import Pipeline
from edgediff.runtime.vae_tiling import tiled_encode

# Tiled vs whole decode of the tiny random-weight VAE, smooth latents (pixels in [0, 1]), measured over
# three seeds: mean |diff| 0.047-0.058, max 0.51-0.66, the max always inside a seam band (interior max
# 0.36-0.42). That is diffusers' algorithm (matched to 1e-4 below): each tile's GroupNorm statistics
# and mid-block attention see that tile only, and a random VAE amplifies it.
MEAN_TOLERANCE, MAX_TOLERANCE = 0.08, 0.75
PARITY = 1e-4  # ONNX Runtime fp32 vs torch fp32, same algorithm


def smooth_latent(side: int, seed: int = 0) -> np.ndarray:
    """Low-frequency latent, like a real image's (random-per-pixel latents are mostly seams)."""
    rng = np.random.default_rng(seed)
    coarse = rng.standard_normal((1, 4, side // 4 + 1, side // 4 + 1)).astype(np.float32)
    return np.repeat(np.repeat(coarse, 4, axis=2), 4, axis=3)[:, :, :side, :side]


@pytest.fixture(scope="module")
def vae(tiny_sources):
    from diffusers import AutoencoderKL

    model = AutoencoderKL.from_pretrained(tiny_sources["sd1"] / "vae").eval()
    model.enable_tiling()
    return model


@pytest.fixture(scope="module")
def pipe(tiny_exports):
    return Pipeline.load(tiny_exports["sd1", "fp32"], provider="cpu")


def test_manifest_states_the_tiles(pipe):
    assert pipe.manifest.vae_tiling == {"tile_latent": 16, "tile_pixels": 32, "overlap": 0.25,
                                        "auto_above_pixels": 4096}


def test_tiled_decode_matches_diffusers(pipe, vae):
    z = smooth_latent(40)  # 80x80 pixels: 4x4 tiles, the last ones cut short
    with torch.no_grad():
        expected = (vae.decode(torch.from_numpy(z)).sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    _, actual = pipe.decode(z * pipe.manifest.scaling_factor, vae_tiling=True)
    assert actual.shape == expected.shape == (1, 80, 80, 3)
    assert np.abs(actual - expected).max() < PARITY


def test_tiled_encode_matches_diffusers(pipe, vae):
    pixels = np.random.default_rng(2).uniform(-1, 1, (1, 3, 72, 56)).astype(np.float32)
    with torch.no_grad():
        posterior = vae.encode(torch.from_numpy(pixels)).latent_dist
    t = pipe.manifest.vae_tiling
    with pipe.sessions.use("vae_encoder") as encoder:
        mean, std = tiled_encode(lambda tile: tuple(encoder.run(sample=tile)), pixels, t["tile_pixels"],
                                 t["tile_latent"], t["overlap"])
    assert mean.shape == (1, 4, 36, 28)
    assert np.abs(mean - posterior.mean.numpy()).max() < PARITY
    assert np.abs(std - posterior.std.numpy()).max() < PARITY


def test_tiled_decode_is_close_to_the_whole_decode_seams_included(pipe):
    z = smooth_latent(40, seed=1) * pipe.manifest.scaling_factor
    _, whole = pipe.decode(z, vae_tiling=False)
    _, tiled = pipe.decode(z, vae_tiling=True)
    diff = np.abs(tiled - whole)
    # Seam bands: where a tile starts (every 12 latent = 24 image pixels), 8 blended pixels.
    bands = np.zeros(80, bool)
    for start in range(24, 80, 24):
        bands[start:start + 8] = True
    seams = np.maximum(diff[:, bands].max(), diff[:, :, bands].max())
    assert 0 < diff.mean() < MEAN_TOLERANCE and diff.max() < MAX_TOLERANCE and seams < MAX_TOLERANCE, \
        (diff.mean(), diff.max(), seams)
    assert diff[:, bands].mean() < 2 * MEAN_TOLERANCE and diff[:, :, bands].mean() < 2 * MEAN_TOLERANCE


def test_automatic_threshold(pipe):
    above = smooth_latent(36) * pipe.manifest.scaling_factor  # 72x72 = 5184 pixels > 4096: tiled
    assert np.array_equal(pipe.decode(above)[1], pipe.decode(above, vae_tiling=True)[1])
    assert not np.array_equal(pipe.decode(above)[1], pipe.decode(above, vae_tiling=False)[1])
    below = above[:, :, :32, :32]  # 64x64 = 4096 pixels: whole, even though wider than a tile
    assert np.array_equal(pipe.decode(below)[1], pipe.decode(below, vae_tiling=False)[1])
    assert not np.array_equal(pipe.decode(below)[1], pipe.decode(below, vae_tiling=True)[1])


def test_img2img_with_tiling_matches_diffusers(tiny_sources, pipe, monkeypatch):
    """Encode and decode both tiled inside a generation, as diffusers' img2img with enable_tiling()."""
    import diffusers
    from test_img2img import feed_numpy_noise

    picture = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    reference = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(tiny_sources["sd1"], safety_checker=None)
    reference.scheduler = diffusers.EulerDiscreteScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    reference.vae.enable_tiling()
    feed_numpy_noise(monkeypatch, seed=3)
    with torch.no_grad():
        expected = reference("a blue square", image=picture, strength=0.6, num_inference_steps=6,
                             guidance_scale=6.0, output_type="np").images
    actual = pipe("a blue square", image=picture, strength=0.6, steps=6, guidance=6.0, sampler="euler",
                  rng=np.random.default_rng(3), vae_tiling=True).pixels
    assert np.abs(actual - expected).max() < 2e-3
    whole = pipe("a blue square", image=picture, strength=0.6, steps=6, guidance=6.0, sampler="euler",
                 rng=np.random.default_rng(3), vae_tiling=False).pixels
    assert np.abs(whole - expected).max() > 2e-3  # tiling did happen


def test_cli_vae_tiling_writes_the_right_size(tiny_exports, tmp_path):
    out = tmp_path / "tiled.png"
    result = CliRunner().invoke(main, ["generate", "a red circle", "--model", str(tiny_exports["sd1", "fp32"]),
                                       "--steps", "1", "--width", "72", "--height", "40", "--vae-tiling",
                                       "--seed", "1", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (72, 40)
    plain = tmp_path / "plain.png"
    result = CliRunner().invoke(main, ["generate", "a red circle", "--model", str(tiny_exports["sd1", "fp32"]),
                                       "--steps", "1", "--width", "72", "--height", "40", "--no-vae-tiling",
                                       "--seed", "1", "-o", str(plain)])
    assert result.exit_code == 0, result.output
    assert not np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(plain)))


def test_memory_check_tiles_when_only_a_tiled_vae_fits(tiny_exports, monkeypatch):
    from edgediff.runtime.errors import OutOfMemoryError
    from edgediff.runtime import memory as mem

    # low memory: no session stays resident, so the VAE's activations count in full every time
    pipe = Pipeline.load(tiny_exports["sd1", "fp32"], provider="cpu", memory="low")
    size = 64  # below the automatic threshold
    # every graph with attention may drop the arena, so its second score matrix is out of the way
    monkeypatch.setattr(mem, "ARENA_SCRATCH_LIMIT", 1)
    whole = pipe.estimate_memory(1, size, size, guided=False, vae_tiling=False, arena=False)
    tiled = pipe.estimate_memory(1, size, size, guided=False, vae_tiling=True, arena=False)
    assert whole.stage == "vae_decoder" and tiled.peak_bytes < whole.peak_bytes, (whole, tiled)
    free = (whole.peak_bytes + tiled.peak_bytes) // 2 - mem.resident_bytes()
    monkeypatch.setattr(mem, "available_bytes", lambda: (free, "a test"))
    assert pipe.check_memory(1, size, size, guided=False) is True
    with pytest.raises(OutOfMemoryError, match="--vae-tiling"):
        pipe.check_memory(1, size, size, guided=False, vae_tiling=False)
    assert pipe("x", steps=1, guidance=1.0, width=size, height=size, seed=0).images[0].size == (size, size)
