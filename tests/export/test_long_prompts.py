"""Long and weighted prompts end to end: chunked conditioning, parity with diffusers fed the
embeddings of a reference written here from A1111's rules, and old exports with a fixed context."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from edgediff.runtime import EdgediffError, Pipeline
from edgediff.runtime.prompts import encode_prompts

CATS = " ".join(["cat"] * 75)  # 75 tokens: exactly one chunk
LONG = CATS + " " + " ".join(["dog"] * 75)  # 150 tokens: the same first chunk, then a second


@pytest.fixture(scope="module")
def pipe(tiny_exports):
    return Pipeline.load(tiny_exports["sd1", "fp32"], provider="cpu")


def image(pipe, prompt, negative=""):
    latents = np.random.default_rng(4).standard_normal((1, 4, 16, 16), dtype=np.float32)
    return pipe(prompt, negative, steps=3, sampler="euler", latents=latents, rng=np.random.default_rng(0)).pixels


def conditioning(pipe, prompts):
    with pipe.sessions.use("text_encoder") as text_encoder:
        return encode_prompts(prompts, pipe.tokenizer, lambda ids: text_encoder.run(input_ids=ids)[0])


def test_long_prompt_is_not_truncated(pipe):
    assert conditioning(pipe, [LONG]).shape[1] == 154
    assert np.abs(image(pipe, LONG) - image(pipe, CATS)).max() > 1e-2


def test_weight_one_is_the_plain_prompt_bit_for_bit(pipe):
    plain = image(pipe, "a red cat on a mat")
    assert np.array_equal(image(pipe, "a (red cat:1.0) on a mat"), plain)
    assert np.abs(image(pipe, "a (red cat:1.5) on a mat") - plain).max() > 1e-3


def test_break_and_escapes(pipe):
    assert conditioning(pipe, ["a cat BREAK a dog"]).shape[1] == 154
    assert np.abs(image(pipe, "a cat BREAK a dog") - image(pipe, "a cat a dog")).max() > 1e-3
    # Escaped, the parentheses are tokens of the text, not a weight.
    escaped, weighted = conditioning(pipe, ["a \\(cat\\)", "a (cat)"])
    assert np.abs(escaped - weighted).max() > 1e-3


@pytest.mark.parametrize("weight", [0.5, 1.5])
def test_weights_scale_their_tokens(pipe, weight):
    plain, weighted = conditioning(pipe, ["a cat on a mat", f"a (cat:{weight}) on a mat"])
    scale = weighted[4] / plain[4]  # "mat": an unweighted token, scaled by the mean-keeping factor
    np.testing.assert_allclose(weighted[2] / plain[2], weight * scale, rtol=1e-4)  # "cat" (BOS, a, cat)
    assert abs(weighted.mean() - plain.mean()) < 1e-5 * abs(plain).mean()


def reference_embeds(source, pieces, chunks):
    """A1111's rules with torch CLIP: 75 tokens a chunk, BOS/EOS/pad each, weights times the encoder
    output, rescaled to the chunk's mean; padded with empty chunks up to ``chunks``."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(source / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(source / "text_encoder").eval()
    ids, weights = [], []
    for text, weight in pieces:
        piece = tokenizer(text, add_special_tokens=False).input_ids
        ids += piece
        weights += [weight] * len(piece)
    out = []
    for i in range(chunks):
        part, w = ids[75 * i: 75 * (i + 1)], weights[75 * i: 75 * (i + 1)]
        row = [tokenizer.bos_token_id, *part, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * (75 - len(part))
        with torch.no_grad():
            z = encoder(torch.tensor([row]))[0][0]
        mult = torch.tensor([1.0, *w, 1.0] + [1.0] * (75 - len(part)))
        weighted = z * mult[:, None]
        out.append(weighted * (z.mean() / weighted.mean()))
    return torch.cat(out)[None]


def test_long_weighted_prompt_matches_diffusers_with_reference_embeds(tiny_sources, pipe):
    import diffusers

    before, after = " ".join(["sky"] * 60), " ".join(["tree"] * 40)
    prompt = f"{before} (red:1.4) [house] {after}"
    pieces = [(before + " ", 1.0), ("red", 1.4), (" ", 1.0), ("house", 1 / 1.1), (" " + after, 1.0)]
    source = tiny_sources["sd1"]
    reference = diffusers.StableDiffusionPipeline.from_pretrained(source, safety_checker=None)
    reference.scheduler = diffusers.EulerDiscreteScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    latents = np.random.default_rng(4).standard_normal((1, 4, 16, 16), dtype=np.float32)
    with torch.no_grad():
        expected = reference(prompt_embeds=reference_embeds(source, pieces, 2),
                             negative_prompt_embeds=reference_embeds(source, [("blurry", 1.0)], 2),
                             num_inference_steps=3, guidance_scale=7.5, latents=torch.from_numpy(latents),
                             output_type="np").images
    actual = image(pipe, prompt, "blurry")
    assert np.abs(actual - expected).max() < 2e-3


def test_old_exports_with_a_fixed_context_say_to_re_export(tiny_exports, tmp_path):
    old = shutil.copytree(tiny_exports["sd1", "fp32"], tmp_path / "old")
    manifest = json.loads((old / "manifest.json").read_text())
    for spec in manifest["graphs"]["unet"]["inputs"]:
        if spec["name"] == "encoder_hidden_states":
            spec["shape"][1] = 77  # as exports made before long prompts
    (old / "manifest.json").write_text(json.dumps(manifest))
    pipe = Pipeline.load(old, provider="cpu")
    assert pipe("a cat", steps=1).images  # short prompts: as before
    with pytest.raises(EdgediffError, match="re-export"):
        pipe(LONG, steps=1)


def test_shipped_default_model_takes_long_prompts():
    """The shipped model is re-exported with the current exporter (issue 22): its U-Net's context
    axis is dynamic, so a prompt past 75 tokens and BREAK reach it instead of a "re-export" error."""
    pipe = Pipeline.load(None, provider="cpu")
    assert pipe("a red circle", steps=1, seed=0).images
    long = pipe(LONG, steps=2, seed=0, guidance=1.0).pixels
    first_chunk = pipe(CATS, steps=2, seed=0, guidance=1.0).pixels  # LONG's first chunk alone
    assert np.abs(long - first_chunk).max() > 1e-3  # the second chunk reaches the U-Net
    assert pipe("a red circle BREAK a blue square", steps=1, seed=0).images
