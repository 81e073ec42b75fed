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
    from edgediff.runtime import Pipeline
    from edgediff.runtime.sessions import Sessions

    pipe = Pipeline.load(spec["model_dir"], provider=spec["provider"], memory="low", warn=_warn)
    m = pipe.manifest
    feeds = edgediff_feeds(pipe, spec["batch"], spec["resolution"])
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


def edgediff_feeds(pipe, batch: int, size: int) -> dict[str, dict]:
    """One input set per stage, shaped as a guided generation feeds it: every text encoder the
    manifest lists (prompt and negative), the U-Net at batch 2 x ``batch`` with whatever extra
    conditioning its graph declares (SDXL's text_embeds/time_ids, an LCM timestep_cond), the decoder."""
    import numpy as np

    m = pipe.manifest
    latent = size // m.vae_scale_factor
    rng = np.random.default_rng(0)
    feeds = {encoder["graph"]: {"input_ids": tokenizer([PROMPT] * batch + [""] * batch)}
             for encoder, tokenizer in zip(m.text_encoders, pipe.tokenizers)}
    from .unet_step import _context

    tokens = _context(m)  # 77 per chunk; SD3: CLIP's 77 then T5's 256 (zeros when T5 is off)
    known = {"sample": (2 * batch, pipe._unet_channels(), latent, latent), "timestep": (2 * batch,)}
    unet = {}
    for spec in m.graphs["unet"].inputs:
        shape = known.get(spec.name) or tuple(
            2 * batch if axis == 0 else tokens if isinstance(dim, str) else dim for axis, dim in enumerate(spec.shape))
        if spec.name == "timestep":
            unet[spec.name] = np.full(shape, 601.0, dtype=spec.dtype)
        elif spec.name == "skip_layers":  # SD3: no skip-layer guidance
            unet[spec.name] = np.zeros(shape, dtype=spec.dtype)
        elif spec.name == "time_ids":  # original/target size and crop, as the runtime fills them
            unet[spec.name] = np.tile(np.array([size, size, 0, 0, size, size][:shape[-1]], dtype=spec.dtype),
                                      (shape[0], 1))
        else:
            unet[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    feeds["unet"] = unet
    decoder = m.graphs["vae_decoder"].inputs[0]
    feeds["vae_decoder"] = {decoder.name: rng.standard_normal((batch, m.latent_channels, latent, latent))
                            .astype(decoder.dtype)}
    return feeds


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
# Left out of diffusers' pipeline as edgediff's bench leaves them out of its exports (BENCH_GRAPHS):
# SD 3.5's T5-XXL (19 GB in fp32), so both sides run with T5 off (zeros in its place).
DIFFUSERS_LEFT_OUT = ("text_encoder_3", "tokenizer_3")
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
    """The pipeline class model_index.json names, each weighted component loaded (and timed) apart."""
    import importlib

    import diffusers
    from diffusers import DPMSolverMultistepScheduler

    folder = Path(spec["model_dir"])
    index = json.loads((folder / "model_index.json").read_text())
    loads, parts = {}, {}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or None in entry:
            continue
        if name in DIFFUSERS_LEFT_OUT:
            parts[name] = None
            continue
        cls = getattr(importlib.import_module(entry[0]), entry[1])
        if not issubclass(cls, torch.nn.Module):
            if not name.startswith("scheduler"):
                parts[name] = cls.from_pretrained(folder / name)  # tokenizers
            continue
        clock = time.perf_counter()
        dtype_arg = {"torch_dtype": dtype} if hasattr(cls, "load_config") else {"dtype": dtype}
        parts[name] = cls.from_pretrained(folder / name, **dtype_arg).eval()
        if spec.get("memory") != "offload":
            parts[name] = parts[name].to(device)
        _sync(torch, device)
        loads["vae_decoder" if name == "vae" else name] = time.perf_counter() - clock
    if device == "cuda":  # SDPA is diffusers' default attention processor on torch 2
        from diffusers.models.attention_processor import AttnProcessor2_0

        _denoiser(parts).set_attn_processor(AttnProcessor2_0())
    # The same sampler as edgediff's default (DPM++ 2M Karras): one U-Net call per step on both sides;
    # a flow-matching model (SD3) keeps its own Euler, as edgediff runs it.
    scheduler = (None if index["scheduler"][1].startswith("FlowMatch") else
                 DPMSolverMultistepScheduler.from_pretrained(folder / "scheduler", use_karras_sigmas=True))
    if scheduler is None:
        scheduler = getattr(diffusers, index["scheduler"][1]).from_pretrained(folder / "scheduler")
    # from_pretrained with every component given loads nothing more, and reads the pipeline's own
    # settings (SDXL's force_zeros_for_empty_prompt) from model_index.json.
    pipe = getattr(diffusers, index["_class_name"]).from_pretrained(folder, scheduler=scheduler, **parts)
    if spec.get("memory") == "offload":  # each module on the GPU only while it runs
        pipe.enable_model_cpu_offload()
    pipe.set_progress_bar_config(disable=True)
    return pipe, loads


def diffusers_stages(spec: dict) -> dict:
    torch, device, dtype, autocast = _torch_setup(spec)
    with GpuMemoryMonitor() as gpu_load:
        pipe, loads = _load_diffusers(spec, torch, device, dtype)
    batch, size = spec["batch"], spec["resolution"]
    latent = size // pipe.vae_scale_factor
    generator = torch.Generator().manual_seed(0)
    texts = [PROMPT] * batch + [""] * batch
    encoders = [(name, getattr(pipe, name), getattr(pipe, name.replace("text_encoder", "tokenizer")))
                for name in ("text_encoder", "text_encoder_2") if getattr(pipe, name, None) is not None]
    ids = {name: tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                           return_tensors="pt").input_ids.to(device) for name, _, tokenizer in encoders}
    if getattr(pipe, "transformer", None) is not None:
        return _sd3_stages(spec, pipe, loads, encoders, ids, torch, device, dtype, call_in(torch, device, autocast),
                           gpu_load)
    unet = pipe.unet.config
    channels = unet.in_channels
    sample = torch.randn((2 * batch, channels, latent, latent), generator=generator).to(device, dtype)
    context = torch.randn((2 * batch, next(iter(ids.values())).shape[1], unet.cross_attention_dim),
                          generator=generator).to(device, dtype)
    timestep = torch.full((2 * batch,), 601.0).to(device)
    extra = {}
    if unet.addition_embed_type == "text_time":  # SDXL: pooled text embedding and size ids
        pooled = encoders[-1][1].config.projection_dim  # the projecting (last) text encoder's
        count = (unet.projection_class_embeddings_input_dim - pooled) // unet.addition_time_embed_dim
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.randn((2 * batch, pooled), generator=generator).to(device, dtype),
            "time_ids": torch.tensor([[size, size, 0, 0, size, size][:count]] * 2 * batch).to(device, dtype)}
    if unet.time_cond_proj_dim:  # LCM's guidance embedding
        extra["timestep_cond"] = torch.randn((2 * batch, unet.time_cond_proj_dim), generator=generator).to(device, dtype)
    latents = torch.randn((batch, pipe.vae.config.latent_channels, latent, latent), generator=generator).to(device, dtype)

    call = call_in(torch, device, autocast)
    # CLIP's hidden states for every layer, as the pipelines ask for them (they take the penultimate).
    calls = {name: call(lambda module=module, name=name: module(ids[name], output_hidden_states=True, return_dict=False))
             for name, module, _ in encoders}
    calls["unet"] = call(lambda: pipe.unet(sample, timestep, context, return_dict=False, **extra))
    calls["vae_decoder"] = call(lambda: pipe.vae.decode(latents, return_dict=False))
    return _run_stages(calls, loads, spec, device, gpu_load)


