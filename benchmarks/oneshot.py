"""One-shot CLI rows: a fresh process generates one image the way a user does, loading included.

edgediff: ``edgediff generate`` (memory low) on an exported folder, first run (an empty session
cache: graph optimization paid) and cached run (the optimized graphs saved by the first run).
diffusers: a fresh Python process that imports diffusers, loads the pipeline from the diffusers
folder and generates the same image (same sampler, steps, size), fp32 and bf16 autocast.
Runs are interleaved (edgediff, diffusers, edgediff, ...) so that a machine whose speed drifts
slows both sides alike; each figure is the median of ``repeats`` runs, and each edgediff row's ratio
to diffusers' fastest precision is the median of the per-round ratios (runs of the same round were
taken back to back, so a busy spell of the machine slows both). Wall time and the peak RSS
come from the operating system's accounting of the finished child (``os.wait4``).

    python -m edgediff.benchmarks.oneshot --export DIR [--export DIR2] --diffusers DIR --out FILE.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

PROMPT = "a photograph of an astronaut riding a horse"

DIFFUSERS_SCRIPT = """
import sys, torch
from contextlib import nullcontext
from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler
folder, size, steps, precision, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
# the folder's own pipeline class (SD 1.x/2.x or SDXL); fp32 as saved: transformers 5 would load SDXL's
# second text encoder in the fp16 its config names
pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)
if hasattr(pipe, "safety_checker"):
    pipe.safety_checker = None
pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
pipe.set_progress_bar_config(disable=True)
autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
with torch.inference_mode(), autocast:
    image = pipe(%r, negative_prompt="", num_inference_steps=steps, guidance_scale=7.5, height=size, width=size,
                 generator=torch.Generator().manual_seed(0)).images[0]
