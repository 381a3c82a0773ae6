"""Shared fixtures: tiny random-weight models (written per session) and real models (fetched once)."""

from __future__ import annotations

import pytest

TINY_ARCHS = ["llama", "qwen2", "qwen3", "gemma3"]


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """tiny_gguf(arch, **kw) -> path of a tiny random-weight GGUF (cached for the session)."""
    from pytriatt.tiny import write_tiny_gguf

    made = {}

    def make(arch: str = "llama", **kw):
        key = (arch, tuple(sorted(kw.items())))
        if key not in made:
            d = tmp_path_factory.mktemp(f"tiny-{arch}")
            made[key] = write_tiny_gguf(d / f"tiny-{arch}.gguf", arch=arch, **kw)
        return made[key]

    return make


@pytest.fixture(scope="session")
def smollm2_path():
    from pytriatt import models
    return models.get("smollm2-135m")
