"""The head's plain maths (modeling_backattn.py) against ``reference_head_logits`` and ``reference_sequence_logits``
(tests/conftest.py), slow float64 loops written from the formula of DESIGN.md section 2 and the config's docstring
(query_layers, differential score maps, the copy term), never calling the code under test."""

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
    reference_sequence_logits,
    stacked_states,
)

from backattn import BackwardAttentionConfig, BackwardAttentionHead
from backattn.modeling_backattn import DIFFERENTIAL_LAMBDA_INIT, SequenceContext, copied_token_slots


@pytest.mark.parametrize("options", OPTION_CASES.values(), ids=OPTION_CASES.keys())
def test_head_matches_slow_reference(options):
    head = random_head(options)
    logits, hidden, embeddings = random_inputs()
    with torch.no_grad():
        expected = reference_head_logits(head, logits, hidden, embeddings)
        assert torch.allclose(head(logits, hidden, embeddings), expected, rtol=1e-10, atol=1e-10)


def test_head_works_on_a_batch_of_positions():
    head = random_head({"num_attention_heads": 2, "use_hidden_state": True})
    logits, hidden, embeddings = random_inputs(shape=(3, 4))
    with torch.no_grad():
        batched = head(logits, hidden, embeddings)
        assert batched.shape == (3, 4, VOCAB)
        for b in range(3):
            assert torch.allclose(batched[b], reference_head_logits(head, logits[b], hidden[b], embeddings), atol=1e-10)


def test_dropout_only_in_training_mode():
    head = random_head({"dropout": 0.5})
    logits, hidden, embeddings = random_inputs()
    with torch.no_grad():
        evaluated = head(logits, hidden, embeddings)
        assert torch.equal(evaluated, head(logits, hidden, embeddings))
        head.train()
        assert not torch.allclose(head(logits, hidden, embeddings), evaluated)


def test_no_nan_for_extreme_or_constant_logits():
    head = random_head({"num_attention_heads": 3, "use_hidden_state": True})
    _, hidden, embeddings = random_inputs(shape=(3,))
    logits = torch.stack([torch.zeros(VOCAB), torch.full((VOCAB,), 1e4), torch.linspace(-1e4, 1e4, VOCAB)]).double()
    with torch.no_grad():
        assert torch.isfinite(head(logits, hidden, embeddings)).all()


def test_head_refuses_a_base_of_another_size():
    head = random_head({})
    logits, hidden, embeddings = random_inputs()
    with pytest.raises(ValueError, match="built for vocab_size=97, hidden_size=24"):
        head(logits[..., :-1], hidden, embeddings[:-1])


# --------------------------------------------------------------------------------------------------------
# query_layers, differential score maps and the copy term (steps 5, 6 and 8 of the config's docstring)


def sequence_inputs(head, rows=2, length=6, seed=4):
    """Random logits and final hidden states of a sequence, its ids, mask and block states, and the head's
    per-position inputs of the context (what the models hand over)."""
    ids, mask, states = random_sequence(rows, length, seed=seed)
    logits, hidden, embeddings = random_inputs(shape=(rows, length), seed=seed + 1)
    context = SequenceContext(hidden, states, ids, mask, torch.arange(length).expand(rows, -1))
    return logits, hidden, embeddings, ids, mask, states, context


@pytest.mark.parametrize("options", SEQUENCE_CASES.values(), ids=SEQUENCE_CASES.keys())
def test_sequence_options_match_the_slow_reference(options):
    head = random_head(options)
    logits, hidden, embeddings, ids, mask, states, context = sequence_inputs(head)
    with torch.no_grad():
        layer_states, copy = head.context_inputs(context)
        out = head(logits, hidden, embeddings, layer_states=layer_states, copy=copy)
        stacked = stacked_states(head, states)
        for b in range(logits.shape[0]):
            expected = reference_sequence_logits(
                head, logits[b], hidden[b], embeddings, ids[b], mask[b], None if stacked is None else stacked[b]
            )
            assert torch.allclose(out[b], expected, rtol=1e-10, atol=1e-10), b


