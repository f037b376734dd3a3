"""Shared fixtures and helpers: the real offline models (see backattn/offline.py), a stand-in for the Hub, small
random base models, random heads and their inputs, the independent reference of the head's maths, and saved
heads. Test modules import the plain helpers with ``from conftest import ...``.

The head is checked against ``reference_head_logits``, a slow loop written here from the formula of
DESIGN.md section 2 (per position, per layer, per attention sub-head), never calling the code under test.
"""

import math

import pytest
import torch
from fake_hub import FakeHub
from huggingface_hub import constants
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from backattn import BackwardAttentionConfig, BackwardAttentionHead, GPT2BackwardAttentionForCausalLM, offline

VOCAB, HIDDEN = 97, 24


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
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gpt2-base")
    GPT2LMHeadModel(tiny_gpt2_config()).save_pretrained(path)
    return path


# --------------------------------------------------------------------------------------------------------
# small random bases, random heads and the independent reference of the head's maths


def tiny_gpt2_config(**overrides):
    options = dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2Config(**{**options, **overrides})


def tiny_llama_config(**overrides):
    options = dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaConfig(**{**options, **overrides})


@pytest.fixture(scope="session")
def llama_base_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama-base")
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(path)
    return path


def head_model(base_dir, head_config, family=GPT2BackwardAttentionForCausalLM):
    return family.from_pretrained(base_dir, head_config=head_config).eval()


