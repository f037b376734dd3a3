"""The head and the model families on small random base models.

The head is checked against ``reference_head_logits``, a slow loop written here from the formula of
DESIGN.md section 2 (per position, per layer, per head), never calling the code under test.
"""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, pipeline

from backattn import (
    BackwardAttentionConfig,
    BackwardAttentionHead,
    GPT2BackwardAttentionForCausalLM,
    LlamaBackwardAttentionForCausalLM,
)

VOCAB, HIDDEN = 97, 24


def tiny_gpt2_config(**overrides):
    options = dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2Config(**{**options, **overrides})


def tiny_llama_config(**overrides):
    options = dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaConfig(**{**options, **overrides})


@pytest.fixture(scope="module")
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


# --------------------------------------------------------------------------------------------------------
# the independent reference


def reference_head_logits(head, logits, hidden, embeddings):
    """DESIGN.md section 2, one position at a time, one layer at a time, one attention head at a time."""
    config = head.config
    vocab = embeddings.shape[0]
    head_dim = config.out_dim // config.num_heads

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
        for j in range(config.num_heads):
            part = slice(j * head_dim, (j + 1) * head_dim)
            mix = layer.head_mix[j] if config.head_combine == "mix" else 1.0
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
    "three-heads-sum": {"num_heads": 3},
    "three-heads-mix": {"num_heads": 3, "head_combine": "mix"},
    "raw-weighting": {"logit_weighting": "raw"},
    "no-divide": {"divide_by_vocab": False},
    "gate": {"score_mode": "gate"},
    "replace": {"score_mode": "replace"},
    "parallel-layers": {"num_layers": 3},
    "sequential-layers-gated": {"num_layers": 2, "layer_mode": "sequential", "score_mode": "gate"},
    "sequential-raw": {"num_layers": 2, "layer_mode": "sequential", "logit_weighting": "raw", "num_heads": 2},
    "hidden-state": {"use_hidden_state": True, "score_mode": "gate", "divide_by_vocab": False},
    "everything": {
        "num_heads": 5, "head_combine": "mix", "num_layers": 2, "use_hidden_state": True, "latent_dim": 7,
        "out_dim": 10, "score_mode": "gate", "vocab_chunk_size": 13,
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


@pytest.mark.parametrize("options", OPTION_CASES.values(), ids=OPTION_CASES.keys())
def test_head_matches_slow_reference(options):
    head = random_head(options)
    logits, hidden, embeddings = random_inputs()
    with torch.no_grad():
        expected = reference_head_logits(head, logits, hidden, embeddings)
        assert torch.allclose(head(logits, hidden, embeddings), expected, rtol=1e-10, atol=1e-10)


def test_head_works_on_a_batch_of_positions():
    head = random_head({"num_heads": 2, "use_hidden_state": True})
    logits, hidden, embeddings = random_inputs(shape=(3, 4))
    with torch.no_grad():
        batched = head(logits, hidden, embeddings)
        assert batched.shape == (3, 4, VOCAB)
        for b in range(3):
            assert torch.allclose(batched[b], reference_head_logits(head, logits[b], hidden[b], embeddings), atol=1e-10)


@pytest.mark.parametrize("options", OPTION_CASES.values(), ids=OPTION_CASES.keys())
@pytest.mark.parametrize("chunk", [1, 10, VOCAB + 3])
def test_chunked_equals_unchunked_output_and_gradients(options, chunk):
    options = {k: v for k, v in options.items() if k != "vocab_chunk_size"}
    whole, chunked = random_head(options), random_head({**options, "vocab_chunk_size": chunk})
    logits, hidden, embeddings = random_inputs(shape=(2, 3))
    logits.requires_grad_(True)
    outputs, grads = [], []
    for head in (whole, chunked):
        head.zero_grad()
        logits.grad = None
        out = head(logits, hidden, embeddings)
        (out * torch.linspace(-1, 1, VOCAB, dtype=out.dtype)).sum().backward()
        outputs.append(out.detach())
        grads.append([logits.grad.clone()] + [p.grad.clone() for p in head.parameters()])
    assert torch.allclose(outputs[0], outputs[1], rtol=1e-12, atol=1e-12)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_chunking_keeps_no_vocabulary_sized_activations_for_backward():
    """With chunking under autograd, the slices are recomputed in backward rather than stored."""
    options = {"latent_dim": None, "out_dim": 8}
    logits, hidden, embeddings = random_inputs(shape=(64,))
    logits.requires_grad_(True)
    saved_bytes = {}
    for chunk in (None, 8):
        head = random_head({**options, "vocab_chunk_size": chunk})
        known = {t.untyped_storage().data_ptr() for t in (logits, hidden, embeddings, *head.parameters())}
        storages = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in known:
                storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            head(logits, hidden, embeddings).sum()
        saved_bytes[chunk] = sum(storages.values())
    # unchunked keeps several (positions x vocab) tensors; chunked keeps about one (its output)
    assert saved_bytes[None] >= 2 * logits.nbytes, saved_bytes
    assert saved_bytes[8] <= 1.5 * logits.nbytes


def test_dropout_only_in_training_mode():
    head = random_head({"dropout": 0.5})
    logits, hidden, embeddings = random_inputs()
    with torch.no_grad():
        evaluated = head(logits, hidden, embeddings)
        assert torch.equal(evaluated, head(logits, hidden, embeddings))
        head.train()
        assert not torch.allclose(head(logits, hidden, embeddings), evaluated)


def test_weight_tables_are_cached_until_weights_change(monkeypatch):
    head = random_head({"num_layers": 2}).float()
    logits, hidden, embeddings = (t.float() for t in random_inputs())
    calls = []
    original = type(head.layers[0]).tables
    monkeypatch.setattr(type(head.layers[0]), "tables", lambda self, *a: calls.append(1) or original(self, *a))
    with torch.no_grad():
        first = head(logits, hidden, embeddings)
        head(logits, hidden, embeddings)
        assert len(calls) == 2  # two layers, computed once
        head.layers[1].w_key.mul_(2)  # an in-place update, as an optimiser step makes
        changed = head(logits, hidden, embeddings)
        assert len(calls) == 4 and not torch.allclose(changed, first)
        assert torch.allclose(changed, reference_head_logits(head, logits, hidden, embeddings).float(), atol=1e-5)
    head(logits, hidden, embeddings)  # gradients wanted: fresh tables with a graph, never the cache
    assert len(calls) == 6


def test_no_nan_for_extreme_or_constant_logits():
    head = random_head({"num_heads": 3, "use_hidden_state": True})
    _, hidden, embeddings = random_inputs(shape=(3,))
    logits = torch.stack([torch.zeros(VOCAB), torch.full((VOCAB,), 1e4), torch.linspace(-1e4, 1e4, VOCAB)]).double()
    with torch.no_grad():
        assert torch.isfinite(head(logits, hidden, embeddings)).all()


RAW_CASES = {name: options for name, options in OPTION_CASES.items() if options.get("logit_weighting") == "raw"}


@pytest.mark.parametrize("options", RAW_CASES.values(), ids=RAW_CASES.keys())
def test_raw_weighting_shortcut_through_the_output_layer_is_exact(options):
    """Given logits made as ``h W^T``, raw weighting uses ``h (W^T Vv)``: same output, same gradients."""
    head = random_head(options)
    _, hidden, embeddings = random_inputs(shape=(2, 3))
    weight = torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    logits = hidden @ weight.T
    results = []
    for output_weight in (None, weight):
        head.zero_grad()
        out = head(logits, hidden, embeddings, output_weight=output_weight)
        (out * torch.linspace(-1, 1, VOCAB, dtype=out.dtype)).sum().backward()
        results.append([out.detach()] + [p.grad.clone() for p in head.parameters()])
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        expected = torch.stack([reference_head_logits(head, logits[b], hidden[b], embeddings) for b in range(2)])
        assert torch.allclose(head(logits, hidden, embeddings, output_weight=weight), expected, atol=1e-10)


def reference_top_k_logits(head, logits, hidden, embeddings, k):
    """Top-k re-ranking from its definition, one position at a time, for a one-layer head: the step-5 sum
    runs over the base's k most likely tokens only (softmax weights keep the full normaliser), scores are
    added to those k tokens only, and every other logit is the base's."""
    config, layer = head.config, head.layers[0]
    rms = torch.sqrt((embeddings**2).mean(dim=1, keepdim=True) + config.rms_norm_eps)
    latent = embeddings / rms * layer.norm.weight
    latent = latent @ layer.w_latent if config.latent_dim else latent
    keys, values = latent @ layer.w_key, latent @ layer.w_value
    head_dim = config.out_dim // config.num_heads
    out = logits.clone()
    for t in range(logits.shape[0]):
        z = logits[t]
        top = sorted(range(VOCAB), key=lambda i: -z[i].item())[:k]
        if config.logit_weighting == "softmax":
            z_rms = torch.sqrt((z**2).mean() + config.rms_norm_eps)
            weights = torch.exp(z / z_rms) / torch.exp(z / z_rms).sum()
        else:
            weights = z
        u = sum(weights[i] * values[i] for i in top)
        if config.divide_by_vocab:
            u = u / VOCAB
        q = u @ layer.w_query + (hidden[t] @ layer.w_hidden if config.use_hidden_state else 0)
        for i in top:
            score = sum(
                (layer.head_mix[j] if config.head_combine == "mix" else 1.0)
                * (keys[i, j * head_dim : (j + 1) * head_dim] @ q[j * head_dim : (j + 1) * head_dim])
                / math.sqrt(head_dim)
                for j in range(config.num_heads)
            )
            out[t, i] = z[i] + (head.gate[0] * score if config.score_mode == "gate" else score)
    return out


TOP_K_CASES = {name: OPTION_CASES[name] for name in ("seed", "three-heads-mix", "raw-weighting", "hidden-state")}


@pytest.mark.parametrize("options", TOP_K_CASES.values(), ids=TOP_K_CASES.keys())
@pytest.mark.parametrize("k", [1, 5])
def test_top_k_reranking_matches_its_reference(options, k):
    head = random_head(options)
    logits, hidden, embeddings = random_inputs(shape=(4,))
    with torch.no_grad():
        reranked = head(logits, hidden, embeddings, rerank_top_k=k)
        assert torch.allclose(reranked, reference_top_k_logits(head, logits, hidden, embeddings, k), atol=1e-10)
        untouched = torch.ones_like(logits, dtype=torch.bool).scatter(-1, logits.topk(k).indices, False)
        assert torch.equal(reranked[untouched], logits[untouched])  # the other logits are the base's, exactly


@pytest.mark.parametrize("options", [{"num_layers": 2, "score_mode": "gate"}, {"layer_mode": "sequential", "num_layers": 2}])
def test_top_k_over_the_whole_vocabulary_is_the_full_head(options):
    head = random_head(options)
    logits, hidden, embeddings = random_inputs(shape=(3,))
    with torch.no_grad():
        everything = head(logits, hidden, embeddings, rerank_top_k=VOCAB + 5)  # gathers and scatters all V tokens
        assert torch.allclose(everything, head(logits, hidden, embeddings), rtol=1e-12, atol=1e-12)


def test_raw_weighting_top_k_is_the_same_with_or_without_the_output_layer():
    head = random_head({"logit_weighting": "raw"})
    _, hidden, embeddings = random_inputs(shape=(4,))
    weight = torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(
            head(hidden @ weight.T, hidden, embeddings, output_weight=weight, rerank_top_k=5),
            head(hidden @ weight.T, hidden, embeddings, rerank_top_k=5),
        )


def test_tables_follow_changes_of_the_output_layer():
    head = random_head({"logit_weighting": "raw"})
    _, hidden, embeddings = random_inputs(shape=(4,))
    weight = torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    with torch.no_grad():
        head(hidden @ weight.T, hidden, embeddings, output_weight=weight)
        weight.mul_(3)  # in place: same storage, new version
        assert torch.allclose(
            head(hidden @ weight.T, hidden, embeddings, output_weight=weight),
            reference_head_logits(head, hidden @ weight.T, hidden, embeddings),
            atol=1e-10,
        )


def test_top_k_reranking_needs_scores_added_to_the_logits():
    head = random_head({"score_mode": "replace"})
    with pytest.raises(ValueError, match="needs score_mode 'add' or 'gate'"):
        head(*random_inputs(), rerank_top_k=3)


def test_head_refuses_a_base_of_another_size():
    head = random_head({})
    logits, hidden, embeddings = random_inputs()
    with pytest.raises(ValueError, match="built for vocab_size=97, hidden_size=24"):
        head(logits[..., :-1], hidden, embeddings[:-1])


# --------------------------------------------------------------------------------------------------------
# the model families


@pytest.mark.parametrize("family, base", [("gpt2", GPT2LMHeadModel), ("llama", LlamaForCausalLM)])
def test_fresh_head_on_a_plain_base(family, base, gpt2_base_dir, llama_base_dir):
    base_dir = gpt2_base_dir if family == "gpt2" else llama_base_dir
    model_class = GPT2BackwardAttentionForCausalLM if family == "gpt2" else LlamaBackwardAttentionForCausalLM
    plain = base.from_pretrained(base_dir).eval()
    model = head_model(base_dir, "gated", model_class)
    head_state = {k for k in model.state_dict() if k.startswith("heads.")}
    assert head_state and {k for k in model.state_dict()} - head_state == set(plain.state_dict())
    for name, tensor in plain.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name  # base weights load unchanged
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("heads.default.") for name in trainable)
    assert model.config.heads["default"]["vocab_size"] == VOCAB

    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)  # the zero gate gives the base exactly


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_model_logits_are_the_head_applied_to_the_base(family, gpt2_base_dir, llama_base_dir):
    base_dir = gpt2_base_dir if family == "gpt2" else llama_base_dir
    model_class = GPT2BackwardAttentionForCausalLM if family == "gpt2" else LlamaBackwardAttentionForCausalLM
    model = head_model(base_dir, {"num_heads": 2, "use_hidden_state": True, "score_mode": "gate"}, model_class)
    randomise(model.heads)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        base_out = model.base_model(ids)
        hidden = base_out.last_hidden_state
        base_logits = model.lm_head(hidden)
        expected = torch.stack(
            [reference_head_logits(model.heads.default, base_logits[b], hidden[b], model.get_input_embeddings().weight) for b in range(2)]
        )  # fmt: skip
        assert torch.allclose(model(ids).logits, expected, atol=1e-5)


