"""noise="torch-cpu": torch.randn's values without torch, and the image diffusers draws for a seed."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgediff.runtime.noise import TorchCpuGenerator  # noqa: E402
from torch_blocker import BLOCK_TORCH  # noqa: E402

# torch draws blocks of 16 with the AVX2 kernel on x86-64; elsewhere with the C library's logf/cosf.
needs_avx2_kernel = pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
                                       reason="torch runs its scalar Box-Muller kernel on this CPU")

SEEDS = [0, 1, 7, 2**31 - 1, 2**32 + 5, 2**63 + 12345, 2**64 - 1]
# sizes below, at and above torch's 16-element threshold, tails of every length, latent shapes
SHAPES = [(1,), (3,), (15,), (16,), (17,), (2, 3), (31,), (48,), (1, 4, 8, 8), (1, 4, 64, 64), (2, 4, 96, 64)]


@needs_avx2_kernel
@pytest.mark.parametrize("seed", SEEDS)
def test_bit_for_bit_with_torch_randn(seed):
    """Every shape drawn one after another from one generator: 77 (seed, shape) draws in all."""
    reference, ours = torch.Generator().manual_seed(seed), TorchCpuGenerator(seed)
    for shape in SHAPES + [(5,), (1, 4, 128, 128)]:
        expected = torch.randn(shape, generator=reference).numpy()
        actual = ours.standard_normal(shape, dtype=np.float32)
        assert actual.dtype == np.float32 and actual.shape == expected.shape
        assert np.array_equal(actual.view(np.uint32), expected.view(np.uint32)), (seed, shape)


def test_seeds_that_differ_in_high_bits_draw_alike_as_in_torch():
    """torch seeds its Mersenne Twister with the low 32 bits of the seed."""
    a = TorchCpuGenerator(5).standard_normal((4, 8))
    assert np.array_equal(a, TorchCpuGenerator(2**32 + 5).standard_normal((4, 8)))
    assert torch.equal(torch.randn((4, 8), generator=torch.Generator().manual_seed(5)),
                       torch.randn((4, 8), generator=torch.Generator().manual_seed(2**32 + 5)))
    assert not np.array_equal(a, TorchCpuGenerator(6).standard_normal((4, 8)))


@needs_avx2_kernel
def test_same_seed_same_image_as_diffusers(tiny_sources, tiny_exports, tmp_path):
    """diffusers with generator=torch.Generator().manual_seed(s) and edgediff (torch blocked) with
    seed=s, noise="torch-cpu": the same picture with euler (the starting noise) and euler_a (the
    starting noise and the noise of every step, drawn in diffusers' order)."""
    import diffusers

    from test_sampler_parity import COUNTERPARTS

    seed, steps, prompt, samplers = 2**32 + 77, 6, "a red circle on a white background", ("euler", "euler_a")
    out = tmp_path / "pixels.npz"
    script = BLOCK_TORCH + textwrap.dedent(f"""
        import numpy as np
        from edgediff.runtime import Pipeline
        pipe = Pipeline.load({str(tiny_exports["sd1", "fp32"])!r}, provider="cpu")
        np.savez({str(out)!r}, **{{s: pipe({prompt!r}, steps={steps}, sampler=s, seed={seed}, noise="torch-cpu").pixels
                                  for s in {samplers!r}}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    actual = np.load(out)

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sources["sd1"], safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    config = pipe.scheduler.config
    for sampler in samplers:
        pipe.scheduler = getattr(diffusers, COUNTERPARTS[sampler][0]).from_config(config)
        images = {}
        for s in (seed, seed + 1):
            with torch.no_grad():
                images[s] = pipe(prompt, num_inference_steps=steps, guidance_scale=7.5, output_type="np",
                                 generator=torch.Generator().manual_seed(s)).images
        assert np.abs(actual[sampler] - images[seed]).max() < 2e-3, sampler
        assert np.abs(actual[sampler] - images[seed + 1]).max() > 2e-2, sampler  # the seed decides the picture


def test_unknown_noise_source_is_a_user_error(tiny_exports):
    from edgediff.runtime import EdgediffError, Pipeline

    pipe = Pipeline.load(tiny_exports["sd1", "fp32"], provider="cpu")
    with pytest.raises(EdgediffError, match="unknown noise source 'cuda'; expected one of numpy, torch-cpu"):
        pipe("a cat", steps=2, seed=1, noise="cuda")


def test_cli_noise_option(tiny_exports, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from edgediff.cli import main
    from edgediff.runtime import Pipeline

    model, out = tiny_exports["sd1", "fp32"], tmp_path / "out.png"
    args = ["generate", "a cat", "--model", str(model), "--steps", "2", "--seed", "3", "-o", str(out)]
    result = CliRunner().invoke(main, args + ["--noise", "torch-cpu"])
    assert result.exit_code == 0, result.output
    expected = Pipeline.load(model, provider="cpu")("a cat", steps=2, seed=3, noise="torch-cpu").images[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))
    bad = CliRunner().invoke(main, args + ["--noise", "cuda"])
    assert bad.exit_code != 0 and "numpy" in bad.output and "torch-cpu" in bad.output
