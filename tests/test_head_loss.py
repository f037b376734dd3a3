"""The chunked training loss equals the straightforward one, and keeps nothing vocabulary-sized."""

import math

import pytest
import torch
from conftest import VOCAB, randomise, reference_query_state

from backattn import GPT2BackwardAttentionForCausalLM
from backattn.errors import BackattnValueError
from backattn.head_loss import head_cross_entropy
from backattn.modeling_backattn import SequenceContext

CASES = {
    "seed": {},
    "raw-weighting": {"logit_weighting": "raw"},
    "hidden": {"divide_by_vocab": False, "score_mode": "gate", "use_hidden_state": True},
    "sequential-raw": {"num_layers": 2, "layer_mode": "sequential", "logit_weighting": "raw", "score_mode": "gate"},
    "parallel-mix-vocab-chunks": {
        "num_layers": 2,
        "num_attention_heads": 2,
        "attention_head_combine": "mix",
        "vocab_chunk_size": 20,
    },
    "query-layers": {"query_layers": [1, 0], "use_hidden_state": True, "score_mode": "gate"},
    "hidden-standardized": {"use_hidden_state": True, "standardize_query_state": True, "score_mode": "gate"},
    "differential-raw": {"score_maps": "differential", "logit_weighting": "raw", "score_mode": "gate"},
    "copy": {"copy_attention": True, "score_mode": "gate"},
    "all-three-sequential": {
        "query_layers": [1, 0],
        "score_maps": "differential",
        "copy_attention": True,
        "use_hidden_state": True,
        "num_layers": 2,
        "layer_mode": "sequential",
        "score_mode": "gate",
        "vocab_chunk_size": 30,
    },  # fmt: skip
}


def training_model(base_dir, options, chunk):
    model = GPT2BackwardAttentionForCausalLM.from_pretrained(base_dir, head_config=options).double().train()
    randomise(model.heads)
    model.config.loss_chunk_size = chunk
    return model


def batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 11), generator=generator)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt
    labels[2, 7:] = -100  # padding
    return ids, labels


def loss_and_gradients(model, ids, labels, **kwargs):
    model.zero_grad()
    output = model(ids, labels=labels, **kwargs)
    output.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    return output, {
        name: torch.zeros_like(p) if g is None else g.clone()
        for (name, g), p in zip(grads.items(), model.heads.parameters())
    }


def assert_equals_reference(output, grads, expected, expected_grads):
    """A training forward's loss and head gradients against a float64 reference's (the cross-entropy and the
    terms it adds are taken in float32, as transformers' loss takes it)."""
    assert torch.allclose(output.loss.double(), expected, rtol=2e-6, atol=0)
    for name, grad in expected_grads.items():
        assert torch.allclose(grads[f"heads.{name}"], grad, rtol=1e-4, atol=1e-4 * grad.abs().max()), name


@pytest.mark.parametrize("options", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_chunked_loss_and_gradients_equal_the_straightforward_ones(gpt2_base_dir, options, chunk):
    ids, labels = batch()
    reference, expected = loss_and_gradients(training_model(gpt2_base_dir, options, None), ids, labels)
    chunked, grads = loss_and_gradients(training_model(gpt2_base_dir, options, chunk), ids, labels)
    assert reference.logits is not None and chunked.logits is None
    # Both take the cross-entropy in float32, as transformers' causal-LM loss does (only the order of the
    # float32 sums differs); everything else runs in float64 here.
    assert torch.allclose(chunked.loss, reference.loss, rtol=1e-6, atol=0)
    assert grads.keys() == expected.keys()
    for name in expected:
        scale = expected[name].abs().max()
        assert torch.allclose(grads[name], expected[name], rtol=1e-5, atol=1e-5 * scale), name
        assert torch.count_nonzero(grads[name]), f"{name} got no gradient"


def test_num_items_in_batch_divides_the_sum_as_transformers_does(gpt2_base_dir):
    """Gradient accumulation: the Trainer passes the token count of the whole accumulated batch."""
    ids, labels = batch(1)
    count = torch.tensor(50)
    reference, _ = loss_and_gradients(
        training_model(gpt2_base_dir, "hidden", None), ids, labels, num_items_in_batch=count
    )
    chunked, _ = loss_and_gradients(training_model(gpt2_base_dir, "hidden", 4), ids, labels, num_items_in_batch=count)
    assert torch.allclose(chunked.loss, reference.loss, rtol=1e-6, atol=0)


def test_a_batch_without_labels_is_refused_alone_and_adds_zero_to_an_accumulated_batch(gpt2_base_dir):
    model = training_model(gpt2_base_dir, "hidden", 4)
    ids, _ = batch()
    unlabelled = torch.full_like(ids, -100)
    with pytest.raises(BackattnValueError, match="No target tokens in this batch"):
        model(ids, labels=unlabelled)
    # gradient accumulation: the other micro-batches carry the 50 labelled tokens, this one adds nothing
    output, grads = loss_and_gradients(model, ids, unlabelled, num_items_in_batch=torch.tensor(50))
    assert output.loss.item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in grads.values())