def test_generate_passes_top_k_reranking_to_every_step(gpt2_base_dir):
    model = head_model(gpt2_base_dir, {"num_heads": 2, "use_hidden_state": True, "score_mode": "gate"})
    randomise(model.heads)
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                   rerank_top_k=3, pad_token_id=0)  # fmt: skip
        for step in range(ids.shape[1], generated.shape[1]):
            logits = model(generated[:, :step], rerank_top_k=3).logits[:, -1]
            assert torch.equal(generated[:, step], logits.argmax(-1))


def test_config_rerank_top_k_is_the_default_for_every_call_and_is_saved(gpt2_base_dir, tmp_path):
    model = head_model(gpt2_base_dir, {"score_mode": "gate"})
    randomise(model.heads)
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        full, top3 = model(ids).logits, model(ids, rerank_top_k=3).logits
        model.config.rerank_top_k = 3
        assert torch.equal(model(ids).logits, top3) and not torch.equal(top3, full)
        assert torch.equal(model(ids, rerank_top_k=0).logits, full)  # 0: the whole vocabulary for this call
        model.save_pretrained(tmp_path)
        reloaded = GPT2BackwardAttentionForCausalLM.from_pretrained(tmp_path).eval()
        assert reloaded.config.rerank_top_k == 3 and torch.equal(reloaded(ids).logits, top3)
    with pytest.raises(ValueError, match="rerank_top_k must be a positive integer or None"):
        type(model.config)(rerank_top_k=-1)


