"""What a LoRA costs at run time on a full-size model: merge, session re-creation, generation with and without.

    flock "$LOCK" python -m edgediff.benchmarks.lora_apply --export DIR --diffusers DIR --work DIR

``--export`` is an fp32 CPU export (the shared full-size SD 1.5 one was made before weight maps
existed, so its maps are computed here from ``--diffusers``, the folder it was exported from, and
written with a copy of its manifest into ``--work``, beside links to its graphs). The LoRA is random,
rank ``--rank``, on every attention projection of the U-Net (to_q, to_k, to_v, to_out.0 of self and
cross attention), saved in kohya's format. Latency does not depend on weight values.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

ATTENTION = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")


def mapped_view(export: Path, diffusers: Path, work: Path) -> Path:
    """``work/model``: the export's graphs (linked) with a manifest that has weight maps."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from edgediff.exporter.weight_map import build_weight_map

    view = work / "model"
    if (view / "manifest.json").is_file():
        return view
    view.mkdir(parents=True, exist_ok=True)
    for item in export.iterdir():
        if item.name != "manifest.json" and not (view / item.name).exists():
            (view / item.name).symlink_to(item.resolve())
    manifest = json.loads((export / "manifest.json").read_text())
    for graph, cls in (("unet", UNet2DConditionModel), ("text_encoder", CLIPTextModel)):
        started = time.perf_counter()
        state = {k: v.numpy() for k, v in cls.from_pretrained(diffusers / graph).state_dict().items()}
        weights = build_weight_map(state, export / manifest["graphs"][graph]["path"])
        manifest["graphs"][graph]["weights"] = weights
        print(f"weight map {graph}: {len(weights)} weights in {time.perf_counter() - started:.1f} s")
        del state
    (view / "manifest.json").write_text(json.dumps(manifest))
    return view


def random_lora(view: Path, rank: int, path: Path) -> Path:
    from safetensors.numpy import save_file

    from edgediff.runtime.lora import param_shape
    from edgediff.runtime.manifest import read_manifest
    from edgediff.runtime.onnx_weights import initializer_index

    entry = read_manifest(view).graphs["unet"]
    index = initializer_index(view / entry.path)
    rng = np.random.default_rng(0)
    tensors = {}
    for key, where in entry.weights.items():
        if key.endswith(ATTENTION):
            out, inner = param_shape(where, index[where["init"]])
            flat = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
            tensors[f"{flat}.lora_down.weight"] = rng.standard_normal((rank, inner), dtype=np.float32) * 0.01
            tensors[f"{flat}.lora_up.weight"] = rng.standard_normal((out, rank), dtype=np.float32) * 0.01
            tensors[f"{flat}.alpha"] = np.array(rank, np.float32)
    save_file(tensors, str(path))
    print(f"LoRA: rank {rank} on {len(tensors) // 3} attention weights, {path.stat().st_size / 1e6:.0f} MB")
    return path


