"""A1111's prompt syntax: attention weights, ``BREAK``, prompts longer than 77 tokens.

The rules are AUTOMATIC1111 stable-diffusion-webui's (``prompt_parser.parse_prompt_attention`` and
``sd_hijack_clip``'s ``tokenize_line``/``process_tokens``, "Original" emphasis), rewritten here:

- ``(text)`` x1.1, ``((text))`` x1.21, ``[text]`` /1.1, ``(text:1.3)`` an explicit weight;
  ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal characters; an unclosed bracket weights
  everything after it, a stray closing one is literal text (never an error).
- The tokens are cut into chunks of 75; each chunk is encoded on its own as
  BOS + tokens + EOS + pad (77 ids) and the encodings are concatenated along the sequence axis.
  ``BREAK`` ends the current chunk. A chunk that fills up with a comma among its last 20 tokens
  moves the tokens after that comma to the next chunk (A1111's ``comma_padding_backtrack``).
- Weights multiply the encoder's output per token; the chunk is then rescaled to keep its mean.

Departures, on purpose: the mean is kept per prompt and chunk (A1111 takes it over the batch it
encodes, which is one prompt in its usual use); ``BREAK`` inside brackets still breaks the chunk
(A1111 multiplies its marker weight and then treats it as the literal word); a weight that is not a
number, such as ``(a:1.2.3)``, is literal text (A1111 raises).
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

import numpy as np

from .errors import EdgediffError

CHUNK_LENGTH = 75  # prompt tokens per chunk; with BOS and EOS, the text encoder's 77 positions
COMMA_BACKTRACK = 20  # A1111's default comma_padding_backtrack
ROUND, SQUARE = 1.1, 1 / 1.1
BREAK = ("BREAK", None)  # the parser's chunk-break piece: it carries no weight

_ATTENTION = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|   # escapes, and a lone backslash
\(|\[|
:\s*([+-]?[.\d]+)\s*\)|       # the end of (text:weight)
\)|]|
[^\\()\[\]:]+|
:
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)

Piece = tuple[str, "float | None"]


def parse_prompt_attention(text: str) -> list[Piece]:
    """``[(text, weight), ...]`` with runs of equal weight merged; ``BREAK`` pieces are ``BREAK``.

    >>> parse_prompt_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    pieces: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if piece[1] is not None:
                piece[1] *= factor

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if weight is not None:
            try:
                weight = float(weight)
            except ValueError:  # "(a:1.2.3)": not a number, so the text stays literal
                weight = None
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(pieces))
        elif token == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open:
            multiply(round_open.pop(), weight)
        elif token == ")" and round_open:
            multiply(round_open.pop(), ROUND)
        elif token == "]" and square_open:
            multiply(square_open.pop(), SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    pieces.append(list(BREAK))
                pieces.append([part, 1.0])
    for start in round_open:  # unclosed brackets weight everything after them, as A1111
        multiply(start, ROUND)
    for start in square_open:
        multiply(start, SQUARE)

    merged: list[list] = []
    for piece in pieces or [["", 1.0]]:
        if merged and piece[1] is not None and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(text, weight) for text, weight in merged]


def chunk_tokens(pieces: Sequence[tuple[Sequence[int], float | None]], *, comma_id: int | None,
                 chunk_length: int = CHUNK_LENGTH, backtrack: int = COMMA_BACKTRACK
                 ) -> list[tuple[list[int], list[float]]]:
    """Cut weighted token runs into chunks of at most ``chunk_length`` (tokens, weights) as A1111.

    ``pieces``: (token ids, weight) per parsed piece; weight None is a ``BREAK``. Always at least
    one chunk (an empty prompt is one empty chunk).
    """
    chunks: list[tuple[list[int], list[float]]] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def next_chunk() -> None:
        nonlocal tokens, weights, last_comma
        chunks.append((tokens, weights))
        tokens, weights, last_comma = [], [], -1

    for ids, weight in pieces:
        if weight is None:
            next_chunk()
            continue
        for token in ids:
            if token == comma_id:
                last_comma = len(tokens)
            elif (backtrack and len(tokens) == chunk_length and last_comma != -1
                  and len(tokens) - last_comma <= backtrack):
                # The chunk is full and a comma is near its end: carry what follows it over.
                keep = last_comma + 1
                moved = tokens[keep:], weights[keep:]
                tokens, weights = tokens[:keep], weights[:keep]
                next_chunk()
                tokens, weights = list(moved[0]), list(moved[1])
            if len(tokens) == chunk_length:
                next_chunk()
            tokens.append(token)
            weights.append(weight)
    if tokens or not chunks:
        next_chunk()
    return chunks


