"""What ControlNet costs per sampling step, paired: one call each, in turn, round after round.

    python -m edgediff.benchmarks.controlnet_step EXPORT [--controlnet CN_EXPORT]
        [--diffusers DIR --diffusers-controlnet CN_DIR] --size 256 --batch 2 --rounds 5

Rows, each fed the same random inputs (runtime CPU sessions, the runtime's thread count):
- the U-Net as exported, plain: its ControlNet residual inputs left to their zero defaults (what
  every generation without ControlNet runs);
- its twin without residual inputs (the same graph with the residual Adds taken out, written
  beside it): the U-Net as exported before ControlNet support, so row 1 / row 2 is what the
  residual inputs cost a plain generation;
- with ``--controlnet``: one ControlNet call and the U-Net fed its residuals (a ControlNet step);
- with ``--diffusers`` and ``--diffusers-controlnet``: diffusers' ControlNet and U-Net, fp32.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .unet_step import feed_for, interleaved_rounds


def residual_free_twin(folder: Path, into: Path) -> Path:
    """A copy of ``folder``'s U-Net without ControlNet residual inputs: each residual's Add is
    removed and its other operand used in its place; the weights file is hard-linked (ONNX Runtime
    refuses external data behind a symlink that leaves the model's folder), else copied."""
    import onnx

    manifest = json.loads((folder / "manifest.json").read_text())
    entry = manifest["graphs"]["unet"]
    residuals = {spec["name"] for spec in entry.pop("optional_inputs", [])}
    model = onnx.load(str(folder / entry["path"]), load_external_data=False)
    graph = model.graph
    replace = {}
    for node in list(graph.node):
        hit = [name for name in node.input if name in residuals]
        if hit:
            if node.op_type != "Add":
                raise SystemExit(f"residual {hit[0]} feeds a {node.op_type}, not an Add: no twin")
            replace[node.output[0]] = next(name for name in node.input if name not in residuals)
            graph.node.remove(node)
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name in replace:
                node.input[index] = replace[name]
    for kept in [i for i in graph.input if i.name in residuals]:
        graph.input.remove(kept)
    for kept in [t for t in graph.initializer if t.name in residuals]:
        graph.initializer.remove(kept)
    unet = into / Path(entry["path"]).parent
    unet.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(into / entry["path"]))
    for data in (folder / entry["path"]).parent.glob("*.data"):
        try:
            os.link(data, unet / data.name)
        except OSError:
            shutil.copyfile(data, unet / data.name)
    (into / "manifest.json").write_text(json.dumps(manifest))
    return into


