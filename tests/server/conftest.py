"""Fixtures of the server tests; the live server itself is in live_server.py."""
from __future__ import annotations

import pytest

from edgediff.runtime import Pipeline


@pytest.fixture(scope="session")
def default_pipe():
    """The shipped 128x128 default model, loaded once, sessions resident."""
    return Pipeline.load(None, provider="cpu", memory="high")
