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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from edgediff.runtime.errors import EdgediffError
from edgediff.runtime.manifest import (GraphEntry, Manifest, read_manifest, sha256_file,
                                       vae_tiling_rule, write_manifest)

from . import optimize as opt
from .components import Components, used_by
from .controlnet import add_zero_defaults, controlnet_source, export_controlnet
from .depth import export_depth, is_depth_model
from .disk import check_disk, disk_full
from .esrgan import export_esrgan, is_esrgan
from . import sd3
from .graphs import (GraphSpec, default_size, example_sizes, family_of, graphs_for, manifest_fields, model_dims,
                     size_rule)
from .memory import GIB, check_memory, peak_rss_bytes, release_freed
from .validate import reference_outputs, runnable_providers, validate
from .weights import fresh, load_stripped, remove_graph, spill, write_graph
from .weight_map import module_weight_map

PRECISIONS = ("fp16", "fp32", "int8", "int4")
OPSET = 17
# int4: the U-Net's MatMul weights as 4-bit blocks (MatMulNBits), everything else float: fp16 on
# CUDA, fp32 on the CPU. Symmetric blocks of 32 along K: RESULTS.md, "int4 weight-only U-Net".
INT4 = {"bits": 4, "block_size": 32, "symmetric": True, "op": "MatMulNBits"}
# Targets with a MatMulNBits kernel that these exports were checked on.
INT4_TARGETS = ("cuda", "cpu", "none")


def default_target(precision: str) -> str:
    """fp16 graphs are for GPUs (ONNX Runtime's CPU provider lacks fp16 kernels for most ops and
    runs them through casts); CPU runs want fp32, int8 or int4 graphs."""
    return "cuda" if precision == "fp16" else "cpu"


def float_dtype(precision: str, target: str) -> str:
    """The dtype of a graph's float tensors: int4 keeps fp16 activations where it targets CUDA."""
    return "float16" if precision == "fp16" or (precision == "int4" and target == "cuda") else "float32"


def export_model(source: str, out: str | Path, *, precision: str | None = "fp16", optimize_for: str | None = None,
                 graphs: tuple[str, ...] | None = None, allow_pickle: bool = False,
                 prediction_type: str | None = None, config: str | Path | None = None, overwrite: bool = False,
                 log: Callable[[str], None] | None = None, text_encoders: str | Path | None = None) -> Manifest:
    """Export ``source`` into ``out`` and return the manifest written there.

    ``precision=None`` and ``optimize_for=None``: the export that fits this machine (target.py),
    announced as the first line.
    """
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    _check_settings(precision, optimize_for)
    from .load import check_source, load_components
    from .target import choose

    started = time.perf_counter()
    # A ControlNet or a depth estimator has its own kind of folder (exporter/controlnet.py, depth.py).
    # An ESRGAN file is checked first: the ControlNet check refuses files of neither SD's nor its names.
    esrgan = is_esrgan(source)
    own = (None if esrgan else export_controlnet if controlnet_source(source, allow_pickle) else
           export_depth if is_depth_model(source) else None)
    if own is None:
        check_source(source, allow_pickle=allow_pickle)
    out = Path(out)
    _check_output(out, overwrite)
    if esrgan:  # a pixel upscaler: one fp32 graph, no target to choose (exporter/esrgan.py)
        return export_esrgan(source, out, precision=precision, allow_pickle=allow_pickle, overwrite=overwrite, log=log)
    precision, target = choose(precision, optimize_for, default_target, log)
    _check_settings(precision, target)
    if own is not None:
        return own(source, out, precision=precision, target=target, overwrite=overwrite, log=log,
                   allow_pickle=allow_pickle, config=config)
    log(f"loading {source}")

    _quiet_libraries()
    components, origin = load_components(source, allow_pickle=allow_pickle, prediction_type=prediction_type,
                                          config=config, text_encoders=text_encoders, log=log)
    specs = graphs_for(components.meta)
    graphs = tuple(specs) if graphs is None else tuple(name for name in graphs if name in specs)
    uses = {name: used_by(lambda pipe, spec=specs[name]: spec.wrap(pipe, ())) for name in graphs}
    _check_resources(components, {name: specs[name] for name in graphs}, uses, precision, out, source)
    staging = _prepare_folders(out, overwrite)
    settings = {"precision": precision, "optimize_for": target, "opset": OPSET, "source": origin}
    _reset_if_stale(staging, settings)
    entries = _export_graphs(components, specs, graphs, uses, staging, precision, target, log)

    manifest = _manifest(components.meta, origin, precision, target, entries)
    _write_assets(components.meta, staging)
    if out.exists():
        shutil.rmtree(out)  # empty, or complete and --overwrite given (checked in _check_output)
    for name in graphs:
        (staging / name / "done.json").unlink()
    (staging / "settings.json").unlink()
    staging.rename(out)
    write_manifest(out, manifest)
    unvalidated = [name for name, entry in entries.items() if not entry.validation.get("validated")]
    log(f"done: {out} ({_folder_mb(out):.1f} MB) in {time.perf_counter() - started:.0f} s, "
        f"peak RAM {peak_rss_bytes() / GIB:.1f} GiB"
        + (f"; NOT validated: {', '.join(unvalidated)} (see their lines above)" if unvalidated else ""))
    return manifest


