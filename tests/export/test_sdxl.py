"""SDXL parity with diffusers: two text encoders, pooled text and size ids, Turbo and LCM variants.

Tiny random-weight SDXL pipelines are saved as diffusers folders, exported with ``edgediff export``
and compared with diffusers' own SDXL pipelines from the same starting noise. fp32 must agree
within 2e-3 (pixels in [0, 1]); FP16_TOLERANCE is stated from the worst case measured here.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from edgediff.runtime import Pipeline
from tiny_models import save_sdxl_pipeline
from helpers import FP32_TOLERANCE, NEGATIVE, PROMPT

FP16_TOLERANCE = 3e-3  # measured worst case 1.34e-3 (euler, ddim); fp32 runs differ by 0.7-1.3e-6
STEPS, GUIDANCE = 8, 6.0
DIFFUSERS = {
    "euler": ("EulerDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
}


@pytest.fixture(scope="module")
def sdxl(tiny_store):
    """{kind: (diffusers folder, fp32 export)} plus ("sdxl", "fp16") -> export (the session's: the
    ControlNet and LoRA tests use the same fp32 SDXL)."""
    models = {kind: (tiny_store.source(kind), tiny_store.export(kind, "fp32"))
              for kind in ("sdxl", "sdxl-lcm", "sdxl-turbo")}
    models["sdxl", "fp16"] = tiny_store.export("sdxl", "fp16", "--optimize-for", "cpu")
    return models


def reference(source, cls="StableDiffusionXLPipeline", scheduler=None, overrides=None):
    import diffusers

    pipe = getattr(diffusers, cls).from_pretrained(source)
    pipe.set_progress_bar_config(disable=True)
    if scheduler:
        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config, **(overrides or {}))
    return pipe


def start_noise(folder, seed=7) -> np.ndarray:
    m = Pipeline.load(folder, provider="cpu").manifest
    side = m.default_size // m.vae_scale_factor
    return np.random.default_rng(seed).standard_normal((1, m.latent_channels, side, side), dtype=np.float32)


def run_diffusers(pipe, latents, **kwargs) -> np.ndarray:
    with torch.no_grad():
        return pipe(latents=torch.from_numpy(latents), output_type="np", **kwargs).images


def test_manifest_describes_sdxl_as_data(sdxl):
    manifest = json.loads((sdxl["sdxl"][1] / "manifest.json").read_text())
    assert manifest["family"] == "sdxl"
    assert [e["graph"] for e in manifest["text_encoders"]] == ["text_encoder", "text_encoder_2"]
    assert manifest["text_encoders"][1]["tokenizer"]["pad_token_id"] == 0  # "!" pads the second encoder
    assert manifest["conditioning"] == {"force_zeros_for_empty_prompt": True,
                                        "time_ids": ["original_size", "crops_coords_top_left", "target_size"]}
    assert manifest["scaling_factor"] == pytest.approx(0.13025)
    unet_inputs = {i["name"]: i["shape"] for i in manifest["graphs"]["unet"]["inputs"]}
    assert unet_inputs["text_embeds"] == ["batch", 32] and unet_inputs["time_ids"] == ["batch", 6]
    assert "timestep_cond" not in unet_inputs
    lcm_inputs = {i["name"] for i in json.loads((sdxl["sdxl-lcm"][1] / "manifest.json").read_text())
                  ["graphs"]["unet"]["inputs"]}
    assert "timestep_cond" in lcm_inputs


@pytest.mark.parametrize("sampler", sorted(DIFFUSERS))
def test_matches_diffusers(sdxl, sampler):
    source, folder = sdxl["sdxl"]
    latents = start_noise(folder)
    expected = run_diffusers(reference(source, scheduler=DIFFUSERS[sampler][0], overrides=DIFFUSERS[sampler][1]), latents, prompt=PROMPT,
                             negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=GUIDANCE)
    pipe = Pipeline.load(folder, provider="cpu")
    actual = pipe(PROMPT, NEGATIVE, steps=STEPS, guidance=GUIDANCE, sampler=sampler, latents=latents).pixels
    assert np.abs(actual - expected).max() < FP32_TOLERANCE
    if sampler == "euler":  # the comparison can fail: other size ids condition another image
        moved = pipe(PROMPT, NEGATIVE, steps=STEPS, guidance=GUIDANCE, sampler=sampler, latents=latents,
                     original_size=(1024, 1024), crops_coords_top_left=(64, 0)).pixels
        assert np.abs(moved - expected).max() > 5 * FP32_TOLERANCE


def test_empty_negative_is_zeroed_as_the_config_says(sdxl):
    source, folder = sdxl["sdxl"]
    latents = start_noise(folder)
    expected = run_diffusers(reference(source), latents, prompt=PROMPT, num_inference_steps=STEPS,
                             guidance_scale=GUIDANCE)  # negative_prompt=None: zeroed embeddings
    actual = Pipeline.load(folder, provider="cpu")(PROMPT, "", steps=STEPS, guidance=GUIDANCE, sampler="euler",
                                                   latents=latents).pixels
    assert np.abs(actual - expected).max() < FP32_TOLERANCE


def test_size_conditioning_matches_diffusers(sdxl):
    source, folder = sdxl["sdxl"]
    latents = start_noise(folder)
    sizes = dict(original_size=(256, 192), target_size=(32, 32), crops_coords_top_left=(8, 16))
    expected = run_diffusers(reference(source), latents, prompt=PROMPT, negative_prompt=NEGATIVE,
                             num_inference_steps=STEPS, guidance_scale=GUIDANCE, **sizes)
    actual = Pipeline.load(folder, provider="cpu")(PROMPT, NEGATIVE, steps=STEPS, guidance=GUIDANCE,
                                                   sampler="euler", latents=latents, **sizes).pixels
    assert np.abs(actual - expected).max() < FP32_TOLERANCE


@pytest.mark.parametrize("sampler,scheduler,steps", [("euler_a", None, 1), ("euler", "EulerDiscreteScheduler", 4)])
@pytest.mark.parametrize("guidance", [0.0, 1.0])
def test_turbo_few_steps_without_guidance(sdxl, sampler, scheduler, steps, guidance):
    """Turbo models: trailing spacing from their scheduler config, 1-4 steps, guidance 0 (one U-Net batch)."""
    source, folder = sdxl["sdxl-turbo"]
    latents = start_noise(folder)
    expected = run_diffusers(reference(source, scheduler=scheduler), latents, prompt=PROMPT,
                             num_inference_steps=steps, guidance_scale=guidance)
    result = Pipeline.load(folder, provider="cpu")(PROMPT, steps=steps, guidance=guidance, sampler=sampler,
                                                   latents=latents)
    assert np.abs(result.pixels - expected).max() < FP32_TOLERANCE


@pytest.mark.parametrize("steps", [1, 4])
def test_lcm_unet_embeds_guidance(sdxl, monkeypatch, steps):
    """An LCM U-Net takes the guidance scale through timestep_cond; the lcm sampler's re-noising draws
    are served to diffusers' LCMScheduler from our generator."""
    import diffusers.schedulers.scheduling_lcm as lcm_module

    source, folder = sdxl["sdxl-lcm"]
    latents = start_noise(folder)
    draws = np.random.default_rng(5)
    monkeypatch.setattr(lcm_module, "randn_tensor", lambda shape, **kw: torch.from_numpy(
        draws.standard_normal(tuple(shape), dtype=np.float32)))
    expected = run_diffusers(reference(source), latents, prompt=PROMPT, num_inference_steps=steps,
                             guidance_scale=8.0)
    pipe = Pipeline.load(folder, provider="cpu")
    actual = pipe(PROMPT, steps=steps, guidance=8.0, sampler="lcm", latents=latents,
                  rng=np.random.default_rng(5)).pixels
    assert np.abs(actual - expected).max() < FP32_TOLERANCE
    other = pipe(PROMPT, steps=steps, guidance=2.0, sampler="lcm", latents=latents,
                 rng=np.random.default_rng(5)).pixels
    assert np.abs(other - expected).max() > 5 * FP32_TOLERANCE  # the embedded guidance matters


