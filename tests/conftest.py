"""Shared fixtures: the real offline models (see backattn/offline.py) and a stand-in for the Hub."""

import pytest
from huggingface_hub import constants

from fake_hub import FakeHub

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


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A FakeHub (tests/fake_hub.py): it stands in for the Hub's servers, which the tests cannot reach."""
    # huggingface_hub reads these env vars once, at import time, into module attributes that its
    # functions consult at call time: patch the attributes, not os.environ.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # Calls without cache_dir (e.g. transformers' model-card check in push_to_hub) must not write
    # into the user's ~/.cache/huggingface/hub.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "default-hf-cache"))
    # No telemetry: otherwise building headers fetches an "agent harnesses" list from huggingface.co.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    with FakeHub() as fake:
        yield fake