def _check_resources(components: Components, specs: dict[str, GraphSpec], uses: dict, precision: str, out: Path,
                     source: str) -> None:
    """Refuse up front, in one line, an export that would run out of memory or disk midway; graphs a
    resumed export already finished need no disk."""
    check_memory([_held_bytes(components, spec, uses[name], precision) for name, spec in specs.items()], source)
    pending = [name for name in specs if not (_staging(out) / name / "done.json").is_file()]
    check_disk([_disk_bytes(components, specs[name], uses[name], precision) for name in pending], out, source)


def _export_graphs(components: Components, specs: dict[str, GraphSpec], graphs: tuple[str, ...], uses: dict,
                   staging: Path, precision: str, target: str, log) -> dict[str, GraphEntry]:
    """Each graph in turn into ``staging``, skipping those a previous run finished (their done.json)."""
    entries = {}
    for index, name in enumerate(graphs, 1):
        prefix = f"[{index}/{len(graphs)}] {name}"
        done = staging / name / "done.json"
        if done.is_file():
            entries[name] = GraphEntry.from_dict(json.loads(done.read_text()))
            log(f"{prefix}: already exported, skipping")
            continue
        keep = frozenset().union(*(uses[later] for later in graphs[index:]))  # modules a later graph reuses
        try:
            entries[name] = _export_graph(components, specs[name], staging, precision, target, prefix, log, keep=keep)
        except OSError as error:
            raise disk_full(error, name, staging) or error from None
        done.write_text(json.dumps(entries[name].to_dict(), indent=2))
    return entries


def _check_settings(precision: str | None, target: str | None) -> None:
    if precision is not None and precision not in PRECISIONS:
        raise EdgediffError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    target = target or (precision and default_target(precision))
    if target is not None and target not in opt.TARGETS:
        raise EdgediffError(f"unknown --optimize-for {target!r}; choose one of {', '.join(opt.TARGETS)}")
    if precision == "int4" and target not in INT4_TARGETS:
        raise EdgediffError(f"--precision int4 supports --optimize-for {', '.join(INT4_TARGETS)}, not {target!r} "
                            "(its MatMulNBits graphs are untested there); use fp16 for that target")


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
    staging = _staging(out)
    try:
        staging.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise EdgediffError(f"cannot write to {out.parent}: {error.strerror}") from None
    return staging


def _staging(out: Path) -> Path:
    """Where graphs are written until the last one is done (and where a new run resumes)."""
    return out.parent / f".{out.name}.partial"


def _reset_if_stale(staging: Path, settings: dict) -> None:
    """Finished graphs are reused only when they were made with the same settings."""
    marker = staging / "settings.json"
    if marker.is_file() and json.loads(marker.read_text()) != settings:
        shutil.rmtree(staging)
        staging.mkdir()
    marker.write_text(json.dumps(settings))


@dataclass
class GraphJob:
    """One graph's export: its declaration, the export's settings, and where its files go."""

    spec: GraphSpec
    meta: object
    precision: str  # the export's precision; a graph that is not quantizable stays float
    target: str
    folder: Path
    prefix: str
    log: Callable[[str], None]
    keep: frozenset[str]  # modules a later graph reuses
    fusions: str | None = None  # the fusions' target, where it differs from ``target`` (the CPU check)
    file: str = "model.onnx"
    # A graph outside the pipeline families (a ControlNet) reads its dims and example sizes its own way.
    dims_of: Callable[[object], dict] = model_dims
    sizes_of: Callable[..., dict] = example_sizes

    @property
    def fusion_target(self) -> str:
        return self.fusions or self.target

    @property
    def dims(self) -> dict:
        return self.dims_of(self.meta)

    @property
    def zero_default(self) -> frozenset[str]:
        return self.spec.zero_default(self.dims)

    @property
    def work(self) -> Path:
        return self.folder / "raw"  # the stripped graph's weights, until the final file is written

    @property
    def path(self) -> Path:
        return self.folder / self.file

    @property
    def float16(self) -> bool:
        return float_dtype(self.precision, self.target) == "float16"

    @property
    def int4(self) -> bool:
        return self.precision == "int4" and self.spec.quantizable

    @property
    def upcast(self) -> bool:
        return self.spec.config_flag(self.meta, self.spec.upcast_attention_flag)

    @property
    def float_precision(self) -> str:
        """The precision of a graph that is not quantized: fp16 where int4 targets CUDA."""
        return "fp16" if self.float16 else "fp32"