image.save(out)
""" % PROMPT


def _pinned(threads: int | None):
    """Give the child the first ``threads`` CPUs this process may use (both engines alike)."""
    if not threads or not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    return lambda: os.sched_setaffinity(0, cpus)


def timed(command: list[str], env: dict | None = None, threads: int | None = None, lock: Path | None = None) -> dict:
    """Wall seconds, CPU seconds and peak RSS of one child process run to completion (while holding
    ``lock``, an flock file shared with other big jobs on the machine; the wait is not timed)."""
    env = dict(env or os.environ)
    if threads:  # torch's OpenMP pool and ONNX Runtime's (EDGEDIFF_THREADS) get the same count
        env.update(OMP_NUM_THREADS=str(threads), EDGEDIFF_THREADS=str(threads))
    with tempfile.TemporaryFile() as log, _locked(lock):
        clock = time.perf_counter()
        process = subprocess.Popen(command, stdout=log, stderr=log, env=env, preexec_fn=_pinned(threads))
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - clock
        process.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        tail = log.read().decode(errors="replace").strip().splitlines()[-1:] or [""]
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_bytes": usage.ru_maxrss * 1024,
            "exit": process.returncode, "last_line": tail[0][:300]}


@contextmanager
def _locked(lock: Path | None):
    if lock is None:
        yield
        return
    import fcntl

    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def edgediff_command(export: Path, size: int, steps: int, provider: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "edgediff", "generate", PROMPT, "--model", str(export), "--steps", str(steps),
            "--width", str(size), "--height", str(size), "--seed", "0", "--memory", "low", "--provider", provider,
            "-o", str(out)]


def diffusers_command(folder: Path, size: int, steps: int, precision: str, out: Path) -> list[str]:
    return [sys.executable, "-c", DIFFUSERS_SCRIPT, str(folder), str(size), str(steps), precision, str(out)]


def run(exports: list[Path], diffusers: Path | None, size: int, steps: int, repeats: int, provider: str,
        bf16: bool, log=print, threads: int | None = None, lock: Path | None = None) -> dict:
    """Interleaved rounds; each round: per export a first (empty cache) and a cached run, then diffusers."""
    work = Path(tempfile.mkdtemp(prefix="edgediff-oneshot-"))
    results: dict[str, list[dict]] = {}
    try:
        for round_ in range(repeats):
            for export in exports:
                cache = work / f"cache-{export.name}"
                shutil.rmtree(cache, ignore_errors=True)
                env = {**os.environ, "EDGEDIFF_SESSION_CACHE": str(cache)}
                for phase in ("first", "cached"):
                    label = f"edgediff {provider} {export.name} {phase}"
                    result = timed(edgediff_command(export, size, steps, provider, work / "e.png"), env, threads, lock)
                    results.setdefault(label, []).append(result)
                    log(f"round {round_ + 1}: {label}: {result['wall_s']:.1f} s, "
                        f"{result['peak_rss_bytes'] / 1e9:.2f} GB (exit {result['exit']})")
            for precision in (("fp32", "bf16") if bf16 else ("fp32",)) if diffusers else ():
                label = f"diffusers cpu {precision}"
                result = timed(diffusers_command(diffusers, size, steps, precision, work / "d.png"), None, threads, lock)
                results.setdefault(label, []).append(result)
                log(f"round {round_ + 1}: {label}: {result['wall_s']:.1f} s, "
                    f"{result['peak_rss_bytes'] / 1e9:.2f} GB (exit {result['exit']})")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {}
    for label, runs in results.items():
        ok = [r for r in runs if r["exit"] == 0]
        summary[label] = {"runs": runs, "ok": len(ok),
                          "median_wall_s": statistics.median(r["wall_s"] for r in ok) if ok else None,
                          "median_peak_rss_gb": statistics.median(r["peak_rss_bytes"] for r in ok) / 1e9 if ok else None}
    fastest = min((label for label in summary if label.startswith("diffusers") and summary[label]["median_wall_s"]),
                  key=lambda label: summary[label]["median_wall_s"], default=None)
    for label, row in summary.items():
        if fastest and label.startswith("edgediff"):
            row["paired_ratio"] = paired_ratio(row["runs"], summary[fastest]["runs"])
    return {"size": size, "steps": steps, "repeats": repeats, "provider": provider, "threads": threads,
            "rows": summary}


def paired_ratio(runs: list[dict], baseline: list[dict]) -> float | None:
    """Median over rounds of wall(run) / wall(baseline run of the same round); failed rounds left out."""
    ratios = [a["wall_s"] / b["wall_s"] for a, b in zip(runs, baseline) if a["exit"] == 0 and b["exit"] == 0]
    return statistics.median(ratios) if ratios else None


def markdown(document: dict) -> str:
    rows = document["rows"]
    base = next((r for label, r in rows.items() if label == "diffusers cpu fp32"), None)
    best = min((r["median_wall_s"] for label, r in rows.items() if label.startswith("diffusers") and
                r["median_wall_s"]), default=None)
    lines = [f"One-shot CLI, fresh process per image, {document['size']}x{document['size']}, {document['steps']} "
             f"steps, memory=low, median of {document['repeats']} interleaved runs", "",
             "| process | wall s | peak RSS GB | vs diffusers' fastest | RSS vs diffusers fp32 |", "|---|---|---|---|---|"]
    for label, r in rows.items():
        wall, rss = r["median_wall_s"], r["median_peak_rss_gb"]
        ratio = (f"{r['paired_ratio']:.2f}x (paired)" if r.get("paired_ratio") else
                 f"{wall / best:.2f}x" if wall and best else "–")
        rss_ratio = f"{rss / base['median_peak_rss_gb']:.2f}x" if rss and base and base["median_peak_rss_gb"] else "–"
        lines.append(f"| {label} | {wall:.1f} | {rss:.2f} | {ratio} | {rss_ratio} |" if wall else
                     f"| {label} | failed: {r['runs'][-1]['last_line']} | | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=Path, action="append", required=True, help="edgediff model folder")
    parser.add_argument("--diffusers", type=Path, help="diffusers folder of the same weights")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--provider", default="cpu")
    parser.add_argument("--no-bf16", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="CPUs for each process [default: all]")
    parser.add_argument("--lock", type=Path, default=None, help="flock file held while each process runs")
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the results")
    args = parser.parse_args(argv)
    document = run(args.export, args.diffusers, args.size, args.steps, args.repeats, args.provider,
                   not args.no_bf16, log=lambda line: print(f"oneshot: {line}", file=sys.stderr, flush=True),
                   threads=args.threads, lock=args.lock)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2))
    print(markdown(document))
    return 0


if __name__ == "__main__":
    sys.exit(main())
