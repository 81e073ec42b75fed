"""LoRA files applied at run time: W' = W + weight * (alpha / rank) * up @ down, in NumPy.

Formats: kohya (``lora_unet_*`` / ``lora_te_*`` with ``lora_down`` / ``lora_up`` / ``alpha``,
LoCon convolutions included: down is a k x k convolution, up a 1 x 1) and diffusers/PEFT
(``unet.<module>.lora_A.weight`` / ``lora_B``, older ``.lora.down`` / ``.lora.up``). Module names
are diffusers' (kohya writes them with ``_`` for ``.``), matched against the weight map the exporter
stored per graph, which says which initializer holds each weight and in what layout. The patched
initializers go to ONNX Runtime at session creation (sessions.py); the graph is never re-optimized.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import EdgediffError
from .manifest import GraphEntry
from .onnx_weights import TensorLocation
from .tensor_files import read_tensors

# The graph each LoRA component patches; SDXL's second text encoder has no graph here yet.
COMPONENT_GRAPHS = {"unet": "unet", "text_encoder": "text_encoder"}
_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                   "lora_te2_": "text_encoder_2"}
_PEFT_PAIRS = ((".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight"),
               (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"))
_OLD_PROCESSOR = {"processor.to_q_lora": "to_q", "processor.to_k_lora": "to_k", "processor.to_v_lora": "to_v",
                  "processor.to_out_lora": "to_out.0"}
LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?(?::[^>]*)?>")


class LoraError(EdgediffError):
    """A LoRA or embedding file that cannot be used with this model."""


def extract_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """Strip A1111's ``<lora:name:weight>`` tags from a prompt: (prompt without them, [(name, weight)])."""
    tags = []
    for match in LORA_TAG.finditer(prompt):
        text = (match.group(2) or "1").strip()
        try:
            tags.append((match.group(1).strip(), float(text)))
        except ValueError:
            raise LoraError(f"bad weight {text!r} in {match.group(0)}") from None
    return re.sub(r"\s{2,}", " ", LORA_TAG.sub("", prompt)).strip(), tags


@dataclass(frozen=True)
class LoraLayer:
    component: str  # "unet", "text_encoder", ...
    module: str  # diffusers module path ("down_blocks.1.attentions.0...to_q"), or kohya's flat name
    down: np.ndarray  # (rank, in[, kh, kw])
    up: np.ndarray  # (out, rank[, 1, 1])
    alpha: float | None  # None: scale 1, as diffusers does without an alpha
    kohya: bool

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.down.shape[0]

    def delta(self, shape: tuple[int, ...]) -> np.ndarray:
        """up @ down in the shape of the weight it adds to (conv kernels flattened, then restored)."""
        rank = self.down.shape[0]
        if self.down.ndim == 4 and len(shape) == 2:  # a convolution's LoRA on a Linear: another model
            raise ValueError(shape)
        product = self.up.reshape(self.up.shape[0], rank) @ self.down.reshape(rank, -1)
        if product.size != int(np.prod(shape)) or product.shape[0] != shape[0]:
            raise ValueError(product.shape)
        return product.reshape(shape)


@dataclass(frozen=True)
class LoraFile:
    path: Path
    layers: tuple[LoraLayer, ...]

    @property
    def name(self) -> str:
        return self.path.stem


def read_lora(path: str | Path, *, allow_pickle: bool = False) -> LoraFile:
    path = Path(path)
    tensors, metadata = read_tensors(path, "LoRA", allow_pickle=allow_pickle)
    layers = _kohya_layers(tensors) or _peft_layers(tensors, metadata)
    if not layers:
        raise LoraError(f"{path} is not a LoRA (no lora_down/lora_up or lora_A/lora_B weights)")
    return LoraFile(path, tuple(layers))


def _kohya_layers(tensors: dict) -> list[LoraLayer]:
    layers = []
    for key, down in tensors.items():
        if not key.endswith(".lora_down.weight"):
            continue
        name = key[: -len(".lora_down.weight")]
        prefix = next((p for p in _KOHYA_PREFIXES if name.startswith(p)), None)
        up = tensors.get(f"{name}.lora_up.weight")
        if prefix is None or up is None:
            continue
        alpha = tensors.get(f"{name}.alpha")
        layers.append(LoraLayer(_KOHYA_PREFIXES[prefix], name[len(prefix):], down, up,
                                None if alpha is None else float(alpha), kohya=True))
    return layers