@dataclass
class Written:
    """What the precision pass leaves: the graph file's precision, boundary and what stayed fp32."""

    precision: str
    inputs: list
    outputs: list
    kept_fp32: list[str]
    quantization: dict = field(default_factory=dict)
    report: dict | None = None  # the fp16 escalation's last validation of this very file
    step: int | None = None  # the fp16 try that was written (``_fp16_steps``)
    unvalidated: str | None = None  # why no provider here could run it


def _export_graph(components: Components, spec: GraphSpec, staging: Path, precision: str, target: str,
                  prefix: str, log, keep: frozenset[str] = frozenset(), **own: Callable) -> GraphEntry:
    """The passes, in order: trace, optimize, quantize, precision (and write), validate, weight map.
    ``own``: ``dims_of``/``sizes_of`` for a graph outside the pipeline families (GraphJob)."""
    started = time.perf_counter()
    job = GraphJob(spec, components.meta, precision, target, staging / spec.name, prefix, log, keep, **own)
    shutil.rmtree(job.folder, ignore_errors=True)
    job.work.mkdir(parents=True)
    model, expected, check_inputs = _trace(components, job)
    providers = runnable_providers(target)
    # Where the target's provider is absent, the closest graph this machine runs is checked first.
    check = None if providers is not None else _check_on_cpu(_copy(model), job, expected, check_inputs)
    model = _optimize(model, job)
    model, quantization = _quantize(model, job)
    written = _write_at_precision(model, job, expected, check_inputs, providers, step=check and check.step)
    written.quantization = quantization
    del model
    shutil.rmtree(job.work)
    release_freed()

    validation = _validate_and_report(expected, spec, job.path, check_inputs, written, providers,
                                      written.precision if precision != "int8" else precision, prefix, log, check)
    entry = GraphEntry(
        path=f"{spec.name}/model.onnx", sha256=sha256_file(job.path), precision=written.precision,
        inputs=[s for s in written.inputs if s.name not in job.zero_default], outputs=written.outputs,
        optional_inputs=[s for s in written.inputs if s.name in job.zero_default],
        kept_fp32=written.kept_fp32, validation=validation,
        weights=_weight_map(components, job, written.precision), quantization=written.quantization,
    )
    log(f"{prefix}: done in {time.perf_counter() - started:.1f} s")
    return entry


# fp32 bytes a graph's weights take at each precision, in eighths (quantized: its MatMuls' weights).
STORED_EIGHTHS = {"fp32": 8, "fp16": 4, "int8": 2, "int4": 1}


def _stored_bytes(spec: GraphSpec, size: int, precision: str) -> int:
    """What ``size`` fp32 bytes of a graph's weights take in its file at the export's precision."""
    return size * (STORED_EIGHTHS[precision] if spec.quantizable or precision == "fp16" else 8) // 8


def _fp32_bytes(components: Components, uses) -> int:
    """A graph's weights in fp32: those of the modules it uses."""
    return sum(components.weight_bytes.get(c, 0) for c in uses)


def _held_bytes(components: Components, spec: GraphSpec, uses, precision: str) -> int:
    """fp32 bytes a graph's export holds at once (memory.check_memory): its weights, except for a
    streamed graph (T5-XXL), traced one block at a time and validated at the export's precision."""
    size = _fp32_bytes(components, uses)
    if spec.streamed is None or components.tensors(spec.streamed[0]) is None:
        return size
    config = getattr(components.meta, spec.streamed[0]).config
    return max(spec.streamed[1].resident_bytes(config), _stored_bytes(spec, size, precision))


def _disk_bytes(components: Components, spec: GraphSpec, uses, precision: str) -> tuple[int, int]:
    """(work files, output) bytes of a graph's export on disk (disk.check_disk)."""
    size = _fp32_bytes(components, uses)
    return size, _stored_bytes(spec, size, precision)


