"""sd-webui-controlnet's API on the real server, driven by webuiapi's ``ControlNetUnit`` on a tiny
random model and ControlNet (tests/export/test_controlnet.py builds them the same way).

Each case also shows that the image moves without the unit, so a server that ignored it would fail.
"""
from __future__ import annotations

import base64
import io
import json
import shutil

import numpy as np
import pytest
import requests
import webuiapi
from click.testing import CliRunner
from PIL import Image

from live_server import running
from edgediff.cli import main
from edgediff.runtime import ControlUnit, Pipeline
from edgediff.server import create_app

pytest.importorskip("diffusers")
from test_controlnet import hint  # noqa: E402

PROMPT = "a red circle on a white background"
SMALL = dict(width=32, height=32, steps=4, cfg_scale=7.0, seed=42)


@pytest.fixture(scope="module")
def setup(tiny_store, tmp_path_factory):
    """(base export, its pipeline, the ControlNet's folder and listed title, the server's URL): the
    session's tiny SD 1.x export and a copy of its seed-11 ControlNet export (test_controlnet.py's)."""
    root = tmp_path_factory.mktemp("cn-server")
    base = tiny_store.export("sd1", "fp32")
    nets = root / "controlnets"
    net = shutil.copytree(tiny_store.controlnet("a", 11)[1], nets / "cn-a")
    # A ControlNet of another family (an SDXL one, as its manifest says) and a folder that is no export
    foreign = shutil.copytree(net, nets / "cn-xl")
    manifest = json.loads((foreign / "manifest.json").read_text())
    (foreign / "manifest.json").write_text(json.dumps({**manifest, "family": "sdxl", "cross_attention_dim": 2048}))
    (nets / "notes").mkdir()
    sha256 = json.loads((net / "manifest.json").read_text())["graphs"]["controlnet"]["sha256"]
    pipe = Pipeline.load(base, provider="cpu", memory="high")
    with running(create_app(pipe, controlnet_dir=nets)) as url:
        yield base, pipe, net, f"cn-a [{sha256[:8]}]", url


def client(url):
    host, port = url.rsplit("//", 1)[1].split(":")
    return webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler a", steps=4)


def fresh():
    """webuiapi writes the units into its ``alwayson_scripts={}`` default, which then stays in every
    later call of any client in this process (other test modules' too): always give a new one."""
    return {"alwayson_scripts": {}}


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_a_webuiapi_unit_gives_the_clis_image(setup, tmp_path):
    base, _, net, title, url = setup
    unit = webuiapi.ControlNetUnit(image=hint(2), module="none", model=title, weight=0.5, guidance_start=0.25,
                                   resize_mode="Just Resize")
    result = client(url).txt2img(prompt=PROMPT, controlnet_units=[unit], **SMALL, **fresh())
    hint(2).save(tmp_path / "hint.png")
    out = tmp_path / "cli.png"
    run = CliRunner().invoke(main, ["generate", PROMPT, "--model", str(base), "--seed", "42", "--steps", "4",
                                    "--guidance", "7", "--sampler", "Euler a", "--width", "32", "--height", "32",
                                    "--control", f"{net}:{tmp_path / 'hint.png'}:0.5", "--control-start", "0.25",
                                    "--provider", "cpu", "--memory", "high", "-o", str(out)])
    assert run.exit_code == 0, run.stderr
    with Image.open(out) as cli_image:
        np.testing.assert_array_equal(pixels(result.image), pixels(cli_image))
        assert cli_image.info["parameters"] == result.image.info["parameters"]
    assert 'ControlNet 0: "Module: none, Model: ' + title + ", Weight: 0.5," in result.info["infotexts"][0]
    plain = client(url).txt2img(prompt=PROMPT, **SMALL, **fresh())
    assert np.abs(pixels(plain.image).astype(int) - pixels(result.image)).max() > 5


def test_img2img_unit_without_image_controls_with_the_init_image(setup):
    """sd-webui-controlnet's rule: an img2img unit with no image of its own takes the init image;
    "ControlNet is more important" is guess mode."""
    _, pipe, net, title, url = setup
    start = hint(5)
    unit = webuiapi.ControlNetUnit(image=None, model=title, control_mode=2, guidance_end=0.75)
    result = client(url).img2img(images=[start], prompt=PROMPT, denoising_strength=0.6, controlnet_units=[unit],
                                 **SMALL, **fresh())
    direct = pipe(PROMPT, steps=4, guidance=7.0, sampler="euler_a", seed=42, image=start, strength=0.6,
                  control=[ControlUnit(net, start, end=0.75, guess_mode=True)]).images[0]
    np.testing.assert_array_equal(pixels(result.image), pixels(direct))
    plain = pipe(PROMPT, steps=4, guidance=7.0, sampler="euler_a", seed=42, image=start, strength=0.6).images[0]
    assert np.abs(pixels(plain).astype(int) - pixels(direct)).max() > 5


