"""The head's plain maths (modeling_backattn.py) against ``reference_head_logits`` (tests/conftest.py), a slow
loop written from the formula of DESIGN.md section 2, never calling the code under test."""

import pytest
import torch
from conftest import OPTION_CASES, VOCAB, random_head, random_inputs, reference_head_logits


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
