"""The fast paths (head_kernels.py): each is what ``select_kernel`` dispatches, and each equals the plain
``BackwardAttentionHead.forward`` with an open gate and random weights."""

import math

import pytest
import torch
from conftest import (
    HIDDEN,
    OPTION_CASES,
    SEQUENCE_CASES,
    VOCAB,
    random_head,
    random_inputs,
    random_sequence,
    reference_head_logits,
)

from backattn import head_kernels
from backattn.head_kernels import head_logits
from backattn.modeling_backattn import SequenceContext


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
        out = head_logits(head, logits, hidden, embeddings)
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
            head_logits(head, logits, hidden, embeddings).sum()
        saved_bytes[chunk] = sum(storages.values())
    # unchunked keeps several (positions x vocab) tensors; chunked keeps about one (its output)
    assert saved_bytes[None] >= 2 * logits.nbytes, saved_bytes
    assert saved_bytes[8] <= 1.5 * logits.nbytes


def test_weight_tables_are_cached_until_weights_change(monkeypatch):
    head = random_head({"num_layers": 2}).float()
    logits, hidden, embeddings = (t.float() for t in random_inputs())
    calls = []
    original = type(head.layers[0]).tables
    monkeypatch.setattr(type(head.layers[0]), "tables", lambda self, *a: calls.append(1) or original(self, *a))
    with torch.no_grad():
        first = head_logits(head, logits, hidden, embeddings)
        head_logits(head, logits, hidden, embeddings)
        assert len(calls) == 2  # two layers, computed once
        head.layers[1].w_key.mul_(2)  # an in-place update, as an optimiser step makes
        changed = head_logits(head, logits, hidden, embeddings)
        assert len(calls) == 4 and not torch.allclose(changed, first)
        assert torch.allclose(changed, reference_head_logits(head, logits, hidden, embeddings).float(), atol=1e-5)
    head_logits(head, logits, hidden, embeddings)  # gradients wanted: fresh tables with a graph, never the cache
    assert len(calls) == 6


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
        out = head_logits(head, logits, hidden, embeddings, output_weight=output_weight)
        (out * torch.linspace(-1, 1, VOCAB, dtype=out.dtype)).sum().backward()
        results.append([out.detach()] + [p.grad.clone() for p in head.parameters()])
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        expected = torch.stack([reference_head_logits(head, logits[b], hidden[b], embeddings) for b in range(2)])
        assert torch.allclose(head_logits(head, logits, hidden, embeddings, output_weight=weight), expected, atol=1e-10)


def reference_top_k_logits(head, logits, hidden, embeddings, k):
    """Top-k re-ranking from its definition, one position at a time, for a one-layer head: the step-5 sum
    runs over the base's k most likely tokens only (softmax weights keep the full normaliser), scores are
    added to those k tokens only, and every other logit is the base's."""
    config, layer = head.config, head.layers[0]
    rms = torch.sqrt((embeddings**2).mean(dim=1, keepdim=True) + config.rms_norm_eps)
    latent = embeddings / rms * layer.norm.weight
    latent = latent @ layer.w_latent if config.latent_dim else latent
    keys, values = latent @ layer.w_key, latent @ layer.w_value
    head_dim = config.out_dim // config.num_attention_heads
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
                (layer.head_mix[j] if config.attention_head_combine == "mix" else 1.0)
                * (keys[i, j * head_dim : (j + 1) * head_dim] @ q[j * head_dim : (j + 1) * head_dim])
                / math.sqrt(head_dim)
                for j in range(config.num_attention_heads)
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
        reranked = head_logits(head, logits, hidden, embeddings, rerank_top_k=k)
        assert torch.allclose(reranked, reference_top_k_logits(head, logits, hidden, embeddings, k), atol=1e-10)
        untouched = torch.ones_like(logits, dtype=torch.bool).scatter(-1, logits.topk(k).indices, False)
        assert torch.equal(reranked[untouched], logits[untouched])  # the other logits are the base's, exactly


@pytest.mark.parametrize(
    "options", [{"num_layers": 2, "score_mode": "gate"}, {"layer_mode": "sequential", "num_layers": 2}]
)
def test_top_k_over_the_whole_vocabulary_is_the_full_head(options):
    head = random_head(options)
    logits, hidden, embeddings = random_inputs(shape=(3,))
    with torch.no_grad():
        everything = head_logits(
            head, logits, hidden, embeddings, rerank_top_k=VOCAB + 5
        )  # gathers and scatters all V tokens
        assert torch.allclose(everything, head(logits, hidden, embeddings), rtol=1e-12, atol=1e-12)


