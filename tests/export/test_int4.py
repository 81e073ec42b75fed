"""``--precision int4``: the U-Net's MatMul weights as 4-bit blocks (ONNX Runtime's MatMulNBits).

Tiny random-weight models, exported through the CLI. Tolerances are stated from what was measured
here (random weights are harder on 4-bit blocks than trained ones: no outliers are learned away):
IMAGE_TOLERANCE bounds the pixel difference (pixels in [0, 1]) from the fp32 export and from
diffusers on the same starting noise.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from edgediff.cli import main
from edgediff.runtime import Pipeline
from edgediff.runtime.manifest import read_manifest

IMAGE_TOLERANCE = 0.1  # measured 0.016 (sd1 vs the fp32 export), 0.048 (sdxl vs diffusers); 6 euler steps
PROMPT, STEPS, GUIDANCE = "a red circle on a white background", 6, 6.0


@pytest.fixture(scope="module")
def int4_sd1(tiny_store):
    return tiny_store.export("sd1", "int4")


def start_noise(folder, seed=3) -> np.ndarray:
    m = Pipeline.load(folder, provider="cpu").manifest
    side = m.default_size // m.vae_scale_factor
    return np.random.default_rng(seed).standard_normal((1, m.latent_channels, side, side), dtype=np.float32)


def pixels(folder, latents, **kwargs) -> np.ndarray:
    result = Pipeline.load(folder, provider="cpu")(PROMPT, negative_prompt="blurry", steps=STEPS, guidance=GUIDANCE,
                                                   sampler="euler", latents=latents, **kwargs)
    return np.asarray(result.images[0], dtype=np.float64) / 255


def test_unet_matmul_weights_are_4bit_blocks(int4_sd1):
    manifest = read_manifest(int4_sd1)
    unet = manifest.graphs["unet"]
    assert manifest.precision == "int4" and unet.precision == "int4"
    assert {name: g.precision for name, g in manifest.graphs.items() if name != "unet"} == {
        "text_encoder": "fp32", "vae_decoder": "fp32", "vae_encoder": "fp32"}
    q = unet.quantization
    assert (q["bits"], q["block_size"], q["symmetric"], q["op"]) == (4, 32, True, "MatMulNBits")
    assert unet.kept_fp32 and "convolutions" in unet.kept_fp32[0]

    graph = onnx.load(str(int4_sd1 / unet.path))
    initializers = {t.name: t for t in graph.graph.initializer}
    nbits = [n for n in graph.graph.node if n.op_type == "MatMulNBits"]
    assert nbits
    for node in nbits:
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attributes["bits"] == 4 and attributes["block_size"] == 32
        packed = initializers[node.input[1]]
        k_blocks = -(-attributes["K"] // 32)
        assert list(packed.dims) == [attributes["N"], k_blocks, 16]  # 32 weights in 16 bytes
        assert len(node.input) == 3  # symmetric: no zero points
    # Every MatMul left multiplies two activations (attention scores); none holds a float weight.
    assert not [n.name for n in graph.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in initializers]
    # The fused CPU Attention op would hold q/k/v as one float weight MatMulNBits cannot take.
    assert not [n for n in graph.graph.node if n.op_type == "Attention"]
    # The packed weights and their scales take 5/32 of the float bytes (4 bits + a 32-bit scale per 32).
    assert q["packed_bytes"] == pytest.approx(q["matmul_float_bytes"] * 5 / 32, rel=0.02)


def test_validated_at_export_within_the_stated_tolerance(int4_sd1):
    from edgediff.exporter.graphs import TOLERANCE

    validation = read_manifest(int4_sd1).graphs["unet"].validation
    assert validation["validated"] and validation["tolerance"] == TOLERANCE["int4"]
    relative = validation["outputs"]["out_sample"]["relative"]
    assert 0 < relative <= TOLERANCE["int4"]  # not 0: the weights really changed


def test_image_close_to_the_fp32_export(int4_sd1, tiny_exports):
    latents = start_noise(int4_sd1)
    int4, fp32 = pixels(int4_sd1, latents), pixels(tiny_exports["sd1", "fp32"], latents)
    difference = float(np.abs(int4 - fp32).max())
    assert 0 < difference <= IMAGE_TOLERANCE, difference


def test_generate_and_info_through_the_cli(int4_sd1, tmp_path):
    out = tmp_path / "int4.png"
    result = CliRunner().invoke(main, ["generate", PROMPT, "--model", str(int4_sd1), "--steps", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 0
    info = CliRunner().invoke(main, ["info", str(int4_sd1)])
    assert info.exit_code == 0, info.output
    unet_line = next(line for line in info.output.splitlines() if line.strip().startswith("unet"))
    assert "int4" in unet_line
    assert "4-bit MatMulNBits weights, blocks of 32" in info.output


@pytest.mark.slow
def test_sdxl_int4_matches_diffusers(tiny_store, tmp_path):
    import torch
    from diffusers import StableDiffusionXLPipeline

    from edgediff.exporter.export import export_model

    source = tiny_store.source("sdxl")
    out = tmp_path / "sdxl-int4"  # text-to-image needs no VAE encoder: its export is skipped to save time
    export_model(str(source), out, precision="int4", graphs=("text_encoder", "text_encoder_2", "unet", "vae_decoder"),
                 log=lambda line: None)
    manifest = read_manifest(out)
    assert manifest.graphs["unet"].precision == "int4" and manifest.graphs["unet"].validation["validated"]
    assert manifest.graphs["text_encoder_2"].precision == "fp32"
    latents = start_noise(out)
    ours = pixels(out, latents)
    pipe = StableDiffusionXLPipeline.from_pretrained(source)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        theirs = pipe(PROMPT, negative_prompt="blurry", num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                      latents=torch.from_numpy(latents), output_type="np").images[0]
    difference = float(np.abs(ours - theirs).max())
    assert 0 < difference <= IMAGE_TOLERANCE, difference


def test_cuda_variant_keeps_fp16_activations(tiny_sources, tmp_path):
    """Optimized for CUDA the float part is fp16 (as --precision fp16 makes it) and the scales follow;
    on a machine without CUDA it is validated on the CPU before its CUDA-only fusions."""
    from edgediff.exporter.export import export_model

    out = tmp_path / "cuda"
    export_model(str(tiny_sources["sd1"]), out, precision="int4", optimize_for="cuda",
                 graphs=("text_encoder", "unet"), log=lambda line: None)
    manifest = json.loads((out / "manifest.json").read_text())
    unet = manifest["graphs"]["unet"]
    assert unet["precision"] == "int4" and manifest["graphs"]["text_encoder"]["precision"] == "fp16"
    assert unet["validation"]["validated"]
    assert (unet["validation"]["where"] == "cpu, before cuda fusions"
            or "CUDAExecutionProvider" in unet["validation"]["providers"])
    assert {i["name"]: i["dtype"] for i in unet["inputs"]}["sample"] == "float16"
    graph = onnx.load(str(out / unet["path"]))
    initializers = {t.name: t for t in graph.graph.initializer}
    scales = [initializers[n.input[2]] for n in graph.graph.node if n.op_type == "MatMulNBits"]
    assert scales and all(t.data_type == onnx.TensorProto.FLOAT16 for t in scales)


def test_quantized_fp16_matmul_runs_on_the_cpu(tmp_path):
    """What the CUDA variant holds, run by ORT's CPU MatMulNBits kernel: fp16 activations and scales."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgediff.exporter import optimize as opt
    from edgediff.exporter.weights import load_stripped, write_graph

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((64, 24)).astype(np.float32)
    offset = rng.standard_normal((16, 64)).astype(np.float32)  # a float weight of another op: left alone
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "w"], ["y"]), helper.make_node("Add", ["a", "c"], ["z"])],
                              "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [16, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, 24]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, [16, 64])],
                              [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(offset, "c")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(tmp_path / "raw.onnx"))
    stripped = load_stripped(tmp_path / "raw.onnx", "weights.bin")
    assert all(t.data_location == TensorProto.EXTERNAL for t in stripped.graph.initializer)
    quantized = opt.quantize_nbits(stripped, tmp_path, bits=4, block_size=32)
    kept = {t.name: t for t in quantized.graph.initializer}
    assert "w" not in kept and kept["c"].data_location == TensorProto.EXTERNAL  # still on disk, never loaded
    converted = opt.to_fp16(quantized, [], [])
    write_graph(converted, tmp_path / "model.onnx", tmp_path)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    a = rng.standard_normal((16, 64)).astype(np.float16)
    got, added = (out.astype(np.float32) for out in session.run(None, {"a": a}))
    assert np.abs(added - (a.astype(np.float32) + offset)).max() <= 1e-2
    # Symmetric 4-bit blocks along K: the block's largest-magnitude weight maps to -8.
    blocks = weight.reshape(2, 32, 24)
    peak = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1)[:, None], axis=1)
    scale = peak / -8
    dequantized = (np.round(blocks / scale).clip(-8, 7) * scale).reshape(64, 24)
    expected = a.astype(np.float32) @ dequantized
    assert session.get_outputs()[0].type == "tensor(float16)"
    assert np.abs(got - expected).max() <= 2e-2 * np.abs(expected).max()
    assert np.abs(got - a.astype(np.float32) @ weight).max() > 1e-3  # quantized, not passed through


