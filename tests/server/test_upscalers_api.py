"""Pixel upscalers on the server: `--upscaler-dir` folders listed by /sdapi/v1/upscalers, named by
hr_upscaler (the CLI's image with --hires-upscaler FOLDER), and never given as a path."""
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

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def upscaler_dir(tmp_path_factory):
    from safetensors.torch import save_file

    from edgediff.exporter.esrgan import RRDBNet
    from edgediff.exporter.export import export_model

    root = tmp_path_factory.mktemp("upscalers")
    torch.manual_seed(0)
    module = RRDBNet(num_feat=16, num_block=1, num_grow_ch=32)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(root / "tiny-x4.safetensors"))
    export_model(str(root / "tiny-x4.safetensors"), root / "models" / "tiny-x4", precision=None, log=lambda line: None)
    return root / "models"


@pytest.fixture(scope="module")
def server(default_pipe, upscaler_dir):
    app = create_app(default_pipe, limits=Limits(max_steps=50, max_side=256, max_queue=1), upscaler_dir=upscaler_dir)
    with running(app) as url:
        yield url


def test_upscalers_are_listed_as_a1111_lists_them(server):
    listed = requests.get(f"{server}/sdapi/v1/upscalers", timeout=30).json()
    assert [item["name"] for item in listed] == ["Lanczos", "Nearest", "tiny-x4"]
    assert listed[2]["scale"] == 4 and listed[2]["model_name"] == "tiny-x4" and listed[2]["model_path"] is None
    modes = [item["name"] for item in requests.get(f"{server}/sdapi/v1/latent-upscale-modes", timeout=30).json()]
    assert modes[:3] == ["Latent", "Latent (antialiased)", "Latent (bicubic)"]


def test_txt2img_with_an_esrgan_hr_upscaler_gives_the_clis_image(server, upscaler_dir, tmp_path):
    host, port = server.rsplit("//", 1)[1].split(":")
    api = webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler a", steps=3)
    result = api.txt2img(prompt="a red circle", seed=5, width=128, height=128, cfg_scale=7.0, enable_hr=True,
                         hr_scale=1.5, hr_upscaler="tiny-x4", hr_second_pass_steps=2, denoising_strength=0.5)
    assert result.image.size == (192, 192) and "Hires upscaler: tiny-x4" in result.image.info["parameters"]
    out = tmp_path / "cli.png"
    run = CliRunner().invoke(main, ["generate", "a red circle", "--seed", "5", "--steps", "3", "--guidance", "7",
                                    "--sampler", "Euler a", "--width", "128", "--height", "128", "--hires-scale",
                                    "1.5", "--hires-upscaler", str(upscaler_dir / "tiny-x4"), "--hires-steps", "2",
                                    "--hires-strength", "0.5", "--provider", "cpu", "--memory", "high", "-o", str(out)])
    assert run.exit_code == 0, run.stderr
    with Image.open(out) as cli_image:
        np.testing.assert_array_equal(np.asarray(result.image.convert("RGB")), np.asarray(cli_image.convert("RGB")))
        assert cli_image.info["parameters"] == result.image.info["parameters"]


@pytest.mark.parametrize("name", ["ESRGAN_4x", "PATH"])
def test_an_unknown_upscaler_or_a_path_is_a_422(server, upscaler_dir, name):
    name = str(upscaler_dir / "tiny-x4") if name == "PATH" else name  # a path on the server is not a name
    response = requests.post(f"{server}/sdapi/v1/txt2img", timeout=60,
                             json=dict(prompt="x", steps=2, enable_hr=True, hr_upscaler=name))
    assert response.status_code == 422
    assert f"unknown hires upscaler {name[:100]!r}" in response.json()["detail"]
    assert "or an upscaler of this server: tiny-x4" in response.json()["detail"]
