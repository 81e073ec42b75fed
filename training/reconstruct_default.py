"""Rebuild the default model's diffusers folder from its shipped fp32 ONNX graphs (the training
checkpoint is not in git), check that torch reproduces the shipped graphs, and save it.

    python training/reconstruct_default.py OUT_FOLDER

Architecture: train_default_v2.py (text encoder, U-Net) and train_vae.py (VAE), scheduler and
scaling factor from the shipped manifest. Weights, per shipped initializer (torch.onnx keeps module
paths in node names):
- a torch-named initializer ("unet.conv_in.weight") is that parameter, without the wrapper prefix;
- ``onnx::MatMul_N`` is a Linear weight, transposed; the consuming node ``/unet/<path>/MatMul`` names it;
- ``onnx::Mul_N`` / ``onnx::Add_N`` of shape (C, 1, 1) are a GroupNorm's weight / bias, exported
  around InstanceNormalization; the consuming node ``/<path>/Mul`` names it. AttentionPooling's
  ``/unet/add_embedding/pool/Add`` of shape (1, C) is its positional embedding.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
# The graphs to rebuild from: the shipped fp32 folder (EDGEDIFF_RECONSTRUCT_FROM: another copy of it).
SHIPPED = Path(os.environ.get("EDGEDIFF_RECONSTRUCT_FROM", REPO / "models" / "default"))
GRAPHS = {"text_encoder": ("text_encoder", "text_encoder"), "unet": ("unet", "unet"),
          "vae_decoder": ("vae", "vae"), "vae_encoder": ("vae", "vae")}  # graph: (wrapper prefix, module)


def graph_weights(path: Path, prefix: str) -> dict[str, np.ndarray]:
    """{torch parameter name (without the wrapper prefix): value} read from one shipped graph."""
    model = onnx.load(str(path))
    consumers = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found = {}
    for tensor in model.graph.initializer:
        value = numpy_helper.to_array(tensor)
        if tensor.name.startswith(prefix + "."):
            found[tensor.name[len(prefix) + 1:]] = value
            continue
        if not tensor.name.startswith("onnx::"):
            continue
        for node in consumers.get(tensor.name, []):
            path_ = node.name.strip("/").split("/")
            path_ = path_[1:] if path_[0] == prefix else path_  # the old VAE wrappers left no prefix
            if len(path_) < 2:
                continue
            module = ".".join(path_[:-1])
            if node.op_type == "MatMul" and value.ndim == 2:
                found[f"{module}.weight"] = value.T
            elif node.op_type == "Mul" and value.ndim == 3:
                found[f"{module}.weight"] = value.reshape(-1)
            elif node.op_type == "Add" and value.ndim == 3:
                found[f"{module}.bias"] = value.reshape(-1)
            elif node.op_type == "Add" and module.endswith("pool"):
                found[f"{module}.positional_embedding"] = value
    found.update(_packed_self_attention(model, prefix))
    return found


def _packed_self_attention(model, prefix: str) -> dict[str, np.ndarray]:
    """ONNX Runtime's CPU fusion packed each self-attention's q/k/v weights into one (C, 3C)
    ``Attention`` weight (columns q | k | v, each transposed); its input names the block."""
    initializers = {t.name: t for t in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type != "Attention":
            continue
        block = ".".join(node.input[0].strip("/").split("/")[1:-2])  # .../transformer_blocks.0/norm1/out
        packed = numpy_helper.to_array(initializers[node.input[1]])
        for index, name in enumerate(("to_q", "to_k", "to_v")):
            width = packed.shape[1] // 3
            found[f"{block}.attn1.{name}.weight"] = packed[:, index * width:(index + 1) * width].T
    return found


def build():
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from train_default_v2 import SCHEDULER_CONFIG, TEXT_CONFIG_V2, UNET_CONFIG_V2
    from train_vae import TOKENIZER_DIR, VAE_CONFIG

    manifest = json.loads((SHIPPED / "manifest.json").read_text())
    vae = AutoencoderKL(**VAE_CONFIG)
    # The shipped fp16 folder holds an fp16 VAE: its config did not ask for force_upcast.
    vae.register_to_config(scaling_factor=manifest["scaling_factor"], force_upcast=False)
    return StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG_V2)).eval(),
        tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER_DIR), unet=UNet2DConditionModel(**UNET_CONFIG_V2).eval(),
        scheduler=PNDMScheduler(**SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


def fill(pipe) -> None:
    """Load every parameter of every module from the shipped graphs; fail on any left unset that
    the graphs' outputs depend on."""
    for graph, (prefix, attribute) in GRAPHS.items():
        module = getattr(pipe, attribute)
        state = module.state_dict()
        weights = graph_weights(SHIPPED / graph / "model.onnx", prefix)
        for key, value in weights.items():
            if key not in state:
                raise KeyError(f"{graph}: {key} is not a parameter of {type(module).__name__}")
            if tuple(state[key].shape) != value.shape:
                value = value.reshape(tuple(state[key].shape))
            state[key] = torch.from_numpy(np.ascontiguousarray(value))
        module.load_state_dict(state)
        print(f"{graph}: {len(weights)} tensors loaded")


def check(pipe) -> dict[str, float]:
    """Max abs difference between torch (the exporter's boundary modules) and the shipped graphs."""
    import onnxruntime as ort

    from edgediff.exporter.graphs import FAMILIES, example_sizes, model_dims

    dims, report = model_dims(pipe), {}
    for name, spec in FAMILIES["sd"].items():
        inputs = spec.example_inputs(dims, example_sizes(pipe, batch=1, latent_units=2))
        session = ort.InferenceSession(str(SHIPPED / name / "model.onnx"), providers=["CPUExecutionProvider"])
        feed = {arg.name: tensor.numpy().astype(np.int32 if "int32" in arg.type else np.float32)
                for arg, tensor in zip(session.get_inputs(), inputs)}
        if name == "unet":  # the graphs this was first run on fixed the U-Net's context at 77 tokens
            feed["encoder_hidden_states"] = feed["encoder_hidden_states"][:, :77]
            inputs = tuple(torch.from_numpy(feed[a.name]) for a in session.get_inputs())
        actual = session.run(None, feed)
        with torch.no_grad():
            expected = spec.module(pipe, dims)(*inputs)
        expected = expected if isinstance(expected, tuple) else (expected,)
        report[name] = max(float(np.abs(e.numpy() - a).max()) for e, a in zip(expected, actual))
    return report


def main():
    out = Path(sys.argv[1])
    pipe = build()
    fill(pipe)
    report = check(pipe)
    print("max abs diff torch vs shipped graph:", json.dumps(report))
    if max(report.values()) > 1e-4:
        raise SystemExit("the reconstructed model does not reproduce the shipped graphs")
    pipe.save_pretrained(out)
    print("saved", out)


if __name__ == "__main__":
    main()
