"""The baselines a head is compared with: PEFT LoRA on attention or on the output layer, the output layer alone."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from backattn import BackwardAttentionConfig, BackwardAttentionHead
from backattn.baselines import lora_on_attention, lora_on_output_layer, output_layer_only, trainable_parameters


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
    assert not torch.equal(peft_model(input_ids=torch.tensor([[1, 2]])).logits, small_gpt2()(torch.tensor([[1, 2]])).logits)


def test_output_layer_only_trains_the_untied_output_layer():
    model = small_gpt2()
    embeddings = model.get_input_embeddings().weight.detach().clone()
    model = output_layer_only(model)
    assert trainable_parameters(model) == 97 * 64
    one_step(model)
    assert torch.equal(model.get_input_embeddings().weight, embeddings)
    assert not torch.equal(model.get_output_embeddings().weight, embeddings)
