"""The ``depth`` preprocessor: a transformers depth estimator exported (exporter/depth.py) and run
without torch (runtime/depth.py), against transformers' own ``depth-estimation`` pipeline (the model
and its image processor) on the same picture, for tiny random DPT and Depth Anything models.

The picture is not square and not the processor's size, so the resize (and, for Depth Anything,
the kept aspect ratio and multiple of 14), normalisation, the graph at a size other than its
trace's, and the bicubic resize back all take part. Each case also shows that a neighbouring
processor setting moves the depth well past the tolerance, so the comparison could fail.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from edgediff.runtime import EdgediffError
from tiny_models import DEPTH_PROCESSORS

TOLERANCE = 1e-4  # relative to the depth map's peak, fp32
KINDS = ("dpt", "depth-anything")


@pytest.fixture(scope="module")
def depth_models(tiny_store):
    """{kind: (transformers folder, export)}: the session's (test_controlnet.py's depth unit uses one)."""
    return {kind: tiny_store.depth(kind) for kind in KINDS}


def picture(seed: int = 0, size=(77, 45)) -> Image.Image:
    """Smooth colours plus noise: a depth model's features then vary across the picture."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]]
    base = np.stack([x * 255 / size[0], y * 255 / size[1], (x + y) * 127 / sum(size)], axis=2)
    return Image.fromarray(np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8))


def estimator(folder, processor: dict | None = None):
    from edgediff.runtime.depth import DepthEstimator, read_depth_manifest
    from edgediff.runtime.sessions import GraphSession

    manifest = read_depth_manifest(folder)
    manifest.processor.update(processor or {})
    session = GraphSession("depth", folder.resolve(), manifest.graphs["depth"], "cpu", manifest.optimized_for,
                           warn=print)
    return DepthEstimator(manifest, session)


def transformers_depth(source, image):
    """transformers' pipeline: the model, its image processor (PIL backend), post-processing."""
    from transformers import AutoModelForDepthEstimation, DPTImageProcessorPil, pipeline

    model = AutoModelForDepthEstimation.from_pretrained(source).eval()
    out = pipeline("depth-estimation", model=model, image_processor=DPTImageProcessorPil.from_pretrained(source))(image)
    return out["predicted_depth"].numpy(), out["depth"]


@pytest.mark.parametrize("kind", KINDS)
def test_depth_matches_transformers(depth_models, kind):
    source, exported = depth_models[kind]
    image = picture()
    expected, expected_hint = transformers_depth(source, image)
    ours = estimator(exported)
    depth = ours.depth(image)
    assert depth.shape == expected.shape == (45, 77)
    peak = np.abs(expected).max()
    assert np.abs(depth - expected).max() <= TOLERANCE * peak
    hint = np.asarray(ours(image))
    assert hint.shape == (45, 77, 3) and (hint == hint[:, :, :1]).all()
    # 8-bit truncation of equal depths within TOLERANCE: at most one level apart
    assert np.abs(hint[:, :, 0].astype(int) - np.asarray(expected_hint, dtype=int)).max() <= 1
    assert np.asarray(expected_hint).std() > 10  # the map is not flat: the comparison means something
    # (DPT's ViT takes square grids only: its processor resizes to a square, so that setting stays)
    neighbours = [{"image_mean": [0.3, 0.3, 0.3]}, {"resample": 2}]
    if DEPTH_PROCESSORS[kind]["keep_aspect_ratio"]:
        neighbours.append({"keep_aspect_ratio": False})
    for neighbour in neighbours:
        moved = estimator(exported, neighbour).depth(image)
        assert np.abs(moved - expected).max() > 10 * TOLERANCE * peak, neighbour


def test_manifest_carries_the_processor_and_the_validation(depth_models):
    source, exported = depth_models["depth-anything"]
    manifest = json.loads((exported / "manifest.json").read_text())
    processor = json.loads((source / "preprocessor_config.json").read_text())
    assert manifest["kind"] == "depth" and manifest["architecture"] == "DepthAnythingForDepthEstimation"
    for key in ("size", "keep_aspect_ratio", "ensure_multiple_of", "resample", "image_mean", "image_std",
                "rescale_factor", "do_normalize", "do_pad"):
        assert manifest["processor"][key] == processor[key], key
    validation = manifest["graphs"]["depth"]["validation"]
    assert validation["validated"] and validation["max_relative"] <= TOLERANCE