def randomise(module, seed=1):
    """Give every parameter (zero-initialised gates and W_h too) a random value, so no term hides."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * 0.5)
    return module


def reference_head_logits(head, logits, hidden, embeddings):
    """DESIGN.md section 2, one position at a time, one layer at a time, one attention head at a time."""
    config = head.config
    vocab = embeddings.shape[0]
    head_dim = config.out_dim // config.num_attention_heads

    def layer_tables(layer):
        rms = torch.sqrt((embeddings**2).mean(dim=1, keepdim=True) + config.rms_norm_eps)
        normed = embeddings / rms * layer.norm.weight  # step 1
        latent = normed @ layer.w_latent if config.latent_dim else normed  # step 2
        return latent @ layer.w_key, latent @ layer.w_value  # step 3

    def layer_scores(layer, z, h):
        keys, values = layer_tables(layer)
        if config.logit_weighting == "softmax":  # step 4
            z_rms = torch.sqrt((z**2).mean() + config.rms_norm_eps)
            weights = torch.exp(z / z_rms) / torch.exp(z / z_rms).sum()
        else:
            weights = z
        u = sum(weights[i] * values[i] for i in range(vocab))  # step 5
        if config.divide_by_vocab:
            u = u / vocab
        q = u @ layer.w_query
        if config.use_hidden_state:
            q = q + h @ layer.w_hidden
        scores = torch.zeros(vocab, dtype=z.dtype)  # step 6
        for j in range(config.num_attention_heads):
            part = slice(j * head_dim, (j + 1) * head_dim)
            mix = layer.head_mix[j] if config.attention_head_combine == "mix" else 1.0
            scores = scores + mix * (keys[:, part] @ q[part]) / math.sqrt(head_dim)
        return scores

    def merge(z, scores, gate):  # step 7
        if config.score_mode == "add":
            return z + scores
        if config.score_mode == "gate":
            return z + gate * scores
        return scores

    out = torch.empty_like(logits)
    for t in range(logits.shape[0]):
        if config.layer_mode == "sequential":
            z = logits[t]
            for index, layer in enumerate(head.layers):
                gate = head.gate[index] if head.gate is not None else None
                z = merge(z, layer_scores(layer, z, hidden[t]), gate)
            out[t] = z
        else:
            mixes = head.layer_mix if head.layer_mix is not None else [1.0]
            scores = sum(m * layer_scores(layer, logits[t], hidden[t]) for m, layer in zip(mixes, head.layers))
            out[t] = merge(logits[t], scores, head.gate[0] if head.gate is not None else None)
    return out


OPTION_CASES = {
    "seed": {},
    "no-latent": {"latent_dim": None},
    "three-heads-sum": {"num_attention_heads": 3},
    "three-heads-mix": {"num_attention_heads": 3, "attention_head_combine": "mix"},
    "raw-weighting": {"logit_weighting": "raw"},
    "no-divide": {"divide_by_vocab": False},
    "gate": {"score_mode": "gate"},
    "replace": {"score_mode": "replace"},
    "parallel-layers": {"num_layers": 3},
    "sequential-layers-gated": {"num_layers": 2, "layer_mode": "sequential", "score_mode": "gate"},
    "sequential-raw": {"num_layers": 2, "layer_mode": "sequential", "logit_weighting": "raw", "num_attention_heads": 2},
    "hidden-state": {"use_hidden_state": True, "score_mode": "gate", "divide_by_vocab": False},
    "everything": {
        "num_attention_heads": 5,
        "attention_head_combine": "mix",
        "num_layers": 2,
        "use_hidden_state": True,
        "latent_dim": 7,
        "out_dim": 10,
        "score_mode": "gate",
        "vocab_chunk_size": 13,
    },
}


def random_head(options, seed=1):
    config = BackwardAttentionConfig(**options).for_base(VOCAB, HIDDEN)
    return randomise(BackwardAttentionHead(config), seed).double().eval()


def random_inputs(shape=(5,), seed=2):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, VOCAB, generator=generator, dtype=torch.float64) * 3
    hidden = torch.randn(*shape, HIDDEN, generator=generator, dtype=torch.float64)
    embeddings = torch.randn(VOCAB, HIDDEN, generator=generator, dtype=torch.float64)
    return logits, hidden, embeddings


# --------------------------------------------------------------------------------------------------------
# several task heads saved from one base (tests/test_heads.py, tests/test_head_files.py)


@pytest.fixture(scope="session")
def base_dir(gpt2_base_dir):
    return gpt2_base_dir


@pytest.fixture(scope="session")
def other_base_dir(tmp_path_factory):
    torch.manual_seed(1)  # same sizes, different weights: only the fingerprint tells them apart
    path = tmp_path_factory.mktemp("other-base")
    GPT2LMHeadModel(tiny_gpt2_config()).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def saved_heads(base_dir, tmp_path_factory):
    """Two trained-looking heads saved from one base: 'math' (hidden preset) and 'sentiment' (seed)."""
    model = GPT2BackwardAttentionForCausalLM.from_pretrained(base_dir, head_config="hidden", head_name="math")
    model.add_head({"num_attention_heads": 2, "out_dim": 8, "latent_dim": 6}, head_name="sentiment")
    randomise(model.heads, seed=3)
    root = tmp_path_factory.mktemp("heads")
    for name in ("math", "sentiment"):
        model.save_head(root / name, head_name=name, task=name, metrics={"ppl": 3.5})
    ids = ids_batch()
    with torch.no_grad():
        expected = {}
        for name in ("math", "sentiment"):
            model.set_head(name)
            expected[name] = model.eval()(ids).logits
    return root, expected


def ids_batch(rows=3, length=7, seed=0):
    return torch.randint(1, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def fresh_base(base_dir, *heads):
    """The base of ``base_dir`` carrying no head but those loaded from the directories ``heads``."""
    model = GPT2BackwardAttentionForCausalLM.from_pretrained(base_dir).eval()
    for head in heads:
        model.load_head(head)
    return model


def logits(model, ids=None, **kwargs):
    with torch.no_grad():
        return model(ids_batch() if ids is None else ids, **kwargs).logits


@pytest.fixture
def loaded(saved_heads, base_dir):
    root, expected = saved_heads
    model = fresh_base(base_dir)
    model.load_head(root / "math")
    yield model, root
    assert model.list_heads() == ["math"] and model.active_head() == "math"
    assert torch.equal(logits(model), expected["math"])


def copy_head(root, name, tmp_path, copy_name=None):
    target = tmp_path / (copy_name or f"copy-{name}")
    target.mkdir()
    for file in (root / name).iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target
