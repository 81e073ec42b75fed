"""ControlNet (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion Models").

A ControlNet folder holds one graph (the U-Net's inputs and a hint image in, one residual per U-Net
skip connection plus the mid block's out) and its own manifest. Per U-Net call, each unit active at
that step runs on the same latent, timestep and text, its residuals are scaled and the units' sums
are fed to the base U-Net, whose residual inputs default to zeros (exporter/controlnet.py). Step
ranges, guess mode and scales follow diffusers' ``StableDiffusionControlNetPipeline`` and
``MultiControlNetModel``.
"""
from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import InputError, ModelFolderError
from .manifest import MANIFEST_NAME, FolderManifest, GraphEntry, write_manifest, Manifest
from .depth import GRAPH as DEPTH_GRAPH, DepthEstimator, read_depth_manifest
from .preprocess import hint_tensor, preprocess

CONTROLNET_KIND = "controlnet"
SCHEMA_VERSION = 1
GRAPH = "controlnet"


@dataclass
class ControlNetManifest(FolderManifest):
    """What a ControlNet folder holds and which base models it fits."""

    family: str  # "sd" (SD 1.x/2.x: tell them apart by cross_attention_dim) or "sdxl"
    cross_attention_dim: int
    addition_embed_type: str | None
    conditioning_channels: int
    hint_scale_factor: int  # image pixels per latent pixel its hint embedding assumes
    residuals: list[dict[str, Any]]  # {"name", "channels"}: the U-Net inputs it feeds, in order
    graphs: dict[str, GraphEntry]
    precision: str = "fp32"
    optimized_for: str = "none"
    source: dict[str, Any] = field(default_factory=dict)
    kind: str = CONTROLNET_KIND
    schema_version: int = SCHEMA_VERSION


def write_controlnet_manifest(folder: str | os.PathLike, manifest: ControlNetManifest) -> Path:
    return write_manifest(folder, manifest)