def pad_chunk(tokens: Sequence[int], weights: Sequence[float], *, bos: int, eos: int, pad: int,
              chunk_length: int = CHUNK_LENGTH) -> tuple[list[int], list[float]]:
    """BOS + tokens + EOS, then the model's pad token up to ``chunk_length + 2`` ids.

    SD 1.x pads with EOS, SD 2.x with its own pad id: A1111 pads with EOS and then rewrites
    everything after the first EOS to the pad id, which is this.
    """
    filler = chunk_length - len(tokens)
    ids = [bos, *tokens, eos] + [pad] * filler
    return ids, [1.0, *weights, 1.0] + [1.0] * filler


def tokenize_prompt(prompt: str, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32, weights float32), both (chunks, max_length), for one prompt in A1111's syntax.

    ``tokenizer`` needs ``encode(texts) -> [[ids]]`` (no special tokens), ``comma_id``,
    ``max_length``, ``bos_token_id``, ``eos_token_id`` and ``pad_token_id`` (``ClipTokenizer``).
    """
    parsed = parse_prompt_attention(prompt)
    encoded = tokenizer.encode([text for text, weight in parsed if weight is not None])
    runs = iter(encoded)
    pieces = [((), None) if weight is None else (next(runs), weight) for text, weight in parsed]
    length = tokenizer.max_length - 2  # 75 for CLIP's 77 positions
    rows = [pad_chunk(tokens, weights, bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id,
                      pad=tokenizer.pad_token_id, chunk_length=length)
            for tokens, weights in chunk_tokens(pieces, comma_id=tokenizer.comma_id, chunk_length=length)]
    return (np.array([ids for ids, _ in rows], dtype=np.int32),
            np.array([weights for _, weights in rows], dtype=np.float32))


def emphasize(z: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """A1111's "Original" emphasis on one chunk's encoding z (tokens, hidden): scale each token's
    vector by its weight, then rescale the whole chunk so that its mean is what it was."""
    if np.all(weights == 1.0):
        return z  # exactly the unweighted encoding, so (word:1.0) gives the plain prompt's image
    weighted = z.astype(np.float64) * weights.astype(np.float64)[:, None]
    new_mean = weighted.mean()
    if new_mean == 0.0:  # nothing to keep (A1111 would divide by zero)
        return weighted.astype(z.dtype)
    return (weighted * (z.mean(dtype=np.float64) / new_mean)).astype(z.dtype)


def tokenize_plain(prompt: str, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(ids, weights) of one chunk for ``prompt`` read literally: no weights, no ``BREAK``, cut at
    the encoder's length, as diffusers' pipelines tokenize (``truncation=True``)."""
    ids = tokenizer([prompt])
    return ids, np.ones(ids.shape, dtype=np.float32)


def encode_prompts(prompts: Sequence[str], tokenizer, text_encoder: Callable[[np.ndarray], np.ndarray], *,
                   max_chunks: int | None = None, syntax: str = "a1111") -> np.ndarray:
    """Conditioning (len(prompts), chunks * 77, hidden) for prompts in A1111's syntax.

    Every prompt gets as many chunks as the longest (empty chunks pad the others, as A1111 pads
    the negative prompt), so the batch, and cond with uncond, share one sequence length.
    ``text_encoder(ids (n, 77)) -> (n, 77, hidden)`` runs the graph once for all chunks.
    ``max_chunks``: the U-Net's limit (1 for exports whose context axis is fixed at 77 tokens).
    ``syntax="plain"``: each prompt read literally, one chunk (:func:`tokenize_plain`).
    """
    tokenize = tokenize_plain if syntax == "plain" else tokenize_prompt
    tokenized = [tokenize(prompt, tokenizer) for prompt in prompts]
    chunks = max(len(ids) for ids, _ in tokenized)
    if max_chunks is not None and chunks > max_chunks:
        raise EdgediffError(
            f"the prompt needs {chunks} chunks of {tokenizer.max_length - 2} tokens (a long prompt or BREAK), but this "
            f"model's U-Net was exported for {max_chunks}: re-export it with this version of edgediff")
    empty_ids, empty_weights = tokenize("", tokenizer)
    ids = np.concatenate([np.concatenate([i] + [empty_ids] * (chunks - len(i))) for i, _ in tokenized])
    weights = np.concatenate([np.concatenate([w] + [empty_weights] * (chunks - len(w))) for _, w in tokenized])
    z = text_encoder(ids)
    z = np.stack([emphasize(z_chunk, w_chunk) for z_chunk, w_chunk in zip(z, weights)])
    return z.reshape(len(prompts), chunks * z.shape[1], z.shape[2])
