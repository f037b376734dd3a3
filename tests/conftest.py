"""Shared fixtures: the real offline models (see backattn/offline.py)."""

import pytest

from backattn import offline


@pytest.fixture(scope="session")
def smollm2_dir():
    """Transformers directory of the real SmolLM2-135M-Instruct (default cache; converted at
    most once, ~50 s the first time on this machine, then instant)."""
    return offline.smollm2_path()


@pytest.fixture
def gpt2_tokenizer():
    """A fresh real GPT-2 tokenizer (safe to modify)."""
    return offline.gpt2_tokenizer()
