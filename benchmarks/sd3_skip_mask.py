"""What SD3's skip-layer mask costs a transformer step that does not use it.

The exported SD3 transformer takes ``skip_layers`` (batch, layers): each block's output is blended
back towards its input by the mask (exporter/sd3.py, ``MMDiT``), so one graph serves skip-layer
guidance. This builds blocks of SD 3.5 Medium's width (24 heads x 64, joint attention 4096, pooled
2048, dual attention and RMS q/k norm; random weights), exports them with and without the mask
input, and times ONNX Runtime CPU runs of both, interleaved, with an all-zero mask.

    python -m edgediff.benchmarks.sd3_skip_mask --layers 2 --size 256 --repeats 5
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def build(layers: int):
    import torch
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=layers, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=384, dual_attention_layers=tuple(range(layers // 2)), qk_norm="rms_norm").eval()


def export(transformer, path: Path, with_mask: bool, inputs: dict) -> None:
    import torch

    from edgediff.exporter.sd3 import MMDiT

    names = ["sample", "timestep", "encoder_hidden_states", "pooled_projections"] + (["skip_layers"] if with_mask else [])
    module = MMDiT(transformer, tuple(names))
    with torch.no_grad():
        torch.onnx.export(module, tuple(torch.from_numpy(inputs[n]) for n in names), str(path), dynamo=False,
                          opset_version=17, input_names=names, output_names=["out_sample"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (latent = size / 8)")
    parser.add_argument("--repeats", type=int, default=5)
    a = parser.parse_args()
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    latent = a.size // 8
    inputs = {"sample": rng.standard_normal((2, 16, latent, latent), dtype=np.float32),
              "timestep": np.full(2, 500.0, np.float32),
              "encoder_hidden_states": rng.standard_normal((2, 333, 4096), dtype=np.float32),
              "pooled_projections": rng.standard_normal((2, 2048), dtype=np.float32),
              "skip_layers": np.zeros((2, a.layers), np.float32)}
    transformer = build(a.layers)
    times = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for with_mask in (False, True):
            path = Path(tmp) / f"mask{int(with_mask)}.onnx"
            export(transformer, path, with_mask, inputs)
            sessions[with_mask] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outputs = {}
        for round_ in range(a.repeats + 1):  # the first round warms up; the order alternates
            for with_mask in ((False, True) if round_ % 2 else (True, False)):
                session = sessions[with_mask]
                feed = {i.name: inputs[i.name] for i in session.get_inputs()}
                started = time.perf_counter()
                outputs[with_mask] = session.run(None, feed)[0]
                times[with_mask].append(time.perf_counter() - started)
    for with_mask in (False, True):
        median = float(np.median(times[with_mask][1:]))
        print(f"{'with' if with_mask else 'without'} skip_layers input: median {median:.3f} s per step "
              f"(batch 2, {a.size}x{a.size}, {a.layers} blocks)")
    print(f"max abs difference of the outputs (all-zero mask): {np.abs(outputs[True] - outputs[False]).max():.2e}")


if __name__ == "__main__":
    main()
