"""Shared fixtures: tiny random models built once per session and cached on disk."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """`tiny_model(family, layers=2, dtype="bfloat16", tied=None)` -> path of a saved random HF model."""
    from converters.tiny_models import make_test_model

    cache: dict = {}

    def make(family: str, layers: int = 2, dtype: str = "bfloat16", tied: bool | None = None, seed: int = 0):
        key = (family, layers, dtype, tied, seed)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"hf-{family}-{layers}-{dtype}-{tied}-{seed}")
            cache[key] = make_test_model(family, out / "model", layers=layers, dtype=dtype, tied=tied, seed=seed)
        return cache[key]

    return make
