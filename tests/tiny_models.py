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

    if kind not in ("sd1", "sd2", "sd1-inpaint"):  # an SDXL kind here would quietly make an SD 1.x model
        raise ValueError(f"build_pipeline makes sd1, sd2 or sd1-inpaint, not {kind!r} (SDXL: build_sdxl_pipeline)")
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


SDXL_SCHEDULER = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "steps_offset": 1, "timestep_spacing": "leading", "prediction_type": "epsilon", "interpolation_type": "linear",
    "use_karras_sigmas": False, "clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True,
}
# SDXL-Turbo's scheduler: ancestral Euler with trailing spacing (few steps, guidance 0).
TURBO_SCHEDULER = {**SDXL_SCHEDULER, "timestep_spacing": "trailing"}


def build_sdxl_pipeline(kind: str = "sdxl", seed: int = 0):
    """A tiny SDXL: two text encoders (the second with a projection), a U-Net with text_time
    conditioning; ``sdxl-lcm`` adds an LCM guidance embedding (time_cond_proj_dim), ``sdxl-turbo``
    trailing timestep spacing."""
    import torch
    from diffusers import (AutoencoderKL, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                           LCMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from edgediff.models import clip_tokenizer_dir

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=80, norm_num_groups=16, time_cond_proj_dim=16 if kind == "sdxl-lcm" else None,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, layers_per_block=1, sample_size=32, scaling_factor=0.13025, force_upcast=True,
    )
    # The encoders differ in width, as SDXL's do (768 and 1280): single-file loading tells them apart by it.
    common = dict(bos_token_id=49406, eos_token_id=49407, intermediate_size=37, num_attention_heads=4,
                  num_hidden_layers=3, vocab_size=49408, max_position_embeddings=77, projection_dim=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(**common, hidden_size=32, pad_token_id=49407,
                                                hidden_act="quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**common, hidden_size=48, pad_token_id=0,
                                                                hidden_act="gelu"))
    tokenizer = CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir()))
    tokenizer_2 = CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir()), pad_token="!")
    if kind == "sdxl-lcm":
        scheduler = LCMScheduler.from_config({**SDXL_SCHEDULER, "timestep_spacing": "leading"})
    elif kind == "sdxl-turbo":
        scheduler = EulerAncestralDiscreteScheduler.from_config(TURBO_SCHEDULER)
    else:
        scheduler = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_sdxl_pipeline(kind: str, folder: Path, seed: int = 0) -> Path:
    build_sdxl_pipeline(kind, seed).save_pretrained(folder)
    return folder


DEPTH_PROCESSORS = {  # as the models' own preprocessor_config.json files set them, at tiny sizes
    "dpt": {"size": {"height": 64, "width": 64}, "keep_aspect_ratio": False, "ensure_multiple_of": 1,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
    "depth-anything": {"size": {"height": 70, "width": 70}, "keep_aspect_ratio": True, "ensure_multiple_of": 14,
                       "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]},
}


def save_depth_model(kind: str, folder: Path) -> Path:
    """A tiny transformers depth estimator (``dpt``: DPTForDepthEstimation, ViT backbone;
    ``depth-anything``: DepthAnythingForDepthEstimation, DINOv2 backbone) and its
    preprocessor_config.json. Weights are re-drawn at fan-in scale: the default initialisation
    predicts depths of 1e-8, which no comparison could tell apart."""
    import json

    import torch
    from transformers import (DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTConfig,
                              DPTForDepthEstimation)

    torch.manual_seed(0)
    if kind == "dpt":
        model = DPTForDepthEstimation(DPTConfig(
            image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
            intermediate_size=37, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 16, 32],
            fusion_hidden_size=16, head_in_index=-1))
    else:
        backbone = Dinov2Config(image_size=28, patch_size=14, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                intermediate_size=37, out_features=["stage1", "stage2", "stage3", "stage4"],
                                reshape_hidden_states=False, apply_layernorm=True)
        model = DepthAnythingForDepthEstimation(DepthAnythingConfig(
            backbone_config=backbone, patch_size=14, reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 16, 32],
            fusion_hidden_size=16, head_hidden_size=8))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                fan_in = module.weight.shape[0] if isinstance(module, torch.nn.ConvTranspose2d) else module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) / fan_in ** 0.5)
                if module.bias is not None:
                    module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator) + 0.1)
                if isinstance(module, torch.nn.Conv2d) and module.out_channels == 1:
                    module.bias.fill_(1.0)  # the last convolution: most depths above the final ReLU's zero
    model.save_pretrained(folder)
    processor = {"image_processor_type": "DPTImageProcessor", "do_resize": True, "resample": 3, "do_rescale": True,
                 "rescale_factor": 1 / 255, "do_normalize": True, "do_pad": False, **DEPTH_PROCESSORS[kind]}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    return folder


class TinyStore:
    """Tiny models saved and exported once per test session, each on first use (tests/conftest.py's
    ``tiny_store``): an export takes seconds to a minute, and many modules need the same one. The
    folders are shared: a test that changes one works on a copy (shutil.copytree)."""

    def __init__(self, root: Path):
        self.root = root
        self._made: dict = {}
        self._names: dict = {}

    def _once(self, key, folder: Path, make):
        if self._names.setdefault(folder, key) != key:
            raise ValueError(f"{folder.name} is already the folder of {self._names[folder]}")
        if key not in self._made:
            self._made[key] = make()
        return self._made[key]

    def source(self, kind: str) -> Path:
        """The diffusers folder of build_pipeline's or build_sdxl_pipeline's ``kind``, seed 0."""
        folder = self.root / "sources" / kind
        save = save_sdxl_pipeline if kind.startswith("sdxl") else save_pipeline
        return self._once(("source", kind), folder, lambda: save(kind, folder))

    def export(self, kind: str, precision: str, *args, name: str | None = None) -> Path:
        """``edgediff export SOURCE OUT --precision PRECISION ARGS...`` of source(kind); OUT is named
        ``name`` (default ``KIND-PRECISION``)."""
        folder = self.root / "exports" / (name or f"{kind}-{precision}")
        return self._once(("export", kind, precision, *map(str, args)), folder,
                          lambda: export_with_cli(self.source(kind), folder, "--precision", precision, *args))

    def controlnet(self, name: str, seed: int) -> tuple[Path, Path]:
        """(diffusers folder ``cn-NAME``, fp32 export ``cn-NAME-fp32``) of test_controlnet.tiny_controlnet
        made from the sd1 U-Net with ``seed``."""
        folder = self.root / "controlnets" / f"cn-{name}"

        def make():
            from test_controlnet import tiny_controlnet

            tiny_controlnet(build_pipeline("sd1").unet, seed).save_pretrained(folder)
            return folder, export_with_cli(folder, folder.parent / f"cn-{name}-fp32", "--precision", "fp32")
        return self._once(("controlnet", seed), folder, make)

    def depth(self, kind: str) -> tuple[Path, Path]:
        """(transformers folder, fp32 export) of save_depth_model's ``kind``."""
        folder = self.root / "depth" / kind
        return self._once(("depth", kind), folder, lambda: (save_depth_model(kind, folder), export_with_cli(
            folder, folder.parent / f"{kind}-fp32", "--precision", "fp32")))
