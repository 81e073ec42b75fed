"""Each exported graph declared once, as data: its boundary module, inputs, outputs, tolerance.

Export, validation and the manifest are all driven from ``GRAPHS`` (the idea of optimum's
``OnnxConfig``); the wrapper modules state each graph's boundary in a few lines (the idea of
Apple's ``VAEDecoder``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from edgediff.runtime.manifest import TensorSpec

from . import sd3, upscaler

# Axes that stay symbolic in the exported graph; every other axis is fixed by the model's config.
# "context": the U-Net's text length, 77 tokens per prompt chunk (long prompts: runtime/prompts.py);
# the text encoder's own "sequence" stays fixed, its position embeddings allow 77 at most.
DYNAMIC_AXES = ("batch", "height", "width", "latent_height", "latent_width", "context")
FLOAT = "float"  # resolved to float16 or float32 by the export precision
# A ControlNet residual below the latent's own size is named by its downsampling: "latent_height/4".
DOWNSAMPLED = ("latent_height", "latent_width")


def is_dynamic(axis) -> bool:
    return axis in DYNAMIC_AXES or (isinstance(axis, str) and axis.split("/")[0] in DOWNSAMPLED)


def axis_size(axis: str, sizes: dict) -> int:
    """A dynamic axis's example value; a downsampled one divides its base axis."""
    base, _, factor = axis.partition("/")
    return sizes[base] // int(factor or 1)


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
    embedding and size ids (``added_cond_kwargs``), LCM's guidance embedding (``timestep_cond``), and
    the x4 upscaler's noise level (``class_labels``).
    """

    def __init__(self, unet, extra: tuple[str, ...]):
        super().__init__()
        self.unet = unet
        self.extra = extra

    def forward(self, sample, timestep, encoder_hidden_states, *extra):
        named = dict(zip(self.extra, extra))
        added = {k: named[k] for k in ("text_embeds", "time_ids") if k in named}
        down = [named[k] for k in self.extra if k.startswith(DOWN_RESIDUAL) and k in named]  # fed: optional
        return self.unet(sample, timestep, encoder_hidden_states, timestep_cond=named.get("timestep_cond"),
                         class_labels=named.get("class_labels"), added_cond_kwargs=added or None, down_block_additional_residuals=down or None,
                         mid_block_additional_residual=named.get(MID_RESIDUAL), return_dict=False)[0]


class ControlNet(nn.Module):
    """A ControlNet (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion Models"):
    the U-Net's inputs and a hint image in, one residual per U-Net skip connection and one for the
    mid block out, unscaled (the runtime scales them per unit and step, as diffusers' pipelines do)."""

    def __init__(self, controlnet, extra: tuple[str, ...]):
        super().__init__()
        self.controlnet = controlnet
        self.extra = extra

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, *extra):
        named = dict(zip(self.extra, extra))
        added = {k: named[k] for k in ("text_embeds", "time_ids") if k in named}
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states, controlnet_cond,
                                    added_cond_kwargs=added or None, return_dict=False)
        return (*down, mid)


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


def half_skip(shape, dims, generator) -> torch.Tensor:
    """SD3's skip mask with values in [0, 1): validation checks every block's blend, not only 0 or 1."""
    return torch.rand(shape, generator=generator)


