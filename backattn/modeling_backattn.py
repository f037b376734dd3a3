"""The backward-attention head, plainly: steps 1-8 of :class:`BackwardAttentionConfig`, in its symbols.

:class:`BackwardAttentionLayer` computes steps 1-6 of one layer, :class:`BackwardAttentionHead` runs its
layers, step 7 and the copy term of step 8, and makes the query state ``r_t`` of ``query_layers``. Steps
1-7 read each position on its own; what a head needs of the rest of the sequence (the states of the layers
``query_layers`` names, the states and tokens of earlier positions for ``copy_attention``) the models hand
over as a :class:`SequenceContext`, which :meth:`BackwardAttentionHead.context_inputs` turns into per-position
inputs (:class:`CopyInputs`). This is the reference: the models run the same maths through the faster paths of
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

#: ``lambda_init`` of differential score maps (``score_maps="differential"``, see :class:`BackwardAttentionConfig`).
DIFFERENTIAL_LAMBDA_INIT = 0.8


def copied_token_slots(next_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For the tokens ``x_{j+1}`` (``... x S``): whether each ``j`` is the first of its token, and the index of
    that first ``j`` (the slot where step 8 sums the token's ``a_tj``). Integer work over ``S``, no vocabulary."""
    ordered, order = next_ids.sort(dim=-1, stable=True)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
    rank = torch.arange(ordered.shape[-1], device=ordered.device).expand_as(ordered)
    group_start = torch.where(starts, rank, 0).cummax(dim=-1).values  # each sorted j's group's first rank
    slot_sorted = order.gather(-1, group_start)  # the first j (by position: the sort is stable) of that token
    slot = torch.empty_like(order).scatter_(-1, order, slot_sorted)
    first = slot == torch.arange(next_ids.shape[-1], device=next_ids.device)
    return first, slot


class LayerTables(NamedTuple):
    """The weight-only tables of one layer (steps 1-3)."""

    keys: torch.Tensor  # K: V x d_out; with differential score maps [K1 | K2]: V x 2 d_out
    values: torch.Tensor  # Vv: V x d_out
    hidden_to_values: torch.Tensor | None = None  # W^T Vv: d x d_out, for head_kernels' raw-weighting shortcut


class CopyInputs(NamedTuple):
    """Step 8's inputs at each scored position (leading dimensions those of the logits), over the ``S`` positions
    of its sequence: ``log a_tj`` (``-inf`` outside ``J_t``) and the token ``x_{j+1}`` each position ``j`` copies."""

    log_weights: torch.Tensor  # ... x S
    next_ids: torch.Tensor  # ... x S (long); any id where j is never attended


class SequenceContext(NamedTuple):
    """The sequence around the scored positions, as the models hand it to a head (``query_layers``, ``copy_attention``).

    ``S`` positions of ``B`` rows: this call's, preceded while generating with a KV cache by the earlier ones the
    model kept; ``positions`` (``B x T``) are the ones whose logits are wanted, as indices into the ``S``.
    """

    hidden: torch.Tensor  # B x S x d: the base's final hidden states h_j
    layer_states: dict[int, torch.Tensor] | None  # decoder block k -> B x S x d: its outputs y_j^k (before the norm)
    input_ids: torch.Tensor | None  # B x S
    attention_mask: torch.Tensor  # B x S (bool): real tokens
    positions: torch.Tensor  # B x T (long)

    def select_rows(self, rows) -> SequenceContext:
        """The context of some batch rows only (a boolean mask or indices)."""
        states = None if self.layer_states is None else {k: v[rows] for k, v in self.layer_states.items()}
        ids = None if self.input_ids is None else self.input_ids[rows]
        return SequenceContext(self.hidden[rows], states, ids, self.attention_mask[rows], self.positions[rows])


