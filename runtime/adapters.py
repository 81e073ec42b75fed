"""The LoRAs and embeddings of one pipeline: what each generation asks for, turned into patched weights.

Parsed files are cached by (path, mtime, size), and each graph's patched initializers by the list of
(file, weight) that made them, so a generation that changes nothing recomputes nothing and
``Sessions`` re-creates only the graphs whose patch changed (text encoder untouched when only U-Net
LoRA weights change).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .embeddings import Embedding, extend_table, read_embeddings, token_table_key
from .errors import EdgediffError
from .lora import LoraError, LoraFile, component_graphs, extract_lora_tags, lora_deltas, merge, read_lora
from .manifest import Manifest
from .onnx_weights import initializer_index

LoraSpec = tuple[str | Path, float]


@dataclass
class Applied:
    prompts: list[str]  # without their <lora:...> tags
    loras: list[tuple[str, float]]  # (name, weight) as used
    embeddings: list[str]  # names usable in prompts
    lora_files: list[tuple[str, float, Path]] = field(default_factory=list)  # (name, weight, file)


class Adapters:
    def __init__(self, model_dir: Path, manifest: Manifest, warn: Callable[[str], None]):
        self.model_dir = model_dir
        self.manifest = manifest
        self._warn = warn
        self._warned: set[str] = set()
        self._files: dict[tuple, object] = {}
        self._indexes: dict[str, dict] = {}
        self._patches: dict[str, tuple[tuple, dict]] = {}
        self._components = component_graphs(manifest)
        self._encoders = [encoder["graph"] for encoder in manifest.text_encoders]

    def index(self, graph: str) -> dict:
        if graph not in self._indexes:
            self._indexes[graph] = initializer_index(self.model_dir / self.manifest.graphs[graph].path)
        return self._indexes[graph]

    def apply(self, sessions, tokenizers, prompts: list[str], loras: Sequence[LoraSpec] | None,
              embeddings: Sequence[str | Path] | None, lora_dir: str | Path | None,
              allow_pickle: bool = False) -> Applied:
        """Resolve prompt tags and files, hand each graph its patched weights, set each tokenizer's tokens.

        ``tokenizers``: one per text encoder, in the manifest's order.
        """
        stripped, tags = zip(*map(extract_lora_tags, prompts)) if prompts else ((), ())
        if len(set(map(tuple, tags))) > 1:
            raise LoraError("all prompts of one batch must carry the same <lora:...> tags")
        specs = [(Path(path), float(weight)) for path, weight in (loras or [])]
        specs += [(self._resolve_tag(name, lora_dir), weight) for name, weight in (tags[0] if tags else [])]
        files = [(self._load(path, read_lora, allow_pickle), weight) for path, weight in specs]
        vectors: list[Embedding] = []
        for path in embeddings or []:
            vectors += self._load(Path(path), read_embeddings, allow_pickle)

        active = [(lora, weight) for lora, weight in files if weight != 0]  # weight 0: the base weights exactly
        for graph in dict.fromkeys(self._components.values()):
            if graph not in self.manifest.graphs:
                continue
            touching = [(lora, w) for lora, w in active
                        if any(self._components.get(layer.component) == graph for layer in lora.layers)]
            extra = vectors if graph in self._encoders else []
            key = (tuple((str(lora.path), w) for lora, w in touching), tuple(str(e.path) for e in extra))
            key = key if touching or extra else ()  # () is the unpatched graph, as Sessions starts
            if self._patches.get(graph, (None,))[0] != key:
                self._patches[graph] = (key, self._patch(graph, touching, extra))
            sessions.set_initializers(graph, key, self._patches[graph][1]["arrays"])
        for graph, tokenizer in zip(self._encoders, tokenizers):
            tokenizer.added_tokens = self._patches.get(graph, ((), {"tokens": {}}))[1]["tokens"]
        return Applied(list(stripped), [(lora.name, w) for lora, w in files], [e.name for e in vectors],
                       [(lora.name, w, path) for (lora, w), (path, _) in zip(files, specs)])

    def _patch(self, graph: str, loras: list[tuple[LoraFile, float]], embeddings: list[Embedding]) -> dict:
        if not loras and not embeddings:
            return {"arrays": {}, "tokens": {}}
        entry = self.manifest.graphs[graph]
        deltas = []
        for lora, weight in loras:
            deltas += lora_deltas(lora, weight, self.manifest.graphs, self._components, self.index,
                                  self._warn_once).get(graph, [])
        arrays = merge(self.index(graph), entry.weights, deltas)
        tokens = {}
        if embeddings:
            init = entry.weights[token_table_key(entry.weights)]["init"]
            arrays[init], tokens = extend_table(self.index(graph)[init], embeddings, self._encoders.index(graph),
                                                len(self._encoders))
        return {"arrays": arrays, "tokens": tokens}

    def _load(self, path: Path, reader, allow_pickle: bool):
        try:
            stat = path.stat()
        except OSError:
            what = "LoRA" if reader is read_lora else "embedding"
            raise EdgediffError(f"{what} file not found: {path}") from None
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, reader)
        if key not in self._files:
            self._files[key] = reader(path, allow_pickle=allow_pickle)
        return self._files[key]

    def _resolve_tag(self, name: str, lora_dir: str | Path | None) -> Path:
        if lora_dir is None:
            raise LoraError(f"the prompt asks for <lora:{name}> but no LoRA folder was given (--lora-dir)")
        folder = Path(lora_dir)
        for candidate in (folder / name, folder / f"{name}.safetensors"):
            if candidate.is_file():
                return candidate
        raise LoraError(f"unknown LoRA <lora:{name}>: no {name}.safetensors in {folder}")

    def _warn_once(self, line: str) -> None:
        if line not in self._warned:
            self._warned.add(line)
            self._warn(line)
