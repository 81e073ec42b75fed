"""Each exported graph declared once, as data: its boundary module, inputs, outputs, tolerance.

Export, validation and the manifest are all driven from ``GRAPHS`` (the idea of optimum's
``OnnxConfig``); the wrapper modules state each graph's boundary in a few lines (the idea of
Apple's ``VAEDecoder``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from edgediff.runtime.manifest import TensorSpec

# Axes that stay symbolic in the exported graph; every other axis is fixed by the model's config.
# "context": the U-Net's text length, 77 tokens per prompt chunk (long prompts: runtime/prompts.py);
# the text encoder's own "sequence" stays fixed, its position embeddings allow 77 at most.
DYNAMIC_AXES = ("batch", "height", "width", "latent_height", "latent_width", "context")
FLOAT = "float"  # resolved to float16 or float32 by the export precision


class TextEncoder(nn.Module):
    """Token ids in, per-token hidden states out (what the U-Net attends to)."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        return self.text_encoder(input_ids.to(torch.int64), return_dict=False)[0]


class PenultimateTextEncoder(nn.Module):
    """SDXL conditions on the penultimate layer's hidden states (no final LayerNorm), and takes the
    pooled, projected embedding from the encoder that has a projection (diffusers' ``encode_prompt``)."""

    def __init__(self, text_encoder, pooled: bool):
        super().__init__()
        self.text_encoder = text_encoder
        self.pooled = pooled

    def forward(self, input_ids):
        out = self.text_encoder(input_ids.to(torch.int64), output_hidden_states=True, return_dict=True)
        hidden = out.hidden_states[-2]
        return (hidden, out.text_embeds) if self.pooled else hidden


class UNet(nn.Module):
    """One denoising call; the timestep is float so fractional (Karras) timesteps pass through.

    ``extra`` names the conditioning inputs this U-Net takes beyond the text: SDXL's pooled text
    embedding and size ids (``added_cond_kwargs``), and LCM's guidance embedding (``timestep_cond``).
    """

    def __init__(self, unet, extra: tuple[str, ...]):
        super().__init__()
        self.unet = unet
        self.extra = extra

    def forward(self, sample, timestep, encoder_hidden_states, *extra):
        named = dict(zip(self.extra, extra))
        added = {k: named[k] for k in ("text_embeds", "time_ids") if k in named}
        return self.unet(sample, timestep, encoder_hidden_states, timestep_cond=named.get("timestep_cond"),
                         added_cond_kwargs=added or None, return_dict=False)[0]


class VAEDecoder(nn.Module):
    """Scaled-back latent in, image in [-1, 1] out; latent scaling stays in the runtime (manifest)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class VAEEncoder(nn.Module):
    """Image in [-1, 1] in, the latent Gaussian's mean and std out; sampling happens in NumPy."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        posterior = self.vae.encode(sample, return_dict=False)[0]
        return posterior.mean, posterior.std


# Example input values for tracing and validation, declared per input on the graph specs. Each takes
# (shape, dims, generator); the default is standard normal noise.
Example = Callable[[list, dict, torch.Generator], torch.Tensor]


def token_ids(shape, dims, generator) -> torch.Tensor:
    """Random token ids from the text encoder's vocabulary."""
    return torch.randint(0, dims["vocab"], shape, generator=generator, dtype=torch.int32)


def mid_timestep(shape, dims, generator) -> torch.Tensor:
    """A timestep in the middle of the schedule, where every U-Net block contributes."""
    return torch.full(shape, 601.0)


def size_ids(shape, dims, generator) -> torch.Tensor:
    """SDXL's size and crop ids in pixels (original size, crop offsets, target size)."""
    return torch.tensor([512.0, 512.0, 0.0, 0.0, 512.0, 512.0][: shape[1]]).repeat(shape[0], 1)


def gaussian(shape, dims, generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator)


