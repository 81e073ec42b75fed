"""The hires fix (runtime/hires.py): equal, bit for bit, to our txt2img followed by our img2img at
the upscaled size; A1111's latent upscalers equal to torch's F.interpolate; CLI, --from-png and
bad input."""
from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

from edgediff.cli import main
from edgediff.runtime import EdgediffError, GenerationRequest, Pipeline, metadata
from edgediff.runtime.hires import UPSCALERS, interpolate
from helpers import assert_one_line_error

PROMPT, NEGATIVE = "a blue square", "blurry"
FIRST = dict(steps=6, guidance=6.0, sampler="euler_a", width=32, height=24, seed=5)
LATENT_MODES = [(name, mode, aa) for name, (_, mode, aa) in UPSCALERS.items() if mode is not None]


@pytest.mark.parametrize("name,mode,antialias", LATENT_MODES)
@pytest.mark.parametrize("size", [(8, 6), (12, 9), (16, 12), (10, 7), (4, 3)])
def test_latent_upscale_equals_torch_interpolate(name, mode, antialias, size):
    x = np.random.default_rng(0).standard_normal((2, 4, 4 * 2, 3 * 2)).astype(np.float32)
    expected = F.interpolate(torch.from_numpy(x), size=size, mode=mode, antialias=antialias).numpy()
    np.testing.assert_allclose(interpolate(x, size, mode, antialias), expected, rtol=0, atol=1e-5)  # float32 rounding: torch sums in float32


@pytest.fixture(scope="module")
def pipe(tiny_exports):
    return Pipeline.load(tiny_exports["sd1", "fp32"], provider="cpu")


