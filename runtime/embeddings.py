"""Textual-inversion embeddings: extra rows for the text encoder's token-embedding table.

Formats: A1111 (``emb_params``: one row per vector, named after the file) and diffusers
(``learned_embeds.safetensors``: ``{token: vector(s)}``, named by its key). A name in the prompt
becomes one new token id per vector (tokenizer.py's ``added_tokens``); the table, grown by those
rows, replaces the graph's own initializer when the session is created.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import EdgediffError
from .onnx_weights import TensorLocation
from .tensor_files import read_tensors

A1111_KEYS = ("emb_params", "string_to_param.*")  # .safetensors, and the pickled .pt layout


@dataclass(frozen=True)
class Embedding:
    name: str
    vectors: np.ndarray  # (count, hidden) float32
    path: Path


def read_embeddings(path: str | Path, *, allow_pickle: bool = False) -> list[Embedding]:
    path = Path(path)
    tensors, _ = read_tensors(path, "embedding", allow_pickle=allow_pickle)
    key = next((k for k in A1111_KEYS if k in tensors), None)
    if key is not None:
        found = {path.stem: tensors[key]}
    else:
        found = {k: v for k, v in tensors.items() if v.dtype == np.float32 and v.ndim in (1, 2)}
    if not found or len(found) != len(tensors) and key is None:
        raise EdgediffError(f"{path} is not a textual-inversion embedding (no emb_params, and not "
                            "{token: vector} as diffusers saves them)")
    return [Embedding(name, np.atleast_2d(vectors).astype(np.float32), path) for name, vectors in found.items()]


def token_table_key(weights: dict[str, dict]) -> str:
    key = next((k for k in weights if k.endswith("token_embedding.weight")), None)
    if key is None:
        raise EdgediffError("this model's text encoder has no token-embedding table in its weight map: "
                            "re-export it with this edgediff to use embeddings")
    return key


def extend_table(base: TensorLocation, embeddings: list[Embedding]) -> tuple[np.ndarray, dict[str, list[int]]]:
    """(table with one row appended per vector, {name: new token ids})."""
    table = base.read()
    rows, added = [table], {}
    next_id = table.shape[0]
    for embedding in embeddings:
        if embedding.vectors.shape[1] != table.shape[1]:
            raise EdgediffError(f"embedding {embedding.name} ({embedding.path.name}) has vectors of width "
                                f"{embedding.vectors.shape[1]}; this model's text encoder uses {table.shape[1]} "
                                "(an embedding for another architecture?)")
        added[embedding.name] = list(range(next_id, next_id + len(embedding.vectors)))
        next_id += len(embedding.vectors)
        rows.append(embedding.vectors.astype(table.dtype))
    return np.concatenate(rows), added