def test_one_optimiser_step_changes_only_head_tensors(gpt2_base_dir):
    model = head_model(gpt2_base_dir, "seed").train()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(5))
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("heads."))
    optimiser.step()
    for name, tensor in model.state_dict().items():
        if name.startswith("heads."):
            assert not torch.equal(tensor, before[name]), f"head tensor {name} did not train"
        else:
            assert torch.equal(tensor, before[name]), f"base tensor {name} changed"


def test_zero_gate_passes_gradient_only_to_the_gate(gpt2_base_dir):
    model = head_model(gpt2_base_dir, "gated").train()
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(6))
    model(ids, labels=ids).loss.backward()
    for name, parameter in model.heads.default.named_parameters():
        if name == "gate":
            assert parameter.grad.abs().sum() > 0
        else:
            assert torch.count_nonzero(parameter.grad) == 0, name


def test_training_mode_keeps_the_frozen_base_deterministic(gpt2_base_dir):
    model = head_model(gpt2_base_dir, "gated").train()
    assert model.heads.training and not model.base_model.training
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)


def test_loss_is_shifted_masked_cross_entropy(gpt2_base_dir):
    model = head_model(gpt2_base_dir, "seed")
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(8))
    labels = ids.clone()
    labels[0, :3] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
        expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, expected, atol=1e-6)


