"""Tiny SD 1.x / 2.x pipelines saved as diffusers folders and exported once per test session."""
from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from tiny_models import export_with_cli as export  # noqa: E402
from tiny_models import save_pipeline  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    return {kind: save_pipeline(kind, root / kind) for kind in ("sd1", "sd2")}


@pytest.fixture(scope="session")
def tiny_exports(tiny_sources, tmp_path_factory):
    """{(kind, precision): exported folder}, fp16 graphs optimized for the CPU so they run here."""
    root = tmp_path_factory.mktemp("exports")
    exports = {}
    for kind, source in tiny_sources.items():
        exports[kind, "fp32"] = export(source, root / f"{kind}-fp32", "--precision", "fp32")
        exports[kind, "fp16"] = export(source, root / f"{kind}-fp16", "--precision", "fp16", "--optimize-for", "cpu")
    return exports


@pytest.fixture(scope="session")
def inpaint_source(tmp_path_factory):
    return save_pipeline("sd1-inpaint", tmp_path_factory.mktemp("sources") / "sd1-inpaint")


@pytest.fixture(scope="session")
def inpaint_export(inpaint_source, tmp_path_factory):
    """The 9-channel inpainting model, exported in fp32."""
    return export(inpaint_source, tmp_path_factory.mktemp("exports") / "sd1-inpaint-fp32", "--precision", "fp32")


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
