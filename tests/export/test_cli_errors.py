"""Bad input: one clear line on stderr, a non-zero exit, never a traceback, never a half-written model."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from edgediff.cli import main
from helpers import assert_one_line_error


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stderr.strip()


@pytest.fixture
def model(tiny_exports, tmp_path):
    """A private copy of a good export that a test may damage."""
    return shutil.copytree(tiny_exports["sd1", "fp32"], tmp_path / "model")


def generate(model, *extra, out=None):
    return run("generate", "a cat", "--model", model, "--steps", "2", "-o", out or model.parent / "x.png", *extra)


def test_missing_model_folder(tmp_path):
    assert_one_line_error(*generate(tmp_path / "nope"), "model folder not found")


def test_empty_model_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(*generate(tmp_path / "empty"), "no manifest.json")


def test_incomplete_model_folder(model):
    shutil.rmtree(model / "unet")
    assert_one_line_error(*generate(model), "unet graph is missing")


def test_manifest_not_json(model):
    (model / "manifest.json").write_text("{ not json")
    assert_one_line_error(*generate(model), "not a valid edgediff manifest")


def test_corrupt_graph(model):
    (model / "unet" / "model.onnx").write_bytes(b"\x00garbage" * 100)
    assert_one_line_error(*generate(model), "unet graph", "cannot be loaded")


@pytest.mark.parametrize("flag,value", [("--width", "-8"), ("--height", "0"), ("--width", "30")])
def test_bad_size(model, flag, value):
    assert_one_line_error(*generate(model, flag, value), "must be a positive multiple of 4")


def test_unknown_sampler(model):
    assert_one_line_error(*generate(model, "--sampler", "warp_drive"), "unknown sampler 'warp_drive'")


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_steps_below_one(model, steps):
    code, stderr = run("generate", "a cat", "--model", model, "--steps", steps, "-o", model.parent / "x.png")
    assert_one_line_error(code, stderr, "steps")


def test_output_folder_missing(model):
    assert_one_line_error(*generate(model, out=model.parent / "no" / "x.png"), "cannot write", "does not exist")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_output_not_writable(model, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert_one_line_error(*generate(model, out=locked / "x.png"), "cannot write")


def test_output_is_a_directory(model, tmp_path):
    (tmp_path / "dir.png").mkdir()
    assert_one_line_error(*generate(model, out=tmp_path / "dir.png"), "cannot write")


def test_output_bad_suffix(model):
    assert_one_line_error(*generate(model, out=model.parent / "x.txt"), "cannot write", ".png")


@pytest.mark.parametrize("provider", ["cuda", "tensorrt", "dml"])
def test_forced_provider_not_installed(model, provider):
    import onnxruntime

    if provider in {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider",
                    "dml": "DmlExecutionProvider"} and f"{provider}" in str(onnxruntime.get_available_providers()).lower():
        pytest.skip(f"{provider} is installed here")
    assert_one_line_error(*generate(model, "--provider", provider), f"provider '{provider}' is not available")


def test_export_source_missing(tmp_path):
    assert_one_line_error(*run("export", tmp_path / "nothing", tmp_path / "out"), "export source not found")
    assert not (tmp_path / "out").exists()


def test_pickled_checkpoint_needs_consent(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not even read")
    assert_one_line_error(*run("export", ckpt, tmp_path / "out"), "pickled checkpoint", "--allow-pickle")
    assert not (tmp_path / "out").exists()


def test_not_a_diffusers_folder(tmp_path):
    (tmp_path / "src").mkdir()
    assert_one_line_error(*run("export", tmp_path / "src", tmp_path / "out"), "not a diffusers model folder")


def test_failed_export_leaves_no_manifest(tiny_sources, tmp_path):
    """A source that breaks mid-export (its U-Net weights are corrupt) leaves no manifest anywhere."""
    source = shutil.copytree(tiny_sources["sd1"], tmp_path / "src")
    for weights in (source / "unet").glob("*.safetensors"):
        weights.write_bytes(b"corrupt")
    code, stderr = run("export", source, tmp_path / "out", "--precision", "fp32")
    assert code != 0
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert not list(tmp_path.rglob("manifest.json"))


def test_export_refuses_to_clobber(tiny_exports, tiny_sources):
    assert_one_line_error(*run("export", tiny_sources["sd1"], tiny_exports["sd1", "fp32"], "--precision", "fp32"),
                          "already holds an exported model", "--overwrite")


def test_real_process_exit_and_stderr(tmp_path):
    """The installed console script, not just click's runner: exit 1, one line, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "edgediff", "generate", "x", "--model", str(tmp_path / "nope")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"error: model folder not found: {tmp_path / 'nope'}"]


def test_img2img_image_missing(model):
    assert_one_line_error(*generate(model, "--image", model.parent / "none.png"), "image not found")


def test_img2img_image_unreadable(model):
    (model.parent / "bad.png").write_bytes(b"not a png")
    assert_one_line_error(*generate(model, "--image", model.parent / "bad.png"), "cannot read image")


@pytest.mark.parametrize("strength", ["0", "1.5"])
def test_img2img_bad_strength(model, strength):
    from PIL import Image

    Image.new("RGB", (32, 32)).save(model.parent / "in.png")
    assert_one_line_error(*generate(model, "--image", model.parent / "in.png", "--strength", strength), "strength")


def test_info_verify_catches_a_changed_graph(model):
    code, _ = run("info", model, "--verify")
    assert code == 0
    with open(model / "vae_decoder" / "model.onnx", "ab") as graph:
        graph.write(b"\0")
    assert_one_line_error(*run("info", model, "--verify"), "vae_decoder graph", "sha256")


def test_img2img_bad_size(model):
    from PIL import Image

    Image.new("RGB", (32, 32)).save(model.parent / "in.png")
    assert_one_line_error(*generate(model, "--image", model.parent / "in.png", "--width", "-8"),
                          "width must be a positive multiple of 4")