@pytest.mark.parametrize("strength", [0.5, 0.8])
def test_img2img_matches_diffusers(sdxl, monkeypatch, strength):
    import diffusers.models.autoencoders.vae as vae_module
    import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img as img2img_module

    rng = np.random.default_rng(3)

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.from_numpy(rng.standard_normal(tuple(shape), dtype=np.float32)).to(dtype or torch.float32)

    monkeypatch.setattr(vae_module, "randn_tensor", randn_tensor)
    monkeypatch.setattr(img2img_module, "randn_tensor", randn_tensor)
    source, folder = sdxl["sdxl"]
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    pipe = reference(source, "StableDiffusionXLImg2ImgPipeline")
    with torch.no_grad():
        expected = pipe(PROMPT, negative_prompt=NEGATIVE, image=picture, strength=strength, num_inference_steps=STEPS,
                        guidance_scale=GUIDANCE, output_type="np").images
    actual = Pipeline.load(folder, provider="cpu")(PROMPT, NEGATIVE, image=picture, strength=strength, steps=STEPS,
                                                   guidance=GUIDANCE, sampler="euler",
                                                   rng=np.random.default_rng(3)).pixels
    assert np.abs(actual - expected).max() < FP32_TOLERANCE


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m_karras"])
def test_fp16_within_stated_tolerance(sdxl, sampler):
    source, _ = sdxl["sdxl"]
    folder = sdxl["sdxl", "fp16"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["graphs"]["unet"]["precision"] == "fp16"
    # The SDXL VAE overflows fp16 (force_upcast in its config): it stays fp32, and the manifest says so.
    for vae in ("vae_decoder", "vae_encoder"):
        assert manifest["graphs"][vae]["precision"] == "fp32"
        assert "force_upcast" in manifest["graphs"][vae]["kept_fp32"][0]
    latents = start_noise(folder)
    expected = run_diffusers(reference(source, scheduler=DIFFUSERS[sampler][0], overrides=DIFFUSERS[sampler][1]), latents, prompt=PROMPT,
                             negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=GUIDANCE)
    actual = Pipeline.load(folder, provider="cpu")(PROMPT, NEGATIVE, steps=STEPS, guidance=GUIDANCE,
                                                   sampler=sampler, latents=latents).pixels
    assert np.abs(actual - expected).max() < FP16_TOLERANCE


def test_every_sampler_runs_on_sdxl(sdxl):
    from edgediff.runtime.samplers import list_samplers

    pipe = Pipeline.load(sdxl["sdxl"][1], provider="cpu", memory="high")
    for name, _, _ in list_samplers():
        pixels = pipe(PROMPT, NEGATIVE, steps=3, guidance=GUIDANCE, sampler=name, seed=1).pixels
        assert np.isfinite(pixels).all() and pixels.std() > 0, name


def test_single_file_sdxl_checkpoint(sdxl, tmp_path):
    """An SDXL checkpoint in the original layout exports from its own weights: the --config folder
    holds other weights (seed 1), and the keys pick SDXL's graphs."""
    from click.testing import CliRunner

    from edgediff.cli import main
    from original_format import save_original
    from tiny_models import build_sdxl_pipeline

    checkpoint = save_original(build_sdxl_pipeline("sdxl", seed=0), tmp_path / "sdxl.safetensors")
    config = save_sdxl_pipeline("sdxl", tmp_path / "config", seed=1)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["export", str(checkpoint), str(out), "--precision", "fp32",
                                       "--config", str(config)])
    assert result.exit_code == 0, result.output
    source, _ = sdxl["sdxl"]
    latents = start_noise(out)
    expected = run_diffusers(reference(source), latents, prompt=PROMPT, negative_prompt=NEGATIVE,
                             num_inference_steps=STEPS, guidance_scale=GUIDANCE)
    actual = Pipeline.load(out, provider="cpu")(PROMPT, NEGATIVE, steps=STEPS, guidance=GUIDANCE, sampler="euler",
                                                latents=latents).pixels
    assert np.abs(actual - expected).max() < FP32_TOLERANCE