def test_int4_for_directml_is_one_error_line(tiny_sources, tmp_path):
    result = CliRunner().invoke(main, ["export", str(tiny_sources["sd1"]), str(tmp_path / "dml"), "--precision",
                                       "int4", "--optimize-for", "dml"])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code != 0 and "Traceback" not in result.stderr
    assert len(lines) == 1 and lines[0].startswith("error:") and "int4" in lines[0], result.stderr
    assert not (tmp_path / "dml").exists()


def test_bench_measures_int4_when_asked(monkeypatch):
    from edgediff.benchmarks import hardware, runner

    monkeypatch.setattr(hardware, "gpus", lambda: [])
    default = {c.label for c in runner.plan(runner.BenchParams(), ["cpu"], cuda_torch=False, bf16=True)}
    assert not any("int4" in label for label in default)  # opt-in: the default rows stay as they were
    asked = runner.plan(runner.BenchParams(precisions=("int4",)), ["cpu"], cuda_torch=False, bf16=True)
    labels = {c.label: c.unmeasured for c in asked}
    assert labels["edgediff cpu int4 low"] is None and labels["edgediff cpu int4 high"] is None
    assert labels["edgediff cuda int4 low"] == "unmeasured (no GPU lent to this session)"
    assert labels["diffusers cpu fp32"] is None


def test_int4_export_for_openvino_gives_onnx_runtimes_image(tiny_store, monkeypatch):
    """OpenVINO reads MatMulNBits and keeps its 4-bit weights packed (RESULTS.md, "OpenVINO on the int4 U-Net"):
    an ``--optimize-for none`` int4 export draws the image ONNX Runtime draws from it."""
    pytest.importorskip("openvino")
    monkeypatch.setenv("EDGEDIFF_OPENVINO_PRECISION", "FP32")  # not bf16 where the CPU has it
    folder = tiny_store.export("sd1", "int4", "--optimize-for", "none", name="sd1-int4-none")
    assert read_manifest(folder).graphs["unet"].precision == "int4"
    latents = start_noise(folder)
    on_onnxruntime = pixels(folder, latents)
    result = Pipeline.load(folder, provider="openvino")(PROMPT, negative_prompt="blurry", steps=STEPS,
                                                         guidance=GUIDANCE, sampler="euler", latents=latents)
    on_openvino = np.asarray(result.images[0], dtype=np.float64) / 255
    assert np.abs(on_openvino - on_onnxruntime).max() < 2e-2
