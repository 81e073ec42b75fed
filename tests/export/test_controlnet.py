"""ControlNet parity with diffusers' ControlNet pipelines, on tiny random models built here.

A ControlNet made with ``ControlNetModel.from_unet`` has zero output convolutions and so adds
nothing: they are re-drawn at random, as diffusers' own multi-ControlNet tests do. Each parity case
also shows the image moves clearly without the residuals (or with the neighbouring setting), so
the comparison could fail. fp32 must agree within 2e-3 (pixels in [0, 1]).
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from edgediff.runtime import ControlUnit, EdgediffError, Pipeline
from tiny_models import build_sdxl_pipeline, export_with_cli

TOLERANCE = 2e-3
MOVED = 10 * TOLERANCE  # what "clearly different" means here
PROMPT, NEGATIVE = "a red circle on a white background", "blurry, dark"
STEPS, GUIDANCE = 8, 7.5


def tiny_controlnet(unet, seed: int):
    """A ControlNet with the U-Net's encoder; hints at the tiny VAE's factor 2 (conditioning
    embedding of two widths), output convolutions re-drawn so its residuals are not zero."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    with torch.no_grad():  # the hint embedding's last convolution starts at zero too
        for conv in (*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block):
            conv.weight.normal_(0.0, 0.1)
            conv.bias.normal_(0.0, 0.1)
        controlnet.controlnet_cond_embedding.conv_out.weight.normal_(0.0, 3.0)
    return controlnet


def hint(seed: int, side: int = 32) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def sd1(tiny_store):
    """(diffusers folder, base export, {name: (ControlNet folder, its export)}): the session's tiny
    SD 1.x and ControlNets of seeds 11 and 12 (tiny_controlnet, as tiny_models.TinyStore makes them)."""
    nets = {name: tiny_store.controlnet(name, seed) for name, seed in (("a", 11), ("b", 12))}
    return tiny_store.source("sd1"), tiny_store.export("sd1", "fp32"), nets


def latents(seed: int = 7, side: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 4, side, side), dtype=np.float32)


_REFERENCES: dict = {}  # diffusers pipelines, loaded once per (source, ControlNets)
_PIPES: dict = {}  # our pipelines, once per (folder, memory): the tests share their sessions


def diffusers_image(source, nets, images, cls="StableDiffusionControlNetPipeline", **kwargs) -> np.ndarray:
    import diffusers
    from diffusers import ControlNetModel

    key = (str(source), tuple(map(str, nets)), cls)
    if key not in _REFERENCES:
        controlnet = [ControlNetModel.from_pretrained(folder) for folder in nets]
        pipe = getattr(diffusers, cls).from_pretrained(
            source, controlnet=controlnet[0] if len(nets) == 1 else controlnet,
            **({} if "XL" in cls else {"safety_checker": None}))
        pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        _REFERENCES[key] = pipe
    pipe = _REFERENCES[key]
    with torch.no_grad():
        return pipe(PROMPT, negative_prompt=NEGATIVE, image=images[0] if len(nets) == 1 else images,
                    num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=torch.from_numpy(latents()),
                    output_type="np", **kwargs).images


def ours(folder, control, memory="high", **kwargs) -> np.ndarray:
    key = (str(folder), memory)
    if key not in _PIPES:
        _PIPES[key] = Pipeline.load(folder, provider="cpu", memory=memory)
    pipe = _PIPES[key]
    return pipe(PROMPT, NEGATIVE, steps=STEPS, guidance=GUIDANCE, sampler="euler", latents=latents(),
                control=control, **kwargs).pixels


# (our units as {net: unit keywords}, diffusers' keyword arguments, a neighbouring setting of ours
# that must give another image)
CASES = {
    "scale 1.0": ({"a": {}}, {}, {"a": {"scale": 0.5}}),
    "scale 0.5": ({"a": {"scale": 0.5}}, {"controlnet_conditioning_scale": 0.5}, {"a": {}}),
    "guess mode": ({"a": {"guess_mode": True}}, {"guess_mode": True}, {"a": {}}),
    "start/end 0.2/0.8": ({"a": {"start": 0.2, "end": 0.8}},
                          {"control_guidance_start": 0.2, "control_guidance_end": 0.8}, {"a": {}}),
    "two ControlNets": ({"a": {"scale": 0.8}, "b": {"scale": 0.6}},
                        {"controlnet_conditioning_scale": [0.8, 0.6]}, {"a": {"scale": 0.8}}),
}
HINTS = {"a": 2, "b": 3}