def read_controlnet_manifest(folder: str | os.PathLike) -> ControlNetManifest:
    """One ModelFolderError line for a folder that is not a complete ControlNet export."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ModelFolderError(f"{folder} is not an exported ControlNet (no {MANIFEST_NAME}): export one with "
                               f"`edgediff export CONTROLNET_SRC {folder}`")
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("kind") != CONTROLNET_KIND:
            raise ModelFolderError(f"{folder} holds a model, not a ControlNet: give a ControlNet folder")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ModelFolderError(f"{folder}: ControlNet manifest version {data.get('schema_version')!r} is not "
                                   f"supported (this edgediff reads {SCHEMA_VERSION}); re-export it")
        manifest = ControlNetManifest.from_dict(data)
    except ModelFolderError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as error:
        raise ModelFolderError(f"{path} is not a valid ControlNet manifest ({str(error)[:100]}); re-export it") from None
    if GRAPH not in manifest.graphs or not (folder / manifest.graphs[GRAPH].path).is_file():
        raise ModelFolderError(f"{folder}: the controlnet graph is missing; re-export it")
    return manifest


@dataclass
class ControlUnit:
    """One ControlNet and its hint; ``start``/``end``: the fraction of the steps where it acts."""

    model: str | os.PathLike
    image: Any
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    guess_mode: bool = False
    preprocess: str = "none"
    preprocess_model: str | os.PathLike | None = None  # an exported depth model, for preprocess="depth"


def control_units(control) -> list[ControlUnit]:
    """``control=[unit, ...]`` (dicts or ControlUnits) checked, one InputError line per problem."""
    if control is None:
        return []
    if isinstance(control, (dict, ControlUnit)):
        control = [control]
    units = []
    for index, unit in enumerate(control):
        if isinstance(unit, dict):
            unknown = sorted(set(unit) - {f.name for f in fields(ControlUnit)})
            if unknown or "model" not in unit or "image" not in unit:
                raise InputError(f"control unit {index}: needs 'model' and 'image'" +
                                 (f"; unknown keys {unknown}" if unknown else ""))
            unit = ControlUnit(**unit)
        if not isinstance(unit, ControlUnit):
            raise InputError(f"control unit {index} must be a dict or ControlUnit, not {type(unit).__name__}")
        number = lambda v: type(v) in (int, float) and math.isfinite(v)  # noqa: E731
        if not number(unit.scale):
            raise InputError(f"control unit {index}: scale must be a finite number, not {unit.scale!r}")
        if not (number(unit.start) and number(unit.end) and 0.0 <= unit.start < unit.end <= 1.0):
            raise InputError(f"control unit {index}: start and end must satisfy 0 <= start < end <= 1, "
                             f"not {unit.start!r}, {unit.end!r}")
        if unit.preprocess_model is not None and unit.preprocess != "depth":
            raise InputError(f"control unit {index}: preprocess_model is the depth model of preprocess='depth', "
                             f"not of {unit.preprocess!r}")
        units.append(unit)
    return units


def check_fits(net: ControlNetManifest, folder, model: Manifest) -> None:
    """A ControlNet fits a base whose U-Net takes its residuals, text width and extra embeddings."""
    unet = model.graphs["unet"]
    if not unet.optional_inputs:
        raise ModelFolderError("this model was exported before ControlNet support (its U-Net takes no "
                               "ControlNet residuals): re-export it with this version of edgediff")
    width = next((s.shape[-1] for s in unet.inputs if s.name == "encoder_hidden_states"), None)
    takes = {s.name for s in unet.inputs}
    extra = {s.name for s in net.graphs[GRAPH].inputs} - {"sample", "timestep", "encoder_hidden_states",
                                                         "controlnet_cond"}
    layout = [(s.name, s.shape[1]) for s in unet.optional_inputs]
    if (net.cross_attention_dim != width or not extra <= takes or net.hint_scale_factor != model.vae_scale_factor
            or [(r["name"], r["channels"]) for r in net.residuals] != layout):
        raise InputError(f"ControlNet {folder} (family {net.family}, cross-attention {net.cross_attention_dim}) "
                         f"does not fit this {model.family} model (cross-attention {width}): use a ControlNet "
                         f"trained for {model.family}")
    if net.conditioning_channels != 3:
        raise InputError(f"ControlNet {folder} takes {net.conditioning_channels}-channel hints; edgediff feeds RGB")


def keeps(step: int, steps: int, start: float, end: float) -> bool:
    """Whether a unit acts at ``step``: diffusers' ``controlnet_keep`` (its
    control_guidance_start/end), A1111's guidance start/end."""
    return not (step / steps < start or (step + 1) / steps > end)


def guess_scales(count: int, scale: float) -> np.ndarray:
    """Guess mode: residuals weighted from 0.1 (shallowest) to 1.0 (mid block), as diffusers'
    ``ControlNetModel.forward`` (``torch.logspace(-1, 0, n)``)."""
    return (np.logspace(-1, 0, count) * scale).astype(np.float32)


