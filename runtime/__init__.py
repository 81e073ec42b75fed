"""The torch-free runtime: ``Pipeline.load(model_dir)`` then ``pipe(prompt, ...)``.

Needs only numpy, onnxruntime, tokenizers, pillow (and click for the CLI).
"""
from .controlnet import ControlUnit
from .errors import EdgediffError, InputError, ModelFolderError, ProviderError
from .pipeline import Pipeline, Result
from .request import GenerationRequest
from .sessions import available_providers

__all__ = ["Pipeline", "Result", "GenerationRequest", "ControlUnit", "EdgediffError", "InputError", "ModelFolderError",
           "ProviderError", "available_providers"]