def units(nets, spec, **extra):
    return [{"model": nets[name][1], "image": hint(HINTS[name]), **keywords, **extra} for name, keywords in spec.items()]


# memory="low" runs the guidance halves one at a time: guess mode must then skip the unconditional one.
@pytest.mark.parametrize("case,memory", [(case, "high") for case in sorted(CASES)] +
                         [("guess mode", "low"), ("two ControlNets", "low")])
def test_matches_diffusers(sd1, case, memory):
    source, base, nets = sd1
    spec, reference_kwargs, neighbour = CASES[case]
    expected = diffusers_image(source, [nets[n][0] for n in spec], [hint(HINTS[n]) for n in spec],
                               **reference_kwargs)
    actual = ours(base, units(nets, spec), memory=memory)
    assert np.abs(actual - expected).max() < TOLERANCE
    if memory == "high":  # the residuals and the setting under test both move the image
        assert np.abs(ours(base, None) - expected).max() > MOVED
        assert np.abs(ours(base, units(nets, neighbour)) - expected).max() > MOVED
    if memory == "high" and case != "start/end 0.2/0.8":  # the hint matters (over 4 of 8 steps: less)
        other_hints = [{**unit, "image": Image.new("RGB", (32, 32))} for unit in units(nets, spec)]
        assert np.abs(ours(base, other_hints) - expected).max() > MOVED


def test_plain_generation_matches_diffusers_with_and_without_the_session_cache(sd1):
    """The U-Net's residual inputs default to zeros: a plain run is diffusers' plain pipeline, also
    from the optimized graph the session cache saved (a second load)."""
    import diffusers

    source, base, _ = sd1
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(source, safety_checker=None)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        expected = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                        latents=torch.from_numpy(latents()), output_type="np").images
    for _ in range(2):  # the second load finds the optimized U-Net in the session cache
        actual = Pipeline.load(base, provider="cpu")(PROMPT, NEGATIVE, steps=STEPS, guidance=GUIDANCE,
                                                     sampler="euler", latents=latents()).pixels
        assert np.abs(actual - expected).max() < TOLERANCE


def test_fed_residuals_replace_the_zero_defaults(sd1):
    """ONNX Runtime keeps a graph input's default initializer un-folded: zeros fed equal nothing fed,
    other values change the output."""
    _, base, _ = sd1
    pipe = Pipeline.load(base, provider="cpu")
    entry = pipe.manifest.graphs["unet"]
    assert [s.name for s in entry.optional_inputs][-1] == "mid_block_residual"
    rng = np.random.default_rng(0)
    feed = {"sample": latents(), "timestep": np.array([500.0], np.float32),
            "encoder_hidden_states": rng.standard_normal((1, 77, 32), dtype=np.float32)}
    sizes = {"batch": 1, "latent_height": 16, "latent_width": 16}
    shape = lambda s: [sizes.get(a.split("/")[0], a) // int(a.split("/")[1]) if isinstance(a, str) and "/" in a  # noqa: E731
                       else sizes.get(a, a) for a in s.shape]
    zeros = {s.name: np.zeros(shape(s), np.float32) for s in entry.optional_inputs}
    ones = {s.name: np.ones(shape(s), np.float32) for s in entry.optional_inputs}
    with pipe.sessions.use("unet") as unet:
        plain, fed_zeros, fed_ones = (unet.run(**feed, **extra)[0] for extra in ({}, zeros, ones))
    assert np.array_equal(plain, fed_zeros)
    assert np.abs(fed_ones - plain).max() > 1e-2


def test_canny_preprocessor_matches_diffusers_fed_the_edges(sd1):
    cv2 = pytest.importorskip("cv2")
    source, base, nets = sd1
    picture = Image.new("RGB", (32, 32), "white")
    picture.paste((200, 20, 20), (8, 8, 24, 24))
    edges = cv2.Canny(np.asarray(picture), 100, 200)
    edge_image = Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))
    expected = diffusers_image(source, [nets["a"][0]], [edge_image])
    actual = ours(base, [ControlUnit(model=nets["a"][1], image=picture, preprocess="canny")])
    assert np.abs(actual - expected).max() < TOLERANCE
    assert np.abs(ours(base, [ControlUnit(model=nets["a"][1], image=picture)]) - expected).max() > MOVED