def test_resize_rule_is_transformers(depth_models):
    """Sizes from the kept aspect ratio and the multiple, as transformers' DPT processor rounds them."""
    from transformers import DPTImageProcessorPil

    from edgediff.runtime.depth import PROCESSOR_DEFAULTS, resized_size

    source, _ = depth_models["depth-anything"]
    processor = DPTImageProcessorPil.from_pretrained(source)
    settings = {**PROCESSOR_DEFAULTS, **json.loads((source / "preprocessor_config.json").read_text())}
    for width, height in ((77, 45), (45, 77), (70, 70), (200, 31), (33, 34), (518, 391)):
        image = Image.new("RGB", (width, height))
        expected = processor(image, return_tensors="np")["pixel_values"].shape[2:]
        assert resized_size(height, width, settings) == tuple(expected), (width, height)


def test_bicubic_resize_is_torch_interpolate():
    import torch

    from edgediff.runtime.depth import depth_map

    depth = np.random.default_rng(3).standard_normal((23, 31)).astype(np.float32)
    for height, width in ((45, 77), (10, 12), (23, 31), (64, 17)):
        expected = torch.nn.functional.interpolate(torch.from_numpy(depth)[None, None], size=(height, width),
                                                   mode="bicubic", align_corners=False)[0, 0].numpy()
        assert np.abs(depth_map(depth, height, width) - expected).max() < 1e-5


@pytest.mark.parametrize("case,message", [
    ("missing", "is not an exported depth model (no manifest.json): export one with `edgediff export DEPTH_SRC"),
    ("controlnet", "holds a controlnet, not a depth model"),
    ("no graph", "the depth graph is missing; re-export it"),
])
def test_a_folder_that_is_no_depth_model_is_one_line(depth_models, tmp_path, case, message):
    from edgediff.runtime.depth import read_depth_manifest

    folder = tmp_path / "d"
    if case != "missing":
        shutil.copytree(depth_models["dpt"][1], folder)
        manifest = json.loads((folder / "manifest.json").read_text())
        if case == "controlnet":
            manifest["kind"] = "controlnet"
        else:
            (folder / "depth" / "model.onnx").unlink()
        (folder / "manifest.json").write_text(json.dumps(manifest))
    else:
        folder.mkdir()
    with pytest.raises(EdgediffError) as error:
        read_depth_manifest(folder)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_depth_source_without_processor_config_is_one_line(depth_models, tmp_path):
    from click.testing import CliRunner

    from edgediff.cli import main

    source = shutil.copytree(depth_models["dpt"][0], tmp_path / "dpt")
    (source / "preprocessor_config.json").unlink()
    result = CliRunner().invoke(main, ["export", str(source), str(tmp_path / "out"), "--precision", "fp32"])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code != 0 and "Traceback" not in result.stderr
    assert lines[-1].startswith("error: ") and "has no readable preprocessor_config.json" in lines[-1]
    assert not (tmp_path / "out").exists()


def test_other_depth_architectures_are_one_line(tmp_path):
    from click.testing import CliRunner

    from edgediff.cli import main

    (tmp_path / "zoe").mkdir()
    (tmp_path / "zoe" / "config.json").write_text(json.dumps({"architectures": ["ZoeDepthForDepthEstimation"]}))
    result = CliRunner().invoke(main, ["export", str(tmp_path / "zoe"), str(tmp_path / "out"), "--precision", "fp32"])
    assert result.exit_code != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "holds a ZoeDepthForDepthEstimation; edgediff exports the depth models DPTForDepthEstimation and " \
           "DepthAnythingForDepthEstimation" in result.stderr


def test_depth_runs_without_torch(depth_models, tmp_path):
    """The depth hint with torch, diffusers and transformers unimportable: the same picture as here."""
    import subprocess
    import sys
    import textwrap

    from torch_blocker import BLOCK_TORCH

    exported = depth_models["depth-anything"][1]
    picture().save(tmp_path / "picture.png")
    script = BLOCK_TORCH + textwrap.dedent(f"""
        from pathlib import Path
        from PIL import Image
        from edgediff.runtime.depth import DepthEstimator, read_depth_manifest
        from edgediff.runtime.sessions import GraphSession
        folder = Path({str(exported)!r})
        manifest = read_depth_manifest(folder)
        session = GraphSession("depth", folder, manifest.graphs["depth"], "cpu", manifest.optimized_for, print)
        DepthEstimator(manifest, session)(Image.open({str(tmp_path / "picture.png")!r}).convert("RGB")).save(
            {str(tmp_path / "hint.png")!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    expected = estimator(exported)(picture())
    assert np.array_equal(np.asarray(Image.open(tmp_path / "hint.png")), np.asarray(expected))


def test_depth_folder_as_the_model_is_one_line(depth_models):
    from edgediff.runtime import Pipeline

    with pytest.raises(EdgediffError, match="^this folder holds a depth model, not a model: pass it as a control "
                                            "unit's preprocess_model") as error:
        Pipeline.load(depth_models["dpt"][1])
    assert "\n" not in str(error.value)
