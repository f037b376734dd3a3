"""The head's fast paths, behind one dispatch: :func:`select_kernel`.

``BackwardAttentionHead.forward`` (``modeling_backattn.py``) is the reference. The models call
:func:`head_logits`, which asks :func:`select_kernel` how to serve the call and runs that. Every path gives
the reference's result (``tests/test_head_kernels.py`` checks each with an open gate and random weights):

* ``tables_cache``: ``K``, ``Vv`` (and ``W^T Vv``) depend on weights alone; when no gradient is wanted they
  are computed once and reused while neither the head's weights, ``E`` nor ``W`` change (as seen through
  the tensors' version counters, which every in-place update such as an optimiser step increments);
* ``raw_shortcut``: with raw weighting, logits made as ``l_t = h_t W^T`` and no dropout,
  ``u_t = l_t Vv = h_t (W^T Vv)``: a ``d x d_out`` table instead of a vocabulary-sized product;
* ``fused_gate``: step 7 as one ``addmm``, ``l_t + (g q_t) K^T``, with each attention sub-head's
  ``c_j / sqrt(d_out / h)`` folded into ``q_t`` (and parallel layers' ``sum_m mix_m q_m K_m^T`` as one
  product of the concatenated ``[mix_m q_m]`` and ``[K_m]``): no vocabulary-sized temporaries;
* ``top_k`` (``rerank_top_k=k``): steps 5-7 over the base's ``k`` most likely tokens only, their softmax
  weights keeping the full-vocabulary normaliser; the other logits stay the base's. An approximation,
  equal to the reference for ``k >= V``;
* ``vocab_slices`` (``vocab_chunk_size``): steps 1-3 and 5-7 slice by slice over the vocabulary, each
  slice recomputed in the backward pass (``torch.utils.checkpoint``) instead of stored.

Every path honours the options ``query_layers``, ``score_maps`` and ``copy_attention``, so none of them sends
a call to the plain forward: the query state ``r_t`` is made once and feeds each path's ``r_t W_h``; with
differential score maps the tables' keys are ``[K1 | K2]`` and the query ``(1 - lambda_init) [q1 | -lambda q2]``
(each with its sub-heads' ``c_j / sqrt(d_out / h)``), so the one product ``q K^T`` of every path is
``(1 - lambda_init) (s1 - lambda s2)``; and step 8's copy term is added to whatever logits the path made, over
the whole vocabulary (with ``top_k`` too: the re-ranking approximates steps 5-7, the copy term may still raise
a token outside the top ``k``, which is what copying is for).

The chunked training loss (``head_loss.py``) runs :func:`head_logits` on chunks of positions.
"""

from __future__ import annotations

import math
import weakref
from typing import Literal, NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

from .errors import BackattnValueError
from .modeling_backattn import (
    DIFFERENTIAL_LAMBDA_INIT,
    BackwardAttentionHead,
    BackwardAttentionLayer,
    CopyInputs,
    LayerTables,
)


class Kernel(NamedTuple):
    """How one call of the head runs, as :func:`select_kernel` chose it."""

    steps: Literal["plain", "full_vocab", "top_k", "vocab_slices"]  # steps 4-7; "plain": the head's forward
    raw_shortcut: bool  # u_t = h_t (W^T Vv)
    fused_gate: bool  # step 7 as one addmm
    tables_cache: bool  # K, Vv from the cache

    @property
    def paths(self) -> set[str]:
        """The names of the fast paths this call takes (empty for the plain forward alone)."""
        named = {"raw_shortcut": self.raw_shortcut, "fused_gate": self.fused_gate, "tables_cache": self.tables_cache}
        return {name for name, used in named.items() if used} | ({self.steps} - {"plain", "full_vocab"})


