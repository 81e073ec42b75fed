"""A1111 prompt syntax: the parser against A1111's documented examples, chunking against a
reference written here from the rules, and the emphasis rescaling."""
from __future__ import annotations

import numpy as np
import pytest

from edgediff.models import clip_tokenizer_dir
from edgediff.runtime.prompts import BREAK, chunk_tokens, emphasize, parse_prompt_attention, tokenize_prompt
from edgediff.runtime.tokenizer import ClipTokenizer

BOS, EOS = 49406, 49407


@pytest.fixture(scope="module")
def tokenizer():
    # pad 0 as SD 2.x does, so padding is told apart from EOS
    return ClipTokenizer(clip_tokenizer_dir() / "tokenizer.json", max_length=77, pad_token_id=0,
                         bos_token_id=BOS, eos_token_id=EOS)


def approx(pieces):
    return [(text, pytest.approx(weight) if weight is not None else None) for text, weight in pieces]


@pytest.mark.parametrize("prompt,expected", [
    # The examples in A1111's parse_prompt_attention docstring.
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.1 * 1.1 * 1.3), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.1**4), (".", 1.1)]),
    # And the rest of the rules.
    ("((word))", [("word", 1.1**2)]),
    ("[word]", [("word", 1 / 1.1)]),
    ("[[word]]", [("word", 1 / 1.1**2)]),
    ("(word:1.3)", [("word", 1.3)]),
    ("(word: 0.5 )", [("word", 0.5)]),
    ("a (word:1.0) b", [("a word b", 1.0)]),
    ("stray) close] and :colon", [("stray) close] and :colon", 1.0)]),
    ("unclosed [square", [("unclosed ", 1.0), ("square", 1 / 1.1)]),
    ("a (b:1.2.3) c", [("a ", 1.0), ("b:1.2.3) c", 1.1)]),  # not a number: literal text
    ("\\\\ back\\slash", [("\\ backslash", 1.0)]),  # an escaped backslash; a lone one is dropped
    ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), BREAK, ("b", 1.1)]),
    ("BREAKFAST", [("BREAKFAST", 1.0)]),
    ("", [("", 1.0)]),
    ("((", [("", 1.0)]),
])
def test_parse_prompt_attention(prompt, expected):
    assert approx(parse_prompt_attention(prompt)) == approx(expected)


def reference_chunks(ids, weights, bos=BOS, eos=EOS, pad=0):
    """The rule for prompts without commas or BREAK: 75 tokens per chunk, each BOS ... EOS pad..."""
    rows = []
    for start in range(0, max(len(ids), 1), 75):
        part, w = ids[start:start + 75], weights[start:start + 75]
        rows.append(([bos, *part, eos] + [pad] * (75 - len(part)), [1.0, *w, 1.0] + [1.0] * (75 - len(part))))
    return rows


@pytest.mark.parametrize("words", [1, 74, 75, 76, 150, 151, 200])
def test_long_prompts_chunk_by_75(tokenizer, words):
    prompt = " ".join(f"word{i % 10}" for i in range(words))
    plain = tokenizer.encode([prompt])[0]
    ids, weights = tokenize_prompt(prompt, tokenizer)
    expected = reference_chunks(plain, [1.0] * len(plain))
    assert ids.tolist() == [row for row, _ in expected]
    assert weights.tolist() == [w for _, w in expected]


def test_weights_follow_their_tokens_across_chunks(tokenizer):
    filler = " ".join(["sky"] * 74)
    ids, weights = tokenize_prompt(f"{filler} (red cat:1.5) [dog]", tokenizer)
    red, cat, dog = (tokenizer.encode([w])[0][0] for w in ("red", "cat", "dog"))
    expected = reference_chunks(tokenizer.encode([filler])[0] + [red, cat, dog], [1.0] * 74 + [1.5, 1.5, 1 / 1.1])
    assert ids.tolist() == [row for row, _ in expected]
    np.testing.assert_allclose(weights, [w for _, w in expected], rtol=1e-6)


def test_break_starts_a_new_chunk(tokenizer):
    ids, _ = tokenize_prompt("a cat BREAK a dog", tokenizer)
    cat, dog = tokenizer.encode(["a cat", "a dog"])
    assert ids.tolist() == [row for row, _ in reference_chunks(cat, [1] * 2)] + \
        [row for row, _ in reference_chunks(dog, [1] * 2)]
    assert len(tokenize_prompt("a cat BREAK", tokenizer)[0]) == 1  # nothing after it: no empty chunk
    assert len(tokenize_prompt("BREAK a cat", tokenizer)[0]) == 2  # A1111 keeps a leading empty chunk


def test_escaped_parentheses_are_literal_tokens(tokenizer):
    ids, weights = tokenize_prompt("a \\(cat\\)", tokenizer)
    assert ids[0, 1:].tolist()[:5] == tokenizer.encode(["a (cat)"])[0] + [EOS]
    assert np.all(weights == 1.0)


def test_comma_backtrack_moves_the_tail_to_the_next_chunk():
    comma = 9
    ids = [1] * 70 + [comma] + [2] * 10  # the chunk fills 4 tokens after the comma
    chunks = chunk_tokens([(ids, 1.0)], comma_id=comma)
    assert [len(tokens) for tokens, _ in chunks] == [71, 10]
    assert chunks[0][0][-1] == comma and chunks[1][0] == [2] * 10
    far = [1] * 50 + [comma] + [2] * 30  # comma 24 tokens back: cut at 75 as usual
    assert [len(t) for t, _ in chunk_tokens([(far, 1.0)], comma_id=comma)] == [75, 6]
    assert [len(t) for t, _ in chunk_tokens([(ids, 1.0)], comma_id=comma, backtrack=0)] == [75, 6]


@pytest.mark.parametrize("weight", [0.5, 1.5])
def test_emphasis_scales_tokens_and_keeps_the_mean(weight):
    rng = np.random.default_rng(0)
    z = rng.standard_normal((77, 8)).astype(np.float32) + 0.3
    weights = np.ones(77, np.float32)
    weights[3] = weight
    out = emphasize(z, weights)
    scale = out[5] / z[5]  # every unweighted token is scaled by the same mean-keeping factor
    np.testing.assert_allclose(out[np.arange(77) != 3] / z[np.arange(77) != 3], np.broadcast_to(scale, (76, 8)),
                               rtol=1e-5)
    np.testing.assert_allclose(out[3] / z[3], weight * scale, rtol=1e-5)
    assert out.mean() == pytest.approx(z.mean(), rel=1e-5)
    assert emphasize(z, np.ones(77, np.float32)) is z


@pytest.mark.parametrize("prompt", ["((((", "))))", "[[[(", "(a:)", "(:1.2)", "\\", "a\\", "(a:1.2", "]]]((("])
def test_unbalanced_brackets_never_fail(tokenizer, prompt):
    ids, weights = tokenize_prompt(prompt, tokenizer)
    assert ids.shape == weights.shape and ids.shape[1] == 77
