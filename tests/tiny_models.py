"""Tiny Stable Diffusion pipelines with random weights, built from configs inside the tests.

``sd1`` mirrors SD 1.x (OpenAI-CLIP-style text encoder, epsilon prediction); ``sd2`` mirrors
SD 2.x (OpenCLIP-style gelu text encoder, linear projections, upcast attention, v-prediction,
"!" as the pad token); ``sd1-inpaint`` is ``sd1`` with a 9-channel inpainting U-Net (latent, mask,
masked-image latent) in a ``StableDiffusionInpaintPipeline``. Only the real CLIP BPE vocabulary is
shared with full-size models.
"""
from __future__ import annotations

from pathlib import Path

SD15_SCHEDULER = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "steps_offset": 1, "skip_prk_steps": True,
    "set_alpha_to_one": False, "clip_sample": False,
}


def build_pipeline(kind: str = "sd1", seed: int = 0):
    import torch
    from diffusers import (AutoencoderKL, PNDMScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from edgediff.models import clip_tokenizer_dir

    sd2, inpaint = kind == "sd2", kind == "sd1-inpaint"
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=9 if inpaint else 4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4) if sd2 else 8, norm_num_groups=16,
        use_linear_projection=sd2, upcast_attention=sd2,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, layers_per_block=1, sample_size=32,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=0 if sd2 else 49407, hidden_size=32,
        intermediate_size=37, num_attention_heads=4, num_hidden_layers=3, vocab_size=49408,
        max_position_embeddings=77, hidden_act="gelu" if sd2 else "quick_gelu", projection_dim=32,
    ))
    with torch.no_grad():  # a trained encoder's output has a non-zero mean, which A1111 emphasis rescales by
        bias = next(m for n, m in text_encoder.named_modules() if n.endswith("final_layer_norm")).bias
        bias.copy_(0.1 + 0.5 * torch.randn(bias.shape, generator=torch.Generator().manual_seed(seed)))
    tokenizer = CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir()), **({"pad_token": "!"} if sd2 else {}))
    scheduler = PNDMScheduler.from_config({**SD15_SCHEDULER, "prediction_type": "v_prediction" if sd2 else "epsilon"})
    pipe = (StableDiffusionInpaintPipeline if inpaint else StableDiffusionPipeline)(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_pipeline(kind: str, folder: Path, seed: int = 0) -> Path:
    build_pipeline(kind, seed).save_pretrained(folder)
    return folder


def export_with_cli(source: Path, out: Path, *args) -> Path:
    """Run `edgediff export SOURCE OUT ARGS...` through the CLI; fail the test on a non-zero exit."""
    from click.testing import CliRunner

    from edgediff.cli import main

    result = CliRunner().invoke(main, ["export", str(source), str(out), *map(str, args)])
    assert result.exit_code == 0, result.output
    return out