def noise_level(shape, dims, generator) -> torch.Tensor:
    """The x4 upscaler's noise level, a class label below its ``max_noise_level``."""
    return torch.full(shape, 20, dtype=torch.int64)


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
    # int4 off CUDA keeps attention fused: the fusion (MultiHeadAttention, MMDiT's) leaves the q/k/v
    # projections as MatMuls for MatMulNBits. A U-Net's CPU fusion packs them into its Attention op.
    int4_fused_attention: bool = False
    # fp16: a (component, config flag) that, when true, keeps attention scores fp32 from the start
    # and attention unfused off CUDA (SD 2.x's ``upcast_attention`` overflows fp16).
    upcast_attention_flag: tuple[str, str] | None = None
    # fp16: a (component, config flag) that, when true, keeps the whole graph fp32 (SDXL's VAE
    # ``force_upcast``).
    force_fp32_flag: tuple[str, str] | None = None
    # fp16 escalation when an output overflows, in order: "attention" (scores and softmax in fp32),
    # then "graph" (everything fp32).
    fp16_escalation: tuple[str, ...] = ("attention", "graph")
    # fp16: nodes kept fp32 from the first try, chosen from the graph (model -> (node names, why)):
    # T5's overflowing residual stream (sd3.t5_fp16_islands).
    fp16_islands: Callable[[object], tuple[list[str], str]] | None = None
    # Example values per input name (default: gaussian).
    examples: dict[str, Example] = field(default_factory=dict)
    # (pipeline attribute, folder) of the tokenizer that feeds this text encoder, or None.
    tokenizer: tuple[str, str] | None = None
    # LoRAs and textual inversions patch this graph: the manifest maps torch names to its initializers.
    lora_patched: bool = False
    # ControlNet residuals (``residual_specs``): "inputs" for a U-Net that adds them (each defaults to
    # zeros, so a plain run does not feed them), "outputs" for a ControlNet that makes them.
    residuals: str | None = None
    # A component the pipeline may lack (SD3's T5): without it, the graph is not exported.
    optional: str | None = None
    # (component, class) for a module too big to hold in fp32 (T5-XXL, 19 GB): traced with one block's
    # weights, each block's own written from the checkpoint (sd3.StreamedT5), where the source is a
    # folder whose tensors can be read one at a time.
    streamed: tuple[str, type] | None = None

    def present(self, specs: tuple[TensorSpec, ...], dims: dict) -> tuple[TensorSpec, ...]:
        """The specs this model has: optional conditioning inputs exist only where the config sizes them;
        the residuals follow the declared ones."""
        found = tuple(s for s in specs if all(is_dynamic(a) or dims.get(a) is not None for a in s.shape))
        side = "inputs" if specs is self.inputs else "outputs" if specs is self.outputs else None
        return found + (residual_specs(dims) if side is not None and side == self.residuals else ())

    def zero_default(self, dims: dict) -> frozenset[str]:
        """Inputs with a zero default in the graph (ONNX initializers named as the input)."""
        return frozenset(s.name for s in residual_specs(dims)) if self.residuals == "inputs" else frozenset()

    def module(self, pipe, dims: dict) -> nn.Module:
        return self.wrap(pipe, tuple(s.name for s in self.present(self.inputs, dims)))

    def resolve(self, specs: tuple[TensorSpec, ...], dims: dict, float_dtype: str) -> list[TensorSpec]:
        """Fix config-derived axes to numbers and the float placeholder to a real dtype."""
        return [
            TensorSpec(
                s.name,
                float_dtype if s.dtype == FLOAT else s.dtype,
                tuple(a if is_dynamic(a) or isinstance(a, int) else dims[a] for a in s.shape),
            )
            for s in self.present(specs, dims)
        ]

    def dynamic_axes(self, dims: dict) -> dict[str, dict[int, str]]:
        return {
            s.name: {i: a for i, a in enumerate(s.shape) if is_dynamic(a)}
            for s in (*self.present(self.inputs, dims), *self.present(self.outputs, dims))
        }

    def example_inputs(self, dims: dict, sizes: dict) -> tuple[torch.Tensor, ...]:
        """Deterministic example inputs; ``sizes`` gives the dynamic axes their values."""
        generator = torch.Generator().manual_seed(0)
        return tuple(
            self.examples.get(spec.name, gaussian)(
                [axis_size(a, sizes) if is_dynamic(a) else a if isinstance(a, int) else dims[a] for a in spec.shape], dims, generator)
            for spec in self.present(self.inputs, dims)
        )

    def config_flag(self, meta, flag: tuple[str, str] | None) -> bool:
        """A declared (component, flag) read from the model's configs; False where not declared."""
        return flag is not None and bool(getattr(getattr(meta, flag[0]).config, flag[1], False))


