"""The x4 upscaler (a 7-channel U-Net fed the noised picture and the noise level as a class label)
against diffusers' StableDiffusionUpscalePipeline on a tiny random model, its tiled (MultiDiffusion)
U-Net, the CLI and its one-line errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from edgediff.cli import main
from edgediff.runtime import EdgediffError, Pipeline
from helpers import FP32_TOLERANCE, assert_one_line_error
from tiny_models import export_with_cli

PROMPT, STEPS, GUIDANCE, SEED = "a white cat", 4, 6.0, 7
# stabilityai/stable-diffusion-x4-upscaler's schedulers (models/configs/x4-upscaler)
SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "scaled_linear",
             "prediction_type": "v_prediction", "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}
LOW_RES_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
                     "beta_schedule": "scaled_linear", "clip_sample": True, "variance_type": "fixed_small"}


def build_upscaler():
    """diffusers' own tiny upscaler configs (tests/pipelines/stable_diffusion_2/test_stable_diffusion_upscale.py)
    with the real CLIP vocabulary and the VAE's tile at 128 pixels (no automatic VAE tiling here)."""
    from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from edgediff.models import clip_tokenizer_dir

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 32, 64), layers_per_block=2, sample_size=32, in_channels=7, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, use_linear_projection=True, only_cross_attention=(True, True, False),
        num_class_embeds=1000)  # diffusers test: 100, below its own max_noise_level 350
    vae = AutoencoderKL(block_out_channels=[32, 32, 64], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                        sample_size=128, scaling_factor=0.08333)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=0, hidden_size=32, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=3, vocab_size=49408, max_position_embeddings=77,
        hidden_act="gelu", projection_dim=32))
    tokenizer = CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir()), pad_token="!")
    pipe = StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        low_res_scheduler=DDPMScheduler.from_config(LOW_RES_SCHEDULER), scheduler=DDIMScheduler.from_config(SCHEDULER),
        max_noise_level=350)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def upscaler_source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sources") / "x4-upscaler"
    build_upscaler().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def upscaler_export(upscaler_source, tmp_path_factory):
    return export_with_cli(upscaler_source, tmp_path_factory.mktemp("exports") / "x4", "--precision", "fp32")


def picture(size=32):
    return Image.fromarray(np.random.default_rng(1).integers(0, 256, (size, size, 3), dtype=np.uint8))


def reference(source, noise_level, size=32):
    import diffusers

    pipe = diffusers.StableDiffusionUpscalePipeline.from_pretrained(source)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(PROMPT, image=picture(size), num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                    noise_level=noise_level, generator=torch.Generator().manual_seed(SEED), output_type="np").images


def test_export_recognises_the_upscaler(upscaler_export):
    pipe = Pipeline.load(upscaler_export, provider="cpu")
    m = pipe.manifest
    assert m.family == "upscaler" and set(m.graphs) == {"text_encoder", "unet", "vae_decoder"}
    inputs = {s.name: s for s in m.graphs["unet"].inputs}
    assert inputs["sample"].shape[1] == 7 and inputs["class_labels"].dtype == "int64"
    assert m.upscale["max_noise_level"] == 350 and len(m.upscale["low_res_alphas_cumprod"]) == 351
    assert m.scaling_factor == pytest.approx(0.08333) and m.vae_scale_factor == 4
    assert all(entry.validation["validated"] for entry in m.graphs.values())