def residual_adds_seconds(entry, latent: int, batch: int, threads: int, repeats: int = 50) -> float:
    """The work the residual inputs add to a plain U-Net call, alone: one Add per residual of its
    activation with the zero default [1, C, 1, 1], in one ONNX Runtime graph at the step's shapes
    (median seconds per call). Load from other jobs hardly touches a measurement this short."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    nodes, inputs, outputs, inits, feed = [], [], [], [], {}
    for index, spec in enumerate(entry.optional_inputs):
        factor = int(str(spec.shape[2]).partition("/")[2] or 1)
        shape = [batch, spec.shape[1], latent // factor, latent // factor]
        inputs += [helper.make_tensor_value_info(f"x{index}", TensorProto.FLOAT, shape),
                   helper.make_tensor_value_info(spec.name, TensorProto.FLOAT, ["b", spec.shape[1], "h", "w"])]
        inits.append(numpy_helper.from_array(np.zeros((1, spec.shape[1], 1, 1), np.float32), spec.name))
        nodes.append(helper.make_node("Add", [f"x{index}", spec.name], [f"y{index}"]))
        outputs.append(helper.make_tensor_value_info(f"y{index}", TensorProto.FLOAT, shape))
        feed[f"x{index}"] = np.random.default_rng(index).standard_normal(shape, dtype=np.float32)
    model = helper.make_model(helper.make_graph(nodes, "adds", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # the note that a defaulted input is not folded is the point here
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    session.run(None, feed)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _controlnet_call(cn_folder: Path, unet_session, feed: dict, size: int, threads: int):
    from edgediff.runtime.controlnet import GRAPH, read_controlnet_manifest
    from edgediff.runtime.sessions import GraphSession

    manifest = read_controlnet_manifest(cn_folder)
    entry = manifest.graphs[GRAPH]
    session = GraphSession(GRAPH, cn_folder, entry, "cpu", manifest.optimized_for, warn=print, cache=False,
                           threads=threads)
    batch = feed["sample"].shape[0]
    hint = np.random.default_rng(1).random((batch, 3, size, size), dtype=np.float32)
    takes = {s.name for s in entry.inputs}

    def call():
        residuals = session.run(controlnet_cond=hint, **{k: v for k, v in feed.items() if k in takes})
        return unet_session.run(**feed, **{spec.name: r for spec, r in zip(entry.outputs, residuals)})
    return call


def _diffusers_call(folder: Path, cn_folder: Path, feed: dict, size: int):
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    controlnet = ControlNetModel.from_pretrained(cn_folder).eval()
    tensors = {name: torch.from_numpy(array) for name, array in feed.items()}
    hint = torch.rand(feed["sample"].shape[0], 3, size, size, generator=torch.Generator().manual_seed(1))

    def call():
        with torch.no_grad():
            down, mid = controlnet(tensors["sample"], tensors["timestep"], tensors["encoder_hidden_states"], hint,
                                   return_dict=False)
            return unet(tensors["sample"], tensors["timestep"], tensors["encoder_hidden_states"],
                        down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    return call


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="an export whose U-Net takes ControlNet residuals")
    parser.add_argument("--controlnet", type=Path, default=None, help="an exported ControlNet for it")
    parser.add_argument("--diffusers", type=Path, default=None, help="the diffusers folder of the model")
    parser.add_argument("--diffusers-controlnet", type=Path, default=None, help="the diffusers ControlNet folder")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2, help="2: one classifier-free guidance step")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)

    from edgediff.runtime.manifest import Manifest
    from edgediff.runtime.sessions import GraphSession, default_threads

    threads = args.threads or default_threads()
    print(f"cpu {platform.processor() or platform.machine()}; threads {threads}; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    names, calls = [], []
    with tempfile.TemporaryDirectory(dir=args.model.parent) as scratch:  # beside it: a hard link works
        folders = [("plain, residual inputs at their zero defaults", args.model),
                   ("plain, no residual inputs (twin)", residual_free_twin(args.model, Path(scratch) / "twin"))]
        sessions = {}
        for name, folder in folders:
            manifest = Manifest.from_dict(json.loads((folder / "manifest.json").read_text()))
            entry = manifest.graphs["unet"]
            session = sessions[folder] = GraphSession("unet", folder, entry, "cpu", manifest.optimized_for,
                                                      warn=print, cache=False, threads=threads)
            feed = feed_for(manifest, entry, args.size, args.batch, np.random.default_rng(0))
            names.append(name)
            calls.append(lambda session=session, feed=feed: session.run(**feed))
        if args.controlnet:
            names.append("ControlNet + U-Net fed its residuals")
            calls.append(_controlnet_call(args.controlnet, sessions[args.model], feed, args.size, threads))
        if args.diffusers and args.diffusers_controlnet:
            import torch

            torch.set_num_threads(threads)
            names.append("diffusers ControlNet + U-Net, fp32")
            calls.append(_diffusers_call(args.diffusers, args.diffusers_controlnet, feed, args.size))
        for call in calls:
            call()  # warm-up: first-run allocations
        times = interleaved_rounds(calls, args.rounds)
    for name, record in zip(names, times):
        ratios = [a / b for a, b in zip(record, times[1])]
        plain = [a / b for a, b in zip(record, times[0])]
        print(f"{name}: {args.size}x{args.size} batch {args.batch} step median {statistics.median(record):.3f} s, "
              f"best {min(record):.3f} s ({args.rounds} rounds); per round, median {statistics.median(ratios):.3f}x "
              f"the twin, {statistics.median(plain):.3f}x the plain U-Net", flush=True)
    entry = Manifest.from_dict(json.loads((args.model / "manifest.json").read_text())).graphs["unet"]
    latent = args.size // Manifest.from_dict(json.loads((args.model / "manifest.json").read_text())).vae_scale_factor
    adds = residual_adds_seconds(entry, latent, args.batch, threads)
    print(f"the residual Adds alone: {1000 * adds:.2f} ms per call, {100 * adds / min(times[1]):.3f}% of the "
          f"twin's best step", flush=True)
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
