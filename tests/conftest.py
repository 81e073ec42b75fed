import sys
from pathlib import Path

# tests/tiny_models.py builds tiny random-weight pipelines; make it importable from every test folder.
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "export"))
