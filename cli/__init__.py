"""edgediff: export Stable Diffusion once to validated ONNX graphs, generate without torch.

The ``edgediff`` package itself is the command line (``edgediff.cli``); the runtime lives in
``edgediff.runtime``, the exporter in ``edgediff.exporter``.
"""
__version__ = "0.1.0"
