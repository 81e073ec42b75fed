"""SD 3/3.5 single files as Stability distributes them (``sd3.5_medium.safetensors``): the original
key layout (``model.diffusion_model.joint_blocks.N...``, ``first_stage_model.*``,
``text_encoders.clip_l/clip_g/t5xxl.transformer.*``), with or without the text encoders inside.

Each component is read from the file only when its graph is made (``safe_open``: a prefix at a
time, cast to float32 tensor by tensor) and converted with diffusers' own single-file conversions
(``diffusers.loaders.single_file_utils``), so the export stays as lean as a folder export. The
configs come from a diffusers config folder: ``--config``, or the shipped one the keys reveal
(dual-attention ``attn2`` blocks: SD 3.5 Medium), never the file name. Text encoders the file
lacks come from ``--text-encoders`` (a diffusers SD3 folder); T5 may be absent: export without it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch

from edgediff.runtime.errors import EdgediffError

# The component -> the key prefix it has in the single file.
PREFIXES = {"transformer": "model.diffusion_model.", "vae": "first_stage_model.",
            "text_encoder": "text_encoders.clip_l.transformer.", "text_encoder_2": "text_encoders.clip_g.transformer.",
            "text_encoder_3": "text_encoders.t5xxl.transformer."}
SD3_KEY = "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"
CLIPS = ("text_encoder", "text_encoder_2")


def is_sd3_file(keys: set[str]) -> bool:
    return SD3_KEY in keys


def shipped_config(keys: set[str]) -> str:
    """The shipped config folder an SD3 file's keys match: MMDiT-X's dual attention is SD 3.5 Medium."""
    if any(".x_block.attn2." in key for key in keys):
        return "sd35m"
    blocks = {int(key.split(".")[3]) for key in keys if key.startswith("model.diffusion_model.joint_blocks.")}
    return "sd35l" if len(blocks) == 38 else "sd3m"


def header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{key: (dtype, shape)} from the safetensors header, nothing read."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: (str(handle.get_slice(key).get_dtype()), tuple(handle.get_slice(key).get_shape()))
                    for key in handle.keys()}
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise EdgediffError(f"{path} is not a readable safetensors file ({error})") from None


def read_prefix(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The file's tensors under ``prefix`` (keys kept whole), as float32."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key).to(torch.float32) for key in handle.keys() if key.startswith(prefix)}


def convert(name: str, state: dict, config) -> dict[str, torch.Tensor]:
    """One component's original keys -> diffusers/transformers keys, by diffusers' conversions."""
    from diffusers.loaders import single_file_utils as sfu

    if name == "transformer":
        return sfu.convert_sd3_transformer_checkpoint_to_diffusers(state)
    if name == "vae":
        return sfu.convert_ldm_vae_checkpoint(state, dict(config))
    if name == "text_encoder_3":
        return sfu.convert_sd3_t5_checkpoint_to_diffusers(state)
    return sfu.convert_ldm_clip_checkpoint(state, PREFIXES[name])


def load_from_file(path: Path, name: str, cls, config) -> torch.nn.Module:
    """Build ``cls`` without weights and fill it from the file; a weight the file lacks is one line."""
    from accelerate import init_empty_weights

    try:
        state = convert(name, read_prefix(path, PREFIXES[name]), config)
    except (KeyError, IndexError, ValueError) as error:  # diffusers' conversion pops the keys it needs
        raise EdgediffError(f"{path.name} lacks {name} weights the conversion needs "
                            f"({PREFIXES[name]}{str(error).strip(chr(39))[:120]}): a damaged or different checkpoint") from None
    with init_empty_weights():  # parameters on the meta device, buffers real (CLIP's position ids)
        module = cls.from_config(config) if hasattr(cls, "from_config") and hasattr(cls, "load_config") \
            else cls(config)
    try:
        result = module.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as error:  # shape mismatches: another architecture than the config says
        raise EdgediffError(f"{path.name}: its {name} does not fit the config: "
                            f"{str(error).splitlines()[-1].strip()[:200]}") from None
    if hasattr(module, "tie_weights"):
        module.tie_weights()  # T5's encoder.embed_tokens is its shared embedding
    missing = [key for key, value in module.state_dict().items() if value.is_meta]
    if missing:
        raise EdgediffError(f"{path.name} lacks {len(missing)} {name} weight(s) (e.g. {PREFIXES[name]}... for "
                            f"{missing[0]}): a damaged or different checkpoint")
    del result
    return module.to(torch.float32).eval()


def assemble_config(path: Path, keys: set[str], config_dir: Path, text_encoders: Path | None, work: Path,
                    clip_vocab: Path, log: Callable[[str], None]) -> tuple[Path, dict[str, str]]:
    """A diffusers config folder (no weights) for this file in ``work``, and where each torch
    component's weights come from (``"file"`` or a folder)."""
    in_file = {name for name, prefix in PREFIXES.items() if any(key.startswith(prefix) for key in keys)}
    shutil.copytree(config_dir, work, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.ckpt", "*.gguf"))
    index = json.loads((work / "model_index.json").read_text())
    sources = {name: "file" for name in ("transformer", "vae") if name in in_file}
    missing = [name for name in ("transformer", "vae") if name not in in_file]
    if missing:
        raise EdgediffError(f"{path.name} has no {' and no '.join(missing)} weights ({PREFIXES[missing[0]]}*): "
                            "not an SD 3/3.5 checkpoint")
    for name in (*CLIPS, "text_encoder_3"):
        tokenizer = name.replace("text_encoder", "tokenizer")
        entries = _index_entries(text_encoders, name, tokenizer, index)
        if name in in_file:
            sources[name] = "file"
        elif entries is not None:
            sources[name] = str(text_encoders / name)
        if entries is not None:  # the folder's configs and tokenizer go with its weights
            for part in (name, tokenizer):
                shutil.rmtree(work / part, ignore_errors=True)
                if (text_encoders / part).is_dir():
                    shutil.copytree(text_encoders / part, work / part,
                                    ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
            index[name], index[tokenizer] = entries
    _check_text_encoders(path, sources, text_encoders)
    if "text_encoder_3" in sources and not _has_tokenizer(work / "tokenizer_3"):
        log(f"{path.name}: T5 left out: no T5 tokenizer (tokenizer_3) in the config folder; pass --text-encoders "
            "with a diffusers SD3 folder to include it")
        del sources["text_encoder_3"]
    elif "text_encoder_3" not in sources:
        log(f"{path.name} has no T5 (text_encoders.t5xxl){' nor has ' + str(text_encoders) if text_encoders else ''}: "
            "exporting without it (t5='on' will be refused); to include it pass --text-encoders with a diffusers "
            "SD3 folder that has text_encoder_3")
    if "text_encoder_3" not in sources:
        index["text_encoder_3"] = index["tokenizer_3"] = [None, None]
    (work / "model_index.json").write_text(json.dumps(index, indent=2))
    for tokenizer in ("tokenizer", "tokenizer_2"):  # the CLIP vocabulary is shipped once
        for file in ("vocab.json", "merges.txt"):
            if (work / tokenizer).is_dir() and not (work / tokenizer / file).exists():
                shutil.copy(clip_vocab / file, work / tokenizer / file)
    return work, sources


def _index_entries(folder: Path | None, name: str, tokenizer: str, fallback: dict):
    """model_index entries of ``name`` and its tokenizer in ``folder``, or None when it has no such encoder."""
    if folder is None or not (folder / name / "config.json").is_file():
        return None
    index = json.loads((folder / "model_index.json").read_text()) if (folder / "model_index.json").is_file() else {}
    entry = index.get(name, fallback.get(name))
    if not entry or None in entry:
        return None
    return entry, index.get(tokenizer, fallback.get(tokenizer))


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / file).is_file() for file in ("tokenizer.json", "spiece.model"))


