"""The causal-LM families that carry backward-attention heads on a frozen base: GPT-2 and Llama.

:class:`BackwardAttentionForCausalLMMixin` is what every family shares: setting up the heads on the base,
``forward`` and ``generate``, and short methods that delegate to the heads container (``heads.py``) and
to the head files (``head_files.py``). The head's maths is in ``modeling_backattn.py``, the fast paths the
forward runs in ``head_kernels.py``, the chunked training loss in ``head_loss.py``.

Every sibling is imported relatively, so ``save_pretrained`` copies them beside a checkpoint and it loads
with ``trust_remote_code=True`` where ``backattn`` is not installed.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import GPT2LMHeadModel, LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils import logging as transformers_logging
from transformers.utils.generic import can_return_tuple

from .configuration_backattn import BackwardAttentionConfig, GPT2BackwardAttentionConfig, LlamaBackwardAttentionConfig
from .head_files import embedding_fingerprint, load_head, push_head_to_hub, save_head  # the methods' namesakes
from .head_loss import head_cross_entropy
from .heads import BackwardAttentionHeads, HeadsDisabled
from .modeling_backattn import BackwardAttentionHead, BackwardAttentionLayer


class BackwardAttentionForCausalLMMixin:
    """Named task heads on a frozen base, the head API, and ``forward``.

    Put it first in the bases, before the family's ``...ForCausalLM`` class, which provides
    ``self.base_model`` (the decoder), ``self.lm_head`` and ``get_input_embeddings()``.

    The heads live in ``self.heads`` (a :class:`~backattn.heads.BackwardAttentionHeads`, which keeps their
    options in ``config.heads``), so ``save_pretrained`` / ``from_pretrained`` keep every resident head. The
    methods follow the Transformers adapter API with ``head`` for ``adapter`` (``add_head``, ``load_head``,
    ``set_head``, ``active_head``, ``disable_heads`` / ``enable_heads``, ``delete_head``, ``save_head``,
    ``push_head_to_hub``), which leaves the inherited PEFT adapter methods free for LoRA on the base.
    """

    def __init__(
        self, config, head_config: BackwardAttentionConfig | dict | str | None = None, head_name: str = "default"
    ):
        if not isinstance(config, self.config_class):  # a stock config of the base family, e.g. GPT2Config
            config = self.config_class.from_dict(config.to_dict())
        if head_config is not None:
            BackwardAttentionHeads.attach_to_config(config, head_name, BackwardAttentionConfig.coerce(head_config))
        super().__init__(config)

    def post_init(self):
        # Called at the end of the family's __init__: the heads join the model before weights are initialised.
        self.heads = BackwardAttentionHeads(self.config)
        self._fingerprint_cache: tuple[tuple, str] | None = None
        for name, options in list(self.config.heads.items()):
            self.heads.add(name, self.build_head(BackwardAttentionConfig.from_dict(options)))
        super().post_init()
        self.freeze_base()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """``PreTrainedModel.from_pretrained``, then the base frozen again (loading makes fresh parameters).

        On a plain base checkpoint, ``head_config=`` (a :class:`BackwardAttentionConfig`, a dict of its
        options or a preset name) attaches a fresh head: the base weights load unchanged and only the head
        is initialised.
        """
        loaded = super().from_pretrained(*args, **kwargs)
        (loaded[0] if isinstance(loaded, tuple) else loaded).freeze_base()
        return loaded

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, (BackwardAttentionLayer, BackwardAttentionHead)):
            module.reset_parameters()

    def freeze_base(self) -> None:
        """Freeze every base parameter (the embedding table too); the heads keep their own setting."""
        for name, parameter in self.named_parameters():
            if not name.startswith("heads."):
                parameter.requires_grad_(False)

    def train(self, mode: bool = True):
        """The frozen base always runs in eval mode (no dropout), so its features are deterministic."""
        super().train(mode)
        self.base_model.eval()
        return self

    def build_head(self, head_config: BackwardAttentionConfig) -> BackwardAttentionHead:
        """A fresh head for this base, beside its output layer; ``ValueError`` if made for another base."""
        head = BackwardAttentionHead(head_config.for_base(self.config.vocab_size, self.config.hidden_size))
        return head.to(device=self.lm_head.weight.device, dtype=self.lm_head.weight.dtype)

    # ----------------------------------------------------------------------------------------------------
    # the head API: the heads container and the head files do the work

    def list_heads(self) -> list[str]:
        """Names of the resident heads, in the order they were added."""
        return self.heads.names()

    def active_head(self) -> str | None:
        """The head that scores the next token, or ``None`` (no head active, or heads disabled)."""
        return self.heads.active

    def add_head(
        self, head_config: BackwardAttentionConfig | dict | str | None = None, head_name: str = "default"
    ) -> None:
        """Attach a fresh, trainable head and make it the active one (as ``add_adapter`` does)."""
        self.heads.add(head_name, self.build_head(BackwardAttentionConfig.coerce(head_config)))
        self.heads.set_active(head_name)

    def set_head(self, head_name: str) -> None:
        """Make a resident head the active one; no weights are copied."""
        self.heads.set_active(head_name)

    def disable_heads(self) -> HeadsDisabled:
        """Give the base model's own logits, exactly, until ``enable_heads``; or, as ``with
        model.disable_heads(): ...`` (as PEFT's ``disable_adapter``), until the block ends."""
        return self.heads.disable()

    def enable_heads(self) -> None:
        self.heads.enable()

    def delete_head(self, head_name: str) -> None:
        """Remove a resident head; if it was active, no head is active afterwards."""
        self.heads.remove(head_name)

    def embedding_fingerprint(self) -> str:
        """A fingerprint of the base's input-embedding table, recorded in head files to refuse the wrong base."""
        embeddings = self.get_input_embeddings().weight
        key = (embeddings.data_ptr(), embeddings._version, embeddings.shape)
        if self._fingerprint_cache is None or self._fingerprint_cache[0] != key:
            self._fingerprint_cache = (key, embedding_fingerprint(embeddings))
        return self._fingerprint_cache[1]

    # The head files: each function of head_files.py takes the model first, so it serves as the method itself.
    save_head = save_head
    load_head = load_head
    push_head_to_hub = push_head_to_hub

    # ----------------------------------------------------------------------------------------------------
    # forward

    def _output_weight(self) -> torch.Tensor | None:
        """The output layer ``W`` when the logits are exactly ``h_t W^T`` (no bias), else ``None``."""
        # Exactly nn.Linear: a PEFT- or quantisation-wrapped layer exposes a .weight that is not what it applies.
        return self.lm_head.weight if type(self.lm_head) is nn.Linear and self.lm_head.bias is None else None

    def _rerank_top_k(self, rerank_top_k: int | None) -> int | None:
        """The ``k`` of top-k re-ranking for one call: the argument, else ``config.rerank_top_k``; 0 means off."""
        return self.config.rerank_top_k if rerank_top_k is None else rerank_top_k

    def _chunked_loss_applies(self, labels, heads, logits_to_keep, hidden, rerank_top_k) -> bool:
        """Whether ``forward`` takes the head's loss chunk by chunk (see ``forward``).

        Only the head may need gradients there: the base's hidden states, output layer and embedding table
        must be frozen (no LoRA on the base, no trainable output layer), as the chunked loss gives them none.
        """
        weight = self._output_weight()
        return (
            labels is not None
            and self.training
            and torch.is_grad_enabled()
            and heads is None
            and self.active_head() is not None
            and bool(self.config.loss_chunk_size)
            and not self._rerank_top_k(rerank_top_k)
            and isinstance(logits_to_keep, int)
            and logits_to_keep == 0
            and weight is not None
            and not (hidden.requires_grad or weight.requires_grad or self.get_input_embeddings().weight.requires_grad)
        )

    def generate(self, *args, heads: list | torch.Tensor | None = None, **kwargs):
        """``GenerationMixin.generate``; ``heads=`` (one head name or ``None`` per row) mixes heads in a batch."""
        if heads is not None:
            # As a tensor, generate repeats it along with the batch for beams and multiple return sequences.
            kwargs["heads"] = self.heads.route(heads)
        return super().generate(*args, **kwargs)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        heads: list | torch.Tensor | None = None,
        base_hidden_states: torch.Tensor | None = None,
        rerank_top_k: int | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""The base model's forward, then the active head on the positions kept.

        ``logits`` are the active head's next-token logits (the base model's own when no head is active or
        heads are disabled); ``loss`` is the usual shifted cross-entropy over labels that are not ``-100``.
        ``heads`` (one head name, or ``None`` for the base, per batch row) serves different heads to the rows
        of one batch; each row gets what it would get alone with its head active. ``base_hidden_states``
        (batch x sequence x hidden) are the frozen base's final hidden states for ``input_ids``, precomputed
        (for example by :mod:`backattn.data.feature_cache`): the base is then not run at all. ``rerank_top_k``
        lets the head re-rank only the base's ``k`` most likely tokens per position, leaving the other
        logits as they are (cheaper, and an approximation; ``generate`` passes it through too); it overrides
        ``config.rerank_top_k`` for this call, and ``0`` scores the whole vocabulary.

        While training a head with ``labels`` (``model.train()``, gradients on, one active head), the loss
        is computed chunk by chunk over the labelled positions (``config.loss_chunk_size``, see
        :mod:`backattn.head_loss`) and ``logits`` is ``None``, as in Liger-Kernel's fused losses.
        """
        vocab_size = self.config.vocab_size
        if input_ids is not None and input_ids.numel():
            low, high = (value.item() for value in torch.aminmax(input_ids))
            if low < 0 or high >= vocab_size:
                raise ValueError(
                    f"input_ids holds token id {low if low < 0 else high}, outside this model's vocabulary "
                    f"[0, {vocab_size}): use the tokenizer that belongs to the base model."
                )
        if base_hidden_states is not None:
            outputs, hidden = None, base_hidden_states.to(self.lm_head.weight.dtype)
        else:
            outputs = self.base_model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                **kwargs,
            )
            hidden = outputs.last_hidden_state
        hidden = slice_logits_to_keep(hidden, logits_to_keep)
        embeddings, weight = self.get_input_embeddings().weight, self._output_weight()
        loss = logits = None
        if self._chunked_loss_applies(labels, heads, logits_to_keep, hidden, rerank_top_k):
            loss = head_cross_entropy(
                self.heads[self.config.active_head], hidden, labels, weight, embeddings, self.config.loss_chunk_size,
                kwargs.get("num_items_in_batch"), kwargs.get("ignore_index", -100), kwargs.get("shift_labels"),
            )  # fmt: skip
        else:
            logits = self.heads(
                self.lm_head(hidden), hidden, embeddings, weight, heads, self._rerank_top_k(rerank_top_k)
            )
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=getattr(outputs, "past_key_values", None),
            hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None),
        )


_BASE_MODEL_TYPES = {"gpt2_backattn": "gpt2", "llama_backattn": "llama"}


class _PlainBaseCheckpointFilter(logging.Filter):
    """Drop Transformers' warning about loading a plain base checkpoint into our family: that is the point."""

    EXPECTED = tuple(
        f"You are using a model of type `{base}` to instantiate a model of type `{ours}`"
        for ours, base in _BASE_MODEL_TYPES.items()
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.EXPECTED)


