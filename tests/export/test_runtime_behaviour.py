"""The runtime on a tiny export: torch-free, reproducible, low/high memory equal, inputs checked."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from edgediff.runtime import Pipeline
from torch_blocker import BLOCK_TORCH
from edgediff.runtime.errors import GraphInputError
from edgediff.runtime.sessions import GraphSession, check_inputs



def test_generates_where_torch_cannot_be_imported(tiny_exports, tmp_path):
    script = BLOCK_TORCH + textwrap.dedent(f"""
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("torch import was not blocked")
        from edgediff.runtime import Pipeline
        pipe = Pipeline.load({str(tiny_exports["sd2", "fp32"])!r}, provider="cpu")
        result = pipe("a cat", steps=3, seed=1)
        result.images[0].save({str(tmp_path / "out.png")!r})
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "diffusers", "transformers"))
        assert not loaded, loaded
        print("ok", result.images[0].size)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok")
    assert (tmp_path / "out.png").stat().st_size > 0


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "dpmpp_2m_karras"])
def test_same_seed_same_image(tiny_exports, sampler):
    pipe = Pipeline.load(tiny_exports["sd1", "fp32"], provider="cpu")
    first = pipe("a cat", steps=4, seed=123, sampler=sampler).pixels
    second = pipe("a cat", steps=4, seed=123, sampler=sampler).pixels
    other = pipe("a cat", steps=4, seed=124, sampler=sampler).pixels
    np.testing.assert_array_equal(first, second)
    assert np.abs(first - other).max() > 1e-3


def test_low_memory_matches_high_and_releases(tiny_exports, monkeypatch):
    low = Pipeline.load(tiny_exports["sd1", "fp32"], provider="cpu", memory="low")
    high = Pipeline.load(tiny_exports["sd1", "fp32"], provider="cpu", memory="high")
    batches = []
    run = GraphSession.run

    def spy(session, **feed):  # the U-Net's batch per call: in low memory the guidance halves run apart
        if session.name == "unet":
            batches.append(feed["sample"].shape[0])
        return run(session, **feed)

    monkeypatch.setattr(GraphSession, "run", spy)
    a = low(["a dog", "a cat"], steps=3, seed=5)
    assert batches == [2] * 6  # 3 steps x (uncond, cond), each the 2 prompts' batch
    b = high(["a dog", "a cat"], steps=3, seed=5)
    assert batches[6:] == [4] * 3
    np.testing.assert_allclose(a.pixels, b.pixels, atol=2e-6)
    assert low.sessions._resident == {}
    assert set(high.sessions._resident) == {"text_encoder", "unet", "vae_decoder"}


def test_batch_and_result_fields(tiny_exports):
    pipe = Pipeline.load(tiny_exports["sd1", "fp32"], provider="cpu")
    steps_seen = []
    result = pipe(["a cat", "a dog"], ["", "blurry"], steps=3, seed=9,
                  on_step=lambda step, total, latents: steps_seen.append((step, total, latents.shape)))
    assert len(result.images) == 2 and result.seed == 9
    assert [s[:2] for s in steps_seen] == [(1, 3), (2, 3), (3, 3)]
    assert {"text_encoder", "unet", "unet_per_step", "vae_decoder", "total"} <= set(result.timings)


def test_inputs_checked_where_they_enter(tiny_exports):
    spec = Pipeline.load(tiny_exports["sd1", "fp32"], provider="cpu").manifest.graphs["unet"].inputs
    good = {"sample": np.zeros((2, 4, 8, 8), np.float32), "timestep": np.zeros(2, np.float32),
            "encoder_hidden_states": np.zeros((2, 77, 32), np.float32)}
    check_inputs("unet", spec, good)
    with pytest.raises(GraphInputError, match="unet input 'sample': expected shape"):
        check_inputs("unet", spec, {**good, "sample": np.zeros((2, 3, 8, 8), np.float32)})
    with pytest.raises(GraphInputError, match="'encoder_hidden_states': axis 'batch' is 1"):
        check_inputs("unet", spec, {**good, "encoder_hidden_states": np.zeros((1, 77, 32), np.float32)})
    with pytest.raises(GraphInputError, match="'timestep' contains NaN"):
        check_inputs("unet", spec, {**good, "timestep": np.full(2, np.nan, np.float32)})


def test_latents_shape_checked(tiny_exports):
    from edgediff.runtime import EdgediffError

    pipe = Pipeline.load(tiny_exports["sd1", "fp32"], provider="cpu")
    with pytest.raises(EdgediffError, match="latents must have shape"):
        pipe("a cat", steps=2, latents=np.zeros((1, 4, 3, 3), np.float32))


def test_manifest_records_the_contract(tiny_exports):
    m = Pipeline.load(tiny_exports["sd2", "fp16"], provider="cpu").manifest
    assert m.family == "sd2" and m.prediction_type == "v_prediction"
    assert m.tokenizer["pad_token_id"] == 0  # "!" pads SD 2.x prompts
    assert m.scheduler["timestep_spacing"] == "leading"
    unet = m.graphs["unet"]
    assert unet.precision == "fp16"
    assert [(t.name, t.dtype) for t in unet.inputs] == [
        ("sample", "float16"), ("timestep", "float32"), ("encoder_hidden_states", "float16")]
    assert any("upcast_attention" in kept for kept in unet.kept_fp32)
    assert all(g.validation["validated"] for g in m.graphs.values())

