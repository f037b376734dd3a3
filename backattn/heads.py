"""The heads container: a model's task heads by name, which one serves, and mixed batches.

:class:`BackwardAttentionHeads` plays the part of PEFT's adapter bookkeeping. It is itself the
``nn.ModuleDict`` of the heads (so a model's state-dict keys stay ``heads.<name>.layers.0.w_key`` ...), and
it owns the active head, the enabled state, the per-row routing of a batch whose rows want different
heads (``heads=``) and the fan-out of one batch to several heads (``fan_out=``). It is the only code that
writes the model config's ``heads`` and ``active_head``, so ``save_pretrained`` / ``from_pretrained`` always
see the heads that are resident.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import ModelOutput

from .configuration_backattn import TRAINING_ONLY_OPTIONS, BackwardAttentionConfig
from .errors import BackattnTypeError, BackattnValueError
from .head_kernels import head_logits
from .head_loss import _labelled, copy_supervision, per_target
from .modeling_backattn import BackwardAttentionHead, SequenceContext

_HEAD_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


@dataclass
class FanOutOutput(ModelOutput):
    """What ``forward(..., fan_out=[...])`` returns: every named head's logits for the same rows, from one base
    forward. ``logits`` and ``loss`` (with ``labels``) map each name of ``fan_out`` (``None``: the base's own
    logits) to what ``forward`` gives with that head active (for scoring: each loss comes from the head's whole
    logits, never the chunked training loss); the rest is the base's, as in ``CausalLMOutputWithPast``."""

    loss: dict | None = None  # first: ModelOutput reads a lone dict-valued first field as its items
    logits: dict | None = None
    past_key_values: object | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class HeadsDisabled:
    """What ``disable()`` returns: heads stay off until ``enable()``, or, used as a context manager, until
    the ``with`` block ends (also on an exception), when the previous state comes back."""

    def __init__(self, heads: BackwardAttentionHeads, was_enabled: bool):
        self.heads, self.was_enabled = heads, was_enabled

    def __enter__(self) -> BackwardAttentionHeads:
        return self.heads

    def __exit__(self, *exc_info) -> bool:
        self.heads.enabled = self.was_enabled
        return False