class Control:
    """The units of one generation as a U-Net input provider (runtime/modes.py): per U-Net call,
    the units' summed scaled residuals join the feed.

    ``timesteps``: the plan's model timesteps, which give each call its step. Which guidance half
    a call holds is told by its text context (``bind``): guess mode runs a ControlNet on the
    conditional half only, and its residuals for the other half are zero.
    """

    graphs: tuple[tuple[str, str], ...] = ()  # its sessions live beside the U-Net's (ControlNets)

    def __init__(self, units: list[ControlUnit], manifests: list[ControlNetManifest], hints: list[np.ndarray],
                 timesteps, nets: "ControlNets"):
        self.units, self.manifests, self.hints, self.nets = units, manifests, hints, nets
        self.timesteps = np.asarray(timesteps, dtype=np.float64)
        self.seconds = 0.0
        self._halves: tuple = (None, None)

    def bind(self, cond: dict, uncond: dict | None) -> "Control":
        """The guidance halves' contexts, as the denoiser passes them (runtime/denoiser.py)."""
        self._halves = (cond.get("encoder_hidden_states"), (uncond or {}).get("encoder_hidden_states"))
        return self

    def __call__(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        text = feed.get("encoder_hidden_states")
        rows = "cond" if text is self._halves[0] else "uncond" if text is self._halves[1] else "both"
        context = {k: v for k, v in feed.items() if k not in ("sample", "timestep")}
        return {**feed, **self.residuals(feed["sample"], feed["timestep"], context, rows)}

    def step_of(self, t: float) -> int:
        """The sampling step a model timestep belongs to (a second-order sampler's intermediate
        evaluation counts as its step's)."""
        index = int(np.count_nonzero(self.timesteps >= t - 1e-4)) - 1
        return min(max(index, 0), len(self.timesteps) - 1)

    def residuals(self, x_in: np.ndarray, t: np.ndarray, context: dict, rows: str) -> dict[str, np.ndarray]:
        """``rows``: "both" (unconditional half then conditional), "cond" or "uncond"."""
        started = time.perf_counter()
        step, total = self.step_of(float(t[0])), {}
        for unit, manifest, hint in zip(self.units, self.manifests, self.hints):
            if not keeps(step, len(self.timesteps), unit.start, unit.end) or (unit.guess_mode and rows == "uncond"):
                continue
            session = self.nets.session(unit.model, manifest)
            half = unit.guess_mode and rows == "both"
            pick = slice(x_in.shape[0] // 2, None) if half else slice(None)
            takes = {s.name for s in session.entry.inputs}
            feed = {name: value[pick] for name, value in context.items() if name in takes}
            outputs = session.run(sample=x_in[pick], timestep=t[pick], controlnet_cond=_rows(hint, x_in[pick]), **feed)
            scales = guess_scales(len(outputs), unit.scale) if unit.guess_mode else [np.float32(unit.scale)] * len(outputs)
            for spec, value, scale in zip(session.entry.outputs, outputs, scales):
                value = value * scale
                if half:  # diffusers: zeros for the unconditional half
                    value = np.concatenate([np.zeros_like(value), value])
                total[spec.name] = value if spec.name not in total else total[spec.name] + value
        self.seconds += time.perf_counter() - started
        return total


def _rows(hint: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The hint once per row of the batch (every prompt, both guidance halves)."""
    return np.ascontiguousarray(np.broadcast_to(hint, (x.shape[0], *hint.shape[1:])))


class ControlNets:
    """Open ControlNet sessions: kept between generations in memory="high", else closed after each
    (they stay resident beside the U-Net while it samples, in both modes)."""

    def __init__(self, open_session: Callable[[Path, GraphEntry, str], Any], memory: str):
        self._open, self.memory = open_session, memory
        self._cache: dict[Path, tuple[ControlNetManifest, Any]] = {}
        self._estimators: dict[Path, DepthEstimator] = {}

    def manifest(self, folder) -> ControlNetManifest:
        folder = Path(folder)
        if folder.resolve() in self._cache:
            return self._cache[folder.resolve()][0]
        if not folder.is_dir():
            raise InputError(f"ControlNet folder not found: {folder}")
        return read_controlnet_manifest(folder)

    def session(self, folder, manifest: ControlNetManifest):
        key = Path(folder).resolve()
        if key not in self._cache:
            self._cache[key] = (manifest, self._open(key, manifest.graphs[GRAPH], manifest.optimized_for))
        return self._cache[key][1]

    def estimator(self, folder) -> DepthEstimator:
        """The depth model of ``preprocess="depth"`` (runtime/depth.py), opened once per folder."""
        key = Path(folder).resolve()
        if key not in self._estimators:
            if not Path(folder).is_dir():
                raise InputError(f"depth model folder not found: {folder}")
            manifest = read_depth_manifest(folder)
            self._estimators[key] = DepthEstimator(manifest, self._open(key, manifest.graphs[DEPTH_GRAPH],
                                                                        manifest.optimized_for, DEPTH_GRAPH))
        return self._estimators[key]

    def release_estimators(self) -> None:
        """memory="low": the depth models go once the hints are made, before the U-Net loads."""
        if self.memory == "low":
            for estimator in self._estimators.values():
                estimator.close()
            self._estimators.clear()

    @contextmanager
    def resident(self):
        """Sessions opened inside stay open for the sampling loop; memory="low" closes them after it."""
        try:
            yield self
        finally:
            if self.memory == "low":
                for _, session in self._cache.values():
                    session.close()
                self._cache.clear()


def prepare(units: list[ControlUnit], nets: ControlNets, model: Manifest, width: int, height: int,
            provider: str = "cpu") -> list[tuple[ControlUnit, ControlNetManifest, np.ndarray]]:
    """Check each unit against the model and make its hint, before any model runs."""
    if units and provider == "openvino":  # measured: OpenVINO's ONNX reader makes defaulted inputs constants
        raise InputError("ControlNet does not run on --provider openvino yet (OpenVINO reads the U-Net's residual "
                         "inputs as constants); use --provider cpu")
    prepared = []
    try:
        for index, unit in enumerate(units):
            manifest = nets.manifest(unit.model)
            check_fits(manifest, unit.model, model)
            estimator = nets.estimator(unit.preprocess_model) if unit.preprocess == "depth" and unit.preprocess_model else None
            picture = preprocess(unit.image, unit.preprocess, f"control image {index}", estimator)
            prepared.append((unit, manifest, hint_tensor(picture, width, height)))
    finally:
        nets.release_estimators()
    return prepared


def control_flag(text: str, *, preprocess: str = "none", start: float = 0.0, end: float = 1.0,
                 guess_mode: bool = False, preprocess_model: str | None = None) -> ControlUnit:
    """The CLI's ``--control FOLDER:IMAGE[:SCALE]``; a path may hold ':' itself (``C:\\...``): the
    folder is the longest prefix that is a folder."""
    parts, scale = text.split(":"), 1.0
    if len(parts) >= 3:
        try:
            scale, parts = float(parts[-1]), parts[:-1]
        except ValueError:
            pass
    if len(parts) < 2 or not all(parts):
        raise InputError(f"--control takes FOLDER:IMAGE[:SCALE], not {text!r}")
    cut = next((cut for cut in range(len(parts) - 1, 0, -1) if Path(":".join(parts[:cut])).is_dir()), 1)
    return ControlUnit(model=":".join(parts[:cut]), image=":".join(parts[cut:]), scale=scale, start=start, end=end,
                       guess_mode=guess_mode, preprocess=preprocess,
                       preprocess_model=preprocess_model)


def infotext_fields(units: list[ControlUnit] | None) -> dict[str, str]:
    """``ControlNet N`` entries as sd-webui-controlnet writes them into A1111's parameters text. Its
    "Just Resize" is diffusers' hint resize; guess mode is its "ControlNet is more important"
    (formerly Guess Mode); the model hash is the graph's sha256, shortened as it shortens its files'."""
    fields_ = {}
    for index, unit in enumerate(units or ()):
        sha256 = read_controlnet_manifest(unit.model).graphs[GRAPH].sha256
        mode = "ControlNet is more important" if unit.guess_mode else "Balanced"
        fields_[f"ControlNet {index}"] = (  # quoted by the infotext writer, as it contains commas
            f"Module: {unit.preprocess}, Model: {Path(unit.model).name} [{sha256[:8]}], Weight: {unit.scale:g}, "
            f"Resize Mode: Just Resize, Guidance Start: {unit.start:g}, Guidance End: {unit.end:g}, "
            f"Control Mode: {mode}")
    return fields_
