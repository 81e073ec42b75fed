"""The request object: checked once, idempotent, and the prompt syntax travels through the metadata."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from edgediff.cli import main
from edgediff.runtime import GenerationRequest, InputError, metadata
from edgediff.runtime.samplers import normalize_schedule


def test_check_is_idempotent_and_keeps_the_picture_as_given(pipe):
    picture = Image.new("RGB", (96, 64))
    once = GenerationRequest("a cat", image=picture, width=64, height=64).check(pipe.manifest)
    twice = once.check(pipe.manifest)
    assert once.image.size == twice.image.size == (64, 64)
    assert once.original_image.size == twice.original_image.size == (96, 64)  # the mask's aspect is checked on it
    assert twice.prompt == ["a cat"] and twice.negatives == [""]


def test_keywords_and_the_request_agree(pipe):
    import inspect

    keywords = [name for name in inspect.signature(pipe.__call__).parameters]
    assert keywords == [name for name in GenerationRequest("x").kwargs()]
    with pytest.raises(InputError, match="unknown argument 'stpes'"):
        GenerationRequest.from_kwargs("x", stpes=3)


@pytest.mark.parametrize("word", [None, "", "Automatic", "default", "none", "model", " automatic "])
def test_every_default_word_is_the_samplers_own_schedule(word):
    assert normalize_schedule(word) is None
    assert normalize_schedule("SGM Uniform") == normalize_schedule("sgm-uniform") == "sgm_uniform"


def test_plain_syntax_is_recorded_and_read_back_by_from_png(tmp_path):
    first, again, other = (tmp_path / f"{name}.png" for name in ("first", "again", "other"))
    run = ["--steps", "2", "--width", "64", "--height", "64"]
    assert CliRunner().invoke(main, ["generate", "a (red:1.4) cat", "--seed", "3", "--prompt-syntax", "plain",
                                     "-o", str(first), *run]).exit_code == 0
    assert "Prompt syntax: plain" in metadata.read_infotext(first)
    assert CliRunner().invoke(main, ["generate", "--from-png", str(first), "-o", str(again)]).exit_code == 0
    assert CliRunner().invoke(main, ["generate", "--from-png", str(first), "--prompt-syntax", "a1111",
                                     "-o", str(other)]).exit_code == 0
    pixels = [np.asarray(Image.open(path)) for path in (first, again, other)]
    assert np.array_equal(pixels[0], pixels[1]) and not np.array_equal(pixels[0], pixels[2])


def test_an_empty_mask_result_still_has_its_request_and_seeds(pipe):
    picture, black = Image.new("RGB", (64, 64), "red"), Image.new("L", (64, 64))
    result = pipe(["a cat", "a dog"], image=picture, mask=black, seed=[4, 5], steps=2)
    assert result.seeds == [4, 5] and result.seed == 4 and result.timings.keys() == {"total"}
    assert "Seed: 5" in metadata.result_infotext(result, 1) and "a dog" in metadata.result_infotext(result, 1)