def paired_steps(view: Path, lora: Path, size: int, rounds: int) -> dict[str, list[float]]:
    """U-Net CFG steps on the base and the LoRA-patched session, both resident, taken in turn (A B A B ...)."""
    from edgediff.runtime.adapters import Adapters
    from edgediff.runtime.manifest import read_manifest
    from edgediff.runtime.sessions import GraphSession

    manifest = read_manifest(view)
    patched = {}

    class Collect:  # stands in for Sessions: keeps what the adapters hand over
        def set_initializers(self, graph, key, arrays):
            patched[graph] = arrays

    tokenizer = type("T", (), {"added_tokens": {}})()
    Adapters(view, manifest, print).apply(Collect(), tokenizer, ["x"], [(lora, 0.8)], None, None)
    entry = manifest.graphs["unet"]
    sessions = {label: GraphSession("unet", view, entry, "cpu", manifest.optimized_for, print, arrays)
                for label, arrays in (("base", {}), ("lora", patched["unet"]))}
    context = next(spec.shape for spec in entry.inputs if spec.name == "encoder_hidden_states")
    rng = np.random.default_rng(0)
    feed = dict(sample=rng.standard_normal((2, 4, size // 8, size // 8), dtype=np.float32),
                timestep=np.full(2, 500.0, np.float32),
                encoder_hidden_states=rng.standard_normal((2, *context[1:]), dtype=np.float32))
    times: dict[str, list[float]] = {"base": [], "lora": []}
    for round_ in range(rounds + 1):  # round 0 warms both up
        for label, session in sessions.items():
            started = time.perf_counter()
            session.run(**feed)
            if round_:
                times[label].append(time.perf_counter() - started)
    print("paired U-Net CFG steps (s): " + "; ".join(f"{k} {', '.join(f'{t:.2f}' for t in v)}" for k, v in times.items())
          + f"; load average {os.getloadavg()[0]:.1f}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=Path, required=True)
    parser.add_argument("--diffusers", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True, help="writable folder outside the repository")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3, help="measured steps; 20-step figures are extrapolated")
    parser.add_argument("--repeats", type=int, default=2, help="A B pairs of full generations")
    parser.add_argument("--rounds", type=int, default=3, help="paired U-Net steps per session (0: skip)")
    args = parser.parse_args()

    from edgediff.runtime import Pipeline

    view = mapped_view(args.export, args.diffusers, args.work)
    lora = random_lora(view, args.rank, args.work / f"attention-r{args.rank}.safetensors")
    print(f"load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs")
    if args.rounds:
        paired_steps(view, lora, args.size, args.rounds)
    latents = np.random.default_rng(0).standard_normal((1, 4, args.size // 8, args.size // 8), dtype=np.float32)
    call = dict(steps=args.steps, sampler="euler", width=args.size, height=args.size, latents=latents)

    # Base and LoRA runs alternate (A B A B) so that load from other processes hits both alike.
    runs: dict[str, list[dict]] = {"base": [], "lora": []}
    for label, loras in [("base", None), ("lora", [(lora, 0.8)])] * args.repeats:
        pipe = Pipeline.load(view, provider="cpu", memory="low")  # the CLI's default: sessions made per run
        ticks = []
        result = pipe("a photo of a cat", **call, loras=loras, on_step=lambda *_: ticks.append(time.perf_counter()))
        t = result.timings
        steady = float(np.median(np.diff(ticks)))  # steps after the first (which includes warm-up)
        first = t["unet"] - (ticks[-1] - ticks[0])
        row = dict(step=steady, first=first, load_unet=t.get("load_unet", 0.0), adapters=t.get("adapters", 0.0),
                   total20=t["total"] - t["unet"] + first + 19 * steady, pixels=result.pixels)
        runs[label].append(row)
        print(f"{label}: U-Net step (CFG, batch 2) {steady:.2f} s (first {first:.2f} s), U-Net session "
              f"{row['load_unet']:.1f} s, LoRA merge {row['adapters']:.2f} s, 20-step estimate {row['total20']:.1f} s, "
              f"load average {os.getloadavg()[0]:.1f}")
        del pipe
    rows = {label: {key: float(np.median([r[key] for r in items])) for key in ("step", "load_unet", "adapters", "total20")}
            for label, items in runs.items()}
    extra = rows["lora"]["total20"] - rows["base"]["total20"]
    print(f"images differ by {np.abs(runs['lora'][0]['pixels'] - runs['base'][0]['pixels']).max():.3f} (LoRA applied)")
    print(f"medians: step base {rows['base']['step']:.2f} s, LoRA {rows['lora']['step']:.2f} s; 20-step generation "
          f"base {rows['base']['total20']:.1f} s, LoRA {rows['lora']['total20']:.1f} s")
    print(f"memory=low: applying the LoRA added {extra:.1f} s to a 20-step {args.size}x{args.size} generation "
          f"({100 * extra / rows['base']['total20']:.1f}%); the merge alone {rows['lora']['adapters']:.2f} s "
          f"({100 * rows['lora']['adapters'] / rows['base']['total20']:.1f}%)")

    pipe = Pipeline.load(view, provider="cpu", memory="high")
    pipe("a photo of a cat", **{**call, "steps": 1})
    for weight in (0.8, 0.5):
        started = time.perf_counter()
        result = pipe("a photo of a cat", **{**call, "steps": 1}, loras=[(lora, weight)])
        t = result.timings
        print(f"memory=high, LoRA weight -> {weight}: merge {t['adapters']:.2f} s + U-Net session re-created "
              f"{t.get('load_unet', 0.0):.1f} s (text encoder re-created: {'load_text_encoder' in t}); "
              f"{100 * (t['adapters'] + t.get('load_unet', 0.0)) / rows['base']['total20']:.1f}% of a 20-step "
              f"generation; call {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