def test_raw_weighting_top_k_is_the_same_with_or_without_the_output_layer():
    head = random_head({"logit_weighting": "raw"})
    _, hidden, embeddings = random_inputs(shape=(4,))
    weight = torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(
            head_logits(head, hidden @ weight.T, hidden, embeddings, output_weight=weight, rerank_top_k=5),
            head_logits(head, hidden @ weight.T, hidden, embeddings, rerank_top_k=5),
        )


def test_tables_follow_changes_of_the_output_layer():
    head = random_head({"logit_weighting": "raw"})
    _, hidden, embeddings = random_inputs(shape=(4,))
    weight = torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    with torch.no_grad():
        head_logits(head, hidden @ weight.T, hidden, embeddings, output_weight=weight)
        weight.mul_(3)  # in place: same storage, new version
        assert torch.allclose(
            head_logits(head, hidden @ weight.T, hidden, embeddings, output_weight=weight),
            reference_head_logits(head, hidden @ weight.T, hidden, embeddings),
            atol=1e-10,
        )


def test_top_k_reranking_needs_scores_added_to_the_logits():
    head = random_head({"score_mode": "replace"})
    with pytest.raises(ValueError, match="needs score_mode 'add' or 'gate'"):
        head_logits(head, *random_inputs(), rerank_top_k=3)


# --------------------------------------------------------------------------------------------------------
# every fast path is what the dispatch chose, and equals the plain forward (open gate, random weights)


@pytest.fixture
def dispatched(monkeypatch):
    """Every Kernel that select_kernel returns, in order: a spy on the one dispatch."""
    kernels, select = [], head_kernels.select_kernel

    def spy(*args, **kwargs):
        kernels.append(select(*args, **kwargs))
        return kernels[-1]

    monkeypatch.setattr(head_kernels, "select_kernel", spy)
    return kernels


def output_and_gradients(run, head, hidden):
    """``run()``'s output and the gradients it sends to ``hidden`` and to every head parameter."""
    head.zero_grad()
    hidden.grad = None
    out = run()
    (out * torch.linspace(-1, 1, VOCAB, dtype=out.dtype)).sum().backward()
    return [out.detach(), hidden.grad.clone()] + [p.grad.clone() for p in head.parameters()]


GATED = {"score_mode": "gate", "num_attention_heads": 3, "attention_head_combine": "mix", "use_hidden_state": True}
FAST_PATHS = {
    "fused_gate": ("fused_gate", GATED, {}),
    "fused_gate-added": ("fused_gate", {"num_layers": 2}, {}),
    "fused_gate-sequential": ("fused_gate", {**GATED, "num_layers": 2, "layer_mode": "sequential"}, {}),
    "raw_shortcut": ("raw_shortcut", {**GATED, "logit_weighting": "raw"}, {"output_weight": True}),
    "raw_shortcut-sequential": (
        "raw_shortcut",
        {**GATED, "logit_weighting": "raw", "num_layers": 2, "layer_mode": "sequential"},
        {"output_weight": True},
    ),
    "top_k": ("top_k", {**GATED, "num_layers": 2}, {"rerank_top_k": VOCAB}),
    "top_k-raw": ("top_k", {**GATED, "logit_weighting": "raw"}, {"rerank_top_k": VOCAB, "output_weight": True}),
    "vocab_slices": ("vocab_slices", {**GATED, "vocab_chunk_size": 10}, {}),
    "vocab_slices-raw_shortcut": (
        "raw_shortcut",
        {**GATED, "logit_weighting": "raw", "vocab_chunk_size": 10},
        {"output_weight": True},
    ),
    "vocab_slices-replace": ("vocab_slices", {"score_mode": "replace", "vocab_chunk_size": 10, "num_layers": 2}, {}),
}


@pytest.mark.parametrize("path, options, call", FAST_PATHS.values(), ids=FAST_PATHS.keys())
def test_each_fast_path_is_dispatched_and_equals_the_plain_forward(path, options, call, dispatched):
    head = random_head(options)
    assert head.gate is None or bool((head.gate != 0).all())  # an open gate: no term is hidden
    _, hidden, embeddings = random_inputs(shape=(2, 3))
    hidden.requires_grad_(True)
    weight = torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    kwargs = {**call, "output_weight": weight if call.get("output_weight") else None}
    # logits made as h W^T, so that the raw shortcut is exact; the gradients reach h through both
    plain = output_and_gradients(lambda: head(hidden @ weight.T, hidden, embeddings), head, hidden)
    fast = output_and_gradients(
        lambda: head_logits(head, hidden @ weight.T, hidden, embeddings, **kwargs), head, hidden
    )
    assert path in dispatched[-1].paths, dispatched[-1]
    for a, b in zip(plain, fast):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("options", [GATED, {"score_mode": "replace", "num_layers": 2}, {"vocab_chunk_size": 10}])
