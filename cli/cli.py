"""The ``edgediff`` command. It only parses arguments; the library does the work.

User errors print one line on stderr and exit 1; click's usage errors exit 2.
"""
from __future__ import annotations

import dataclasses
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
@click.option("--precision", type=click.Choice(["fp16", "fp32", "int8", "int4"]), default=None,
              help="fp16 for GPUs; fp32 (or int8 U-Net weights) for the CPU; int4: 4-bit U-Net MatMul weights "
                   "(small GPUs, SDXL) [default: with --optimize-for, fp16; without either flag, what this "
                   "machine runs best, printed first].")
@click.option("--optimize-for", type=click.Choice(["cuda", "dml", "cpu", "none"]), default=None,
              help="Graph fusions for this target [default: cuda for fp16, cpu otherwise; without either "
                   "flag, this machine's best provider].")
@click.option("--allow-pickle", is_flag=True, help="Allow pickled .ckpt checkpoints (loading them runs code).")
@click.option("--prediction-type", type=click.Choice(["epsilon", "v_prediction"]), default=None,
              help="Override the model's prediction type (single-file SD 2.x 768 checkpoints need v_prediction).")
@click.option("--config", type=click.Path(path_type=Path), default=None,
              help="Diffusers config folder for a single-file checkpoint [default: the shipped config its "
                   "keys match: sd15, sd21, sdxl, sd35m]; for a single-file ControlNet, its config.json (or "
                   "folder) [default: read from its shapes].")
@click.option("--text-encoders", type=click.Path(path_type=Path), default=None,
              help="SD 3/3.5 single file without its text encoders: a diffusers SD3 folder to take them from "
                   "(text_encoder, text_encoder_2, and text_encoder_3 for T5).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it already holds an exported model.")
@user_errors
def export(source, out, precision, optimize_for, allow_pickle, prediction_type, config, overwrite, text_encoders):
    """Export SOURCE (diffusers folder, .safetensors file, or hub id) into the model folder OUT; an ESRGAN
    weights file (.safetensors, or .pth with --allow-pickle) becomes a pixel upscaler for --hires-upscaler."""
    try:
        from edgediff.exporter.export import export_model
    except ImportError as error:
        raise EdgediffError(f"the exporter needs the export extra ({error.name} is missing): "
                            "pip install 'edgediff[export]'") from None
    export_model(source, out, precision=precision, optimize_for=optimize_for, allow_pickle=allow_pickle,
                 prediction_type=prediction_type, config=config, overwrite=overwrite, text_encoders=text_encoders)


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
@click.option("--seed", type=int, default=None,
              help="Random seed in [0, 2**64 - 1]; negative (e.g. -1) or none: a fresh one, printed.")
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
@click.option("--noise", type=click.Choice(["numpy", "torch-cpu"]), default="numpy", show_default=True,
              help="Noise generator the seed seeds; torch-cpu: the same noise as torch.randn on the CPU "
                   "(diffusers, ComfyUI).")
@click.option("--no-memory-check", is_flag=True,
              help="Start even when the estimated peak memory exceeds the memory free.")
@click.option("--no-metadata", is_flag=True, help="Write no A1111 `parameters` text into the image.")
@click.option("--from-png", type=click.Path(path_type=Path), default=None,
              help="Take prompt, negative, seed, steps, sampler, schedule, CFG, size and prompt syntax from an image's "
                   "A1111 parameters; flags given explicitly override them.")
@click.option("--mask", type=click.Path(path_type=Path), default=None,
              help="Inpainting (with --image): white repaints, black keeps; resized to the image.")
@click.option("--mask-blur", type=float, default=0.0, show_default=True,
              help="Gaussian blur of the mask in pixels (A1111's); the result is blended over the picture through it.")
@click.option("--mask-invert", is_flag=True, help="Repaint the black part of the mask instead.")
@click.option("-n", "--n-images", type=click.IntRange(min=1), default=1, show_default=True,
              help="Images per prompt, with seeds SEED, SEED+1, ...; -o NAME.png writes NAME-0001.png, ...")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="Images per model call (same images, more memory).")
@click.option("--lora", "loras", multiple=True, metavar="FILE[:WEIGHT]",
              help="Apply a LoRA (.safetensors) with this weight [default 1]; repeatable.")
