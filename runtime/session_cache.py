"""Cache of session-optimized graphs: ONNX Runtime's graph optimization once per machine, not per session.

The first session of a graph saves ONNX Runtime's optimized graph (``optimized_model_filepath``);
later sessions load that file with optimizations off, which turns a U-Net session's 10-20 s of
optimization into a load. An entry is a folder ``<graph>-<key>/`` holding ``model.onnx`` (+
``model.onnx.data`` for big graphs) and ``meta.json`` (written last: its presence means the entry
is complete). The key covers everything that can change the optimized graph: the source graph
(manifest sha256, size and mtime), provider and its options, the onnxruntime version and build,
the optimization level, and for the CPU the processor's model and flags (the saved graph holds
layout-specific NCHWc kernels chosen for this CPU). An entry that does not verify, or that ONNX
Runtime cannot load, is deleted and rebuilt, never trusted.

This module knows nothing of onnxruntime's API (sessions.py is the only module importing it); it
only names files, computes keys and verifies entries.

``EDGEDIFF_SESSION_CACHE``: unset → ``<model>/session_cache`` (the user cache when the model folder
is read-only); ``off`` → no cache; a path → that folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

CACHE_VERSION = 1
ENV = "EDGEDIFF_SESSION_CACHE"
GRAPH_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
META_FILE = "meta.json"
# Initializers of at least this size go to the one external-data file (protobuf's 2 GB limit).
EXTERNAL_MIN_BYTES = 1024
# Sampled verification of the data file: whole-file hashing of a 3.4 GB U-Net would cost about as
# much as the optimization we are skipping. Size, these blocks and the whole graph file are checked.
SAMPLE_BLOCKS, SAMPLE_BYTES = 64, 1 << 16
# CPU flags that decide which kernels ONNX Runtime picks (and bakes into an ENABLE_ALL graph).
_CPU_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
              "avx512_fp16", "avx_vnni", "amx_bf16", "amx_int8", "amx_tile", "asimd", "sve", "sve2", "i8mm",
              "bf16")


def cache_root(model_dir: Path) -> Path | None:
    """Where this model's entries live, or None when caching is switched off."""
    setting = os.environ.get(ENV, "").strip()
    if setting.lower() in ("off", "0", "no", "false"):
        return None
    if setting:
        return Path(setting).expanduser() / _model_tag(model_dir)
    return writable_cache_dir(Path(model_dir), "session_cache", f"session_cache/{_model_tag(model_dir)}")


def writable_cache_dir(model_dir: Path, name: str, user_path: str) -> Path:
    """``<model>/<name>`` where the model folder is writable, else ``edgediff/<user_path>`` in the
    user's cache."""
    local = model_dir / name
    try:
        local.mkdir(exist_ok=True)
        if os.access(local, os.W_OK):
            return local
    except OSError:
        pass
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgediff" / user_path


def _model_tag(model_dir: Path) -> str:
    """Folder name for a model outside its own folder: readable and unique per location."""
    resolved = str(Path(model_dir).resolve())
    return f"{Path(resolved).name}-{hashlib.sha256(resolved.encode()).hexdigest()[:10]}"