@pytest.mark.parametrize("noise_level", [20, 100])
@pytest.mark.parametrize("memory", ["high", "low"])
def test_matches_diffusers_upscale_pipeline(upscaler_source, upscaler_export, noise_level, memory):
    expected = reference(upscaler_source, noise_level)
    pipe = Pipeline.load(upscaler_export, provider="cpu", memory=memory)
    result = pipe(PROMPT, image=picture(), noise_level=noise_level, steps=STEPS, guidance=GUIDANCE,
                  sampler="ddim", seed=SEED, noise="torch-cpu")
    assert result.pixels.shape == expected.shape == (1, 128, 128, 3)
    assert np.abs(result.pixels - expected).max() < FP32_TOLERANCE
    # The noise level matters: another one (another class label, another noising) is another image.
    other = pipe(PROMPT, image=picture(), noise_level=noise_level + 50, steps=STEPS, guidance=GUIDANCE,
                 sampler="ddim", seed=SEED, noise="torch-cpu").pixels
    assert np.abs(other - expected).max() > 5 * FP32_TOLERANCE


def test_tiles_covering_everything_equal_the_untiled_run(upscaler_export):
    pipe = Pipeline.load(upscaler_export, provider="cpu")
    kwargs = dict(image=picture(64), steps=3, guidance=GUIDANCE, sampler="ddim", seed=SEED, noise="torch-cpu")
    whole = pipe(PROMPT, **kwargs).pixels  # 64x64 latent under the manifest's 32x32 tile: tiled
    pipe.manifest.upscale["tile_latent"] = 64
    untiled = pipe(PROMPT, **kwargs).pixels
    pipe.manifest.upscale.update(tile_latent=64, tile_overlap=16)
    np.testing.assert_array_equal(pipe(PROMPT, **kwargs).pixels, untiled)
    # Smaller tiles change the picture (each tile's attention and GroupNorm see that tile), but far
    # less than another seed does (random weights: no trained prior to keep tiles consistent).
    another_seed = pipe(PROMPT, **{**kwargs, "seed": SEED + 1}).pixels
    tiled, unrelated = np.abs(whole - untiled).mean(), np.abs(another_seed - untiled).mean()
    assert 0 < tiled < 0.25 * unrelated, (tiled, unrelated)