@click.option("--lora-dir", type=click.Path(path_type=Path), default=None,
              help="Folder where <lora:name:weight> tags in the prompt are looked up.")
@click.option("--embedding", "embeddings", multiple=True, type=click.Path(path_type=Path),
              help="Textual-inversion embedding, used by name in the prompt; repeatable.")
@click.option("--embedding-dir", type=click.Path(path_type=Path), default=None,
              help="Load every embedding in this folder.")
@click.option("--allow-pickle", is_flag=True,
              help="Allow pickled (torch zip) LoRA/embedding files; only tensors are unpickled.")
@click.option("--prompt-syntax", default="a1111", show_default=True, metavar="a1111|plain",
              help="a1111: (emphasis:1.2), [less], BREAK and prompts past 75 tokens; plain: the prompt read "
                   "literally and cut at 75 tokens, as diffusers reads it.")
@click.option("--vae-tiling/--no-vae-tiling", default=None,
              help="Decode (and encode) the VAE in overlapping tiles, so large images need the memory of one "
                   "tile [default: automatic above the size the model states].")
@click.option("--control", "controls", multiple=True, metavar="FOLDER:IMAGE[:SCALE]",
              help="A ControlNet unit: an exported ControlNet folder, its control image and weight [1.0]; repeatable.")
@click.option("--control-preprocess", type=click.Choice(["none", "canny", "depth"]), default="none",
              show_default=True, help="Turn each control image into its hint first (canny: OpenCV edges).")
@click.option("--control-start", type=float, default=0.0, show_default=True,
              help="Fraction of the steps after which the ControlNets start acting.")
@click.option("--control-end", type=float, default=1.0, show_default=True,
              help="Fraction of the steps after which they stop.")
@click.option("--control-guess-mode", is_flag=True,
              help="ControlNets see the conditional half only, weighted 0.1 to 1.0 (diffusers' guess mode).")
@click.option("--control-preprocess-model", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="The exported depth model (edgediff export DEPTH_SRC DIR) for --control-preprocess depth.")
@click.option("--t5", type=click.Choice(["on", "off"]), default=None,
              help="SD 3/3.5: run the T5 text encoder, or feed zeros in its place [default: on where exported].")
@click.option("--slg/--no-slg", default=None,
              help="SD 3.5: skip-layer guidance with the model's recommended layers [default: off, as diffusers].")
@click.option("--hires-scale", type=float, default=None,
              help="Hires fix (A1111's): generate at the size, upscale by this factor [default 2 when another "
                   "--hires-* flag is given], then img2img at the upscaled size.")
@click.option("--hires-steps", type=int, default=None, help="Hires fix: second-pass steps [default: --steps].")
@click.option("--hires-strength", type=float, default=None,
              help="Hires fix: second-pass denoising strength in (0, 1] [default 0.7].")
@click.option("--hires-upscaler", default=None, metavar="NAME|FOLDER",
              help="Hires fix: latent (bilinear), latent-antialiased, latent-bicubic, latent-bicubic-antialiased, "
                   "latent-nearest, latent-nearest-exact, the pixel upscalers lanczos, nearest (A1111's labels "
                   "too), or an exported ESRGAN folder (edgediff export ESRGAN.safetensors FOLDER) [default: latent].")
@click.option("--image-guidance", type=float, default=None,
              help="InstructPix2Pix models (with --image): how closely the edit keeps to the picture [default 1.5].")