def test_evaluation_and_frozen_use_take_the_straightforward_path(gpt2_base_dir):
    model = training_model(gpt2_base_dir, "hidden", 4)
    ids, labels = batch()
    model.eval()
    assert model(ids, labels=labels).logits is not None
    model.train()
    with torch.no_grad():
        assert model(ids, labels=labels).logits is not None


def test_what_is_kept_for_backward_does_not_grow_with_the_batch(gpt2_base_dir):
    """The largest tensor kept for the backward pass: on the straightforward path it is (positions x V) and
    grows with the batch; on the chunked path it is a chunk's or a weight table's and does not."""
    ids, labels = batch()
    largest = {}
    for chunk in (None, 4):
        model = training_model(gpt2_base_dir, "hidden", chunk)
        for rows in (1, 3):
            sizes = [0]

            def pack(tensor):
                sizes.append(tensor.numel())
                return tensor

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                model(ids[:rows], labels=labels[:rows]).loss.backward()
            largest[chunk, rows] = max(sizes)
    assert largest[None, 3] >= ids.numel() * VOCAB > largest[None, 1]
    assert largest[4, 1] == largest[4, 3]


def test_head_cross_entropy_accepts_shifted_labels(gpt2_base_dir):
    model = training_model(gpt2_base_dir, "seed", 5)
    ids, labels = batch()
    hidden = model.base_model(ids).last_hidden_state
    arguments = (model.heads.default, hidden)
    weights = (model.lm_head.weight, model.get_input_embeddings().weight, 5)
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    assert torch.equal(
        head_cross_entropy(*arguments, labels, *weights),
        head_cross_entropy(*arguments, None, *weights, shift_labels=shifted),
    )


def test_the_full_path_serves_whatever_else_trains_or_reranks(gpt2_base_dir):
    """The chunked loss gives gradients to the head alone: a trainable output layer, LoRA on it (PEFT wraps
    the layer) or top-k re-ranking send training through the full logits instead."""
    from peft import LoraConfig, get_peft_model

    ids, labels = batch()
    model = training_model(gpt2_base_dir, "hidden", 4)
    model.lm_head.weight.requires_grad_(True)  # tied to the input embeddings in this GPT-2
    output = model(ids, labels=labels)
    output.loss.backward()
    assert output.logits is not None and torch.count_nonzero(model.lm_head.weight.grad)

    model = training_model(gpt2_base_dir, {"logit_weighting": "raw", "score_mode": "gate"}, 4)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["lm_head"], init_lora_weights=False))
    assert lora(input_ids=ids, labels=labels).logits is not None

    model = training_model(gpt2_base_dir, "hidden", 4)
    model.config.rerank_top_k = 5
    assert model(ids, labels=labels).logits is not None


