"""Stable Diffusion 3 / 3.5 Medium parity with diffusers: flow matching, three text encoders, T5 on
and off, skip-layer guidance, img2img.

Tiny random-weight pipelines are built here: CLIP-L and CLIP-G (CLIPTextModelWithProjection, the
shipped CLIP vocabulary), a T5 encoder with a synthetic Unigram vocabulary (transformers'
T5Tokenizer over a small word list, saved as tokenizer.json), an SD3Transformer2DModel (the SD 3.5
Medium shape: dual attention layers and RMS q/k norm; the SD 3 shape: neither) and a 16-channel
AutoencoderKL with a shift factor. They are saved as diffusers folders, exported with
``edgediff export`` and compared with diffusers' StableDiffusion3Pipeline from the same starting
noise: fp32 within 2e-3 (pixels in [0, 1]).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from edgediff.cli import main
from edgediff.runtime import Pipeline
from edgediff.runtime.errors import InputError
from tiny_models import export_with_cli

FP32_TOLERANCE = 2e-3
FP16_TOLERANCE = 5e-3  # fp16 graphs vs diffusers fp32: worst measured 1.9e-3 (4 and 28 steps, T5 on/off, 2 seeds)
PROMPT, NEGATIVE = "a red circle on a white background", "blurry, dark"
GUIDANCE = 5.0
WORDS = ("a red circle on white background blue square green triangle photo of cat dog blurry dark "
         "the an in with and small large bright picture painting").split()
# SLG on the tiny transformer's middle blocks, diffusers' scale and start; active over more steps than
# diffusers' stop=0.2 so that the tiny model's image moves well beyond the tolerance.
SLG = {"layers": [1, 2], "scale": 2.8, "start": 0.01, "stop": 0.6}


def t5_tokenizer():
    """A SentencePiece-style Unigram vocabulary over WORDS and single characters."""
    from transformers import T5Tokenizer

    chars = sorted(set("".join(WORDS)) | set("abcdefghijklmnopqrstuvwxyz,.()!"))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    vocab += [("\u2581" + word, -2.0) for word in WORDS] + [(c, -6.0) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def build_sd3(kind: str, seed: int = 0):
    """``sd35m``: SD 3.5 Medium's shape (MMDiT-X: dual attention, RMS q/k norm) with T5;
    ``sd3``: SD 3 Medium's shape, distributed without T5 (text_encoder_3=None)."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel

    from edgediff.models import clip_tokenizer_dir

    torch.manual_seed(seed)
    medium = kind == "sd35m"
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=4, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=96, caption_projection_dim=32, pooled_projection_dim=64,
        pos_embed_max_size=32, dual_attention_layers=(0, 1) if medium else (),
        qk_norm="rms_norm" if medium else None)
    vae = AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, layers_per_block=1, sample_size=32, scaling_factor=1.5305, shift_factor=0.0609,
        use_quant_conv=False, use_post_quant_conv=False)
    common = dict(bos_token_id=49406, eos_token_id=49407, intermediate_size=37, num_attention_heads=4,
                  num_hidden_layers=3, vocab_size=49408, max_position_embeddings=77, projection_dim=32,
                  hidden_act="gelu")
    clip_l = CLIPTextModelWithProjection(CLIPTextConfig(**common, hidden_size=32, pad_token_id=49407))
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**common, hidden_size=48, pad_token_id=0))
    t5_tok = t5_tokenizer() if medium else None
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tok), d_model=96, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
    )) if medium else None
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=clip_l, tokenizer=CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir())),
        text_encoder_2=clip_g, tokenizer_2=CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir()), pad_token="!"),
        text_encoder_3=t5, tokenizer_3=t5_tok)
    pipe.set_progress_bar_config(disable=True)
    return pipe


_REFERENCES: dict = {}


def reference(source, cls="StableDiffusion3Pipeline", t5=True):
    """diffusers' pipeline for ``source``, loaded once; without T5 as ``text_encoder_3=None``."""
    import diffusers

    if (source, cls, t5) not in _REFERENCES:
        without = {} if t5 else {"text_encoder_3": None, "tokenizer_3": None}
        _REFERENCES[source, cls, t5] = getattr(diffusers, cls).from_pretrained(source, **without)
        _REFERENCES[source, cls, t5].set_progress_bar_config(disable=True)
    return _REFERENCES[source, cls, t5]


def start_noise(seed=7) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 16, 16, 16), dtype=np.float32)


