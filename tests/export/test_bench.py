"""The benchmark's own tests: tiny models, seconds. Full-size numbers live in benchmarks/RESULTS.md."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("diffusers")
pytest.importorskip("onnxruntime")
pytest.importorskip("matplotlib")
pytest.importorskip("psutil")

from edgediff.benchmarks import flops, hardware, runner  # noqa: E402
from edgediff.benchmarks.report import summarize, write_outputs  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from tiny_models import save_pipeline  # noqa: E402


def _weight(name, *shape):
    return numpy_helper.from_array(np.ones(shape, dtype=np.float32), name)


def test_flops_match_a_hand_count():
    # Conv 3->4, 3x3, pad 1 on 8x8; MatMul (2,64,4)x(4,5); Gemm (2,4)x(5,4)^T; symbolic batch axis.
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["c", "shape"], ["r"]),
        helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["t", "m"], ["mm"]),
        helper.make_node("Gemm", ["g_in", "g_w"], ["g_out"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "hand",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8]),
         helper.make_tensor_value_info("g_in", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("mm", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("g_out", TensorProto.FLOAT, None)],
        [_weight("w", 4, 3, 3, 3), numpy_helper.from_array(np.array([0, 4, 64], dtype=np.int64), "shape"),
         _weight("m", 4, 5), _weight("g_w", 5, 4)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    counted = flops.count_flops(model, {"x": (2, 3, 8, 8), "g_in": (2, 4)})
    conv = 2 * (2 * 4 * 8 * 8) * (3 * 3 * 3)   # 2 x output elements x MACs per output
    matmul = 2 * (2 * 64 * 5) * 4
    gemm = 2 * (2 * 5) * 4
    assert counted["by_op"] == {"Conv": conv, "MatMul": matmul, "Gemm": gemm}
    assert counted["total"] == conv + matmul + gemm
    assert counted["uncounted"] == []


def test_flops_of_fused_attention():
    graph = helper.make_graph(
        [helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["o"], domain="com.microsoft", num_heads=2)],
        "mha",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", s, 8]) for n, s in (("q", 16), ("k", 7), ("v", 7))],
        [helper.make_tensor_value_info("o", TensorProto.FLOAT, ["b", 16, 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    counted = flops.count_flops(model, {"q": (2, 16, 8), "k": (2, 7, 8), "v": (2, 7, 8)})
    assert counted["total"] == 2 * 2 * 16 * 7 * (8 + 8)  # QK^T and AV


def test_cpu_peak_states_its_assumption():
    peak = hardware.cpu_peak(threads=2)
    assert peak["cores"] == 2 and "FLOPs/cycle" in peak["assumption"]
    assert hardware.fp32_flops_per_cycle({"avx512f"})[0] == 64
    assert hardware.fp32_flops_per_cycle({"avx2", "fma"})[0] == 32
    assert hardware.gpu_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert hardware.gpu_peak("NVIDIA H100 PCIe", "fp32") == 51e12


def test_plan_marks_gpu_rows_unmeasured_without_a_gpu(monkeypatch):
    monkeypatch.setattr(hardware, "gpus", lambda: [])
    configs = runner.plan(runner.BenchParams(), ["cpu"], cuda_torch=False, bf16=True)
    labels = {c.label: c.unmeasured for c in configs}
    assert labels["edgediff cpu fp32 low"] is None and labels["edgediff cpu int8 high"] is None
    assert labels["diffusers cpu bf16 autocast"] is None and labels["diffusers cpu fp32"] is None
    for label in ("edgediff cuda fp16 low", "edgediff tensorrt fp16 high", "diffusers cuda fp16"):
        assert labels[label] == "unmeasured (no GPU lent to this session)"
    assert not any(c.provider == "dml" for c in configs)
    assert labels["edgediff openvino bf16 low"].startswith("unmeasured (openvino not installed")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    folder = save_pipeline("sd1", tmp_path_factory.mktemp("tiny") / "sd1")
    out = tmp_path_factory.mktemp("bench-out")
    params = runner.BenchParams(model=str(folder), cache=tmp_path_factory.mktemp("cache"), out=out,
                                resolution=64, steps=2, batch=1, providers=("cpu",), precisions=("fp32",),
                                memory=("low",), repeats=1, diffusers_bf16=False)
    document = runner.run_benchmark(params, log=lambda line: None)
    return document, write_outputs(document, out)


def test_tiny_benchmark_writes_json_markdown_and_png(tiny_run):
    document, paths = tiny_run
    data = json.loads(paths["json"].read_text())
    rows = {r["label"]: r for r in data["summary"]["rows"]}
    assert set(rows) == {"edgediff cpu fp32 low", "diffusers cpu fp32"}
    for label in rows:
        row = rows[label]
        assert not row.get("error"), row
        for key in ("text_encoder_s", "unet_s", "vae_decoder_s", "e2e_s", "peak_rss_gb", "unet_load_s",
                    "unet_first_run_s", "unet_tflops"):
            assert row[key] > 0, (label, key)
    assert rows["edgediff cpu fp32 low"]["unet_ratio"] > 0
    # Each configuration runs in its own process: the torch-free edgediff worker is far below the parent.
    assert rows["edgediff cpu fp32 low"]["peak_rss_gb"] < rows["diffusers cpu fp32"]["peak_rss_gb"]
    assert data["unet_flops"]["fp32-cpu"]["total"] > 0
    assert data["threads"]["torch"] >= 1 and data["versions"]["onnxruntime"]
    text = paths["markdown"].read_text()
    assert "| edgediff cpu fp32 low |" in text and "U-Net s/step" in text
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cached_export_is_reused(tiny_run, tmp_path):
    document, _ = tiny_run
    cache = Path(document["params"]["cache"])
    exports = list(cache.glob("*/export-fp32-cpu/manifest.json"))
    assert len(exports) == 1
    stamp = exports[0].stat().st_mtime_ns
    from edgediff.benchmarks.models import ensure_export

    assert ensure_export(exports[0].parent.parent / "diffusers", "fp32", "cpu") == exports[0].parent
    assert exports[0].stat().st_mtime_ns == stamp


def test_openvino_rows_count_as_cpu_rows_and_oneshot_targets():
    rows = [{"label": label, "engine": engine, "provider": provider, "precision": precision, "memory": "low",
             "stages": {"stages": {"unet": {"median_s": step}}}, "e2e": {"runs": [{"total": 20 * step}]}}
            for label, engine, provider, precision, step in (
                ("ov", "edgediff", "openvino", "bf16", 0.6), ("ort", "edgediff", "cpu", "fp32", 1.5),
                ("pt", "diffusers", "cpu", "fp32", 2.0), ("pt16", "diffusers", "cpu", "bf16", 1.0))]
    oneshot = {"rows": {"edgediff auto a first": {"median_wall_s": 60.0, "median_peak_rss_gb": 2.0},
                        "edgediff auto a cached": {"median_wall_s": 30.0, "median_peak_rss_gb": 2.0},
                        "diffusers cpu fp32": {"median_wall_s": 50.0, "median_peak_rss_gb": 5.0},
                        "diffusers cpu bf16": {"median_wall_s": 40.0, "median_peak_rss_gb": 5.5}}}
    summary = summarize({"rows": rows, "unet_flops": {}, "oneshot": oneshot})
    targets = summary["targets"]
    assert targets["unet_best_cpu_vs_best_diffusers_cpu"]["edgediff"] == "ov"
    assert targets["unet_best_cpu_vs_best_diffusers_cpu"]["ratio"] == pytest.approx(0.6)
    assert targets["unet_best_cpu_vs_best_diffusers_cpu"]["met"]  # target 0.7
    assert {r["label"]: r.get("baseline") for r in summary["rows"]}["ov"] == "pt"
    assert targets["oneshot_cached_vs_diffusers"]["ratio"] == pytest.approx(30 / 40)
    assert targets["oneshot_cached_vs_diffusers"]["met"]
    assert targets["oneshot_peak_rss_low_vs_diffusers"]["ratio"] == pytest.approx(0.4)
    oneshot["rows"]["edgediff auto a cached"]["paired_ratio"] = 0.9  # rounds taken back to back decide
    assert summarize({"rows": rows, "unet_flops": {}, "oneshot": oneshot})["targets"][
        "oneshot_cached_vs_diffusers"]["ratio"] == pytest.approx(0.9)


def test_oneshot_ratio_is_the_median_of_paired_rounds():
    from edgediff.benchmarks.oneshot import paired_ratio

    ours = [{"wall_s": w, "exit": 0} for w in (30.0, 60.0, 33.0)]
    theirs = [{"wall_s": w, "exit": 0} for w in (40.0, 100.0, 30.0)]
    assert paired_ratio(ours, theirs) == pytest.approx(0.75)  # 0.75, 0.6, 1.1: the busy round cancels out
    theirs[2]["exit"] = 1
    assert paired_ratio(ours, theirs) == pytest.approx((0.75 + 0.6) / 2)


def test_oneshot_runs_fresh_cli_processes(tiny_run):
    from edgediff.benchmarks import oneshot

    document, _ = tiny_run
    export = next(Path(document["params"]["cache"]).glob("*/export-fp32-cpu"))
    result = oneshot.run([export], None, 64, 2, 1, "cpu", bf16=False, log=lambda line: None)
    assert set(result["rows"]) == {"edgediff cpu export-fp32-cpu first", "edgediff cpu export-fp32-cpu cached"}
    for row in result["rows"].values():
        assert row["ok"] == 1, row
        assert row["median_wall_s"] > 0 and 0.05 < row["median_peak_rss_gb"] < 4
    assert "| edgediff cpu export-fp32-cpu cached |" in oneshot.markdown(result)


def test_summary_targets_from_synthetic_rows():
    rows = []
    for engine, precision, memory, step, peak in (("edgediff", "fp32", "low", 1.6, 3.0),
                                                  ("edgediff", "int8", "low", 1.0, 2.0),
                                                  ("diffusers", "fp32", None, 2.2, 5.0),
                                                  ("diffusers", "bf16", None, 0.9, 5.5)):
        rows.append({"label": f"{engine} {precision}", "engine": engine, "provider": "cpu", "precision": precision,
                     "memory": memory, "stages": {"stages": {"unet": {"median_s": step}}},
                     "e2e": {"runs": [{"total": 20 * step}], "peak_rss_bytes": peak * 1e9}})
    document = {"rows": rows, "unet_flops": {"fp32-cpu": {"total": 1e12}}, "cpu_peak": {"flops": 2e12}}
    targets = summarize(document)["targets"]
    assert targets["unet_fp32_vs_diffusers_fp32"]["ratio"] == pytest.approx(1.6 / 2.2)
    assert targets["unet_fp32_vs_diffusers_fp32"]["met"]
    assert targets["unet_best_cpu_vs_best_diffusers_cpu"]["ratio"] == pytest.approx(1.0 / 0.9)
    assert not targets["unet_best_cpu_vs_best_diffusers_cpu"]["met"]
    assert targets["e2e_peak_rss_low_vs_diffusers"]["ratio"] == pytest.approx(0.4)


def _bench(*args):
    return subprocess.run([sys.executable, "-m", "edgediff", "bench", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("args, message", [
    (["--model", "nope"], "unknown model 'nope'"),
    (["--resolution", "100"], "--resolution must be a positive multiple of 8"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--batch", "0"], "--batch must be at least 1"),
    (["--threads", "0"], "--threads must be at least 1"),
])
def test_cli_bad_input_is_one_line(args, message):
    result = _bench(*args)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_cli_unknown_provider_is_a_usage_error():
    result = _bench("--provider", "tpu")
    assert result.returncode == 2 and "Traceback" not in result.stderr
