"""``edgediff export``: a Stable Diffusion model in, validated ONNX graphs plus a manifest out.

Work happens in a hidden staging folder beside OUT; each graph there gets a ``done.json`` once it
is exported and validated, so an interrupted export resumes where it stopped. At the end the
staging folder is renamed to OUT and the manifest is written last, atomically.

Memory: one graph at a time, and within it one copy of its weights at a time. Its torch modules
are loaded for tracing (and torch's reference outputs) and freed; from then on the graph is
handled stripped, its weights on disk (weights.py), until they are streamed into the final file,
which ONNX Runtime then validates against the saved reference outputs.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from edgediff.runtime.errors import EdgediffError
from edgediff.runtime.manifest import (GraphEntry, Manifest, read_manifest, sha256_file,
                                       vae_tiling_rule, write_manifest)

from . import optimize as opt
from .components import Components, used_by
from . import sd3
from .graphs import GraphSpec, default_size, example_sizes, family_of, graphs_for, model_dims, size_rule
from .memory import GIB, check_memory, peak_rss_bytes, release_freed
from .validate import reference_outputs, runnable_providers, validate
from .weights import fresh, load_stripped, spill, write_graph
from .weight_map import WEIGHT_MAPPED, module_weight_map

PRECISIONS = ("fp16", "fp32", "int8", "int4")
OPSET = 17
# int4: the U-Net's MatMul weights as 4-bit blocks (MatMulNBits), everything else float: fp16 on
# CUDA, fp32 on the CPU. Symmetric blocks of 32 along K: RESULTS.md, "int4 weight-only U-Net".
INT4 = {"bits": 4, "block_size": 32, "symmetric": True, "op": "MatMulNBits"}
# Targets with a MatMulNBits kernel that these exports were checked on.
INT4_TARGETS = ("cuda", "cpu", "none")


def default_target(precision: str) -> str:
    """fp16 graphs are for GPUs; CPU runs want fp32, int8 or int4 graphs (DESIGN.md)."""
    return "cuda" if precision == "fp16" else "cpu"


def float_dtype(precision: str, target: str) -> str:
    """The dtype of a graph's float tensors: int4 keeps fp16 activations where it targets CUDA."""
    return "float16" if precision == "fp16" or (precision == "int4" and target == "cuda") else "float32"


