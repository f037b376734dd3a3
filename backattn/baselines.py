"""The alternatives a practitioner would pick instead of a head, built on the same frozen base.

* :func:`lora_on_attention`: LoRA (PEFT) on the base's attention projections, with the target modules,
  layers and rank chosen so that its trainable parameters come as close as possible to a given budget
  (normally the head's parameter count).
* :func:`lora_on_output_layer`: LoRA (PEFT) on the output layer alone, untied from the input embeddings
  first (a PEFT wrapper on a tied output layer breaks ``tie_weights``).
* :func:`output_layer_only`: the output layer retrained in full, untied from the input embeddings.

Each returns a model whose only trainable parameters are the baseline's.
"""

from __future__ import annotations

import itertools

from peft import LoraConfig, get_peft_model
from torch import nn

# Attention projections by family, and how their weight is laid out (GPT-2's Conv1D is transposed).
ATTENTION_MODULES = {
    "gpt2": {"candidates": (["c_attn"], ["c_attn", "c_proj"]), "fan_in_fan_out": True},
    "llama": {"candidates": (["q_proj"], ["v_proj"], ["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"]),
              "fan_in_fan_out": False},
}  # fmt: skip


def _base_type(model) -> str:
    return model.config.model_type.removesuffix("_backattn")


def _lora_parameters_per_layer(model, target_modules: list[str]) -> int:
    """Trainable parameters that rank-1 LoRA on ``target_modules`` adds to one decoder layer."""
    layer = model.base_model.h[0] if _base_type(model) == "gpt2" else model.base_model.layers[0]
    total = 0
    for name, module in layer.named_modules():
        if name.split(".")[-1] in target_modules:
            weight = module.weight
            total += weight.shape[0] + weight.shape[1]
    return total


def lora_on_attention(model, target_parameters: int, max_rank: int = 64):
    """LoRA on attention whose trainable parameters are closest to ``target_parameters``.

    Searches the family's candidate module sets, ranks ``1..max_rank`` and the number of layers (counted
    from the top, as the layers nearest the output matter most for a small budget).
    """
    base_type = _base_type(model)
    if base_type not in ATTENTION_MODULES:
        raise ValueError(f"No attention LoRA recipe for model_type {base_type!r}; known: {sorted(ATTENTION_MODULES)}.")
    recipe = ATTENTION_MODULES[base_type]
    layers = model.config.num_hidden_layers
    best = None
    for modules, rank, count in itertools.product(recipe["candidates"], range(1, max_rank + 1), range(1, layers + 1)):
        parameters = _lora_parameters_per_layer(model, modules) * rank * count
        score = abs(parameters - target_parameters)
        if best is None or score < best[0]:
            best = (score, modules, rank, count)
    _, modules, rank, count = best
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=modules,
        layers_to_transform=list(range(layers - count, layers)),
        fan_in_fan_out=recipe["fan_in_fan_out"],
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def _untie_output_layer(model) -> nn.Linear:
    """Give the output layer its own copy of the weights (the input embeddings stay as they were)."""
    output = model.get_output_embeddings()
    if output.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr():
        output.weight = nn.Parameter(output.weight.detach().clone())
    model.config.tie_word_embeddings = False
    return output


def lora_on_output_layer(model, rank: int = 1):
    """Rank-``rank`` LoRA on the (untied) output layer alone."""
    _untie_output_layer(model)
    name = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=[name], task_type="CAUSAL_LM"))


def output_layer_only(model):
    """The whole output layer trains (untied from the input embeddings); everything else is frozen."""
    output = _untie_output_layer(model)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    output.weight.requires_grad_(True)
    return model


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["lora_on_attention", "lora_on_output_layer", "output_layer_only", "trainable_parameters"]