def run_diffusers(pipe, latents=None, **kwargs) -> np.ndarray:
    with torch.no_grad():
        if latents is not None:
            kwargs["latents"] = torch.from_numpy(latents)
        kwargs.setdefault("output_type", "np")
        return pipe(prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=GUIDANCE, **kwargs).images


def test_manifest_describes_sd3_as_data(sd3):
    manifest = json.loads((sd3["sd35m"][1] / "manifest.json").read_text())
    assert manifest["family"] == "sd3" and manifest["prediction_type"] == "flow"
    assert manifest["scheduler"]["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert manifest["scheduler"]["shift"] == 3.0
    assert [e["graph"] for e in manifest["text_encoders"]] == ["text_encoder", "text_encoder_2", "text_encoder_3"]
    assert manifest["text_encoders"][2]["tokenizer"]["kind"] == "t5"
    assert manifest["text_encoders"][2]["tokenizer"]["max_length"] == 256
    assert (sd3["sd35m"][1] / "tokenizer_3" / "tokenizer.json").is_file()
    text = manifest["conditioning"]["text"]
    assert text["width"] == 96 and text["switches"] == {"t5": "text_encoder_3"}
    assert text["pooled"] == {"input": "pooled_projections", "encoders": ["text_encoder", "text_encoder_2"]}
    assert manifest["latent_channels"] == 16 and manifest["latent_multiple"] == 2
    assert manifest["scaling_factor"] == pytest.approx(1.5305) and manifest["shift_factor"] == pytest.approx(0.0609)
    inputs = {i["name"]: i["shape"] for i in manifest["graphs"]["unet"]["inputs"]}
    assert inputs["pooled_projections"] == ["batch", 64] and inputs["skip_layers"] == ["batch", 4]
    assert manifest["alphas_cumprod"] == "" and not (sd3["sd35m"][1] / "alphas_cumprod.npy").exists()
    without = json.loads((sd3["sd3"][1] / "manifest.json").read_text())
    assert "text_encoder_3" not in without["graphs"] and len(without["text_encoders"]) == 2


@pytest.mark.parametrize("steps", [1, 4, 28])
@pytest.mark.parametrize("t5", ["on", "off"])
def test_euler_matches_diffusers(sd3, steps, t5):
    source, folder = sd3["sd35m"]
    latents = start_noise()
    expected = run_diffusers(reference(source, t5=t5 == "on"), latents, num_inference_steps=steps)
    pipe = Pipeline.load(folder, provider="cpu")
    actual = pipe(PROMPT, NEGATIVE, steps=steps, guidance=GUIDANCE, sampler="euler", latents=latents, t5=t5).pixels
    assert np.abs(actual - expected).max() < FP32_TOLERANCE
    if steps == 4:  # the comparison can fail: T5's states reach the image
        other = pipe(PROMPT, NEGATIVE, steps=steps, guidance=GUIDANCE, sampler="euler", latents=latents,
                     t5="off" if t5 == "on" else "on").pixels
        assert np.abs(other - expected).max() > 5 * FP32_TOLERANCE


def test_skip_layer_guidance_matches_diffusers(sd3):
    source, folder = sd3["sd35m"]
    latents = start_noise()
    expected = run_diffusers(reference(source), latents, num_inference_steps=28,
                             skip_guidance_layers=SLG["layers"], skip_layer_guidance_scale=SLG["scale"],
                             skip_layer_guidance_start=SLG["start"], skip_layer_guidance_stop=SLG["stop"])
    pipe = Pipeline.load(folder, provider="cpu")
    actual = pipe(PROMPT, NEGATIVE, steps=28, guidance=GUIDANCE, sampler="euler", latents=latents,
                  skip_layer_guidance=SLG).pixels
    assert np.abs(actual - expected).max() < FP32_TOLERANCE
    plain = pipe(PROMPT, NEGATIVE, steps=28, guidance=GUIDANCE, sampler="euler", latents=latents).pixels
    assert np.abs(plain - expected).max() > 5 * FP32_TOLERANCE  # skipping the layers changes the image


def test_sd3_exported_without_t5(sd3):
    """SD 3 Medium's shape as distributed without T5: zeros in T5's place, as diffusers."""
    source, folder = sd3["sd3"]
    latents = start_noise(3)
    expected = run_diffusers(reference(source, t5=False), latents, num_inference_steps=4)
    pipe = Pipeline.load(folder, provider="cpu")
    actual = pipe(PROMPT, NEGATIVE, steps=4, guidance=GUIDANCE, sampler="euler", latents=latents).pixels
    assert np.abs(actual - expected).max() < FP32_TOLERANCE
    with pytest.raises(InputError, match="exported without t5"):
        pipe(PROMPT, steps=1, t5="on")


def feed_numpy_noise(monkeypatch, seed):
    """diffusers draws the posterior sample, then the img2img noise: serve both from our generator."""
    import diffusers.models.autoencoders.vae as vae_module
    import diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_img2img as img2img_module

    rng = np.random.default_rng(seed)

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.from_numpy(rng.standard_normal(tuple(shape), dtype=np.float32)).to(dtype or torch.float32)

    monkeypatch.setattr(vae_module, "randn_tensor", randn_tensor)
    monkeypatch.setattr(img2img_module, "randn_tensor", randn_tensor)


@pytest.mark.parametrize("steps", [4, 10])
def test_img2img_matches_diffusers(sd3, monkeypatch, steps):
    source, folder = sd3["sd35m"]
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    feed_numpy_noise(monkeypatch, seed=3)
    expected = run_diffusers(reference(source, "StableDiffusion3Img2ImgPipeline"), image=picture, strength=0.6,
                             num_inference_steps=steps)
    pipe = Pipeline.load(folder, provider="cpu")
    actual = pipe(PROMPT, NEGATIVE, steps=steps, guidance=GUIDANCE, sampler="euler", image=picture, strength=0.6,
                  seed=3).pixels
    assert np.abs(actual - expected).max() < FP32_TOLERANCE


def decode_like_txt2img(pipe, latents) -> np.ndarray:
    """diffusers' SD3 inpaint pipeline decodes ``latents / scaling_factor`` without adding the VAE's
    shift factor (its text-to-image and img2img pipelines add it): the reference decodes the
    inpainting's final latent as those do."""
    config = pipe.vae.config
    with torch.no_grad():
        image = pipe.vae.decode(latents / config.scaling_factor + config.shift_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="np")


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_inpaint_matches_diffusers(sd3, monkeypatch, strength):
    """Blend inpainting on a flow model: the known region noised with flow's forward process before
    every transformer call, as ``StableDiffusion3InpaintPipeline`` (16-channel transformer)."""
    from helpers import feed_numpy_noise as feed_noise

    source, folder = sd3["sd35m"]
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 4:16] = 255
    mask = Image.fromarray(mask)
    feed_noise(monkeypatch, 3, "diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_inpaint")
    reference_pipe = reference(source, "StableDiffusion3InpaintPipeline")
    latents = run_diffusers(reference_pipe, image=picture, mask_image=mask, strength=strength, num_inference_steps=6,
                            height=32, width=32, output_type="latent")
    expected = decode_like_txt2img(reference_pipe, latents)
    pipe = Pipeline.load(folder, provider="cpu")
    actual = pipe(PROMPT, NEGATIVE, steps=6, guidance=GUIDANCE, sampler="euler", image=picture, mask=mask,
                  strength=strength, seed=3).pixels
    assert np.abs(actual - expected).max() < FP32_TOLERANCE
    outside = np.asarray(mask) == 0  # the known region stays the picture's (through the VAE)
    assert np.abs(actual[0][outside] - expected[0][outside]).max() < FP32_TOLERANCE
    other = pipe(PROMPT, NEGATIVE, steps=6, guidance=GUIDANCE, sampler="euler", image=picture,
                 mask=Image.new("L", (32, 32), 255), strength=strength, seed=3).pixels
    assert np.abs(other - expected).max() > 5 * FP32_TOLERANCE  # the mask matters