@dataclass(frozen=True)
class GraphSpec:
    """One graph and its export policy, as data: the exporter's passes read these fields, never the name."""

    name: str
    wrap: Callable[[object, tuple[str, ...]], nn.Module]  # (pipeline, input names) -> boundary module
    inputs: tuple[TensorSpec, ...]  # an input with an axis the model's dims leave None is left out
    outputs: tuple[TensorSpec, ...]
    optimizer_type: str  # model_type for onnxruntime.transformers.optimizer
    # Max abs difference against torch, relative to the reference output's peak magnitude.
    tolerance: dict[str, float]
    # int8 and int4 quantize this graph's MatMul weights; the other graphs stay float.
    quantizable: bool = False
    # fp16: a (component, config flag) that, when true, keeps attention scores fp32 from the start
    # and attention unfused off CUDA (SD 2.x's ``upcast_attention`` overflows fp16).
    upcast_attention_flag: tuple[str, str] | None = None
    # fp16: a (component, config flag) that, when true, keeps the whole graph fp32 (SDXL's VAE
    # ``force_upcast``).
    force_fp32_flag: tuple[str, str] | None = None
    # fp16 escalation when an output overflows, in order: "attention" (scores and softmax in fp32),
    # then "graph" (everything fp32).
    fp16_escalation: tuple[str, ...] = ("attention", "graph")
    # Example values per input name (default: gaussian).
    examples: dict[str, Example] = field(default_factory=dict)
    # (pipeline attribute, folder) of the tokenizer that feeds this text encoder, or None.
    tokenizer: tuple[str, str] | None = None
    # LoRAs and textual inversions patch this graph: the manifest maps torch names to its initializers.
    lora_patched: bool = False

    def present(self, specs: tuple[TensorSpec, ...], dims: dict) -> tuple[TensorSpec, ...]:
        """The specs this model has: optional conditioning inputs exist only where the config sizes them."""
        return tuple(s for s in specs if all(a in DYNAMIC_AXES or dims.get(a) is not None for a in s.shape))

    def module(self, pipe, dims: dict) -> nn.Module:
        return self.wrap(pipe, tuple(s.name for s in self.present(self.inputs, dims)))

    def resolve(self, specs: tuple[TensorSpec, ...], dims: dict, float_dtype: str) -> list[TensorSpec]:
        """Fix config-derived axes to numbers and the float placeholder to a real dtype."""
        return [
            TensorSpec(
                s.name,
                float_dtype if s.dtype == FLOAT else s.dtype,
                tuple(a if a in DYNAMIC_AXES else dims[a] for a in s.shape),
            )
            for s in self.present(specs, dims)
        ]

    def dynamic_axes(self, dims: dict) -> dict[str, dict[int, str]]:
        return {
            s.name: {i: a for i, a in enumerate(s.shape) if a in DYNAMIC_AXES}
            for s in (*self.present(self.inputs, dims), *self.present(self.outputs, dims))
        }

    def example_inputs(self, dims: dict, sizes: dict) -> tuple[torch.Tensor, ...]:
        """Deterministic example inputs; ``sizes`` gives the dynamic axes their values."""
        generator = torch.Generator().manual_seed(0)
        return tuple(
            self.examples.get(spec.name, gaussian)(
                [sizes[a] if a in DYNAMIC_AXES else dims[a] for a in spec.shape], dims, generator)
            for spec in self.present(self.inputs, dims)
        )

    def config_flag(self, meta, flag: tuple[str, str] | None) -> bool:
        """A declared (component, flag) read from the model's configs; False where not declared."""
        return flag is not None and bool(getattr(getattr(meta, flag[0]).config, flag[1], False))


def _t(name, dtype, *shape):
    return TensorSpec(name, dtype, tuple(shape))


# int4: about twice the worst measured on random weights (8.9e-2, tiny SDXL; RESULTS.md, "int4").
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "int8": 2e-1, "int4": 2e-1}
VAE_TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "int8": 2e-2}
TEXT_ENCODER = {"examples": {"input_ids": token_ids}, "lora_patched": True}  # embeddings patch them too
UNET = GraphSpec(
    "unet",
    lambda pipe, names: UNet(pipe.unet, names[3:]),
    inputs=(
        _t("sample", FLOAT, "batch", "channels", "latent_height", "latent_width"),
        _t("timestep", "float32", "batch"),
        _t("encoder_hidden_states", FLOAT, "batch", "context", "cross_attention"),
        _t("text_embeds", FLOAT, "batch", "pooled"),
        _t("time_ids", FLOAT, "batch", "time_ids"),
        _t("timestep_cond", FLOAT, "batch", "time_cond"),
    ),
    outputs=(_t("out_sample", FLOAT, "batch", "out_channels", "latent_height", "latent_width"),),
    optimizer_type="unet",
    tolerance=TOLERANCE,
    quantizable=True,
    upcast_attention_flag=("unet", "upcast_attention"),
    examples={"timestep": mid_timestep, "time_ids": size_ids},
    lora_patched=True,
)
VAE_GRAPHS = (
    GraphSpec(
        "vae_decoder",
        lambda pipe, names: VAEDecoder(pipe.vae),
        inputs=(_t("latent_sample", FLOAT, "batch", "latent_channels", "latent_height", "latent_width"),),
        outputs=(_t("sample", FLOAT, "batch", "rgb", "height", "width"),),
        optimizer_type="vae",
        tolerance=VAE_TOLERANCE,
        force_fp32_flag=("vae", "force_upcast"),
    ),
    GraphSpec(
        "vae_encoder",
        lambda pipe, names: VAEEncoder(pipe.vae),
        inputs=(_t("sample", FLOAT, "batch", "rgb", "height", "width"),),
        outputs=(
            _t("latent_mean", FLOAT, "batch", "latent_channels", "latent_height", "latent_width"),
            _t("latent_std", FLOAT, "batch", "latent_channels", "latent_height", "latent_width"),
        ),
        optimizer_type="vae",
        tolerance=VAE_TOLERANCE,
        force_fp32_flag=("vae", "force_upcast"),
    ),
)