class BackwardAttentionHeads(nn.ModuleDict):
    """The task heads of one model, by name, in the order they were added.

    ``config`` is the model's config: ``config.heads`` holds each resident head's options and
    ``config.active_head`` the one that scores the next token (``None``: the base's own logits).
    """

    def __init__(self, config):
        super().__init__()
        self.model_config = config

    @property
    def enabled(self) -> bool:
        """False while heads are disabled; kept in ``config.heads_enabled``, so a saved model keeps it."""
        return self.model_config.heads_enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self.model_config.heads_enabled = bool(value)

    # ----------------------------------------------------------------------------------------------------
    # which heads there are

    @staticmethod
    def check_name(head_name: str) -> None:
        valid = isinstance(head_name, str) and _HEAD_NAME.match(head_name)
        if not valid or hasattr(BackwardAttentionHeads, head_name) or head_name in ("model_config", "enabled"):
            raise BackattnValueError(
                f"Invalid head name {head_name!r}: use letters, digits, '_' and '-' (and not the name of a "
                "method or attribute of the heads container, such as 'add' or 'keys')."
            )

    @classmethod
    def attach_to_config(cls, config, head_name: str, head_config: BackwardAttentionConfig) -> None:
        """Record one fresh head, active, in a model config that carries none yet (before the model exists)."""
        if config.heads:
            raise BackattnValueError(
                f"This model already carries heads {sorted(config.heads)}; head_config= only attaches a "
                "fresh head to a plain base model. Use model.add_head(...) to add another."
            )
        cls.check_name(head_name)
        config.heads, config.active_head = {head_name: head_config.to_dict()}, head_name
        config.head_order, config.frozen_heads = [head_name], []

    def names(self) -> list[str]:
        return list(self.keys())

    def require(self, head_name: str) -> BackwardAttentionHead:
        if head_name not in self:
            raise BackattnValueError(f"No head named {head_name!r}; the heads are {self.names() or 'none'}.")
        return self[head_name]

    def add(self, head_name: str, head: BackwardAttentionHead) -> None:
        """Make ``head`` resident under ``head_name`` (not active: see ``set_active``)."""
        self.check_name(head_name)
        if head_name in self:
            raise BackattnValueError(
                f"A head named {head_name!r} already exists; pick another name or delete_head it first."
            )
        self[head_name] = head
        self._sync_config()

    def remove(self, head_name: str) -> None:
        """Drop a resident head; if it was active, no head is active afterwards."""
        self.require(head_name)
        del self[head_name]
        self._sync_config()
        if self.model_config.active_head == head_name:
            self.model_config.active_head = None

    def _sync_config(self) -> None:
        self.model_config.heads = {name: head.config.to_dict() for name, head in self.items()}
        self.model_config.head_order = self.names()
        frozen = self.model_config.frozen_heads or []  # recorded at saves (record_trainable); drop removed heads
        self.model_config.frozen_heads = [entry for entry in frozen if entry.split(".")[0] in self]

    # ----------------------------------------------------------------------------------------------------
    # which heads train: requires_grad, recorded in config.frozen_heads so that a saved model keeps it

    def record_trainable(self) -> None:
        """Write each head's ``requires_grad`` flags into ``config.frozen_heads`` (``save_pretrained`` calls it)."""
        frozen = []
        for name, head in self.items():
            flags = [(parameter_name, p.requires_grad) for parameter_name, p in head.named_parameters()]
            if flags and not any(trains for _, trains in flags):
                frozen.append(name)
            else:
                frozen += [f"{name}.{parameter_name}" for parameter_name, trains in flags if not trains]
        self.model_config.frozen_heads = frozen

    def apply_trainable(self) -> None:
        """Set each head's ``requires_grad`` flags as ``config.frozen_heads`` records them (every one trains when
        it records nothing)."""
        frozen = set(self.model_config.frozen_heads or ())
        for name, head in self.items():
            for parameter_name, parameter in head.named_parameters():
                parameter.requires_grad_(name not in frozen and f"{name}.{parameter_name}" not in frozen)

    def set_trainable(self, head_names, others: bool | None = False) -> None:
        """Make the heads ``head_names`` (a name or a list of names) train; the other heads are frozen
        (``others=False``), made to train (``True``) or left as they are (``None``)."""
        names = [head_names] if isinstance(head_names, str) else list(head_names)
        for name in names:
            self.require(name)
        for name, head in self.items():
            if name in names:
                head.requires_grad_(True)
            elif others is not None:
                head.requires_grad_(others)
        self.record_trainable()

    # ----------------------------------------------------------------------------------------------------
    # which head serves

    @property
    def active(self) -> str | None:
        """The head that scores the next token, or ``None`` (no head active, or heads disabled)."""
        return self.model_config.active_head if self.enabled else None

    def set_active(self, head_name: str) -> None:
        names = self.names()
        if head_name is None:
            raise BackattnTypeError(
                f"set_head(None): set_head takes the name of a resident head (one of {names or 'none'}). For the "
                "base model's own logits use model.disable_heads() (or `with model.disable_heads(): ...`); to "
                "remove a head, model.delete_head(name)."
            )
        if isinstance(head_name, (list, tuple, set)):
            raise BackattnTypeError(
                f"set_head({list(head_name)!r}): one head scores the next token, so set_head takes one head name "
                f"(one of {names or 'none'}), not a list as PEFT's set_adapter does. To serve different heads to "
                "the rows of one batch, pass heads=[name or None per row] to forward or generate."
            )
        if not isinstance(head_name, str):
            raise BackattnTypeError(
                f"set_head takes a head name (str), got {type(head_name).__name__} {head_name!r}; the heads are "
                f"{names or 'none'}."
            )
        self.require(head_name)
        self.model_config.active_head = head_name

    def disable(self) -> HeadsDisabled:
        """The base model's own logits from now on: until ``enable()``, or the end of a ``with`` block."""
        disabled = HeadsDisabled(self, self.enabled)
        self.enabled = False
        return disabled

    def enable(self) -> None:
        self.enabled = True

    # ----------------------------------------------------------------------------------------------------
    # scoring, one head for the batch or one per row

    def route(self, heads: str | list | tuple | torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """Row -> head index (into ``names()``), ``-1`` for rows that take the base logits.

        ``heads`` is one head name (for each of the ``rows`` rows, one row when ``rows`` is not given), a list
        or tuple of one head name or ``None`` per row, or a 1-D integer tensor of such indices.
        """
        if isinstance(heads, str):  # one name, never a sequence of one-letter names
            heads = [heads] * (1 if rows is None else rows)
        if isinstance(heads, torch.Tensor):
            if heads.is_floating_point() or heads.is_complex() or heads.dtype == torch.bool:
                raise BackattnTypeError(
                    f"heads= as a tensor must hold integer head indices (into model.list_heads(), -1 for the base), "
                    f"got dtype {heads.dtype}; pass head names instead, e.g. heads={self.names()[:1] or ['name']}."
                )
            indices = heads.to(torch.long)
            in_range = torch.compiler.is_compiling() or not indices.numel()  # a value check: read in eager mode only
            if indices.dim() != 1 or not (in_range or -1 <= int(indices.min()) <= int(indices.max()) < len(self)):
                raise BackattnValueError(f"heads= as a tensor must be 1-D head indices in [-1, {len(self)}).")
            return indices
        if not isinstance(heads, (list, tuple)):
            raise BackattnTypeError(
                f"heads= must be one head name, a list with one head name (or None) per batch row, or a 1-D "
                f"tensor of head indices; got {type(heads).__name__} {heads!r}."
            )
        names = self.names()
        for name in heads:
            if name is not None and not isinstance(name, str):
                raise BackattnTypeError(
                    f"heads= entries must be head names (str) or None (the base), got {type(name).__name__} "
                    f"{name!r}; the heads are {names or 'none'}."
                )
            if name is not None and name not in self:
                raise BackattnValueError(
                    f"heads= names {name!r}, which is not loaded; the heads are {names or 'none'}."
                )
        return torch.tensor([-1 if name is None else names.index(name) for name in heads], dtype=torch.long)

    def base_kl_weights(self, heads: str | list | tuple | torch.Tensor | None, rows: int) -> torch.Tensor | None:
        """Each row's ``base_kl_weight`` (its head's; 0 for rows with the base's logits) for the training loss, or
        ``None`` when every row's is 0 (see :func:`~backattn.head_loss.base_kl_penalty`)."""
        if not self.enabled or (heads is None and self.active is None):
            return None
        # decided on the configs' numbers, never on a tensor's values (no graph break under torch.compile)
        if heads is None:
            beta = self[self.active].config.base_kl_weight
            return torch.full((rows,), beta, dtype=torch.float32) if beta else None
        per_head = [self[name].config.base_kl_weight for name in self.names()]
        if not any(per_head):
            return None
        return torch.tensor([*per_head, 0.0])[self.route(heads, rows=rows)]  # index -1: the base's rows, 0

    def copy_supervision(
        self,
        heads: str | list | tuple | torch.Tensor | None,
        context: SequenceContext | None,
        labels: torch.Tensor,
        shift_labels: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        ignore_index: int = -100,
    ) -> torch.Tensor | None:
        """The straightforward training loss's ``copy_loss_weight`` terms: ``sum_rows gamma_row
        sum_t copy_supervision`` over each row's labelled positions (``gamma_row`` its head's; 0 for the base's
        rows), divided as the cross-entropy is; ``None`` when no head the call serves has a ``gamma``
        (see :func:`~backattn.head_loss.copy_supervision`). Masked, not indexed (torch.compile)."""
        if not self.enabled or context is None:
            return None
        weighted = [name for name in self._routed_names(heads) if self[name].config.copy_loss_weight]
        if not weighted:
            return None
        keep, targets = _labelled(context.hidden, labels, shift_labels, ignore_index)
        rows = None if heads is None else self.route(heads, rows=labels.shape[0]).to(labels.device)
        total = context.hidden.new_zeros((), dtype=torch.float32)
        for name in weighted:
            head = self[name]
            _, copy = head.context_inputs(context)  # B x S x S: every row's, the other heads' rows masked out
            mask = keep if rows is None else keep & (rows == self.names().index(name))[:, None]
            total = total + head.config.copy_loss_weight * (copy_supervision(copy, targets) * mask).sum()
        return per_target(total, keep.sum(), num_items_in_batch)

    def label_word_ids(self, heads: str | list | tuple | torch.Tensor | None) -> list[int] | None:
        """The ``label_word_ids`` of the training loss (see :func:`~backattn.head_loss.label_word_loss`): the active
        head's, or with ``heads=`` the one setting every resident head shares; ``None`` for the plain
        cross-entropy. A batch routed over heads whose settings differ is refused (train them one at a time)."""
        if not self.enabled or (heads is None and self.active is None):
            return None
        if heads is None:  # decided on the configs, never on a tensor's values (torch.compile)
            return self[self.active].config.label_word_ids
        settings = {name: self[name].config.label_word_ids for name in self._routed_names(heads)}
        if len({None if ids is None else tuple(ids) for ids in settings.values()}) > 1:
            raise BackattnValueError(
                f"heads= routes this training batch over heads whose label_word_ids differ ({settings}), and one "
                "loss cannot take both objectives: train the label-word heads one at a time (set_head), or give "
                "them the same label_word_ids."
            )
        return next(iter(settings.values()), None)

    def _routed_names(self, heads) -> list[str]:
        """The resident heads a call's ``heads=`` serves (``None``: the active one; a tensor's indices cannot be
        read while compiling, so then every resident head)."""
        if heads is None:
            return [] if self.active is None else [self.active]
        if isinstance(heads, torch.Tensor):
            return self.names()
        return [n for n in dict.fromkeys([heads] if isinstance(heads, str) else heads) if n in self]

    def check_no_training_terms(self, heads, path: str) -> None:
        """Refuse to train through ``path`` (a loss that takes the plain log-likelihood of every label, such as
        TRL's fused LM head or fan-out) heads whose own training loss adds a term or restricts the vocabulary
        (``base_kl_weight``, ``label_word_ids``): they would be silently left out."""
        terms = {
            name: [option for option in TRAINING_ONLY_OPTIONS if getattr(self[name].config, option)]
            for name in self._routed_names(heads)
        }
        terms = {name: options for name, options in terms.items() if options}
        if terms:
            raise BackattnValueError(
                f"Training through {path} takes each label's plain log-likelihood, which would leave out what these "
                f"heads' training loss adds ({terms}). Train them through forward(labels=...) (HeadTrainer, "
                "Trainer, train_sft.py), or clear the options: model.heads.set_training_options(name, "
                "base_kl_weight=0.0, label_word_ids=None, copy_loss_weight=0.0)."
            )

    def set_training_options(self, head_name: str, **options) -> None:
        """Change what a resident head's training loss takes (its ``base_kl_weight``, ``label_word_ids``,
        ``copy_loss_weight``: options that act in training only and leave its weights and logits as they are),
        validated and recorded in the model's config, so that ``save_pretrained`` and ``save_head`` keep them."""
        head = self.require(head_name)
        other = sorted(set(options) - set(TRAINING_ONLY_OPTIONS))
        if other:
            raise BackattnValueError(
                f"set_training_options changes {', '.join(TRAINING_ONLY_OPTIONS)} only, not {other}: those shape the "
                "head's weights or logits; build a new head with them (add_head) instead."
            )
        head.config = dataclasses.replace(head.config, **options)
        self._sync_config()

    def check_enabled_for(self, heads) -> None:
        """Refuse ``heads=`` while heads are disabled: it would be ignored and every row get the base's logits."""
        if heads is not None and not self.enabled:
            given = f"a tensor of {heads.numel()} head indices" if isinstance(heads, torch.Tensor) else repr(heads)
            raise BackattnValueError(
                f"heads={given} was given while heads are disabled (model.disable_heads()), so it would be "
                "ignored: call model.enable_heads() (or leave the `with model.disable_heads():` block) to serve "
                "heads, or drop heads= to get the base model's own logits."
            )

    def check_fan_out(self, fan_out) -> list[str | None]:
        """``fan_out`` as a list of distinct resident head names (``None``: the base), or a clear error."""
        names = self.names()
        example = f"fan_out={names[:2] or ['name']}"
        if isinstance(fan_out, (str, torch.Tensor)) or not isinstance(fan_out, (list, tuple)):
            hint = f" (for one head on every row: heads={fan_out!r})" if isinstance(fan_out, str) else ""
            raise BackattnTypeError(
                f"fan_out= takes a list of head names (None for the base), each scoring every row, e.g. {example}; "
                f"got {_describe(fan_out)}{hint}."
            )
        if not fan_out:
            raise BackattnValueError(
                f"fan_out= is empty: name at least one head (one of {names or 'none'}), or drop fan_out= for the "
                "active head's logits."
            )
        for name in fan_out:
            if name is not None and not isinstance(name, str):
                raise BackattnTypeError(
                    f"fan_out= entries must be head names (str) or None (the base), got {_describe(name)}; the heads "
                    f"are {names or 'none'}."
                )
        unknown = [name for name in fan_out if name is not None and name not in self]
        if unknown:
            raise BackattnValueError(
                f"fan_out= names {', '.join(map(repr, unknown))}, which {'is' if len(unknown) == 1 else 'are'} not "
                f"loaded; the heads are {names or 'none'}."
            )
        repeated = sorted({repr(name) for name in fan_out if list(fan_out).count(name) > 1})
        if repeated:
            raise BackattnValueError(
                f"fan_out= names {', '.join(repeated)} more than once; each head is scored once, so name it once."
            )
        if not self.enabled:
            raise BackattnValueError(
                f"fan_out={list(fan_out)!r} was given while heads are disabled (model.disable_heads()): call "
                "model.enable_heads() (or leave the `with model.disable_heads():` block), or drop fan_out= to get "
                "the base model's own logits."
            )
        return list(fan_out)

    def training_problem(self, heads: str | list | tuple | torch.Tensor | None = None) -> str | None:
        """Why no head would receive gradients from a loss (with ``heads=`` as given to forward), or ``None``."""
        if not self.enabled:
            return (
                "heads are disabled (model.disable_heads()), so the loss comes from the frozen base alone: call "
                "model.enable_heads(), or train outside the `with model.disable_heads():` block"
            )
        names = self.names()
        if heads is None:
            if self.active is None:
                if not names:
                    return (
                        "the model carries no head, so the loss comes from the frozen base alone: attach one with "
                        "model.add_head(...) or model.load_head(path) and make it active with model.set_head(name)"
                    )
                return (
                    "no head is active (config.active_head is None), so the loss comes from the frozen base "
                    f"alone: call model.set_head(name) with one of {names}"
                )
            serving = [self.active]
        else:
            indices = self.route(heads, rows=1).tolist()
            serving = sorted({names[i] for i in indices if i >= 0})
            if not serving:
                return (
                    "heads= sends every row to the base (None), so the loss comes from the frozen base alone: "
                    f"name a head for some rows (one of {names}), or drop heads= to train the active head"
                )
        if not any(p.requires_grad for name in serving for p in self[name].parameters()):
            return (
                f"head(s) {serving} have no parameter that requires grad (they were frozen): call "
                f"model.heads[{serving[0]!r}].requires_grad_(True)"
            )
        return None

    def forward(
        self,
        logits: torch.Tensor,
        hidden: torch.Tensor,
        embeddings: torch.Tensor,
        output_weight: torch.Tensor | None = None,
        heads: list | torch.Tensor | None = None,
        rerank_top_k: int | None = None,
        context: SequenceContext | None = None,
    ) -> torch.Tensor:
        """The logits the active head gives (``heads=None``), or each row's own head's (``heads=`` one name, or
        ``None`` for the base, per row; or one name for every row); the base's logits while heads are disabled
        (``heads=`` is then refused: it would be ignored). ``context`` is the sequence around the positions, for
        heads with ``query_layers`` or ``copy_attention`` (see :class:`~backattn.modeling_backattn.SequenceContext`)."""
        self.check_enabled_for(heads)
        if not self.enabled:
            return logits

        def score(name: str, rows=slice(None)) -> torch.Tensor:
            head, layer_states, copy = self[name], None, None
            if context is not None and (head.config.query_layers is not None or head.config.copy_attention):
                layer_states, copy = head.context_inputs(context.select_rows(rows))
            return head_logits(
                head, logits[rows], hidden[rows], embeddings, output_weight, rerank_top_k,
                layer_states=layer_states, copy=copy,
            )  # fmt: skip

        if heads is None:
            return logits if self.active is None else score(self.active)
        indices = self.route(heads, rows=logits.shape[0]).to(logits.device)
        if indices.shape[0] != logits.shape[0] or logits.dim() < 3:
            raise BackattnValueError(
                f"heads= needs one entry per batch row: got {indices.shape[0]} for a batch of {logits.shape[0]}."
            )
        names, out = self.names(), None
        if torch.compiler.is_compiling():  # which heads the rows want is data: score every head, keep each row's
            for index, name in enumerate(names):
                scored = score(name)
                out = torch.where(
                    (indices == index)[:, None, None], scored, logits.to(scored.dtype) if out is None else out
                )
            return logits if out is None else out
        for index in indices.unique().tolist():
            if index < 0:
                continue
            rows = indices == index
            scored = score(names[index], rows)
            if out is None:
                out = logits.to(scored.dtype).clone()
            out[rows] = scored
        return logits if out is None else out

    def fan_out(
        self,
        logits: torch.Tensor,
        hidden: torch.Tensor,
        embeddings: torch.Tensor,
        output_weight: torch.Tensor | None,
        fan_out: list | tuple,
        rerank_top_k: int | None = None,
        context: SequenceContext | None = None,
    ) -> dict[str | None, torch.Tensor]:
        """Head name -> the logits that head gives for every row (``None`` -> the base's ``logits``), each equal to
        what ``forward`` gives with that head active. One call serves them all from the same base outputs: what
        depends on the base alone is computed once (the base logits' softmax weights of step 4, or their top-k
        candidates and normaliser with ``rerank_top_k``: see ``head_logits``' ``shared``), each head's tables
        come from their cache, and ``context`` (``query_layers`` states, copy context) was made once by the model."""
        names, shared, out = self.check_fan_out(fan_out), {}, {}
        for name in names:
            if name is None:
                out[None] = logits
                continue
            head, layer_states, copy = self[name], None, None
            if context is not None and (head.config.query_layers is not None or head.config.copy_attention):
                layer_states, copy = head.context_inputs(context)
            out[name] = head_logits(
                head, logits, hidden, embeddings, output_weight, rerank_top_k,
                layer_states=layer_states, copy=copy, shared=shared,
            )  # fmt: skip
        return out


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r}"[:200]


__all__ = ["BackwardAttentionHeads", "FanOutOutput", "HeadsDisabled"]
