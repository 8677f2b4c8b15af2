"""
What every test of a real llama-server needs from pytest: the binary (or a
skip that says why, and a failure under CI, where they must run), and a
server started with a generated model for a module's fixture.

Kept apart from ``tests/llama_support.py``, which benchmarks import without pytest.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.llama_support import LlamaServer, find_llama_server, generated_model

LLAMA_BINARY, LLAMA_FOUND = find_llama_server()


def require_llama_server() -> Path:
    """llama-server's path; skips (fails, under CI) without it or the model generator's ``gguf``."""
    missing = LLAMA_FOUND if LLAMA_BINARY is None else None
    if missing is None and importlib.util.find_spec("gguf") is None:
        missing = "the gguf package is not installed (pip install gguf), so no test model can be made"
    if missing is None:
        assert LLAMA_BINARY is not None
        return LLAMA_BINARY
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the llama-server tests, but: {missing}", pytrace=False)
    pytest.skip(missing)


def running_llama(
    tmp_path_factory: pytest.TempPathFactory,
    label: str,
    preset: str = "small",
    start_timeout: float = 60.0,
    **options: Any,
) -> Iterator[LlamaServer]:
    """For a fixture to ``yield from``: a started llama-server, stopped afterwards."""
    binary = require_llama_server()
    server = LlamaServer(binary, generated_model(preset), tmp_path_factory.mktemp(label) / "llama-server.log", **options)
    server.start(timeout=start_timeout)
    yield server
    server.stop()