def select_kernel(
    head: BackwardAttentionHead,
    embeddings: torch.Tensor,
    output_weight: torch.Tensor | None = None,
    rerank_top_k: int | None = None,
    tables_given: bool = False,
) -> Kernel:
    """The one dispatch: which fast paths serve this call (see the module docstring)."""
    config = head.config
    dropout = head.training and config.dropout > 0
    steps = "top_k" if rerank_top_k else "vocab_slices" if config.vocab_chunk_size else "full_vocab"
    raw_shortcut = config.logit_weighting == "raw" and output_weight is not None and not dropout and steps != "top_k"
    fused_gate = config.score_mode != "replace" and not dropout
    inputs = (embeddings, *(() if output_weight is None else (output_weight,)), *head.parameters())
    tables_cache = not tables_given and not (torch.is_grad_enabled() and any(t.requires_grad for t in inputs))
    tables_cache = tables_cache and not torch.compiler.is_compiling()  # the cache's keys are not traceable
    if steps == "full_vocab" and not (raw_shortcut or fused_gate):
        steps = "plain"
    return Kernel(steps, raw_shortcut, fused_gate, tables_cache)


def head_logits(
    head: BackwardAttentionHead,
    logits: torch.Tensor,
    hidden: torch.Tensor,
    embeddings: torch.Tensor,
    output_weight: torch.Tensor | None = None,
    rerank_top_k: int | None = None,
    tables: list[LayerTables] | None = None,
    layer_states: torch.Tensor | None = None,
    copy: CopyInputs | None = None,
    shared: dict | None = None,
) -> torch.Tensor:
    """``head(logits, hidden, embeddings, layer_states=..., copy=...)``, through the paths :func:`select_kernel` picks.

    ``output_weight`` is the base's output layer ``W`` when ``logits`` were made as ``h_t W^T`` (no bias);
    ``rerank_top_k`` re-ranks only the base's ``k`` most likely tokens per position (0 or ``None``: off);
    ``tables`` are :func:`weight_tables` computed beforehand (the chunked loss computes them once);
    ``layer_states`` and ``copy`` are what ``query_layers`` and ``copy_attention`` need (see the head's forward).
    ``shared`` (a dict, empty at first) lets several heads scoring the same ``logits`` compute once what depends
    on the base's logits alone: step 4's ``softmax(l_t / rms(l_t))`` (full_vocab), its top-k candidates and
    normaliser (top_k); it must not outlive those ``logits`` (the heads container's ``fan_out`` makes one per call).
    """
    head.check_base(logits, embeddings)
    head.check_inputs(layer_states, copy)
    kernel = select_kernel(head, embeddings, output_weight, rerank_top_k, tables is not None)
    if tables is None:
        tables = weight_tables(head, embeddings, output_weight if kernel.raw_shortcut else None, kernel.tables_cache)
    if kernel.steps == "plain":
        return head(logits, hidden, embeddings, tables=tables, layer_states=layer_states, copy=copy)
    dtype = head.layers[0].w_key.dtype
    logits, hidden = logits.to(dtype), hidden.to(dtype)
    base = logits  # what `shared` may hold results of (a sequential head's later layers read other logits)
    state = head.query_state(hidden, layer_states)  # r_t
    candidates = _top_k_candidates(head, logits, rerank_top_k, shared) if kernel.steps == "top_k" else None
    gates = head.gate if head.gate is not None else [None] * len(head.layers)

    def query(layer: BackwardAttentionLayer, z: torch.Tensor, layer_tables: LayerTables) -> torch.Tensor:
        if kernel.raw_shortcut and layer_tables.hidden_to_values is not None:
            u = hidden @ layer_tables.hidden_to_values  # raw_shortcut: ... x d_out (l_t = h_t W^T, the final h_t)
        else:
            memo = shared if z is base else None
            u = WEIGHTED_VALUES[kernel.steps](layer, z, layer_tables.values, candidates, memo)
        return _scaled_query(layer, u, state, z.shape[-1])

    if head.config.layer_mode == "sequential":
        for layer, layer_tables, gate in zip(head.layers, tables, gates):
            q = query(layer, logits, layer_tables)
            logits = MEET[kernel.steps](head, kernel, logits, q, layer_tables.keys, gate, candidates)
        z = logits
    else:
        queries = [query(layer, logits, layer_tables) for layer, layer_tables in zip(head.layers, tables)]
        if head.layer_mix is not None:
            queries = [mix * q for mix, q in zip(head.layer_mix, queries)]
        keys = torch.cat([layer_tables.keys for layer_tables in tables], dim=-1)
        z = MEET[kernel.steps](head, kernel, logits, torch.cat(queries, dim=-1), keys, gates[0], candidates)
    return head.add_copy(z, state, copy) if copy is not None else z  # step 8, over the whole vocabulary


