"""ESRGAN-family pixel upscalers: `edgediff export ESRGAN.safetensors OUT` (exporter/esrgan.py) and the
torch-free tiled runtime (runtime/pixel_upscaler.py), against the torch module and, independently,
spandrel's loader (the one ComfyUI and chaiNNer use), on random weights built here; then as the
hires fix's upscaler."""
from __future__ import annotations

import importlib.util
import json
import re
import sys
import types

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file

from edgediff.cli import main
from edgediff.exporter.esrgan import RRDBNet
from edgediff.runtime import GenerationRequest, Pipeline, metadata
from edgediff.runtime.pixel_upscaler import PixelUpscaler, upscale_tiled
from helpers import assert_one_line_error

SMALL = dict(num_feat=16, num_block=2, num_grow_ch=32)  # spandrel fixes the growth at 32, as every published model
PICTURE = np.random.default_rng(3).random((21, 18, 3)).astype(np.float32)  # sides no tile divides


def random_rrdbnet(seed: int, **kwargs) -> RRDBNet:
    """Random weights scaled up from PyTorch's default init, so every block visibly changes the output."""
    torch.manual_seed(seed)
    module = RRDBNet(**{**SMALL, **kwargs}).eval()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.mul_(1.5)
    return module


def old_layout(state: dict) -> dict:
    """The original ESRGAN key names (model.0, model.1.sub.N.RDBk.convj.0, model.3, ...), written
    here from the layout of ESRGAN's RRDBNet_arch (upsample, conv, activation per upsampling)."""
    blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("body."))
    ups = sorted({k.split(".")[0] for k in state if k.startswith("conv_up")})
    tail = {name: f"model.{3 + 3 * i}" for i, name in enumerate(ups)}
    tail.update(conv_hr=f"model.{3 * len(ups) + 2}", conv_last=f"model.{3 * len(ups) + 4}",
                conv_first="model.0", conv_body=f"model.1.sub.{blocks}")
    out = {}
    for key, value in state.items():
        m = re.fullmatch(r"body\.(\d+)\.rdb(\d)\.conv(\d)\.(weight|bias)", key)
        if m:
            out[f"model.1.sub.{m[1]}.RDB{m[2]}.conv{m[3]}.0.{m[4]}"] = value
        else:
            layer, kind = key.rsplit(".", 1)
            out[f"{tail[layer]}.{kind}"] = value
    return out