def _trace(components: Components, job: GraphJob):
    """torch.onnx's trace at batch 2, and torch's reference outputs at batch 1 for validation.

    Returns the stripped graph (weights on disk in ``job.work``), the reference outputs and the
    validation inputs; the torch module is freed before the graph is handled.
    """
    spec, dims, meta = job.spec, job.dims, job.meta
    trace_inputs = spec.example_inputs(dims, job.sizes_of(meta, batch=2, latent_units=2))
    check_inputs = spec.example_inputs(dims, job.sizes_of(meta, batch=1, latent_units=3))
    raw = job.work / "model.onnx"
    checkpoint = components.tensors(spec.streamed[0]) if spec.streamed else None
    if checkpoint is not None:
        return _trace_streamed(spec.streamed[1](getattr(meta, spec.streamed[0]).config, checkpoint), job,
                               trace_inputs, check_inputs)
    with components.open(job.keep) as pipe:
        module = spec.module(pipe, dims).eval()
        job.log(f"{job.prefix}: tracing")
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
    return model, expected, check_inputs


def _trace_streamed(streamed, job: GraphJob, trace_inputs, check_inputs):
    """``_trace`` for a module held one block at a time (``GraphSpec.streamed``)."""
    spec, dims, raw = job.spec, job.dims, job.work / "model.onnx"
    # First: after torch.onnx's trace the blocks' weight swaps no longer reach the computation.
    expected = streamed.reference(check_inputs)
    job.log(f"{job.prefix}: tracing (one block's weights at a time)")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            streamed.module(), trace_inputs, str(raw), dynamo=False, opset_version=OPSET, do_constant_folding=True,
            input_names=[s.name for s in spec.present(spec.inputs, dims)],
            output_names=[s.name for s in spec.present(spec.outputs, dims)],
            dynamic_axes=spec.dynamic_axes(dims),
        )
    model = load_stripped(raw, "weights.bin")
    job.log(f"{job.prefix}: writing each block's own weights")
    streamed.unshare(model, job.work, "blocks.bin")
    model = fresh(model)
    del streamed
    release_freed(collect=True)
    return model, expected, check_inputs


def _optimize(model, job: GraphJob):
    """ONNX Runtime's fusions for the target (none for ``none``); their new weights spill to disk."""
    if job.fusion_target != "none":
        job.log(f"{job.prefix}: optimizing for {job.fusion_target}")
    # Attention overflows fp16 where the config upcasts it (SD 2.x). CUDA's fused attention kernel is
    # what ONNX Runtime's own SD 2.x fp16 pipeline uses; elsewhere attention stays unfused so its
    # scores can stay fp32. On the CPU a U-Net's fused Attention op holds self-attention's q/k/v as
    # one packed weight that MatMulNBits cannot take: int4 keeps attention as MatMuls there
    # (RESULTS.md, "int4"), unless the declaration's fusion leaves them (int4_fused_attention).
    off_cuda = job.fusion_target != "cuda"
    fuse = (not (job.upcast and job.float16 and off_cuda)
            and not (job.int4 and off_cuda and not job.spec.int4_fused_attention))
    model = opt.optimize(model, job.work, job.spec.optimizer_type, job.fusion_target, fuse_attention=fuse)
    spill(model, job.work, "fused.bin")  # the initializers the fusions made (packed q/k/v, NHWC weights)
    model = fresh(model)
    # The fusions' objects keep the old graph alive in reference cycles, and with it every weight a
    # fusion read (measured: the whole SDXL U-Net for CUDA's, 9 GiB), until the collector runs.
    release_freed(collect=True)
    return model


def _quantize(model, job: GraphJob):
    """int4 (MatMulNBits blocks) or int8 (dynamic) weights for a quantizable graph; others pass through.

    Returns the graph and the manifest's ``quantization`` record (int4 only).
    """
    if job.int4:
        job.log(f"{job.prefix}: quantizing MatMul weights to {INT4['bits']}-bit blocks of {INT4['block_size']}")
        model = opt.gemm_to_matmul(model, job.work)
        float_bytes = opt.weight_bytes_by_op(model)
        # accuracy_level stays unset (fp32 products): level 4's int8 activations measured no faster on
        # a whole transformer step here or on the Xeon (RESULTS.md, "Full depth, this round")
        model = opt.quantize_nbits(model, job.work, INT4["bits"], INT4["block_size"])
        spill(model, job.work, "quantized.bin")  # the packed weights and their scales
        model = fresh(model)
        release_freed()
        kept = opt.weight_bytes_by_op(model)
        return model, {**INT4, "matmul_float_bytes": float_bytes.get("MatMul", 0),
                       "packed_bytes": kept.get("MatMulNBits", 0),
                       "float_bytes": sum(b for op, b in kept.items() if op != "MatMulNBits"),
                       "float": "convolutions, Gemm and MatMuls without a constant weight, norms, biases"}
    if job.precision == "int8" and job.spec.quantizable:
        job.log(f"{job.prefix}: quantizing MatMul weights to int8")
        model = opt.quantize_int8(model, job.work)
        spill(model, job.work, "quantized.bin")  # the int8 weights and their scales
        model = fresh(model)
        release_freed()
    return model, {}