def test_cli_upscales_a_picture(upscaler_export, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    picture().save("in.png")
    run = CliRunner().invoke(main, ["upscale", "in.png", "--model", str(upscaler_export), "-o", "out.png",
                                    "--prompt", PROMPT, "--noise-level", "30", "--steps", "3", "--guidance", "5",
                                    "--seed", "3"])
    assert run.exit_code == 0, run.output
    pipe = Pipeline.load(upscaler_export, provider="cpu", memory="low")
    expected = pipe(PROMPT, image=picture(), noise_level=30, steps=3, guidance=5, seed=3, sampler="ddim").images[0]
    with Image.open(tmp_path / "out.png") as image:
        assert image.size == (128, 128)
        np.testing.assert_array_equal(np.asarray(image.convert("RGB")), np.asarray(expected))


def test_generate_with_an_upscaler_model_is_one_line(upscaler_export):
    run = CliRunner().invoke(main, ["generate", PROMPT, "--model", str(upscaler_export), "--steps", "2"])
    assert_one_line_error(run.exit_code, run.stderr, "x4 upscaler model", "edgediff upscale")


@pytest.mark.parametrize("level, message", [(351, "noise_level must be from 0 to 350"),
                                            (-1, "noise_level must be a whole number >= 0")])
def test_noise_level_out_of_range_is_one_line(upscaler_export, tmp_path, level, message):
    picture().save(tmp_path / "in.png")
    run = CliRunner().invoke(main, ["upscale", str(tmp_path / "in.png"), "--model", str(upscaler_export),
                                    "-o", str(tmp_path / "out.png"), "--noise-level", str(level)])
    assert_one_line_error(run.exit_code, run.stderr, message)
    assert not (tmp_path / "out.png").exists()


def test_a_picture_too_large_for_the_memory_estimate_is_one_line(upscaler_export, tmp_path, monkeypatch):
    from edgediff.runtime import memory

    monkeypatch.setattr(memory, "available_bytes", lambda: (2**20, "MemAvailable"))
    picture(64).save(tmp_path / "in.png")
    run = CliRunner().invoke(main, ["upscale", str(tmp_path / "in.png"), "--model", str(upscaler_export),
                                    "-o", str(tmp_path / "out.png"), "--steps", "1"])
    assert_one_line_error(run.exit_code, run.stderr, "a 256x256 generation needs about", "is free")
    assert not (tmp_path / "out.png").exists()


def test_the_memory_plan_sizes_the_unet_tile(upscaler_export):
    """The plan sizes the U-Net at its tile: the untiled U-Net's activations grow with the picture,
    the tiled ones stay those of one tile."""
    from edgediff.runtime import memory

    pipe = Pipeline.load(upscaler_export, provider="cpu", memory="low")
    graphs = [("text_encoder", "text"), ("unet", "latent"), ("vae_decoder", "decode")]

    def unet_bytes(side, tile):
        shape = memory.Shape(1, side, side, True, graphs, True, latent_tile=tile)
        return pipe.planner.estimate(shape, set()).activations["unet"]

    assert unet_bytes(512, None) > 3 * unet_bytes(256, None)
    assert unet_bytes(512, 32) == unet_bytes(256, 32) == unet_bytes(128, None)


def test_python_errors(upscaler_export):
    pipe = Pipeline.load(upscaler_export, provider="cpu")
    with pytest.raises(EdgediffError, match="give it the picture to upscale"):
        pipe(PROMPT, steps=1)
    with pytest.raises(EdgediffError, match="noise_level must be a whole number >= 0, not 2.5"):
        pipe(PROMPT, image=picture(), noise_level=2.5, steps=1)
    with pytest.raises(EdgediffError, match="takes no mask"):
        pipe(PROMPT, image=picture(), mask=picture(), steps=1)
    plain = Pipeline.load(None, provider="cpu")  # the shipped default model
    with pytest.raises(EdgediffError, match="noise_level is for x4 upscaler models"):
        plain(PROMPT, noise_level=20, steps=1)


def test_server_and_batch_carry_the_noise_level(upscaler_export, tmp_path):
    """img2img's ``noise_level`` (edgediff's extension) and a job line's reach the request: each draws
    pipe(...)'s image at that level, which is not the default level's image."""
    import base64
    import io
    import json

    from fastapi.testclient import TestClient

    from edgediff.server import Limits, create_app

    pipe = Pipeline.load(upscaler_export, provider="cpu", memory="low")
    settings = dict(steps=2, guidance=5.0, seed=4, sampler="euler")
    expected = np.asarray(pipe(PROMPT, image=picture(), noise_level=60, **settings).images[0])
    default = np.asarray(pipe(PROMPT, image=picture(), **settings).images[0])
    assert not np.array_equal(expected, default)

    picture().save(tmp_path / "in.png")
    encoded = base64.b64encode((tmp_path / "in.png").read_bytes()).decode()
    with TestClient(create_app(pipe, limits=Limits(max_steps=50))) as client:
        done = client.post("/sdapi/v1/img2img", json={
            "prompt": PROMPT, "init_images": [encoded], "noise_level": 60, "steps": 2, "cfg_scale": 5.0,
            "seed": 4, "sampler_name": "euler"})
    assert done.status_code == 200, done.text
    served = Image.open(io.BytesIO(base64.b64decode(done.json()["images"][0])))
    np.testing.assert_array_equal(np.asarray(served.convert("RGB")), expected)
    assert "Noise level: 60" in served.info["parameters"]

    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"id": "up", "prompt": PROMPT, "image": "in.png", "noise_level": 60, "steps": 2,
                                "guidance": 5.0, "seed": 4, "sampler": "euler"}) + "\n")
    run = CliRunner().invoke(main, ["batch", str(jobs), "--out", str(tmp_path / "out"), "--model",
                                    str(upscaler_export)])
    assert run.exit_code == 0, run.output
    [written] = (tmp_path / "out").glob("up-*.png")
    np.testing.assert_array_equal(np.asarray(Image.open(written).convert("RGB")), expected)