VARIANTS = {  # name: (module arguments, key layout)
    "x4": (dict(), "new"),
    "x2-unshuffle": (dict(unshuffle=2), "new"),  # Real-ESRGAN x2plus: pixel-unshuffled input
    "x4-old-layout": (dict(), "old"),
    "x2-old-layout": (dict(num_up=1), "old"),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{variant: (torch module, weights file, exported folder)}, exported through the CLI with relative paths."""
    root = tmp_path_factory.mktemp("esrgan")
    out = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        for index, (name, (kwargs, layout)) in enumerate(VARIANTS.items()):
            module = random_rrdbnet(index, **kwargs)
            state = {k: v.contiguous() for k, v in module.state_dict().items()}
            save_file(old_layout(state) if layout == "old" else state, f"{name}.safetensors")
            run = CliRunner().invoke(main, ["export", f"{name}.safetensors", f"upscalers/{name}"])
            assert run.exit_code == 0, run.output
            out[name] = (module, root / f"{name}.safetensors", root / "upscalers" / name)
    return out


def torch_upscale(module: RRDBNet, pixels: np.ndarray, multiple: int) -> np.ndarray:
    """The reference: reflect-pad to the input multiple (as Real-ESRGAN), run, crop, clip."""
    height, width = pixels.shape[:2]
    padded = np.pad(pixels, ((0, -height % multiple), (0, -width % multiple), (0, 0)), mode="reflect")
    with torch.no_grad():
        y = module(torch.from_numpy(np.ascontiguousarray(padded.transpose(2, 0, 1)[None])))[0].numpy()
    scale = y.shape[1] // padded.shape[0]
    return np.clip(y[:, :height * scale, :width * scale].transpose(1, 2, 0), 0, 1)


def test_export_writes_a_validated_pixel_upscaler(exported):
    manifest = json.loads((exported["x2-unshuffle"][2] / "manifest.json").read_text())
    assert manifest["kind"] == "pixel_upscaler" and manifest["architecture"] == "RRDBNet"
    assert (manifest["scale"], manifest["multiple"], manifest["name"]) == (2, 2, "x2-unshuffle")
    assert manifest["hyperparameters"] == dict(in_channels=3, out_channels=3, num_feat=16, num_block=2,
                                               num_grow_ch=32, num_up=2, unshuffle=2)
    assert manifest["graphs"]["upscaler"]["validation"]["validated"]
    assert json.loads((exported["x2-old-layout"][2] / "manifest.json").read_text())["scale"] == 2


@pytest.mark.parametrize("variant", VARIANTS)
def test_onnx_upscale_equals_the_torch_module(exported, variant):
    module, _, folder = exported[variant]
    upscaler = PixelUpscaler.load(folder, provider="cpu")
    ours = upscaler.upscale_pixels(PICTURE, tile=0)
    expected = torch_upscale(module, PICTURE, upscaler.manifest.multiple)
    assert ours.shape == (21 * upscaler.manifest.scale, 18 * upscaler.manifest.scale, 3)
    assert np.abs(expected - np.clip(expected, 0.05, 0.95)).max() > 0  # not a flat picture
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5)


def _spandrel():
    """spandrel, imported with a stand-in for torchvision where none is installed: its package
    imports two architectures (LaMa, RestoreFormer) that name torchvision functions at import time;
    ESRGAN uses none of them. The stand-in leaves sys.modules afterwards."""
    if importlib.util.find_spec("spandrel") is None:
        return None
    stubbed = importlib.util.find_spec("torchvision") is None
    if stubbed:
        functional = types.ModuleType("torchvision.transforms.functional")
        functional.InterpolationMode = type("InterpolationMode", (), {"BILINEAR": "bilinear", "NEAREST": "nearest"})
        functional.rotate = functional.normalize = lambda *a, **k: None
        transforms = types.ModuleType("torchvision.transforms")
        transforms.functional = functional
        vision = types.ModuleType("torchvision")
        vision.transforms = transforms
        sys.modules.update({"torchvision": vision, "torchvision.transforms": transforms,
                            "torchvision.transforms.functional": functional})
    try:
        import spandrel
        return spandrel
    except ImportError:
        return None
    finally:
        if stubbed:
            for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
                sys.modules.pop(name, None)


@pytest.mark.parametrize("variant", VARIANTS)
def test_onnx_upscale_equals_spandrels_esrgan(exported, variant):
    """An independent reading of the same file: spandrel detects the architecture and its
    hyperparameters from the weights (either layout) and runs its own ESRGAN module."""
    spandrel = _spandrel()
    if spandrel is None:
        pytest.skip("spandrel is not installed (pip install --no-deps spandrel einops)")
    from safetensors.torch import load_file

    _, weights, folder = exported[variant]
    descriptor = spandrel.ModelLoader().load_from_state_dict(load_file(weights))
    assert descriptor.architecture.id == "ESRGAN"
    upscaler = PixelUpscaler.load(folder, provider="cpu")
    assert descriptor.scale == upscaler.manifest.scale
    x = PICTURE[:20, :18]  # spandrel pads odd sides for unshuffled inputs its own way
    with torch.no_grad():
        theirs = descriptor.model.eval()(torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)[None])))
    np.testing.assert_allclose(upscaler.upscale_pixels(x, tile=0), np.clip(theirs[0].numpy().transpose(1, 2, 0), 0, 1),
                               rtol=0, atol=1e-5)


def test_tiles_with_overlap_stay_close_to_one_run(exported):
    module, _, folder = exported["x4"]
    upscaler = PixelUpscaler.load(folder, provider="cpu")
    picture = np.random.default_rng(4).random((40, 52, 3)).astype(np.float32)
    whole = upscaler.upscale_pixels(picture, tile=0)
    calls = []
    runs = upscaler.session.run
    upscaler.session.run = lambda **feed: calls.append(feed["image"].shape) or runs(**feed)
    tiled = upscaler.upscale_pixels(picture, tile=16, overlap=8)
    assert len(calls) == 3 * 4 and set(calls) == {(1, 3, 32, 32)}  # every tile 16 + 2 x 8 context, one shape
    np.testing.assert_allclose(tiled, whole, rtol=0, atol=2e-3)
    # Without context each tile's border sees zero padding: the seams then show.
    seams = upscaler.upscale_pixels(picture, tile=16, overlap=0)
    assert np.abs(seams - whole).max() > 10 * np.abs(tiled - whole).max()


def test_upscale_tiled_puts_each_tile_in_its_place():
    x = np.arange(2 * 10 * 14, dtype=np.float32).reshape(1, 2, 10, 14)
    nearest = lambda part: part.repeat(3, axis=2).repeat(3, axis=3)  # noqa: E731  an upscaler without context
    np.testing.assert_array_equal(upscale_tiled(nearest, x, 3, tile=4, overlap=2), nearest(x))


def test_a_pickled_file_needs_allow_pickle(exported, tmp_path, monkeypatch):
    module, _, folder = exported["x4"]
    monkeypatch.chdir(tmp_path)
    torch.save({"params_ema": module.state_dict()}, "esrgan.pth")  # Real-ESRGAN's own .pth layout
    run = CliRunner().invoke(main, ["export", "esrgan.pth", "from-pickle"])
    assert_one_line_error(run.exit_code, run.stderr, "esrgan.pth is a pickled checkpoint", "--allow-pickle")
    assert not (tmp_path / "from-pickle").exists()
    run = CliRunner().invoke(main, ["export", "esrgan.pth", "from-pickle", "--allow-pickle"])
    assert run.exit_code == 0, run.output
    ours = PixelUpscaler.load("from-pickle", provider="cpu").upscale_pixels(PICTURE, tile=0)
    np.testing.assert_array_equal(ours, PixelUpscaler.load(folder, provider="cpu").upscale_pixels(PICTURE, tile=0))


def test_bad_upscaler_input_is_one_line(exported, tmp_path):
    folder = str(exported["x4"][2])
    run = CliRunner().invoke(main, ["generate", "a cat", "--model", folder])
    assert_one_line_error(run.exit_code, run.stderr, "holds a pixel upscaler, not a model", "--hires-upscaler")
    save_file({"body.0.rdb1.conv1.weight": torch.zeros(8, 16, 3, 3)}, str(tmp_path / "broken.safetensors"))
    run = CliRunner().invoke(main, ["export", str(tmp_path / "broken.safetensors"), str(tmp_path / "out")])
    assert_one_line_error(run.exit_code, run.stderr, "is not an RRDBNet")
    assert not (tmp_path / "out").exists()
    run = CliRunner().invoke(main, ["export", str(exported["x4"][1]), str(tmp_path / "out"), "--precision", "fp16"])
    assert_one_line_error(run.exit_code, run.stderr, "exports at fp32")


def test_hires_with_an_esrgan_folder_is_img2img_of_the_network_upscaled_picture(exported, tiny_exports):
    """txt2img, the network (x4, then Lanczos down to the hires size, as A1111's Upscaler.upscale),
    then img2img at that size: bit for bit."""
    folder = exported["x4"][2]
    pipe = Pipeline.load(tiny_exports["sd1", "fp32"], provider="cpu")
    first_pass = dict(steps=4, guidance=6.0, sampler="euler_a", width=32, height=24, seed=7)
    result = pipe("a blue square", hires=dict(scale=2, strength=0.5, upscaler=str(folder)), **first_pass)
    first = pipe("a blue square", **first_pass)
    picture = PixelUpscaler.load(folder, provider="cpu")(first.images[0])
    assert picture.size == (128, 96)
    picture = picture.resize((64, 48), Image.LANCZOS)
    second = pipe.generate(GenerationRequest("a blue square", **{**first_pass, "width": 64, "height": 48},
                                             image=picture, strength=0.5))
    np.testing.assert_array_equal(result.pixels, second.pixels)
    lanczos = pipe("a blue square", hires=dict(scale=2, strength=0.5, upscaler="lanczos"), **first_pass)
    assert np.abs(lanczos.pixels - result.pixels).max() > 1e-2  # the network's picture is another
    assert "Hires upscaler: x4" in metadata.result_infotext(result)


def test_the_runtime_upscales_without_torch(exported):
    import subprocess
    import textwrap

    from torch_blocker import BLOCK_TORCH

    script = BLOCK_TORCH + textwrap.dedent(f"""
        from PIL import Image
        from edgediff.runtime.pixel_upscaler import PixelUpscaler
        print(PixelUpscaler.load({str(exported["x2-unshuffle"][2])!r}, provider="cpu")(Image.new("RGB", (21, 14))).size)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "(42, 28)"
