"""The shipped default models must carry what the exporter writes today: the same schema version,
the same manifest fields and the same dynamic axes (a fixed 77-token U-Net context means no long
prompts and no BREAK). Compared against a fresh tiny export's manifest, so the test follows the
exporter: a new field or axis the shipped folders lack fails it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import edgediff.models as models

SHIPPED = Path(models.__file__).parent


def _structure(manifest: dict) -> dict:
    """What must match: schema, top-level fields, each graph's fields, each tensor's symbolic axes
    (positions and names; numeric axes are the model's own sizes)."""
    graphs = {}
    for name, graph in manifest["graphs"].items():
        tensors = {t["name"]: [a if isinstance(a, str) else "fixed" for a in t["shape"]]
                   for t in (*graph["inputs"], *graph["outputs"])}
        graphs[name] = {"fields": sorted(graph), "axes": tensors}
    return {"schema_version": manifest["schema_version"], "fields": sorted(manifest), "graphs": graphs}


@pytest.mark.parametrize("folder", ["default", "default-fp16"])
def test_shipped_manifest_matches_a_fresh_export(tiny_exports, folder):
    fresh = _structure(json.loads((tiny_exports["sd1", "fp32"] / "manifest.json").read_text()))
    shipped = _structure(json.loads((SHIPPED / folder / "manifest.json").read_text()))
    assert shipped["schema_version"] == fresh["schema_version"]
    assert shipped["fields"] == fresh["fields"]
    for name, graph in fresh["graphs"].items():
        assert shipped["graphs"][name] == graph, name


def test_structure_sees_a_fixed_context():
    """The comparison can fail: a fixed U-Net context differs from the dynamic one."""
    def manifest(context):
        return {"schema_version": 1, "graphs": {"unet": {"inputs": [
            {"name": "encoder_hidden_states", "dtype": "float32", "shape": ["batch", context, 32]}], "outputs": []}}}

    assert _structure(manifest(77)) != _structure(manifest("context"))