def _t(name, dtype, *shape):
    return TensorSpec(name, dtype, tuple(shape))


DOWN_RESIDUAL, MID_RESIDUAL = "down_block_residual_", "mid_block_residual"


def residual_layout(config) -> list[tuple[int, int]]:
    """(channels, downsampling) of each skip connection a U-Net (or ControlNet) encoder keeps, in
    order, then of the mid block: conv_in, each down block's layers, its downsampler but the last's
    (diffusers' ``UNet2DConditionModel.forward``; SD 1.x: 12 + 1, SDXL: 9 + 1)."""
    channels = list(config.block_out_channels)
    layers = config.layers_per_block
    layers = list(layers) if isinstance(layers, (list, tuple)) else [layers] * len(channels)
    layout = [(channels[0], 1)]
    for index, (width, count) in enumerate(zip(channels, layers)):
        layout += [(width, 2 ** index)] * count
        if index < len(channels) - 1:
            layout.append((width, 2 ** (index + 1)))
    return layout + [(channels[-1], 2 ** (len(channels) - 1))]


def residual_specs(dims: dict) -> tuple[TensorSpec, ...]:
    """The residual tensors of ``dims["residuals"]``; full-size ones share the latent's axes."""
    layout = dims.get("residuals") or []
    names = [f"{DOWN_RESIDUAL}{i}" for i in range(len(layout) - 1)] + [MID_RESIDUAL]
    return tuple(
        _t(name, FLOAT, "batch", width, *(("latent_height", "latent_width") if factor == 1 else
                                          (f"latent_height/{factor}", f"latent_width/{factor}")))
        for name, (width, factor) in zip(names, layout))


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
    residuals="inputs",
)
# Exported on its own (``edgediff export CONTROLNET_SRC OUT``), against any base whose U-Net takes
# the same residuals (runtime/controlnet.py checks the fit).
CONTROLNET = GraphSpec(
    "controlnet",
    lambda pipe, names: ControlNet(pipe.controlnet, names[4:]),
    inputs=(
        _t("sample", FLOAT, "batch", "channels", "latent_height", "latent_width"),
        _t("timestep", "float32", "batch"),
        _t("encoder_hidden_states", FLOAT, "batch", "context", "cross_attention"),
        _t("controlnet_cond", FLOAT, "batch", "conditioning_channels", "height", "width"),
        _t("text_embeds", FLOAT, "batch", "pooled"),
        _t("time_ids", FLOAT, "batch", "time_ids"),
    ),
    outputs=(),
    optimizer_type="unet",
    tolerance=TOLERANCE,
    examples={"timestep": mid_timestep, "time_ids": size_ids},
    residuals="outputs",
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

# The x4 upscaler's U-Net (exporter/upscaler.py): 7 input channels (the latent, then the noised
# low-resolution picture, concatenated by the runtime) and the noise level as its class label.
UPSCALER_UNET = dataclasses.replace(
    UNET, inputs=(*UNET.inputs, _t("class_labels", "int64", "batch")), residuals=None,
    examples={**UNET.examples, "class_labels": noise_level})


def _sd3_clip(name: str, hidden: str, projection: str) -> GraphSpec:
    """SD3's CLIP-L and CLIP-G: penultimate hidden states and the pooled projection, as SDXL's second."""
    return GraphSpec(
        name,
        lambda pipe, names: PenultimateTextEncoder(getattr(pipe, name), pooled=True),
        inputs=(_t("input_ids", "int32", "batch", "sequence"),),
        outputs=(_t("hidden_states", FLOAT, "batch", "sequence", hidden),
                 _t("text_embeds", FLOAT, "batch", projection)),
        optimizer_type="clip",
        tolerance=TOLERANCE,
        examples={"input_ids": token_ids},
        tokenizer=(name.replace("text_encoder", "tokenizer"),) * 2,
        lora_patched=True,  # SD 3 LoRAs' text_encoder. / text_encoder_2. (kohya lora_te1_ / lora_te2_) layers
    )


SD3_GRAPHS = (
    _sd3_clip("text_encoder", "hidden", "projection"),
    _sd3_clip("text_encoder_2", "hidden_2", "projection_2"),
    GraphSpec(
        "text_encoder_3",
        lambda pipe, names: sd3.T5Encoder(pipe.text_encoder_3),
        inputs=(_t("input_ids", "int32", "batch", "t5_sequence"),),
        outputs=(_t("last_hidden_state", FLOAT, "batch", "t5_sequence", "t5_hidden"),),
        optimizer_type="t5",
        tolerance=TOLERANCE,
        # int4 covers T5's MatMuls as the transformer's (--precision int4); fp16 keeps its islands fp32.
        quantizable=True,
        fp16_islands=sd3.t5_fp16_islands,
        streamed=("text_encoder_3", sd3.StreamedT5),
        examples={"input_ids": token_ids},
        tokenizer=("tokenizer_3", "tokenizer_3"),
        optional="text_encoder_3",
    ),
    # The denoiser graph keeps the role name "unet" that the runtime runs, whatever its architecture.
    GraphSpec(
        "unet",
        lambda pipe, names: sd3.MMDiT(pipe.transformer, names),
        inputs=(
            _t("sample", FLOAT, "batch", "channels", "latent_height", "latent_width"),
            _t("timestep", "float32", "batch"),
            _t("encoder_hidden_states", FLOAT, "batch", "context", "joint_attention"),
            _t("pooled_projections", FLOAT, "batch", "pooled"),
            _t("skip_layers", "float32", "batch", "layers"),
        ),
        outputs=(_t("out_sample", FLOAT, "batch", "out_channels", "latent_height", "latent_width"),),
        optimizer_type="mmdit",
        tolerance=TOLERANCE,
        quantizable=True,
        int4_fused_attention=True,
        lora_patched=True,  # PEFT/kohya LoRAs name the transformer's linears (runtime/lora.py)
        examples={"timestep": mid_timestep, "skip_layers": half_skip},
    ),
    *VAE_GRAPHS,
)

SD_TEXT_ENCODER = GraphSpec(
    "text_encoder",
    lambda pipe, names: TextEncoder(pipe.text_encoder),
    inputs=(_t("input_ids", "int32", "batch", "sequence"),),
    outputs=(_t("last_hidden_state", FLOAT, "batch", "sequence", "hidden"),),
    optimizer_type="clip",
    tolerance=TOLERANCE,
    **TEXT_ENCODER, tokenizer=("tokenizer", "tokenizer"),
)

# A family is the set of graphs its pipelines are cut into; which family a pipeline belongs to is
# read from the components it has (``family_of``), never from a model name.
FAMILIES: dict[str, dict[str, GraphSpec]] = {
    family: {spec.name: spec for spec in specs}
    for family, specs in {
        "sd": (
            SD_TEXT_ENCODER,
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
        "sd3": SD3_GRAPHS,
        # The x4 upscaler needs no VAE encoder: its picture enters the U-Net as pixels.
        "upscaler": (SD_TEXT_ENCODER, UPSCALER_UNET, VAE_GRAPHS[0]),
    }.items()
}
# Every graph name of every family, in export order (the runtime reads which ones a model has).
GRAPHS: dict[str, GraphSpec] = {name: spec for specs in FAMILIES.values() for name, spec in specs.items()}


def family_of(pipe) -> str:
    """``sd3`` pipelines denoise with a ``transformer``; ``upscaler`` ones noise a picture with a
    ``low_res_scheduler`` for a U-Net that takes it with a noise-level class label; ``sdxl``
    pipelines carry a second text encoder; everything else is cut like SD 1.x/2.x."""
    if getattr(pipe, "transformer", None) is not None:
        return "sd3"
    if upscaler.is_upscaler(pipe):
        return "upscaler"
    return "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd"


def graphs_for(pipe) -> dict[str, GraphSpec]:
    return {name: spec for name, spec in FAMILIES[family_of(pipe)].items()
            if spec.optional is None or getattr(pipe, spec.optional, None) is not None}


def model_dims(pipe) -> dict:
    return FAMILY_RULES[family_of(pipe)]["dims"](pipe)


def size_rule(pipe) -> tuple[int, int]:
    """(vae_scale_factor, latent_multiple): image sides must be multiples of their product."""
    return FAMILY_RULES[family_of(pipe)]["size_rule"](pipe)


def default_size(pipe) -> int:
    """The image side the denoiser was trained at, in pixels."""
    return FAMILY_RULES[family_of(pipe)]["default_size"](pipe)


def manifest_fields(pipe) -> dict:
    """Manifest fields a family states itself (SD3: flow matching, its text layout); {} elsewhere."""
    rule = FAMILY_RULES[family_of(pipe)].get("manifest")
    return rule(pipe) if rule else {}


def _unet_dims(pipe) -> dict:
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
        "residuals": residual_layout(unet),
    }


def controlnet_dims(config) -> dict:
    """The fixed axes of a ControlNet graph, from its config; SDXL's take the 6 size ids of SDXL base."""
    text_time = getattr(config, "addition_embed_type", None) == "text_time"
    time_ids = 6 if text_time else None
    return {
        "channels": config.in_channels, "cross_attention": config.cross_attention_dim,
        "conditioning_channels": config.conditioning_channels,
        "pooled": config.projection_class_embeddings_input_dim - time_ids * config.addition_time_embed_dim
        if text_time else None,
        "time_ids": time_ids, "residuals": residual_layout(config),
    }


def controlnet_sizes(config, batch: int, latent_units: int) -> dict:
    """Example sizes for a ControlNet: its hint enters at the image's size, which its conditioning
    embedding brings down to the latent's by stride-2 convolutions."""
    latent = 2 ** (len(config.block_out_channels) - 1) * latent_units
    hint = latent * hint_scale_factor(config)
    return {"batch": batch, "latent_height": latent, "latent_width": latent, "height": hint, "width": hint,
            "context": 77 * batch}


def hint_scale_factor(config) -> int:
    """Image pixels per latent pixel the ControlNet's conditioning embedding assumes (SD: 8)."""
    return 2 ** (len(config.conditioning_embedding_out_channels) - 1)


def _unet_size_rule(pipe) -> tuple[int, int]:
    vae_scale_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    latent_multiple = 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    return vae_scale_factor, latent_multiple


def _unet_default_size(pipe) -> int:
    return int(pipe.unet.config.sample_size) * _unet_size_rule(pipe)[0]


_UNET_RULES = {"dims": _unet_dims, "size_rule": _unet_size_rule, "default_size": _unet_default_size}
# Per family, how its configs give the graphs' axes, the size rule and the default size.
FAMILY_RULES = {"sd": _UNET_RULES, "sdxl": _UNET_RULES,
                "upscaler": {**_UNET_RULES, "manifest": upscaler.manifest_fields},
                "sd3": {"dims": sd3.model_dims, "size_rule": sd3.size_rule, "default_size": sd3.default_size,
                        "manifest": sd3.manifest_fields}}


def example_sizes(pipe, batch: int, latent_units: int) -> dict:
    """Concrete values for the dynamic axes: ``latent_units`` multiples of the latent size rule."""
    vae_scale_factor, latent_multiple = size_rule(pipe)
    latent = latent_multiple * latent_units
    # One prompt chunk per batch row, so tracing (two chunks) and validation (one) differ in length.
    return {"batch": batch, "latent_height": latent, "latent_width": latent,
            "height": latent * vae_scale_factor, "width": latent * vae_scale_factor,
            "context": pipe.tokenizer.model_max_length * batch}
