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
def tiny_gpt2_math_rows(tiny_gpt2_dir, math_jsonl):
    """The tiny GPT-2's tokenizer (padding with EOS) and the math rows tokenized for SFT."""
    from transformers import AutoTokenizer

    from backattn.data.sft_data import PromptTemplate, load_math_dataset, tokenize_examples

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    tokenizer.pad_token = tokenizer.eos_token
    examples, _ = tokenize_examples(load_math_dataset(str(math_jsonl)), tokenizer, PromptTemplate(), 128)
    return tokenizer, examples


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
    """Give every parameter (zero-initialised gates and W_h too) a random value, so no term hides; and the
    statistics of standardize_query_state (mu, sigma^2 > 0), which start as the identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * 0.5)
        for name, buffer in module.named_buffers():
            if name.endswith("query_mean"):
                buffer.copy_(torch.randn(buffer.shape, generator=generator, dtype=buffer.dtype))
            elif name.endswith("query_variance"):
                buffer.copy_(torch.rand(buffer.shape, generator=generator, dtype=buffer.dtype) * 3 + 0.2)
    return module


def reference_query_state(head, h, layer_states=None):
    """Step 5's r_t for one position: h_t, or sum_k softmax(w_a)_k RMSNorm_q(y_t^k) with query_layers; then
    (r_t - mu) / sqrt(sigma^2 + eps), one dimension at a time, with standardize_query_state."""
    config = head.config
    if config.query_layers is None:
        state = h
    else:
        weights = torch.exp(head.query_mix) / torch.exp(head.query_mix).sum()
        state = torch.zeros_like(h)
        for k in range(len(config.query_layers)):
            y = layer_states[k]
            state = state + weights[k] * y / torch.sqrt((y**2).mean() + config.rms_norm_eps) * head.query_norm.weight
    if not config.standardize_query_state:
        return state
    mu, variance = head.query_mean.double(), head.query_variance.double()
    return torch.stack([(state[i] - mu[i]) / math.sqrt(variance[i] + config.rms_norm_eps) for i in range(len(state))])


def reference_head_logits(head, logits, hidden, embeddings, layer_states=None):
    """DESIGN.md section 2, one position at a time, one layer at a time, one attention head at a time; with
    differential score maps (arXiv 2410.05258) and query_layers as the config's docstring states them."""
    config = head.config
    vocab = embeddings.shape[0]
    head_dim = config.out_dim // config.num_attention_heads

    def layer_tables(layer):
        rms = torch.sqrt((embeddings**2).mean(dim=1, keepdim=True) + config.rms_norm_eps)
        normed = embeddings / rms * layer.norm.weight  # step 1
        latent = normed @ layer.w_latent if config.latent_dim else normed  # step 2
        second = latent @ layer.w_key2 if config.score_maps == "differential" else None
        return latent @ layer.w_key, latent @ layer.w_value, second  # step 3

    def score_map(layer, keys, q):
        scores = torch.zeros(vocab, dtype=q.dtype)  # step 6
        for j in range(config.num_attention_heads):
            part = slice(j * head_dim, (j + 1) * head_dim)
            mix = layer.head_mix[j] if config.attention_head_combine == "mix" else 1.0
            scores = scores + mix * (keys[:, part] @ q[part]) / math.sqrt(head_dim)
        return scores

    def layer_scores(layer, z, r):
        keys, values, keys2 = layer_tables(layer)
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
            q = q + r @ layer.w_hidden
        if config.score_maps == "single":
            return score_map(layer, keys, q)
        q2 = u @ layer.w_query2 + (r @ layer.w_hidden2 if config.use_hidden_state else 0.0)
        lam = (
            math.exp(sum(a * b for a, b in zip(layer.lambda_q1.tolist(), layer.lambda_k1.tolist())))
            - math.exp(sum(a * b for a, b in zip(layer.lambda_q2.tolist(), layer.lambda_k2.tolist())))
            + 0.8
        )
        return (1 - 0.8) * (score_map(layer, keys, q) - lam * score_map(layer, keys2, q2))

    def merge(z, scores, gate):  # step 7
        if config.score_mode == "add":
            return z + scores
        if config.score_mode == "gate":
            return z + gate * scores
        return scores

    out = torch.empty_like(logits)
    for t in range(logits.shape[0]):
        r = reference_query_state(head, hidden[t], None if layer_states is None else layer_states[t])
        if config.layer_mode == "sequential":
            z = logits[t]
            for index, layer in enumerate(head.layers):
                gate = head.gate[index] if head.gate is not None else None
                z = merge(z, layer_scores(layer, z, r), gate)
            out[t] = z
        else:
            mixes = head.layer_mix if head.layer_mix is not None else [1.0]
            scores = sum(m * layer_scores(layer, logits[t], r) for m, layer in zip(mixes, head.layers))
            out[t] = merge(logits[t], scores, head.gate[0] if head.gate is not None else None)
    return out


