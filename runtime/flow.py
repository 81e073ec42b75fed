"""Flow-matching models (SD 3/3.5) as data: their sampling plan and skip-layer guidance.

The manifest says ``prediction_type: "flow"``; the model's velocity becomes the clean-latent
estimate in denoiser.py, the sigmas come from the scheduler config (schedules.py, ``flow_sigmas``),
and the samplers stay the sigma-space functions every model uses, as ComfyUI runs SD3 on its
k-diffusion samplers. ``euler`` is diffusers' ``FlowMatchEulerDiscreteScheduler`` step exactly:
with denoised = x - sigma * v, Euler's x + (x - denoised) / sigma * (sigma_next - sigma) is
x + (sigma_next - sigma) * v.
"""
from __future__ import annotations

import math

import numpy as np

from .denoiser import SkipLayerGuidance
from .errors import InputError
from .samplers import SAMPLERS, SamplerPlan, make_plan, resolve_sampler
from .schedules import SCHEDULES, FlowSchedule, flow_sigmas

# Deterministic samplers whose updates use only denoise(x, sigma) and the sigmas. The ancestral and
# SDE samplers add noise as x0 + sigma * noise and the DDIM family reads alphas_cumprod: on a flow
# model they need their rectified-flow forms (ComfyUI's *_RF samplers), which are not written yet.
FLOW_SAMPLERS = ("euler", "heun", "dpm2", "lms", "dpmpp_2m", "dpmpp_2m_karras", "dpmpp_3m", "unipc")
# Spacings that name the default flow walk (linear in t); karras/exponential/beta respace it.
_DEFAULT_SPACINGS = ("default", "none", "model", "simple", "sgm_uniform", "linspace", "trailing", "leading")


def make_model_plan(manifest, alphas_cumprod, sampler: str, steps: int, *, schedule: str | None,
                    strength: float, latent_size: tuple[int, int]) -> SamplerPlan:
    """The plan the manifest's prediction type walks: flow sigmas from the scheduler config, or the
    training schedule's (samplers/__init__.py ``make_plan``)."""
    if manifest.prediction_type == "flow":
        return make_flow_plan(sampler, manifest.scheduler, steps, schedule=schedule, strength=strength,
                              image_seq_len=image_seq_len(manifest.conditioning, *latent_size))
    return make_plan(sampler, alphas_cumprod, manifest.scheduler, steps, schedule=schedule, strength=strength)


def make_flow_plan(sampler: str, scheduler: dict, steps: int, *, image_seq_len: int,
                   schedule: str | None = None, strength: float = 1.0) -> SamplerPlan:
    """The plan of a flow model: ``steps`` sigmas of ``flow_sigmas`` then 0, timestep = sigma * T.

    ``strength`` < 1 (img2img) skips the first ``int(steps - steps * strength)`` sigmas, as
    diffusers' ``StableDiffusion3Img2ImgPipeline.get_timesteps`` (at least one step runs)."""
    name, implied = resolve_sampler(sampler)
    if name not in FLOW_SAMPLERS:
        raise InputError(f"sampler {name!r} is not available for flow-matching models (SD 3/3.5); "
                         f"use one of {', '.join(FLOW_SAMPLERS)}")
    schedule = _respacing(schedule if schedule is not None else implied)
    sigmas = flow_sigmas(scheduler, steps, image_seq_len, schedule)
    train = FlowSchedule(scheduler)
    t_start = min(int(max(steps - steps * strength, 0)), steps - 1)
    sigmas = np.append(sigmas, 0.0)[t_start:]
    # diffusers hands the transformer float32(sigma * T) with sigma already float32
    timesteps = (sigmas[:-1].astype(np.float32) * np.float32(train.num_train_timesteps)).astype(np.float64)
    return SamplerPlan(name, SAMPLERS[name].fn, sigmas, timesteps, float(sigmas[0]), train, schedule_name=schedule)


def _respacing(schedule: str | None) -> str | None:
    if schedule is None:
        return None
    key = schedule.strip().lower()
    if key in _DEFAULT_SPACINGS:
        return None
    if key in ("karras", "exponential", "beta"):
        return key
    raise InputError(f"unknown schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")


def skip_layer_guidance(setting, defaults: dict, layers: int) -> dict | None:
    """The skip-layer guidance a call asks for: None (off), or {layers, scale, start, stop}.

    ``setting``: True (the manifest's recommended values), False/None (off, diffusers' default), or a
    dict overriding some of them."""
    if setting is None or setting is False:
        return None
    if setting is not True and not isinstance(setting, dict):
        raise InputError(f"skip_layer_guidance must be True, False or a dict, not {setting!r}")
    if not defaults and setting is True:
        raise InputError("this model has no skip-layer guidance (only transformer models exported with it do)")
    chosen = {**defaults, **(setting if isinstance(setting, dict) else {})}
    unknown = set(chosen) - {"layers", "scale", "start", "stop"}
    if unknown:
        raise InputError(f"unknown skip_layer_guidance keys {sorted(unknown)}; expected layers, scale, start, stop")
    try:
        chosen = {"layers": sorted({int(i) for i in chosen["layers"]}), "scale": float(chosen["scale"]),
                  "start": float(chosen["start"]), "stop": float(chosen["stop"])}
    except (KeyError, TypeError, ValueError):
        raise InputError(f"skip_layer_guidance needs layers (whole numbers), scale, start and stop, not {setting!r}") from None
    if not chosen["layers"] or not all(0 <= i < layers for i in chosen["layers"]):
        raise InputError(f"skip_layer_guidance layers must be among the transformer's 0..{layers - 1}, "
                         f"not {chosen['layers']}")
    return chosen


def skip_guidance(chosen: dict, plan: SamplerPlan, cond: dict[str, np.ndarray]) -> SkipLayerGuidance:
    """Skip-layer guidance over ``plan``: active at step i when steps * start < i < steps * stop
    (diffusers' rule, by step index); a sigma between steps (second-order samplers) is active
    when it lies between the active steps' sigmas."""
    mask = np.zeros_like(cond["skip_layers"])
    mask[:, chosen["layers"]] = 1.0
    n = plan.steps
    active = [float(plan.sigmas[i]) for i in range(n) if n * chosen["start"] < i < n * chosen["stop"]]
    low, high = (min(active), max(active)) if active else (math.inf, -math.inf)
    return SkipLayerGuidance({**cond, "skip_layers": mask}, chosen["scale"],
                             lambda sigma: low <= float(sigma) <= high)


def image_seq_len(conditioning: dict, latent_height: int, latent_width: int) -> int:
    """Image tokens the transformer sees: latent patches of ``patch_size`` (dynamic shifting's input)."""
    patch = int(conditioning.get("patch_size", 1))
    return (latent_height // patch) * (latent_width // patch)


def skip_inputs(unet_inputs: dict, batch: int) -> dict[str, np.ndarray]:
    """A transformer exported with a skip mask runs every block unless told otherwise: zeros."""
    spec = unet_inputs.get("skip_layers")
    return {} if spec is None else {"skip_layers": np.zeros((batch, spec.shape[1]), np.float32)}

