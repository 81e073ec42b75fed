"""``edgediff serve``: AUTOMATIC1111's HTTP API subset over the torch-free runtime.

Needs the ``serve`` extra (fastapi, uvicorn). Imports ``edgediff.runtime`` only, never torch.
"""
from .app import Limits, create_app, serve

__all__ = ["Limits", "create_app", "serve"]
