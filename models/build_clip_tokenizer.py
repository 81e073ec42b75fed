"""Build the real CLIP BPE tokenizer files (vocab.json, merges.txt) from open_clip's vocabulary.

The CLIP byte-level BPE vocabulary ships inside the ``open_clip_torch`` wheel as
``open_clip/bpe_simple_vocab_16e6.txt.gz``. This script reads it straight out of the wheel (no
install needed) and reproduces OpenAI CLIP's ``SimpleTokenizer`` construction exactly:

    merges = lines[1 : 49152 - 256 - 2 + 1]
    vocab  = bytes_to_unicode chars + same + '</w>' + ''.join(pair) for each merge
             + ['<|startoftext|>', '<|endoftext|>']            -> 49408 tokens

Usage::

    pip download --no-deps open_clip_torch -d DIR
    python models/build_clip_tokenizer.py DIR/open_clip_torch-*.whl [--out models/clip_tokenizer]

It writes vocab.json, merges.txt and LICENSE (OpenAI CLIP's MIT licence, with the source noted),
and, when transformers is importable, the transformers tokenizer files (save_pretrained) so that
``CLIPTokenizer.from_pretrained(out)`` and the ``tokenizers`` library both load the folder.
Only the standard library is needed for vocab.json / merges.txt.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import zipfile
from functools import lru_cache

VOCAB_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"

LICENSE_TEXT = """\
The files vocab.json and merges.txt in this folder are the CLIP byte-level BPE vocabulary
(49408 tokens), built by models/build_clip_tokenizer.py from the file
open_clip/bpe_simple_vocab_16e6.txt.gz shipped in the open_clip_torch wheel
(https://github.com/mlfoundations/open_clip), which is itself a copy of the vocabulary released
with OpenAI CLIP (https://github.com/openai/CLIP, clip/bpe_simple_vocab_16e6.txt.gz).
The construction follows CLIP's SimpleTokenizer (clip/simple_tokenizer.py) exactly.
That vocabulary is distributed under the following licence:

MIT License

Copyright (c) 2021 OpenAI

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.

open_clip (which redistributes the same file) is also MIT licensed:
Copyright (c) 2012-2021 Gabriel Ilharco, Mitchell Wortsman, Nicholas Carlini, Rohan Taori,
Achal Dave, Vaishaal Shankar, John Miller, Hongseok Namkoong, Hannaneh Hajishirzi, Ali Farhadi,
Ludwig Schmidt.
"""


@lru_cache()
def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable unicode character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def read_bpe_lines(source: str) -> list[str]:
    """Lines of bpe_simple_vocab_16e6.txt from a wheel, a .gz file or a plain text file."""
    if source.endswith(".whl") or zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as zf:
            data = gzip.decompress(zf.read(VOCAB_MEMBER))
    elif source.endswith(".gz"):
        with gzip.open(source, "rb") as f:
            data = f.read()
    else:
        with open(source, "rb") as f:
            data = f.read()
    return data.decode("utf-8").split("\n")


def build(lines: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    merges = lines[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    for merge in merges:
        vocab.append("".join(merge))
    vocab.extend(["<|startoftext|>", "<|endoftext|>"])
    assert len(vocab) == 49408, len(vocab)
    encoder = {tok: i for i, tok in enumerate(vocab)}
    assert len(encoder) == 49408, "duplicate tokens"
    return encoder, merges


def write(out: str, encoder: dict[str, int], merges: list[tuple[str, str]]) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(encoder, f, ensure_ascii=False)
    with open(os.path.join(out, "merges.txt"), "w", encoding="utf-8") as f:
        # Same header line as the Hugging Face CLIP tokenizers' merges.txt.
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    with open(os.path.join(out, "LICENSE"), "w", encoding="utf-8") as f:
        f.write(LICENSE_TEXT)


def save_transformers(out: str) -> None:
    """Add the transformers/tokenizers files (tokenizer.json, configs) next to vocab/merges."""
    from transformers import CLIPTokenizer

    with open(os.path.join(out, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    with open(os.path.join(out, "merges.txt"), encoding="utf-8") as f:
        merges = [tuple(l.split()) for l in f.read().split("\n")[1:] if l]
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    ids = tok("a photo of a cat").input_ids
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407], ids
    tok.save_pretrained(out)
    tok2 = CLIPTokenizer.from_pretrained(out)
    ids2 = tok2("a photo of a cat").input_ids
    assert ids2 == ids, ids2
    assert len(tok2) == 49408, len(tok2)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", nargs="?", help="open_clip_torch wheel, or bpe_simple_vocab_16e6.txt(.gz)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "clip_tokenizer"))
    p.add_argument("--no-transformers", action="store_true", help="write only vocab.json/merges.txt/LICENSE")
    args = p.parse_args(argv)
    source = args.source
    if source is None:
        p.error("give the open_clip_torch wheel (pip download --no-deps open_clip_torch -d DIR)")
    encoder, merges = build(read_bpe_lines(source))
    write(args.out, encoder, merges)
    if not args.no_transformers:
        save_transformers(args.out)
    print(f"wrote {len(encoder)} tokens, {len(merges)} merges to {args.out}")


if __name__ == "__main__":
    main()
