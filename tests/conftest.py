"""Fixtures every test folder shares; shared helper functions and constants are in helpers.py."""
import atexit
import gc
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# tests/tiny_models.py builds tiny random-weight pipelines; make it importable from every test folder.
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "export"))
sys.path.insert(0, str(Path(__file__).resolve().parent / "runtime"))  # fuzz_inputs

# Sessions save optimized graphs beside the model by default (runtime/session_cache.py): keep the
# tests' caches out of the checkout (the shipped default model lives in it) and out of the user's cache.
if "EDGEDIFF_SESSION_CACHE" not in os.environ:
    os.environ["EDGEDIFF_SESSION_CACHE"] = _cache = tempfile.mkdtemp(prefix="edgediff-test-cache-")
    atexit.register(shutil.rmtree, _cache, True)


def pytest_collection_finish(session):
    """Move what collection made (the imports of torch, diffusers, onnxruntime...: some 450k objects,
    alive all session) out of the garbage collector's reach. The exporter runs gc.collect() two or
    three times per graph (exporter/memory.py, to let torch modules go) and each walked all of them:
    0.3-1 s apiece, some 12% of an export's CPU time in tests/export/test_export_resume.py."""
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory):
    """Tiny models saved and exported once per session, on first use (tiny_models.TinyStore)."""
    from tiny_models import TinyStore

    return TinyStore(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def pipe():
    """The shipped default model, sessions resident (tests/export modules define their own)."""
    from edgediff.runtime import Pipeline

    return Pipeline.load(provider="cpu", memory="high")


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """Awkward picture files (runtime/fuzz_inputs.py), written once per module."""
    from fuzz_inputs import write_pictures

    return write_pictures(tmp_path_factory.mktemp("pictures"))
