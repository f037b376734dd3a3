"""The backward-attention head and the causal-LM families that carry it on a frozen base model.

Read top to bottom: :class:`BackwardAttentionLayer` (one layer of DESIGN.md section 2, steps 1-6),
:class:`BackwardAttentionHead` (layers combined, step 7, and the cache of weight-only tables), then
:class:`BackwardAttentionForCausalLMMixin` (the forward pass shared by every base family) and the two
families, GPT-2 and Llama.

This module imports only torch, transformers and its sibling ``configuration_backattn`` (relatively), so a
saved checkpoint loads with ``trust_remote_code=True`` where ``backattn`` is not installed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GPT2LMHeadModel, LlamaForCausalLM
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils.generic import can_return_tuple

from .configuration_backattn import BackwardAttentionConfig, GPT2BackwardAttentionConfig, LlamaBackwardAttentionConfig


def _vocab_slices(vocab_size: int, chunk_size: int | None) -> list[slice]:
    """The vocabulary rows in slices of ``chunk_size`` (one slice for all of it when ``None``)."""
    step = chunk_size or vocab_size
    return [slice(start, min(start + step, vocab_size)) for start in range(0, vocab_size, step)]


class BackwardAttentionLayer(nn.Module):
    """One backward-attention layer: the weight-only tables ``K``, ``Vv`` and the query ``q_t``.

    The parameters carry the names of DESIGN.md section 2: ``w_latent`` is ``W_l``, ``w_key`` ``W_k``,
    ``w_value`` ``W_v``, ``w_query`` ``W_q``, ``w_hidden`` ``W_h`` and ``norm`` the RMSNorm of step 1.
    """

    def __init__(self, config: BackwardAttentionConfig):
        super().__init__()
        self.config = config
        d, d_out = config.hidden_size, config.out_dim
        d_latent = config.latent_dim or d
        self.norm = nn.RMSNorm(d, eps=config.rms_norm_eps)
        self.w_latent = nn.Parameter(torch.empty(d, d_latent)) if config.latent_dim else None
        self.w_key = nn.Parameter(torch.empty(d_latent, d_out))
        self.w_value = nn.Parameter(torch.empty(d_latent, d_out))
        self.w_query = nn.Parameter(torch.empty(d_out, d_out))
        self.w_hidden = nn.Parameter(torch.empty(d, d_out)) if config.use_hidden_state else None
        self.head_mix = nn.Parameter(torch.empty(config.num_heads)) if config.head_combine == "mix" else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Projections as ``nn.Linear`` starts them (uniform in +-1/sqrt(fan_in)); ``W_h`` at zero; mix at 1.

        Uses ``transformers.initialization`` so that weights loaded from a checkpoint are left alone.
        """
        init.ones_(self.norm.weight)
        for weight in (self.w_latent, self.w_key, self.w_value, self.w_query):
            if weight is not None:
                bound = 1 / math.sqrt(weight.shape[0])
                init.uniform_(weight, -bound, bound)
        if self.w_hidden is not None:
            init.zeros_(self.w_hidden)
        if self.head_mix is not None:
            init.ones_(self.head_mix)

    def tables(self, embeddings: torch.Tensor, run: Callable) -> tuple[torch.Tensor, torch.Tensor]:
        """Steps 1-3: ``K = L W_k`` and ``Vv = L W_v`` with ``L = RMSNorm(E) W_l``, slice by slice."""

        def one_slice(rows: torch.Tensor) -> torch.Tensor:
            latent = self.norm(rows)
            if self.w_latent is not None:
                latent = latent @ self.w_latent
            return torch.cat([latent @ self.w_key, latent @ self.w_value], dim=-1)

        slices = _vocab_slices(embeddings.shape[0], self.config.vocab_chunk_size)
        key_value = torch.cat([run(one_slice, embeddings[rows]) for rows in slices])
        return key_value.split(self.config.out_dim, dim=-1)

    def query(
        self, logits: torch.Tensor, hidden: torch.Tensor, values: torch.Tensor, run: Callable, training: bool
    ) -> torch.Tensor:
        """Steps 4-5 and the per-head scale of step 6: the query ``q_t``, scaled so that ``s_t = q_t K^T``.

        Summing the per-head dot products ``c_j q^j (K^j)^T / sqrt(out_dim / num_heads)`` equals one dot
        product of the whole vectors once each slice ``j`` of ``q`` is multiplied by ``c_j / sqrt(...)``.
        """
        config = self.config
        vocab_size = logits.shape[-1]
        slices = _vocab_slices(vocab_size, config.vocab_chunk_size)
        p = config.dropout if training else 0.0

        if config.logit_weighting == "softmax":
            # softmax(l / rms(l)) = exp(l / rms(l) - logsumexp(l / rms(l))), accumulated slice by slice.
            mean_square = sum(logits[..., rows].pow(2).sum(-1, keepdim=True) for rows in slices) / vocab_size
            inv_rms = torch.rsqrt(mean_square + config.rms_norm_eps)
            log_normaliser = torch.logsumexp(
                torch.cat([run(lambda z: torch.logsumexp(z * inv_rms, -1, keepdim=True), logits[..., rows]) for rows in slices], -1),
                -1,
                keepdim=True,
            )

            def weighted_values(z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                return F.dropout(torch.exp(z * inv_rms - log_normaliser), p, training) @ v

        else:

            def weighted_values(z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                return F.dropout(z, p, training) @ v

        u = sum(run(weighted_values, logits[..., rows], values[rows]) for rows in slices)
        if config.divide_by_vocab:
            u = u / vocab_size
        q = u @ self.w_query
        if self.w_hidden is not None:
            q = q + hidden @ self.w_hidden

        head_dim = config.out_dim // config.num_heads
        head_scale = (self.head_mix if self.head_mix is not None else q.new_ones(config.num_heads)) / math.sqrt(head_dim)
        return q * head_scale.repeat_interleave(head_dim)


class BackwardAttentionHead(nn.Module):
    """A task head: one or more :class:`BackwardAttentionLayer` and step 7, where scores meet the logits.

    ``forward(logits, hidden, embeddings)`` maps the base model's logits ``l_t`` (any leading shape, last
    dimension ``V``), its final hidden states ``h_t`` and its input-embedding table ``E`` to the head's
    logits. The weight-only tables ``K`` and ``Vv`` are computed once and reused while neither the head's
    weights nor ``E`` change and no gradient is needed (a change is seen through the tensors' version
    counters, which every in-place update such as an optimiser step or ``load_state_dict`` increments).
    """

    def __init__(self, config: BackwardAttentionConfig):
        super().__init__()
        if config.vocab_size is None or config.hidden_size is None:
            raise ValueError("A head needs its base model's sizes: build it from config.for_base(vocab_size, hidden_size).")
        self.config = config
        self.layers = nn.ModuleList(BackwardAttentionLayer(config) for _ in range(config.num_layers))
        sequential = config.layer_mode == "sequential"
        num_merges = config.num_layers if sequential else 1
        self.gate = nn.Parameter(torch.empty(num_merges)) if config.score_mode == "gate" else None
        self.layer_mix = nn.Parameter(torch.empty(config.num_layers)) if config.num_layers > 1 and not sequential else None
        self._tables_cache: tuple[tuple, list[tuple[torch.Tensor, torch.Tensor]]] | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The gate starts at zero (the untrained head gives the base logits); the layer mix at 1/num_layers."""
        if self.gate is not None:
            init.zeros_(self.gate)
        if self.layer_mix is not None:
            init.constant_(self.layer_mix, 1.0 / self.config.num_layers)

    # ----------------------------------------------------------------------------------------------------

    def forward(self, logits: torch.Tensor, hidden: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        config = self.config
        if logits.shape[-1] != config.vocab_size or embeddings.shape != (config.vocab_size, config.hidden_size):
            raise ValueError(
                f"This head was built for vocab_size={config.vocab_size}, hidden_size={config.hidden_size}, "
                f"but the base gives logits over {logits.shape[-1]} tokens and an embedding table of shape "
                f"{tuple(embeddings.shape)}. Attach it to the base it was built for."
            )
        dtype = self.layers[0].w_key.dtype
        logits, hidden = logits.to(dtype), hidden.to(dtype)
        run = self._runner()
        tables = self.tables(embeddings.to(dtype), run)

        if config.layer_mode == "sequential":
            for index, (layer, (keys, values)) in enumerate(zip(self.layers, tables)):
                query = layer.query(logits, hidden, values, run, self.training)
                logits = self._merge(logits, query, keys, index, run)
            return logits

        # Parallel layers: sum_j m_j q_j K_j^T is one dot product of the concatenated [m_j q_j] and [K_j].
        queries = [layer.query(logits, hidden, values, run, self.training) for layer, (_, values) in zip(self.layers, tables)]
        if self.layer_mix is not None:
            queries = [mix * query for mix, query in zip(self.layer_mix, queries)]
        keys = torch.cat([keys for keys, _ in tables], dim=-1)
        return self._merge(logits, torch.cat(queries, dim=-1), keys, 0, run)

    def _merge(self, logits: torch.Tensor, query: torch.Tensor, keys: torch.Tensor, index: int, run: Callable) -> torch.Tensor:
        """Step 7, slice by slice over the vocabulary: ``s = q K^T`` meets the logits."""
        mode, p, training = self.config.score_mode, self.config.dropout, self.training
        gate = self.gate[index] if self.gate is not None else None

        def one_slice(z: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            scores = F.dropout(query @ k.T, p, training)
            if mode == "replace":
                return scores
            return z + (gate * scores if mode == "gate" else scores)

        slices = _vocab_slices(logits.shape[-1], self.config.vocab_chunk_size)
        if len(slices) == 1:
            return one_slice(logits, keys)
        out = torch.empty_like(logits)
        for rows in slices:
            out[..., rows] = run(one_slice, logits[..., rows], keys[rows])
        return out

    def _runner(self) -> Callable:
        """How each vocabulary slice runs: recomputed in the backward pass when chunking under autograd."""
        if self.config.vocab_chunk_size is None or not torch.is_grad_enabled():
            return lambda fn, *args: fn(*args)
        return lambda fn, *args: checkpoint(fn, *args, use_reentrant=False)

    # ----------------------------------------------------------------------------------------------------

    def tables(self, embeddings: torch.Tensor, run: Callable) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(K, Vv)`` of every layer; cached while neither weights nor ``E`` change and no grad is needed."""
        if torch.is_grad_enabled() and (embeddings.requires_grad or any(p.requires_grad for p in self.parameters())):
            self._tables_cache = None
            return [layer.tables(embeddings, run) for layer in self.layers]
        key = (
            torch.is_inference_mode_enabled(),
            embeddings.data_ptr(),
            embeddings._version,
            embeddings.dtype,
            embeddings.device,
            tuple((p.data_ptr(), p._version) for p in self.parameters()),
        )
        if self._tables_cache is None or self._tables_cache[0] != key:
            self._tables_cache = (key, [layer.tables(embeddings, run) for layer in self.layers])
        return self._tables_cache[1]


class BackwardAttentionForCausalLMMixin:
    """What every base family shares: heads built from ``config.heads``, a frozen base, and ``forward``.

    Put it first in the bases, before the family's ``...ForCausalLM`` class, which provides
    ``self.base_model`` (the decoder), ``self.lm_head`` and ``get_input_embeddings()``.
    """

    def __init__(self, config, head_config: BackwardAttentionConfig | dict | str | None = None, head_name: str = "default"):
        if head_config is not None:
            if config.heads:
                raise ValueError(
                    f"This model already carries heads {sorted(config.heads)}; head_config= only attaches a "
                    "fresh head to a plain base model."
                )
            config.heads = {head_name: BackwardAttentionConfig.coerce(head_config).to_dict()}
            config.active_head = head_name
        super().__init__(config)

    def post_init(self):
        # Called at the end of the family's __init__: the heads join the model before weights are initialised.
        self.heads = nn.ModuleDict()
        for name, options in self.config.heads.items():
            head_config = BackwardAttentionConfig.from_dict(options).for_base(self.config.vocab_size, self.config.hidden_size)
            self.config.heads[name] = head_config.to_dict()
            self.heads[name] = BackwardAttentionHead(head_config)
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
        """Only head parameters train; every base parameter (the embedding table too) is frozen."""
        for name, parameter in self.named_parameters():
            parameter.requires_grad_(name.startswith("heads."))

    def train(self, mode: bool = True):
        """The frozen base always runs in eval mode (no dropout), so its features are deterministic."""
        super().train(mode)
        self.base_model.eval()
        return self

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
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""The base model's forward, then the active head on the positions kept.

        ``logits`` are the active head's next-token logits (the base model's own when no head is active);
        ``loss`` is the usual shifted cross-entropy over labels that are not ``-100``.
        """
        vocab_size = self.config.vocab_size
        if input_ids is not None and input_ids.numel():
            low, high = (value.item() for value in torch.aminmax(input_ids))
            if low < 0 or high >= vocab_size:
                raise ValueError(
                    f"input_ids holds token id {low if low < 0 else high}, outside this model's vocabulary "
                    f"[0, {vocab_size}): use the tokenizer that belongs to the base model."
                )
        outputs = self.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden)
        if self.config.active_head is not None:
            head = self.heads[self.config.active_head]
            logits = head(logits, hidden, self.get_input_embeddings().weight)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


class GPT2BackwardAttentionForCausalLM(BackwardAttentionForCausalLMMixin, GPT2LMHeadModel):
    """GPT-2 (frozen) with backward-attention heads on its logits."""

    config_class = GPT2BackwardAttentionConfig


class LlamaBackwardAttentionForCausalLM(BackwardAttentionForCausalLMMixin, LlamaForCausalLM):
    """A Llama-family model such as SmolLM2 (frozen) with backward-attention heads on its logits."""

    config_class = LlamaBackwardAttentionConfig


GPT2BackwardAttentionForCausalLM.register_for_auto_class("AutoModelForCausalLM")
LlamaBackwardAttentionForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "BackwardAttentionForCausalLMMixin",
    "BackwardAttentionHead",
    "BackwardAttentionLayer",
    "GPT2BackwardAttentionForCausalLM",
    "LlamaBackwardAttentionForCausalLM",
]
