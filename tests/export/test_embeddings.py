"""Textual-inversion embeddings against diffusers' ``load_textual_inversion`` (single and multi-vector)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from edgediff.runtime import Pipeline

TOLERANCE = 2e-3
STEPS = 6


def noise(manifest) -> np.ndarray:
    side = manifest.default_size // manifest.vae_scale_factor
    return np.random.default_rng(5).standard_normal((1, manifest.latent_channels, side, side), dtype=np.float32)


@pytest.fixture(scope="module")
def embedding_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("embeddings")
    rng = np.random.default_rng(0)
    single = root / "learned_embeds.safetensors"  # diffusers: {token: vector}
    save_file({"<cat-toy>": torch.from_numpy(rng.standard_normal(32).astype(np.float32))}, str(single))
    multi = root / "wavystyle.safetensors"  # A1111: emb_params, one row per vector, named by the file
    save_file({"emb_params": torch.from_numpy(rng.standard_normal((3, 32)).astype(np.float32))}, str(multi))
    return {"<cat-toy>": single, "wavystyle": multi}


@pytest.mark.parametrize("token,prompt", [("<cat-toy>", "a photo of <cat-toy> on a beach"),
                                          ("wavystyle", "a house, wavystyle, at night")])
def test_embedding_matches_diffusers(tiny_sources, tiny_exports, embedding_files, token, prompt):
    import diffusers

    folder = tiny_exports["sd1", "fp32"]
    pipe = Pipeline.load(folder, provider="cpu")
    latents = noise(pipe.manifest)
    actual = pipe(prompt, steps=STEPS, sampler="euler", latents=latents, embeddings=list(embedding_files.values()))
    plain = pipe(prompt, steps=STEPS, sampler="euler", latents=latents)

    reference = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sources["sd1"], safety_checker=None)
    reference.set_progress_bar_config(disable=True)
    reference.scheduler = diffusers.EulerDiscreteScheduler.from_config(reference.scheduler.config)
    reference.load_textual_inversion(str(embedding_files[token]), token=token)
    with torch.no_grad():
        expected = reference(prompt, num_inference_steps=STEPS, guidance_scale=7.5,
                             latents=torch.from_numpy(latents), output_type="np").images
    assert np.abs(actual.pixels - plain.pixels).max() > 20 * TOLERANCE  # the embedding is used ...
    assert np.abs(actual.pixels - expected).max() < TOLERANCE  # ... as diffusers uses it
    assert sorted(actual.embeddings) == sorted(embedding_files)


def test_multi_vector_takes_one_token_per_vector(tiny_exports, embedding_files):
    pipe = Pipeline.load(tiny_exports["sd1", "fp32"], provider="cpu")
    pipe("x", steps=1, seed=0, embeddings=[embedding_files["wavystyle"]])
    ids = pipe.tokenizer(["a wavystyle house"])[0]
    added = pipe.tokenizer.added_tokens["wavystyle"]
    assert len(added) == 3 and list(ids[2:5]) == added and ids[1] == 320  # BOS, "a", 3 new ids, "house"