# A family is the set of graphs its pipelines are cut into; which family a pipeline belongs to is
# read from the components it has (``family_of``), never from a model name.
FAMILIES: dict[str, dict[str, GraphSpec]] = {
    family: {spec.name: spec for spec in specs}
    for family, specs in {
        "sd": (
            GraphSpec(
                "text_encoder",
                lambda pipe, names: TextEncoder(pipe.text_encoder),
                inputs=(_t("input_ids", "int32", "batch", "sequence"),),
                outputs=(_t("last_hidden_state", FLOAT, "batch", "sequence", "hidden"),),
                optimizer_type="clip",
                tolerance=TOLERANCE,
                **TEXT_ENCODER, tokenizer=("tokenizer", "tokenizer"),
            ),
            UNET,
            *VAE_GRAPHS,
        ),
        "sdxl": (
            GraphSpec(
                "text_encoder",
                lambda pipe, names: PenultimateTextEncoder(pipe.text_encoder, pooled=False),
                inputs=(_t("input_ids", "int32", "batch", "sequence"),),
                outputs=(_t("hidden_states", FLOAT, "batch", "sequence", "hidden"),),
                optimizer_type="clip",
                tolerance=TOLERANCE,
                **TEXT_ENCODER, tokenizer=("tokenizer", "tokenizer"),
            ),
            GraphSpec(
                "text_encoder_2",
                lambda pipe, names: PenultimateTextEncoder(pipe.text_encoder_2, pooled=True),
                inputs=(_t("input_ids", "int32", "batch", "sequence"),),
                outputs=(_t("hidden_states", FLOAT, "batch", "sequence", "hidden_2"),
                         _t("text_embeds", FLOAT, "batch", "pooled")),
                optimizer_type="clip",
                tolerance=TOLERANCE,
                **TEXT_ENCODER, tokenizer=("tokenizer_2", "tokenizer_2"),
            ),
            UNET,
            *VAE_GRAPHS,
        ),
    }.items()
}
# Every graph name of every family, in export order (the runtime reads which ones a model has).
GRAPHS: dict[str, GraphSpec] = {name: spec for specs in FAMILIES.values() for name, spec in specs.items()}


def family_of(pipe) -> str:
    """``sdxl`` pipelines carry a second text encoder; everything else is cut like SD 1.x/2.x."""
    return "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd"


def graphs_for(pipe) -> dict[str, GraphSpec]:
    return FAMILIES[family_of(pipe)]


def model_dims(pipe) -> dict:
    """The fixed axes of every graph, read from the component configs (never from a model name).

    An axis that is None marks a conditioning input this model does not take.
    """
    unet, vae, text = pipe.unet.config, pipe.vae.config, pipe.text_encoder.config
    text_2 = getattr(pipe, "text_encoder_2", None)
    text_time = getattr(unet, "addition_embed_type", None) == "text_time"
    pooled = text_2.config.projection_dim if text_2 is not None else None
    return {
        "sequence": pipe.tokenizer.model_max_length,
        "hidden": text.hidden_size,
        "hidden_2": text_2.config.hidden_size if text_2 is not None else None,
        "cross_attention": unet.cross_attention_dim,
        "vocab": text.vocab_size,
        "channels": unet.in_channels,
        "out_channels": unet.out_channels,
        "latent_channels": vae.latent_channels,
        "rgb": vae.in_channels,
        "pooled": pooled if text_time else None,
        # SDXL's micro-conditioning: each id gets addition_time_embed_dim features beside the pooled text.
        "time_ids": ((unet.projection_class_embeddings_input_dim - pooled) // unet.addition_time_embed_dim
                     if text_time else None),
        "time_cond": getattr(unet, "time_cond_proj_dim", None),
    }


def size_rule(pipe) -> tuple[int, int]:
    """(vae_scale_factor, latent_multiple): image sides must be multiples of their product."""
    vae_scale_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    latent_multiple = 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    return vae_scale_factor, latent_multiple


def example_sizes(pipe, batch: int, latent_units: int) -> dict:
    """Concrete values for the dynamic axes: ``latent_units`` multiples of the latent size rule."""
    vae_scale_factor, latent_multiple = size_rule(pipe)
    latent = latent_multiple * latent_units
    # One prompt chunk per batch row, so tracing (two chunks) and validation (one) differ in length.
    return {"batch": batch, "latent_height": latent, "latent_width": latent,
            "height": latent * vae_scale_factor, "width": latent * vae_scale_factor,
            "context": pipe.tokenizer.model_max_length * batch}
