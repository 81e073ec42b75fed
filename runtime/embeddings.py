"""Textual-inversion embeddings: extra rows for the text encoders' token-embedding tables.

Formats: A1111 (``emb_params``: one row per vector, named after the file), diffusers
(``learned_embeds.safetensors``: ``{token: vector(s)}``, named by its key) and SDXL's (``clip_l`` and
``clip_g`` in one file, named after it: one set of vectors per text encoder, in that order). A name
in the prompt becomes one new token id per vector in each encoder's tokenizer (tokenizer.py's
``added_tokens``); the tables, grown by those rows, replace the graphs' own initializers when the
sessions are created. An embedding must bring vectors for every text encoder of the model: an
SD 1.x/2.x embedding on SDXL is refused, as A1111 does (diffusers would load it into the first
encoder only and leave the second to spell the name out as text).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import EdgediffError
from .onnx_weights import TensorLocation
from .tensor_files import read_tensors

A1111_KEYS = ("emb_params", "string_to_param.*")  # .safetensors, and the pickled .pt layout
PER_ENCODER_KEYS = ("clip_l", "clip_g")  # SDXL embeddings: the first text encoder's vectors, the second's


@dataclass(frozen=True)
class Embedding:
    name: str
    vectors: tuple[np.ndarray, ...]  # per text encoder, in manifest order: (count, hidden) float32 each
    path: Path


def read_embeddings(path: str | Path, *, allow_pickle: bool = False) -> list[Embedding]:
    path = Path(path)
    tensors, _ = read_tensors(path, "embedding", allow_pickle=allow_pickle)
    if set(tensors) == set(PER_ENCODER_KEYS):
        vectors = tuple(np.atleast_2d(tensors[k]).astype(np.float32) for k in PER_ENCODER_KEYS)
        if len({len(v) for v in vectors}) != 1:
            raise EdgediffError(f"{path}: clip_l and clip_g hold different numbers of vectors "
                                f"({', '.join(str(len(v)) for v in vectors)})")
        return [Embedding(path.stem, vectors, path)]
    key = next((k for k in A1111_KEYS if k in tensors), None)
    if key is not None:
        found = {path.stem: tensors[key]}
    else:
        found = {k: v for k, v in tensors.items() if v.dtype == np.float32 and v.ndim in (1, 2)}
    if not found or len(found) != len(tensors) and key is None:
        raise EdgediffError(f"{path} is not a textual-inversion embedding (no emb_params, no clip_l/clip_g, "
                            "and not {token: vector} as diffusers saves them)")
    return [Embedding(name, (np.atleast_2d(vectors).astype(np.float32),), path) for name, vectors in found.items()]


def token_table_key(weights: dict[str, dict]) -> str:
    key = next((k for k in weights if k.endswith("token_embedding.weight")), None)
    if key is None:
        raise EdgediffError("this model's text encoder has no token-embedding table in its weight map: "
                            "re-export it with this edgediff to use embeddings")
    return key


def extend_table(base: TensorLocation, embeddings: list[Embedding], encoder: int,
                 encoders: int) -> tuple[np.ndarray, dict[str, list[int]]]:
    """(table of text encoder number ``encoder`` of ``encoders``, one row appended per vector, {name: new token ids})."""
    table = base.read()
    rows, added = [table], {}
    next_id = table.shape[0]
    for embedding in embeddings:
        if len(embedding.vectors) != encoders:
            have = "one text encoder" if len(embedding.vectors) == 1 else f"{len(embedding.vectors)} text encoders"
            raise EdgediffError(f"embedding {embedding.name} ({embedding.path.name}) has vectors for {have}; this "
                                f"model has {encoders} (an embedding for another architecture: SDXL's hold "
                                "clip_l and clip_g)")
        vectors = embedding.vectors[encoder]
        if vectors.shape[1] != table.shape[1]:
            raise EdgediffError(f"embedding {embedding.name} ({embedding.path.name}) has vectors of width "
                                f"{vectors.shape[1]}; this model's text encoder uses {table.shape[1]} "
                                "(an embedding for another architecture?)")
        added[embedding.name] = list(range(next_id, next_id + len(vectors)))
        next_id += len(vectors)
        rows.append(vectors.astype(table.dtype))
    return np.concatenate(rows), added