# --------------------------------------------------------------------------------------------------------
# steps 1-3: the tables, cached when no gradient is wanted

_TABLES_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def weight_tables(
    head: BackwardAttentionHead,
    embeddings: torch.Tensor,
    output_weight: torch.Tensor | None = None,
    cache: bool = False,
) -> list[LayerTables]:
    """Each layer's :class:`LayerTables` in the head's dtype, slice by slice when ``vocab_chunk_size`` is set;
    ``W^T Vv`` where raw weighting reads the logits ``h_t W^T`` (every parallel layer, the first sequential one)
    and ``output_weight`` is given. ``cache``: reuse them for as long as the head's weights, ``E`` and ``W`` stay
    (the key is taken from the tensors as given, before any cast)."""
    dtype = head.layers[0].w_key.dtype
    sequential = head.config.layer_mode == "sequential"

    def compute() -> list[LayerTables]:
        weight = output_weight.to(dtype) if output_weight is not None else None
        table_embeddings, out = embeddings.to(dtype), []
        for index, layer in enumerate(head.layers):
            layer_tables = _layer_tables(layer, table_embeddings)
            if weight is not None and layer.config.logit_weighting == "raw" and (index == 0 or not sequential):
                layer_tables = layer_tables._replace(hidden_to_values=weight.T @ layer_tables.values)
            out.append(layer_tables)
        return out

    if not cache:
        _TABLES_CACHE.pop(head, None)
        return compute()
    inputs = (embeddings, output_weight) if output_weight is not None else (embeddings,)
    key = (
        torch.is_inference_mode_enabled(),
        dtype,
        embeddings.device,
        # each tensor's dtype and device too: a base cast (model.to(torch.bfloat16)) or moved makes new tensors,
        # whose freed storage a later tensor may reuse at the same address and version
        tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in (*inputs, *head.parameters())),
    )
    if head not in _TABLES_CACHE or _TABLES_CACHE[head][0] != key:
        _TABLES_CACHE[head] = (key, compute())
    return _TABLES_CACHE[head][1]


def _layer_tables(layer: BackwardAttentionLayer, embeddings: torch.Tensor) -> LayerTables:
    """``layer.tables(E)``; with ``vocab_chunk_size``, slice by slice of ``E``'s rows (vocab_slices)."""
    slices = _vocab_slices(embeddings.shape[0], layer.config.vocab_chunk_size)
    if len(slices) == 1:
        return layer.tables(embeddings)
    parts = [_checkpointed(layer.tables, embeddings[rows]) for rows in slices]
    return LayerTables(torch.cat([part.keys for part in parts]), torch.cat([part.values for part in parts]))


# --------------------------------------------------------------------------------------------------------
# steps 4-5: u_t = p_t Vv, three ways (the raw shortcut is in head_logits)


def _full_vocab_values(layer, logits, values, candidates=None, shared=None) -> torch.Tensor:
    """``p_t Vv`` with one fused softmax over the whole vocabulary (full_vocab)."""
    if layer.config.logit_weighting == "raw":
        return _dropout(layer, logits) @ values
    eps = layer.config.rms_norm_eps
    softmax = lambda: torch.softmax(logits * _inverse_rms(logits, [slice(None)], eps), -1)  # noqa: E731
    weights = _memo(shared, ("softmax", eps, logits.dtype), softmax)
    return _dropout(layer, weights) @ values


