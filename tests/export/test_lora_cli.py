"""LoRA and embedding flags of `edgediff generate`: bad files are one line on stderr and a non-zero exit."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import save_file

from edgediff.cli import main
import helpers
from lora_files import lora_layers, save_kohya
from tiny_models import build_pipeline


def generate(model, tmp_path, *extra):
    result = CliRunner().invoke(main, ["generate", "a cat", "--model", str(model), "--steps", "1", "--seed", "0",
                                       "-o", str(tmp_path / "x.png"), *map(str, extra)])
    return result.exit_code, result.stderr.strip()


assert_one_line_error = functools.partial(helpers.assert_one_line_error, prefix="error: ")


@pytest.fixture(scope="module")
def sd1_lora(tmp_path_factory):
    return save_kohya(lora_layers(build_pipeline("sd1")), tmp_path_factory.mktemp("cli") / "sd1.safetensors", 4.0)


def test_lora_flag_and_prompt_tag(tiny_exports, sd1_lora, tmp_path):
    code, stderr = generate(tiny_exports["sd1", "fp32"], tmp_path, "--lora", f"{sd1_lora}:0.7")
    assert code == 0, stderr
    result = CliRunner().invoke(main, ["generate", "a cat <lora:sd1:0.7>", "--model", str(tiny_exports["sd1", "fp32"]),
                                       "--steps", "1", "--seed", "0", "-o", str(tmp_path / "y.png"),
                                       "--lora-dir", str(sd1_lora.parent)])
    assert result.exit_code == 0, result.stderr
    # Same pixels (the files' metadata differ: one prompt carries the tag).
    from PIL import Image
    import numpy as np

    assert np.array_equal(np.asarray(Image.open(tmp_path / "x.png")), np.asarray(Image.open(tmp_path / "y.png")))


def test_missing_lora_file(tiny_exports, tmp_path):
    assert_one_line_error(*generate(tiny_exports["sd1", "fp32"], tmp_path, "--lora", tmp_path / "nope.safetensors"),
                          "LoRA file not found")


def test_not_a_lora(tiny_exports, tmp_path):
    save_file({"weight": np.zeros((2, 2), np.float32)}, str(tmp_path / "other.safetensors"))
    assert_one_line_error(*generate(tiny_exports["sd1", "fp32"], tmp_path, "--lora", tmp_path / "other.safetensors"),
                          "is not a LoRA")


def test_not_safetensors_at_all(tiny_exports, tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    assert_one_line_error(*generate(tiny_exports["sd1", "fp32"], tmp_path, "--lora", tmp_path / "junk.safetensors"),
                          "not a valid .safetensors")


def test_lora_for_another_architecture(tiny_exports, sd1_lora, tmp_path):
    """The tiny SD 1.x LoRA on the tiny SD 2.x model: proj_in is a 1x1 conv in one, a Linear in the other."""
    assert_one_line_error(*generate(tiny_exports["sd2", "fp32"], tmp_path, "--lora", sd1_lora), "does not fit this model")


def test_unknown_prompt_tag(tiny_exports, tmp_path):
    result = CliRunner().invoke(main, ["generate", "a cat <lora:nothere:0.5>", "--model", str(tiny_exports["sd1", "fp32"]),
                                       "--steps", "1", "--lora-dir", str(tmp_path), "-o", str(tmp_path / "x.png")])
    assert_one_line_error(result.exit_code, result.stderr.strip(), "unknown LoRA <lora:nothere>")


def test_pickled_files_need_consent(tiny_exports, tmp_path):
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, tmp_path / "old.pt")
    assert_one_line_error(*generate(tiny_exports["sd1", "fp32"], tmp_path, "--lora", tmp_path / "old.pt"),
                          "pickled", "--allow-pickle")
    torch.save({"string_to_param": {"*": torch.zeros(1, 32)}}, tmp_path / "emb.pt")
    assert_one_line_error(*generate(tiny_exports["sd1", "fp32"], tmp_path, "--embedding", tmp_path / "emb.pt"),
                          "pickled", "--allow-pickle")
    code, stderr = generate(tiny_exports["sd1", "fp32"], tmp_path, "--embedding", tmp_path / "emb.pt", "--allow-pickle")
    assert code == 0, stderr


def test_embedding_of_another_width(tiny_exports, tmp_path):
    save_file({"emb_params": np.zeros((1, 1024), np.float32)}, str(tmp_path / "wide.safetensors"))
    assert_one_line_error(*generate(tiny_exports["sd1", "fp32"], tmp_path, "--embedding", tmp_path / "wide.safetensors"),
                          "width 1024")