@pytest.mark.parametrize("options", CASES.values(), ids=CASES.keys())
def test_chunked_loss_is_dispatched_and_equals_the_plain_forward(gpt2_base_dir, options, monkeypatch):
    """The model's training forward takes the chunked loss, and it equals the cross-entropy of the plain
    BackwardAttentionHead.forward (open gate, random weights), loss and gradients."""
    from backattn import modeling_families

    calls = []
    chunked_loss = modeling_families.head_cross_entropy
    monkeypatch.setattr(
        modeling_families, "head_cross_entropy", lambda *a, **k: calls.append(1) or chunked_loss(*a, **k)
    )
    ids, labels = batch(2)
    model = training_model(gpt2_base_dir, options, 4)
    head = model.heads.default
    assert head.gate is None or bool((head.gate != 0).all())
    chunked, grads = loss_and_gradients(model, ids, labels)
    assert calls == [1] and chunked.logits is None

    model.zero_grad()
    with model.capture_block_outputs(model.feature_layers()) as blocks:
        hidden = model.base_model(ids).last_hidden_state
    inputs = {}
    if head.config.query_layers is not None or head.config.copy_attention:  # the sequence, as the model gives it
        positions = torch.arange(ids.shape[1]).expand_as(ids)
        context = SequenceContext(hidden, blocks, ids, torch.ones_like(ids, dtype=torch.bool), positions)
        inputs = dict(zip(("layer_states", "copy"), head.context_inputs(context)))
    plain = head(model.lm_head(hidden), hidden, model.get_input_embeddings().weight, **inputs)
    loss = model.loss_function(logits=plain, labels=labels, vocab_size=VOCAB)
    loss.backward()
    assert torch.allclose(chunked.loss, loss, rtol=1e-6, atol=0)
    for name, parameter in head.named_parameters():
        scale = parameter.grad.abs().max()
        assert torch.allclose(grads[f"heads.default.{name}"], parameter.grad, rtol=1e-5, atol=1e-5 * scale), name


# --------------------------------------------------------------------------------------------------------
# the KL-to-base term: CE(z_t, y_t) + beta KL(softmax(l_t) || softmax(z_t))


def kl_reference(model, ids, labels, betas, heads=None, num_items=None):
    """The loss in float64 by hand from the full logits, with gradients: the head's z (a forward without
    labels) and the base's l (heads disabled), each row's beta, summed over labelled positions, divided
    by num_items (or their count)."""
    model.zero_grad()
    z = model(ids, heads=heads).logits.double()
    with torch.no_grad(), model.disable_heads():
        base = model(ids).logits.double()
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    keep = targets != -100
    log_q, log_p = torch.log_softmax(z, -1)[keep], torch.log_softmax(base, -1)[keep]
    ce = -log_q.gather(-1, targets[keep][:, None])[:, 0]
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    beta = torch.tensor(betas, dtype=torch.float64)[:, None].expand_as(keep)[keep]
    loss = (ce + beta * kl).sum() / (keep.sum() if num_items is None else num_items)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.heads.named_parameters() if p.grad is not None}


KL_CASES = {"hidden": "hidden", "copy": CASES["copy"], "query-layers": CASES["query-layers"]}


@pytest.mark.parametrize("options", KL_CASES.values(), ids=KL_CASES.keys())
@pytest.mark.parametrize("chunk", [None, 1, 7])
def test_kl_to_base_loss_and_gradients_equal_a_float64_reference(gpt2_base_dir, options, chunk):
    ids, labels = batch(2)
    model = training_model(gpt2_base_dir, options, chunk)
    model.heads.default.config.base_kl_weight = 0.7
    count = torch.tensor(40)
    for num_items in (None, count):
        expected, expected_grads = kl_reference(model, ids, labels, [0.7] * 3, num_items=num_items)
        output, grads = loss_and_gradients(model, ids, labels, num_items_in_batch=num_items)
        assert (output.logits is None) == (chunk is not None)
        assert_equals_reference(output, grads, expected, expected_grads)


def test_the_kl_term_is_positive_for_a_trained_head_and_left_out_in_evaluation(gpt2_base_dir):
    ids, labels = batch()
    model = training_model(gpt2_base_dir, "hidden", 4)
    plain = model(ids, labels=labels).loss
    model.heads.default.config.base_kl_weight = 2.0
    penalised = model(ids, labels=labels).loss
    kl = (penalised - plain) / 2.0
    assert kl > 0.01  # a randomised head is far from the base
    with torch.no_grad():  # the straightforward path, still in training mode: the same term
        assert torch.allclose(model(ids, labels=labels).loss, penalised, rtol=1e-6)
    model.eval()
    assert torch.equal(model(ids, labels=labels).loss, model(ids, labels=labels).loss)
    assert torch.allclose(model(ids, labels=labels).loss, plain, rtol=1e-6)  # evaluation: the plain cross-entropy


