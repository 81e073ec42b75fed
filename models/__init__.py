"""Data shipped with edgediff: the default model, known architectures' configs, the CLIP tokenizer.

Everything here is package data, so an installed copy finds it as well as a checkout does.
"""
from pathlib import Path

HERE = Path(__file__).resolve().parent


def default_model_dir(precision: str = "fp32") -> Path:
    """The shipped default model: ``fp32`` for the CPU, ``fp16`` for GPUs."""
    return HERE / ("default" if precision == "fp32" else f"default-{precision}")


def configs_dir() -> Path:
    """Diffusers configs (no weights) of known full-size architectures: sd15, sd21, sdxl, sd35m."""
    return HERE / "configs"


def clip_tokenizer_dir() -> Path:
    """OpenAI CLIP's BPE tokenizer files (49408 tokens), as transformers reads them."""
    return HERE / "clip_tokenizer"
