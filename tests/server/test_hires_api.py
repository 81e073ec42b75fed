"""The hires fix through the A1111 API: webuiapi's ``txt2img(enable_hr=True, ...)`` gives the CLI's image."""
from __future__ import annotations

import numpy as np
import pytest
import requests
import webuiapi
from click.testing import CliRunner
from PIL import Image

from live_server import running
from edgediff.cli import main
from edgediff.server import Limits, create_app

PROMPT = "a red circle on a white background"


@pytest.fixture(scope="module")
def server(default_pipe):
    with running(create_app(default_pipe, limits=Limits(max_steps=50, max_side=256, max_queue=1))) as url:
        yield url


def client(url):
    host, port = url.rsplit("//", 1)[1].split(":")
    return webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler a", steps=4)


def test_txt2img_with_enable_hr_gives_the_clis_image(server, tmp_path):
    result = client(server).txt2img(prompt=PROMPT, seed=42, width=128, height=128, cfg_scale=7.0, enable_hr=True,
                                    hr_scale=1.5, hr_upscaler="Latent (bicubic)", hr_second_pass_steps=3,
                                    denoising_strength=0.6)
    assert result.image.size == (192, 192)
    text = result.image.info["parameters"]
    assert "Size: 128x128" in text and "Denoising strength: 0.6, Hires upscale: 1.5, Hires steps: 3, " \
        "Hires upscaler: Latent (bicubic)" in text
    assert result.info["denoising_strength"] == 0.6

    out = tmp_path / "cli.png"
    run = CliRunner().invoke(main, ["generate", PROMPT, "--seed", "42", "--steps", "4", "--guidance", "7",
                                    "--sampler", "Euler a", "--width", "128", "--height", "128", "--hires-scale",
                                    "1.5", "--hires-upscaler", "Latent (bicubic)", "--hires-steps", "3",
                                    "--hires-strength", "0.6", "--provider", "cpu", "--memory", "high",
                                    "-o", str(out)])
    assert run.exit_code == 0, run.stderr
    with Image.open(out) as cli_image:
        np.testing.assert_array_equal(np.asarray(result.image.convert("RGB")), np.asarray(cli_image.convert("RGB")))
        assert cli_image.info["parameters"] == text


@pytest.mark.parametrize("fields,message", [
    (dict(hr_upscaler="ESRGAN_4x"), "unknown hires upscaler 'ESRGAN_4x'"),
    (dict(hr_scale=100), "hires scale must be a number from 1 to 8, not 100.0"),
    (dict(hr_second_pass_steps=99), "hr_second_pass_steps must be at most 50, not 99"),
    (dict(hr_scale=4), "hires width must be at most 256, not 512"),
])
def test_bad_hires_fields_are_a_422_with_one_line(server, fields, message):
    response = requests.post(f"{server}/sdapi/v1/txt2img", json=dict(prompt="x", steps=2, enable_hr=True, **fields),
                             timeout=60)
    assert response.status_code == 422
    assert message in response.json()["detail"]