def test_manifest_records_the_residual_layout(sd1):
    _, base, nets = sd1
    manifest = json.loads((nets["a"][1] / "manifest.json").read_text())
    unet = json.loads((base / "manifest.json").read_text())["graphs"]["unet"]
    assert manifest["kind"] == "controlnet" and manifest["family"] == "sd"
    assert manifest["residuals"] == [{"name": s["name"], "channels": s["shape"][1]} for s in unet["optional_inputs"]]
    # tiny U-Net: conv_in, one layer and a downsampler in block 0, one layer in block 1; the mid block
    assert [r["channels"] for r in manifest["residuals"]] == [32, 32, 32, 64, 64]
    assert manifest["graphs"]["controlnet"]["validation"]["validated"]


@pytest.mark.parametrize("unit,message", [
    ({"image": "missing.png"}, "image not found: missing.png"),
    ({"image": b"not a picture"}, "image must be a PIL image"),
    ({"preprocess": "depth"}, "depth preprocessor needs an exported depth model: "),
    ({"preprocess": "sobel"}, "unknown control preprocessor 'sobel'"),
    ({"start": 0.8, "end": 0.2}, "start and end must satisfy 0 <= start < end <= 1"),
    ({"scale": float("nan")}, "scale must be a finite number"),
    ({"weight": 1.0}, "unknown keys ['weight']"),
])
def test_bad_units_are_one_line(sd1, unit, message):
    _, base, nets = sd1
    pipe = Pipeline.load(base, provider="cpu")
    with pytest.raises(EdgediffError) as error:
        pipe(PROMPT, steps=2, control=[{"model": nets["a"][1], "image": hint(2), **unit}])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_unreadable_control_image_file(sd1, tmp_path):
    _, base, nets = sd1
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(EdgediffError, match="cannot read image .*broken.png"):
        Pipeline.load(base, provider="cpu")(PROMPT, steps=2, control=[{"model": nets["a"][1],
                                                                       "image": tmp_path / "broken.png"}])


def test_canny_without_opencv_is_one_line(sd1, monkeypatch):
    import sys

    _, base, nets = sd1
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 now raises ImportError
    with pytest.raises(EdgediffError, match="^the canny preprocessor needs OpenCV: pip install opencv-python-headless"):
        Pipeline.load(base, provider="cpu")(PROMPT, steps=2, control=[{"model": nets["a"][1], "image": hint(2),
                                                                       "preprocess": "canny"}])


def test_model_exported_before_controlnet_says_re_export(sd1, tmp_path):
    _, base, nets = sd1
    old = shutil.copytree(base, tmp_path / "old")
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["graphs"]["unet"].pop("optional_inputs")
    (old / "manifest.json").write_text(json.dumps(manifest))
    pipe = Pipeline.load(old, provider="cpu")
    assert pipe(PROMPT, steps=2).images  # plain generation is unaffected
    with pytest.raises(EdgediffError, match="^this model was exported before ControlNet support .*re-export it"):
        pipe(PROMPT, steps=2, control=[{"model": nets["a"][1], "image": hint(2)}])


def test_folders_swapped_are_one_line(sd1):
    _, base, nets = sd1
    with pytest.raises(EdgediffError, match="holds a ControlNet, not a model"):
        Pipeline.load(nets["a"][1])
    with pytest.raises(EdgediffError, match="holds a model, not a ControlNet"):
        Pipeline.load(base, provider="cpu")(PROMPT, steps=2, control=[{"model": base, "image": hint(2)}])
    with pytest.raises(EdgediffError, match="ControlNet folder not found"):
        Pipeline.load(base, provider="cpu")(PROMPT, steps=2, control=[{"model": base / "nope", "image": hint(2)}])


@pytest.fixture(scope="module")
def sdxl(tiny_store, tmp_path_factory):
    """(diffusers folder, base export, ControlNet folder, its export) for a tiny SDXL (the session's)."""
    root = tmp_path_factory.mktemp("controlnet-sdxl")
    source, base = tiny_store.source("sdxl"), tiny_store.export("sdxl", "fp32")
    tiny_controlnet(build_sdxl_pipeline("sdxl").unet, 13).save_pretrained(root / "cn")
    return source, base, root / "cn", export_with_cli(root / "cn", root / "cn-fp32", "--precision", "fp32")


