"""``edgediff bench``: parses arguments and calls the library (benchmarks.runner / benchmarks.report)."""
from __future__ import annotations

from pathlib import Path

import click

from edgediff.errors import user_errors
from edgediff.runtime.errors import EdgediffError

from .runner import ALL_PROVIDERS, MEMORY_MODES, PRECISIONS


@click.command()
@click.option("--model", default="sd15", show_default=True,
              help="sd15, sd21, sdxl, sd35m (shipped configs) or a folder with a diffusers config (no weights needed).")
@click.option("--resolution", type=int, default=256, show_default=True, help="Image side in pixels.")
@click.option("--steps", type=int, default=20, show_default=True, help="Sampler steps of the end-to-end runs.")
@click.option("--batch", type=int, default=1, show_default=True, help="Images per prompt batch (U-Net sees 2x).")
@click.option("--provider", "providers", multiple=True, type=click.Choice(ALL_PROVIDERS),
              help="Provider(s) to measure (repeatable) [default: all; absent GPU ones are listed unmeasured].")
@click.option("--precision", "precisions", multiple=True, type=click.Choice(PRECISIONS),
              help="Export precision(s) (repeatable) [default: fp32 and int8 on the CPU, fp16 on GPUs].")
@click.option("--memory", "memory", multiple=True, type=click.Choice(MEMORY_MODES),
              help="Runtime memory mode(s) (repeatable) [default: low and high].")
@click.option("--repeats", type=int, default=3, show_default=True, help="Steady-state runs per stage.")
@click.option("--threads", type=int, default=None, help="CPU threads for both engines [default: all cores].")
@click.option("--no-diffusers", is_flag=True, help="Skip the diffusers/PyTorch side.")
@click.option("--no-bf16", is_flag=True, help="Skip diffusers with bf16 autocast on the CPU.")
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where built models and exports are cached [default: ~/.cache/edgediff/bench].")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("bench-results"),
              show_default=True, help="Folder for bench.json, bench.md and bench.png.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
@click.option("--oneshot", type=int, default=0, show_default=True,
              help="Rounds of one-shot CLI rows: fresh `edgediff generate` processes (first and cached run) "
                   "against fresh diffusers processes, loading included.")
@click.option("--peers", is_flag=True,
              help="The peers row instead: the same model through edgediff, diffusers, optimum-intel (OpenVINO), "
                   "optimum (ONNX Runtime) and stable-diffusion.cpp, Euler steps, each in its own process.")
@click.option("--peer-python", default=None, envvar="EDGEDIFF_PEER_PYTHON",
              help="With --peers: the Python whose environment has the peers installed [default: this one].")
@user_errors
def bench(model, resolution, steps, batch, providers, precisions, memory, repeats, threads, no_diffusers,
          no_bf16, cache, out, seed, oneshot, peers, peer_python):
    """Latency and memory per stage and provider, side by side with diffusers, on full-size architectures."""
    if peers:
        return _peers(model, resolution, steps, threads, cache, out, peer_python)
    from .report import write_outputs
    from .runner import BenchParams, run_benchmark

    if out.exists() and not out.is_dir():
        raise EdgediffError(f"--out {out} is a file; give a folder")
    if oneshot < 0:
        raise EdgediffError(f"--oneshot must be 0 or more, not {oneshot}")
    if threads is not None and threads < 1:
        raise EdgediffError(f"--threads must be at least 1, not {threads}")
    params = BenchParams(model=model, resolution=resolution, steps=steps, batch=batch,
                         providers=tuple(providers) or None, precisions=tuple(precisions) or None,
                         memory=tuple(memory) or MEMORY_MODES, repeats=repeats, threads=threads,
                         seed=seed, oneshot=oneshot, diffusers=not no_diffusers, diffusers_bf16=not no_bf16, out=out,
                         **({"cache": cache} if cache is not None else {}))
    params.check()
    document = run_benchmark(params)
    paths = write_outputs(document, out)
    click.echo(paths["markdown"].read_text())
    click.echo(f"wrote {paths['json']}, {paths['markdown']}, {paths['png']}", err=True)


def _peers(model, resolution, steps, threads, cache, out, peer_python) -> None:
    from .models import config_source
    from .peers import PeersParams, run, write_outputs

    config_source(model)  # one line for an unknown model
    if out.exists() and not out.is_dir():
        raise EdgediffError(f"--out {out} is a file; give a folder")
    if resolution <= 0 or resolution % 8 or steps < 1:
        raise EdgediffError("--resolution must be a positive multiple of 8 and --steps at least 1")
    params = PeersParams(model=model, resolution=resolution, steps=steps, threads=threads, cache=cache, out=out,
                         peer_python=peer_python)
    paths = write_outputs(run(params), out)
    click.echo(paths["markdown"].read_text())
    click.echo(f"wrote {paths['json']}, {paths['markdown']}", err=True)
