"""Tiny SD 1.x / 2.x pipelines saved as diffusers folders and exported once per test session
(tests/conftest.py's tiny_store, shared with every other folder's tests)."""
from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from tiny_models import export_with_cli as export  # noqa: E402


class _OnFirstUse:
    """``mapping[key]`` made by ``make(key)`` when first asked for (the store keeps it). The fixtures
    below make their usual entries when they are set up, as before: never inside a test, where a
    monkeypatch (diffusers' noise, the exporter's stages) could reach the export."""

    def __init__(self, make):
        self._make = make

    def __getitem__(self, key):
        return self._make(key)


@pytest.fixture(scope="session")
def tiny_sources(tiny_store):
    """{kind: diffusers folder} for "sd1" and "sd2"."""
    for kind in ("sd1", "sd2"):
        tiny_store.source(kind)
    return _OnFirstUse(tiny_store.source)


@pytest.fixture(scope="session")
def tiny_exports(tiny_store):
    """{(kind, precision): exported folder}, fp16 graphs optimized for the CPU so they run here."""
    def make(key):
        kind, precision = key
        return tiny_store.export(kind, precision, *(("--optimize-for", "cpu") if precision == "fp16" else ()))
    for key in (("sd1", "fp32"), ("sd1", "fp16"), ("sd2", "fp32"), ("sd2", "fp16")):
        make(key)
    return _OnFirstUse(make)


@pytest.fixture(scope="session")
def inpaint_source(tiny_store):
    return tiny_store.source("sd1-inpaint")


@pytest.fixture(scope="session")
def inpaint_export(tiny_store):
    """The 9-channel inpainting model, exported in fp32."""
    return tiny_store.export("sd1-inpaint", "fp32")


@pytest.fixture(scope="session")
def sd3(tmp_path_factory):
    """Tiny SD 3.5 Medium- and SD 3-shaped pipelines (test_sd3.build_sd3): {kind: (diffusers folder,
    fp32 export)}, shared by the SD3 test modules."""
    from test_sd3 import build_sd3

    root = tmp_path_factory.mktemp("sd3")
    models = {}
    for kind in ("sd35m", "sd3"):
        build_sd3(kind).save_pretrained(root / kind)
        models[kind] = root / kind, export(root / kind, root / f"{kind}-fp32", "--precision", "fp32")
    return models
