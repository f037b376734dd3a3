"""The backward-attention head and the causal-LM families that carry it on a frozen base model.

Read top to bottom: :class:`BackwardAttentionLayer` (one layer of DESIGN.md section 2, steps 1-6),
:class:`BackwardAttentionHead` (layers combined, step 7, and the cache of weight-only tables), then
:class:`BackwardAttentionForCausalLMMixin` (the forward pass shared by every base family) and the two
families, GPT-2 and Llama.

This module imports only torch, transformers and its siblings (relatively: ``configuration_backattn``,
``head_files``, ``head_loss``), so a saved checkpoint loads with ``trust_remote_code=True`` where
``backattn`` is not installed.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import os
import re
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GPT2LMHeadModel, LlamaForCausalLM
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils import logging as transformers_logging
from transformers.utils.generic import can_return_tuple

from .configuration_backattn import BackwardAttentionConfig, GPT2BackwardAttentionConfig, LlamaBackwardAttentionConfig
from .head_files import embedding_fingerprint, head_options, read_head, render_model_card, resolve_head_directory, write_head
from .head_loss import head_cross_entropy


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
        self,
        logits: torch.Tensor,
        hidden: torch.Tensor,
        values: torch.Tensor,
        run: Callable,
        training: bool,
        logits_to_values: torch.Tensor | None = None,
        candidates: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Steps 4-5 and the per-head scale of step 6: the query ``q_t``, scaled so that ``s_t = q_t K^T``.

        Summing the per-head dot products ``c_j q^j (K^j)^T / sqrt(out_dim / num_heads)`` equals one dot
        product of the whole vectors once each slice ``j`` of ``q`` is multiplied by ``c_j / sqrt(...)``.

        ``logits_to_values`` is ``W^T Vv`` (``d x out_dim``) for logits made as ``l_t = h_t W^T``: with raw
        weighting and no dropout, ``u_t = l_t Vv = h_t (W^T Vv)`` exactly, without a vocabulary-sized product.
        ``candidates`` (top-k token ids per position) restricts the sum of step 5 to those tokens; their
        softmax weights keep the full-vocabulary normaliser.
        """
        config = self.config
        vocab_size = logits.shape[-1]
        p = config.dropout if training else 0.0
        raw = config.logit_weighting == "raw"

        if raw and logits_to_values is not None and p == 0.0 and candidates is None:
            u = hidden @ logits_to_values
        elif candidates is not None:
            chosen = logits.gather(-1, candidates)
            if not raw:
                inv_rms, log_normaliser = _softmax_statistics(logits, None, config.rms_norm_eps, run)
                chosen = torch.exp(chosen * inv_rms - log_normaliser)
            u = torch.einsum("...k,...kd->...d", F.dropout(chosen, p, training), values[candidates])
        elif not raw and config.vocab_chunk_size is None:  # one fused softmax over the whole vocabulary
            weights = torch.softmax(logits * _inverse_rms(logits, [slice(None)], config.rms_norm_eps), dim=-1)
            u = (F.dropout(weights, p, training) if p else weights) @ values
        else:
            slices = _vocab_slices(vocab_size, config.vocab_chunk_size)
            if raw:

                def weighted_values(z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                    return F.dropout(z, p, training) @ v

            else:
                inv_rms, log_normaliser = _softmax_statistics(logits, config.vocab_chunk_size, config.rms_norm_eps, run)

                def weighted_values(z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                    return F.dropout(torch.exp(z * inv_rms - log_normaliser), p, training) @ v

            u = sum(run(weighted_values, logits[..., rows], values[rows]) for rows in slices)
        if config.divide_by_vocab:
            u = u / vocab_size
        q = u @ self.w_query
        if self.w_hidden is not None:
            q = q + hidden @ self.w_hidden

        head_dim = config.out_dim // config.num_heads
        head_scale = (self.head_mix if self.head_mix is not None else q.new_ones(config.num_heads)) / math.sqrt(head_dim)
        return q * head_scale.repeat_interleave(head_dim)


def _inverse_rms(logits: torch.Tensor, slices: list[slice], eps: float) -> torch.Tensor:
    """``1 / rms(l_t)`` over the last dimension, its sum of squares accumulated slice by slice."""
    sum_of_squares = sum(torch.linalg.vector_norm(logits[..., rows], dim=-1, keepdim=True).square() for rows in slices)
    return torch.rsqrt(sum_of_squares / logits.shape[-1] + eps)


def _softmax_statistics(
    logits: torch.Tensor, chunk_size: int | None, eps: float, run: Callable
) -> tuple[torch.Tensor, torch.Tensor]:
    """``1 / rms(l_t)`` and ``log sum_i exp(l_t[i] / rms(l_t))`` over the whole vocabulary, slice by slice.

    ``softmax(l / rms(l))[i] = exp(l[i] / rms(l) - log_normaliser)``.
    """
    slices = _vocab_slices(logits.shape[-1], chunk_size)
    inv_rms = _inverse_rms(logits, slices, eps)
    parts = [run(lambda z: torch.logsumexp(z * inv_rms, -1, keepdim=True), logits[..., rows]) for rows in slices]
    return inv_rms, torch.logsumexp(torch.cat(parts, -1), -1, keepdim=True)


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

    def forward(
        self,
        logits: torch.Tensor,
        hidden: torch.Tensor,
        embeddings: torch.Tensor,
        output_weight: torch.Tensor | None = None,
        rerank_top_k: int | None = None,
        tables: list[tuple] | None = None,
    ) -> torch.Tensor:
        """The head's logits for the base logits ``l_t``, hidden states ``h_t`` and embedding table ``E``.

        ``output_weight`` is the base's output layer ``W`` when ``logits`` were made as ``h_t W^T`` (no bias):
        raw weighting then builds its query from ``h_t (W^T Vv)`` with no vocabulary-sized product.
        ``rerank_top_k`` re-ranks only the base's ``k`` most likely tokens at each position (the other logits
        are returned unchanged): steps 5-7 cost ``O(k x out_dim)`` instead of ``O(V x out_dim)``, while the
        softmax weights of step 4 keep their full-vocabulary normaliser.
        ``tables`` are precomputed ``tables(...)`` (the training loss computes them once for all chunks).
        """
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
        if tables is None:
            tables = self.tables(embeddings, run, output_weight)
        candidates = None
        if rerank_top_k:
            if isinstance(rerank_top_k, bool) or not isinstance(rerank_top_k, int) or rerank_top_k < 0:
                raise ValueError(f"rerank_top_k must be a positive integer (or 0 / None: off), got {rerank_top_k!r}.")
            if config.score_mode == "replace":
                raise ValueError(
                    "rerank_top_k re-ranks the base's top tokens and keeps the other logits, which needs "
                    "score_mode 'add' or 'gate'; this head replaces the logits (score_mode='replace')."
                )
            candidates = logits.topk(min(rerank_top_k, config.vocab_size), dim=-1, sorted=False).indices

        if config.layer_mode == "sequential":
            # Only the first layer reads logits h_t W^T; later layers read the logits the one before produced.
            for index, (layer, (keys, values, logits_to_values)) in enumerate(zip(self.layers, tables)):
                shortcut = logits_to_values if index == 0 else None
                query = layer.query(logits, hidden, values, run, self.training, shortcut, candidates)
                logits = self._merge(logits, query, keys, index, run, candidates)
            return logits

        # Parallel layers: sum_j m_j q_j K_j^T is one dot product of the concatenated [m_j q_j] and [K_j].
        queries = [
            layer.query(logits, hidden, values, run, self.training, logits_to_values, candidates)
            for layer, (_, values, logits_to_values) in zip(self.layers, tables)
        ]
        if self.layer_mix is not None:
            queries = [mix * query for mix, query in zip(self.layer_mix, queries)]
        keys = torch.cat([keys for keys, _, _ in tables], dim=-1)
        return self._merge(logits, torch.cat(queries, dim=-1), keys, 0, run, candidates)

    def _merge(
        self,
        logits: torch.Tensor,
        query: torch.Tensor,
        keys: torch.Tensor,
        index: int,
        run: Callable,
        candidates: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Step 7, slice by slice over the vocabulary (or on the candidates only): ``s = q K^T`` meets the logits."""
        mode, p, training = self.config.score_mode, self.config.dropout, self.training
        gate = self.gate[index] if self.gate is not None else None

        def merged(z: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            scores = F.dropout(scores, p, training)
            if mode == "replace":
                return scores
            return z + (gate * scores if mode == "gate" else scores)

        def one_slice(z: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            if mode == "replace" or (p and training):
                return merged(z, query @ k.T)
            # z + g (q K^T) = z + (g q) K^T, in one fused multiply-add: no vocabulary-sized temporaries.
            scaled = query if gate is None else gate * query
            flat = torch.addmm(z.reshape(-1, z.shape[-1]), scaled.reshape(-1, scaled.shape[-1]), k.T)
            return flat.view(z.shape)

        if candidates is not None:
            scores = torch.einsum("...d,...kd->...k", query, keys[candidates])
            return logits.scatter(-1, candidates, merged(logits.gather(-1, candidates), scores))
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

    def tables(
        self, embeddings: torch.Tensor, run: Callable | None = None, output_weight: torch.Tensor | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """``(K, Vv, W^T Vv)`` of every layer, in the head's dtype (``W^T Vv`` only where raw weighting reads
        the logits ``h_t W^T``: every parallel layer, the first sequential one).

        They depend on weights alone, so without gradients they are cached and reused for as long as
        neither the head's weights, ``E`` nor ``W`` change (the key is taken from the tensors as given,
        before any cast to the head's dtype).
        """
        run = run or self._runner()
        dtype = self.layers[0].w_key.dtype
        sequential = self.config.layer_mode == "sequential"

        def compute() -> list[tuple]:
            out, weight = [], output_weight.to(dtype) if output_weight is not None else None
            table_embeddings = embeddings.to(dtype)
            for index, layer in enumerate(self.layers):
                keys, values = layer.tables(table_embeddings, run)
                reads_base_logits = index == 0 or not sequential
                raw = layer.config.logit_weighting == "raw" and weight is not None and reads_base_logits
                out.append((keys, values, weight.T @ values if raw else None))
            return out

        inputs = (embeddings, output_weight) if output_weight is not None else (embeddings,)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (*inputs, *self.parameters())):
            self._tables_cache = None
            return compute()
        key = (
            torch.is_inference_mode_enabled(),
            dtype,
            embeddings.device,
            tuple((t.data_ptr(), t._version) for t in (*inputs, *self.parameters())),
        )
        if self._tables_cache is None or self._tables_cache[0] != key:
            self._tables_cache = (key, compute())
        return self._tables_cache[1]


class BackwardAttentionForCausalLMMixin:
    """What every base family shares: named task heads on a frozen base, the head API, and ``forward``.

    Put it first in the bases, before the family's ``...ForCausalLM`` class, which provides
    ``self.base_model`` (the decoder), ``self.lm_head`` and ``get_input_embeddings()``.

    The heads live in ``self.heads`` (an ``nn.ModuleDict``) and their options in ``config.heads``, so
    ``save_pretrained`` / ``from_pretrained`` keep every resident head. The methods follow the Transformers
    adapter API with ``head`` for ``adapter`` (``add_head``, ``load_head``, ``set_head``, ``active_head``,
    ``disable_heads`` / ``enable_heads``, ``delete_head``, ``save_head``, ``push_head_to_hub``), which leaves
    the inherited PEFT adapter methods free for LoRA on the base.
    """

    def __init__(self, config, head_config: BackwardAttentionConfig | dict | str | None = None, head_name: str = "default"):
        if not isinstance(config, self.config_class):  # a stock config of the base family, e.g. GPT2Config
            config = self.config_class.from_dict(config.to_dict())
        if head_config is not None:
            if config.heads:
                raise ValueError(
                    f"This model already carries heads {sorted(config.heads)}; head_config= only attaches a "
                    "fresh head to a plain base model. Use model.add_head(...) to add another."
                )
            _check_head_name(head_name)
            config.heads = {head_name: BackwardAttentionConfig.coerce(head_config).to_dict()}
            config.active_head = head_name
        super().__init__(config)

    def post_init(self):
        # Called at the end of the family's __init__: the heads join the model before weights are initialised.
        self.heads = nn.ModuleDict()
        self._heads_enabled = True
        self._fingerprint_cache: tuple[tuple, str] | None = None
        for name, options in self.config.heads.items():
            self.heads[name] = self._build_head(BackwardAttentionConfig.from_dict(options))
            self.config.heads[name] = self.heads[name].config.to_dict()
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

    # ----------------------------------------------------------------------------------------------------
    # the head API

    def _build_head(self, head_config: BackwardAttentionConfig) -> BackwardAttentionHead:
        """A head for this base; ``ValueError`` if ``head_config`` was made for another vocabulary or width."""
        head_config = head_config.for_base(self.config.vocab_size, self.config.hidden_size)
        return BackwardAttentionHead(head_config)

    def _register_head(self, head_name: str, head: BackwardAttentionHead) -> None:
        self.heads[head_name] = head.to(device=self.lm_head.weight.device, dtype=self.lm_head.weight.dtype)
        self.config.heads = {**self.config.heads, head_name: head.config.to_dict()}

    def _require_head(self, head_name: str) -> None:
        if head_name not in self.heads:
            raise ValueError(f"No head named {head_name!r}; the heads are {self.list_heads() or 'none'}.")

    def list_heads(self) -> list[str]:
        """Names of the resident heads, in the order they were added."""
        return list(self.heads)

    def active_head(self) -> str | None:
        """The head that scores the next token, or ``None`` (no head active, or heads disabled)."""
        return self.config.active_head if self._heads_enabled else None

    def add_head(self, head_config: BackwardAttentionConfig | dict | str | None = None, head_name: str = "default") -> None:
        """Attach a fresh, trainable head and make it the active one (as ``add_adapter`` does)."""
        _check_head_name(head_name)
        if head_name in self.heads:
            raise ValueError(f"A head named {head_name!r} already exists; pick another name or delete_head it first.")
        head = self._build_head(BackwardAttentionConfig.coerce(head_config))
        self._register_head(head_name, head)
        self.config.active_head = head_name

    def set_head(self, head_name: str) -> None:
        """Make a resident head the active one; no weights are copied."""
        self._require_head(head_name)
        self.config.active_head = head_name

    def disable_heads(self) -> None:
        """Give the base model's own logits, exactly, until ``enable_heads``."""
        self._heads_enabled = False

    def enable_heads(self) -> None:
        self._heads_enabled = True

    def delete_head(self, head_name: str) -> None:
        """Remove a resident head; if it was active, no head is active afterwards."""
        self._require_head(head_name)
        del self.heads[head_name]
        self.config.heads = {name: options for name, options in self.config.heads.items() if name != head_name}
        if self.config.active_head == head_name:
            self.config.active_head = None

    def embedding_fingerprint(self) -> str:
        """A fingerprint of the base's input-embedding table, recorded in head files to refuse the wrong base."""
        embeddings = self.get_input_embeddings().weight
        key = (embeddings.data_ptr(), embeddings._version, embeddings.shape)
        if self._fingerprint_cache is None or self._fingerprint_cache[0] != key:
            self._fingerprint_cache = (key, embedding_fingerprint(embeddings))
        return self._fingerprint_cache[1]

    def save_head(
        self,
        save_directory: str | os.PathLike,
        head_name: str | None = None,
        task: str | None = None,
        training_data: str | None = None,
        metrics: dict | str | None = None,
        metadata: dict | None = None,
    ) -> Path:
        """Save one head (default: the active one) on its own: config, safetensors weights and model card.

        Only the head's tensors are written, never the base's. Each file is written under a temporary name
        and renamed into place, so a save that fails leaves the directory as it was.
        """
        head_name = head_name or self.config.active_head
        if head_name is None:
            raise ValueError("No head is active; name the head to save with head_name=.")
        self._require_head(head_name)
        head = self.heads[head_name]
        record = {
            "head_name": head_name,
            "head_options": head.config.to_dict(),
            "base_model_name_or_path": self.config._name_or_path or None,
            "base_model_revision": getattr(self.config, "_commit_hash", None),
            "base_model_type": _BASE_MODEL_TYPES[type(self.config).model_type],
            "embedding_fingerprint": self.embedding_fingerprint(),
            "backattn_version": _library_version(),
            "metadata": metadata or {},
        }
        card = render_model_card(
            head_name, record, sum(p.numel() for p in head.parameters()), task=task, training_data=training_data, metrics=metrics
        )
        return write_head(save_directory, head.state_dict(), record, card)

    def load_head(
        self,
        head_name_or_path: str | os.PathLike,
        head_name: str | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        is_trainable: bool = False,
        ignore_base_mismatch: bool = False,
        hotswap: bool = False,
    ) -> str:
        """Load a saved head from a directory or a Hub repo id and keep it resident under ``head_name``.

        The head is checked before anything changes: its vocabulary and hidden sizes must match this base
        (always an error otherwise), and so must the fingerprint of the embedding table (an error, or only a
        warning with ``ignore_base_mismatch=True``). A failed load leaves the resident heads and the active
        head as they were. The loaded head becomes active only when no head is active yet (use
        ``set_head`` to switch). Returns the name it was loaded under (default: the name it was saved with).

        With ``hotswap=True`` the weights replace, in place, those of the resident head of that name, whose
        options must be the same (as PEFT's ``hotswap``; an optimiser holding those parameters keeps them).
        """
        directory = resolve_head_directory(head_name_or_path, revision, token, cache_dir, local_files_only)
        record, tensors = read_head(directory)
        head_name = head_name or record.get("head_name") or "default"
        _check_head_name(head_name)
        if hotswap:
            self._require_head(head_name)
        elif head_name in self.heads:
            raise ValueError(
                f"A head named {head_name!r} is already loaded; pass another head_name=, hotswap=True, or "
                "delete_head it first."
            )
        head_config = head_options(record)
        if head_config.vocab_size is None or head_config.hidden_size is None:
            raise ValueError(f"The head config in {directory} does not record the base's vocab_size and hidden_size.")
        head = self._build_head(head_config)
        fingerprint = self.embedding_fingerprint()
        if record.get("embedding_fingerprint") != fingerprint:
            message = (
                f"Head {head_name!r} from {head_name_or_path} was trained on a different base model "
                f"({record.get('base_model_name_or_path')!r}): its embedding-table fingerprint "
                f"{record.get('embedding_fingerprint')} differs from this model's {fingerprint}."
            )
            if not ignore_base_mismatch:
                raise ValueError(message + " Load it on the base it was trained on, or pass ignore_base_mismatch=True.")
            warnings.warn(message + " Loading it anyway (ignore_base_mismatch=True).", stacklevel=2)
        try:
            head.load_state_dict(tensors, strict=True)
        except RuntimeError as error:
            raise ValueError(f"The weights in {directory} do not fit the head described by its config: {error}") from error
        if hotswap:
            resident = self.heads[head_name]
            if resident.config != head.config:
                raise ValueError(
                    f"Cannot hotswap head {head_name!r}: the saved head's options {head.config.to_dict()} differ from "
                    f"the resident head's {resident.config.to_dict()}."
                )
            with torch.no_grad():
                for name, tensor in head.state_dict().items():
                    resident.get_parameter(name).copy_(tensor)
            return head_name
        head.requires_grad_(is_trainable)
        self._register_head(head_name, head)
        if self.config.active_head is None:
            self.config.active_head = head_name
        return head_name

    def push_head_to_hub(
        self,
        repo_id: str,
        head_name: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        commit_message: str | None = None,
        revision: str | None = None,
        **card_fields,
    ) -> str:
        """Save one head (see ``save_head``) and upload it to a Hub model repo; returns the commit URL."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        with tempfile.TemporaryDirectory() as directory:
            self.save_head(directory, head_name=head_name, **card_fields)
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            commit = api.upload_folder(
                repo_id=repo_id,
                folder_path=directory,
                commit_message=commit_message or f"Upload backward-attention head {head_name or self.config.active_head}",
                revision=revision,
            )
        return str(commit)

    # ----------------------------------------------------------------------------------------------------
    # forward

    def _head_indices(self, heads: list | torch.Tensor) -> torch.Tensor:
        """Row -> head index (into ``list_heads()``), ``-1`` for rows that take the base logits."""
        if isinstance(heads, torch.Tensor):
            indices = heads.to(torch.long)
            if indices.dim() != 1 or (indices.numel() and not -1 <= int(indices.min()) <= int(indices.max()) < len(self.heads)):
                raise ValueError(f"heads= as a tensor must be 1-D head indices in [-1, {len(self.heads)}).")
            return indices
        names = self.list_heads()
        for name in heads:
            if name is not None and name not in self.heads:
                raise ValueError(f"heads= names {name!r}, which is not loaded; the heads are {names or 'none'}.")
        return torch.tensor([-1 if name is None else names.index(name) for name in heads], dtype=torch.long)

    def _output_weight(self) -> torch.Tensor | None:
        """The output layer ``W`` when the logits are exactly ``h_t W^T`` (no bias), else ``None``."""
        # Exactly nn.Linear: a PEFT- or quantisation-wrapped layer exposes a .weight that is not what it applies.
        return self.lm_head.weight if type(self.lm_head) is nn.Linear and self.lm_head.bias is None else None

    def _apply_heads(
        self, logits: torch.Tensor, hidden: torch.Tensor, heads: list | torch.Tensor | None, rerank_top_k: int | None
    ) -> torch.Tensor:
        if not self._heads_enabled:
            return logits
        embeddings, weight = self.get_input_embeddings().weight, self._output_weight()
        rerank_top_k = self._rerank_top_k(rerank_top_k)

        def score(name: str, rows=slice(None)) -> torch.Tensor:
            return self.heads[name](logits[rows], hidden[rows], embeddings, weight, rerank_top_k)

        if heads is None:
            return logits if self.config.active_head is None else score(self.config.active_head)

        indices = self._head_indices(heads).to(logits.device)
        if indices.shape[0] != logits.shape[0] or logits.dim() < 3:
            raise ValueError(f"heads= needs one entry per batch row: got {indices.shape[0]} for a batch of {logits.shape[0]}.")
        names, out = self.list_heads(), None
        for index in indices.unique().tolist():
            if index < 0:
                continue
            rows = indices == index
            scored = score(names[index], rows)
            if out is None:
                out = logits.to(scored.dtype).clone()
            out[rows] = scored
        return logits if out is None else out

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
            kwargs["heads"] = self._head_indices(heads)
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
        (for example by :mod:`backattn.feature_cache`): the base is then not run at all. ``rerank_top_k``
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
        loss = logits = None
        if self._chunked_loss_applies(labels, heads, logits_to_keep, hidden, rerank_top_k):
            loss = head_cross_entropy(
                self.heads[self.config.active_head], hidden, labels, self._output_weight(),
                self.get_input_embeddings().weight, self.config.loss_chunk_size, kwargs.get("num_items_in_batch"),
                kwargs.get("ignore_index", -100), kwargs.get("shift_labels"),
            )  # fmt: skip
        else:
            logits = self._apply_heads(self.lm_head(hidden), hidden, heads, rerank_top_k)
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
_HEAD_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


def _check_head_name(head_name: str) -> None:
    if not isinstance(head_name, str) or not _HEAD_NAME.match(head_name) or hasattr(nn.ModuleDict, head_name):
        raise ValueError(
            f"Invalid head name {head_name!r}: use letters, digits, '_' and '-' (and not a ModuleDict method name)."
        )


def _library_version() -> str:
    try:
        return importlib.metadata.version("backattn")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


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
        raise ValueError(f"No backward-attention family for model_type {model_type!r}; supported: {', '.join(supported)}.")
    return FAMILIES[model_type]


__all__ = [
    "FAMILIES",
    "family_for",
    "BackwardAttentionForCausalLMMixin",
    "BackwardAttentionHead",
    "BackwardAttentionLayer",
    "GPT2BackwardAttentionForCausalLM",
    "LlamaBackwardAttentionForCausalLM",
]