@pytest.mark.parametrize("chunk", [None, 4])
def test_at_a_head_that_reproduces_the_base_the_kl_term_and_its_gradient_are_zero(gpt2_base_dir, chunk):
    """The untrained gated head gives the base's logits exactly, so KL(base || head) = 0, and its gradient
    (softmax(z) - softmax(l), times beta) vanishes: the loss and gradients equal those of beta = 0."""
    ids, labels = batch()
    model = GPT2BackwardAttentionForCausalLM.from_pretrained(gpt2_base_dir, head_config="hidden").double().train()
    model.config.loss_chunk_size = chunk
    plain, plain_grads = loss_and_gradients(model, ids, labels)
    model.heads.default.config.base_kl_weight = 5.0
    penalised, grads = loss_and_gradients(model, ids, labels)
    assert torch.equal(penalised.loss, plain.loss)
    assert any(torch.count_nonzero(g) for g in plain_grads.values())  # the gate itself gets a gradient
    for name, grad in plain_grads.items():
        # the KL gradient beta (softmax(z) - softmax(l)) is 0 up to float32 rounding of the two softmaxes
        assert torch.allclose(grads[name], grad, rtol=1e-4, atol=1e-7 * grad.abs().max()), (name, grads[name] - grad)


def test_a_mixed_batch_takes_each_rows_own_beta(gpt2_base_dir):
    """heads= one head per row: the full-logits path weights each row's KL by its head's beta; rows on the
    base (None) add none."""
    ids, labels = batch(3)
    model = training_model(gpt2_base_dir, "hidden", None)
    model.add_head("hidden", head_name="other", freeze_others=False)
    randomise(model.heads.other, seed=4)
    model.heads.default.config.base_kl_weight = 0.5
    model.heads.other.config.base_kl_weight = 1.5
    rows = ["other", None, "default"]
    expected, _ = kl_reference(model, ids, labels, [1.5, 0.0, 0.5], heads=rows)
    model.zero_grad()
    assert torch.allclose(model(ids, labels=labels, heads=rows).loss.double(), expected, rtol=2e-6, atol=0)
    model.heads.default.config.base_kl_weight = model.heads.other.config.base_kl_weight = 0.0
    assert model.heads.base_kl_weights(rows, 3) is None


def test_the_kl_term_is_the_same_from_cached_features(gpt2_base_dir):
    ids, labels = batch()
    model = training_model(gpt2_base_dir, "hidden", 4)
    model.heads.default.config.base_kl_weight = 0.3
    with torch.no_grad():
        hidden = model.base_model(ids).last_hidden_state
    assert torch.equal(model(labels=labels, base_hidden_states=hidden).loss, model(ids, labels=labels).loss)


def test_beta_is_saved_with_the_head_and_loads_back(gpt2_base_dir, tmp_path):
    model = training_model(gpt2_base_dir, "hidden", 4)
    model.heads.default.config.base_kl_weight = 0.3
    model.save_head(tmp_path / "head")
    again = GPT2BackwardAttentionForCausalLM.from_pretrained(gpt2_base_dir).double()
    again.load_head(tmp_path / "head", head_name="math")
    assert again.heads.math.config.base_kl_weight == 0.3


# --------------------------------------------------------------------------------------------------------
# the copy supervision: CE(z_t, y_t) + gamma * -log c_t(y_t) where y_t followed an attended earlier position


def copy_batch():
    """Rows that repeat a stretch of tokens, so that many targets followed an earlier position (copyable)."""
    ids = torch.tensor([
        [5, 9, 14, 3, 77, 5, 9, 14, 3, 77, 41],
        [60, 2, 60, 2, 60, 2, 88, 12, 88, 12, 1],
        [30, 31, 32, 33, 34, 35, 30, 31, 32, 90, 91],
    ])  # fmt: skip
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt
    labels[2, 8:] = -100  # padding
    return ids, labels


def copy_reference(model, ids, labels, gammas, heads=None, num_items=None):
    """The loss in float64 by hand, with gradients: the plain cross-entropy of the head's full logits, plus for
    each labelled position whose target y followed some earlier j < t (x_{j+1} = y) gamma * -log of the copy
    attention's weight on those j, written out one position at a time from the query states r_t."""
    model.zero_grad()
    z = model(ids, heads=heads).logits.double()
    hidden = model.base_model(ids).last_hidden_state.double()
    names = [None] * len(ids) if heads is None else heads
    total, count = 0.0, 0
    for b in range(len(ids)):
        head = model.heads[names[b] or model.heads.active] if gammas[b] or heads is None else None
        states = None if head is None else [reference_query_state(head, hidden[b, t]) for t in range(ids.shape[1])]
        for t in range(ids.shape[1] - 1):
            y = int(labels[b, t + 1])
            if y == -100:
                continue
            count += 1
            total = total - torch.log_softmax(z[b, t], -1)[y]
            hits = [j for j in range(t) if int(ids[b, j + 1]) == y]
            if not gammas[b] or not hits:
                continue
            query = states[t] @ head.copy_query
            scores = torch.stack(
                [query @ (states[j] @ head.copy_key) / math.sqrt(head.config.out_dim) for j in range(t)]
            )
            attention = torch.softmax(scores, 0)
            total = total - gammas[b] * torch.log(sum(attention[j] for j in hits))
    loss = total / (count if num_items is None else num_items)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.heads.named_parameters() if p.grad is not None}


