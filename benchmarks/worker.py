"""One benchmark configuration, run in a fresh process so its peak RSS is its own.

    python -m edgediff.benchmarks.worker SPEC.json RESULT.json

SPEC names the engine (edgediff or diffusers), the phase (``stages``: load, first run and steady
time per stage; ``e2e``: whole generations and the job's peak memory), and the job. Progress goes to
stdout as lines ``progress <done> <total> <what>`` for the parent's progress bar.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

from .hardware import GpuMemoryMonitor, peak_rss_bytes

PROMPT = "a photograph of an astronaut riding a horse"


def progress(done: int, total: int, what: str) -> None:
    print(f"progress {done} {total} {what}", flush=True)


def _timed(call, repeats: int) -> tuple[float, list[float]]:
    """(first call seconds, steady-state seconds of ``repeats`` further calls)."""
    clock = time.perf_counter()
    call()
    first = time.perf_counter() - clock
    steady = []
    for _ in range(repeats):
        clock = time.perf_counter()
        call()
        steady.append(time.perf_counter() - clock)
    return first, steady


def _stage(load: float, first: float, steady: list[float]) -> dict:
    return {"load_s": load, "first_run_s": first, "median_s": statistics.median(steady) if steady else first,
            "min_s": min(steady) if steady else first, "runs": len(steady)}


# ---------------------------------------------------------------------------------------- edgediff
def edgediff_stages(spec: dict) -> dict:
    import numpy as np

    from edgediff.runtime import Pipeline
    from edgediff.runtime.sessions import Sessions

    pipe = Pipeline.load(spec["model_dir"], provider=spec["provider"], memory="low", warn=_warn)
    m = pipe.manifest
    batch, size = spec["batch"], spec["resolution"]
    latent = size // m.vae_scale_factor
    hidden = next(s.shape[-1] for s in m.graphs["unet"].inputs if s.name == "encoder_hidden_states")
    rng = np.random.default_rng(0)
    ids = pipe.tokenizer([PROMPT] * batch + [""] * batch)
    feeds = {
        "text_encoder": {"input_ids": ids},
        "unet": {"sample": rng.standard_normal((2 * batch, m.latent_channels, latent, latent), dtype=np.float32),
                 "timestep": np.full(2 * batch, 601.0, dtype=np.float32),
                 "encoder_hidden_states": rng.standard_normal((2 * batch, ids.shape[1], hidden), dtype=np.float32)},
        "vae_decoder": {"latent_sample": rng.standard_normal((batch, m.latent_channels, latent, latent),
                                                             dtype=np.float32)},
    }
    stages = {}
    names = list(feeds)
    for index, name in enumerate(names):
        progress(index, len(names), f"{name}: session")
        sessions = Sessions(Path(spec["model_dir"]), m, spec["provider"], "low", warn=_warn)
        # The first session may optimize the graph and fill the session cache; the second shows what
        # every later process pays (session_cache.py).
        clock = time.perf_counter()
        with sessions.use(name):
            opened = time.perf_counter() - clock
        opened_state = sessions.cache_states[name]
        with GpuMemoryMonitor() as gpu:
            clock = time.perf_counter()
            with sessions.use(name) as session:
                load = time.perf_counter() - clock
                progress(index, len(names), f"{name}: run")
                first, steady = _timed(lambda: session.run(**feeds[name]), spec["repeats"])
                active = session.provider
        stages[name] = {**_stage(load, first, steady), "provider": active, "peak_gpu_bytes": gpu.peak_bytes,
                        "cache": sessions.cache_states[name], "first_load_s": opened, "first_load_cache": opened_state}
    return {"stages": stages, "peak_rss_bytes": peak_rss_bytes()}


def edgediff_e2e(spec: dict) -> dict:
    from edgediff.runtime import Pipeline

    clock = time.perf_counter()
    pipe = Pipeline.load(spec["model_dir"], provider=spec["provider"], memory=spec["memory"], warn=_warn)
    opened = time.perf_counter() - clock
    runs = []
    steps = spec["steps"]
    total = steps * spec["generations"]
    with GpuMemoryMonitor() as gpu:
        for generation in range(spec["generations"]):
            def on_step(step, steps_, latents, g=generation):
                progress(g * steps + step, total, f"generation {g + 1}: step {step}/{steps}")

            result = pipe([PROMPT] * spec["batch"], [""] * spec["batch"], steps=steps, guidance=7.5, seed=0,
                          width=spec["resolution"], height=spec["resolution"], on_step=on_step)
            runs.append(dict(result.timings))
            if generation == 0:
                peak_first = peak_rss_bytes()
    return {"open_s": opened, "runs": runs, "peak_rss_bytes": peak_first, "peak_rss_all_bytes": peak_rss_bytes(),
            "peak_gpu_bytes": gpu.peak_bytes, "session_load_s": pipe.sessions.load_seconds,
            "session_cache": pipe.sessions.cache_states}


# --------------------------------------------------------------------------------------- diffusers
def _torch_setup(spec: dict):
    import torch

    torch.set_num_threads(spec["threads"])
    device = "cuda" if spec["provider"] == "cuda" else "cpu"
    dtype = torch.float16 if spec["precision"] == "fp16" else torch.float32
    if spec["precision"] == "bf16":
        autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    else:
        from contextlib import nullcontext

        autocast = nullcontext
    return torch, device, dtype, autocast


def _sync(torch, device):
    if device == "cuda":
        torch.cuda.synchronize()


def _load_diffusers(spec, torch, device, dtype) -> tuple[object, dict]:
    from diffusers import (AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(spec["model_dir"])
    loads = {}
    parts = {}
    for name, load in (("text_encoder", lambda: CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=dtype)),
                       ("unet", lambda: UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype)),
                       ("vae", lambda: AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype))):
        clock = time.perf_counter()
        parts[name] = load().to(device).eval()
        _sync(torch, device)
        loads["vae_decoder" if name == "vae" else name] = time.perf_counter() - clock
    if device == "cuda":  # SDPA is diffusers' default attention processor on torch 2
        from diffusers.models.attention_processor import AttnProcessor2_0

        parts["unet"].set_attn_processor(AttnProcessor2_0())
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    # The same sampler as edgediff's default (DPM++ 2M Karras): one U-Net call per step on both sides.
    scheduler = DPMSolverMultistepScheduler.from_pretrained(folder / "scheduler", use_karras_sigmas=True)
    pipe = StableDiffusionPipeline(tokenizer=tokenizer, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe, loads


def diffusers_stages(spec: dict) -> dict:
    torch, device, dtype, autocast = _torch_setup(spec)
    with GpuMemoryMonitor() as gpu_load:
        pipe, loads = _load_diffusers(spec, torch, device, dtype)
    batch, size = spec["batch"], spec["resolution"]
    latent = size // pipe.vae_scale_factor
    generator = torch.Generator().manual_seed(0)
    ids = pipe.tokenizer([PROMPT] * batch + [""] * batch, padding="max_length", max_length=77,
                         truncation=True, return_tensors="pt").input_ids.to(device)
    hidden = pipe.text_encoder.config.hidden_size
    sample = torch.randn((2 * batch, 4, latent, latent), generator=generator).to(device, dtype)
    context = torch.randn((2 * batch, ids.shape[1], hidden), generator=generator).to(device, dtype)
    timestep = torch.full((2 * batch,), 601.0).to(device)
    latents = torch.randn((batch, 4, latent, latent), generator=generator).to(device, dtype)

    def call(fn):
        def run():
            with torch.inference_mode(), autocast():
                fn()
            _sync(torch, device)
        return run

    calls = {
        "text_encoder": call(lambda: pipe.text_encoder(ids, return_dict=False)),
        "unet": call(lambda: pipe.unet(sample, timestep, context, return_dict=False)),
        "vae_decoder": call(lambda: pipe.vae.decode(latents, return_dict=False)),
    }
    stages = {}
    for index, (name, run) in enumerate(calls.items()):
        progress(index, len(calls), f"{name}: run")
        with GpuMemoryMonitor() as gpu:
            first, steady = _timed(run, spec["repeats"])
        stages[name] = {**_stage(loads[name], first, steady), "provider": f"torch-{device}",
                        "peak_gpu_bytes": gpu.peak_bytes}
    return {"stages": stages, "peak_rss_bytes": peak_rss_bytes(), "load_peak_gpu_bytes": gpu_load.peak_bytes}


def diffusers_e2e(spec: dict) -> dict:
    torch, device, dtype, autocast = _torch_setup(spec)
    runs = []
    steps = spec["steps"]
    total = steps * spec["generations"]
    with GpuMemoryMonitor() as gpu:
        clock = time.perf_counter()
        pipe, loads = _load_diffusers(spec, torch, device, dtype)
        opened = time.perf_counter() - clock
        latent = spec["resolution"] // pipe.vae_scale_factor
        for generation in range(spec["generations"]):
            stamps = []

            def on_step(_pipe, step, _t, kwargs, g=generation):
                _sync(torch, device)
                stamps.append(time.perf_counter())
                progress(g * steps + step + 1, total, f"generation {g + 1}: step {step + 1}/{steps}")
                return kwargs

            generator = torch.Generator().manual_seed(0)
            noise = torch.randn((spec["batch"], 4, latent, latent), generator=generator).to(device, dtype)
            clock = time.perf_counter()
            with torch.inference_mode(), autocast():
                pipe([PROMPT] * spec["batch"], negative_prompt=[""] * spec["batch"], num_inference_steps=steps,
                     guidance_scale=7.5, height=spec["resolution"], width=spec["resolution"], latents=noise,
                     output_type="np", callback_on_step_end=on_step)
            _sync(torch, device)
            end = time.perf_counter()
            per_step = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else None
            runs.append({"total": end - clock, "unet_per_step": per_step,
                         "first_step": stamps[0] - clock if stamps else None,
                         "after_last_step": end - stamps[-1] if stamps else None})
            if generation == 0:
                peak_first = peak_rss_bytes()
    return {"open_s": opened, "loads": loads, "runs": runs, "peak_rss_bytes": peak_first,
            "peak_rss_all_bytes": peak_rss_bytes(), "peak_gpu_bytes": gpu.peak_bytes}


WORK = {("edgediff", "stages"): edgediff_stages, ("edgediff", "e2e"): edgediff_e2e,
        ("diffusers", "stages"): diffusers_stages, ("diffusers", "e2e"): diffusers_e2e}
WARNINGS: list[str] = []


def _warn(line: str) -> None:
    WARNINGS.append(line)
    print(f"warning {line}", flush=True)


def _limit_cpus(threads: int) -> None:
    """Both engines get the same cores: torch via set_num_threads, ONNX Runtime (whose default
    intra-op pool matches the cores it may use) via this process's CPU affinity."""
    import os

    try:
        allowed = sorted(os.sched_getaffinity(0))
    except AttributeError:
        return
    if threads < len(allowed):
        os.sched_setaffinity(0, allowed[:threads])


def main(argv: list[str]) -> int:
    import os

    spec = json.loads(Path(argv[0]).read_text())
    os.environ.update(spec.get("env", {}))  # provider settings (runtime/sessions.py), before any session
    _limit_cpus(spec["threads"])
    started = time.perf_counter()
    result = WORK[(spec["engine"], spec["phase"])](spec)
    result.update({"wall_s": time.perf_counter() - started, "warnings": WARNINGS})
    Path(argv[1]).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