transformers_logging.get_logger("transformers.configuration_utils").addFilter(_PlainBaseCheckpointFilter())


class GPT2BackwardAttentionForCausalLM(BackwardAttentionForCausalLMMixin, GPT2LMHeadModel):
    """GPT-2 (frozen) with backward-attention heads on its logits."""

    config_class = GPT2BackwardAttentionConfig


class LlamaBackwardAttentionForCausalLM(BackwardAttentionForCausalLMMixin, LlamaForCausalLM):
    """A Llama-family model such as SmolLM2 (frozen) with backward-attention heads on its logits."""

    config_class = LlamaBackwardAttentionConfig


GPT2BackwardAttentionForCausalLM.register_for_auto_class("AutoModelForCausalLM")
LlamaBackwardAttentionForCausalLM.register_for_auto_class("AutoModelForCausalLM")


#: The head-carrying class for a base model's ``model_type`` (plain or already carrying heads).
FAMILIES = {
    "gpt2": GPT2BackwardAttentionForCausalLM,
    "gpt2_backattn": GPT2BackwardAttentionForCausalLM,
    "llama": LlamaBackwardAttentionForCausalLM,
    "llama_backattn": LlamaBackwardAttentionForCausalLM,
}


def family_for(model_type: str) -> type:
    """The backattn model class for a base of this ``model_type``; ``ValueError`` for an unsupported family."""
    if model_type not in FAMILIES:
        supported = sorted(t for t in FAMILIES if not t.endswith("_backattn"))
        raise ValueError(
            f"No backward-attention family for model_type {model_type!r}; supported: {', '.join(supported)}."
        )
    return FAMILIES[model_type]


__all__ = [
    "FAMILIES",
    "BackwardAttentionForCausalLMMixin",
    "GPT2BackwardAttentionForCausalLM",
    "LlamaBackwardAttentionForCausalLM",
    "family_for",
]
