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


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    """A small random GPT-2 with the real GPT-2 tokenizer saved beside it (no GPT-2 weights exist offline)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("tiny-gpt2")
    offline.gpt2_tokenizer().save_pretrained(path)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=128)).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def math_jsonl(tmp_path_factory):
    """40 small word problems in the OpenMathInstruct-2 columns."""
    import json
    import random

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "math.jsonl"
    with open(path, "w") as handle:
        for _ in range(40):
            a, b = rng.randint(2, 60), rng.randint(2, 60)
            row = {
                "problem": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
                "generated_solution": f"He has {a} + {b} = {a + b} apples.",
                "expected_answer": str(a + b),
                "problem_source": "synthetic",
            }
            handle.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="session")
def gpt2_base_dir(tmp_path_factory):
    """A tiny random GPT-2 (vocabulary 97, width 24) saved as a plain base checkpoint."""
    import torch
    from transformers import GPT2LMHeadModel

    from test_modeling_backattn import tiny_gpt2_config

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gpt2-base")
    GPT2LMHeadModel(tiny_gpt2_config()).save_pretrained(path)
    return path