COPY_CASES = {
    "copy-gate": CASES["copy"],
    "copy-standardized": {"copy_attention": True, "standardize_query_state": True},
}


@pytest.mark.parametrize("options", COPY_CASES.values(), ids=COPY_CASES.keys())
@pytest.mark.parametrize("chunk", [None, 1, 7])
def test_copy_supervision_loss_and_gradients_equal_a_float64_reference(gpt2_base_dir, options, chunk):
    ids, labels = copy_batch()
    model = training_model(gpt2_base_dir, {**options, "copy_loss_weight": 0.6}, chunk)
    for num_items in (None, torch.tensor(40)):
        expected, expected_grads = copy_reference(model, ids, labels, [0.6] * 3, num_items=num_items)
        output, grads = loss_and_gradients(model, ids, labels, num_items_in_batch=num_items)
        assert (output.logits is None) == (chunk is not None)
        assert_equals_reference(output, grads, expected, expected_grads)


@pytest.mark.parametrize("chunk", [None, 4])
def test_copy_supervision_teaches_the_copy_attention_while_its_gate_is_shut(gpt2_base_dir, chunk):
    """A fresh gated copy head gives the base's logits (g_c = 0), so the cross-entropy gives W_cq and W_ck no
    gradient at all; gamma > 0 gives them one, and changes the loss by exactly gamma times the term."""
    ids, labels = copy_batch()
    model = GPT2BackwardAttentionForCausalLM.from_pretrained(gpt2_base_dir, head_config=CASES["copy"]).double()
    model.train().config.loss_chunk_size = chunk
    plain, plain_grads = loss_and_gradients(model, ids, labels)
    assert not torch.count_nonzero(plain_grads["heads.default.copy_query"])
    assert not torch.count_nonzero(plain_grads["heads.default.copy_key"])
    model.heads.set_training_options("default", copy_loss_weight=2.0)
    supervised, grads = loss_and_gradients(model, ids, labels)
    assert torch.count_nonzero(grads["heads.default.copy_query"]) and torch.count_nonzero(
        grads["heads.default.copy_key"]
    )
    assert supervised.loss > plain.loss
    model.heads.set_training_options("default", copy_loss_weight=1.0)
    once, _ = loss_and_gradients(model, ids, labels)
    assert torch.allclose(supervised.loss - plain.loss, 2 * (once.loss - plain.loss), rtol=1e-5)  # float32 losses
    model.eval()  # evaluation: the plain cross-entropy
    assert torch.allclose(model(ids, labels=labels).loss, plain.loss, rtol=1e-6)


def test_a_mixed_batch_takes_each_rows_own_gamma(gpt2_base_dir):
    ids, labels = copy_batch()
    model = training_model(gpt2_base_dir, {**CASES["copy"], "copy_loss_weight": 0.5}, None)
    model.add_head({**CASES["copy"], "copy_loss_weight": 1.5}, head_name="other", freeze_others=False)
    randomise(model.heads.other, seed=4)
    rows = ["other", None, "default"]
    expected, expected_grads = copy_reference(model, ids, labels, [1.5, 0.0, 0.5], heads=rows)
    output, grads = loss_and_gradients(model, ids, labels, heads=rows)
    assert_equals_reference(output, grads, expected, expected_grads)


def test_the_copy_term_is_the_same_from_cached_features_and_saved_with_the_head(gpt2_base_dir, tmp_path):
    ids, labels = copy_batch()
    model = training_model(gpt2_base_dir, {**CASES["copy"], "copy_loss_weight": 0.3}, 4)
    with torch.no_grad():
        hidden = model.base_model(ids).last_hidden_state
    assert torch.equal(model(ids, labels=labels, base_hidden_states=hidden).loss, model(ids, labels=labels).loss)
    model.save_head(tmp_path / "head")
    again = GPT2BackwardAttentionForCausalLM.from_pretrained(gpt2_base_dir).double()
    again.load_head(tmp_path / "head", head_name="copy")
    assert again.heads.copy.config.copy_loss_weight == 0.3


