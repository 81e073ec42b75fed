"""SD 3.5's precision policy on tiny models: T5 in fp16 with fp32 islands (its residual stream, as
ONNX Runtime's SD3 tooling keeps it), and weight-only int4 over the transformer's and T5's MatMuls.

The T5 here is made to overflow fp16 as trained T5 v1.1 does: its last block's feed-forward output
projection (``wo``) is scaled up, so that sublayer's output and the residual stream after it exceed
fp16's 65504. With the islands the fp16 graph stays finite and within FP16_TOLERANCE of torch fp32;
without them the same export overflows and falls back to a whole-graph fp32 T5.
"""
from __future__ import annotations

import json

import pytest
import torch

from edgediff.exporter import graphs as graphs_module
from edgediff.exporter.export import export_model
from test_sd3 import build_sd3

# Relative to the output's peak, as the exporter validates: the fp16 declaration's 2e-2.
FP16_TOLERANCE = 2e-2
WO_SCALE = 3e4  # block 1's feed-forward output grows past fp16's range (measured peak ~1e5)


@pytest.fixture(scope="module")
def overflowing(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3_precision")
    pipe = build_sd3("sd35m")
    t5 = pipe.text_encoder_3
    with torch.no_grad():
        t5.encoder.block[-1].layer[1].DenseReluDense.wo.weight.mul_(WO_SCALE)
        ids = torch.randint(0, t5.config.vocab_size, (1, 256), generator=torch.Generator().manual_seed(0))
        seen = []
        hook = t5.encoder.final_layer_norm.register_forward_hook(lambda module, args, out: seen.append(args[0]))
        t5(ids)
        hook.remove()
    residual = seen[0]  # the residual stream before the final norm
    assert float(residual.abs().max()) > 65504  # past fp16's range: the test can fail without islands
    pipe.save_pretrained(root / "src")
    return root


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3_int4")
    build_sd3("sd35m").save_pretrained(root / "src")
    return root


@pytest.fixture(scope="module")
def plain_int4(plain):
    """The int4 export of T5 and the transformer, read by two tests: made once."""
    return _export(plain, "int4", "int4", graphs=("text_encoder_3", "unet"))


@pytest.fixture(scope="module")
def plain_unfused(plain):
    """The transformer exported without fusions: attention as MatMul, Softmax, MatMul."""
    return _export(plain, "unfused", "fp32", graphs=("unet",), optimize_for="none")


def _t5_entry(folder):
    return json.loads((folder / "manifest.json").read_text())["graphs"]["text_encoder_3"]


def _export(root, name, precision, graphs=("text_encoder_3",), optimize_for="cpu"):
    return export_model(str(root / "src"), root / name, precision=precision, optimize_for=optimize_for,
                        graphs=graphs, overwrite=True, log=lambda line: None) and root / name


@pytest.fixture(scope="module")
def fp16_islands(overflowing):
    return _export(overflowing, "fp16", "fp16")


def test_t5_fp16_with_fp32_islands_matches_fp32(overflowing, fp16_islands):
    entry = _t5_entry(fp16_islands)
    assert entry["precision"] == "fp16", entry["kept_fp32"]
    assert any("T5 residual stream" in why for why in entry["kept_fp32"])
    assert entry["validation"]["validated"] and entry["validation"]["max_relative"] <= FP16_TOLERANCE
    import onnx

    model = onnx.load(str(overflowing / "fp16" / "text_encoder_3" / "model.onnx"))
    weights = [t for t in model.graph.initializer if len(t.dims) == 2 and t.dims[0] * t.dims[1] >= 96 * 64]
    half = [t for t in weights if t.data_type == onnx.TensorProto.FLOAT16]
    assert len(half) > len(weights) // 2  # the graph is fp16 but for its islands


def test_t5_fp16_validated_part_by_part_as_in_one_session(overflowing, fp16_islands, monkeypatch):
    """Past validate.PARTS_FP16_BYTES (T5-XXL's 9.5 GB on a CPU) the graph runs a few blocks at a time:
    every value crossing a part (the position bias, the fp32 island's residual) is carried over, and
    the verdict and differences are those of one session."""
    from edgediff.exporter import graph_parts, validate

    monkeypatch.setattr(validate, "PARTS_FP16_BYTES", 0)
    monkeypatch.setattr(validate, "PART_BYTES", 32 * 1024)
    counts = []
    split = graph_parts.split
    monkeypatch.setattr(graph_parts, "split", lambda *args: counts.append(len(parts := split(*args))) or parts)
    entry = _t5_entry(_export(overflowing, "fp16-parts", "fp16"))
    assert counts and min(counts) > 3
    whole = _t5_entry(fp16_islands)
    assert entry["precision"] == whole["precision"] == "fp16" and entry["validation"]["validated"]
    for output, result in entry["validation"]["outputs"].items():
        assert result["finite"]
        assert result["relative"] == pytest.approx(whole["validation"]["outputs"][output]["relative"], rel=0.1, abs=1e-4)
    assert not list((overflowing / "fp16-parts").rglob("*part*"))


def test_t5_without_islands_overflows_fp16(overflowing, monkeypatch):
    """The islands are what keeps it fp16: without them the first try is not finite."""
    spec = graphs_module.FAMILIES["sd3"]["text_encoder_3"]
    from dataclasses import replace

    monkeypatch.setitem(graphs_module.FAMILIES["sd3"], "text_encoder_3", replace(spec, fp16_islands=None))
    entry = _t5_entry(_export(overflowing, "fp16-plain", "fp16"))
    assert entry["precision"] == "fp32" and entry["kept_fp32"] == ["whole graph (fp16 overflow)"]


def test_int4_covers_transformer_and_t5_and_runs(plain_int4):
    folder = plain_int4
    manifest = json.loads((folder / "manifest.json").read_text())
    import onnx

    for name in ("text_encoder_3", "unet"):
        entry = manifest["graphs"][name]
        assert entry["precision"] == "int4" and entry["quantization"]["packed_bytes"] > 0, entry
        # validated: ONNX Runtime loaded and ran it on the CPU, within the int4 tolerance of torch fp32
        assert entry["validation"]["validated"] and entry["validation"]["max_relative"] <= 2e-1
        graph = onnx.load(str(folder / entry["path"]), load_external_data=False).graph
        ops = [node.op_type for node in graph.node]
        assert "MatMulNBits" in ops
        # attention stays float: fused in the transformer (its projections stay MatMuls, so int4 takes
        # them), as MatMuls in T5
        assert ("MultiHeadAttention" if name == "unet" else "MatMul") in ops, sorted(set(ops))
        # the adaLN modulations and embedders (Linear on 2-D input: Gemm) are quantized too
        weights = {t.name for t in graph.initializer}
        assert not [n.name for n in graph.node if n.op_type in ("Gemm", "MatMul") and n.input[1] in weights]


def test_export_of_the_denoiser_alone_reads_back(plain_int4):
    """A manifest of only some graphs (the benchmarks' transformer-only exports, which
    benchmarks/unet_step.py reads) lists no text encoder it lacks, so it reads back: it used to gain
    a default ``text_encoder`` entry when written, which its own check then refused."""
    from edgediff.runtime.manifest import Manifest

    data = json.loads((plain_int4 / "manifest.json").read_text())
    data["graphs"] = {"unet": data["graphs"]["unet"]}
    data["text_encoders"] = []
    written = json.loads(json.dumps(Manifest.from_dict(data).to_dict()))  # as write_manifest writes it
    assert Manifest.from_dict(written).text_encoders == []


def test_streamed_t5_export_needs_one_block_not_the_whole_encoder(monkeypatch):
    """T5-XXL (17.7 GiB of fp32 weights) exported from a folder holds one block while traced and its
    int4/fp16 weights while validated: the memory check up front must not refuse it on 24 GiB for the
    whole fp32 encoder, and must still refuse an fp32 export, which holds all of it."""
    from types import SimpleNamespace

    from transformers import T5Config, T5EncoderModel

    from edgediff.exporter import export as export_module, memory
    from edgediff.exporter.graphs import graphs_for
    from edgediff.models import configs_dir

    config = T5Config.from_pretrained(configs_dir() / "sd35m" / "text_encoder_3")
    with torch.device("meta"):
        t5 = T5EncoderModel(config)
    one_block = sum(p.numel() for p in t5.encoder.block[1].parameters()) + t5.shared.weight.numel()
    whole = 4 * sum(p.numel() for p in t5.encoder.parameters())
    spec = next(s for s in graphs_for(build_sd3("sd35m")).values() if s.streamed)
    assert spec.streamed[1].resident_bytes(config) == 4 * (one_block + config.d_model)  # + the final norm

    def components(folder: bool):
        return export_module.Components(SimpleNamespace(text_encoder_3=SimpleNamespace(config=config)), None,
                                        {"text_encoder_3": whole}, lambda name: object() if folder else None)

    held = {precision: export_module._held_bytes(components(True), spec, {"text_encoder_3"}, precision)
            for precision in ("fp32", "fp16", "int4")}
    assert held == {"fp32": whole, "fp16": whole // 2, "int4": max(whole // 8, spec.streamed[1].resident_bytes(config))}
    # a single file loads whole: no streaming, the whole encoder is held
    assert export_module._held_bytes(components(False), spec, {"text_encoder_3"}, "int4") == whole
    monkeypatch.setattr(memory, "available_bytes", lambda: 16 * memory.GIB)
    monkeypatch.setattr(memory, "_status_kib", lambda field: 0)
    memory.check_memory([held["int4"]], "sd35m")
    memory.check_memory([held["fp16"]], "sd35m")
    with pytest.raises(export_module.EdgediffError, match="not enough memory"):
        memory.check_memory([held["fp32"]], "sd35m")


def test_memory_estimate_reads_the_transformer_attention(plain_unfused):
    """Unfused attention (MatMul, Softmax, MatMul): its score matrices are batch x heads x tokens^2,
    heads read from the Reshape that splits them off; the image and text tokens joined along the token
    axis keep their width (a walk summing them as channels doubled the estimate at every joint block:
    1.2 million GB for SD 3.5 Medium at 1024x1024)."""
    from edgediff.runtime.manifest import GraphEntry
    from edgediff.runtime.memory import load_profile

    entry = json.loads((plain_unfused / "manifest.json").read_text())["graphs"]["unet"]
    profile = load_profile(plain_unfused, "unet", GraphEntry.from_dict(entry))
    weights = set(profile.info.shapes)
    scores = [n for n in profile.info.nodes if n.op_type == "MatMul" and not weights & set(n.inputs)
              and profile.producers[n.outputs[0]] is n and any(
                  m.op_type == "Softmax" and m.inputs[0] in _downstream(profile, n.outputs[0], 3)
                  for m in profile.info.nodes)]
    assert scores and {profile.heads(n.inputs[0]) for n in scores} == {4}  # build_sd3's num_attention_heads
    latent = 64  # 32x32 tokens after the 2x2 patches
    peak, _, score = profile.activation_bytes(1, latent, latent, 77 + 256)
    tokens = (latent // 2) ** 2
    assert score == 4 * tokens * tokens * 4  # heads x tokens^2 fp32 values
    assert peak < 4 * score


def _downstream(profile, name, depth):
    """Names reachable from ``name`` within ``depth`` nodes."""
    found, frontier = {name}, {name}
    for _ in range(depth):
        frontier = {out for node in profile.info.nodes if set(node.inputs) & frontier for out in node.outputs}
        found |= frontier
    return found
