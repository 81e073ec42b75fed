"""Helpers shared by the test folders (tests/conftest.py puts this folder on sys.path; the shared
fixtures are in tests/conftest.py). Each used to be repeated in the test files that need it."""
from __future__ import annotations

import importlib

import numpy as np

# Parity runs against diffusers: one prompt pair, one pixel tolerance for fp32 (pixels in [0, 1]).
PROMPT, NEGATIVE = "a red circle on a white background", "blurry, dark"
FP32_TOLERANCE = 2e-3


def assert_one_line_error(code, stderr, *fragments, prefix: str = ""):
    """A CLI user error: non-zero exit, one line on stderr holding every fragment, no traceback."""
    assert code != 0
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith(prefix)
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def feed_numpy_noise(monkeypatch, seed, *modules: str):
    """Serve diffusers' draws (the VAE posterior samples and the starting noise of the pipeline
    ``modules``) from ``numpy.random.default_rng(seed)``, in diffusers' order."""
    import torch

    rng = np.random.default_rng(seed)

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.from_numpy(rng.standard_normal(tuple(shape), dtype=np.float32)).to(dtype or torch.float32)

    for name in ("diffusers.models.autoencoders.vae", *modules):
        monkeypatch.setattr(importlib.import_module(name), "randn_tensor", randn_tensor)