def _write_at_precision(model, job: GraphJob, expected, check_inputs, providers, step: int | None = None) -> Written:
    """Write the final file: fp16 graphs through the escalation below (or straight at ``step``, the
    try a CPU check settled on), the others as they are."""
    spec, dims = job.spec, job.dims
    if job.float16:
        return _write_fp16(model, job, expected, check_inputs, providers, step)
    written = Written(job.precision if spec.quantizable or job.precision in ("fp16", "fp32") else "fp32",
                      spec.resolve(spec.inputs, dims, "float32"), spec.resolve(spec.outputs, dims, "float32"), [])
    if job.int4:
        written.kept_fp32 = ["convolutions and non-MatMul weights (MatMulNBits covers MatMul weights only)"]
    elif job.precision == "int8" and spec.quantizable:
        written.kept_fp32 = ["convolutions (dynamic int8 covers MatMul/Attention/Gemm only)"]
    elif job.precision in ("int8", "int4"):
        written.kept_fp32 = [f"whole graph ({job.precision} applies to the U-Net)"]
    write_graph(add_zero_defaults(model, job.zero_default), job.path, job.work)
    return written


def _fp16_steps(model, job: GraphJob) -> list[tuple[list[str] | None, str]]:
    """The fp16 tries in order, as (nodes kept fp32, why); None keeps the whole graph fp32.

    Escalate only as far as needed, in the order the graph declares: all fp16 (attention scores in
    fp32 from the start where the config upcasts attention), then attention scores in fp32, then
    all fp32. A config flag that forces fp32 (SDXL's VAE ``force_upcast``) skips straight to fp32.
    """
    spec = job.spec
    opt.name_nodes(model)
    if spec.config_flag(job.meta, spec.force_fp32_flag):
        component, flag = spec.force_fp32_flag
        return [(None, f"whole graph (the {component.upper()} config sets {flag})")]
    attention = opt.attention_score_nodes(model)
    islands, why = spec.fp16_islands(model) if spec.fp16_islands else ([], "")
    escalation = {"attention": (attention + islands, "attention scores and softmax (fp16 overflow)"),
                  "graph": (None, "whole graph (fp16 overflow)")}
    first = ((attention if job.upcast else []) + islands,
             "attention scores and softmax (upcast_attention)" if job.upcast else why)
    return [first, *(escalation[step] for step in spec.fp16_escalation)]


def _write_fp16(model, job: GraphJob, expected, check_inputs, providers, step: int | None = None) -> Written:
    """Each try starts from the stripped fp32 graph; its weights are converted as they are written,
    and the file is validated (where a provider here runs it) before the next try is considered."""
    spec, dims = job.spec, job.dims
    keep_io = [s.name for s in spec.resolve(spec.inputs, dims, "float16") if s.dtype == "float32"]
    written = None
    steps = list(enumerate(_fp16_steps(model, job)))
    for index, (keep_nodes, why) in steps if step is None else steps[min(step, len(steps) - 1):][:1]:
        if keep_nodes is None:
            written = Written("int4" if job.int4 else "fp32", spec.resolve(spec.inputs, dims, "float32"),
                              spec.resolve(spec.outputs, dims, "float32"), [why])
            converted = model
        else:
            written = Written(job.precision if spec.quantizable else job.float_precision,
                              spec.resolve(spec.inputs, dims, "float16"), spec.resolve(spec.outputs, dims, "float16"),
                              [f"{why}: {len(keep_nodes)} nodes"] if keep_nodes else [])
            converted = opt.to_fp16(_copy(model), keep_nodes, keep_io)
        written.step = index
        write_graph(add_zero_defaults(converted, job.zero_default), job.path, job.work)
        del converted
        release_freed()
        if providers is None:
            break
        written.report = validate(expected, job.path, check_inputs, written.inputs, written.outputs, providers)
        if all(r["finite"] for r in written.report.values()):
            break
        job.log(f"{job.prefix}: fp16 output overflowed; keeping more in fp32")
    return written


