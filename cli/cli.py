"""The ``edgediff`` command. It only parses arguments; the library does the work.

User errors print one line on stderr and exit 1; click's usage errors exit 2.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from edgediff import __version__
from edgediff.runtime.errors import EdgediffError

from .errors import user_errors

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class OneLineErrors(click.Group):
    """Usage errors too are one line on stderr (exit 2), without click's usage banner."""

    def main(self, *args, standalone_mode=True, **kwargs):
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.ClickException as error:
            click.echo(f"error: {error.format_message()}", err=True)
            sys.exit(error.exit_code)
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgediff")
def main():
    """Export Stable Diffusion to ONNX once; generate images without torch."""


@main.command()
@click.argument("source")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--precision", type=click.Choice(["fp16", "fp32", "int8"]), default="fp16", show_default=True,
              help="fp16 for GPUs; fp32 (or int8 U-Net weights) for the CPU.")
@click.option("--optimize-for", type=click.Choice(["cuda", "dml", "cpu", "none"]), default=None,
              help="Graph fusions for this target [default: cuda for fp16, cpu otherwise].")
@click.option("--allow-pickle", is_flag=True, help="Allow pickled .ckpt checkpoints (loading them runs code).")
@click.option("--prediction-type", type=click.Choice(["epsilon", "v_prediction"]), default=None,
              help="Override the model's prediction type (single-file SD 2.x 768 checkpoints need v_prediction).")
@click.option("--config", type=click.Path(path_type=Path), default=None,
              help="Diffusers config folder for a single-file checkpoint [default: the shipped sd15/sd21 "
                   "config its keys match].")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it already holds an exported model.")
@user_errors
def export(source, out, precision, optimize_for, allow_pickle, prediction_type, config, overwrite):
    """Export SOURCE (diffusers folder, .safetensors file, or hub id) into the model folder OUT."""
    try:
        from edgediff.exporter.export import export_model
    except ImportError as error:
        raise EdgediffError(f"the exporter needs the export extra ({error.name} is missing): "
                            "pip install 'edgediff[export]'") from None
    export_model(source, out, precision=precision, optimize_for=optimize_for, allow_pickle=allow_pickle,
                 prediction_type=prediction_type, config=config, overwrite=overwrite)


def _list_samplers(ctx, param, value):
    if value != "list":
        return value
    from edgediff.runtime.samplers import list_samplers

    for name, aliases, description in list_samplers():
        click.echo(f"{name:18} {description}" + (f"  (aliases: {', '.join(aliases)})" if aliases else ""))
    ctx.exit(0)


@main.command()
@click.argument("prompt", required=False)
@click.option("--model", type=click.Path(path_type=Path), default=None,
              help="Exported model folder [default: the shipped default model].")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Image file to write [default: edgediff-SEED.png].")
@click.option("--negative", default="", help="Negative prompt.")
@click.option("--steps", type=int, default=20, show_default=True)
@click.option("--guidance", type=float, default=7.5, show_default=True)
@click.option("--sampler", default="dpmpp_2m_karras", show_default=True, callback=_list_samplers,
              is_eager=True, help="Sampler name or alias; `--sampler list` prints them.")
@click.option("--schedule", default=None, help="Sigma schedule: karras, exponential, sgm_uniform, beta, ...")
@click.option("--seed", type=int, default=None, help="Random seed [default: a fresh one, printed].")
@click.option("--width", type=int, default=None, help="[default: the model's native size]")
@click.option("--height", type=int, default=None)
@click.option("--provider", type=click.Choice(["auto", "cuda", "tensorrt", "dml", "openvino", "cpu"]), default="auto",
              show_default=True)
@click.option("--memory", type=click.Choice(["low", "high"]), default="low", show_default=True,
              help="low: one graph in memory at a time (same speed for a single image).")
@click.option("--image", type=click.Path(path_type=Path), default=None,
              help="img2img: start from this picture (resized to --width/--height when given).")
@click.option("--strength", type=float, default=0.8, show_default=True,
              help="img2img: how much of the picture to repaint, in (0, 1].")
@user_errors
def generate(prompt, model, output, negative, steps, guidance, sampler, schedule, seed, width, height,
             provider, memory, image, strength):
    """Generate an image for PROMPT."""
    from edgediff.runtime import Pipeline

    if prompt is None:
        raise EdgediffError("give a PROMPT (or `--sampler list` to see the samplers)")
    if output is not None:
        _check_writable(output)
    picture = _open_image(image) if image is not None else None
    pipe = Pipeline.load(model, provider=provider, memory=memory)
    show = sys.stderr.isatty()

    def on_step(step, total, latents):
        if show:
            click.echo(f"\rstep {step}/{total}", err=True, nl=step == total)

    result = pipe(prompt, negative, steps=steps, guidance=guidance, sampler=sampler, schedule=schedule,
                  seed=seed, width=width, height=height, on_step=on_step, image=picture, strength=strength)
    output = output or Path(f"edgediff-{result.seed}.png")
    _check_writable(output)
    try:
        result.images[0].save(output)
    except OSError as error:
        raise EdgediffError(f"cannot write {output}: {error.strerror or error}") from None
    t = result.timings
    click.echo(f"wrote {output} (seed {result.seed}, {steps} steps, {pipe.provider}, "
               f"{t['total']:.2f} s: unet {t['unet']:.2f} s, decode {t['vae_decoder']:.2f} s)", err=True)


def _open_image(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as picture:
            return picture.convert("RGB")
    except FileNotFoundError:
        raise EdgediffError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as error:
        raise EdgediffError(f"cannot read image {path}: {error}") from None


def _check_writable(output: Path) -> None:
    if output.suffix.lower() not in IMAGE_SUFFIXES:
        raise EdgediffError(f"cannot write {output}: use one of {', '.join(IMAGE_SUFFIXES)}")
    folder = output.parent if str(output.parent) else Path(".")
    if not folder.is_dir():
        raise EdgediffError(f"cannot write {output}: folder {folder} does not exist")
    if output.is_dir() or not os.access(folder, os.W_OK) or (output.exists() and not os.access(output, os.W_OK)):
        raise EdgediffError(f"cannot write {output}: permission denied")


@main.command()
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option("--verify", is_flag=True, help="Also check every graph file against its sha256.")
@user_errors
def info(model, verify):
    """Show a model's graphs and precision, and the providers available here."""
    from edgediff.runtime.info import describe

    click.echo(describe(model, verify=verify))


def _register_bench():
    try:
        from edgediff.benchmarks.cli import bench
    except ImportError:
        return
    main.add_command(bench)


_register_bench()
