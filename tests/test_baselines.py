"""The baselines a head is compared with: PEFT LoRA on attention or on the output layer, the output layer alone."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from backattn import BackwardAttentionConfig, BackwardAttentionHead
from backattn.baselines import (
    LoReFTIntervention,
    ia3_on_top_layers,
    lm_steer,
    lora_on_attention,
    lora_on_output_layer,
    loreft_on_last_layer,
    output_layer_only,
    trainable_parameters,
)


def head_parameters(preset, vocab_size, hidden_size):
    head = BackwardAttentionHead(BackwardAttentionConfig.from_preset(preset).for_base(vocab_size, hidden_size))
    return sum(p.numel() for p in head.parameters())


def small_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=64, n_layer=6, n_head=2, n_positions=32)).eval()


def one_step(model):
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    optimiser = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(input_ids=ids, labels=ids).loss.backward()
    optimiser.step()


def test_attention_lora_matches_the_head_budget_on_gpt2():
    target = head_parameters("seed", 97, 64)
    model = lora_on_attention(small_gpt2(), target)
    assert abs(trainable_parameters(model) - target) <= 0.1 * target
    assert all("lora_" in name for name, p in model.named_parameters() if p.requires_grad)


@pytest.mark.integration
def test_attention_lora_matches_the_head_budget_on_smollm2(smollm2_dir):
    target = head_parameters("hidden", 49152, 576)
    model = lora_on_attention(AutoModelForCausalLM.from_pretrained(smollm2_dir), target)
    assert abs(trainable_parameters(model) - target) <= 0.1 * target, (trainable_parameters(model), target)


def test_output_layer_lora_unties_and_leaves_the_embeddings_alone():
    model = small_gpt2()
    embeddings = model.get_input_embeddings().weight.detach().clone()
    peft_model = lora_on_output_layer(model, rank=1)
    assert trainable_parameters(peft_model) == 64 + 97
    one_step(peft_model)
    assert torch.equal(model.get_input_embeddings().weight, embeddings)
    assert not torch.equal(
        peft_model(input_ids=torch.tensor([[1, 2]])).logits, small_gpt2()(torch.tensor([[1, 2]])).logits
    )


def test_output_layer_only_trains_the_untied_output_layer():
    model = small_gpt2()
    embeddings = model.get_input_embeddings().weight.detach().clone()
    model = output_layer_only(model)
    assert trainable_parameters(model) == 97 * 64
    one_step(model)
    assert torch.equal(model.get_input_embeddings().weight, embeddings)
    assert not torch.equal(model.get_output_embeddings().weight, embeddings)


def small_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("build", [small_gpt2, small_llama])
def test_ia3_on_top_layers_comes_closest_to_the_budget(build):
    model = ia3_on_top_layers(build(), 300)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    assert names and all("ia3_l" in name for name in names)
    per_layer = trainable_parameters(model) // len({name.split(".")[4] for name in names})  # layer index
    assert abs(trainable_parameters(model) - 300) <= per_layer / 2
    assert max(int(name.split(".")[4]) for name in names) == 5  # the top layers, up to the last
    one_step(model)


@pytest.mark.parametrize("build", [small_gpt2, small_llama])
def test_untrained_lm_steer_gives_the_base_logits_and_trains_only_its_factors(build):
    ids = torch.tensor([[1, 2, 3, 4]])
    reference = build()(ids).logits
    model = lm_steer(build(), rank=4)
    assert torch.equal(model(ids).logits, reference)
    assert trainable_parameters(model) == 2 * 4 * model.config.hidden_size
    one_step(model)
    assert not torch.equal(model(ids).logits, reference)
    hidden = model.base_model(ids).last_hidden_state
    steer = model.lm_steer
    expected = (hidden + hidden @ steer.p1 @ steer.p2.T) @ model.get_output_embeddings().weight.T
    torch.testing.assert_close(model(ids).logits, expected)


def test_loreft_intervention_is_the_papers_formula_with_orthonormal_rows():
    torch.manual_seed(0)
    intervention = LoReFTIntervention(hidden_size=16, rank=3)
    rotation = intervention.rotate.weight
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(3), atol=1e-5, rtol=0)
    h = torch.randn(2, 5, 16)
    w, b = intervention.learned_source.weight, intervention.learned_source.bias
    expected = h + (h @ w.T + b - h @ rotation.T) @ rotation
    torch.testing.assert_close(intervention(h), expected)


@pytest.mark.parametrize("build", [small_gpt2, small_llama])
def test_loreft_hook_edits_the_last_layer_output_and_trains_alone(build):
    ids = torch.tensor([[1, 2, 3, 4]])
    model = loreft_on_last_layer(build(), rank=2)
    assert trainable_parameters(model) == 2 * 2 * model.config.hidden_size + 2
    outputs = model(ids, output_hidden_states=True)
    plain = build()(ids, output_hidden_states=True)
    torch.testing.assert_close(outputs.hidden_states[-2], plain.hidden_states[-2])  # below the last layer: as is
    assert not torch.allclose(outputs.logits, plain.logits)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    one_step(model)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("loreft.") for n in changed)
