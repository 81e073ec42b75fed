"""The exporter/runtime contract: ``manifest.json`` and the tensor specs it carries.

The manifest holds every constant the runtime needs (scaling factor, prediction type, scheduler
config, graph inputs), so nothing is keyed on a model's name. The exporter writes it last and
atomically; its presence means the export is complete.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelFolderError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
GRAPH_NAMES = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
REQUIRED_GRAPHS = ("text_encoder", "unet", "vae_decoder")

# ONNX element-type names as the manifest spells them, and their NumPy dtypes.
NUMPY_DTYPES = {"float32": "float32", "float16": "float16", "int32": "int32", "int64": "int64"}


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. ``shape`` entries are ints or symbolic axis names."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    @classmethod
    def from_dict(cls, data: dict) -> "TensorSpec":
        return cls(data["name"], data["dtype"], tuple(data["shape"]))

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass
class GraphEntry:
    """A graph as the manifest records it: where it is, what it takes, how it was checked."""

    path: str
    sha256: str
    precision: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    kept_fp32: list[str] = field(default_factory=list)
    validation: dict[str, Any] = field(default_factory=dict)
    # Original torch weight name -> {"init": initializer, "perm": axes, "cols": spans} (exporter/weight_map.py):
    # where LoRAs and embeddings patch this graph. Empty for exports made before it existed.
    weights: dict[str, dict] = field(default_factory=dict)
    # Weight-only quantization of a graph with precision "int4": bits, block size, what stays float.
    quantization: dict[str, Any] = field(default_factory=dict)
    # Inputs the graph defaults to zeros when not fed (a U-Net's ControlNet residuals); empty for
    # exports made before ControlNet, whose U-Nets take none.
    optional_inputs: list[TensorSpec] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict) -> "GraphEntry":
        return cls(
            path=data["path"],
            sha256=data["sha256"],
            precision=data["precision"],
            inputs=[TensorSpec.from_dict(t) for t in data["inputs"]],
            outputs=[TensorSpec.from_dict(t) for t in data["outputs"]],
            kept_fp32=list(data.get("kept_fp32", [])),
            validation=dict(data.get("validation", {})),
            weights=dict(data.get("weights", {})),
            quantization=dict(data.get("quantization", {})),
            optional_inputs=[TensorSpec.from_dict(t) for t in data.get("optional_inputs", [])],
        )

    def to_dict(self) -> dict:
        data = asdict(self)
        data["inputs"] = [t.to_dict() for t in self.inputs]
        data["outputs"] = [t.to_dict() for t in self.outputs]
        data["optional_inputs"] = [t.to_dict() for t in self.optional_inputs]
        return data


@dataclass
class Manifest:
    family: str
    prediction_type: str
    scheduler: dict[str, Any]
    latent_channels: int
    vae_scale_factor: int
    scaling_factor: float
    shift_factor: float
    latent_multiple: int
    default_size: int
    tokenizer: dict[str, Any]
    graphs: dict[str, GraphEntry]
    # Text encoders in the order their hidden states are concatenated, each with its tokenizer
    # (SDXL has two); manifests before SDXL name one, ``tokenizer`` with ``text_encoder``.
    text_encoders: list[dict[str, Any]] = field(default_factory=list)
    # Data for the U-Net's extra conditioning inputs: SDXL's size ids, zeroed empty negatives.
    conditioning: dict[str, Any] = field(default_factory=dict)
    # Tiled VAE (runtime/vae_tiling.py): tile sizes from the VAE's config and the image area above
    # which tiling is automatic; filled with the same rule for exports made before it existed.
    vae_tiling: dict[str, Any] = field(default_factory=dict)
    alphas_cumprod: str = "alphas_cumprod.npy"
    # The x4 upscaler (runtime/upscale.py): noise levels, the low-resolution schedule, the U-Net tile;
    # empty for every other model.
    upscale: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"
    optimized_for: str = "none"
    source: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self):
        if not self.text_encoders and "text_encoder" in self.graphs:  # manifests from before text_encoders
            self.text_encoders = [{"graph": "text_encoder", "tokenizer": self.tokenizer}]
        self.vae_tiling = {**vae_tiling_rule(self.default_size, self.vae_scale_factor), **self.vae_tiling}

    @property
    def size_multiple(self) -> int:
        """Image width and height must be multiples of this many pixels."""
        return self.latent_multiple * self.vae_scale_factor

    def to_dict(self) -> dict:
        data = asdict(self)
        data["graphs"] = {name: g.to_dict() for name, g in self.graphs.items()}
        if not data["upscale"]:  # only the x4 upscaler has one; other manifests stay as they were
            del data["upscale"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Manifest":
        """Build from parsed JSON; a damaged manifest raises ModelFolderError naming the field."""
        check_manifest_data(data)
        data = dict(data)
        data["graphs"] = {name: GraphEntry.from_dict(g) for name, g in data["graphs"].items()}
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def vae_tiling_rule(tile_pixels: int, vae_scale_factor: int) -> dict[str, Any]:
    """Tiles of the VAE's ``sample_size`` with a quarter overlap, as diffusers' ``enable_tiling()``.
    Automatic above four tiles' area (twice the VAE's size each way): tiling costs 1.5x the
    decoder's work or more (the overlaps) and changes the picture, since each tile's GroupNorm and
    attention see that tile only (benchmarks/RESULTS.md, "Tiled VAE"), so below that it is left to
    the memory check, which tiles when a whole decode would not fit."""
    tile_latent = max(1, tile_pixels // vae_scale_factor)
    return {"tile_latent": tile_latent, "tile_pixels": tile_latent * vae_scale_factor, "overlap": 0.25,
            "auto_above_pixels": 4 * (tile_latent * vae_scale_factor) ** 2}


# What each field must hold. A check returns None when the value is fine, else what was expected.
def _int(minimum=0):
    return lambda v: None if type(v) is int and v >= minimum else f"a whole number >= {minimum}"


def _number(positive=False):
    def check(v):
        ok = type(v) in (int, float) and math.isfinite(v) and (v > 0 or not positive)
        return None if ok else ("a finite number > 0" if positive else "a finite number")
    return check


def _of(kind, name):
    return lambda v: None if isinstance(v, kind) and not isinstance(v, bool) else name


def _one_of(*choices):
    return lambda v: None if v in choices else "one of " + ", ".join(map(str, choices))


def _optional(check):
    return lambda v: None if v is None else check(v)


_text = _of(str, "text")
_table = _of(dict, "an object")
FIELDS = {
    "family": _text, "prediction_type": _one_of("epsilon", "v_prediction", "sample", "flow"), "scheduler": _table,
    "latent_channels": _int(1), "vae_scale_factor": _int(1), "scaling_factor": _number(positive=True),
    "shift_factor": _number(), "latent_multiple": _int(1), "default_size": _int(1), "tokenizer": _table,
    "graphs": _table,
}
OPTIONAL_FIELDS = {"alphas_cumprod": _text, "precision": _text, "optimized_for": _text, "source": _table,
                   "vae_tiling": _table, "conditioning": _table, "upscale": _table}
VAE_TILING_FIELDS = {"tile_latent": _int(1), "tile_pixels": _int(1), "auto_above_pixels": _int(0),
                     "overlap": lambda v: None if type(v) in (int, float) and 0 <= v < 1 else "a number in [0, 1)"}
TOKENIZER_FIELDS = {"path": _text, "max_length": _int(3), "pad_token_id": _int(0), "bos_token_id": _int(0),
                    "eos_token_id": _int(0)}
# The scheduler keys the samplers read; other keys are diffusers' and not ours to judge.
SCHEDULER_FIELDS = {
    "num_train_timesteps": _optional(_int(1)), "steps_offset": _optional(_int(0)),
    "original_inference_steps": _optional(_int(1)), "timestep_spacing": _optional(_text),
    "beta_schedule": _optional(_text), "prediction_type": _optional(_text),
    "timestep_scaling": _optional(_number(positive=True)), "set_alpha_to_one": _optional(lambda v: None if isinstance(v, bool) else "true or false"),
    "_use_default_values": _optional(_of(list, "a list")),
}
GRAPH_FIELDS = {"path": _text, "sha256": _text, "precision": _text, "inputs": _of(list, "a list"),
                "outputs": _of(list, "a list")}
OPTIONAL_GRAPH_FIELDS = {"kept_fp32": _of(list, "a list"), "validation": _table, "quantization": _table,
                         "weights": lambda v: None if isinstance(v, dict) and all(isinstance(w, dict) for w in v.values())
                         else "an object of objects",
                         "optional_inputs": _of(list, "a list")}
# Each text encoder: its graph and the tokenizer feeding it (the tokenizer's own fields depend on its kind).
TEXT_ENCODER_FIELDS = {"graph": _text, "tokenizer": lambda v: None if isinstance(v, dict) and isinstance(v.get("path"), str)
                       else "an object with a path"}


def _axis(v):
    return (type(v) is int and v > 0) or (isinstance(v, str) and bool(v))


TENSOR_FIELDS = {"name": _of(str, "text"), "dtype": _one_of(*NUMPY_DTYPES),
                 "shape": lambda v: None if isinstance(v, list) and all(map(_axis, v))
                 else "a list of sizes > 0 or axis names"}


def _fail(field: str, expected: str, value: Any) -> ModelFolderError:
    shown = repr(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return ModelFolderError(f"manifest field '{field}' must be {expected}, not {shown}; the file is damaged "
                            "or was edited: re-export the model")


def _check_fields(data: Any, where: str, required: dict, optional: dict | None = None) -> None:
    if not isinstance(data, dict):
        raise _fail(where or "(top level)", "an object", data)
    prefix = f"{where}." if where else ""
    for key, check in {**required, **(optional or {})}.items():
        if key not in data:
            if key in required:
                raise ModelFolderError(f"manifest field '{prefix}{key}' is missing; the file is damaged or "
                                       "was edited: re-export the model")
            continue
        expected = check(data[key])
        if expected is not None:
            raise _fail(prefix + key, expected, data[key])


def check_manifest_data(data: Any) -> None:
    """Check a parsed manifest field by field, before anything uses it."""
    if not isinstance(data, dict):
        raise _fail("(top level)", "an object", data)
    if data.get("kind") == "controlnet":
        raise ModelFolderError("this folder holds a ControlNet, not a model: pass it as a control unit "
                               "(--control FOLDER:IMAGE, control=[{'model': FOLDER, ...}])")
    if data.get("kind") == "depth":
        raise ModelFolderError("this folder holds a depth model, not a model: pass it as a control unit's "
                               "preprocess_model (--control-preprocess depth --control-preprocess-model FOLDER)")
    if data.get("kind") == "pixel_upscaler":
        raise ModelFolderError("this folder holds a pixel upscaler, not a model: use it as the hires fix's upscaler "
                               "(--hires-upscaler FOLDER, hires={'upscaler': FOLDER})")
    version = data.get("schema_version")
    if type(version) is not int or version != SCHEMA_VERSION:
        newer = type(version) is int and version > SCHEMA_VERSION
        raise ModelFolderError(
            f"manifest schema version {version!r} is not supported (this edgediff reads {SCHEMA_VERSION}); "
            + ("upgrade edgediff or " if newer else "") + "re-export the model with this version of edgediff")
    _check_fields(data, "", FIELDS, OPTIONAL_FIELDS)
    _check_fields(data["tokenizer"], "tokenizer", TOKENIZER_FIELDS)
    _check_fields(data["scheduler"], "scheduler", {}, SCHEDULER_FIELDS)
    for name, graph in data["graphs"].items():
        _check_fields(graph, f"graphs.{name}", GRAPH_FIELDS, OPTIONAL_GRAPH_FIELDS)
        for kind in ("inputs", "outputs", "optional_inputs"):
            if kind != "optional_inputs" and not graph[kind]:
                raise _fail(f"graphs.{name}.{kind}", "a non-empty list", graph[kind])
            for index, tensor in enumerate(graph.get(kind, [])):
                _check_fields(tensor, f"graphs.{name}.{kind}[{index}]", TENSOR_FIELDS)
    _check_text_encoders(data)
    if "vae_tiling" in data:
        tiling = data["vae_tiling"]
        _check_fields(tiling, "vae_tiling", VAE_TILING_FIELDS)
        if tiling["tile_pixels"] != tiling["tile_latent"] * data["vae_scale_factor"]:
            raise _fail("vae_tiling.tile_pixels", f"tile_latent * vae_scale_factor ({tiling['tile_latent'] * data['vae_scale_factor']})",
                        tiling["tile_pixels"])
        if int(tiling["tile_latent"] * (1 - tiling["overlap"])) < 1:
            raise _fail("vae_tiling.overlap", "small enough to leave a stride of one latent pixel", tiling["overlap"])
    if data["default_size"] % (data["latent_multiple"] * data["vae_scale_factor"]):
        raise _fail("default_size", f"a multiple of {data['latent_multiple'] * data['vae_scale_factor']}",
                    data["default_size"])


def _check_text_encoders(data: dict) -> None:
    encoders = data.get("text_encoders", [])
    if not isinstance(encoders, list):
        raise _fail("text_encoders", "a list", encoders)
    for index, encoder in enumerate(encoders):
        _check_fields(encoder, f"text_encoders[{index}]", TEXT_ENCODER_FIELDS)
        if encoder["graph"] not in data["graphs"]:
            raise _fail(f"text_encoders[{index}].graph", "the name of a graph in 'graphs'", encoder["graph"])


def read_manifest(model_dir: str | os.PathLike) -> Manifest:
    """Read and check ``manifest.json``; every failure is one clear ``ModelFolderError``."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise ModelFolderError(f"model folder not found: {model_dir}")
    if not model_dir.is_dir():
        raise ModelFolderError(f"not a folder: {model_dir}")
    path = model_dir / MANIFEST_NAME
    if not path.is_file():
        raise ModelFolderError(
            f"{model_dir} has no {MANIFEST_NAME}: not an exported edgediff model, or an export "
            "that did not finish (run `edgediff export` again)"
        )
    try:
        manifest = Manifest.from_dict(json.loads(path.read_text()))
    except ModelFolderError:
        raise
    except (ValueError, RecursionError) as error:  # not JSON (or nested beyond reason)
        raise ModelFolderError(f"{path} is not a valid edgediff manifest ({str(error)[:120]})") from None
    except OSError as error:
        raise ModelFolderError(f"cannot read {path}: {error.strerror or error}") from None
    missing = [name for name in REQUIRED_GRAPHS if name not in manifest.graphs]
    if missing:
        raise ModelFolderError(f"{path} lists no {', '.join(missing)} graph")
    for name, graph in manifest.graphs.items():
        if not (model_dir / graph.path).is_file():
            raise ModelFolderError(f"{name} graph is missing: {model_dir / graph.path}")
    if manifest.alphas_cumprod and not (model_dir / manifest.alphas_cumprod).is_file():  # "": flow matching
        raise ModelFolderError(f"{model_dir / manifest.alphas_cumprod} is missing")
    for encoder in manifest.text_encoders:
        if encoder["graph"] not in manifest.graphs:
            raise ModelFolderError(f"{path} lists no {encoder['graph']} graph")
        if not (model_dir / encoder["tokenizer"]["path"]).is_file():
            raise ModelFolderError(f"tokenizer is missing: {model_dir / encoder['tokenizer']['path']}")
    return manifest


class FolderManifest:
    """``to_dict``/``from_dict`` of the dataclass manifests of side folders (ControlNet, depth model,
    pixel upscaler): their ``graphs`` are GraphEntry objects; unknown keys are ignored."""

    def to_dict(self) -> dict:
        data = asdict(self)
        data["graphs"] = {name: g.to_dict() for name, g in self.graphs.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict):
        from dataclasses import fields

        data = dict(data)
        data["graphs"] = {name: GraphEntry.from_dict(g) for name, g in data["graphs"].items()}
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def write_manifest(model_dir: str | os.PathLike, manifest: Manifest | FolderManifest) -> Path:
    """Write ``manifest.json`` atomically (temporary file, then rename)."""
    path = Path(model_dir) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