class BackwardAttentionLayer(nn.Module):
    """One backward-attention layer, steps 1-6.

    The parameters carry the names of the config's docstring: ``norm`` is the RMSNorm of step 1,
    ``w_latent`` ``W_l``, ``w_key`` ``W_k``, ``w_value`` ``W_v``, ``w_query`` ``W_q``, ``w_hidden`` ``W_h`` and
    ``head_mix`` the ``c_j`` of the attention sub-heads (``attention_head_combine="mix"``); with differential
    score maps ``w_query2``, ``w_key2``, ``w_hidden2`` are ``W_q2``, ``W_k2``, ``W_h2`` and ``lambda_q1``,
    ``lambda_k1``, ``lambda_q2``, ``lambda_k2`` the vectors of ``lambda``.
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
        differential = config.score_maps == "differential"
        self.w_query2 = nn.Parameter(torch.empty(d_out, d_out)) if differential else None
        self.w_key2 = nn.Parameter(torch.empty(d_latent, d_out)) if differential else None
        self.w_hidden2 = nn.Parameter(torch.empty(d, d_out)) if differential and config.use_hidden_state else None
        head_dim = d_out // config.num_attention_heads
        for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
            setattr(self, name, nn.Parameter(torch.empty(head_dim)) if differential else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Projections as ``nn.Linear`` starts them (uniform in +-1/sqrt(fan_in)); ``W_h`` (and ``W_h2``) at zero;
        ``c_j`` at 1; the lambda vectors from N(0, 0.1^2), as the Differential Transformer's code draws them.

        Uses ``transformers.initialization`` so that weights loaded from a checkpoint are left alone.
        """
        init.ones_(self.norm.weight)
        for weight in (self.w_latent, self.w_key, self.w_value, self.w_query, self.w_query2, self.w_key2):
            if weight is not None:
                bound = 1 / math.sqrt(weight.shape[0])
                init.uniform_(weight, -bound, bound)
        for weight in (self.w_hidden, self.w_hidden2):
            if weight is not None:
                init.zeros_(weight)
        if self.head_mix is not None:
            init.ones_(self.head_mix)
        for vector in (self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2):
            if vector is not None:
                init.normal_(vector, mean=0.0, std=0.1)

    def differential_lambda(self) -> torch.Tensor:
        """``lambda = exp(sum(lambda_q1 * lambda_k1)) - exp(sum(lambda_q2 * lambda_k2)) + lambda_init`` (step 6)."""
        first = torch.exp(torch.sum(self.lambda_q1 * self.lambda_k1))
        return first - torch.exp(torch.sum(self.lambda_q2 * self.lambda_k2)) + DIFFERENTIAL_LAMBDA_INIT

    def tables(self, embeddings: torch.Tensor) -> LayerTables:
        """Steps 1-3 for the embedding table ``E`` (V x d); with differential score maps ``K = [K1 | K2]``."""
        E_n = self.norm(embeddings)  # step 1: V x d
        L = E_n @ self.w_latent if self.w_latent is not None else E_n  # step 2: V x d_latent
        keys = L @ self.w_key  # step 3: V x d_out
        if self.w_key2 is not None:
            keys = torch.cat([keys, L @ self.w_key2], dim=-1)  # V x 2 d_out
        return LayerTables(keys=keys, values=L @ self.w_value)

    def forward(self, logits: torch.Tensor, state: torch.Tensor, tables: LayerTables) -> torch.Tensor:
        """Steps 4-6: the scores ``s_t`` (... x V) for logits ``l_t`` (... x V) and query states ``r_t`` (... x d:
        ``h_t``, or the ``query_layers`` mix)."""
        config = self.config
        K, Vv = tables.keys, tables.values  # V x d_out each (K: V x 2 d_out with differential maps)
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
            q = q + state @ self.w_hidden
        c = self.head_mix if self.head_mix is not None else q.new_ones(h)  # step 6: c_j, one per sub-head

        def score_map(q: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
            q_j, K_j = q.unflatten(-1, (h, -1)), K.unflatten(-1, (h, -1))  # ... x h x d_out/h, V x h x d_out/h
            return torch.einsum("...jd,vjd,j->...v", q_j, K_j, c) / math.sqrt(config.out_dim // h)  # ... x V

        if config.score_maps == "single":
            return score_map(q, K)
        q2 = u @ self.w_query2  # differential: a second map from the same u_t and r_t
        if self.w_hidden2 is not None:
            q2 = q2 + state @ self.w_hidden2
        K1, K2 = K.split(config.out_dim, dim=-1)
        s1, s2 = score_map(q, K1), score_map(q2, K2)
        return (1 - DIFFERENTIAL_LAMBDA_INIT) * (s1 - self.differential_lambda() * s2)


class BackwardAttentionHead(nn.Module):
    """A task head: one or more :class:`BackwardAttentionLayer` and step 7, where the scores meet the logits;
    the query state ``r_t`` and the copy term of step 8.

    ``gate`` holds ``g`` (one per layer when sequential, else one), ``layer_mix`` the learned weights of
    parallel layers. With ``query_layers``, ``query_norm`` is ``RMSNorm_q`` and ``query_mix`` the ``w_a`` of
    ``a = softmax(w_a)``. With ``copy_attention``, ``copy_query`` and ``copy_key`` are ``W_cq``, ``W_ck``,
    ``copy_gate_weight`` and ``copy_gate_bias`` the ``w_g`` and ``b`` of ``lambda_t``, and ``copy_gate`` the ``g_c``
    (``score_mode="gate"`` only).
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
        d, layers = config.hidden_size, config.query_layers
        self.query_norm = nn.RMSNorm(d, eps=config.rms_norm_eps) if layers is not None else None
        self.query_mix = nn.Parameter(torch.empty(len(layers))) if layers is not None else None
        standardize = config.standardize_query_state
        self.register_buffer("query_mean", torch.empty(d) if standardize else None)  # mu: fixed, not trained
        self.register_buffer("query_variance", torch.empty(d) if standardize else None)  # sigma^2
        copying = config.copy_attention
        self.copy_query = nn.Parameter(torch.empty(d, config.out_dim)) if copying else None
        self.copy_key = nn.Parameter(torch.empty(d, config.out_dim)) if copying else None
        self.copy_gate_weight = nn.Parameter(torch.empty(d)) if copying else None
        self.copy_gate_bias = nn.Parameter(torch.empty(1)) if copying else None
        self.copy_gate = nn.Parameter(torch.empty(1)) if copying and config.score_mode == "gate" else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The gates ``g`` and ``g_c`` start at zero (the untrained head gives the base logits); the layer mix at
        1/num_layers; ``w_a`` at zero (a uniform mix of the query layers) and ``RMSNorm_q``'s scale at 1;
        ``W_cq``, ``W_ck`` and ``w_g`` as ``nn.Linear`` starts them, ``b`` at 0 (``lambda_t`` near 1/2)."""
        for gate in (self.gate, self.copy_gate, self.copy_gate_bias, self.query_mix):
            if gate is not None:
                init.zeros_(gate)
        if self.layer_mix is not None:
            init.constant_(self.layer_mix, 1.0 / self.config.num_layers)
        if self.query_norm is not None:
            init.ones_(self.query_norm.weight)
        if self.query_mean is not None:  # the identity until fit_query_standardization sets them
            init.zeros_(self.query_mean)
            init.ones_(self.query_variance)
        for weight in (self.copy_query, self.copy_key, self.copy_gate_weight):
            if weight is not None:
                bound = 1 / math.sqrt(weight.shape[0])
                init.uniform_(weight, -bound, bound)

    def check_base(self, logits: torch.Tensor, embeddings: torch.Tensor) -> None:
        """``ValueError`` unless the logits and the embedding table are those of the base the head was built for."""
        config = self.config
        if logits.shape[-1] != config.vocab_size or embeddings.shape != (config.vocab_size, config.hidden_size):
            raise BackattnValueError(
                f"This head was built for vocab_size={config.vocab_size}, hidden_size={config.hidden_size}, "
                f"but the base gives logits over {logits.shape[-1]} tokens and an embedding table of shape "
                f"{tuple(embeddings.shape)}. Attach it to the base it was built for."
            )

    def check_inputs(self, layer_states: torch.Tensor | None, copy: CopyInputs | None) -> None:
        """``ValueError`` unless the inputs ``query_layers`` and ``copy_attention`` need are given."""
        config = self.config
        if config.query_layers is not None and layer_states is None:
            raise BackattnValueError(
                f"This head's query reads the base's decoder blocks {config.query_layers} (query_layers), but their "
                "states were not given: pass layer_states (... x len(query_layers) x hidden), or run the head "
                "through its model, which takes them from the base."
            )
        if config.copy_attention and copy is None:
            raise BackattnValueError(
                "This head copies tokens from earlier positions (copy_attention), but no copy inputs were given: "
                "pass copy=head.context_inputs(context)[1], or run the head through its model."
            )

    def forward(
        self,
        logits: torch.Tensor,
        hidden: torch.Tensor,
        embeddings: torch.Tensor,
        tables: list[LayerTables] | None = None,
        layer_states: torch.Tensor | None = None,
        copy: CopyInputs | None = None,
    ) -> torch.Tensor:
        """Steps 1-8: the head's logits (... x V) for base logits ``l_t`` (... x V), hidden states ``h_t``
        (... x d) and the embedding table ``E`` (V x d); ``tables`` are steps 1-3 of each layer, precomputed.
        ``layer_states`` (... x len(query_layers) x d: the states ``y_t^k`` of ``query_layers``, in its order)
        and ``copy`` (step 8's :class:`CopyInputs`) are needed when those options are on."""
        self.check_base(logits, embeddings)
        self.check_inputs(layer_states, copy)
        dtype = self.layers[0].w_key.dtype
        logits, hidden = logits.to(dtype), hidden.to(dtype)
        state = self.query_state(hidden, layer_states)  # r_t: ... x d
        if tables is None:
            tables = [layer.tables(embeddings.to(dtype)) for layer in self.layers]  # steps 1-3
        if self.config.layer_mode == "sequential":  # each layer reads the logits the one before produced
            gates = self.gate if self.gate is not None else [None] * len(self.layers)
            for layer, layer_tables, gate in zip(self.layers, tables, gates):
                logits = self.meet(logits, layer(logits, state, layer_tables), gate)  # steps 4-7: ... x V
            z = logits
        else:
            mix = self.layer_mix if self.layer_mix is not None else [1.0]
            s = sum(m * layer(logits, state, t) for m, layer, t in zip(mix, self.layers, tables))  # steps 4-6
            z = self.meet(logits, s, self.gate[0] if self.gate is not None else None)  # step 7: ... x V
        return self.add_copy(z, state, copy) if copy is not None else z  # step 8

    def query_state(self, hidden: torch.Tensor, layer_states: torch.Tensor | None) -> torch.Tensor:
        """``r_t`` (... x d): ``h_t``, or with ``query_layers`` ``sum_k a_k RMSNorm_q(y_t^k)`` for ``layer_states``
        (... x len(query_layers) x d), ``a = softmax(w_a)``; then ``(r_t - mu) / sqrt(sigma^2 + eps)`` with
        ``standardize_query_state``."""
        state = self.unstandardized_query_state(hidden, layer_states)
        if self.query_mean is None:
            return state
        mean, variance = self.query_mean.to(state.dtype), self.query_variance.to(state.dtype)
        return (state - mean) / torch.sqrt(variance + self.config.rms_norm_eps)

    def unstandardized_query_state(self, hidden: torch.Tensor, layer_states: torch.Tensor | None) -> torch.Tensor:
        """``r_t`` before ``standardize_query_state``'s standardisation (what its statistics are taken of)."""
        if self.query_mix is None:
            return hidden
        dtype = self.query_mix.dtype
        a = torch.softmax(self.query_mix, dim=0)  # len(query_layers)
        return torch.einsum("...kd,k->...d", self.query_norm(layer_states.to(dtype)), a)

    @torch.no_grad()
    def set_query_standardization(self, states: torch.Tensor) -> None:
        """``mu`` and ``sigma^2`` of ``standardize_query_state``: the per-dimension mean and (biased) variance of
        ``states`` (N x d, unstandardised query states ``r_t``), computed in float64."""
        if self.query_mean is None:
            raise BackattnValueError("This head does not standardise its query state (standardize_query_state=False).")
        states = states.reshape(-1, states.shape[-1]).double()
        if states.shape[0] < 2 or not torch.isfinite(states).all():
            raise BackattnValueError(
                f"The query standardisation needs at least 2 finite states, got {states.shape[0]} "
                f"({int((~torch.isfinite(states)).sum())} non-finite values): give rows with labelled positions."
            )
        self.query_mean.copy_(states.mean(0))
        self.query_variance.copy_(states.var(0, unbiased=False))

    def meet(self, logits: torch.Tensor, scores: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        """Step 7: ``l_t + dropout(s_t)``, ``l_t + g * dropout(s_t)`` or ``dropout(s_t)`` (by ``score_mode``)."""
        scores = F.dropout(scores, self.config.dropout, self.training)
        if self.config.score_mode == "replace":
            return scores
        return logits + (gate * scores if self.config.score_mode == "gate" else scores)

    # ----------------------------------------------------------------------------------------------------
    # the sequence around each position: query_layers' states and step 8's copy attention

    def context_inputs(self, context: SequenceContext) -> tuple[torch.Tensor | None, CopyInputs | None]:
        """``layer_states`` and ``copy`` of :meth:`forward` for the positions ``context.positions`` (B x T): the
        ``query_layers`` states there (B x T x len(query_layers) x d), and step 8's attention of each over the
        context's ``S`` positions (``CopyInputs`` of B x T x S); ``None`` for an option that is off."""
        config, dtype = self.config, self.layers[0].w_key.dtype
        positions = context.positions

        def at_positions(values: torch.Tensor) -> torch.Tensor:  # B x S x ... -> B x T x ...
            rows = torch.arange(values.shape[0], device=values.device)[:, None]
            return values[rows, positions.to(values.device)]

        stacked = layer_states = copy = None
        if config.query_layers is not None:
            missing = [k for k in config.query_layers if k not in (context.layer_states or {})]
            if missing:
                raise BackattnValueError(
                    f"This head reads the base's decoder blocks {config.query_layers} (query_layers), but the "
                    f"states of block(s) {missing} were not given: pass base_layer_states with every block the "
                    "head names (a feature cache built for this head holds them), or let the base run."
                )
            stacked = torch.stack([context.layer_states[k].to(dtype) for k in config.query_layers], dim=-2)
            layer_states = at_positions(stacked)  # B x T x n x d
        if config.copy_attention:
            if context.input_ids is None:
                raise BackattnValueError(
                    "This head copies tokens from earlier positions (copy_attention), which needs input_ids: "
                    "pass the token ids (inputs_embeds alone does not say which token each position holds)."
                )
            states = self.query_state(context.hidden.to(dtype), stacked)  # r_j: B x S x d
            log_weights = self.copy_log_weights(states, context.attention_mask, positions)  # B x T x S
            next_ids = F.pad(context.input_ids[:, 1:], (0, 1), value=0)  # x_{j+1}; the last is never attended
            copy = CopyInputs(log_weights, next_ids[:, None, :].expand_as(log_weights))
        return layer_states, copy

    def copy_log_weights(self, states: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor):
        """Step 8's ``log a_tj`` (B x T x S) of the positions ``positions`` (B x T) over the states ``r_j`` (B x S x d),
        ``-inf`` outside ``J_t = {j < t : attention_mask_j}`` (a row whose ``J_t`` is empty is all ``-inf``)."""
        rows = torch.arange(states.shape[0], device=states.device)[:, None]
        positions = positions.to(states.device)
        queries = states[rows, positions] @ self.copy_query  # B x T x d_out
        keys = states @ self.copy_key  # B x S x d_out
        scores = queries @ keys.transpose(-1, -2) / math.sqrt(self.config.out_dim)  # B x T x S
        earlier = torch.arange(states.shape[1], device=states.device) < positions[..., None]  # j < t
        attended = earlier & attention_mask.to(device=states.device, dtype=torch.bool)[:, None, :]
        scores = scores.masked_fill(~attended, -math.inf)
        scores = torch.where(attended.any(-1, keepdim=True), scores, 0.0)  # no softmax over nothing (no NaN)
        return torch.log_softmax(scores, dim=-1).masked_fill(~attended, -math.inf)

    def add_copy(self, z: torch.Tensor, state: torch.Tensor, copy: CopyInputs) -> torch.Tensor:
        """Step 8: ``z_t + g_c log(1 - lambda_t + lambda_t c_t / softmax(z_t))`` (0 where ``J_t`` is empty).

        ``c_t`` is 0 outside the ``S`` tokens ``x_{j+1}``, where the term is the constant ``log(1 - lambda_t)``; so
        the term is that constant everywhere plus, at each distinct copied token ``w``, ``logaddexp(log(1 -
        lambda_t), log lambda_t + log c_t[w] - log_softmax(z_t)[w]) - log(1 - lambda_t)``: ``S`` values a
        position instead of ``V``, and ``log_softmax(z_t)[w] = z_t[w] - logsumexp(z_t)`` needs one reduction."""
        log_weights, next_ids = copy.log_weights.to(z.dtype), copy.next_ids.to(z.device)
        first, slot = copied_token_slots(next_ids)  # the first j of each token, and each j's token's first j
        weights = log_weights.exp()  # a_tj, 0 outside J_t
        c = torch.zeros_like(weights).scatter_add(-1, slot, weights).gather(-1, slot)  # c_t[x_{j+1}]: ... x S
        present = first & (c > 0)
        log_c = torch.log(torch.where(present, c, 1.0))  # no log(0) in backward
        gate_logit = (state @ self.copy_gate_weight + self.copy_gate_bias)[..., None]  # ... x 1
        log_keep = F.logsigmoid(-gate_logit)  # log(1 - lambda_t)
        log_p = z.gather(-1, next_ids) - torch.logsumexp(z, dim=-1, keepdim=True)  # log_softmax(z_t)[x_{j+1}]
        raised = torch.logaddexp(log_keep, F.logsigmoid(gate_logit) + log_c - log_p) - log_keep
        raised = torch.where(present, raised, 0.0)  # ... x S: once per distinct token, 0 where c_t is 0
        attended = torch.isfinite(log_weights).any(-1, keepdim=True)  # J_t empty: no copy term at all
        log_keep = torch.where(attended, log_keep, 0.0)
        if self.copy_gate is not None:
            log_keep, raised = self.copy_gate * log_keep, self.copy_gate * raised
        return (z + log_keep).scatter_add(-1, next_ids, raised)


__all__ = [
    "DIFFERENTIAL_LAMBDA_INIT",
    "BackwardAttentionHead",
    "BackwardAttentionLayer",
    "CopyInputs",
    "LayerTables",
    "SequenceContext",
]


def __getattr__(name: str):
    """backattn 0.1.0 kept the model families here; they live in ``modeling_families.py`` now."""
    if name in ("FAMILIES", "family_for", "GPT2BackwardAttentionForCausalLM", "LlamaBackwardAttentionForCausalLM"):
        from . import modeling_families

        return getattr(modeling_families, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