def reference_sequence_logits(head, logits, hidden, embeddings, input_ids, attention_mask, layer_states=None):
    """Steps 1-8 for one sequence (T positions): steps 1-7 by ``reference_head_logits``, then See et al.'s
    pointer-generator mixture written out, p = (1 - lambda) softmax(z) + lambda c over the earlier positions
    j < t that the mask keeps (c adds a_j to the token x_{j+1}), entering as z + g_c (log p - log softmax(z))."""
    config = head.config
    z = reference_head_logits(head, logits, hidden, embeddings, layer_states)
    if not config.copy_attention:
        return z
    states = [
        reference_query_state(head, hidden[t], None if layer_states is None else layer_states[t])
        for t in range(len(input_ids))
    ]
    out = z.clone()
    for t in range(len(input_ids)):
        earlier = [j for j in range(t) if attention_mask[j]]
        if not earlier:
            continue
        query = states[t] @ head.copy_query
        scores = torch.stack([query @ (states[j] @ head.copy_key) / math.sqrt(config.out_dim) for j in earlier])
        attention = torch.exp(scores - scores.max()) / torch.exp(scores - scores.max()).sum()
        copied = torch.zeros(z.shape[-1], dtype=z.dtype)
        for a, j in zip(attention, earlier):
            copied[input_ids[j + 1]] += a
        lam = 1 / (1 + torch.exp(-(states[t] @ head.copy_gate_weight + head.copy_gate_bias[0])))
        p = torch.exp(z[t] - z[t].max()) / torch.exp(z[t] - z[t].max()).sum()
        mixture = (1 - lam) * p + lam * copied
        gate = head.copy_gate[0] if config.score_mode == "gate" else 1.0
        out[t] = z[t] + gate * (torch.log(mixture) - torch.log(p))
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
    "differential": {"score_maps": "differential"},
    "hidden-standardized": {"use_hidden_state": True, "standardize_query_state": True, "score_mode": "gate"},
    "differential-raw-sequential": {
        "score_maps": "differential",
        "logit_weighting": "raw",
        "num_layers": 2,
        "layer_mode": "sequential",
        "num_attention_heads": 2,
        "use_hidden_state": True,
        "score_mode": "gate",
    },  # fmt: skip
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