def export_model(source: str, out: str | Path, *, precision: str = "fp16", optimize_for: str | None = None,
                 graphs: tuple[str, ...] | None = None, allow_pickle: bool = False,
                 prediction_type: str | None = None, config: str | Path | None = None, overwrite: bool = False,
                 log: Callable[[str], None] | None = None) -> Manifest:
    """Export ``source`` into ``out`` and return the manifest written there."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    if precision not in PRECISIONS:
        raise EdgediffError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    target = optimize_for or default_target(precision)
    if target not in opt.TARGETS:
        raise EdgediffError(f"unknown --optimize-for {target!r}; choose one of {', '.join(opt.TARGETS)}")
    if precision == "int4" and target not in INT4_TARGETS:
        raise EdgediffError(f"--precision int4 supports --optimize-for {', '.join(INT4_TARGETS)}, not {target!r} "
                            "(its MatMulNBits graphs are untested there); use fp16 for that target")
    from .load import check_source, load_components

    started = time.perf_counter()
    check_source(source, allow_pickle=allow_pickle)
    out = Path(out)
    _check_output(out, overwrite)
    log(f"loading {source}")

    _quiet_libraries()
    components, origin = load_components(source, allow_pickle=allow_pickle, prediction_type=prediction_type,
                                          config=config)
    specs = graphs_for(components.meta)
    graphs = tuple(specs) if graphs is None else tuple(name for name in graphs if name in specs)
    uses = {name: used_by(lambda pipe, spec=specs[name]: spec.wrap(pipe, ())) for name in graphs}
    check_memory([sum(components.weight_bytes.get(c, 0) for c in uses[name]) for name in graphs], source)
    staging = _prepare_folders(out, overwrite)
    settings = {"precision": precision, "optimize_for": target, "opset": OPSET, "source": origin}
    _reset_if_stale(staging, settings)

    entries = {}
    for index, name in enumerate(graphs, 1):
        prefix = f"[{index}/{len(graphs)}] {name}"
        done = staging / name / "done.json"
        if done.is_file():
            entries[name] = GraphEntry.from_dict(json.loads(done.read_text()))
            log(f"{prefix}: already exported, skipping")
            continue
        keep = frozenset().union(*(uses[later] for later in graphs[index:]))  # modules a later graph reuses
        entries[name] = _export_graph(components, specs[name], staging, precision, target, prefix, log, keep=keep)
        done.write_text(json.dumps(entries[name].to_dict(), indent=2))

    manifest = _manifest(components.meta, origin, precision, target, entries)
    _write_assets(components.meta, staging)
    if out.exists():
        shutil.rmtree(out)  # empty, or complete and --overwrite given (checked in _check_output)
    for name in graphs:
        (staging / name / "done.json").unlink()
    (staging / "settings.json").unlink()
    staging.rename(out)
    write_manifest(out, manifest)
    log(f"done: {out} ({_folder_mb(out):.1f} MB) in {time.perf_counter() - started:.0f} s, "
        f"peak RAM {peak_rss_bytes() / GIB:.1f} GiB")
    return manifest


def _quiet_libraries() -> None:
    """Our progress lines replace the libraries' own bars and notices."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _check_output(out: Path, overwrite: bool) -> None:
    if (out / "manifest.json").exists() and not overwrite:
        raise EdgediffError(f"{out} already holds an exported model; pass --overwrite to replace it")
    if out.exists() and not (out / "manifest.json").exists() and (not out.is_dir() or any(out.iterdir())):
        raise EdgediffError(f"{out} exists and is not an edgediff model; choose a new or empty folder")


def _prepare_folders(out: Path, overwrite: bool) -> Path:
    _check_output(out, overwrite)
    staging = out.parent / f".{out.name}.partial"
    try:
        staging.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise EdgediffError(f"cannot write to {out.parent}: {error.strerror}") from None
    return staging


def _reset_if_stale(staging: Path, settings: dict) -> None:
    """Finished graphs are reused only when they were made with the same settings."""
    marker = staging / "settings.json"
    if marker.is_file() and json.loads(marker.read_text()) != settings:
        shutil.rmtree(staging)
        staging.mkdir()
    marker.write_text(json.dumps(settings))