@pytest.mark.parametrize("upscaler", ["latent", "latent-bicubic-antialiased", "Latent (nearest-exact)"])
def test_hires_is_txt2img_then_img2img_from_the_upscaled_latent(pipe, upscaler):
    hires = dict(scale=1.5, steps=4, strength=0.55, upscaler=upscaler)
    result = pipe(PROMPT, NEGATIVE, hires=hires, **FIRST)
    assert result.images[0].size == (48, 36) and result.seed == 5

    first = pipe(PROMPT, NEGATIVE, **FIRST)
    _, mode, antialias = UPSCALERS[result.request.hires.upscaler]
    size = (36 // pipe.manifest.vae_scale_factor, 48 // pipe.manifest.vae_scale_factor)
    upscaled = F.interpolate(torch.from_numpy(first.latents), size=size, mode=mode, antialias=antialias).numpy()
    np.testing.assert_allclose(upscaled, interpolate(first.latents, size, mode, antialias), rtol=1e-5, atol=1e-5)
    second = pipe.generate(GenerationRequest(
        PROMPT, NEGATIVE, **{**FIRST, "steps": 4, "width": 48, "height": 36}, strength=0.55,
        start_latent=interpolate(first.latents, size, mode, antialias)))
    np.testing.assert_array_equal(result.pixels, second.pixels)
    # The second pass matters: without it (the first pass, upscaled and decoded) the image differs.
    plain = pipe.decode(interpolate(first.latents, size, mode, antialias))[1]
    assert np.abs(plain - result.pixels).max() > 1e-2


def test_hires_with_the_lanczos_pixel_upscaler_is_img2img_of_the_upscaled_picture(pipe):
    result = pipe(PROMPT, NEGATIVE, hires=dict(width=64, strength=0.6, upscaler="Lanczos"), **FIRST)
    assert result.images[0].size == (64, 48)  # one side given: the other keeps the aspect
    first = pipe(PROMPT, NEGATIVE, **FIRST)
    picture = first.images[0].resize((64, 48), Image.LANCZOS)
    second = pipe(PROMPT, NEGATIVE, **{**FIRST, "width": 64, "height": 48}, image=picture, strength=0.6)
    np.testing.assert_array_equal(result.pixels, second.pixels)
    text = metadata.result_infotext(result)
    assert "Size: 32x24" in text and "Hires resize: 64x48" in text and "Hires upscaler: Lanczos" in text


def test_a_batch_of_seeds_gets_each_its_own_second_pass(pipe):
    hires = dict(scale=2, steps=3, strength=0.5)
    both = pipe([PROMPT, PROMPT], hires=hires, **{**FIRST, "seed": [5, 9]})
    alone = pipe(PROMPT, hires=hires, **{**FIRST, "seed": 9})
    assert both.seeds == [5, 9]
    np.testing.assert_allclose(both.pixels[1], alone.pixels[0], atol=1e-5)


def test_infotext_is_a1111s_and_from_png_reproduces(tiny_exports, tmp_path):
    model = str(tiny_exports["sd1", "fp32"])
    out = tmp_path / "hires.png"
    flags = ["--steps", "6", "--sampler", "euler_a", "--width", "32", "--height", "24", "--seed", "5",
             "--provider", "cpu", "--model", model]
    run = CliRunner().invoke(main, ["generate", PROMPT, *flags, "--hires-scale", "2", "--hires-steps", "3",
                                    "--hires-strength", "0.5", "--hires-upscaler", "latent-bicubic", "-o", str(out)])
    assert run.exit_code == 0, run.output
    with Image.open(out) as image:
        text = image.info["parameters"]
        pixels = np.asarray(image)
    assert image.size == (64, 48)
    assert "Size: 32x24" in text and "Denoising strength: 0.5, Hires upscale: 2, Hires steps: 3, " \
        "Hires upscaler: Latent (bicubic)" in text
    again = tmp_path / "again.png"
    run = CliRunner().invoke(main, ["generate", "--from-png", str(out), "--provider", "cpu", "--model", model,
                                    "-o", str(again)])
    assert run.exit_code == 0, run.output
    with Image.open(again) as image:
        np.testing.assert_array_equal(np.asarray(image), pixels)
        assert image.info["parameters"] == text
    pipe = Pipeline.load(model, provider="cpu")
    kwargs = metadata.generation_kwargs(metadata.parse_infotext(text))
    assert kwargs["hires"] == {"upscaler": "Latent (bicubic)", "scale": 2.0, "steps": 3, "strength": 0.5}
    np.testing.assert_array_equal(np.asarray(pipe(**kwargs).images[0]), pixels)


@pytest.mark.parametrize("hires,message", [
    (dict(scale=0.5), "hires scale must be a number from 1 to 8, not 0.5"),
    (dict(steps=-1), "hires steps must be a whole number >= 0"),
    (dict(strength=0), r"hires strength must be a number in \(0, 1\], not 0"),
    (dict(upscaler="esrgan"), "unknown hires upscaler 'esrgan'; expected one of latent, "),
    (dict(sharpness=2), "unknown hires setting 'sharpness'"),
    (dict(width=2), "hires width must be a positive multiple of 4 for this model, not 0"),
    ("2x", "hires must be a dict"),
])
def test_bad_hires_settings_are_one_line(pipe, hires, message):
    with pytest.raises(EdgediffError, match=message):
        pipe(PROMPT, hires=hires, **FIRST)


def test_hires_with_a_picture_is_refused(pipe):
    with pytest.raises(EdgediffError, match="the hires fix is for text-to-image"):
        pipe(PROMPT, image=Image.new("RGB", (32, 24)), hires={}, **FIRST)


@pytest.mark.parametrize("flags,message", [
    (["--hires-scale", "20"], "hires scale must be a number from 1 to 8, not 20.0"),
    (["--hires-upscaler", "esrgan"], "unknown hires upscaler 'esrgan'"),
    (["--hires-strength", "1.5"], "hires strength must be a number in (0, 1], not 1.5"),
])
def test_bad_hires_flags_are_one_line(tmp_path, flags, message):
    run = CliRunner().invoke(main, ["generate", PROMPT, "--model", str(tmp_path / "none"), *flags])
    assert_one_line_error(run.exit_code, run.stderr, message)


def a1111_cover(width, height, resize_x, resize_y, opt_f):
    """A1111's calculate_target_resolution with both hr_resize_x and hr_resize_y, as written there:
    (hr_upscale_to_x, hr_upscale_to_y, truncate_x, truncate_y)."""
    if width / height < resize_x / resize_y:
        to_x, to_y = resize_x, resize_x * height // width
    else:
        to_x, to_y = resize_y * width // height, resize_y
    return to_x, to_y, (to_x - resize_x) // opt_f, (to_y - resize_y) // opt_f


@pytest.mark.parametrize("size", [(64, 32), (40, 48)])  # wider: rows are cut; taller: columns
def test_both_resize_sides_cover_then_crop_the_centre_as_a1111(pipe, size):
    f = pipe.manifest.vae_scale_factor
    to_x, to_y, cut_x, cut_y = a1111_cover(32, 24, *size, f)
    assert cut_x + cut_y > 0 and (to_x, to_y) != size
    result = pipe(PROMPT, NEGATIVE, hires=dict(width=size[0], height=size[1], steps=3, strength=0.5), **FIRST)
    assert result.images[0].size == size
    first = pipe(PROMPT, NEGATIVE, **FIRST)
    latent = interpolate(first.latents, (to_y // f, to_x // f), "bilinear", False)
    latent = latent[:, :, cut_y // 2:latent.shape[2] - (cut_y + 1) // 2, cut_x // 2:latent.shape[3] - (cut_x + 1) // 2]
    second = pipe.generate(GenerationRequest(PROMPT, NEGATIVE, **{**FIRST, "steps": 3, "width": size[0],
                                                                  "height": size[1]}, strength=0.5,
                                             start_latent=np.ascontiguousarray(latent)))
    np.testing.assert_array_equal(result.pixels, second.pixels)
    assert f"Hires resize: {size[0]}x{size[1]}" in metadata.result_infotext(result)

    # A pixel upscaler: the picture upscaled to cover, cropped by the same offsets, then img2img.
    result = pipe(PROMPT, NEGATIVE, hires=dict(width=size[0], height=size[1], strength=0.5, upscaler="lanczos"),
                  **FIRST)
    left, top = f * (cut_x // 2), f * (cut_y // 2)
    picture = first.images[0].resize((to_x, to_y), Image.LANCZOS).crop((left, top, left + size[0], top + size[1]))
    second = pipe(PROMPT, NEGATIVE, **{**FIRST, "width": size[0], "height": size[1]}, image=picture, strength=0.5)
    np.testing.assert_array_equal(result.pixels, second.pixels)


def test_a_second_pass_too_large_for_memory_is_refused_before_the_first_runs(pipe, monkeypatch):
    from edgediff.runtime import memory

    first_passes = []
    generate = pipe.generate
    monkeypatch.setattr(pipe, "generate", lambda request: first_passes.append(request) or generate(request))
    monkeypatch.setattr(memory, "available_bytes", lambda: (1 << 20, "a test's 1 MiB"))
    with pytest.raises(EdgediffError, match=r"^a 256x192 generation needs about .* but 0.0 GB is free \(a test's 1 MiB\)"):
        pipe(PROMPT, hires=dict(scale=8), **FIRST)
    assert len(first_passes) == 1 and first_passes[0].hires is not None  # only the call itself: no pass ran
