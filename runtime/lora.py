"""LoRA files applied at run time: W' = W + weight * (alpha / rank) * up @ down, in NumPy.

Formats: kohya (``lora_unet_*`` / ``lora_te_*``, SDXL's ``lora_te1_*`` / ``lora_te2_*``, with
``lora_down`` / ``lora_up`` / ``alpha``, LoCon convolutions included: down is a k x k convolution, up
a 1 x 1) and diffusers/PEFT (``unet.`` / ``text_encoder.`` / ``text_encoder_2.<module>.lora_A.weight``
/ ``lora_B``, older ``.lora.down`` / ``.lora.up``). SD 3's are ``transformer.`` (kohya
``lora_transformer_``) and CLIP-L / CLIP-G as above (kohya ``lora_te1_`` / ``lora_te2_``); its T5
(``text_encoder_3.``, kohya ``lora_te3_``) is refused, as diffusers does not load it. Module names
are diffusers' (kohya writes them with ``_`` for ``.``, and SDXL U-Net names in the original SGM
numbering: ``sgm_to_diffusers``), matched against the weight map the exporter stored per graph, which
says which initializer holds each weight and in what layout. The patched initializers go to ONNX
Runtime at session creation (sessions.py); the graph is never re-optimized.
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

_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_transformer_": "transformer", "lora_te_": "text_encoder",
                   "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2", "lora_te3_": "text_encoder_3"}
# LoRA components no graph takes, refused rather than dropped: SD 3's T5 (kohya's lora_te3_), which
# diffusers' SD3LoraLoaderMixin does not load (it loads the transformer and the two CLIPs), so there is
# no reference to match, and whose 4.7 B-parameter graph gets no weight map.
_UNPATCHED = {"text_encoder_3": "T5"}
_PEFT_PAIRS = ((".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight"),
               (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"))
_OLD_PROCESSOR = {"processor.to_q_lora": "to_q", "processor.to_k_lora": "to_k", "processor.to_v_lora": "to_v",
                  "processor.to_out_lora": "to_out.0"}
FLOAT_PRECISIONS = ("fp32", "fp16")  # graphs whose weights are stored as trained, so a delta can be added
# kohya trains SDXL on the original (SGM) U-Net: its names, mapped to diffusers' module paths.
_SGM_FIXED = {"input_blocks_0_0": "conv_in", "out_2": "conv_out", "time_embed_0": "time_embedding_linear_1",
              "time_embed_2": "time_embedding_linear_2", "label_emb_0_0": "add_embedding_linear_1",
              "label_emb_0_2": "add_embedding_linear_2"}
_SGM_RESNET = {"in_layers_2": "conv1", "out_layers_3": "conv2", "emb_layers_1": "time_emb_proj",
               "skip_connection": "conv_shortcut"}
_SGM_BLOCK = re.compile(r"(input_blocks|output_blocks)_(\d+)_(\d+)_(.+)$")
_SGM_MIDDLE = re.compile(r"middle_block_(\d+)_(.+)$")
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


def component_graphs(manifest) -> dict[str, str]:
    """LoRA component -> the graph it patches: the denoiser (a U-Net's ``unet``, SD 3's
    ``transformer``: the module names in the weight map tell them apart), and the text encoders in
    manifest order under the names LoRA files give them (diffusers' ``text_encoder``, ``text_encoder_2``)."""
    graphs = {"unet": "unet", "transformer": "unet"}
    for position, encoder in enumerate(manifest.text_encoders):
        graphs["text_encoder" if position == 0 else f"text_encoder_{position + 1}"] = encoder["graph"]
    return graphs


def sgm_to_diffusers(name: str, layers_per_block: int) -> str:
    """A kohya SDXL U-Net name (``input_blocks_4_1_transformer_blocks_0_attn1_to_q``) as diffusers'
    module path with ``_`` for ``.``; other names are returned as they are.

    The original U-Net numbers its blocks flat: ``input_blocks`` 1.. hold each down block's resnets
    (then a downsampler, ``op``), ``layers_per_block + 1`` entries per block; ``output_blocks`` hold
    each up block's ``layers_per_block + 1`` resnets; inside an entry 0 is the resnet, 1 the
    attention, the last the up/downsampler.
    """
    if name in _SGM_FIXED:
        return _SGM_FIXED[name]
    per = layers_per_block + 1
    middle = _SGM_MIDDLE.match(name)
    if middle:
        part, rest = {0: "resnets_0", 1: "attentions_0", 2: "resnets_1"}.get(int(middle.group(1))), middle.group(2)
        return name if part is None else _sgm_inner(f"mid_block_{part}", part.startswith("resnets"), rest)
    block = _SGM_BLOCK.match(name)
    if not block:
        return name
    kind, index, inner, rest = block.group(1), int(block.group(2)), int(block.group(3)), block.group(4)
    if kind == "input_blocks":
        number, layer = divmod(index - 1, per)
        if rest == "op":
            return f"down_blocks_{number}_downsamplers_0_conv"
        where = f"down_blocks_{number}"
    else:
        number, layer = divmod(index, per)
        where = f"up_blocks_{number}"
        if rest == "conv" and inner > 0:  # the upsampler: after the attention, or after the resnet alone
            return f"{where}_upsamplers_0_conv"
    if inner == 0:
        return _sgm_inner(f"{where}_resnets_{layer}", True, rest)
    return _sgm_inner(f"{where}_attentions_{layer}", False, rest)


def _sgm_inner(where: str, resnet: bool, rest: str) -> str:
    return f"{where}_{_SGM_RESNET.get(rest, rest) if resnet else rest}"


def _layers_per_block(modules) -> int:
    """Resnets per down block, read from the U-Net's own weight names."""
    found = [int(m.group(1)) for m in map(re.compile(r"down_blocks\.\d+\.resnets\.(\d+)\.").match, modules) if m]
    return max(found, default=0) + 1


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


def lora_deltas(lora: LoraFile, weight: float, graphs: dict[str, GraphEntry], components: dict[str, str], index_of,
                warn) -> dict[str, list[tuple[str, np.ndarray]]]:
    """{graph: [(torch weight name, weight * scale * up @ down)]}; one warning line for what matches nothing.

    ``components`` maps each LoRA component to its graph (``component_graphs``); ``index_of(graph)``
    gives that graph's initializer index (onnx_weights.initializer_index).
    """
    _check_fits(lora, graphs, components)
    tables = {}
    for component, graph in components.items():
        modules = {key[: -len(".weight")]: key for key in graphs[graph].weights} if graph in graphs else {}
        tables[component] = (graph, modules, {m.replace(".", "_"): m for m in modules}, _layers_per_block(modules))
    deltas: dict[str, list] = {}
    unmatched = []
    for layer in lora.layers:
        graph, modules, kohya, per_block = tables.get(layer.component, (None, {}, {}, 1))
        module = kohya.get(sgm_to_diffusers(layer.module, per_block)) if layer.kohya else layer.module
        key = modules.get(module) if module is not None else None
        if key is None:
            unmatched.append(f"{layer.component}.{layer.module}")
            continue
        entry = graphs[graph].weights[key]
        if entry["init"] is None:  # a weight the graph's outputs do not depend on: the LoRA changes nothing there
            continue
        shape = param_shape(entry, index_of(graph)[entry["init"]])
        try:
            delta = layer.delta(shape)
        except ValueError:
            raise LoraError(f"{lora.path.name} does not fit this model: {layer.component}.{module} is "
                            f"{'x'.join(map(str, shape))} here but the LoRA gives "
                            f"{'x'.join(map(str, layer.up.shape[:1] + layer.down.shape[1:]))} "
                            f"(a LoRA for another architecture: SD 1.x, SD 2.x and SDXL LoRAs do not mix)") from None
        deltas.setdefault(graph, []).append((key, np.float32(weight * layer.scale) * delta))
    if unmatched and len(unmatched) == len(lora.layers):
        model = _denoiser_kind(tables.get("unet", (None, {}))[1])
        if any(layer.module.startswith(("joint_blocks", "joint_blocks_")) for layer in lora.layers):
            raise LoraError(f"{lora.path.name} names SD 3 layers in the original layout (joint_blocks, fused qkv), "
                            "which edgediff does not map: use a LoRA in diffusers/PEFT names "
                            "(transformer.transformer_blocks.N.attn.to_q.lora_A.weight)")
        kind = _lora_kind(lora)
        other = model is not None and kind is not None and ("U-Net" in kind) != ("U-Net" in model)  # SD 3 vs U-Nets
        raise LoraError(f"{lora.path.name}: none of its {len(unmatched)} layers match this model (e.g. {unmatched[0]}): "
                        + (f"{kind} on a model whose denoiser is {model}" if other else
                           "a LoRA for another architecture?"))
    if unmatched:
        warn(f"{lora.path.name}: {len(unmatched)} of {len(lora.layers)} LoRA layers match nothing in this "
             f"model and are ignored (e.g. {', '.join(unmatched[:3])})")
    return deltas


def _denoiser_kind(modules) -> str | None:
    """What the weight map's module names say the denoiser is (None: no map)."""
    if not modules:
        return None
    return "an MMDiT transformer (SD 3/3.5)" if any(m.startswith("transformer_blocks.") for m in modules) \
        else "a U-Net (SD 1.x/2.x/SDXL)"


def _lora_kind(lora: LoraFile) -> str | None:
    names = [f"{layer.component}.{layer.module}" for layer in lora.layers]
    if any(n.startswith("transformer.transformer_blocks") for n in names):
        return "an SD 3 LoRA (MMDiT transformer layers)"
    if any(n.startswith("unet.") for n in names):
        return "a U-Net LoRA (SD 1.x/2.x/SDXL)"
    return None


def _check_fits(lora: LoraFile, graphs: dict[str, GraphEntry], components: dict[str, str]) -> None:
    """Whole-file mismatches, each one line: T5 layers, more text encoders than the model has, quantized
    graphs, graphs without a weight map."""
    wanted = {layer.component for layer in lora.layers}
    unpatched = sorted(wanted & _UNPATCHED.keys())
    if unpatched:
        raise LoraError(f"{lora.path.name} has layers for {unpatched[0]} ({_UNPATCHED[unpatched[0]]}), which "
                        "edgediff does not apply (diffusers' SD 3 pipeline does not load them either): "
                        "use a LoRA without them")
    encoders = sorted(c for c in wanted if c.startswith("text_encoder") and c not in components)
    if encoders:
        count = sum(1 for c in components if c.startswith("text_encoder"))
        raise LoraError(f"{lora.path.name} has layers for {encoders[0]}, but this model has {count} text "
                        f"encoder{'s' if count != 1 else ''}: a LoRA for another architecture (SDXL's has two)")
    touched = [components[c] for c in wanted if c in components and components[c] in graphs]
    for graph in touched:
        if graphs[graph].precision not in FLOAT_PRECISIONS:
            raise LoraError(f"LoRAs cannot be applied to this model's {graphs[graph].precision} {graph} graph "
                            f"(quantized weights); export it with --precision fp32 or fp16 to use {lora.path.name}")
    # An export older than LoRA support on that graph (SD 3's CLIP encoders were mapped after its transformer).
    unmapped = sorted(g for g in touched if not graphs[g].weights)
    if unmapped:
        raise LoraError(f"this model's {unmapped[0]} graph was exported without a weight map (before edgediff "
                        f"applied LoRAs to it): re-export the model with this edgediff to use {lora.path.name}")


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