def test_canny_thresholds_and_crop_resize(setup):
    """threshold_a/b are canny's thresholds; "Crop and Resize" cuts the hint's centre to the
    output's aspect ratio (sd-webui-controlnet's default mode in its UI)."""
    cv2 = pytest.importorskip("cv2")
    _, pipe, net, title, url = setup
    wide = Image.fromarray(np.random.default_rng(4).integers(20, 60, (32, 48, 3), dtype=np.uint8))
    unit = webuiapi.ControlNetUnit(image=wide, module="canny", model="cn-a", threshold_a=50, threshold_b=150,
                                   resize_mode="Crop and Resize")
    result = client(url).txt2img(prompt=PROMPT, controlnet_units=[unit], **SMALL, **fresh())
    centre = np.asarray(wide.crop((8, 0, 40, 32)))
    edges = Image.fromarray(np.repeat(cv2.Canny(centre, 50, 150)[:, :, None], 3, axis=2))
    direct = pipe(PROMPT, steps=4, guidance=7.0, sampler="euler_a", seed=42, width=32, height=32,
                  control=[ControlUnit(net, edges)]).images[0]
    np.testing.assert_array_equal(pixels(result.image), pixels(direct))
    default_edges = Image.fromarray(np.repeat(cv2.Canny(centre, 100, 200)[:, :, None], 3, axis=2))
    assert not np.array_equal(np.asarray(edges), np.asarray(default_edges))  # the thresholds matter here


def test_model_and_module_lists(setup):
    *_, title, url = setup
    api = client(url)
    assert api.controlnet_model_list() == [title, title.replace("cn-a", "cn-xl")]
    assert api.controlnet_module_list() == ["none", "canny"]  # no --control-depth-model given


def _unit(title, **fields):
    return {**webuiapi.ControlNetUnit(image=hint(2), model=title).to_dict(), **fields}


@pytest.mark.parametrize("fields,message", [
    (dict(model="control_v11p_sd15_canny"), "controlnet unit 0: unknown ControlNet model 'control_v11p_sd15_canny'; "
                                            "this server has: cn-a ["),
    (dict(model="None"), "controlnet unit 0 names no model; choose one of /controlnet/model_list"),
    (dict(image="not base64!"), "controlnet unit 0 image is not valid base64"),
    (dict(image=base64.b64encode(b"GIF89a...").decode()), "controlnet unit 0 image is not a PNG, JPEG or WebP image"),
    (dict(image=""), "controlnet unit 0 has no image"),
    (dict(model="cn-xl"), "(family sdxl, cross-attention 2048) does not fit this sd1 model"),
    (dict(control_mode="My prompt is more important"), "control_mode 'My prompt is more important' is not supported"),
    (dict(module="openpose"), "controlnet unit 0: unknown module 'openpose'"),
    (dict(weight="strong"), "control unit 0: scale must be a finite number, not 'strong'"),
    (dict(guidance_start=0.9, guidance_end=0.1), "control unit 0: start and end must satisfy 0 <= start < end <= 1"),
])
def test_bad_units_are_a_422_with_one_line(setup, fields, message):
    *_, title, url = setup
    body = dict(prompt="x", steps=2, width=32, height=32,
                alwayson_scripts={"controlnet": {"args": [_unit(title, **fields)]}})
    response = requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=60)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert message in detail and "\n" not in detail


def test_disabled_units_and_other_scripts_change_nothing(setup):
    *_, title, url = setup
    plain = requests.post(f"{url}/sdapi/v1/txt2img", json=dict(prompt=PROMPT, **SMALL), timeout=60).json()
    body = dict(prompt=PROMPT, **SMALL, alwayson_scripts={
        "ControlNet": {"args": [_unit(title, enabled=False)]}, "Self Attention Guidance": {"args": [True]}})
    skipped = requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=60).json()
    decode = lambda answer: pixels(Image.open(io.BytesIO(base64.b64decode(answer["images"][0]))))  # noqa: E731
    np.testing.assert_array_equal(decode(plain), decode(skipped))


def test_depth_modules_take_the_depth_model(setup, tmp_path):
    """Any depth* module is the runtime's depth preprocessor, with --control-depth-model's folder."""
    import asyncio

    from edgediff.server import schemas
    from edgediff.server.controlnet import ControlNetApi

    _, _, net, title, _ = setup
    req = schemas.Txt2ImgRequest(prompt="x", alwayson_scripts={"controlnet": {"args": [
        _unit(title, module="depth_midas", weight=0.7)]}})
    [unit] = ControlNetApi(net.parent, tmp_path, 32, 10**6).units(req, None)
    assert (unit["preprocess"], unit["preprocess_model"], unit["scale"]) == ("depth", str(tmp_path), 0.7)
    [unit] = ControlNetApi(net.parent, None, 32, 10**6).units(req, None)
    assert unit["preprocess"] == "depth" and "preprocess_model" not in unit
    modules = asyncio.run(ControlNetApi(net.parent, tmp_path, 32, 10**6).module_list())["module_list"]
    assert "depth" in modules and "depth_midas" in modules


def test_serve_flags_name_missing_folders():
    for flag in ("--controlnet-dir", "--control-depth-model"):
        result = CliRunner().invoke(main, ["serve", flag, "no-such-folder"])
        assert result.exit_code == 1 and result.stderr.strip().splitlines() == [
            f"error: {flag} no-such-folder is not a folder"]
