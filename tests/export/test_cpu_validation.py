"""fp16 graphs fused for CUDA, exported on a machine without CUDA: each is validated on the CPU at
the same precision, fused without the CUDA-only fusions, and the manifest says where. Loading such a
folder on the CPU says in one line what it was exported for and what to export instead."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edgediff.cli import main
from edgediff.runtime.sessions import available_providers

pytestmark = pytest.mark.skipif("cuda" in available_providers(), reason="checks the export on a CUDA-less machine")


@pytest.fixture(scope="module")
def cuda_exports(tiny_store, tmp_path_factory):
    from tiny_models import export_with_cli

    root = tmp_path_factory.mktemp("cuda-exports")
    return {kind: export_with_cli(tiny_store.source(kind), root / kind, "--precision", "fp16", "--optimize-for", "cuda")
            for kind in ("sd1", "sdxl")}


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_cuda_graphs_are_validated_on_the_cpu(cuda_exports, kind):
    folder = cuda_exports[kind]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["optimized_for"] == "cuda"
    graphs = manifest["graphs"]
    assert {"unet", "text_encoder", "vae_decoder"} <= set(graphs)
    for name, graph in graphs.items():
        validation = graph["validation"]
        assert validation["validated"] is True, (name, validation)
        assert validation["where"] == "cpu, before cuda fusions"
        assert validation["max_relative"] <= validation["tolerance"]
        assert all(o["finite"] for o in validation["outputs"].values())
    assert graphs["unet"]["precision"] == "fp16"
    assert not list(folder.rglob("cpu_check*"))  # the checked graph is not shipped
    # The shipped U-Net is still CUDA's: it holds a CUDA-only fused op.
    import onnx

    ops = {node.op_type for node in onnx.load(str(folder / "unet" / "model.onnx"), load_external_data=False).graph.node}
    assert ops & {"NhwcConv", "GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "BiasAdd"}, ops


def test_checked_graph_over_2gb_leaves_no_weights_file(tiny_store, tmp_path, monkeypatch):
    """A graph past protobuf's 2 GB keeps its weights in ``.onnx.data`` beside it: the CPU check's
    (SDXL's U-Net: 5 GB in fp16, SD 3.5's T5: 9 GB) went with its .onnx, not stay in the export."""
    from edgediff.exporter import weights
    from edgediff.exporter.export import export_model

    monkeypatch.setattr(weights, "EMBED_LIMIT", 0)  # every graph written as one past 2 GB is
    out = tmp_path / "model"
    export_model(str(tiny_store.source("sd1")), out, precision="fp16", optimize_for="cuda", graphs=("unet",),
                 log=lambda line: None)
    assert (out / "unet" / "model.onnx.data").is_file()
    assert not list(out.rglob("cpu_check*"))


def test_info_says_where_each_graph_was_validated(cuda_exports):
    result = CliRunner().invoke(main, ["info", str(cuda_exports["sd1"])])
    assert result.exit_code == 0
    unet = next(line for line in result.stdout.splitlines() if line.strip().startswith("unet"))
    assert "on cpu, before cuda fusions" in unet and "not validated" not in result.stdout


def test_generate_on_the_cpu_says_exported_for_cuda(cuda_exports, tmp_path):
    result = CliRunner().invoke(main, ["generate", "a cat", "--model", str(cuda_exports["sd1"]), "--steps", "1",
                                       "--provider", "cpu", "-o", str(tmp_path / "x.png")])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code != 0 and len(lines) == 1, result.stderr
    assert "optimized for CUDA" in lines[0] and "--optimize-for cuda" in lines[0]
    assert "re-export with --optimize-for cpu" in lines[0] and "corrupt" not in lines[0]
    assert not (tmp_path / "x.png").exists()