@pytest.mark.parametrize("guess_mode", [False, True])
def test_sdxl_matches_diffusers(sdxl, guess_mode):
    """SDXL's ControlNet also takes the pooled text and size ids (diffusers'
    StableDiffusionXLControlNetPipeline; guess mode gives it the conditional half's)."""
    source, base, net, exported = sdxl
    expected = diffusers_image(source, [net], [hint(2)], cls="StableDiffusionXLControlNetPipeline",
                               guess_mode=guess_mode)
    control = [{"model": exported, "image": hint(2), "guess_mode": guess_mode}]
    assert np.abs(ours(base, control) - expected).max() < TOLERANCE
    assert np.abs(ours(base, None) - expected).max() > MOVED
    assert json.loads((exported / "manifest.json").read_text())["family"] == "sdxl"


def test_controlnet_of_another_family_is_one_line(sd1, sdxl):
    _, sd1_base, sd1_nets = sd1
    _, sdxl_base, _, sdxl_net = sdxl
    for base, net, family in ((sd1_base, sdxl_net, "sdxl"), (sdxl_base, sd1_nets["a"][1], "sd")):
        with pytest.raises(EdgediffError, match=f"^ControlNet .* \\(family {family}, cross-attention \\d+\\) "
                                                "does not fit this .* model") as error:
            Pipeline.load(base, provider="cpu")(PROMPT, steps=2, control=[{"model": net, "image": hint(2)}])
        assert "\n" not in str(error.value)