@click.pass_context
@user_errors
# Long because it only translates click options into GenerationRequest fields, one line each; no rule lives here.
def generate(ctx, prompt, model, output, negative, steps, guidance, sampler, schedule, seed, width, height,
             provider, memory, image, strength, noise, no_memory_check, no_metadata, from_png, mask, mask_blur,
             mask_invert, n_images, batch_size, loras, lora_dir, embeddings, embedding_dir,
             allow_pickle, prompt_syntax, vae_tiling, controls, control_preprocess, control_start, control_end,
             control_guess_mode, control_preprocess_model, t5, slg, hires_scale, hires_steps, hires_strength,
             hires_upscaler, image_guidance):
    """Generate an image for PROMPT."""
    from edgediff.runtime import Pipeline
    from edgediff.runtime import metadata
    from edgediff.runtime.arguments import resolve_seed
    from edgediff.runtime.controlnet import control_flag
    from edgediff.runtime.images import open_image
    from edgediff.runtime.request import GenerationRequest

    hires = {name: value for name, value in (("scale", hires_scale), ("steps", hires_steps),
                                             ("strength", hires_strength), ("upscaler", hires_upscaler))
             if value is not None}
    if from_png is not None:
        given = {name for name in ctx.params if ctx.get_parameter_source(name) not in
                 (click.core.ParameterSource.DEFAULT, None)}
        if "sampler" in given:  # a sampler chosen by hand brings its own schedule
            given.add("schedule")
        found = _read_parameters(from_png)
        found["negative"] = found.pop("negative_prompt", negative)
        values = dict(prompt=prompt, negative=negative, steps=steps, guidance=guidance, sampler=sampler,
                      schedule=schedule, seed=seed, width=width, height=height, prompt_syntax=prompt_syntax,
                      image_guidance=image_guidance)
        values.update((name, value) for name, value in found.items() if name in values and name not in given)
        (prompt, negative, steps, guidance, sampler, schedule, seed, width, height, prompt_syntax,
         image_guidance) = values.values()
        hires = {**found.get("hires", {}), **hires}  # flags given override the image's
    if prompt is None:
        raise EdgediffError("give a PROMPT (or `--sampler list` to see the samplers)")
    if output is not None:
        _check_writable(output)
    random = seed is None or seed < 0
    seed = resolve_seed(seed)
    request = GenerationRequest(
        prompt, negative, steps=steps, guidance=guidance, sampler=sampler, schedule=schedule, seed=seed,
        width=width, height=height, image=open_image(image) if image is not None else None, strength=strength,
        mask=_open_mask(mask) if mask is not None else None, mask_blur=mask_blur, mask_invert=mask_invert,
        noise=noise, check_memory=not no_memory_check, vae_tiling=vae_tiling, prompt_syntax=prompt_syntax,
        t5=t5, skip_layer_guidance=slg,
        hires=hires or None, image_guidance=image_guidance,
        loras=[_lora_spec(text) for text in loras], lora_dir=lora_dir, allow_pickle=allow_pickle,
        embeddings=[*embeddings, *_embedding_files(embedding_dir, allow_pickle)],
        control=[control_flag(text, preprocess=control_preprocess, start=control_start, end=control_end,
                              guess_mode=control_guess_mode, preprocess_model=control_preprocess_model)
                 for text in controls] or None)
    request.check_fields()  # bad values are refused before the model loads
    pipe = Pipeline.load(model, provider=provider, memory=memory)
    if pipe.manifest.upscale:
        raise EdgediffError(f"{model} is an x4 upscaler model: use `edgediff upscale IMAGE --model {model} -o OUT`")
    show = sys.stderr.isatty()

    def on_step(step, total, latents):
        if show:
            click.echo(f"\rstep {step}/{total}", err=True, nl=step == total)

    identity = metadata.model_identity(pipe.model_dir, pipe.manifest)
    for first in range(0, n_images, batch_size):
        seeds = [seed + i for i in range(first, min(first + batch_size, n_images))]
        result = pipe.generate(dataclasses.replace(
            request, prompt=[prompt] * len(seeds), negative_prompt=[negative] * len(seeds),
            seed=seeds[0] if len(seeds) == 1 else seeds, on_step=on_step))
        for index, image_seed in enumerate(seeds):
            number = first + index + 1
            path = (output.with_name(f"{output.stem}-{number:04d}{output.suffix}") if output and n_images > 1
                    else output or Path(f"edgediff-{image_seed}.png"))
            _check_writable(path)
            text = None if no_metadata else metadata.result_infotext(result, index, identity)
            try:
                metadata.save_image(result.images[index], path, text)
            except (OSError, ValueError, KeyError) as error:  # Pillow: ValueError/KeyError for formats it lacks
                raise EdgediffError(f"cannot write {path}: {getattr(error, 'strerror', None) or error}") from None
            t = result.timings
            click.echo(f"wrote {path} (seed {image_seed}, {steps} steps, {pipe.provider}, {t['total']:.2f} s: "
                       f"unet {t.get('unet', 0):.2f} s, decode {t.get('vae_decoder', 0):.2f} s)", err=True)
    if random:
        click.echo(f"seed: {seed}", err=True)


