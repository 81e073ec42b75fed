"""The bench's SDXL path on a tiny SDXL config: random-weight build, and stage inputs taken from the
components (two text encoders, text_time conditioning), never from a model name."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("onnxruntime")

from edgediff.benchmarks import models, worker  # noqa: E402
from edgediff.benchmarks.report import summarize  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import save_sdxl_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def sdxl_config(tmp_path_factory):
    """A tiny SDXL config folder as the shipped ones are: configs only, no weights, no BPE files."""
    folder = save_sdxl_pipeline("sdxl", tmp_path_factory.mktemp("config") / "tiny-sdxl")
    for path in [*folder.rglob("*.safetensors"), *folder.glob("tokenizer*/vocab.json"), *folder.glob("tokenizer*/merges.txt")]:
        path.unlink()
    return folder


@pytest.fixture(scope="module")
def sdxl_built(sdxl_config, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(models, "SHARD", "100KB")  # the U-Net lands in several shards, as the full one does
        return models.ensure_model(str(sdxl_config), cache, seed=0, log=lambda line: None)


@pytest.fixture(scope="module")
def sdxl_export(sdxl_built):
    return models.ensure_export(sdxl_built, "fp32", "cpu", log=lambda line: None)


def _weights(folder: Path, name: str) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted((folder / name).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def test_random_sdxl_builds_as_the_pipeline_its_index_names(sdxl_built, sdxl_config):
    import diffusers
    import torch

    assert len(list((sdxl_built / "unet").glob("*.safetensors"))) > 1
    pipe = diffusers.DiffusionPipeline.from_pretrained(sdxl_built)
    assert type(pipe).__name__ == json.loads((sdxl_config / "model_index.json").read_text())["_class_name"]
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert pipe.tokenizer_2.pad_token == "!" and pipe.config.force_zeros_for_empty_prompt
    unet = pipe.unet.state_dict()
    fresh = diffusers.UNet2DConditionModel.from_config(pipe.unet.config).state_dict()
    assert {k: v.shape for k, v in unet.items()} == {k: v.shape for k, v in fresh.items()}
    assert all(torch.isfinite(v).all() for v in unet.values())


def test_random_build_is_seeded(sdxl_built, sdxl_config, tmp_path):
    import torch

    again = models.ensure_model(str(sdxl_config), tmp_path / "again", seed=0, log=lambda line: None)
    other = models.ensure_model(str(sdxl_config), tmp_path / "other", seed=1, log=lambda line: None)
    for name in ("unet", "text_encoder_2"):
        first, second, third = (_weights(f, name) for f in (sdxl_built, again, other))
        assert all(torch.equal(first[k], second[k]) for k in first)
        assert any(not torch.equal(first[k], third[k]) for k in first if first[k].numel() > 16)
    assert models.ensure_model(str(sdxl_config), tmp_path / "again", seed=0) == again  # cached: not rebuilt


def test_stage_inputs_come_from_the_components(sdxl_built, sdxl_export):
    spec = {"model_dir": str(sdxl_export), "provider": "cpu", "batch": 1, "resolution": 64, "repeats": 1,
            "threads": 2, "precision": "fp32"}
    ours = worker.edgediff_stages(spec)["stages"]
    theirs = worker.diffusers_stages({**spec, "model_dir": str(sdxl_built)})["stages"]
    assert set(ours) == set(theirs) == {"text_encoder", "text_encoder_2", "unet", "vae_decoder"}
    rows = [{"label": label, "engine": engine, "provider": "cpu", "precision": "fp32", "memory": None,
             "stages": {"stages": stages}} for label, engine, stages in
            (("ours", "edgediff", ours), ("theirs", "diffusers", theirs))]
    summary = summarize({"rows": rows, "unet_flops": {}})["rows"]
    for row, stages in zip(summary, (ours, theirs)):
        expected = stages["text_encoder"]["median_s"] + stages["text_encoder_2"]["median_s"]
        assert row["text_encoder_s"] == pytest.approx(expected)
        assert row["unet_s"] == stages["unet"]["median_s"] > 0


def test_plan_has_the_4gb_gpu_rows_and_int4_only_when_asked(monkeypatch):
    from edgediff.benchmarks import hardware, runner

    monkeypatch.setattr(hardware, "gpus", lambda: [])
    default = {c.label for c in runner.plan(runner.BenchParams(), ["cpu"], cuda_torch=False, bf16=True)}
    assert not any("int4" in label for label in default)
    asked = runner.BenchParams(providers=("cpu", "cuda"), precisions=("int4",), memory=("low",))
    labels = {c.label: c.unmeasured for c in runner.plan(asked, ["cpu"], cuda_torch=False, bf16=True)}
    assert labels["edgediff cpu int4 low"] is None
    for label in ("edgediff cuda int4 low", "diffusers cuda fp16", "diffusers cuda fp16 offload"):
        assert labels[label] == "unmeasured (no GPU lent to this session)"


def test_gpu_target_reads_the_int4_low_row():
    def row(label, engine, precision, memory, gpu_bytes):
        return {"label": label, "engine": engine, "provider": "cuda", "precision": precision, "memory": memory,
                "e2e": {"runs": [{"total": 1.0}], "peak_rss_bytes": 1e9, "peak_gpu_bytes": gpu_bytes}}

    rows = [row("ours", "edgediff", "int4", "low", 3.5e9), row("whole", "diffusers", "fp16", None, 9e9),
            row("offload", "diffusers", "fp16", "offload", 5e9)]
    summary = summarize({"rows": rows, "unet_flops": {}})
    target = summary["targets"]["gpu_peak_int4_low_within_4gb"]
    assert target["met"] and target["diffusers"] == "offload" and target["ratio"] == pytest.approx(0.7)
    assert next(r for r in summary["rows"] if r["label"] == "ours")["baseline"] == "whole"
    rows[0]["e2e"]["peak_gpu_bytes"] = 4.2e9
    assert not summarize({"rows": rows, "unet_flops": {}})["targets"]["gpu_peak_int4_low_within_4gb"]["met"]


def test_generation_memory_books_the_peak_to_stages(sdxl_export):
    from edgediff.benchmarks.generation_memory import measure

    result = measure(str(sdxl_export), 64, 1, "low", "cpu", None)
    stages = result["stage_peak_rss_gib"]
    assert {"text_encoder", "text_encoder_2", "unet", "vae_decoder"} <= set(stages)
    assert 0 < max(stages.values()) <= result["peak_rss_gib"]
    assert result["timings"]["unet"] > 0