def test_logits_to_keep_and_hidden_states(gpt2_base_dir):
    model = head_model(gpt2_base_dir, "hidden")
    randomise(model.heads)
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        full = model(ids, output_hidden_states=True)
        last = model(ids, logits_to_keep=1)
        positions = model(ids, logits_to_keep=torch.tensor([2, 5]))
    assert len(full.hidden_states) == model.config.n_layer + 1
    assert last.logits.shape == (2, 1, VOCAB) and torch.allclose(last.logits, full.logits[:, -1:], rtol=1e-5, atol=1e-5)
    assert torch.allclose(positions.logits, full.logits[:, [2, 5]], atol=1e-6)
    tuple_out = model(ids, return_dict=False)
    assert torch.allclose(tuple_out[0], full.logits, atol=1e-6)


def test_attention_mask_is_honoured_and_padding_rows_stay_finite(gpt2_base_dir):
    model = head_model(gpt2_base_dir, "hidden")
    randomise(model.heads)
    ids = torch.randint(1, VOCAB, (3, 6), generator=torch.Generator().manual_seed(10))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    mask[2] = 0  # a row of padding only
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # GPT-2's absolute positions start after the padding
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=position_ids).logits
        alone = model(ids[1:2, 2:]).logits
    assert torch.isfinite(out).all()
    assert torch.allclose(out[1, 2:], alone[0], atol=1e-4)


