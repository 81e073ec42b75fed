"""Several text encoders combined into one transformer context, as the manifest describes it.

SD 3/3.5 (diffusers' ``StableDiffusion3Pipeline.encode_prompt``): CLIP-L's and CLIP-G's penultimate
hidden states are concatenated on the features and zero-padded to T5's width, T5's last hidden
state follows on the sequence axis, and the two pooled CLIP embeddings are concatenated. The
manifest's ``conditioning.text`` states exactly that as data:

    {"width": 4096,
     "context": [{"encoders": ["text_encoder", "text_encoder_2"]},
                 {"encoders": ["text_encoder_3"], "absent_tokens": 256}],
     "pooled": {"input": "pooled_projections", "encoders": ["text_encoder", "text_encoder_2"]},
     "switches": {"t5": "text_encoder_3"}}

An encoder that ``switches`` names (``{"t5": "text_encoder_3"}``) can be turned off per call, or be
missing from the export: its part of the context is then zeros of ``absent_tokens`` rows, as
diffusers (0.42: ``max_sequence_length`` rows) feeds with ``text_encoder_3=None``.

Prompts: the CLIP encoders read A1111's syntax (weights, chunks of 75 tokens, runtime/prompts.py)
and give the pooled embedding of each prompt's first chunk. T5 reads the same text with the A1111
markup removed (no weights) in one window of its ``max_length`` tokens (256 by default, as
diffusers' ``max_sequence_length``): longer prompts are cut, as diffusers cuts them.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import InputError, ModelFolderError
from .prompts import encode_prompts, parse_prompt_attention
from .tokenizer import ClipTokenizer, open_tokenizer_json

Stage = Callable[[str], AbstractContextManager]  # graph name -> a session to run it with


class T5Tokenizer:
    """T5's SentencePiece (Unigram) tokenization from ``tokenizer.json`` with the ``tokenizers``
    library: the text's ids, EOS, then pad to ``max_length``, truncated to it (transformers'
    ``T5TokenizerFast(..., padding="max_length", truncation=True)``)."""

    def __init__(self, path: str | Path, *, max_length: int, pad_token_id: int, eos_token_id: int):
        self._tokenizer = open_tokenizer_json(path)
        self.max_length, self.pad_token_id, self.eos_token_id = max_length, pad_token_id, eos_token_id
        self.added_tokens: dict[str, list[int]] = {}  # textual inversion does not apply to T5

    def __call__(self, texts: list[str]) -> np.ndarray:
        ids = np.full((len(texts), self.max_length), self.pad_token_id, dtype=np.int32)
        for row, encoded in enumerate(self._tokenizer.encode_batch(list(texts), add_special_tokens=False)):
            tokens = [*encoded.ids[: self.max_length - 1], self.eos_token_id]
            ids[row, : len(tokens)] = tokens
        return ids


def load_tokenizer(model_dir: Path, spec: dict):
    """The tokenizer a manifest entry names: T5's (``kind: "t5"``) or CLIP's (the default)."""
    if spec.get("kind") == "t5":
        return T5Tokenizer(Path(model_dir) / spec["path"], max_length=spec["max_length"],
                           pad_token_id=spec["pad_token_id"], eos_token_id=spec["eos_token_id"])
    return ClipTokenizer.from_manifest(model_dir, spec)


def plain_text(prompt: str) -> str:
    """The prompt as words, without A1111's brackets, weights and BREAK (a BREAK keeps the words
    around it apart: the parser strips the spaces beside it)."""
    return "".join(" " if weight is None else text for text, weight in parse_prompt_attention(prompt))


def check_layout(rule: dict) -> None:
    """A damaged ``conditioning.text`` is one ModelFolderError naming the field, not a KeyError later."""
    def fail(field):
        return ModelFolderError(f"manifest field 'conditioning.text.{field}' is missing or damaged; "
                                "re-export the model")
    if type(rule.get("width")) is not int or rule["width"] < 1:
        raise fail("width")
    parts = rule.get("context")
    if not isinstance(parts, list) or not parts:
        raise fail("context")
    for index, part in enumerate(parts):
        if not isinstance(part, dict) or not isinstance(part.get("encoders"), list) or not part["encoders"]:
            raise fail(f"context[{index}].encoders")
        if "absent_tokens" in part and (type(part["absent_tokens"]) is not int or part["absent_tokens"] < 1):
            raise fail(f"context[{index}].absent_tokens")
    pooled = rule.get("pooled", {"input": "", "encoders": []})
    if not isinstance(pooled, dict) or not isinstance(pooled.get("input"), str) or not isinstance(pooled.get("encoders"), list):
        raise fail("pooled")
    if not isinstance(rule.get("switches", {}), dict):
        raise fail("switches")


def context_tokens(rule: dict, encoders: list[dict]) -> int:
    """The transformer context's length for one prompt chunk: each part's tokenizer window (or its
    ``absent_tokens`` of zeros) stacked on the sequence axis; SD 3: 77 CLIP + 256 T5 tokens."""
    windows = {encoder["graph"]: encoder["tokenizer"]["max_length"] for encoder in encoders}
    return sum(max((windows[g] for g in part["encoders"] if g in windows), default=part.get("absent_tokens", 0))
               for part in rule["context"])


def switched_on(rule: dict, encoders: list[dict], **switches) -> list[str]:
    """The encoder graphs this call runs. ``rule["switches"]`` names the encoders a call may turn
    off ({"t5": "text_encoder_3"}); None leaves one on where the export has it. Asking for an
    encoder the export lacks is an InputError."""
    if rule:
        check_layout(rule)
    exported = [encoder["graph"] for encoder in encoders]
    running = list(exported)
    for switch, wanted in switches.items():
        if wanted == "on" and switch not in rule.get("switches", {}):
            raise InputError(f"this model has no {switch} text encoder to switch on")
    for switch, graph in rule.get("switches", {}).items():
        wanted = switches.get(switch)
        if wanted not in (None, "on", "off"):
            raise InputError(f"{switch} must be 'on' or 'off', not {wanted!r}")
        if wanted == "on" and graph not in exported:
            raise InputError(f"this model was exported without {switch} ({graph}): use {switch}='off' "
                             f"(--{switch} off) or re-export it from a source that has it")
        if wanted == "off" and graph in running:
            running.remove(graph)
    return running


def encode_text(rule: dict, encoders: list[dict], tokenizers: list, texts: list[str], stage: Stage,
                running: list[str], syntax: str = "a1111") -> dict[str, np.ndarray]:
    """``encoder_hidden_states`` and the pooled input for ``texts``, combined as ``rule`` says."""
    hidden, pooled = {}, {}
    for encoder, tokenizer in zip(encoders, tokenizers):
        graph = encoder["graph"]
        if graph in running:
            with stage(graph) as session:
                hidden[graph], pooled[graph] = _run_encoder(session, tokenizer, texts, syntax)
    parts = []
    for part in rule["context"]:
        present = [hidden[graph] for graph in part["encoders"] if graph in hidden]
        if not present:
            parts.append(np.zeros((len(texts), part["absent_tokens"], rule["width"]), np.float32))
            continue
        states = np.concatenate(present, axis=-1)
        parts.append(np.pad(states, ((0, 0), (0, 0), (0, rule["width"] - states.shape[-1]))))
    context = {"encoder_hidden_states": np.concatenate(parts, axis=1)}
    if "pooled" in rule:
        context[rule["pooled"]["input"]] = np.concatenate([pooled[g] for g in rule["pooled"]["encoders"]], axis=-1)
    return context


def _run_encoder(session, tokenizer, texts: list[str], syntax: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(per-token states, pooled embedding or None) of one encoder for every text; ``syntax``
    "plain" reads the prompts literally (runtime/prompts.py), T5 included."""
    if isinstance(tokenizer, T5Tokenizer):
        words = [plain_text(t) if syntax == "a1111" else t for t in texts]
        return session.run(input_ids=tokenizer(words))[0], None
    pooled = []

    def run(ids):
        outputs = session.run(input_ids=ids)
        pooled.append(outputs[1] if len(outputs) > 1 else None)
        return outputs[0]

    states = encode_prompts(texts, tokenizer, run, syntax=syntax)
    chunks = states.shape[1] // tokenizer.max_length
    return states, (pooled[0][::chunks] if pooled[0] is not None else None)