def _export_graph(components: Components, spec: GraphSpec, staging: Path, precision: str, target: str,
                  prefix: str, log, keep: frozenset[str] = frozenset()) -> GraphEntry:
    started = time.perf_counter()
    meta = components.meta
    dims = model_dims(meta)
    folder = staging / spec.name
    work = folder / "raw"  # the stripped graph's weights, until the final file is written
    shutil.rmtree(folder, ignore_errors=True)
    work.mkdir(parents=True)
    trace_inputs = spec.example_inputs(dims, example_sizes(meta, batch=2, latent_units=2))
    check_inputs = spec.example_inputs(dims, example_sizes(meta, batch=1, latent_units=3))
    raw = work / "model.onnx"

    with components.open(keep) as pipe:
        module = spec.module(pipe, dims).eval()
        log(f"{prefix}: tracing")
        # The tracer warns about every Python-level shape check in diffusers; validation is our check.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, trace_inputs, str(raw), dynamo=False, opset_version=OPSET, do_constant_folding=True,
                input_names=[s.name for s in spec.present(spec.inputs, dims)],
                output_names=[s.name for s in spec.present(spec.outputs, dims)],
                dynamic_axes=spec.dynamic_axes(dims),
            )
        expected = reference_outputs(module, check_inputs)
        del module
    model = load_stripped(raw, "weights.bin")
    release_freed()

    if target != "none":
        log(f"{prefix}: optimizing for {target}")
    # SD 2.x attention overflows fp16. CUDA's fused attention kernel is what ONNX Runtime's own
    # SD 2.x fp16 pipeline uses; elsewhere attention stays unfused so its scores can stay fp32.
    unet = getattr(meta, "unet", None)  # SD3 denoises with a transformer, which never upcasts
    upcast = spec.name == "unet" and unet is not None and bool(getattr(unet.config, "upcast_attention", False))
    float16 = float_dtype(precision, target) == "float16"
    quantize = precision == "int4" and spec.name == "unet"
    # On the CPU the fused Attention op holds self-attention's q/k/v as one packed weight that
    # MatMulNBits cannot take: int4 keeps attention as MatMuls there (RESULTS.md, "int4").
    fuse = not (upcast and float16 and target != "cuda") and not (quantize and target != "cuda")
    model = opt.optimize(model, work, spec.optimizer_type, target, fuse_attention=fuse)
    spill(model, work, "fused.bin")  # the initializers the fusions made (packed q/k/v, NHWC weights)
    model = fresh(model)
    # The fusions' objects keep the old graph alive in reference cycles, and with it every weight a
    # fusion read (measured: the whole SDXL U-Net for CUDA's, 9 GiB), until the collector runs.
    release_freed(collect=True)

    inputs = spec.resolve(spec.inputs, dims, float_dtype(precision, target))
    outputs = spec.resolve(spec.outputs, dims, float_dtype(precision, target))
    providers = runnable_providers(target)
    path = folder / "model.onnx"
    kept_fp32: list[str] = []
    # int8/int4 apply to the U-Net; the other graphs are float (fp16 where int4 targets CUDA).
    graph_precision = (precision if spec.name == "unet" or precision in ("fp16", "fp32")
                       else "fp16" if float16 else "fp32")
    report = None
    quantization = {}

    if quantize:
        log(f"{prefix}: quantizing MatMul weights to {INT4['bits']}-bit blocks of {INT4['block_size']}")
        float_bytes = opt.weight_bytes_by_op(model)
        model = opt.quantize_nbits(model, work, INT4["bits"], INT4["block_size"])
        spill(model, work, "quantized.bin")  # the packed weights and their scales
        model = fresh(model)
        release_freed()
        kept = opt.weight_bytes_by_op(model)
        quantization = {**INT4, "matmul_float_bytes": float_bytes.get("MatMul", 0),
                        "packed_bytes": kept.get("MatMulNBits", 0),
                        "float_bytes": sum(b for op, b in kept.items() if op != "MatMulNBits"),
                        "float": "convolutions, Gemm and MatMuls without a constant weight, norms, biases"}
        if not float16:
            kept_fp32 = ["convolutions and non-MatMul weights (MatMulNBits covers MatMul weights only)"]
    if float16:
        log(f"{prefix}: converting to fp16")
        opt.name_nodes(model)
        keep_io = [s.name for s in inputs if s.dtype == "float32"]
        attention = opt.attention_score_nodes(model)
        # Escalate only as far as needed: all fp16, then attention scores in fp32, then all fp32.
        # Each try starts from the stripped fp32 graph; its weights are converted as they are written.
        # A VAE whose config says ``force_upcast`` (SDXL's) overflows fp16: it stays fp32 outright.
        steps = ((attention if upcast else [], "attention scores and softmax (upcast_attention)"),
                 (attention, "attention scores and softmax (fp16 overflow)"),
                 (None, "whole graph (fp16 overflow)"))
        if spec.optimizer_type == "vae" and getattr(meta.vae.config, "force_upcast", False):
            steps = ((None, "whole graph (the VAE config sets force_upcast)"),)
        for keep_nodes, why in steps:
            if keep_nodes is None:
                graph_precision, converted = "int4" if quantize else "fp32", model
                inputs = spec.resolve(spec.inputs, dims, "float32")
                outputs = spec.resolve(spec.outputs, dims, "float32")
                kept_fp32 = [why]
            else:
                converted = opt.to_fp16(_copy(model), keep_nodes, keep_io)
                kept_fp32 = [f"{why}: {len(keep_nodes)} nodes"] if keep_nodes else []
            write_graph(converted, path, work)
            del converted
            release_freed()
            if providers is None:
                break
            report = validate(expected, path, check_inputs, inputs, outputs, providers)
            if all(r["finite"] for r in report.values()):
                break
            log(f"{prefix}: fp16 output overflowed; keeping more in fp32")
    elif precision == "int8" and spec.name == "unet":
        log(f"{prefix}: quantizing MatMul weights to int8")
        model = opt.quantize_int8(model, work)
        spill(model, work, "quantized.bin")  # the int8 weights and their scales
        model = fresh(model)
        release_freed()
        write_graph(model, path, work)
        kept_fp32 = ["convolutions (dynamic int8 covers MatMul/Attention/Gemm only)"]
    else:
        if precision == "int8":
            kept_fp32 = ["whole graph (int8 applies to the U-Net)"]
        elif precision == "int4" and not quantize:
            kept_fp32 = ["whole graph (int4 applies to the U-Net)"]
        write_graph(model, path, work)
    model = None
    shutil.rmtree(work)
    release_freed()

    validation = _validate_and_report(expected, spec, path, check_inputs, inputs, outputs, providers,
                                      graph_precision if precision != "int8" else precision, prefix, log, report)
    weights = {}
    if spec.name in WEIGHT_MAPPED:  # LoRAs patch these: map torch names to the saved initializers
        with components.open(keep) as pipe:
            weights = module_weight_map(spec.name, spec.module(pipe, dims), path, graph_precision)
    entry = GraphEntry(
        path=f"{spec.name}/model.onnx", sha256=sha256_file(path), precision=graph_precision,
        inputs=inputs, outputs=outputs, kept_fp32=kept_fp32, validation=validation, weights=weights,
        quantization=quantization,
    )
    log(f"{prefix}: done in {time.perf_counter() - started:.1f} s")
    return entry


