"""The first thing to run on a machine with a GPU (``benchmarks/gpu_check.sh``): CUDA parity on tiny
models, then full-size SD 1.5 / SDXL step time, peak VRAM and cold start, inside a time budget.

    python -m edgediff.benchmarks.gpu_check [--dry-run] [--out DIR] [--results FILE] [--budget-s S]

Sections, in priority order (a section whose estimate does not fit the time left is recorded as
skipped, never run half):

1. parity: tiny random SD 1.x, SDXL, ControlNet (on the SD 1.x base) and SD 3.5 Medium models
   (the builders of tests/), exported fp32 for the CPU (the reference) and fp16/int4 for CUDA; the
   same request from the same starting noise; max and mean absolute pixel difference.
2. full size: SD 1.5 and SDXL architectures with random weights (benchmarks/models.py), fp16 and int4
   with ``memory="low"`` at 512 and 1024: a cold process (empty session cache) and a cached one
   (benchmarks/worker.py, a fresh process each, peak VRAM by NVML), diffusers fp16 with SDPA at the
   same size, and the U-Net step with and without ONNX Runtime IO binding (inputs and outputs kept on
   the device; the runtime itself does not bind yet).

``--dry-run`` runs the same code on the CPU with tiny models and tiny sizes (CI runs it so this
script cannot rot): fp16/int4 exports fused for the CPU, the tiny SD 1.x model in place of the full
size ones. Without ``--dry-run`` and without a CUDA GPU it stops with one line.
Writes ``gpu_check.json`` into ``--out`` and appends a markdown table to ``--results``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import hardware

PROMPT, NEGATIVE = "a red circle on a white background", "blurry, dark"
FAMILIES = ("sd1", "sdxl", "controlnet", "sd35")


@dataclass
class Plan:
    """What one mode measures: the GPU run, or its CPU rehearsal."""
    provider: str  # where the checked exports run
    target: str  # --optimize-for of the checked exports
    precisions: tuple[str, ...]  # checked for parity
    full_precisions: tuple[str, ...]  # measured at full size
    families: tuple[str, ...]
    full_models: tuple[str, ...]  # shipped configs, or "tiny-sd1" in the rehearsal
    sizes: tuple[int, ...]
    steps: int
    repeats: int  # IO binding runs per side
    # Rough seconds per action on one H100 machine (16 cores), to skip what cannot finish in time.
    cost: dict = field(default_factory=dict)

    @classmethod
    def for_mode(cls, dry_run: bool) -> "Plan":
        if dry_run:
            return cls("cpu", "cpu", ("fp16", "int4"), ("fp16",), ("sd1",), ("tiny-sd1",), (32,), 2, 2,
                       {"family": 5, "build": 0, "export": 5, "worker": 5, "iobinding": 5})
        return cls("cuda", "cuda", ("fp16", "int4"), ("fp16", "int4"), FAMILIES, ("sd15", "sdxl"), (512, 1024), 20, 10,
                   {"family": 25, "build": 90, "export": 150, "worker": 40, "iobinding": 20,
                    "build-sdxl": 150, "export-sdxl": 300, "worker-sdxl": 60})


class Budget:
    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def allows(self, seconds: float) -> bool:
        return self.left() >= seconds


def check_device(dry_run: bool) -> str | None:
    """None where the mode can run; else the one-line reason it cannot."""
    if dry_run:
        return None
    import onnxruntime

    providers = onnxruntime.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        return (f"no CUDA provider in this onnxruntime ({', '.join(providers)}): install edgediff[cuda] on a "
                "machine with an NVIDIA GPU, or pass --dry-run for the CPU rehearsal")
    # onnxruntime-gpu lists its CUDA provider on machines without a GPU too (it falls back at run time).
    if not hardware.gpus() and not _nvidia_smi_lists_a_gpu():
        return "no NVIDIA GPU found (NVML, nvidia-smi): nothing to check; pass --dry-run for the CPU rehearsal"
    return None


def _nvidia_smi_lists_a_gpu() -> bool:
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return False
    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    return listed.returncode == 0 and "GPU" in listed.stdout


def checkout() -> Path | None:
    """The source checkout this runs from (its tests/ holds the tiny-model builders): beside this
    module in an editable install, else the working directory (gpu_check.sh runs from the checkout's
    root, whatever the install)."""
    for root in (Path(__file__).resolve().parents[1], Path.cwd()):
        if (root / "tests" / "tiny_models.py").is_file():
            return root
    return None


def tests_dir() -> Path | None:
    root = checkout()
    return None if root is None else root / "tests"


def default_results() -> Path:
    """The checkout's benchmarks/RESULTS.md (not an installed copy's)."""
    root = checkout()
    return root / "benchmarks" / "RESULTS.md" if root is not None else Path(__file__).with_name("RESULTS.md")


def _import_builders():
    folder = tests_dir()
    if folder is None:
        raise RuntimeError("tests/ is not in this checkout or the working directory: run benchmarks/gpu_check.sh "
                           "from a source checkout")
    for path in (folder, folder / "export"):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    import tiny_models

    return tiny_models


def build_family(family: str, root: Path) -> tuple[Path, Path | None]:
    """(diffusers folder, ControlNet folder or None) of a tiny random model of ``family``."""
    tiny = _import_builders()
    if family in ("sd1", "controlnet"):
        source = root / "sd1" / "diffusers"  # exports go beside it: one folder per model
        if not (source / "model_index.json").is_file():
            tiny.save_pipeline("sd1", source)
        if family == "sd1":
            return source, None
        from test_controlnet import tiny_controlnet

        net = root / "controlnet" / "diffusers"
        tiny_controlnet(tiny.build_pipeline("sd1").unet, 11).save_pretrained(net)
        return source, net
    if family == "sdxl":
        return tiny.save_sdxl_pipeline("sdxl", root / "sdxl" / "diffusers"), None
    if family == "sd35":
        from test_sd3 import build_sd3

        build_sd3("sd35m").save_pretrained(root / "sd35m" / "diffusers")
        return root / "sd35m" / "diffusers", None
    raise ValueError(f"unknown family {family!r}")


def export(source: Path, precision: str, target: str, graphs=None) -> Path:
    """``edgediff export`` at one precision/target, cached beside the source (benchmarks/models.py)."""
    from .models import export_folder

    out = export_folder(source, precision, target)
    if not (out / "manifest.json").is_file():
        from edgediff.exporter.export import export_model

        export_model(str(source), out, precision=precision, optimize_for=target, graphs=graphs, overwrite=True,
                     log=lambda line: None)
    return out


def generate(folder: Path, provider: str, family: str, control: Path | None) -> np.ndarray:
    """Pixels of one fixed request (4 Euler steps with guidance, fixed starting noise)."""
    from PIL import Image

    from edgediff.runtime import Pipeline

    pipe = Pipeline.load(folder, provider=provider, memory="high")
    channels = pipe.manifest.latent_channels
    latents = np.random.default_rng(7).standard_normal((1, channels, 16, 16), dtype=np.float32)
    kwargs = {"t5": "on"} if family == "sd35" else {}
    if control is not None:
        picture = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        kwargs["control"] = [{"model": str(control), "image": Image.fromarray(picture)}]
    result = pipe(PROMPT, NEGATIVE, steps=4, guidance=5.0 if family == "sd35" else 7.5, sampler="euler",
                  latents=latents, **kwargs)
    return result.pixels


def parity(plan: Plan, root: Path, budget: Budget, log) -> list[dict]:
    rows, estimate = [], plan.cost["family"]
    for family in plan.families:
        if not budget.allows(estimate):
            rows.append({"family": family, "skipped": "time budget spent"})
            continue
        started = time.monotonic()
        try:
            source, net = build_family(family, root)
        except Exception as error:  # one family's builder failing must not lose the others
            rows.append({"family": family, "error": _line(error)})
            continue
        reference = None
        for precision in ("fp32", *plan.precisions):
            provider, target = ("cpu", "cpu") if precision == "fp32" else (plan.provider, plan.target)
            clock = time.perf_counter()
            try:
                folder = export(source, precision, target)
                control = export(net, precision, target) if net else None
                pixels = generate(folder, provider, family, control)
            except Exception as error:
                rows.append({"family": family, "precision": precision, "provider": provider, "error": _line(error)})
                continue
            if precision == "fp32":
                reference = pixels
                continue
            difference = np.abs(pixels.astype(np.float64) - reference) if reference is not None else None
            rows.append({"family": family, "precision": precision, "provider": provider, "reference": "cpu fp32",
                         "max_abs": None if difference is None else float(difference.max()),
                         "mean_abs": None if difference is None else float(difference.mean()),
                         "pixels": list(pixels.shape), "seconds": time.perf_counter() - clock})
            log(f"parity {family} {precision} on {provider}: max {rows[-1]['max_abs']}")
        estimate = max(estimate, time.monotonic() - started)  # a loaded machine is slower than the guess
    return rows


def _line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def io_binding(folder: Path, provider: str, size: int, repeats: int) -> dict:
    """The U-Net step (batch 2, as with guidance) through the runtime's own session, fed NumPy arrays
    (copied to the device and back every call) against inputs and outputs bound on the device."""
    import onnxruntime as ort

    from edgediff.runtime import Pipeline
    from edgediff.runtime.sessions import Sessions

    from .worker import edgediff_feeds

    pipe = Pipeline.load(folder, provider=provider, memory="low")
    feeds = edgediff_feeds(pipe, 1, size)["unet"]
    sessions = Sessions(Path(folder), pipe.manifest, provider, "high")
    with sessions.use("unet") as graph:
        session, device = graph.session, "cuda" if provider == "cuda" else "cpu"
        binding = session.io_binding()
        for name, value in feeds.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, device, 0))
        for output in session.get_outputs():
            binding.bind_output(output.name, device)
        calls = {"off": lambda: session.run(None, feeds), "on": lambda: session.run_with_iobinding(binding)}
        seconds = {}
        for name, call in calls.items():
            call()  # first run: cuDNN's algorithm search, arena growth
            times = []
            for _ in range(repeats):
                clock = time.perf_counter()
                call()
                if name == "on":
                    binding.synchronize_outputs()
                times.append(time.perf_counter() - clock)
            seconds[name] = float(np.median(times))
    return {"step_off_s": seconds["off"], "step_on_s": seconds["on"], "runs": repeats,
            "active_provider": session.get_providers()[0]}


def e2e(folder: Path, engine: str, plan: Plan, size: int, precision: str, env: dict, log_dir: Path) -> dict:
    """One generation in a fresh process (benchmarks/worker.py): timings, peak RSS and VRAM."""
    from .runner import run_worker

    spec = {"engine": engine, "phase": "e2e", "provider": plan.provider, "precision": precision,
            "memory": "low" if engine == "edgediff" else None, "resolution": size, "steps": plan.steps, "batch": 1,
            "repeats": 1, "threads": hardware.usable_cores(), "generations": 1, "env": env, "model_dir": str(folder)}
    label = f"{engine}-{folder.parent.parent.name}-{folder.name}-{size}-{len(list(log_dir.glob('*.log')))}"
    result = run_worker(spec, log_dir / f"{label}.log", lambda fraction, what: None, timeout_s=600)
    if "error" in result:
        return {"error": result["error"]}
    run = result["runs"][0]
    return {"total_s": run.get("total"), "unet_per_step_s": run.get("unet_per_step"),
            "peak_gpu_bytes": result.get("peak_gpu_bytes"), "peak_rss_bytes": result.get("peak_rss_bytes"),
            "session_load_s": sum((result.get("session_load_s") or {}).values()) or None,
            "session_cache": result.get("session_cache"), "wall_s": result.get("wall_s")}


def full_size(plan: Plan, root: Path, cache: Path, out: Path, budget: Budget, log) -> list[dict]:
    from .models import BENCH_GRAPHS, ensure_model

    rows = []
    for model in plan.full_models:
        cost = {key: plan.cost.get(f"{key}-{model}", plan.cost[key]) for key in ("build", "export", "worker",
                                                                                   "iobinding")}
        if not budget.allows(cost["build"] + cost["export"] + 2 * cost["worker"]):
            rows.append({"model": model, "skipped": "time budget spent"})
            continue
        source = build_family("sd1", root)[0] if model == "tiny-sd1" else ensure_model(model, cache, 0, log=log)
        for size in plan.sizes:  # the reference: diffusers fp16 with SDPA (fp32 in the CPU rehearsal)
            if budget.allows(cost["worker"]):
                reference = "fp16" if plan.provider == "cuda" else "fp32"
                rows.append({"model": model, "engine": "diffusers", "precision": reference, "size": size,
                             **e2e(source, "diffusers", plan, size, reference, {}, out / "logs")})
        for precision in plan.full_precisions:
            if not budget.allows(cost["export"] + 2 * cost["worker"]):
                rows.append({"model": model, "precision": precision, "skipped": "time budget spent"})
                continue
            try:
                folder = export(source, precision, plan.target, BENCH_GRAPHS)
            except Exception as error:
                rows.append({"model": model, "precision": precision, "error": _line(error)})
                continue
            for size in plan.sizes:
                if not budget.allows(2 * cost["worker"]):
                    rows.append({"model": model, "precision": precision, "size": size,
                                 "skipped": "time budget spent"})
                    continue
                with tempfile.TemporaryDirectory() as session_cache:  # cold: nothing cached yet
                    env = {"EDGEDIFF_SESSION_CACHE": session_cache}
                    cold = e2e(folder, "edgediff", plan, size, precision, env, out / "logs")
                    cached = e2e(folder, "edgediff", plan, size, precision, env, out / "logs")
                rows.append({"model": model, "engine": "edgediff", "precision": precision, "size": size,
                             "memory": "low", **cached, "cold": cold})
                log(f"{model} {precision} {size}: {cached.get('unet_per_step_s')} s/step")
            if budget.allows(cost["iobinding"]):
                try:
                    bound = io_binding(folder, plan.provider, plan.sizes[0], plan.repeats)
                except Exception as error:
                    bound = {"error": _line(error)}
                rows.append({"model": model, "precision": precision, "size": plan.sizes[0], "iobinding": bound})
    return rows


def _fmt(value, scale=1.0, unit="", digits=3) -> str:
    return "—" if value is None else f"{value * scale:.{digits}g}{unit}"


def table(document: dict) -> str:
    """The markdown section appended to RESULTS.md."""
    m = document["machine"]
    gpu = ", ".join(g.get("name", "?") for g in m.get("gpus") or []) or "no GPU"
    mode = ("dry run on the CPU (tiny models, tiny sizes: rehearsal figures, not GPU figures)"
            if document["dry_run"] else f"GPU run on {gpu}")
    lines = [f"## GPU check ({document['date']}): {mode}", "",
             f"`{document['command']}`; CPU {m['cpu']} ({m['cores']} cores), load average "
             f"{document['load_average']}; onnxruntime {document['versions'].get('onnxruntime')}, torch "
             f"{document['versions'].get('torch')}; {document['seconds']:.0f} s of a {document['budget_s']:.0f} s "
             "budget.", "",
             "Parity against the CPU fp32 export, same request and starting noise (4 Euler steps with "
             "guidance, pixels in [0, 1]):", "",
             "| model | precision | provider | max abs | mean abs |", "|---|---|---|---|---|"]
    for row in document["parity"]:
        note = row.get("skipped") or row.get("error")
        lines.append(f"| {row['family']} | {row.get('precision', '—')} | {row.get('provider', '—')} | "
                     + (f"{note} | |" if note else f"{_fmt(row['max_abs'])} | {_fmt(row['mean_abs'])} |"))
    lines += ["", f"Full size, `memory=\"low\"`, {document['steps']} steps, batch 1 with guidance (cold: a fresh "
              "process with an empty session cache; the other columns: a fresh process with the cache filled):", "",
              "| model | engine | precision | size | U-Net step | generation | peak VRAM | peak RSS | "
              "session load cold / cached | cold generation |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in document["full_size"]:
        if "iobinding" in row:
            continue
        note = row.get("skipped") or row.get("error")
        head = (f"| {row['model']} | {row.get('engine', 'edgediff')} | {row.get('precision', '—')} | "
                f"{row.get('size', '—')} | ")
        if note:
            lines.append(head + f"{note} | | | | | |")
            continue
        cold = row.get("cold") or {}
        lines.append(head + f"{_fmt(row.get('unet_per_step_s'), 1e3, ' ms')} | {_fmt(row.get('total_s'), 1, ' s')} | "
                     f"{_fmt(row.get('peak_gpu_bytes'), 1e-9, ' GB')} | {_fmt(row.get('peak_rss_bytes'), 1e-9, ' GB')} | "
                     f"{_fmt(cold.get('session_load_s'), 1, ' s')} / {_fmt(row.get('session_load_s'), 1, ' s')} | "
                     f"{cold.get('error') or _fmt(cold.get('total_s'), 1, ' s')} |")
    bound = [row for row in document["full_size"] if "iobinding" in row]
    if bound:
        lines += ["", "U-Net step (batch 2) through the runtime's session, NumPy feeds against IO binding:", "",
                  "| model | precision | size | IO binding off | on |", "|---|---|---|---|---|"]
        for row in bound:
            b = row["iobinding"]
            lines.append(f"| {row['model']} | {row['precision']} | {row['size']} | "
                         + (f"{b['error']} | |" if "error" in b else
                            f"{_fmt(b['step_off_s'], 1e3, ' ms')} | {_fmt(b['step_on_s'], 1e3, ' ms')} |"))
    return "\n".join(lines) + "\n"


def run(args) -> dict:
    import os

    from .models import default_cache

    plan = Plan.for_mode(args.dry_run)
    if args.families:
        plan.families = tuple(args.families.split(","))
    budget, started = Budget(args.budget_s), time.monotonic()
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    log = lambda line: print(f"gpu_check: {line}", file=sys.stderr, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        document = {"dry_run": args.dry_run, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    "command": " ".join(["gpu_check", *sys.argv[1:]]), "budget_s": args.budget_s,
                    "steps": plan.steps, "machine": hardware.machine(), "versions": hardware.versions(),
                    "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg())}
        document["parity"] = parity(plan, Path(work), budget, log)
        # Written now too: a run stopped by the shell's hard limit keeps its parity section.
        (out / "gpu_check.json").write_text(json.dumps({**document, "complete": False}, indent=2, default=str))
        cache = Path(args.cache) if args.cache else default_cache()
        document["full_size"] = full_size(plan, Path(work), cache, out, budget, log)
    document["seconds"], document["complete"] = time.monotonic() - started, True
    return document


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="the same code on the CPU, tiny models and sizes")
    parser.add_argument("--out", default="gpu-check-results", help="folder for gpu_check.json and the logs")
    parser.add_argument("--results", default=None, help="markdown file the table is appended to [default: "
                        "benchmarks/RESULTS.md; with --dry-run, gpu_check.md in --out]")
    parser.add_argument("--budget-s", type=float, default=450.0, help="stop starting work after this many seconds")
    parser.add_argument("--families", default=None, help=f"parity families, comma-separated ({','.join(FAMILIES)})")
    parser.add_argument("--cache", default=None, help="where full-size random-weight models and exports are cached")
    args = parser.parse_args(argv)
    unknown = [f for f in (args.families or "").split(",") if f and f not in FAMILIES]
    why = f"unknown --families {', '.join(unknown)}: choose from {', '.join(FAMILIES)}" if unknown else \
        check_device(args.dry_run)
    if not why and checkout() is None:
        why = "tests/ (the tiny-model builders) is not in this checkout or the working directory: run " \
              "benchmarks/gpu_check.sh from a source checkout"
    if why:
        print(f"gpu_check: {why}", file=sys.stderr)
        return 2
    if args.results is None:  # a rehearsal's figures are not results: they stay beside its JSON
        args.results = str(Path(args.out) / "gpu_check.md") if args.dry_run else str(default_results())
    document = run(args)
    path = Path(args.out) / "gpu_check.json"
    path.write_text(json.dumps(document, indent=2, default=str))
    with open(args.results, "a") as results:
        results.write("\n" + table(document))
    print(f"gpu_check: wrote {path} and appended the table to {args.results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