def test_the_tables_cache_serves_calls_without_gradients_and_equals_the_plain_forward(options, dispatched):
    head = random_head(options)
    logits, hidden, embeddings = random_inputs(shape=(2, 3))
    with torch.no_grad():
        first, second = (head_logits(head, logits, hidden, embeddings) for _ in range(2))
        assert all("tables_cache" in kernel.paths for kernel in dispatched)
        assert torch.equal(first, second)
        assert torch.allclose(second, head(logits, hidden, embeddings), rtol=1e-12, atol=1e-12)


def test_the_plain_forward_serves_what_no_fast_path_can(dispatched):
    """Dropout while training (fresh masks on p_t and s_t) with gradients wanted: the plain forward itself."""
    head = random_head({**GATED, "dropout": 0.3}).train()
    logits, hidden, embeddings = random_inputs(shape=(2, 3))
    torch.manual_seed(0)
    fast = head_logits(head, logits, hidden, embeddings)
    torch.manual_seed(0)
    assert dispatched[-1].steps == "plain" and not dispatched[-1].paths
    assert torch.equal(fast, head(logits, hidden, embeddings))  # the same random masks


# --------------------------------------------------------------------------------------------------------
# query_layers, differential score maps and the copy term through every fast path

ALL_THREE = SEQUENCE_CASES["all-three"]
SEQUENCE_FAST_PATHS = {
    "fused_gate-all-three": ("fused_gate", ALL_THREE, {}),
    "fused_gate-copy-sequential": ("fused_gate", SEQUENCE_CASES["copy-query-layers-sequential"], {}),
    "fused_gate-differential-parallel": ("fused_gate", {**ALL_THREE, "num_layers": 2}, {}),
    "raw_shortcut-all-three": ("raw_shortcut", {**ALL_THREE, "logit_weighting": "raw"}, {"output_weight": True}),
    "top_k-all-three": ("top_k", {**ALL_THREE, "num_layers": 2}, {"rerank_top_k": VOCAB}),
    "vocab_slices-all-three": ("vocab_slices", {**ALL_THREE, "vocab_chunk_size": 10}, {}),
    "vocab_slices-replace-copy": (
        "vocab_slices",
        {"copy_attention": True, "score_mode": "replace", "score_maps": "differential", "vocab_chunk_size": 10},
        {},
    ),
}


@pytest.mark.parametrize("path, options, call", SEQUENCE_FAST_PATHS.values(), ids=SEQUENCE_FAST_PATHS.keys())
def test_each_fast_path_honours_the_sequence_options_and_equals_the_plain_forward(path, options, call, dispatched):
    head = random_head(options)
    ids, mask, states = random_sequence()
    _, hidden, embeddings = random_inputs(shape=(2, 6))
    hidden.requires_grad_(True)
    weight = torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    kwargs = {**call, "output_weight": weight if call.get("output_weight") else None}

    def inputs():  # with the gradients the copy attention sends to h_j and to the head
        context = SequenceContext(hidden, states, ids, mask, torch.arange(6).expand(2, -1))
        layer_states, copy = head.context_inputs(context)
        return {"layer_states": layer_states, "copy": copy}

    plain = output_and_gradients(lambda: head(hidden @ weight.T, hidden, embeddings, **inputs()), head, hidden)
    fast = output_and_gradients(
        lambda: head_logits(head, hidden @ weight.T, hidden, embeddings, **kwargs, **inputs()), head, hidden
    )
    assert path in dispatched[-1].paths, dispatched[-1]
    for a, b in zip(plain, fast):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-10)


def test_the_tables_cache_serves_the_sequence_options(dispatched):
    head = random_head({**ALL_THREE, "vocab_chunk_size": 20})
    ids, mask, states = random_sequence()
    logits, hidden, embeddings = random_inputs(shape=(2, 6))
    context = SequenceContext(hidden, states, ids, mask, torch.arange(6).expand(2, -1))
    with torch.no_grad():
        layer_states, copy = head.context_inputs(context)
        first, second = (
            head_logits(head, logits, hidden, embeddings, None, None, None, layer_states, copy) for _ in "ab"
        )
        assert all("tables_cache" in kernel.paths for kernel in dispatched)
        assert torch.equal(first, second)
        plain = head(logits, hidden, embeddings, layer_states=layer_states, copy=copy)
        assert torch.allclose(second, plain, rtol=1e-12, atol=1e-12)