def _top_k_values(layer, logits, values, candidates, shared=None) -> torch.Tensor:
    """``sum_i p_t[i] Vv[i]`` over the candidates only (top_k); softmax weights keep their full normaliser."""
    chosen = logits.gather(-1, candidates)  # ... x k
    if layer.config.logit_weighting == "softmax":
        eps = layer.config.rms_norm_eps
        statistics = ("softmax_statistics", eps, logits.dtype)
        inv_rms, log_normaliser = _memo(shared, statistics, lambda: _softmax_statistics(logits, [slice(None)], eps))
        chosen = torch.exp(chosen * inv_rms - log_normaliser)
    return torch.einsum("...k,...kd->...d", _dropout(layer, chosen), values[candidates])


def _sliced_values(layer, logits, values, candidates=None, shared=None) -> torch.Tensor:
    """``p_t Vv`` summed over vocabulary slices (vocab_slices); the softmax normaliser is the whole vocabulary's.
    Nothing is shared between heads here: slicing trades compute for memory, and a kept result would undo that."""
    slices = _vocab_slices(logits.shape[-1], layer.config.vocab_chunk_size)
    if layer.config.logit_weighting == "raw":

        def weighted_values(z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return _dropout(layer, z) @ v

    else:
        inv_rms, log_normaliser = _softmax_statistics(logits, slices, layer.config.rms_norm_eps)

        def weighted_values(z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return _dropout(layer, torch.exp(z * inv_rms - log_normaliser)) @ v

    return sum(_checkpointed(weighted_values, logits[..., rows], values[rows]) for rows in slices)


WEIGHTED_VALUES = {"full_vocab": _full_vocab_values, "top_k": _top_k_values, "vocab_slices": _sliced_values}


def _scaled_query(layer: BackwardAttentionLayer, u: torch.Tensor, state: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Step 5's ``q_t = u_t W_q (+ r_t W_h)``, each sub-head slice ``j`` times ``c_j / sqrt(d_out / h)``, so that
    step 6's sum over the attention sub-heads is the one product ``s_t = q_t K^T``; with differential score maps
    ``(1 - lambda_init) [q1 | -lambda q2]`` against the tables' ``[K1 | K2]``."""
    config = layer.config
    u = u / vocab_size if config.divide_by_vocab else u
    head_dim = config.out_dim // config.num_attention_heads
    c = layer.head_mix if layer.head_mix is not None else u.new_ones(config.num_attention_heads)
    scale = (c / math.sqrt(head_dim)).repeat_interleave(head_dim)

    def projected(w_query: torch.Tensor, w_hidden: torch.Tensor | None) -> torch.Tensor:
        q = u @ w_query
        return (q if w_hidden is None else q + state @ w_hidden) * scale

    q = projected(layer.w_query, layer.w_hidden)
    if config.score_maps == "single":
        return q
    q2 = projected(layer.w_query2, layer.w_hidden2)
    return (1 - DIFFERENTIAL_LAMBDA_INIT) * torch.cat([q, -layer.differential_lambda() * q2], dim=-1)


# --------------------------------------------------------------------------------------------------------
# steps 6-7: s_t = q_t K^T meets l_t, three ways


def _meet_full_vocab(head, kernel, logits, query, keys, gate, candidates=None) -> torch.Tensor:
    """Step 7 over the whole vocabulary: one fused ``addmm`` (fused_gate), else the head's own ``meet``."""
    if not kernel.fused_gate:
        return head.meet(logits, query @ keys.T, gate)
    scaled = query if gate is None else gate * query  # l + g (q K^T) = l + (g q) K^T
    flat = torch.addmm(logits.reshape(-1, logits.shape[-1]), scaled.reshape(-1, scaled.shape[-1]), keys.T)
    return flat.view(logits.shape)


def _meet_top_k(head, kernel, logits, query, keys, gate, candidates) -> torch.Tensor:
    """Step 7 on the candidates only (top_k); every other logit stays the base's."""
    scores = torch.einsum("...d,...kd->...k", query, keys[candidates])
    return logits.scatter(-1, candidates, head.meet(logits.gather(-1, candidates), scores, gate))


def _meet_sliced(head, kernel, logits, query, keys, gate, candidates=None) -> torch.Tensor:
    """Step 7 slice by slice of the vocabulary (vocab_slices), each slice recomputed in the backward pass."""
    slices = _vocab_slices(logits.shape[-1], head.config.vocab_chunk_size)
    if len(slices) == 1:
        return _meet_full_vocab(head, kernel, logits, query, keys, gate)
    out = torch.empty_like(logits)
    for rows in slices:
        out[..., rows] = _checkpointed(
            lambda z, k: _meet_full_vocab(head, kernel, z, query, k, gate), logits[..., rows], keys[rows]
        )
    return out


MEET = {"full_vocab": _meet_full_vocab, "top_k": _meet_top_k, "vocab_slices": _meet_sliced}


# --------------------------------------------------------------------------------------------------------
# helpers


def _top_k_candidates(head: BackwardAttentionHead, logits: torch.Tensor, k: int, shared=None) -> torch.Tensor:
    """The ids of the base's ``k`` most likely tokens per position (... x k), once per ``shared``."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise BackattnValueError(f"rerank_top_k must be a positive integer (or 0 / None: off), got {k!r}.")
    if head.config.score_mode == "replace":
        raise BackattnValueError(
            "rerank_top_k re-ranks the base's top tokens and keeps the other logits, which needs "
            "score_mode 'add' or 'gate'; this head replaces the logits (score_mode='replace')."
        )
    return _memo(
        shared, ("top_k", k, logits.dtype), lambda: logits.topk(min(k, logits.shape[-1]), -1, sorted=False).indices
    )


def _vocab_slices(vocab_size: int, chunk_size: int | None) -> list[slice]:
    """The vocabulary rows in slices of ``chunk_size`` (one slice for all of it when ``None``)."""
    step = chunk_size or vocab_size
    return [slice(start, min(start + step, vocab_size)) for start in range(0, vocab_size, step)]


def _memo(shared: dict | None, key: tuple, compute):
    """``compute()``, once per ``key`` in ``shared`` (every call when ``shared`` is ``None``)."""
    if shared is None:
        return compute()
    if key not in shared:
        shared[key] = compute()
    return shared[key]


def _checkpointed(fn, *args):
    """``fn(*args)``, recomputed in the backward pass instead of stored when gradients are on."""
    return checkpoint(fn, *args, use_reentrant=False) if torch.is_grad_enabled() else fn(*args)


def _dropout(layer: BackwardAttentionLayer, weights: torch.Tensor) -> torch.Tensor:
    p = layer.config.dropout
    return torch.nn.functional.dropout(weights, p, True) if p and layer.training else weights


def _inverse_rms(logits: torch.Tensor, slices: list[slice], eps: float) -> torch.Tensor:
    """``1 / rms(l_t)`` over the last dimension, its sum of squares accumulated slice by slice."""
    sum_of_squares = sum(torch.linalg.vector_norm(logits[..., rows], dim=-1, keepdim=True).square() for rows in slices)
    return torch.rsqrt(sum_of_squares / logits.shape[-1] + eps)


def _softmax_statistics(logits: torch.Tensor, slices: list[slice], eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``1 / rms(l_t)`` and ``log sum_i exp(l_t[i] / rms(l_t))``, slice by slice:
    ``softmax(l / rms(l))[i] = exp(l[i] / rms(l) - log_normaliser)``."""
    inv_rms = _inverse_rms(logits, slices, eps)

    def log_normaliser(z: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(z * inv_rms, -1, keepdim=True)

    if len(slices) == 1:
        return inv_rms, log_normaliser(logits)
    parts = [_checkpointed(log_normaliser, logits[..., rows]) for rows in slices]
    return inv_rms, torch.logsumexp(torch.cat(parts, -1), -1, keepdim=True)


__all__ = ["Kernel", "head_logits", "select_kernel", "weight_tables"]