def test_shipped_sdxl_config_is_chosen_by_the_checkpoint_keys():
    from edgediff.exporter.load import _shipped_config
    from edgediff.models import configs_dir

    from original_format import pipeline_to_original
    from tiny_models import build_sdxl_pipeline

    assert _shipped_config(set(pipeline_to_original(build_sdxl_pipeline("sdxl")))) == "sdxl"
    unet = json.loads((configs_dir() / "sdxl" / "unet" / "config.json").read_text())
    assert unet["cross_attention_dim"] == 2048 and unet["addition_embed_type"] == "text_time"


def test_long_and_weighted_prompts_on_both_encoders(sdxl):
    """A1111 prompt syntax reaches both text encoders: chunks past 75 tokens change the image, a
    weight of 1.0 changes nothing, and the pooled embedding comes from the first chunk."""
    pipe = Pipeline.load(sdxl["sdxl"][1], provider="cpu", memory="high")
    words = " ".join(["red circle", "blue square", "green star"] * 30)  # well past 75 tokens
    head = pipe.tokenizer.encode([words])[0][:75]
    latents = start_noise(sdxl["sdxl"][1])
    run = dict(steps=3, guidance=GUIDANCE, sampler="euler", latents=latents)
    long_image = pipe(words, NEGATIVE, **run).pixels
    short_image = pipe(pipe.tokenizer._tokenizer.decode(head), NEGATIVE, **run).pixels
    assert np.abs(long_image - short_image).max() > 5 * FP32_TOLERANCE
    plain = pipe(PROMPT, NEGATIVE, **run).pixels
    weighted = pipe(PROMPT.replace("circle", "(circle:1.0)"), NEGATIVE, **run).pixels
    assert np.array_equal(plain, weighted)