#: Cases of the options that read the sequence around each position (query_layers, copy_attention), alone and
#: with the others; their inputs come from ``random_sequence``.
SEQUENCE_CASES = {
    "query-layers": {"query_layers": [2, 0], "use_hidden_state": True, "score_mode": "gate"},
    "query-layers-differential": {
        "query_layers": [1],
        "use_hidden_state": True,
        "score_maps": "differential",
        "num_attention_heads": 2,
    },  # fmt: skip
    "copy": {"copy_attention": True},
    "copy-query-layers-standardized": {
        "copy_attention": True,
        "query_layers": [2, 0],
        "use_hidden_state": True,
        "standardize_query_state": True,
        "score_mode": "gate",
    },  # fmt: skip
    "copy-gate": {"copy_attention": True, "score_mode": "gate", "use_hidden_state": True, "divide_by_vocab": False},
    "copy-replace": {"copy_attention": True, "score_mode": "replace", "num_layers": 2},
    "copy-query-layers-sequential": {
        "copy_attention": True,
        "query_layers": [0, 1, 2],
        "num_layers": 2,
        "layer_mode": "sequential",
        "score_mode": "gate",
    },  # fmt: skip
    "all-three": {
        "query_layers": [0, 2],
        "score_maps": "differential",
        "copy_attention": True,
        "use_hidden_state": True,
        "score_mode": "gate",
        "num_attention_heads": 3,
        "attention_head_combine": "mix",
        "out_dim": 12,
    },  # fmt: skip
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


def random_sequence(rows=2, length=6, blocks=3, seed=4):
    """Random ids, a mask with left padding in row 1 (and a padded position inside row 0), and the states of
    ``blocks`` decoder blocks (block -> rows x length x HIDDEN), in float64."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, length), generator=generator)
    mask = torch.ones(rows, length, dtype=torch.bool)
    mask[1, :2] = False
    mask[0, 3] = False
    states = {k: torch.randn(rows, length, HIDDEN, generator=generator, dtype=torch.float64) * 4 for k in range(blocks)}
    return ids, mask, states


def stacked_states(head, states):
    """The head's query_layers states, rows x length x len(query_layers) x HIDDEN (None without query_layers)."""
    layers = head.config.query_layers
    return None if layers is None else torch.stack([states[k] for k in layers], dim=-2)


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


def reload_without_backattn(model, ids, tmp_path, more_checks: str = "") -> str:
    """Save ``model``, load the checkpoint with ``trust_remote_code`` in a fresh Python where backattn cannot be
    imported (nor the repository found on the path), and check its logits on ``ids`` equal ``model``'s bit for bit.

    ``more_checks``: further lines of that script (``model``, ``expected``, ``torch`` in scope). Returns the
    checkpoint directory; the script's ``OK <class name>`` line is checked against ``type(model).__name__``."""
    import os
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    from safetensors.torch import save_file

    repo = str(Path(__file__).resolve().parents[1])
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    with torch.no_grad():
        save_file({"ids": ids, "logits": model(ids).logits.contiguous()}, tmp_path / "expected.safetensors")
    script = textwrap.dedent(
        f"""
        import importlib.abc, sys
        sys.path[:] = [p for p in sys.path if p.rstrip("/") != {repo!r}]  # an editable install puts it there
        class NoBackattn(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "backattn" or name.startswith("backattn."):
                    raise ImportError("backattn must not be imported here")
        sys.meta_path.insert(0, NoBackattn())
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(checkpoint)!r}, trust_remote_code=True).eval()
        expected = load_file({str(tmp_path / "expected.safetensors")!r})
        with torch.no_grad():
            logits = model(expected["ids"]).logits
        assert "backattn" not in sys.modules
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert torch.equal(logits, expected["logits"]), (logits - expected["logits"]).abs().max()
        """
    )
    script += textwrap.dedent(more_checks)
    script += (
        f"\nassert 'backattn' not in sys.modules and {repo!r} not in sys.path\nprint('OK', type(model).__name__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nor the repository on the path
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"OK {type(model).__name__}" in result.stdout
    return checkpoint


@pytest.fixture(scope="session")
def tiny_llama_and_rows(tmp_path_factory, smollm2_dir):
    """A tiny random Llama with the real SmolLM2 tokenizer, and 24 problems from 6 templates."""
    import json
    import random

    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("compare-heads")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    tokenizer.save_pretrained(path / "model")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path / "model")
    rng = random.Random(0)
    with open(path / "rows.jsonl", "w") as handle:
        for template in range(6):
            for _ in range(4):
                a, b = rng.randint(2, 60), rng.randint(2, 60)
                row = {"problem": f"Tom has {a} apples and buys {b}. How many?", "template_id": template,
                       "generated_solution": f"{a} + {b} = {a + b}.", "expected_answer": str(a + b)}  # fmt: skip
                handle.write(json.dumps(row) + "\n")
    return path