def _check_on_cpu(model, job: GraphJob, expected, check_inputs) -> Written:
    """Validate, on the CPU and at the export's precision, the graph fused for the CPU: the target's
    graph before its provider-only fusions (optimize.CUDA_ONLY_FUSIONS), which this machine cannot
    run. Its fp16 escalation decides the target's; the file is deleted once checked."""
    check = replace(job, fusions="cpu", file="cpu_check.onnx", prefix=f"{job.prefix} (cpu check)")
    cpu = ["CPUExecutionProvider"]
    model = _optimize(model, check)
    model, _ = _quantize(model, check)
    try:
        written = _write_at_precision(model, check, expected, check_inputs, cpu)
        written.report = written.report or validate(expected, check.path, check_inputs, written.inputs,
                                                    written.outputs, cpu)
    except Exception as error:  # noqa: BLE001  ONNX Runtime raises its own types for a missing kernel
        written = Written(job.precision, [], [], [], unvalidated=f"the CPU cannot run it either: {str(error)[:160]}")
    remove_graph(check.path)  # and its weights file: 9 GB for SD 3.5's T5 in fp16
    return written


def _weight_map(components: Components, job: GraphJob, precision: str) -> dict:
    """LoRAs patch these graphs: map torch names to the saved initializers."""
    if not job.spec.lora_patched:
        return {}
    with components.open(job.keep) as pipe:
        return module_weight_map(job.spec.name, job.spec.module(pipe, job.dims), job.path, precision)


def _validate_and_report(expected, spec, path, check_inputs, written: Written, providers, precision, prefix,
                         log, check: Written | None = None) -> dict:
    """The manifest's ``validation``: where the graph was run (``where``), each output's difference
    from torch and the tolerance. ``check``: the CPU check of the graph before provider-only fusions,
    used where ``providers`` is None (this machine cannot run the file itself)."""
    tolerance = spec.tolerance[precision]
    if providers is None and (check is None or check.report is None):
        reason = check.unvalidated if check is not None else "graph needs CUDAExecutionProvider"
        log(f"{prefix}: not validated: its fused ops need the CUDA provider, which is not available here, "
            f"and {reason}")
        return {"validated": False, "reason": reason, "tolerance": tolerance}
    if providers is None:
        report, providers, where = check.report, ["CPUExecutionProvider"], "cpu, before cuda fusions"
    else:
        report = written.report or validate(expected, path, check_inputs, written.inputs, written.outputs, providers)
        where = providers[0].replace("ExecutionProvider", "").lower()
    failed = []
    for output, result in report.items():
        ok = result["finite"] and result["relative"] <= tolerance
        log(f"{prefix}: validate {output} on {where}: max abs diff {result['max_abs_diff']:.2e} "
            f"(relative {result['relative']:.2e}, tolerance {tolerance:.0e}) {'ok' if ok else 'FAILED'}")
        if not ok:
            failed.append(output)
    if failed:
        raise EdgediffError(f"{spec.name} graph does not match torch ({', '.join(failed)} over tolerance "
                            f"{tolerance:.0e}); nothing was written to the output folder")
    return {"validated": True, "providers": providers[:1], "where": where, "tolerance": tolerance,
            "max_relative": max(r["relative"] for r in report.values()), "outputs": report}


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
    fields = manifest_fields(pipe)
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
        upscale=fields.get("upscale", {}),
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
    """(graph, tokenizer attribute, tokenizer folder) of each text encoder the pipeline's family
    declares (``GraphSpec.tokenizer``)."""
    return [(name, *spec.tokenizer) for name, spec in graphs_for(pipe).items()
            if spec.tokenizer is not None and getattr(pipe, name, None) is not None]


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
    if manifest_fields(pipe).get("alphas_cumprod") == "":
        return  # a flow-matching scheduler has no alphas_cumprod: its sigmas come from its config
    alphas_cumprod = getattr(pipe.scheduler, "alphas_cumprod", None)
    if alphas_cumprod is None:
        from diffusers import DDPMScheduler

        alphas_cumprod = DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod
    np.save(staging / "alphas_cumprod.npy", np.asarray(alphas_cumprod, dtype=np.float64))


def _folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6


__all__ = ["export_model", "read_manifest", "PRECISIONS", "default_target"]