def test_token_ids_outside_the_vocabulary_are_refused(gpt2_base_dir):
    model = head_model(gpt2_base_dir, "seed")
    with pytest.raises(ValueError, match=r"token id 97, outside this model's vocabulary \[0, 97\)"):
        model(torch.tensor([[1, 2, VOCAB]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[-1, 2]]))


def test_a_head_built_for_another_base_is_refused(gpt2_base_dir, tmp_path):
    model = head_model(gpt2_base_dir, "seed")
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"vocab_size 97 \(head\) != 120 \(base model\)"):
        GPT2BackwardAttentionForCausalLM(GPT2BackwardAttentionConfig_from(model.config, vocab_size=120))
    with pytest.raises(ValueError, match="already carries heads"):
        GPT2BackwardAttentionForCausalLM.from_pretrained(tmp_path, head_config="seed")


def GPT2BackwardAttentionConfig_from(config, **changes):
    options = config.to_dict()
    options.update(changes)
    return type(config).from_dict(options)


def test_save_and_auto_load_gives_identical_logits(gpt2_base_dir, tmp_path):
    model = head_model(gpt2_base_dir, {"num_layers": 2, "layer_mode": "sequential", "score_mode": "gate"})
    randomise(model.heads)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is GPT2BackwardAttentionForCausalLM
    assert {n for n, p in reloaded.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_trust_remote_code_loads_without_backattn(family, gpt2_base_dir, llama_base_dir, tmp_path):
    base_dir = gpt2_base_dir if family == "gpt2" else llama_base_dir
    model_class = GPT2BackwardAttentionForCausalLM if family == "gpt2" else LlamaBackwardAttentionForCausalLM
    model = head_model(base_dir, "hidden", model_class)
    randomise(model.heads)
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        save_file({"ids": ids, "logits": model(ids).logits.contiguous()}, tmp_path / "expected.safetensors")
    script = textwrap.dedent(
        f"""
        import importlib.abc, sys
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
        print("OK", type(model).__name__)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"OK {model_class.__name__}" in result.stdout


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generate_greedy_with_and_without_cache(family, gpt2_base_dir, llama_base_dir):
    base_dir = gpt2_base_dir if family == "gpt2" else llama_base_dir
    model_class = GPT2BackwardAttentionForCausalLM if family == "gpt2" else LlamaBackwardAttentionForCausalLM
    model = head_model(base_dir, {"use_hidden_state": True, "num_heads": 2}, model_class)
    randomise(model.heads)
    prompt = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(13))
    options = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    cached = model.generate(prompt, use_cache=True, **options)
    uncached = model.generate(prompt, use_cache=False, **options)
    assert cached.shape == (2, 13) and torch.equal(cached, uncached)
    # greedy follows the head's own argmax, step by step
    ids = prompt
    with torch.no_grad():
        for _ in range(8):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, ids)


def test_generate_sampling_and_beam_search(gpt2_base_dir):
    model = head_model(gpt2_base_dir, "seed")
    prompt = torch.randint(1, VOCAB, (2, 4), generator=torch.Generator().manual_seed(14))
    common = dict(max_new_tokens=6, pad_token_id=0, eos_token_id=None)
    torch.manual_seed(0)
    sampled = model.generate(prompt, do_sample=True, top_k=20, temperature=0.8, **common)
    torch.manual_seed(0)
    assert torch.equal(sampled, model.generate(prompt, do_sample=True, top_k=20, temperature=0.8, **common))
    assert sampled.shape == (2, 10) and sampled.max() < VOCAB
    beams = model.generate(prompt, num_beams=3, do_sample=False, use_cache=True, **common)
    assert torch.equal(beams, model.generate(prompt, num_beams=3, do_sample=False, use_cache=False, **common))


def test_real_gpt2_tokenizer_and_pipeline(gpt2_tokenizer, tmp_path):
    torch.manual_seed(0)
    base = GPT2LMHeadModel(tiny_gpt2_config(vocab_size=len(gpt2_tokenizer), bos_token_id=50256, eos_token_id=50256))
    base.save_pretrained(tmp_path)
    model = GPT2BackwardAttentionForCausalLM.from_pretrained(tmp_path, head_config="hidden").eval()
    randomise(model.heads)
    text = "Question: Tom has 3 apples and buys 4 more. How many apples does he have?\nAnswer:"
    inputs = gpt2_tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        assert model(**inputs).logits.shape == (1, inputs.input_ids.shape[1], 50257)
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=gpt2_tokenizer.eos_token_id)
    continuation = gpt2_tokenizer.decode(generated[0, inputs.input_ids.shape[1] :])
    generator = pipeline("text-generation", model=model, tokenizer=gpt2_tokenizer)
    result = generator(text, max_new_tokens=5, do_sample=False, pad_token_id=gpt2_tokenizer.eos_token_id)
    assert result[0]["generated_text"] == text + continuation