@main.command()
@click.argument("image", type=click.Path(path_type=Path))
@click.option("--model", required=True, type=click.Path(path_type=Path), help="An exported x4 upscaler folder.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="The upscaled image (4x).")
@click.option("--prompt", default="", help="What the picture shows (guides the added detail).")
@click.option("--negative", default="", help="Negative prompt.")
@click.option("--noise-level", type=int, default=20, show_default=True,
              help="Noise added to the picture first (0 to the model's max_noise_level, 350): more adds more detail.")
@click.option("--steps", type=int, default=20, show_default=True)
@click.option("--guidance", type=float, default=9.0, show_default=True)
@click.option("--sampler", default="ddim", show_default=True)
@click.option("--seed", type=int, default=None, help="[default: random, printed]")
@click.option("--noise", type=click.Choice(["numpy", "torch-cpu"]), default="numpy", show_default=True)
@click.option("--provider", type=click.Choice(["auto", "cuda", "tensorrt", "dml", "openvino", "cpu"]), default="auto",
              show_default=True)
@click.option("--memory", type=click.Choice(["low", "high"]), default="low", show_default=True)
@click.option("--vae-tiling/--no-vae-tiling", default=None, help="[default: tiled above the VAE's tile area]")
@click.option("--no-memory-check", is_flag=True, help="Try even when the estimate exceeds the free memory.")
@click.option("--no-metadata", is_flag=True, help="Write no A1111 `parameters` text into the image.")
@user_errors
def upscale(image, model, output, prompt, negative, noise_level, steps, guidance, sampler, seed, noise, provider,
            memory, vae_tiling, no_memory_check, no_metadata):
    """Upscale IMAGE 4x with an x4 upscaler model (runtime/upscale.py)."""
    from edgediff.runtime import Pipeline, metadata
    from edgediff.runtime.arguments import resolve_seed
    from edgediff.runtime.images import open_image
    from edgediff.runtime.request import GenerationRequest

    _check_writable(output)
    random = seed is None or seed < 0
    seed = resolve_seed(seed)
    request = GenerationRequest(prompt, negative, steps=steps, guidance=guidance, sampler=sampler, seed=seed,
                                image=open_image(image), noise_level=noise_level, noise=noise,
                                check_memory=not no_memory_check, vae_tiling=vae_tiling).check_fields()
    pipe = Pipeline.load(model, provider=provider, memory=memory)
    if not pipe.manifest.upscale:
        raise EdgediffError(f"{model} is not an x4 upscaler model (its manifest has no upscale entry); "
                            "use `edgediff generate --image` for img2img")
    result = pipe.generate(request)
    text = None if no_metadata else metadata.result_infotext(result, 0, metadata.model_identity(pipe.model_dir,
                                                                                                pipe.manifest))
    try:
        metadata.save_image(result.images[0], output, text)
    except (OSError, ValueError, KeyError) as error:
        raise EdgediffError(f"cannot write {output}: {getattr(error, 'strerror', None) or error}") from None
    t = result.timings
    click.echo(f"wrote {output} ({result.images[0].width}x{result.images[0].height}, seed {seed}, {steps} steps, "
               f"{pipe.provider}, {t['total']:.2f} s: unet {t.get('unet', 0):.2f} s, "
               f"decode {t.get('vae_decoder', 0):.2f} s)", err=True)
    if random:
        click.echo(f"seed: {seed}", err=True)


def _read_parameters(path: Path) -> dict:
    from edgediff.runtime import metadata

    if not path.is_file():
        raise EdgediffError(f"image not found: {path}")
    try:
        text = metadata.read_infotext(path)
    except OSError as error:
        raise EdgediffError(f"cannot read image {path}: {error}") from None
    if not text:
        raise EdgediffError(f"{path} carries no A1111 parameters to regenerate from")
    return metadata.generation_kwargs(metadata.parse_infotext(text))


def _lora_spec(text: str) -> tuple[Path, float]:
    """FILE[:WEIGHT]; a colon not followed by a number belongs to the path (C:\\...)."""
    path, _, weight = text.rpartition(":")
    try:
        return (Path(path), float(weight)) if path else (Path(text), 1.0)
    except ValueError:
        return Path(text), 1.0


def _embedding_files(folder: Path | None, allow_pickle: bool) -> list[Path]:
    if folder is None:
        return []
    if not folder.is_dir():
        raise EdgediffError(f"embedding folder not found: {folder}")
    suffixes = (".safetensors", ".pt", ".bin") if allow_pickle else (".safetensors",)
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in suffixes)


