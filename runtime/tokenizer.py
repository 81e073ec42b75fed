"""CLIP tokenization from ``tokenizer.json`` with the ``tokenizers`` library (no transformers).

``encode`` gives the raw ids of each text (no special tokens): the hook for A1111-syntax prompts
(``prompts.tokenize_prompt`` chunks and weights them) and for extra tokens such as textual
inversion. ``__call__`` matches transformers' ``CLIPTokenizer(..., padding="max_length",
truncation=True)``: BOS, at most ``max_length - 2`` tokens, EOS, then the pad token to ``max_length``.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .errors import ModelFolderError


def open_tokenizer_json(path: str | Path):
    """A ``tokenizers`` tokenizer with padding and truncation off: callers pad and cut themselves."""
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # the tokenizers library raises plain Exception on bad JSON
        raise ModelFolderError(f"cannot read tokenizer {path}: {error}") from None
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


class ClipTokenizer:
    def __init__(self, path: str | Path, *, max_length: int, pad_token_id: int, bos_token_id: int,
                 eos_token_id: int):
        self._tokenizer = open_tokenizer_json(path)
        self.max_length = max_length
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        # A1111 moves text after a comma near a chunk's end into the next chunk.
        self.comma_id = self._tokenizer.token_to_id(",</w>")
        # Textual-inversion names -> their token ids, matched in the text before BPE (embeddings.py).
        self.added_tokens: dict[str, list[int]] = {}

    @classmethod
    def from_manifest(cls, model_dir: Path, spec: dict) -> "ClipTokenizer":
        return cls(Path(model_dir) / spec["path"], max_length=spec["max_length"],
                   pad_token_id=spec["pad_token_id"], bos_token_id=spec["bos_token_id"],
                   eos_token_id=spec["eos_token_id"])

    def encode(self, texts: list[str]) -> list[list[int]]:
        """The ids of each text, without BOS/EOS, untruncated."""
        return self._encode(list(texts)) if texts else []

    def __call__(self, texts: list[str]) -> np.ndarray:
        """Token ids of shape (len(texts), max_length), int32, truncated to one chunk."""
        ids = np.full((len(texts), self.max_length), self.pad_token_id, dtype=np.int32)
        for row, encoded in enumerate(self._encode(list(texts))):
            tokens = [self.bos_token_id, *encoded[: self.max_length - 2], self.eos_token_id]
            ids[row, : len(tokens)] = tokens
        return ids

    def _encode(self, texts: list[str]) -> list[list[int]]:
        if not self.added_tokens:
            return [e.ids for e in self._tokenizer.encode_batch(texts, add_special_tokens=False)]
        names = re.compile("|".join(map(re.escape, sorted(self.added_tokens, key=len, reverse=True))))
        encoded = []
        for text in texts:
            pieces = names.split(text)  # text, name, text, ...: names are single capture-free matches
            found = names.findall(text)
            ids = []
            for index, piece in enumerate(pieces):
                ids += self._tokenizer.encode(piece, add_special_tokens=False).ids
                if index < len(found):
                    ids += self.added_tokens[found[index]]
            encoded.append(ids)
        return encoded