def test_cli_control_gives_the_python_image_and_records_the_unit(sd1, tmp_path):
    """``--control FOLDER:IMAGE:SCALE`` is a unit; the PNG's infotext names it as sd-webui-controlnet does."""
    from click.testing import CliRunner

    from edgediff.cli import main
    from edgediff.runtime.metadata import parse_infotext, read_infotext

    _, base, nets = sd1
    hint(2).save(tmp_path / "hint.png")
    args = ["generate", PROMPT, "--model", base, "-o", tmp_path / "out.png", "--steps", 4, "--seed", 3,
            "--sampler", "euler", "--control", f"{nets['a'][1]}:{tmp_path / 'hint.png'}:0.5",
            "--control-start", 0.25, "--control-guess-mode"]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    expected = Pipeline.load(base, provider="cpu")(PROMPT, steps=4, seed=3, sampler="euler", control=[
        ControlUnit(nets["a"][1], tmp_path / "hint.png", scale=0.5, start=0.25, guess_mode=True)]).images[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png")), np.asarray(expected))
    sha256 = json.loads((nets["a"][1] / "manifest.json").read_text())["graphs"]["controlnet"]["sha256"]
    assert parse_infotext(read_infotext(tmp_path / "out.png"))["ControlNet 0"] == (
        f"Module: none, Model: cn-a-fp32 [{sha256[:8]}], Weight: 0.5, Resize Mode: Just Resize, "
        "Guidance Start: 0.25, Guidance End: 1, Control Mode: ControlNet is more important")


@pytest.mark.parametrize("flag,message", [
    ("nonsense", "--control takes FOLDER:IMAGE[:SCALE], not 'nonsense'"),
    ("{cn}:missing.png", "image not found: missing.png"),
])
def test_cli_bad_control_is_one_line(sd1, flag, message):
    from click.testing import CliRunner

    from edgediff.cli import main
    from helpers import assert_one_line_error

    _, base, nets = sd1
    result = CliRunner().invoke(main, ["generate", "x", "--model", str(base), "--steps", "2",
                                       "--control", flag.format(cn=nets["a"][1])])
    assert_one_line_error(result.exit_code, result.stderr.strip(), message)


@pytest.mark.parametrize("guess_mode", [False, True])
def test_sdxl_img2img_matches_diffusers(sdxl, monkeypatch, guess_mode):
    """StableDiffusionXLControlNetImg2ImgPipeline from the same noise (its default scale is 0.8:
    given here); the picture and the hint are both 32x32, the output's size."""
    import diffusers

    from helpers import feed_numpy_noise

    source, base, net, exported = sdxl
    reference = diffusers.StableDiffusionXLControlNetImg2ImgPipeline.from_pretrained(
        source, controlnet=diffusers.ControlNetModel.from_pretrained(net))
    reference.scheduler = diffusers.EulerDiscreteScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    feed_numpy_noise(monkeypatch, 3, "diffusers.pipelines.controlnet.pipeline_controlnet_sd_xl_img2img")
    with torch.no_grad():
        expected = reference(PROMPT, negative_prompt=NEGATIVE, image=hint(5), control_image=hint(2), strength=0.6,
                             num_inference_steps=STEPS, guidance_scale=GUIDANCE, controlnet_conditioning_scale=1.0,
                             guess_mode=guess_mode, output_type="np").images
    kwargs = dict(image=hint(5), strength=0.6, steps=STEPS, guidance=GUIDANCE, sampler="euler")
    pipe = Pipeline.load(base, provider="cpu")
    control = [{"model": exported, "image": hint(2), "guess_mode": guess_mode}]
    assert np.abs(pipe(PROMPT, NEGATIVE, control=control, rng=np.random.default_rng(3), **kwargs).pixels
                  - expected).max() < TOLERANCE
    assert np.abs(pipe(PROMPT, NEGATIVE, rng=np.random.default_rng(3), **kwargs).pixels - expected).max() > MOVED


# --- the depth preprocessor in a generation (exporter/depth.py, runtime/depth.py; tests/export/test_depth.py
# checks the depth maps themselves against transformers)

@pytest.fixture(scope="module")
def depth_model(tiny_store):
    """(transformers folder, its export) of a tiny Depth Anything (the session's, as test_depth.py's)."""
    return tiny_store.depth("depth-anything")


def test_depth_unit_matches_diffusers_fed_transformers_depth(sd1, depth_model):
    """preprocess="depth" with an exported depth model: diffusers' ControlNet pipeline fed the depth
    image transformers' depth-estimation pipeline makes (as diffusers' ControlNet depth example does)."""
    from transformers import AutoModelForDepthEstimation, DPTImageProcessorPil, pipeline

    source, base, nets = sd1
    depth_source, depth_folder = depth_model
    picture = hint(5, side=40)
    estimate = pipeline("depth-estimation", model=AutoModelForDepthEstimation.from_pretrained(depth_source),
                        image_processor=DPTImageProcessorPil.from_pretrained(depth_source))
    depth_image = estimate(picture)["depth"].convert("RGB")
    expected = diffusers_image(source, [nets["a"][0]], [depth_image], height=32, width=32)
    for memory in ("high", "low"):
        actual = ours(base, [ControlUnit(nets["a"][1], picture, preprocess="depth", preprocess_model=depth_folder)],
                      memory=memory)
        assert np.abs(actual - expected).max() < TOLERANCE
    assert np.abs(ours(base, [ControlUnit(nets["a"][1], picture)]) - expected).max() > MOVED


@pytest.mark.parametrize("unit,message", [
    ({"preprocess": "depth"}, "the depth preprocessor needs an exported depth model: export a transformers DPT or "
                              "Depth Anything folder with `edgediff export DEPTH_SRC DIR`"),
    ({"preprocess": "depth", "preprocess_model": "nowhere"}, "depth model folder not found: nowhere"),
    ({"preprocess": "depth", "preprocess_model": "{cn}"}, "holds a controlnet, not a depth model"),
    ({"preprocess": "none", "preprocess_model": "{cn}"}, "preprocess_model is the depth model of preprocess='depth'"),
])
def test_bad_depth_units_are_one_line(sd1, unit, message):
    _, base, nets = sd1
    unit = {k: str(nets["a"][1]) if v == "{cn}" else v for k, v in unit.items()}
    with pytest.raises(EdgediffError) as error:
        ours(base, [{"model": nets["a"][1], "image": hint(2), **unit}])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_cli_depth_flags(sd1, depth_model, tmp_path):
    """--control-preprocess depth --control-preprocess-model DIR gives the Python image; without the
    model it is one line naming the export and the flag."""
    from click.testing import CliRunner

    from edgediff.cli import main
    from helpers import assert_one_line_error

    _, base, nets = sd1
    hint(5, side=40).save(tmp_path / "picture.png")
    args = ["generate", PROMPT, "--model", str(base), "--steps", "3", "--seed", "4", "--sampler", "euler",
            "--control", f"{nets['a'][1]}:{tmp_path / 'picture.png'}", "--control-preprocess", "depth"]
    result = CliRunner().invoke(main, args)
    assert_one_line_error(result.exit_code, result.stderr.strip(), "edgediff export DEPTH_SRC DIR",
                          "--control-preprocess-model DIR")
    result = CliRunner().invoke(main, [*args, "--control-preprocess-model", str(depth_model[1]),
                                       "-o", str(tmp_path / "out.png")])
    assert result.exit_code == 0, result.output
    expected = Pipeline.load(base, provider="cpu")(PROMPT, steps=3, seed=4, sampler="euler", control=[ControlUnit(
        nets["a"][1], tmp_path / "picture.png", preprocess="depth", preprocess_model=depth_model[1])]).images[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png")), np.asarray(expected))