def _check_text_encoders(path: Path, sources: dict, text_encoders: Path | None) -> None:
    absent = [name for name in CLIPS if name not in sources]
    if not absent:
        return
    where = (f"{text_encoders} has no {', '.join(absent)} folder" if text_encoders is not None
             else "pass --text-encoders with a diffusers SD3 folder that has them (text_encoder, text_encoder_2, "
                  "and text_encoder_3 for T5)")
    raise EdgediffError(f"{path.name} has no CLIP text encoders (text_encoders.clip_l, text_encoders.clip_g): {where}")


def from_sd3_file(path: Path, config_dir: Path, text_encoders: Path | None, prediction_type: str | None,
                  clip_vocab: Path, work: Path, log: Callable[[str], None]):
    """``Components`` for an SD3 single file: configs and tokenizers now, weights per graph."""
    from .components import Components, _load_module, from_folder
    from .memory import folder_weight_bytes

    shapes = header(path)
    folder, sources = assemble_config(path, set(shapes), config_dir, text_encoders, work, clip_vocab, log)
    configs = from_folder(folder, prediction_type)
    classes = _classes(folder)
    sizes = {}
    for name, source in sources.items():
        if source == "file":
            sizes[name] = sum(4 * _count(shape) for key, (_, shape) in shapes.items() if key.startswith(PREFIXES[name]))
        else:
            sizes[name] = folder_weight_bytes(Path(source))

    def load(name):
        if name not in sources:
            raise AttributeError(name)
        if sources[name] != "file":
            return _load_module(classes[name], Path(sources[name])).eval()
        return load_from_file(path, name, classes[name], getattr(configs.meta, name).config)

    components = Components(configs.meta, load, sizes)
    # T5 read one tensor at a time where the export streams it (branch sd3big's ``Components.tensors``):
    # its single-file conversion is a pure prefix strip, so the file's keys serve under diffusers' names.
    components.tensors = lambda name: _t5_tensors(path, sources) if name == "text_encoder_3" and name in sources else None
    return components


class PrefixedTensors:
    """Tensors of safetensors ``files`` under diffusers' names (the file's keys less ``prefix``),
    each read when asked for."""

    def __init__(self, files: list[Path], prefix: str):
        from safetensors import safe_open

        self._handles = [safe_open(str(file), framework="pt") for file in files]
        self._where = {key[len(prefix):]: (handle, key) for handle in self._handles for key in handle.keys()
                       if key.startswith(prefix)}

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def __getitem__(self, name: str) -> torch.Tensor:
        handle, key = self._where[name]
        return handle.get_tensor(key)


def _t5_tensors(path: Path, sources: dict) -> PrefixedTensors | None:
    source = sources["text_encoder_3"]
    if source == "file":
        return PrefixedTensors([path], PREFIXES["text_encoder_3"])
    files = sorted(Path(source).glob("*.safetensors"))
    return PrefixedTensors(files, "") if files else None


def _classes(folder: Path) -> dict:
    import importlib

    index = json.loads((folder / "model_index.json").read_text())
    return {name: getattr(importlib.import_module(entry[0]), entry[1]) for name, entry in index.items()
            if name in PREFIXES and isinstance(entry, list) and None not in entry}


def _count(shape) -> int:
    total = 1
    for axis in shape:
        total *= axis
    return total
