"""Our tokenizer (``tokenizers`` + tokenizer.json) gives transformers' CLIPTokenizer ids exactly."""
from __future__ import annotations

import numpy as np
import pytest

from edgediff.models import clip_tokenizer_dir
from edgediff.runtime.tokenizer import ClipTokenizer

transformers = pytest.importorskip("transformers")

PROMPTS = [
    "a photo of a cat",
    "A Photo Of A CAT",
    "a red circle on a white background",
    "",
    " ",
    "hello, world!",
    "masterpiece, best quality, (ultra-detailed:1.2), [bokeh], {soft light}",
    "a corgi on a beach; sunset -- 35mm, f/1.8",
    "don't stop: it's 5 o'clock & the café is open",
    "naïve résumé façade — Zürich",
    "日本の桜の木, 富士山",
    "一只猫在屋顶上",
    "😀🎉 emoji party 🐶",
    "Москва зимой",
    "multiple    spaces\tand\ttabs\nand newlines",
    "UPPERCASE lowercase MiXeD",
    "numbers 1234567890 and 3.14159 and 1e-5",
    "email me@example.com or visit https://example.com/path?q=1",
    "hyphen-ated words and under_scored_words",
    "quotes \"double\" and 'single' and `back`",
    "<|startoftext|> literal special tokens <|endoftext|>",
    "a" * 300,
    " ".join(["word"] * 100),
    " ".join(f"token{i}" for i in range(90)),
    "a painting of a fox, " * 20,
    "¡¿Qué tal?!",
    "C++ and C# and F#",
    "100% #hashtag @mention $dollar ^caret *star",
    "über-realistic 8k HDR",
    "The quick brown fox jumps over the lazy dog.",
    "αβγ δέλτα",
    "ﬁ ligature and full-width ＡＢＣ",
]


@pytest.mark.parametrize("pad_token", [None, "!"])  # SD 1.x pads with <|endoftext|>, SD 2.x with "!"
def test_ids_match_transformers(tmp_path, pad_token):
    reference = transformers.CLIPTokenizer.from_pretrained(
        str(clip_tokenizer_dir()), **({"pad_token": pad_token} if pad_token else {}))
    reference.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    ours = ClipTokenizer(tmp_path / "tokenizer.json", max_length=77, pad_token_id=reference.pad_token_id,
                         bos_token_id=reference.bos_token_id, eos_token_id=reference.eos_token_id)
    expected = reference(PROMPTS, padding="max_length", truncation=True, max_length=77).input_ids
    actual = ours(PROMPTS)
    assert actual.shape == (len(PROMPTS), 77)
    for prompt, row_expected, row_actual in zip(PROMPTS, expected, actual):
        assert list(row_actual) == row_expected, prompt


def test_known_ids():
    tokenizer = ClipTokenizer(clip_tokenizer_dir() / "tokenizer.json", max_length=77, pad_token_id=49407,
                              bos_token_id=49406, eos_token_id=49407)
    ids = tokenizer(["a photo of a cat"])[0]
    assert list(ids[:7]) == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ids[7:] == 49407).all() and ids.dtype == np.int32