def call_in(torch, device, autocast):
    def call(fn):
        def run():
            with torch.inference_mode(), autocast():
                fn()
            _sync(torch, device)
        return run
    return call


def _sd3_stages(spec, pipe, loads, encoders, ids, torch, device, dtype, call, gpu_load) -> dict:
    """SD3's stages: both CLIPs, the transformer on one guided step's inputs (CLIP's 77 tokens and T5's
    256, as zeros with T5 off), the decoder."""
    batch, config = spec["batch"], pipe.transformer.config
    latent = spec["resolution"] // pipe.vae_scale_factor
    generator = torch.Generator().manual_seed(0)
    tokens = next(iter(ids.values())).shape[1] + 256
    sample = torch.randn((2 * batch, config.in_channels, latent, latent), generator=generator).to(device, dtype)
    context = torch.randn((2 * batch, tokens, config.joint_attention_dim), generator=generator).to(device, dtype)
    pooled = torch.randn((2 * batch, config.pooled_projection_dim), generator=generator).to(device, dtype)
    timestep = torch.full((2 * batch,), 601.0).to(device)
    latents = torch.randn((batch, pipe.vae.config.latent_channels, latent, latent), generator=generator).to(device, dtype)
    calls = {name: call(lambda module=module, name=name: module(ids[name], output_hidden_states=True, return_dict=False))
             for name, module, _ in encoders}
    calls["unet"] = call(lambda: pipe.transformer(hidden_states=sample, timestep=timestep, encoder_hidden_states=context,
                                                  pooled_projections=pooled, return_dict=False))
    calls["vae_decoder"] = call(lambda: pipe.vae.decode(latents, return_dict=False))
    loads["unet"] = loads.get("transformer", 0.0)
    return _run_stages(calls, loads, spec, device, gpu_load)


def _run_stages(calls, loads, spec, device, gpu_load) -> dict:
    stages = {}
    for index, (name, run) in enumerate(calls.items()):
        progress(index, len(calls), f"{name}: run")
        with GpuMemoryMonitor() as gpu:
            first, steady = _timed(run, spec["repeats"])
        stages[name] = {**_stage(loads[name], first, steady), "provider": f"torch-{device}",
                        "peak_gpu_bytes": gpu.peak_bytes}
    return {"stages": stages, "peak_rss_bytes": peak_rss_bytes(),
            "load_peak_gpu_bytes": gpu_load.peak_bytes if gpu_load else None}


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
            noise = torch.randn((spec["batch"], _denoiser(pipe.components).config.in_channels, latent, latent),
                                generator=generator).to(device, dtype)
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


def _denoiser(parts: dict):
    """The U-Net, or SD3's transformer."""
    return parts["unet"] if parts.get("unet") is not None else parts["transformer"]


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