@pytest.mark.parametrize("options", SEQUENCE_CASES.values(), ids=SEQUENCE_CASES.keys())
def test_context_inputs_of_some_positions_are_those_positions_of_all(options):
    """Scoring only some positions (logits_to_keep, cached decoding) attends over the same earlier positions."""
    head = random_head(options)
    logits, hidden, embeddings, ids, mask, states, context = sequence_inputs(head)
    with torch.no_grad():
        every = head(logits, hidden, embeddings, None, *head.context_inputs(context))
        some = torch.tensor([[5, 2], [4, 0]])
        rows = torch.arange(2)[:, None]
        chosen = head(
            logits[rows, some],
            hidden[rows, some],
            embeddings,
            None,
            *head.context_inputs(context._replace(positions=some)),
        )
    assert torch.allclose(chosen, every[rows, some], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("options", [o for o in SEQUENCE_CASES.values() if o.get("score_mode") == "gate"])
def test_a_fresh_gated_head_with_the_new_options_gives_the_logits_exactly(options):
    config = BackwardAttentionConfig(**options).for_base(VOCAB, HIDDEN)
    head = BackwardAttentionHead(config).double().eval()
    logits, hidden, embeddings, ids, mask, states, context = sequence_inputs(head)
    with torch.no_grad():
        assert torch.equal(head(logits, hidden, embeddings, None, *head.context_inputs(context)), logits)


def test_fresh_parameters_of_the_new_options():
    torch.manual_seed(0)  # the lambda vectors are random: a fixed draw, not the suite's order, decides this test
    options = {"score_maps": "differential", "use_hidden_state": True, "query_layers": [0, 1, 2], "out_dim": 40}
    head = BackwardAttentionHead(BackwardAttentionConfig(**options, copy_attention=True).for_base(VOCAB, HIDDEN))
    layer = head.layers[0]
    vectors = torch.cat([layer.lambda_q1, layer.lambda_k1, layer.lambda_q2, layer.lambda_k2]).detach()
    assert vectors.shape == (160,) and 0.06 < vectors.std() < 0.14 and abs(vectors.mean()) < 0.05  # N(0, 0.1^2)
    q1, k1, q2, k2 = (v.detach().double() for v in (layer.lambda_q1, layer.lambda_k1, layer.lambda_q2, layer.lambda_k2))
    expected = torch.exp((q1 * k1).sum()) - torch.exp((q2 * k2).sum()) + 0.8  # Ye et al.'s lambda, written out
    assert layer.differential_lambda().item() == pytest.approx(expected.item(), abs=1e-6)
    assert DIFFERENTIAL_LAMBDA_INIT == 0.8 and abs(expected.item() - 0.8) < 0.4  # near lambda_init at the start
    assert torch.count_nonzero(layer.w_hidden2) == 0 and layer.w_query2.shape == layer.w_query.shape
    assert torch.equal(torch.softmax(head.query_mix, 0), torch.full((3,), 1 / 3))  # a uniform mix of layers
    assert torch.equal(head.query_norm.weight, torch.ones(HIDDEN))
    assert head.copy_gate is None and torch.equal(head.copy_gate_bias, torch.zeros(1))  # lambda_t near 1/2
    gated = BackwardAttentionHead(
        BackwardAttentionConfig(copy_attention=True, score_mode="gate").for_base(VOCAB, HIDDEN)
    )
    assert torch.equal(gated.copy_gate, torch.zeros(1))


def test_the_copy_term_at_full_strength_is_the_pointer_generator_mixture():
    """g_c = 1: softmax of the head's logits is (1 - lambda_t) softmax(z_t) + lambda_t c_t exactly; positions
    with no earlier unmasked position keep z_t."""
    head = random_head({"copy_attention": True, "score_mode": "replace", "num_layers": 1})
    logits, hidden, embeddings, ids, mask, states, context = sequence_inputs(head)
    with torch.no_grad():
        _, copy = head.context_inputs(context)
        nothing = copy._replace(log_weights=torch.full_like(copy.log_weights, -math.inf))
        z = head(logits, hidden, embeddings, copy=nothing)  # no earlier position anywhere: steps 1-7 alone
        out = head(logits, hidden, embeddings, copy=copy)
        lam = torch.sigmoid(hidden @ head.copy_gate_weight + head.copy_gate_bias)[..., None]
        c = torch.zeros_like(z).scatter_add(-1, copy.next_ids, copy.log_weights.exp())
        mixture = (1 - lam) * torch.softmax(z, -1) + lam * c
        attended = torch.isfinite(copy.log_weights).any(-1)
        assert not attended[0, 0] and not attended[1, :3].any() and attended[1, 3]  # left padding: none before
        assert torch.allclose(torch.softmax(out, -1)[attended], mixture[attended], rtol=1e-10, atol=1e-12)
        assert torch.equal(out[~attended], z[~attended])
        for b, t, j in [(0, 4, 3), (0, 5, 3), (1, 4, 1)]:  # padded positions are never attended, nor j >= t
            assert copy.log_weights[b, t, j] == -math.inf
        assert (copy.log_weights[0, 2, 2:] == -math.inf).all()


def test_the_gated_copy_term_equals_its_definition_over_the_whole_vocabulary():
    """0 < g_c < 1: z_t + g_c log(1 - lambda_t + lambda_t c_t / softmax(z_t)) with c_t scattered over all V tokens,
    computed directly in float64, against the library's term at the S copied tokens (repeated tokens included)."""
    head = random_head({"copy_attention": True, "score_mode": "gate", "num_layers": 1})
    logits, hidden, embeddings, ids, mask, states, context = sequence_inputs(head)
    ids[:, 1::2] = ids[:, :1]  # every other token repeats the first: c_t sums several a_tj into one token
    context = context._replace(input_ids=ids)
    with torch.no_grad():
        head.copy_gate.fill_(0.37)
        _, copy = head.context_inputs(context)
        nothing = copy._replace(log_weights=torch.full_like(copy.log_weights, -math.inf))
        z = head(logits, hidden, embeddings, copy=nothing)
        out = head(logits, hidden, embeddings, copy=copy)
        lam = torch.sigmoid(hidden @ head.copy_gate_weight + head.copy_gate_bias)[..., None]
        c = torch.zeros_like(z).scatter_add(-1, copy.next_ids, copy.log_weights.exp())
        expected = z + 0.37 * torch.log(1 - lam + lam * c / torch.softmax(z, -1))
        attended = torch.isfinite(copy.log_weights).any(-1)
        assert (c[attended] > 0).sum(-1).lt(copy.next_ids.shape[-1]).all()  # fewer distinct tokens than S
        assert torch.allclose(out[attended], expected[attended], rtol=1e-10, atol=1e-12)
        assert torch.equal(out[~attended], z[~attended])


def test_copied_token_slots_point_each_position_at_the_first_of_its_token():
    first, slot = copied_token_slots(torch.tensor([[7, 3, 7, 7, 3, 5], [1, 1, 1, 2, 2, 0]]))
    assert slot.tolist() == [[0, 1, 0, 0, 1, 5], [0, 0, 0, 3, 3, 5]]
    assert first.tolist() == [[True, True, False, False, False, True], [True, False, False, True, False, True]]


def test_the_copy_term_has_finite_gradients_with_padding_and_saturated_gates():
    head = random_head({"copy_attention": True, "score_mode": "gate"})
    with torch.no_grad():
        head.copy_gate_bias.fill_(60.0)  # lambda_t = 1 in float: log(1 - lambda) must not be -inf
    logits, hidden, embeddings, ids, mask, states, context = sequence_inputs(head)
    logits.requires_grad_(True)
    out = head(logits, hidden, embeddings, copy=head.context_inputs(context)[1])
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(logits.grad).all() and all(torch.isfinite(p.grad).all() for p in head.parameters())


def test_the_inputs_the_new_options_need_are_asked_for():
    logits, hidden, embeddings = random_inputs()
    with pytest.raises(ValueError, match=r"decoder blocks \[1\] \(query_layers\), but their states were not given"):
        random_head({"query_layers": [1], "use_hidden_state": True})(logits, hidden, embeddings)
    with pytest.raises(ValueError, match="copy_attention.*no copy inputs were given"):
        random_head({"copy_attention": True})(logits, hidden, embeddings)
    head = random_head({"copy_attention": True, "query_layers": [5]})
    *_, context = sequence_inputs(head)
    with pytest.raises(ValueError, match=r"the states of block\(s\) \[5\] were not given"):
        head.context_inputs(context)
    with pytest.raises(ValueError, match="needs input_ids"):
        random_head({"copy_attention": True}).context_inputs(context._replace(input_ids=None))
