"""The backward-attention head, plainly: steps 1-7 of :class:`BackwardAttentionConfig`, in its symbols.

:class:`BackwardAttentionLayer` computes steps 1-6 of one layer, :class:`BackwardAttentionHead` runs its
layers and step 7. This is the reference: the models run the same maths through the faster paths of
``head_kernels.py`` (vocabulary slices, top-k re-ranking, the raw-weighting shortcut, the fused gate, the
cached tables), each tested equal to these forwards. The model classes are in ``modeling_families.py``.

This module imports only torch, transformers and (relatively) ``configuration_backattn`` and ``errors``, so a saved
checkpoint loads with ``trust_remote_code=True`` where ``backattn`` is not installed.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from .configuration_backattn import BackwardAttentionConfig
from .errors import BackattnValueError


class LayerTables(NamedTuple):
    """The weight-only tables of one layer (steps 1-3)."""

    keys: torch.Tensor  # K: V x d_out
    values: torch.Tensor  # Vv: V x d_out
    hidden_to_values: torch.Tensor | None = None  # W^T Vv: d x d_out, for head_kernels' raw-weighting shortcut


class BackwardAttentionLayer(nn.Module):
    """One backward-attention layer, steps 1-6.

    The parameters carry the names of the config's docstring: ``norm`` is the RMSNorm of step 1,
    ``w_latent`` ``W_l``, ``w_key`` ``W_k``, ``w_value`` ``W_v``, ``w_query`` ``W_q``, ``w_hidden`` ``W_h`` and
    ``head_mix`` the ``c_j`` of the attention sub-heads (``attention_head_combine="mix"``).
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
        mixed = config.attention_head_combine == "mix"
        self.head_mix = nn.Parameter(torch.empty(config.num_attention_heads)) if mixed else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Projections as ``nn.Linear`` starts them (uniform in +-1/sqrt(fan_in)); ``W_h`` at zero; ``c_j`` at 1.

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

    def tables(self, embeddings: torch.Tensor) -> LayerTables:
        """Steps 1-3 for the embedding table ``E`` (V x d)."""
        E_n = self.norm(embeddings)  # step 1: V x d
        L = E_n @ self.w_latent if self.w_latent is not None else E_n  # step 2: V x d_latent
        return LayerTables(keys=L @ self.w_key, values=L @ self.w_value)  # step 3: V x d_out each

    def forward(self, logits: torch.Tensor, hidden: torch.Tensor, tables: LayerTables) -> torch.Tensor:
        """Steps 4-6: the scores ``s_t`` (... x V) for logits ``l_t`` (... x V) and hidden states ``h_t`` (... x d)."""
        config = self.config
        K, Vv = tables.keys, tables.values  # V x d_out each
        V, h = K.shape[0], config.num_attention_heads
        if config.logit_weighting == "softmax":  # step 4: ... x V
            rms = torch.sqrt(logits.square().mean(dim=-1, keepdim=True) + config.rms_norm_eps)
            p = torch.softmax(logits / rms, dim=-1)
        else:
            p = logits
        p = F.dropout(p, config.dropout, self.training)
        u = p @ Vv  # step 5: ... x d_out
        if config.divide_by_vocab:
            u = u / V
        q = u @ self.w_query
        if self.w_hidden is not None:
            q = q + hidden @ self.w_hidden
        c = self.head_mix if self.head_mix is not None else q.new_ones(h)  # step 6: c_j, one per sub-head
        q_j, K_j = q.unflatten(-1, (h, -1)), K.unflatten(-1, (h, -1))  # ... x h x d_out/h, V x h x d_out/h
        return torch.einsum("...jd,vjd,j->...v", q_j, K_j, c) / math.sqrt(config.out_dim // h)  # ... x V


class BackwardAttentionHead(nn.Module):
    """A task head: one or more :class:`BackwardAttentionLayer` and step 7, where the scores meet the logits.

    ``gate`` holds ``g`` (one per layer when sequential, else one), ``layer_mix`` the learned weights of
    parallel layers.
    """

    def __init__(self, config: BackwardAttentionConfig):
        super().__init__()
        if config.vocab_size is None or config.hidden_size is None:
            raise BackattnValueError(
                "A head needs its base model's sizes: build it from config.for_base(vocab_size, hidden_size)."
            )
        self.config = config
        self.layers = nn.ModuleList(BackwardAttentionLayer(config) for _ in range(config.num_layers))
        sequential = config.layer_mode == "sequential"
        num_merges = config.num_layers if sequential else 1
        self.gate = nn.Parameter(torch.empty(num_merges)) if config.score_mode == "gate" else None
        self.layer_mix = (
            nn.Parameter(torch.empty(config.num_layers)) if config.num_layers > 1 and not sequential else None
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The gate starts at zero (the untrained head gives the base logits); the layer mix at 1/num_layers."""
        if self.gate is not None:
            init.zeros_(self.gate)
        if self.layer_mix is not None:
            init.constant_(self.layer_mix, 1.0 / self.config.num_layers)

    def check_base(self, logits: torch.Tensor, embeddings: torch.Tensor) -> None:
        """``ValueError`` unless the logits and the embedding table are those of the base the head was built for."""
        config = self.config
        if logits.shape[-1] != config.vocab_size or embeddings.shape != (config.vocab_size, config.hidden_size):
            raise BackattnValueError(
                f"This head was built for vocab_size={config.vocab_size}, hidden_size={config.hidden_size}, "
                f"but the base gives logits over {logits.shape[-1]} tokens and an embedding table of shape "
                f"{tuple(embeddings.shape)}. Attach it to the base it was built for."
            )

    def forward(
        self,
        logits: torch.Tensor,
        hidden: torch.Tensor,
        embeddings: torch.Tensor,
        tables: list[LayerTables] | None = None,
    ) -> torch.Tensor:
        """Steps 1-7: the head's logits (... x V) for base logits ``l_t`` (... x V), hidden states ``h_t``
        (... x d) and the embedding table ``E`` (V x d); ``tables`` are steps 1-3 of each layer, precomputed."""
        self.check_base(logits, embeddings)
        dtype = self.layers[0].w_key.dtype
        logits, hidden = logits.to(dtype), hidden.to(dtype)
        if tables is None:
            tables = [layer.tables(embeddings.to(dtype)) for layer in self.layers]  # steps 1-3
        if self.config.layer_mode == "sequential":  # each layer reads the logits the one before produced
            gates = self.gate if self.gate is not None else [None] * len(self.layers)
            for layer, layer_tables, gate in zip(self.layers, tables, gates):
                logits = self.meet(logits, layer(logits, hidden, layer_tables), gate)  # steps 4-7: ... x V
            return logits
        mix = self.layer_mix if self.layer_mix is not None else [1.0]
        s = sum(m * layer(logits, hidden, t) for m, layer, t in zip(mix, self.layers, tables))  # steps 4-6: ... x V
        return self.meet(logits, s, self.gate[0] if self.gate is not None else None)  # step 7: ... x V

    def meet(self, logits: torch.Tensor, scores: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        """Step 7: ``l_t + dropout(s_t)``, ``l_t + g * dropout(s_t)`` or ``dropout(s_t)`` (by ``score_mode``)."""
        scores = F.dropout(scores, self.config.dropout, self.training)
        if self.config.score_mode == "replace":
            return scores
        return logits + (gate * scores if self.config.score_mode == "gate" else scores)


__all__ = ["BackwardAttentionHead", "BackwardAttentionLayer", "LayerTables"]


def __getattr__(name: str):
    """backattn 0.1.0 kept the model families here; they live in ``modeling_families.py`` now."""
    if name in ("FAMILIES", "family_for", "GPT2BackwardAttentionForCausalLM", "LlamaBackwardAttentionForCausalLM"):
        from . import modeling_families

        return getattr(modeling_families, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