def test_flow_sigmas_match_the_scheduler():
    """Static shift, resolution-dependent (dynamic) shift and Karras respacing, as diffusers walks them."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    from edgediff.runtime.flow import make_flow_plan

    for config in ({"shift": 3.0}, {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15},
                   {"shift": 3.0, "use_karras_sigmas": True}, {"shift": 1.0, "shift_terminal": 0.1}):
        scheduler = FlowMatchEulerDiscreteScheduler(**config)
        full = dict(scheduler.config)
        for steps, seq_len in ((1, 64), (7, 1024), (28, 4096)):
            if steps == 1 and "shift_terminal" in config:
                continue  # one step stretches 0/0: diffusers' sigmas are NaN there too
            mu = calculate_shift(seq_len, full["base_image_seq_len"], full["max_image_seq_len"], full["base_shift"],
                                 full["max_shift"]) if full["use_dynamic_shifting"] else None
            scheduler.set_timesteps(steps, mu=mu)
            plan = make_flow_plan("euler", full, steps, image_seq_len=seq_len)
            np.testing.assert_allclose(plan.sigmas, scheduler.sigmas.numpy(), rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(plan.timesteps, scheduler.timesteps.numpy(), rtol=1e-6)


def test_other_samplers_run_and_ancestral_ones_are_refused(sd3):
    pipe = Pipeline.load(sd3["sd35m"][1], provider="cpu")
    for sampler in ("dpmpp_2m", "heun"):
        pixels = pipe(PROMPT, NEGATIVE, steps=6, guidance=GUIDANCE, sampler=sampler, seed=1).pixels
        assert np.isfinite(pixels).all() and pixels.std() > 0
    with pytest.raises(InputError, match="not available for flow-matching"):
        pipe(PROMPT, steps=2, sampler="euler_a")
    with pytest.raises(InputError, match="layers must be among"):
        pipe(PROMPT, steps=2, skip_layer_guidance={**SLG, "layers": [9]})


def test_cli_switches(sd3, tmp_path):
    runner = CliRunner()
    model = str(sd3["sd35m"][1])
    done = runner.invoke(main, ["generate", PROMPT, "--model", model, "--steps", "2", "--t5", "off",
                                "--sampler", "euler", "-o", str(tmp_path / "off.png")])
    assert done.exit_code == 0, done.output
    refused = runner.invoke(main, ["generate", PROMPT, "--model", str(sd3["sd3"][1]), "--steps", "2", "--t5", "on",
                                   "-o", str(tmp_path / "on.png")])
    assert refused.exit_code != 0
    assert refused.output.strip().splitlines() == [refused.output.strip()] and "without t5" in refused.output
    assert "Traceback" not in refused.output
    no_slg = runner.invoke(main, ["generate", PROMPT, "--model", model, "--steps", "2", "--slg",
                                  "-o", str(tmp_path / "slg.png")])
    assert no_slg.exit_code != 0 and "no skip-layer guidance" in no_slg.output  # 4 layers: none of 7, 8, 9


@pytest.mark.parametrize("t5", ["on", "off"])
def test_fp16_export_is_close(sd3, tmp_path_factory, t5):
    """fp16 graphs (T5 and the transformer in fp16; the VAE stays fp32 as its config's force_upcast says)."""
    source = sd3["sd35m"][0]
    folder = sd3.get(("sd35m", "fp16"))
    if folder is None:
        folder = sd3["sd35m", "fp16"] = export_with_cli(source, tmp_path_factory.mktemp("sd3") / "sd35m-fp16",
                                                        "--precision", "fp16", "--optimize-for", "cpu")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["graphs"]["unet"]["precision"] == "fp16" and manifest["graphs"]["text_encoder_3"]["precision"] == "fp16"
    latents = start_noise(8)
    expected = run_diffusers(reference(source, t5=t5 == "on"), latents, num_inference_steps=4)
    actual = Pipeline.load(folder, provider="cpu")(PROMPT, NEGATIVE, steps=4, guidance=GUIDANCE, sampler="euler",
                                                   latents=latents, t5=t5).pixels
    assert np.abs(actual - expected).max() < FP16_TOLERANCE


def test_t5_tokenizer_matches_transformers(sd3):
    """The exported tokenizer.json, read with the tokenizers library alone, gives transformers' ids:
    EOS after the text, padding to 256, long prompts cut (diffusers' max_sequence_length)."""
    from transformers import AutoTokenizer

    from edgediff.runtime.text_conditioning import T5Tokenizer

    source, folder = sd3["sd35m"]
    spec = json.loads((folder / "manifest.json").read_text())["text_encoders"][2]["tokenizer"]
    ours = T5Tokenizer(folder / spec["path"], max_length=spec["max_length"], pad_token_id=spec["pad_token_id"],
                       eos_token_id=spec["eos_token_id"])
    theirs = AutoTokenizer.from_pretrained(source / "tokenizer_3")
    texts = [PROMPT, "", "a photo of a cat, blurry!", " ".join(WORDS * 12)]
    expected = theirs(texts, padding="max_length", max_length=256, truncation=True).input_ids
    np.testing.assert_array_equal(ours(texts), np.array(expected, dtype=np.int32))


def test_damaged_text_layout_is_one_line(sd3, tmp_path):
    import shutil

    from edgediff.runtime.errors import ModelFolderError

    folder = shutil.copytree(sd3["sd3"][1], tmp_path / "damaged")
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["conditioning"]["text"]["width"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFolderError, match="conditioning.text.width"):
        Pipeline.load(folder, provider="cpu")(PROMPT, steps=1)
