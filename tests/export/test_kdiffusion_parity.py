"""Parity with k-diffusion's ``sample_*`` functions, where A1111 and ComfyUI take their samplers from.

Both sides get the same denoiser (the analytic fake model of test_sampler_parity), the same sigmas
(the plan's) and the same noise: ours draws from a recording generator, k-diffusion's
``noise_sampler`` replays the draws in order (for dpmpp_sde and the SDE samplers instead of its
Brownian tree).  Final latents agree within 1e-5 relative.
"""
from __future__ import annotations

import importlib.util
import inspect
import sys
import types
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchsde")
pytest.importorskip("torchdiffeq")
pytest.importorskip("scipy")
if importlib.util.find_spec("k_diffusion") is None:
    pytest.skip("k-diffusion is not installed (pip install --no-deps k-diffusion)", allow_module_level=True)

from test_sampler_parity import CONFIGS, SHAPE, assert_close, run_ours  # noqa: E402

KDIFFUSION = {
    "euler": "sample_euler",
    "euler_a": "sample_euler_ancestral",
    "heun": "sample_heun",
    "dpm2": "sample_dpm_2",
    "dpm2_a": "sample_dpm_2_ancestral",
    "lms": "sample_lms",
    "dpmpp_2m": "sample_dpmpp_2m",
    "dpmpp_2s_a": "sample_dpmpp_2s_ancestral",
    "dpmpp_sde": "sample_dpmpp_sde",
    "dpmpp_2m_sde": "sample_dpmpp_2m_sde",
    "dpmpp_3m_sde": "sample_dpmpp_3m_sde",
}


def load_kdiffusion_sampling():
    """k_diffusion/sampling.py with its utils.py, without the package ``__init__`` (which imports
    clip and, through it, pkg_resources), as a private package.  utils.py imports torchvision for its
    image helpers only; where torchvision is absent a placeholder stands in while it loads."""
    root = Path(importlib.util.find_spec("k_diffusion").submodule_search_locations[0])
    package = types.ModuleType("_kdiffusion")
    package.__path__ = [str(root)]
    sys.modules["_kdiffusion"] = package
    placeholders = []
    if importlib.util.find_spec("torchvision") is None:
        placeholders = ["torchvision", "torchvision.transforms", "torchvision.transforms.functional"]
        for name in placeholders:
            sys.modules[name] = types.ModuleType(name)
    try:
        for name in ("utils", "sampling"):
            spec = importlib.util.spec_from_file_location(f"_kdiffusion.{name}", root / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
            setattr(package, name, module)
    finally:
        for name in placeholders:
            del sys.modules[name]
    return package.sampling


@pytest.fixture(scope="module")
def sampling():
    return load_kdiffusion_sampling()


def run_kdiffusion(sampling, name, plan, denoise, noise, draws):
    queue = list(draws)

    def noise_sampler(sigma, sigma_next):
        # dpm2_a also asks for noise on the step to sigma 0, where it is scaled by sigma_up = 0
        return torch.from_numpy(queue.pop(0)) if queue else torch.zeros(SHAPE)

    def model(x, sigma):
        return torch.from_numpy(denoise(x.numpy(), float(sigma[0])))

    fn = getattr(sampling, name)
    kwargs = {"noise_sampler": noise_sampler} if "noise_sampler" in inspect.signature(fn).parameters else {}
    x = torch.from_numpy(noise * np.float32(plan.init_noise_sigma))
    with torch.no_grad():
        out = fn(model, x, torch.from_numpy(plan.sigmas), disable=True, **kwargs)
    assert not queue, f"{len(queue)} noise draws left over"
    return out.numpy()


@pytest.mark.parametrize("steps", [1, 2, 4, 20])
@pytest.mark.parametrize("schedule", [None, "karras"])
@pytest.mark.parametrize("config_name", ["sd15_eps", "sd2_v"])
@pytest.mark.parametrize("sampler", sorted(KDIFFUSION))
def test_matches_kdiffusion(sampling, sampler, config_name, schedule, steps):
    from test_sampler_parity import make_denoiser

    config = CONFIGS[config_name]()
    noise = np.random.default_rng(42).standard_normal(SHAPE, dtype=np.float32)
    ours, draws, plan = run_ours(sampler, config, steps, noise, schedule=schedule, with_plan=True)
    denoise = make_denoiser(plan, config["prediction_type"])
    if steps == 1 and sampler in ("dpmpp_2m_sde", "dpmpp_3m_sde"):
        # k-diffusion's SDE multistep samplers read h before setting it when the first step goes to
        # sigma 0 (UnboundLocalError); the step to sigma 0 is the denoised latent, as in its own loop
        with pytest.raises(UnboundLocalError):
            run_kdiffusion(sampling, KDIFFUSION[sampler], plan, denoise, noise, draws)
        assert_close(ours, denoise(noise * np.float32(plan.init_noise_sigma), plan.sigmas[0]))
        return
    assert_close(ours, run_kdiffusion(sampling, KDIFFUSION[sampler], plan, denoise, noise, draws))


def test_the_comparison_can_fail(sampling):
    """Other noise for k-diffusion's SDE sampler: the results part."""
    from test_sampler_parity import make_denoiser

    config = CONFIGS["sd15_eps"]()
    noise = np.random.default_rng(42).standard_normal(SHAPE, dtype=np.float32)
    ours, draws, plan = run_ours("dpmpp_3m_sde", config, 4, noise, with_plan=True)
    other = [np.random.default_rng(7).standard_normal(SHAPE, dtype=np.float32) for _ in draws]
    ref = run_kdiffusion(sampling, "sample_dpmpp_3m_sde", plan, make_denoiser(plan, "epsilon"), noise, other)
    assert np.abs(ours - ref).max() > 1e-3 * np.abs(ref).max()
