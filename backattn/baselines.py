"""The alternatives a practitioner would pick instead of a head, built on the same frozen base.

* :func:`lora_on_attention`: LoRA (PEFT) on the base's attention projections, with the target modules,
  layers and rank chosen so that its trainable parameters come as close as possible to a given budget
  (normally the head's parameter count).
* :func:`lora_on_output_layer`: LoRA (PEFT) on the output layer alone, untied from the input embeddings
  first (a PEFT wrapper on a tied output layer breaks ``tie_weights``).
* :func:`output_layer_only`: the output layer retrained in full, untied from the input embeddings.
* :func:`ia3_on_top_layers`: IA3 (PEFT) on the keys, values and feed-forward inputs of the top layers, as
  many layers as come closest to a budget.
* :func:`lm_steer`: LM-Steer (Han et al. 2024): the final hidden state steered, ``h + h P1 P2^T``, before the
  frozen output layer.
* :func:`loreft_on_last_layer`: a LoReFT intervention (Wu et al. 2024), ``h + R^T (W h + b - R h)`` with ``R``
  of orthonormal rows, on the last decoder layer's output at every position, attached with a torch hook
  (a stand-in for ``pyreft``, whose only release pins Transformers 4.45).

Each returns a model whose only trainable parameters are the baseline's.
"""

from __future__ import annotations

import itertools

import torch
from peft import IA3Config, LoraConfig, get_peft_model
from torch import nn

# Attention projections by family, and how their weight is laid out (GPT-2's Conv1D is transposed).
ATTENTION_MODULES = {
    "gpt2": {"candidates": (["c_attn"], ["c_attn", "c_proj"]), "fan_in_fan_out": True},
    "llama": {"candidates": (["q_proj"], ["v_proj"], ["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"]),
              "fan_in_fan_out": False},
}  # fmt: skip


def _base_type(model) -> str:
    return model.config.model_type.removesuffix("_backattn")


def _decoder_layers(model) -> nn.ModuleList:
    return model.base_model.h if _base_type(model) == "gpt2" else model.base_model.layers


def _lora_parameters_per_layer(model, target_modules: list[str]) -> int:
    """Trainable parameters that rank-1 LoRA on ``target_modules`` adds to one decoder layer."""
    layer = _decoder_layers(model)[0]
    total = 0
    for name, module in layer.named_modules():
        if name.split(".")[-1] in target_modules:
            weight = module.weight
            total += weight.shape[0] + weight.shape[1]
    return total


def lora_on_attention(model, target_parameters: int, max_rank: int = 64):
    """PEFT LoRA on attention (``get_peft_model``) whose trainable parameters are closest to ``target_parameters``."""
    return get_peft_model(model, attention_lora_config(model, target_parameters, max_rank))


def attention_lora_config(model, target_parameters: int, max_rank: int = 64) -> LoraConfig:
    """The ``LoraConfig`` on attention whose trainable parameters are closest to ``target_parameters``.

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
    return LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=modules,
        layers_to_transform=list(range(layers - count, layers)),
        fan_in_fan_out=recipe["fan_in_fan_out"],
        task_type="CAUSAL_LM",
    )


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


# IA3's scaled modules by family: (attention modules scaled on their output, feed-forward modules on their input).
IA3_MODULES = {"gpt2": (("c_attn",), ("mlp.c_proj",)), "llama": (("k_proj", "v_proj"), ("down_proj",))}


def ia3_on_top_layers(model, target_parameters: int):
    """IA3 on the top layers' keys, values and feed-forward inputs, as many layers as come closest to the budget."""
    base_type = _base_type(model)
    if base_type not in IA3_MODULES:
        raise ValueError(f"No IA3 recipe for model_type {base_type!r}; known: {sorted(IA3_MODULES)}.")
    attention, feedforward = IA3_MODULES[base_type]
    per_layer = 0
    for name, module in _decoder_layers(model)[0].named_modules():
        if name.endswith(attention):
            per_layer += module.weight.shape[0 if base_type == "llama" else 1]  # output features (Conv1D: dim 1)
        elif name.endswith(feedforward):
            per_layer += module.weight.shape[1 if base_type == "llama" else 0]  # input features
    layers = len(_decoder_layers(model))
    count = min(layers, max(1, round(target_parameters / per_layer)))
    chosen = "|".join(str(i) for i in range(layers - count, layers))
    prefix = r".*\.(?:h|layers)\.(?:" + chosen + r")\..*"
    config = IA3Config(
        target_modules=prefix + "(?:" + "|".join(m.replace(".", r"\.") for m in attention + feedforward) + ")$",
        feedforward_modules=prefix + "(?:" + "|".join(m.replace(".", r"\.") for m in feedforward) + ")$",
        fan_in_fan_out=base_type == "gpt2",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


class LowRankSteer(nn.Module):
    """``h -> h + (h P1) P2^T`` (LM-Steer's steering with one style, its epsilon folded into ``P2``).

    ``P2`` starts at zero, so the untrained steer gives the base's logits exactly; ``P1`` as ``nn.Linear``.
    """

    def __init__(self, hidden_size: int, rank: int):
        super().__init__()
        bound = 1 / hidden_size**0.5
        self.p1 = nn.Parameter(torch.empty(hidden_size, rank).uniform_(-bound, bound))
        self.p2 = nn.Parameter(torch.zeros(hidden_size, rank))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + (hidden @ self.p1) @ self.p2.T


class LoReFTIntervention(nn.Module):
    """``h -> h + R^T (W h + b - R h)``: ``R`` (``rank x d``) has orthonormal rows, ``W``, ``b`` as ``nn.Linear``."""

    def __init__(self, hidden_size: int, rank: int):
        super().__init__()
        self.rotate = nn.utils.parametrizations.orthogonal(nn.Linear(hidden_size, rank, bias=False))
        self.learned_source = nn.Linear(hidden_size, rank)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        rotation = self.rotate.weight.to(hidden.dtype)
        return hidden + (self.learned_source(hidden) - hidden @ rotation.T) @ rotation


def _freeze(model) -> None:
    for parameter in model.parameters():
        parameter.requires_grad_(False)


def lm_steer(model, rank: int):
    """LM-Steer on the final hidden state, as a pre-hook of the frozen output layer (``model.lm_steer``)."""
    _freeze(model)
    steer = LowRankSteer(model.config.hidden_size, rank).to(model.get_output_embeddings().weight.device)
    model.add_module("lm_steer", steer)
    model.get_output_embeddings().register_forward_pre_hook(lambda module, args: (steer(args[0]), *args[1:]))
    return model


def loreft_on_last_layer(model, rank: int):
    """A LoReFT intervention on the last decoder layer's output, every position (``model.loreft``)."""
    _freeze(model)
    intervention = LoReFTIntervention(model.config.hidden_size, rank).to(model.get_output_embeddings().weight.device)
    model.add_module("loreft", intervention)

    def hook(module, args, output):
        if isinstance(output, tuple):
            return (intervention(output[0]), *output[1:])
        return intervention(output)

    _decoder_layers(model)[-1].register_forward_hook(hook)
    return model


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = [
    "LoReFTIntervention",
    "LowRankSteer",
    "ia3_on_top_layers",
    "lm_steer",
    "lora_on_attention",
    "lora_on_output_layer",
    "loreft_on_last_layer",
    "output_layer_only",
    "trainable_parameters",
]
