"""The bench's SD 3.5 path on a tiny SD3.5-Medium-shaped config: the random-weight build (T5 and the
transformer stored in fp16, each component built apart), and `edgediff bench`'s rows with T5 off on
both sides (edgediff exports no T5; diffusers runs with text_encoder_3=None), never keyed on a name."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("onnxruntime")
pytest.importorskip("matplotlib")
pytest.importorskip("psutil")

from edgediff.benchmarks import models, runner  # noqa: E402
from edgediff.benchmarks.report import write_outputs  # noqa: E402
from test_sd3 import build_sd3  # noqa: E402


@pytest.fixture(scope="module")
def sd3_run(tmp_path_factory):
    """A config folder as shipped (no weights), built by the bench and measured at 32x32, 1 step."""
    config = tmp_path_factory.mktemp("config") / "tiny-sd35m"
    build_sd3("sd35m").save_pretrained(config)
    for path in config.rglob("*.safetensors"):
        path.unlink()
    cache, out = tmp_path_factory.mktemp("cache"), tmp_path_factory.mktemp("bench-out")
    with pytest.MonkeyPatch.context() as patch:  # stored in 16 bits as the shipped sd35m is
        patch.setitem(models.HALF_STORED, str(config), ("transformer", "text_encoder_3"))
        built = models.ensure_model(str(config), cache, seed=0, log=lambda line: None)
        params = runner.BenchParams(model=str(config), cache=cache, out=out, resolution=32, steps=1, batch=1,
                                    providers=("cpu",), precisions=("fp32",), memory=("low",), repeats=1,
                                    diffusers_bf16=False)
        document = runner.run_benchmark(params, log=lambda line: None)
    return built, document, write_outputs(document, out)


def test_build_stores_t5_and_transformer_in_fp16(sd3_run):
    from safetensors import safe_open

    built = sd3_run[0]
    for name, dtype in (("text_encoder_3", "torch.float16"), ("transformer", "torch.float16"),
                        ("text_encoder", "torch.float32")):
        (file,) = sorted((built / name).glob("*.safetensors"))[:1]
        with safe_open(str(file), framework="pt") as handle:
            assert str(handle.get_tensor(next(iter(handle.keys()))).dtype) == dtype, name


def test_bench_rows_for_sd3(sd3_run):
    _, document, paths = sd3_run
    data = json.loads(paths["json"].read_text())
    rows = {r["label"]: r for r in data["summary"]["rows"]}
    assert set(rows) == {"edgediff cpu fp32 low", "diffusers cpu fp32"}
    for label, row in rows.items():
        assert not row.get("error"), row
        for key in ("text_encoder_s", "unet_s", "vae_decoder_s", "e2e_s", "peak_rss_gb"):
            assert row[key] > 0, (label, key)
    manifest = json.loads((sd3_run[0].parent / "export-fp32-cpu" / "manifest.json").read_text())
    assert manifest["family"] == "sd3" and "text_encoder_3" not in manifest["graphs"]  # T5 off