def _open_mask(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as picture:
            return picture.convert("L")
    except FileNotFoundError:
        raise EdgediffError(f"mask not found: {path}") from None
    except (UnidentifiedImageError, OSError) as error:
        raise EdgediffError(f"cannot read mask {path}: {error}") from None


def _check_writable(output: Path) -> None:
    if output.suffix.lower() not in IMAGE_SUFFIXES:
        raise EdgediffError(f"cannot write {output}: use one of {', '.join(IMAGE_SUFFIXES)}")
    folder = output.parent if str(output.parent) else Path(".")
    try:
        if not folder.is_dir():
            raise EdgediffError(f"cannot write {output}: folder {folder} does not exist")
        if output.is_dir() or not os.access(folder, os.W_OK) or (output.exists() and not os.access(output, os.W_OK)):
            raise EdgediffError(f"cannot write {output}: permission denied")
    except (OSError, ValueError) as error:  # a name too long for the file system, a NUL byte
        raise EdgediffError(f"cannot write {output}: {getattr(error, 'strerror', None) or error}") from None


@main.command()
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option("--verify", is_flag=True, help="Also check every graph file against its sha256.")
@user_errors
def info(model, verify):
    """Show a model's graphs and precision, and the providers available here."""
    from edgediff.runtime.info import describe

    click.echo(describe(model, verify=verify))


@main.command()
@click.argument("jobs", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for the PNGs and results.jsonl.")
@click.option("--model", type=click.Path(path_type=Path), default=None,
              help="Exported model folder, at the same path on every Ray node [default: the shipped default model].")
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
              help="Run on Ray: alone, a local cluster; with an address (or `auto`), that cluster. "
                   "Put it after JOBS or write --ray=ADDRESS.")
@click.option("--workers", type=int, default=None, help="Ray actors [default: one per GPU, else one per CPU].")
@click.option("--cpus-per-worker", type=float, default=1.0, show_default=True)
@click.option("--gpus-per-worker", type=float, default=None, help="[default: 1 where the cluster has GPUs]")
@click.option("--ship-model", is_flag=True, help="Send the model folder through Ray's object store "
                                                  "instead of reading it from a shared path.")
@click.option("--retries", type=int, default=2, show_default=True, help="Extra attempts for a failing job.")
@click.option("--negative", default=None, help="Default negative prompt for jobs without one.")
@click.option("--steps", type=int, default=None, help="Default steps [20].")
@click.option("--guidance", type=float, default=None, help="Default guidance [7.5].")
@click.option("--sampler", default=None, help="Default sampler [dpmpp_2m_karras].")
@click.option("--schedule", default=None, help="Default sigma schedule.")
@click.option("--width", type=int, default=None, help="Default width [the model's native size].")
@click.option("--height", type=int, default=None)
@click.option("--provider", type=click.Choice(["auto", "cuda", "tensorrt", "dml", "cpu"]), default="auto",
              show_default=True)
@click.option("--memory", type=click.Choice(["low", "high"]), default="high", show_default=True,
              help="high: sessions stay loaded between jobs.")
@user_errors
def batch(jobs, out, model, ray_address, workers, cpus_per_worker, gpus_per_worker, ship_model, retries,
          provider, memory, **defaults):
    """Render every job of JOBS (one JSON object per line) into --out; re-runs skip finished jobs."""
    from edgediff.batch import run_batch

    summary = run_batch(jobs, out, model=model, defaults={k: v for k, v in defaults.items() if v is not None},
                        provider=provider, memory=memory, ray=ray_address, workers=workers,
                        cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker, ship_model=ship_model,
                        retries=retries)
    click.echo(summary.line(), err=True)
    if summary.failed:
        sys.exit(1)


@main.command()
@click.option("--model", type=click.Path(path_type=Path), default=None,
              help="Exported model folder [default: the shipped default model].")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (other hosts: use --api-key).")
@click.option("--port", type=click.IntRange(0, 65535), default=7860, show_default=True)
@click.option("--provider", type=click.Choice(["auto", "cuda", "tensorrt", "dml", "cpu"]), default="auto",
              show_default=True)
@click.option("--memory", type=click.Choice(["low", "high"]), default="high", show_default=True,
              help="high: sessions stay resident between requests.")
@click.option("--api-key", default=None, envvar="EDGEDIFF_API_KEY",
              help="Require this key (Bearer, X-API-Key, or as the basic-auth password) on every endpoint "
                   "but /health [env: EDGEDIFF_API_KEY].")
@click.option("--api-auth", default=None, help="A1111's form: user:password[,user2:password2] for HTTP basic auth.")
@click.option("--max-queue", type=click.IntRange(1), default=16, show_default=True,
              help="Requests waiting behind the running one; more get 503 with Retry-After.")
@click.option("--max-side", type=click.IntRange(8), default=2048, show_default=True, help="Largest width or height.")
@click.option("--max-steps", type=click.IntRange(1), default=150, show_default=True)
@click.option("--max-images", type=click.IntRange(1), default=8, show_default=True, help="Largest batch_size x n_iter.")
@click.option("--max-body-mb", type=click.FloatRange(0.001), default=32.0, show_default=True,
              help="Largest request body, MiB.")
@click.option("--lora-dir", type=click.Path(path_type=Path), default=None,
              help="Folder where <lora:name:weight> tags are looked up; the web page lists its LoRAs.")
@click.option("--open", "open_page", is_flag=True, help="Open the web page in the browser once the server listens.")
@click.option("--controlnet-dir", type=click.Path(path_type=Path), default=None,
              help="Folder of exported ControlNets: the models of sd-webui-controlnet's API (/controlnet/model_list).")
@click.option("--control-depth-model", type=click.Path(path_type=Path), default=None,
              help="Exported depth model that ControlNet units with a depth module run.")
@click.option("--upscaler-dir", type=click.Path(path_type=Path), default=None,
              help="Folder of exported pixel upscalers (edgediff export ESRGAN.safetensors DIR/NAME): hr_upscaler "
                   "names them; /sdapi/v1/upscalers lists them.")
@user_errors
def serve(model, host, port, provider, memory, api_key, api_auth, max_queue, max_side, max_steps, max_images,
          max_body_mb, lora_dir=None, open_page=False, controlnet_dir=None, control_depth_model=None,
          upscaler_dir=None):
    """Serve AUTOMATIC1111's /sdapi/v1 API (txt2img, img2img, ...) and a web page at /; docs at /docs."""
    try:
        from edgediff.server import Limits, serve as run_server
    except ImportError as error:
        raise EdgediffError(f"the server needs the serve extra ({error.name} is missing): "
                            "pip install 'edgediff[serve]'") from None
    limits = Limits(max_side=max_side, max_pixels=max_side * max_side, max_steps=max_steps, max_images=max_images,
                    max_queue=max_queue, max_body_bytes=int(max_body_mb * (1 << 20)))
    credentials = [c for c in (api_auth or "").split(",") if c]
    if any(":" not in c for c in credentials):
        raise EdgediffError("--api-auth wants user:password pairs separated by commas")
    if lora_dir is not None and not lora_dir.is_dir():
        raise EdgediffError(f"--lora-dir {lora_dir} is not a folder")
    for flag, folder in (("--controlnet-dir", controlnet_dir), ("--control-depth-model", control_depth_model),
                         ("--upscaler-dir", upscaler_dir)):
        if folder is not None and not folder.is_dir():
            raise EdgediffError(f"{flag} {folder} is not a folder")
    click.echo(f"edgediff serving on http://{host}:{port} (web page at /, API docs at /docs)", err=True)
    run_server(model, host=host, port=port, provider=provider, memory=memory, api_key=api_key,
               api_auth=credentials, limits=limits, lora_dir=lora_dir, open_page=open_page,
               controlnet_dir=controlnet_dir, control_depth_model=control_depth_model, upscaler_dir=upscaler_dir)


def _register_bench():
    try:
        from edgediff.benchmarks.cli import bench
    except ImportError:
        return
    main.add_command(bench)


_register_bench()
