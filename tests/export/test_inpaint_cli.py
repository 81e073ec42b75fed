"""`edgediff generate` with --mask, -n and --batch-size; bad input is one line on stderr."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from test_cli_errors import assert_one_line_error, run


@pytest.fixture(scope="module")
def files(tiny_exports, tmp_path_factory):
    root = tmp_path_factory.mktemp("inpaint-cli")
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "in.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(mask).save(root / "mask.png")
    Image.new("L", (32, 16), 255).save(root / "wide.png")
    (root / "garbage.png").write_bytes(b"not an image")
    return root, tiny_exports["sd1", "fp32"]


def generate(model, out, *extra):
    return run("generate", "a cat", "--model", model, "--steps", "2", "-o", out, *extra)


def test_inpaint_writes_an_image(files):
    root, model = files
    code, stderr = generate(model, root / "x.png", "--image", root / "in.png", "--mask", root / "mask.png",
                            "--mask-blur", "1", "--seed", "1")
    assert code == 0, stderr
    assert Image.open(root / "x.png").size == (32, 32)


@pytest.mark.parametrize("mask,fragment", [("missing.png", "mask not found"), ("garbage.png", "cannot read mask"),
                                           ("wide.png", "aspect ratio")])
def test_bad_masks(files, mask, fragment):
    root, model = files
    assert_one_line_error(*generate(model, root / "x.png", "--image", root / "in.png", "--mask", root / mask),
                          fragment)


def test_mask_without_image(files):
    root, model = files
    assert_one_line_error(*generate(model, root / "x.png", "--mask", root / "mask.png"), "--mask needs --image")


def test_mask_on_a_model_without_vae_encoder(files, tmp_path):
    root, model = files
    bare = shutil.copytree(model, tmp_path / "bare")
    manifest = json.loads((bare / "manifest.json").read_text())
    del manifest["graphs"]["vae_encoder"]
    (bare / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(bare / "vae_encoder")
    assert_one_line_error(*generate(bare, root / "x.png", "--image", root / "in.png", "--mask", root / "mask.png"),
                          "no vae_encoder graph")


@pytest.mark.parametrize("prompt", ["((a cat", "a cat))", "[(a:1.2.3) \\", "(:)"])
def test_unbalanced_parentheses_still_generate(files, prompt):
    root, model = files
    code, stderr = run("generate", prompt, "--model", model, "--steps", "1", "-o", root / "p.png")
    assert code == 0 and "Traceback" not in stderr, stderr


def test_n_images_with_consecutive_seeds_in_batches(files, tmp_path):
    _, model = files
    code, stderr = generate(model, tmp_path / "one.png", "-n", "3", "--seed", "7", "--sampler", "euler_a")
    assert code == 0, stderr
    code, stderr = generate(model, tmp_path / "batch.png", "-n", "3", "--batch-size", "2", "--seed", "7",
                            "--sampler", "euler_a")
    assert code == 0, stderr
    code, stderr = generate(model, tmp_path / "single.png", "--seed", "8", "--sampler", "euler_a")
    assert code == 0, stderr
    one = [np.asarray(Image.open(tmp_path / f"one-{i:04d}.png"), np.int16) for i in (1, 2, 3)]
    batch = [np.asarray(Image.open(tmp_path / f"batch-{i:04d}.png"), np.int16) for i in (1, 2, 3)]
    single = np.asarray(Image.open(tmp_path / "single.png"), np.int16)
    assert np.array_equal(one[1], single)  # image 2 is seed 8
    assert all(np.abs(a - b).max() <= 1 for a, b in zip(one, batch))  # a batch draws per-image noise
    assert np.abs(one[0] - one[1]).max() > 10