def _cpuinfo() -> tuple[str, set[str]]:
    """(processor model fields, SIMD flags) from /proc/cpuinfo on Linux; elsewhere the platform's name."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "cpu family", "model", "CPU part", "CPU implementer") and value.strip():
                model += f"|{key}={value.strip()}"
            elif key in ("flags", "Features"):
                flags.update(value.split())
            elif not line.strip() and flags:
                break  # the first processor describes them all
    except OSError:
        pass
    return model, flags & set(_CPU_FLAGS)


def cpu_flags() -> set[str]:
    return _cpuinfo()[1]


def cpu_fingerprint() -> str:
    """The processor model and the SIMD flags that matter, as one string."""
    model, flags = _cpuinfo()
    return model + "|" + ",".join(sorted(flags))


def _source_stamp(path: Path) -> list:
    """Size and mtime of the graph and its external data: a graph edited in place changes the key."""
    stamp = []
    for file in (path, path.with_name(path.name + ".data")):
        if file.is_file():
            info = file.stat()
            stamp.append([file.name, info.st_size, info.st_mtime_ns])
    return stamp


def cache_key(graph_sha256: str, source: Path, provider: str, provider_options: list, runtime: dict,
              level: str) -> str:
    """A short hex key; ``runtime`` carries the onnxruntime version and build (and anything else)."""
    material = {"v": CACHE_VERSION, "graph": graph_sha256, "source": _source_stamp(Path(source)),
                "provider": provider, "options": provider_options, "runtime": runtime, "level": level,
                "cpu": cpu_fingerprint()}
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _sampled_sha256(path: Path) -> str:
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        if size <= SAMPLE_BLOCKS * SAMPLE_BYTES * 2:
            digest.update(handle.read())
        else:
            for index in range(SAMPLE_BLOCKS):
                handle.seek((size - SAMPLE_BYTES) * index // (SAMPLE_BLOCKS - 1))
                digest.update(handle.read(SAMPLE_BYTES))
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _describe(folder: Path) -> dict:
    files = {GRAPH_FILE: {"size": (folder / GRAPH_FILE).stat().st_size, "sha256": _file_sha256(folder / GRAPH_FILE)}}
    data = folder / DATA_FILE
    if data.is_file():
        files[DATA_FILE] = {"size": data.stat().st_size, "sampled_sha256": _sampled_sha256(data)}
    return files


@dataclass
class Entry:
    """One graph's cache entry for one key."""

    root: Path
    graph: str
    key: str
    provider: str

    @property
    def folder(self) -> Path:
        return self.root / f"{self.graph}-{self.key}"

    @property
    def model_path(self) -> Path:
        return self.folder / GRAPH_FILE

    @property
    def staging(self) -> Path:
        return self.root / f".{self.graph}-{self.key}.partial-{os.getpid()}"

    def valid(self) -> bool:
        """True when the entry is complete and its files are the ones recorded; else it is deleted."""
        meta_path = self.folder / META_FILE
        if not meta_path.is_file():
            if self.folder.exists():
                self.discard()
            return False
        try:
            meta = json.loads(meta_path.read_text())
            recorded = meta["files"]
            ok = meta.get("key") == self.key and set(recorded) == set(self._present()) and all(
                (self.folder / name).stat().st_size == info["size"] for name, info in recorded.items())
            ok = ok and _file_sha256(self.model_path) == recorded[GRAPH_FILE]["sha256"]
            if ok and DATA_FILE in recorded:
                ok = _sampled_sha256(self.folder / DATA_FILE) == recorded[DATA_FILE]["sampled_sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            self.discard()
        return ok

    def _present(self) -> list[str]:
        return [name for name in (GRAPH_FILE, DATA_FILE) if (self.folder / name).is_file()]

    def begin(self) -> Path:
        """A fresh staging folder; returns the path ONNX Runtime should write the optimized graph to."""
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True)
        return self.staging / GRAPH_FILE

    def commit(self) -> bool:
        """Record the staged files and move them into place (atomically: one rename)."""
        staging = self.staging
        try:
            if not (staging / GRAPH_FILE).is_file():
                return False
            meta = {"key": self.key, "graph": self.graph, "provider": self.provider, "files": _describe(staging)}
            tmp = staging / (META_FILE + ".tmp")
            tmp.write_text(json.dumps(meta, indent=1))
            os.replace(tmp, staging / META_FILE)
            if self.folder.exists():
                self.discard()
            os.replace(staging, self.folder)
        except OSError:
            return False  # another process won the race, or the disk is full: the session still runs
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self._prune()
        return True

    def compiled_blobs(self) -> bool:
        """For compiling runtimes (OpenVINO) that keep their own files in ``folder``: any there yet?"""
        return self.folder.is_dir() and any(path.name != META_FILE for path in self.folder.iterdir())

    def mark(self) -> None:
        """Record a compiling runtime's folder as this key's entry, and prune the graph's older ones."""
        try:
            (self.folder / META_FILE).write_text(json.dumps({"key": self.key, "graph": self.graph,
                                                             "provider": self.provider}))
        except OSError:
            return
        self._prune()

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def _prune(self) -> None:
        """Drop this graph's older entries for the same provider (a re-export or an upgrade)."""
        for folder in self.root.glob(f"{self.graph}-*"):
            if folder == self.folder or not folder.is_dir():
                continue
            try:
                meta = json.loads((folder / META_FILE).read_text())
            except (OSError, ValueError):
                continue  # an entry being written by another process, or not ours
            if meta.get("graph") == self.graph and meta.get("provider") == self.provider:
                shutil.rmtree(folder, ignore_errors=True)


def session_config(data_file: str = DATA_FILE) -> dict[str, str]:
    """Session config entries that make the saved graph keep its weights in one external file."""
    return {"session.optimized_model_external_initializers_file_name": data_file,
            "session.optimized_model_external_initializers_min_size_in_bytes": str(EXTERNAL_MIN_BYTES)}
