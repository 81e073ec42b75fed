"""InstructPix2Pix: an 8-channel U-Net fed the picture's latent, with text and image guidance,
against diffusers' StableDiffusionInstructPix2PixPipeline on a tiny random model."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from edgediff.cli import main
from edgediff.runtime import EdgediffError, Pipeline
from helpers import FP32_TOLERANCE, assert_one_line_error, feed_numpy_noise
from tiny_models import build_pipeline, export_with_cli

PROMPT, STEPS, GUIDANCE = "make it winter", 8, 6.0
PIX2PIX_MODULE = "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_instruct_pix2pix"


@pytest.fixture(scope="module")
def pix2pix_source(tmp_path_factory):
    """The tiny SD 1.x model with an 8-channel U-Net (latent + picture latent), saved as diffusers'
    StableDiffusionInstructPix2PixPipeline."""
    from diffusers import StableDiffusionInstructPix2PixPipeline, UNet2DConditionModel

    base = build_pipeline("sd1")
    torch.manual_seed(1)
    unet = UNet2DConditionModel.from_config({**base.unet.config, "in_channels": 8})
    folder = tmp_path_factory.mktemp("sources") / "sd1-pix2pix"
    StableDiffusionInstructPix2PixPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=unet, scheduler=base.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pix2pix_export(pix2pix_source, tmp_path_factory):
    return export_with_cli(pix2pix_source, tmp_path_factory.mktemp("exports") / "pix2pix", "--precision", "fp32")


def picture():
    return Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8))


def test_export_declares_eight_channels(pix2pix_export):
    pipe = Pipeline.load(pix2pix_export, provider="cpu")
    sample = next(s for s in pipe.manifest.graphs["unet"].inputs if s.name == "sample")
    assert sample.shape[1] == 8


@pytest.mark.parametrize("image_guidance", [1.0, 1.5])
@pytest.mark.parametrize("memory", ["high", "low"])
def test_matches_diffusers_instruct_pix2pix(pix2pix_source, pix2pix_export, monkeypatch, image_guidance, memory):
    import diffusers

    reference = diffusers.StableDiffusionInstructPix2PixPipeline.from_pretrained(pix2pix_source, safety_checker=None)
    reference.scheduler = diffusers.EulerDiscreteScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    feed_numpy_noise(monkeypatch, 3, PIX2PIX_MODULE)
    with torch.no_grad():
        expected = reference(PROMPT, image=picture(), num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                             image_guidance_scale=image_guidance, output_type="np").images

    pipe = Pipeline.load(pix2pix_export, provider="cpu", memory=memory)
    actual = pipe(PROMPT, image=picture(), steps=STEPS, guidance=GUIDANCE, image_guidance=image_guidance,
                  sampler="euler", rng=np.random.default_rng(3)).pixels
    assert np.abs(actual - expected).max() < FP32_TOLERANCE
    # Both guidances matter: another image guidance, or no picture latent, gives another image.
    other = pipe(PROMPT, image=picture(), steps=STEPS, guidance=GUIDANCE, image_guidance=image_guidance + 1.0,
                 sampler="euler", rng=np.random.default_rng(3)).pixels
    assert np.abs(other - expected).max() > 5 * FP32_TOLERANCE


def test_cli_edits_a_picture(pix2pix_export, tmp_path):
    source = tmp_path / "in.png"
    picture().save(source)
    out = tmp_path / "out.png"
    run = CliRunner().invoke(main, ["generate", PROMPT, "--image", str(source), "--image-guidance", "1.5",
                                    "--steps", "4", "--seed", "2", "--sampler", "euler", "--model",
                                    str(pix2pix_export), "--provider", "cpu", "-o", str(out)])
    assert run.exit_code == 0, run.output
    pipe = Pipeline.load(pix2pix_export, provider="cpu", memory="low")
    expected = pipe(PROMPT, image=picture(), image_guidance=1.5, steps=4, seed=2, sampler="euler").images[0]
    with Image.open(out) as image:
        np.testing.assert_array_equal(np.asarray(image.convert("RGB")), np.asarray(expected))
        assert "Image CFG scale: 1.5" in image.info["parameters"]  # A1111's name for it


def test_from_png_reads_the_image_guidance_back(pix2pix_export, tmp_path):
    """Not the default 1.5: a --from-png run that dropped "Image CFG scale" would draw another image."""
    source, first, again = tmp_path / "in.png", tmp_path / "first.png", tmp_path / "again.png"
    picture().save(source)
    common = ["--image", str(source), "--model", str(pix2pix_export), "--provider", "cpu"]
    run = CliRunner().invoke(main, ["generate", PROMPT, "--image-guidance", "3", "--steps", "3", "--seed", "5",
                                    "--sampler", "euler", *common, "-o", str(first)])
    assert run.exit_code == 0, run.output
    run = CliRunner().invoke(main, ["generate", "--from-png", str(first), *common, "-o", str(again)])
    assert run.exit_code == 0, run.output
    with Image.open(again) as image, Image.open(first) as expected:
        assert "Image CFG scale: 3.0" in expected.info["parameters"]
        np.testing.assert_array_equal(np.asarray(image.convert("RGB")), np.asarray(expected.convert("RGB")))


def test_image_guidance_on_a_model_without_a_picture_input_is_one_line(tiny_exports, tmp_path):
    source = tmp_path / "in.png"
    picture().save(source)
    run = CliRunner().invoke(main, ["generate", PROMPT, "--image", str(source), "--image-guidance", "1.5",
                                    "--steps", "2", "--model", str(tiny_exports["sd1", "fp32"]), "--provider", "cpu"])
    assert_one_line_error(run.exit_code, run.stderr, "image guidance needs an InstructPix2Pix model",
                          "takes 4 input channels")


def test_pix2pix_needs_a_picture(pix2pix_export):
    pipe = Pipeline.load(pix2pix_export, provider="cpu")
    with pytest.raises(EdgediffError, match="edits a picture: give it an image"):
        pipe(PROMPT, steps=2)
    with pytest.raises(EdgediffError, match="image guidance must be a number from 0 to 100, not -1"):
        pipe(PROMPT, image=picture(), image_guidance=-1, steps=2)


@pytest.mark.parametrize("image_guidance,groups", [(1.5, 3), (0.5, 1)])
def test_the_memory_plan_sizes_the_unet_for_its_guidance_groups(pix2pix_export, image_guidance, groups):
    """Image guidance >= 1 runs three groups in one U-Net batch (memory="high"), below 1 one group,
    as diffusers: the plan's U-Net activations are those of that batch, not of classifier-free
    guidance's two."""
    pipe = Pipeline.load(pix2pix_export, provider="cpu", memory="high")
    pipe(PROMPT, image=picture(), steps=2, guidance=GUIDANCE, image_guidance=image_guidance, sampler="euler", seed=1)
    stages, context = pipe.planner.stages(pipe._shape(1, 32, 32, True, pipe._mode_for(False), None))
    f = pipe.manifest.vae_scale_factor
    sized = {}
    for batch in (1, 2, 3):  # activations, and the CPU arena's second score matrix (memory.estimate)
        activations, _, scratch = pipe.planner.profiles["unet"].activation_bytes(batch, 32 // f, 32 // f, context)
        sized[batch] = activations + scratch
    assert len(set(sized.values())) == 3  # the batch changes the estimate
    assert pipe.memory_plan.activations["unet"] == sized[groups]


def test_server_reads_a1111_image_cfg_scale(pix2pix_export, tmp_path):
    """A1111's img2img field reaches the request on an InstructPix2Pix model (clients send it for every
    model: on others it is ignored, as A1111 does; tests/server/test_api.py sends webuiapi's default)."""
    import base64
    import io

    from fastapi.testclient import TestClient

    from edgediff.server import Limits, create_app

    pipe = Pipeline.load(pix2pix_export, provider="cpu")
    picture().save(tmp_path / "in.png")
    body = {"prompt": PROMPT, "init_images": [base64.b64encode((tmp_path / "in.png").read_bytes()).decode()],
            "steps": 3, "seed": 5, "sampler_name": "euler", "cfg_scale": 7.5, "image_cfg_scale": 3.0}
    with TestClient(create_app(pipe, limits=Limits(max_steps=50))) as client:
        done = client.post("/sdapi/v1/img2img", json=body)
    assert done.status_code == 200, done.text
    served = Image.open(io.BytesIO(base64.b64decode(done.json()["images"][0])))
    expected = pipe(PROMPT, image=picture(), image_guidance=3.0, steps=3, seed=5, sampler="euler").images[0]
    np.testing.assert_array_equal(np.asarray(served.convert("RGB")), np.asarray(expected))
    assert "Image CFG scale: 3.0" in served.info["parameters"]
