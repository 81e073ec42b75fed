import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

# tests/tiny_models.py builds tiny random-weight pipelines; make it importable from every test folder.
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "export"))

# Sessions save optimized graphs beside the model by default (runtime/session_cache.py): keep the
# tests' caches out of the checkout (the shipped default model lives in it) and out of the user's cache.
if "EDGEDIFF_SESSION_CACHE" not in os.environ:
    os.environ["EDGEDIFF_SESSION_CACHE"] = _cache = tempfile.mkdtemp(prefix="edgediff-test-cache-")
    atexit.register(shutil.rmtree, _cache, True)
