"""A model's parts, each torch module in memory only while a graph is made from it.

A full-size fp32 SD 1.5 pipeline is 4.3 GB of torch weights; the U-Net graph needs only its 3.4 GB.
``meta`` answers every question about the model (configs, tokenizer, scheduler) without weights;
``open()`` hands out the modules a graph's wrapper asks for and frees them when the graph is done.
"""
from __future__ import annotations

import functools
import importlib
import json
import warnings
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch

from edgediff.runtime.errors import EdgediffError

from .memory import folder_weight_bytes, module_weight_bytes, release_freed, safetensors_index


class Components:
    def __init__(self, meta, load: Callable[[str], torch.nn.Module], weight_bytes: dict[str, int],
                 tensors: Callable[[str], "Checkpoint | None"] | None = None):
        # .unet.config, .vae.config, .text_encoder(_2).config, .tokenizer(_2), .scheduler, and .config:
        # the pipeline's own settings (SDXL's force_zeros_for_empty_prompt)
        self.meta = meta
        self.weight_bytes = weight_bytes  # float32 bytes per torch component
        self._load = load
        self._modules: dict[str, torch.nn.Module] = {}
        # A component's checkpoint tensors read one at a time (a diffusers folder's safetensors), or None.
        self.tensors = tensors or (lambda name: None)

    @contextmanager
    def open(self, keep: frozenset[str] = frozenset()):
        """A pipeline-like object whose modules load on first use; on exit all but ``keep`` are freed."""
        try:
            yield _Lazy(self._get)
        finally:
            for name in [name for name in self._modules if name not in keep]:
                del self._modules[name]
            release_freed(collect=True)

    def _get(self, name: str) -> torch.nn.Module:
        if name not in self._modules:
            self._modules[name] = self._load(name)
        return self._modules[name]


def used_by(wrap: Callable[[object], torch.nn.Module]) -> frozenset[str]:
    """The components a graph's wrapper takes from the pipeline, found by calling it on a recorder."""
    names = set()

    def record(name):
        names.add(name)
        return torch.nn.Module()

    wrap(_Lazy(record))
    return frozenset(names)


class _Lazy:
    def __init__(self, get):
        self._get = get

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return self._get(name)


def from_folder(folder: Path, prediction_type: str | None) -> Components:
    """A diffusers folder: configs now, each component's weights read from its subfolder on demand."""
    index = json.loads((folder / "model_index.json").read_text())
    classes, small = {}, {}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or None in entry:
            continue
        try:
            cls = getattr(importlib.import_module(entry[0]), entry[1])
        except (ImportError, AttributeError):
            raise EdgediffError(f"could not load {folder}: unknown component class {entry[0]}.{entry[1]}") from None
        if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
            classes[name] = cls
        elif name in ("tokenizer", "tokenizer_2", "tokenizer_3", "scheduler", "low_res_scheduler"):
            small[name] = _guard(folder, lambda: cls.from_pretrained(folder / name))
    if prediction_type:
        small["scheduler"].register_to_config(prediction_type=prediction_type)
    settings = {name: value for name, value in index.items() if not name.startswith("_") and not isinstance(value, list)}
    meta = SimpleNamespace(**small, config=settings,
                           **{name: SimpleNamespace(config=_guard(folder, lambda: _config(cls, folder / name)))
                              for name, cls in classes.items()})
    sizes = {name: folder_weight_bytes(folder / name) for name in classes}

    def load(name):
        if name not in classes:
            raise AttributeError(name)
        return _guard(folder, lambda: _load_module(classes[name], folder / name).eval())

    @functools.lru_cache(maxsize=None)  # the memory check and the streamed trace both ask; headers read once
    def checkpoint(name):
        return Checkpoint.find(folder / name) if name in classes else None

    return Components(meta, load, sizes, checkpoint)


class Checkpoint:
    """A component's safetensors files as a mapping of tensor names, each read when asked for.

    Read with plain file reads, not safetensors' memory map: every page a map touches stays in this
    process's resident set, so reading T5-XXL's 9.5 GB one block at a time would still end with all
    of it counted (and reported as the export's peak) although nothing holds it.
    """

    def __init__(self, files: list[Path]):
        self._where = {}  # name -> (file, dtype, shape, start, end)
        for file in files:
            header, data_start = safetensors_index(file)
            for name, info in header.items():
                if name != "__metadata__":
                    start, end = info["data_offsets"]
                    self._where[name] = (file, info["dtype"], info["shape"], data_start + start, data_start + end)

    @classmethod
    def find(cls, subfolder: Path) -> "Checkpoint | None":
        files = sorted(subfolder.glob("*.safetensors"))
        return cls(files) if files else None

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def __getitem__(self, name: str) -> torch.Tensor:
        file, dtype, shape, start, end = self._where[name]
        data = bytearray(end - start)
        with open(file, "rb") as handle:
            handle.seek(start)
            handle.readinto(data)
        if not data:
            return torch.empty(shape, dtype=SAFETENSORS_DTYPES[dtype])
        return torch.frombuffer(data, dtype=SAFETENSORS_DTYPES[dtype]).reshape(shape)


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def from_pipeline(pipe) -> Components:
    """A single-file checkpoint or hub model, loaded whole; each module is let go once its graphs are done."""
    modules = {name: module for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)}
    tokenizers = {name: getattr(pipe, name) for name in ("tokenizer", "tokenizer_2", "tokenizer_3")
                  if getattr(pipe, name, None)}
    schedulers = {name: getattr(pipe, name) for name in ("scheduler", "low_res_scheduler") if getattr(pipe, name, None)}
    meta = SimpleNamespace(**tokenizers, **schedulers, config=dict(pipe.config),
                           **{name: SimpleNamespace(config=module.config) for name, module in modules.items()})
    sizes = {name: module_weight_bytes(module) for name, module in modules.items()}
    for name in modules:
        setattr(pipe, name, None)  # the pipeline object must not keep them alive

    from .weight_map import WEIGHT_MAPPED

    def load(name):
        if name not in modules:
            raise AttributeError(name)
        # The weight map reads a LoRA-patched module once more after its graph is written.
        return (modules[name] if name in WEIGHT_MAPPED else modules.pop(name)).eval()

    return Components(meta, load, sizes)


def _config(cls, subfolder: Path):
    if not hasattr(cls, "load_config"):  # transformers
        return cls.config_class.from_pretrained(subfolder)
    with torch.device("meta"):  # the config with the class's defaults filled in, and no weights
        return cls.from_config(cls.load_config(subfolder)).config


def _load_module(cls, subfolder: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if hasattr(cls, "load_config"):  # diffusers
            return cls.from_pretrained(subfolder, torch_dtype=torch.float32, local_files_only=True)
        return cls.from_pretrained(subfolder, dtype=torch.float32, local_files_only=True)


def _guard(folder: Path, make):
    try:
        return make()
    except EdgediffError:
        raise
    except Exception as error:  # diffusers/transformers raise many types for unreadable weights/configs
        raise EdgediffError(f"could not load {folder}: {str(error).splitlines()[0][:300] if str(error) else type(error).__name__}") from None
