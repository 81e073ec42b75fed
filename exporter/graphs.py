"""Each exported graph declared once, as data: its boundary module, inputs, outputs, tolerance.

Export, validation and the manifest are all driven from ``GRAPHS`` (the idea of optimum's
``OnnxConfig``); the wrapper modules state each graph's boundary in a few lines (the idea of
Apple's ``VAEDecoder``).
"""
from __future__ import annotations

from dataclasses import dataclass
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


class UNet(nn.Module):
    """One denoising call; the timestep is float so fractional (Karras) timesteps pass through."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


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


@dataclass(frozen=True)
class GraphSpec:
    name: str
    wrap: Callable[[object], nn.Module]  # pipeline -> boundary module
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    optimizer_type: str  # model_type for onnxruntime.transformers.optimizer
    # Max abs difference against torch, relative to the reference output's peak magnitude.
    tolerance: dict[str, float]

    def resolve(self, specs: tuple[TensorSpec, ...], dims: dict, float_dtype: str) -> list[TensorSpec]:
        """Fix config-derived axes to numbers and the float placeholder to a real dtype."""
        return [
            TensorSpec(
                s.name,
                float_dtype if s.dtype == FLOAT else s.dtype,
                tuple(a if a in DYNAMIC_AXES else dims[a] for a in s.shape),
            )
            for s in specs
        ]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {
            s.name: {i: a for i, a in enumerate(s.shape) if a in DYNAMIC_AXES}
            for s in (*self.inputs, *self.outputs)
        }

    def example_inputs(self, dims: dict, sizes: dict) -> tuple[torch.Tensor, ...]:
        """Deterministic example inputs; ``sizes`` gives the dynamic axes their values."""
        generator = torch.Generator().manual_seed(0)
        tensors = []
        for spec in self.inputs:
            shape = [sizes[a] if a in DYNAMIC_AXES else dims[a] for a in spec.shape]
            if spec.name == "input_ids":
                tensors.append(torch.randint(0, dims["vocab"], shape, generator=generator, dtype=torch.int32))
            elif spec.name == "timestep":
                tensors.append(torch.full(shape, 601.0))
            else:
                tensors.append(torch.randn(shape, generator=generator))
        return tuple(tensors)


def _t(name, dtype, *shape):
    return TensorSpec(name, dtype, tuple(shape))


GRAPHS: dict[str, GraphSpec] = {
    spec.name: spec
    for spec in (
        GraphSpec(
            "text_encoder",
            lambda pipe: TextEncoder(pipe.text_encoder),
            inputs=(_t("input_ids", "int32", "batch", "sequence"),),
            outputs=(_t("last_hidden_state", FLOAT, "batch", "sequence", "hidden"),),
            optimizer_type="clip",
            tolerance={"fp32": 1e-4, "fp16": 2e-2, "int8": 2e-1},
        ),
        GraphSpec(
            "unet",
            lambda pipe: UNet(pipe.unet),
            inputs=(
                _t("sample", FLOAT, "batch", "channels", "latent_height", "latent_width"),
                _t("timestep", "float32", "batch"),
                _t("encoder_hidden_states", FLOAT, "batch", "context", "hidden"),
            ),
            outputs=(_t("out_sample", FLOAT, "batch", "out_channels", "latent_height", "latent_width"),),
            optimizer_type="unet",
            tolerance={"fp32": 1e-4, "fp16": 2e-2, "int8": 2e-1},
        ),
        GraphSpec(
            "vae_decoder",
            lambda pipe: VAEDecoder(pipe.vae),
            inputs=(_t("latent_sample", FLOAT, "batch", "latent_channels", "latent_height", "latent_width"),),
            outputs=(_t("sample", FLOAT, "batch", "rgb", "height", "width"),),
            optimizer_type="vae",
            tolerance={"fp32": 1e-4, "fp16": 2e-2, "int8": 2e-2},
        ),
        GraphSpec(
            "vae_encoder",
            lambda pipe: VAEEncoder(pipe.vae),
            inputs=(_t("sample", FLOAT, "batch", "rgb", "height", "width"),),
            outputs=(
                _t("latent_mean", FLOAT, "batch", "latent_channels", "latent_height", "latent_width"),
                _t("latent_std", FLOAT, "batch", "latent_channels", "latent_height", "latent_width"),
            ),
            optimizer_type="vae",
            tolerance={"fp32": 1e-4, "fp16": 2e-2, "int8": 2e-2},
        ),
    )
}


def model_dims(pipe) -> dict:
    """The fixed axes of every graph, read from the component configs (never from a model name)."""
    unet, vae, text = pipe.unet.config, pipe.vae.config, pipe.text_encoder.config
    return {
        "sequence": pipe.tokenizer.model_max_length,
        "hidden": text.hidden_size,
        "vocab": text.vocab_size,
        "channels": unet.in_channels,
        "out_channels": unet.out_channels,
        "latent_channels": vae.latent_channels,
        "rgb": vae.in_channels,
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