def _validate_and_report(expected, spec, path, check_inputs, inputs, outputs, providers, precision, prefix,
                         log, report=None) -> dict:
    """``report``: the fp16 escalation's last validation of this very file, when there was one."""
    tolerance = spec.tolerance[precision]
    if providers is None:
        log(f"{prefix}: not validated: its fused ops need the CUDA provider, which is not available here")
        return {"validated": False, "reason": "graph needs CUDAExecutionProvider", "tolerance": tolerance}
    report = report or validate(expected, path, check_inputs, inputs, outputs, providers)
    failed = []
    for output, result in report.items():
        ok = result["finite"] and result["relative"] <= tolerance
        log(f"{prefix}: validate {output}: max abs diff {result['max_abs_diff']:.2e} "
            f"(relative {result['relative']:.2e}, tolerance {tolerance:.0e}) {'ok' if ok else 'FAILED'}")
        if not ok:
            failed.append(output)
    if failed:
        raise EdgediffError(f"{spec.name} graph does not match torch ({', '.join(failed)} over tolerance "
                            f"{tolerance:.0e}); nothing was written to the output folder")
    return {"validated": True, "providers": providers[:1], "tolerance": tolerance, "outputs": report}


def _copy(model):
    """A stripped graph: its copy costs kilobytes."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _manifest(pipe, origin, precision, target, entries) -> Manifest:
    import diffusers
    import onnx
    import onnxruntime
    import transformers

    vae_scale_factor, latent_multiple = size_rule(pipe)
    scheduler = json.loads(json.dumps(dict(pipe.scheduler.config), default=list))
    scheduler["_class_name"] = type(pipe.scheduler).__name__
    text_encoders = [{"graph": name, "tokenizer": _tokenizer_spec(getattr(pipe, tokenizer), folder)}
                     for name, tokenizer, folder in _text_encoders(pipe) if name in entries]
    family = family_of(pipe)
    fields = sd3.manifest_fields(pipe) if family == "sd3" else {}
    if family == "sd":  # OpenAI CLIP (quick_gelu) conditions SD 1.x; OpenCLIP (gelu) conditions SD 2.x.
        family = "sd1" if pipe.text_encoder.config.hidden_act == "quick_gelu" else "sd2"
    return Manifest(
        family=family,
        prediction_type=fields.get("prediction_type", pipe.scheduler.config.get("prediction_type", "epsilon")),
        scheduler=scheduler,
        latent_channels=pipe.vae.config.latent_channels,
        vae_scale_factor=vae_scale_factor,
        scaling_factor=float(pipe.vae.config.scaling_factor),
        shift_factor=float(getattr(pipe.vae.config, "shift_factor", None) or 0.0),
        latent_multiple=latent_multiple,
        default_size=default_size(pipe),
        tokenizer=_tokenizer_spec(pipe.tokenizer, "tokenizer"),
        text_encoders=text_encoders,
        conditioning=fields.get("conditioning") or _conditioning(pipe),
        alphas_cumprod=fields.get("alphas_cumprod", "alphas_cumprod.npy"),
        vae_tiling=vae_tiling_rule(_vae_sample_size(pipe), vae_scale_factor),
        graphs=entries,
        precision=precision,
        optimized_for=target,
        source={**origin, "opset": OPSET, "exporter": "torch.onnx (TorchScript)",
                "libraries": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                              "transformers": transformers.__version__, "onnx": onnx.__version__,
                              "onnxruntime": onnxruntime.__version__}},
    )


def _vae_sample_size(pipe) -> int:
    """The VAE's training size in pixels: diffusers' tile for ``enable_tiling()``."""
    size = pipe.vae.config.sample_size
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def _text_encoders(pipe) -> list[tuple[str, str, str]]:
    """(graph, tokenizer attribute, tokenizer folder) of each text encoder the pipeline has."""
    pairs = [("text_encoder", "tokenizer", "tokenizer"), ("text_encoder_2", "tokenizer_2", "tokenizer_2"),
             ("text_encoder_3", "tokenizer_3", "tokenizer_3")]
    return [pair for pair in pairs if getattr(pipe, pair[0], None) is not None]


def _tokenizer_spec(tokenizer, folder: str) -> dict:
    if tokenizer.bos_token_id is None:  # T5's SentencePiece tokenizer: no BOS, EOS then padding
        return sd3.t5_tokenizer_spec(tokenizer, folder)
    return {
        "path": f"{folder}/tokenizer.json",
        "max_length": int(tokenizer.model_max_length),
        "pad_token_id": int(tokenizer.pad_token_id),
        "bos_token_id": int(tokenizer.bos_token_id),
        "eos_token_id": int(tokenizer.eos_token_id),
    }


def _conditioning(pipe) -> dict:
    """What the runtime needs to build the U-Net's extra inputs, as data (diffusers' SDXL pipeline)."""
    dims = model_dims(pipe)
    conditioning = {"force_zeros_for_empty_prompt": bool(pipe.config.get("force_zeros_for_empty_prompt", False))}
    if dims["time_ids"] is not None:
        if dims["time_ids"] != 6:
            raise EdgediffError(f"this U-Net takes {dims['time_ids']} size ids (an SDXL refiner?); edgediff "
                                "supports the 6 of SDXL base models")
        conditioning["time_ids"] = ["original_size", "crops_coords_top_left", "target_size"]
    return conditioning


def _write_assets(pipe, staging: Path) -> None:
    for _, attribute, folder in _text_encoders(pipe):
        (staging / folder).mkdir(exist_ok=True)
        getattr(pipe, attribute).backend_tokenizer.save(str(staging / folder / "tokenizer.json"), pretty=False)
    if family_of(pipe) == "sd3" and not sd3.manifest_fields(pipe)["alphas_cumprod"]:
        return  # a flow-matching scheduler has no alphas_cumprod: its sigmas come from its config
    alphas_cumprod = getattr(pipe.scheduler, "alphas_cumprod", None)
    if alphas_cumprod is None:
        from diffusers import DDPMScheduler

        alphas_cumprod = DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod
    np.save(staging / "alphas_cumprod.npy", np.asarray(alphas_cumprod, dtype=np.float64))


def _folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6


__all__ = ["export_model", "read_manifest", "PRECISIONS", "default_target"]