def _peft_layers(tensors: dict, metadata: dict) -> list[LoraLayer]:
    # diffusers stores PEFT's lora_alpha and r per component in the file's metadata, when it stores them.
    config = json.loads(metadata.get("lora_adapter_metadata", "{}") or "{}")
    layers = []
    for key, down in tensors.items():
        pair = next((p for p in _PEFT_PAIRS if key.endswith(p[0])), None)
        if pair is None or "." not in key:
            continue
        stem = key[: -len(pair[0])]
        up = tensors.get(stem + pair[1])
        if up is None:
            continue
        component, module = stem.split(".", 1)
        for old, new in _OLD_PROCESSOR.items():
            module = module.replace(old, new)
        alpha = tensors.get(f"{stem}.alpha")
        if alpha is None and f"{component}.lora_alpha" in config:
            alpha = config[f"{component}.lora_alpha"] * down.shape[0] / config.get(f"{component}.r", down.shape[0])
        layers.append(LoraLayer(component, module, down, up, None if alpha is None else float(alpha), kohya=False))
    return layers


def param_shape(entry: dict, loc: TensorLocation) -> tuple[int, ...]:
    """The torch shape of a mapped weight, from its initializer's shape and layout."""
    shape = loc.shape
    if "cols" in entry:
        shape = (shape[0], sum(b - a for a, b in entry["cols"]))
    if "perm" in entry:
        inverse = np.argsort(entry["perm"])
        shape = tuple(shape[i] for i in inverse)
    return tuple(shape)


def lora_deltas(lora: LoraFile, weight: float, graphs: dict[str, GraphEntry], index_of,
                warn) -> dict[str, list[tuple[str, np.ndarray]]]:
    """{graph: [(torch weight name, weight * scale * up @ down)]}; one warning line for what matches nothing.

    ``index_of(graph)`` gives that graph's initializer index (onnx_weights.initializer_index).
    """
    if not any(graphs[g].weights for g in COMPONENT_GRAPHS.values() if g in graphs):
        raise LoraError("this model was exported without a weight map (before LoRA support): re-export it "
                        "with this edgediff to use LoRAs")
    tables = {}
    for component, graph in COMPONENT_GRAPHS.items():
        modules = {key[: -len(".weight")]: key for key in graphs[graph].weights} if graph in graphs else {}
        tables[component] = (graph, modules, {m.replace(".", "_"): m for m in modules})
    deltas: dict[str, list] = {}
    unmatched = []
    for layer in lora.layers:
        graph, modules, kohya = tables.get(layer.component, (None, {}, {}))
        module = kohya.get(layer.module) if layer.kohya else layer.module
        key = modules.get(module) if module is not None else None
        if key is None:
            unmatched.append(f"{layer.component}.{layer.module}")
            continue
        entry = graphs[graph].weights[key]
        shape = param_shape(entry, index_of(graph)[entry["init"]])
        try:
            delta = layer.delta(shape)
        except ValueError:
            raise LoraError(f"{lora.path.name} does not fit this model: {layer.component}.{module} is "
                            f"{'x'.join(map(str, shape))} here but the LoRA gives "
                            f"{'x'.join(map(str, layer.up.shape[:1] + layer.down.shape[1:]))} "
                            f"(a LoRA for another architecture, e.g. SD 1.x on SD 2.x?)") from None
        deltas.setdefault(graph, []).append((key, np.float32(weight * layer.scale) * delta))
    if unmatched and len(unmatched) == len(lora.layers):
        raise LoraError(f"{lora.path.name}: none of its {len(unmatched)} layers match this model "
                        f"(e.g. {unmatched[0]}): a LoRA for another architecture?")
    if unmatched:
        warn(f"{lora.path.name}: {len(unmatched)} of {len(lora.layers)} LoRA layers match nothing in this "
             f"model and are ignored (e.g. {', '.join(unmatched[:3])})")
    return deltas


def merge(index: dict[str, TensorLocation], weights: dict[str, dict],
          deltas: list[tuple[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Patched initializers {name: array in the graph's dtype}: base read from the graph file, float32 math."""
    work: dict[str, np.ndarray] = {}
    for key, delta in deltas:
        entry = weights[key]
        name = entry["init"]
        if name not in work:
            work[name] = index[name].read().astype(np.float32)
        if "perm" in entry:
            delta = delta.transpose(entry["perm"])
        if "cols" in entry:
            picked = np.concatenate([np.arange(a, b) for a, b in entry["cols"]])
            work[name][:, picked] += delta
        else:
            work[name] += delta
    return {name: array.astype(index[name].dtype, copy=False) for name, array in work.items()}