def test_copy_loss_weight_needs_a_copy_head_and_a_number_at_least_zero():
    from backattn import BackwardAttentionConfig

    with pytest.raises(BackattnValueError, match="copy_loss_weight=0.5 supervises the copy attention"):
        BackwardAttentionConfig.from_preset("hidden", copy_loss_weight=0.5)
    with pytest.raises(BackattnValueError, match="copy_loss_weight"):
        BackwardAttentionConfig.from_preset("hidden", copy_attention=True, copy_loss_weight=-1.0)


# --------------------------------------------------------------------------------------------------------
# the label-word loss: -log softmax(z_t[C])[y_t] over the label words C = label_word_ids

WORDS = [5, 17, 2]


def label_word_batch(seed=0):
    """Three rows whose labels mark one or two label-word targets each (the rest -100), the ids holding them."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 9), generator=generator)
    labels = torch.full_like(ids, -100)
    for row, position in ((0, 5), (1, 8), (2, 3), (2, 6)):
        ids[row, position] = WORDS[(row + position) % 3]
        labels[row, position] = ids[row, position]
    return ids, labels


def label_word_reference(model, ids, labels, heads=None, num_items=None, beta=0.0):
    """The loss in float64 by hand from the full logits (a forward without labels), with gradients."""
    model.zero_grad()
    z = model(ids, heads=heads).logits.double()
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    keep = targets != -100
    classes = torch.tensor([WORDS.index(t) for t in targets[keep].tolist()])
    loss = -torch.log_softmax(z[keep][:, WORDS], -1).gather(-1, classes[:, None]).sum()
    if beta:
        with torch.no_grad(), model.disable_heads():
            log_p = torch.log_softmax(model(ids).logits.double(), -1)[keep]
        loss = loss + beta * (log_p.exp() * (log_p - torch.log_softmax(z, -1)[keep])).sum()
    loss = loss / (keep.sum() if num_items is None else num_items)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.heads.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("options", KL_CASES.values(), ids=KL_CASES.keys())
@pytest.mark.parametrize("chunk", [None, 1, 3])
@pytest.mark.parametrize("beta", [0.0, 0.4])
def test_label_word_loss_and_gradients_equal_a_float64_reference(gpt2_base_dir, options, chunk, beta):
    ids, labels = label_word_batch()
    model = training_model(gpt2_base_dir, options, chunk)
    model.heads.default.config.label_word_ids = WORDS
    model.heads.default.config.base_kl_weight = beta
    for num_items in (None, torch.tensor(9)):
        expected, expected_grads = label_word_reference(model, ids, labels, num_items=num_items, beta=beta)
        output, grads = loss_and_gradients(model, ids, labels, num_items_in_batch=num_items)
        assert (output.logits is None) == (chunk is not None)
        assert_equals_reference(output, grads, expected, expected_grads)
    model.heads.default.config.label_word_ids = None  # the whole vocabulary's cross-entropy is another loss
    assert not torch.allclose(model(ids, labels=labels).loss.double(), expected)


def test_the_label_word_loss_is_left_out_in_evaluation_and_the_same_from_cached_features(gpt2_base_dir):
    ids, labels = label_word_batch(1)
    model = training_model(gpt2_base_dir, "hidden", 4)
    plain = model(ids, labels=labels).loss
    model.heads.default.config.label_word_ids = WORDS
    restricted = model(ids, labels=labels).loss
    assert restricted < plain  # three classes instead of the vocabulary's 99 tokens
    with torch.no_grad():
        hidden = model.base_model(ids).last_hidden_state
    assert torch.equal(model(labels=labels, base_hidden_states=hidden).loss, restricted)
    model.eval()
    assert torch.allclose(model(ids, labels=labels).loss, plain, rtol=1e-6)


def test_a_target_that_is_not_a_label_word_is_refused_by_both_paths(gpt2_base_dir):
    ids, labels = label_word_batch(2)
    labels[1, 2] = ids[1, 2] = 40  # not a label word
    model = training_model(gpt2_base_dir, "hidden", 4)
    model.heads.default.config.label_word_ids = WORDS
    for heads in (None, ["default"] * 3):  # the chunked path, then the full-logits path
        with pytest.raises(BackattnValueError, match=r"label_word_ids are \[5, 17, 2\].*e\.g\. \[40\]"):
            model(ids, labels=labels, heads=heads)


def test_a_mixed_batch_over_heads_with_other_label_words_is_refused_one_setting_is_taken(gpt2_base_dir):
    ids, labels = label_word_batch(3)
    model = training_model(gpt2_base_dir, "hidden", None)
    model.add_head("hidden", head_name="other", freeze_others=False)
    randomise(model.heads.other, seed=5)
    model.heads.default.config.label_word_ids = WORDS
    rows = ["other", "default", "other"]
    with pytest.raises(BackattnValueError, match="label_word_ids differ"):
        model(ids, labels=labels, heads=rows)
    model.heads.set_training_options("other", label_word_ids=list(WORDS))
    expected, _ = label_word_reference(model, ids, labels, heads=rows)
    assert torch.allclose(model(ids, labels=labels, heads=rows).loss.double(), expected, rtol=2e-6, atol=0)
    model.add_head("hidden", head_name="math", freeze_others=False)  # resident, not routed: it does not matter
    assert torch.allclose(model(ids, labels=labels, heads=rows).loss.double(), expected, rtol=2e-6, atol=0)


def test_training_options_are_set_validated_and_recorded_and_other_paths_refuse_them(gpt2_base_dir):
    ids, labels = label_word_batch(5)
    model = training_model(gpt2_base_dir, "hidden", 4)
    with pytest.raises(BackattnValueError, match=f"label_word_ids holds {VOCAB}, outside the vocabulary of {VOCAB} "):
        model.heads.set_training_options("default", label_word_ids=[3, VOCAB])
    only = r"changes base_kl_weight, label_word_ids, copy_loss_weight only, not \['out_dim'\]"
    with pytest.raises(BackattnValueError, match=only):
        model.heads.set_training_options("default", out_dim=8)
    assert model.heads.default.config.label_word_ids is None  # nothing changed by a refused call
    model.heads.set_training_options("default", label_word_ids=WORDS)
    assert model.config.heads["default"]["label_word_ids"] == WORDS  # save_pretrained keeps it
    for path, call in (("fused_lm_head", dict(fused_lm_head=True)), ("fan_out", dict(fan_out=["default"]))):
        with pytest.raises(BackattnValueError, match=r"would leave out.*\{'default': \['label_word_ids'\]\}"):
            model(ids, labels=labels, **call)
    with torch.no_grad():  # scoring through them is fine
        assert model(ids, labels=labels, fused_lm_head=True).log_probs.shape == (3, 8)
    model.heads.set_training_options("default", label_word_ids=None)
    assert model(ids, labels=labels, fused_lm_head=True).loss.requires_grad


def test_label_words_are_saved_with_the_head_and_load_back(gpt2_base_dir, tmp_path):
    model = training_model(gpt2_base_dir, "hidden", 4)
    model.heads.default.config.label_word_ids = WORDS
    model.save_head(tmp_path / "head")
    again = GPT2BackwardAttentionForCausalLM.from_pretrained(gpt2_base_dir).double()
    again.load_head(tmp_path / "head", head_name="sentiment")
    assert again.heads.sentiment.config.label_word_ids == WORDS


def test_label_word_loss_as_a_trainers_loss_for_a_model_without_a_head(gpt2_base_dir):
    """LabelWordLoss on a plain causal LM's logits (what Trainer's compute_loss_func gets) is the reference."""
    from transformers import AutoModelForCausalLM

    from backattn.head_loss import LabelWordLoss

    ids, labels = label_word_batch(4)
    base = AutoModelForCausalLM.from_pretrained(gpt2_base_dir).double()
    outputs = base(ids)
    targets = labels[:, 1:]
    keep = targets != -100
    classes = torch.tensor([WORDS.index(t) for t in targets[keep].tolist()])
    expected = torch.nn.functional.cross_entropy(outputs.logits[:, :-1][keep][:, WORDS], classes)
    assert torch.allclose(LabelWordLoss(WORDS)(outputs, labels).double(), expected, rtol=1e-6)
    halved = LabelWordLoss(WORDS)(outputs, labels, num_items_in_batch=8).double()
    assert torch.allclose(halved, expected * 4 / 8, rtol=1e-6)  # 4 targets, divided as by 8
