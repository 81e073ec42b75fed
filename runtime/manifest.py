"""The exporter/runtime contract: ``manifest.json`` and the tensor specs it carries.

The manifest holds every constant the runtime needs (scaling factor, prediction type, scheduler
config, graph inputs), so nothing is keyed on a model's name. The exporter writes it last and
atomically; its presence means the export is complete.
"""
from __future__ import annotations

import hashlib
import json
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
        )

    def to_dict(self) -> dict:
        data = asdict(self)
        data["inputs"] = [t.to_dict() for t in self.inputs]
        data["outputs"] = [t.to_dict() for t in self.outputs]
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
    alphas_cumprod: str = "alphas_cumprod.npy"
    precision: str = "fp32"
    optimized_for: str = "none"
    source: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @property
    def size_multiple(self) -> int:
        """Image width and height must be multiples of this many pixels."""
        return self.latent_multiple * self.vae_scale_factor

    def to_dict(self) -> dict:
        data = asdict(self)
        data["graphs"] = {name: g.to_dict() for name, g in self.graphs.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Manifest":
        data = dict(data)
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ModelFolderError(
                f"manifest schema version {version!r} is not supported (this edgediff reads "
                f"{SCHEMA_VERSION}); re-export the model with this version of edgediff"
            )
        data["graphs"] = {name: GraphEntry.from_dict(g) for name, g in data["graphs"].items()}
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


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
    except (ValueError, KeyError, TypeError) as error:
        raise ModelFolderError(f"{path} is not a valid edgediff manifest ({error})") from None
    missing = [name for name in REQUIRED_GRAPHS if name not in manifest.graphs]
    if missing:
        raise ModelFolderError(f"{path} lists no {', '.join(missing)} graph")
    for name, graph in manifest.graphs.items():
        if not (model_dir / graph.path).is_file():
            raise ModelFolderError(f"{name} graph is missing: {model_dir / graph.path}")
    if not (model_dir / manifest.alphas_cumprod).is_file():
        raise ModelFolderError(f"{model_dir / manifest.alphas_cumprod} is missing")
    if not (model_dir / manifest.tokenizer["path"]).is_file():
        raise ModelFolderError(f"tokenizer is missing: {model_dir / manifest.tokenizer['path']}")
    return manifest


def write_manifest(model_dir: str | os.PathLike, manifest: Manifest) -> Path:
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
