"""Train several head configurations in one pass over the same batches: :class:`HeadSweep` and :class:`SweepTrainer`.

A sweep of ``N`` heads (different learning rates, widths, presets, options) on one frozen base costs one
pass over the data, not ``N``. :class:`HeadSweep` is an ``nn.Module`` over a backattn model whose heads
container (an ``nn.ModuleDict``) holds the sweep's heads; its loss is the sum of the heads' own losses,

    loss = sum_k L_k(theta_k),    L_k = the mean next-token cross-entropy of head k (as the model's chunked loss),

and as no parameter is shared, ``d loss / d theta_k = d L_k / d theta_k``: each head gets exactly the gradient it
gets when trained alone. :class:`SweepTrainer` (a ``transformers.Trainer``) gives each head its own parameter
groups, with its learning rate and weight decay; the scheduler scales every group by the same factor, and Adam's
moments are per parameter, so every head takes the step it would take alone. The one place where the stock
Trainer couples heads is gradient clipping, which clips the norm of all parameters together (a head with large
gradients would shrink the others' steps); :class:`SweepTrainer` clips each head's gradient to ``max_grad_norm``
on its own instead, which is what a run of that head alone does. (Dropout is the other coupling: the heads draw
their masks from one generator in turn, so a head with ``dropout > 0`` sees other masks than alone.)

What is computed once per batch and shared, chunk by chunk of its labelled positions (``config.loss_chunk_size``):
the base logits ``l_t = h_t W^T`` (one ``V x d`` product per position, the largest of the step) and step 4's
``softmax(l_t / rms(l_t))`` for the heads that weight by it (``head_kernels.head_logits``' ``shared``); with no
cached features, also the base forward. What each head pays itself: its weight tables (``RMSNorm(E)``, ``K``,
``Vv``), its scores ``q_t K^T``, its vocabulary-sized cross-entropy, and the backward pass of all of these.

Each head saves as an ordinary head directory (:meth:`HeadSweep.save_heads`: ``save_head``'s files), so the
best one loads with ``model.load_head(path)``; checkpoints hold one such directory per head plus the Trainer's
optimiser state, and resume. ``benchmarks/sweep_heads.py`` runs a sweep on the validation protocol from a YAML
list of heads.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from accelerate.utils import DistributedType
from torch import nn
from torch.func import functional_call
from transformers import Trainer
from transformers.trainer_utils import EvalLoopOutput
from transformers.utils import ModelOutput

from .configuration_backattn import DEFAULT_PRESET, BackwardAttentionConfig
from .errors import BackattnTypeError, BackattnValueError
from .head_kernels import head_logits, weight_tables
from .head_loss import (
    _labelled,
    base_logits,
    check_has_targets,
    check_label_word_targets,
    copy_supervision,
    labelled_context,
    per_target,
    token_losses,
)
from .heads import BackwardAttentionHeads
from .modeling_backattn import BackwardAttentionHead, CopyInputs, LayerTables, SequenceContext
from .query_standardization import fit_for_a_fresh_run

# --------------------------------------------------------------------------------------------------------
# what a sweep trains


@dataclass
class SweepHead:
    """One head configuration of a sweep: its name, its options, and its own optimiser settings.

    ``preset`` and ``options`` make the head as ``BackwardAttentionConfig.from_preset(preset, **options)``;
    ``init_from`` starts it from a saved head directory instead (its options are the file's). A
    ``learning_rate`` or ``weight_decay`` of ``None`` takes the ``TrainingArguments``' value.
    """

    name: str
    preset: str = DEFAULT_PRESET
    options: dict | None = None
    learning_rate: float | None = None
    weight_decay: float | None = None
    init_from: str | None = None

    @classmethod
    def coerce(cls, value: SweepHead | Mapping) -> SweepHead:
        """A :class:`SweepHead`, or one from a mapping of its fields (a YAML entry); unknown keys are refused."""
        if isinstance(value, SweepHead):
            return value
        if not isinstance(value, Mapping):
            raise BackattnTypeError(
                f"A sweep head is a SweepHead or a mapping of its fields ({', '.join(cls.field_names())}), got "
                f"{type(value).__name__} {value!r}."
            )
        unknown = sorted(set(value) - set(cls.field_names()))
        if unknown:
            raise BackattnValueError(
                f"Sweep head {value.get('name', '?')!r} has unknown key(s) {unknown}; the keys are "
                f"{', '.join(cls.field_names())} (head options go under 'options')."
            )
        if "name" not in value:
            raise BackattnValueError(f"Sweep head {dict(value)!r} has no 'name': every head needs one (its directory).")
        return cls(**value)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def head_config(self) -> BackwardAttentionConfig:
        if self.options is not None and not isinstance(self.options, Mapping):
            raise BackattnValueError(f"Sweep head {self.name!r}: options must be a mapping of head options.")
        return BackwardAttentionConfig.from_preset(self.preset, **(self.options or {}))


def check_sweep_heads(heads: Sequence[SweepHead | Mapping]) -> list[SweepHead]:
    """The heads as :class:`SweepHead`, refused with a clear error when they cannot form one sweep."""
    if isinstance(heads, (str, Mapping)) or not isinstance(heads, Sequence):
        raise BackattnTypeError(f"A sweep takes a list of head configurations, got {type(heads).__name__}.")
    specs = [SweepHead.coerce(head) for head in heads]
    if not specs:
        raise BackattnValueError("A sweep needs at least one head configuration.")
    names = [spec.name for spec in specs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise BackattnValueError(
            f"Sweep head name(s) {repeated} appear more than once: each head needs its own name (it names the "
            "head and its saved directory). Rename them, e.g. 'hidden-lr3e-4'."
        )
    for spec in specs:
        BackwardAttentionHeads.check_name(spec.name)
        for option in ("learning_rate", "weight_decay"):
            value = getattr(spec, option)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise BackattnValueError(f"Sweep head {spec.name!r}: {option} must be a number, got {value!r}.")
            if value < 0 or (option == "learning_rate" and value == 0):
                wanted = "positive" if option == "learning_rate" else "0 or more"
                raise BackattnValueError(f"Sweep head {spec.name!r}: {option} must be {wanted}, got {value!r}.")
        if spec.init_from is not None and (spec.options or spec.preset != DEFAULT_PRESET):
            raise BackattnValueError(
                f"Sweep head {spec.name!r} gives init_from= and preset/options: a head started from a saved "
                "directory keeps that head's options. Drop one of them."
            )
    return specs


@dataclass
class SweepOutput(ModelOutput):
    """What :meth:`HeadSweep.forward` returns: ``loss`` (the sum of the heads' losses, for the Trainer),
    ``head_losses`` (each head's loss, in ``HeadSweep.head_names`` order) and ``target_tokens`` (the batch's
    labelled positions)."""

    loss: torch.Tensor | None = None
    head_losses: torch.Tensor | None = None
    target_tokens: torch.Tensor | None = None


# --------------------------------------------------------------------------------------------------------
# the shared loss


#: Positions per chunk where the model takes the exact loss (``config.loss_chunk_size`` unset): the sweep is always
#: chunked, and the values (not the memory) equal the exact loss's.
SWEEP_CHUNK_SIZE = 256


class _SweepHeadLogits(nn.Module):
    """``head_kernels.head_logits`` as a module's forward (for ``functional_call``), with the sweep's ``shared``."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, logits, hidden, embeddings, output_weight, tables, layer_states, copy, shared):
        return head_logits(
            self.head, logits, hidden, embeddings, output_weight, tables=tables, layer_states=layer_states,
            copy=copy, shared=shared,
        )  # fmt: skip


class _SharedChunkedLosses(torch.autograd.Function):
    """``[sum_c loss_k(c) for each head k]``, each chunk's shared inputs made once, each head's gradients taken
    chunk by chunk in the forward pass (as ``head_loss._EagerChunkedLoss`` does for one head).

    ``sizes[k]`` of ``tensors`` are head ``k``'s (after head ``k - 1``'s). The backward pass scales head ``k``'s
    accumulated gradients by the incoming gradient of its loss, which is exact because each loss is a sum over
    chunks. Gradients accumulate in float32 at least, and are returned in each input's dtype.
    """

    @staticmethod
    def forward(ctx, shared: Callable, losses: list[Callable], num_chunks: int, sizes: tuple, *tensors):
        needs = ctx.needs_input_grad[4:]
        bounds = [0]
        for size in sizes:
            bounds.append(bounds[-1] + size)
        grads: list[torch.Tensor | None] = [None] * len(tensors)
        totals = torch.zeros(len(losses), dtype=torch.float32, device=tensors[0].device)
        for chunk in range(num_chunks):
            inputs = shared(chunk)
            for k, chunk_loss in enumerate(losses):
                own = range(bounds[k], bounds[k + 1])
                wanted = [i for i in own if needs[i]]
                with torch.enable_grad():
                    leaves = [tensors[i].detach().requires_grad_(i in wanted) for i in own]
                    loss = chunk_loss(chunk, inputs, *leaves)
                    chosen = [leaves[i - bounds[k]] for i in wanted]
                    parts = torch.autograd.grad(loss, chosen, allow_unused=True) if wanted else ()
                totals[k] += loss.detach()
                for i, part in zip(wanted, parts):
                    if part is not None:
                        part = part.to(torch.promote_types(part.dtype, torch.float32))
                        grads[i] = part if grads[i] is None else grads[i].add_(part)
        ctx.grads, ctx.dtypes = grads, [t.dtype for t in tensors]
        ctx.owner = [k for k in range(len(sizes)) for _ in range(sizes[k])]
        return totals

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grads = [
            None if g is None else (g * grad_output[k].to(g.dtype)).to(d)
            for g, d, k in zip(ctx.grads, ctx.dtypes, ctx.owner)
        ]
        return (None, None, None, None, *grads)


def sweep_cross_entropy(
    heads: Sequence[BackwardAttentionHead],
    hidden: torch.Tensor,
    labels: torch.Tensor | None,
    output_weight: torch.Tensor,
    embeddings: torch.Tensor,
    chunk_size: int,
    num_items_in_batch: int | torch.Tensor | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    context: SequenceContext | None = None,
    output_bias: torch.Tensor | None = None,
    transform_logits: Callable[[torch.Tensor], torch.Tensor] | None = None,
    training_terms: bool = True,
) -> torch.Tensor:
    """Each head's :func:`~backattn.head_loss.head_cross_entropy` (a tensor of ``len(heads)`` losses), in one pass.
    ``training_terms=False`` leaves out what each head's config adds in training only (the KL-to-base term of
    ``base_kl_weight``, the label-word restriction of ``label_word_ids``, the copy term of ``copy_loss_weight``):
    the plain cross-entropy over the vocabulary, as the model's evaluation loss.

    For each chunk of ``chunk_size`` labelled positions, the base logits ``l = f(h W^T + b)`` (:func:`base_logits`;
    ``output_bias`` ``b`` and ``transform_logits`` ``f`` as in the one-head loss) and what depends on them alone
    (step 4's softmax weights) are computed once and every head scores them; each head's weight tables are
    computed once per call, as in the one-head loss. Entry ``k`` and its gradients equal
    ``head_cross_entropy(heads[k], ...)``'s. Without gradients (evaluation) the same values, without the
    gradient work.
    """
    linear = output_bias is None and transform_logits is None  # l = h W^T: raw weighting's W^T Vv shortcut holds
    keep, shift_targets = _labelled(hidden, labels, shift_labels, ignore_index)
    positions, targets = hidden[keep], shift_targets[keep]
    check_has_targets(positions, num_items_in_batch, ignore_index)
    dtypes = {head.layers[0].w_key.dtype for head in heads}
    if len(dtypes) != 1:
        raise BackattnValueError(
            f"The sweep's heads hold different dtypes ({sorted(map(str, dtypes))}); they share the base logits, so "
            "they must share one dtype: build them with the model (model.build_head) or cast them alike."
        )
    dtype = dtypes.pop()
    tables_weight = output_weight if linear else None
    positions, output_weight = positions.to(dtype), output_weight.to(dtype)
    output_bias = None if output_bias is None else output_bias.to(dtype)
    shortcut = output_weight if linear else None
    num_chunks = -(-positions.shape[0] // chunk_size)

    def shared(chunk: int):
        rows = slice(chunk * chunk_size, (chunk + 1) * chunk_size)
        h = positions[rows]
        logits = base_logits(h, output_weight, output_bias, transform_logits)
        return rows, h, logits, {}  # {}: what the heads share of these logits (head_logits' shared)

    chunk_losses, sizes, tensors, copy_terms = [], [], [], []
    for head in heads:
        layer_states, copy = labelled_context(head, context, keep)
        tables = weight_tables(head, embeddings, tables_weight)
        flat_tables = [t for layer in tables for t in layer if t is not None]
        copy_weights = () if copy is None else (copy.log_weights,)
        scorer = _SweepHeadLogits(head)
        names, parameters = zip(*scorer.named_parameters())
        own = (*parameters, *flat_tables, *copy_weights)
        beta, words = (head.config.base_kl_weight, head.config.label_word_ids) if training_terms else (0.0, None)
        check_label_word_targets(targets, words)
        gamma = head.config.copy_loss_weight if training_terms else 0.0
        copy_terms.append(gamma * copy_supervision(copy, targets).sum() if gamma else None)
        chunk_losses.append(_head_chunk_loss(scorer, names, tables, layer_states, copy, len(copy_weights), embeddings,
                                             shortcut, targets, beta, words))  # fmt: skip
        sizes.append(len(own))
        tensors.extend(own)
    if torch.is_grad_enabled():
        totals = _SharedChunkedLosses.apply(shared, chunk_losses, num_chunks, tuple(sizes), *tensors)
    else:
        totals = torch.zeros(len(heads), dtype=torch.float32, device=hidden.device)
        bounds = [0]
        for size in sizes:
            bounds.append(bounds[-1] + size)
        for chunk in range(num_chunks):
            inputs = shared(chunk)
            for k, chunk_loss in enumerate(chunk_losses):
                totals[k] += chunk_loss(chunk, inputs, *tensors[bounds[k] : bounds[k + 1]])
    if any(term is not None for term in copy_terms):  # each head's copy_loss_weight term, outside the chunks
        totals = totals + torch.stack([totals.new_zeros(()) if t is None else t.to(totals.dtype) for t in copy_terms])
    return per_target(totals, positions.shape[0], num_items_in_batch)


def _head_chunk_loss(
    scorer, names, tables, layer_states, copy, num_copy, embeddings, output_weight, targets, beta, label_word_ids
):
    """One head's ``sum CE(z, y)`` (over ``z[C]`` with ``label_word_ids`` ``C``; plus
    ``beta KL(softmax(l) || softmax(z))``) over a chunk, from the chunk's
    shared inputs and the head's own tensors (its parameters, then its tables, then its copy weights: as
    ``head_loss.head_cross_entropy`` takes them)."""

    def chunk_loss(chunk: int, inputs, *tensors: torch.Tensor) -> torch.Tensor:
        rows, h, logits, memo = inputs
        weights = tensors[: len(names)]
        table_tensors = iter(tensors[len(names) : len(tensors) - num_copy])
        chunk_tables = [LayerTables(*(None if t is None else next(table_tensors) for t in layer)) for layer in tables]
        chunk_states = None if layer_states is None else layer_states[rows]
        chunk_copy = None if copy is None else CopyInputs(tensors[-1][rows], copy.next_ids[rows])
        arguments = (logits, h, embeddings, output_weight, chunk_tables, chunk_states, chunk_copy, memo)
        z = functional_call(scorer, dict(zip(names, weights)), arguments)
        return token_losses(z, logits, targets[rows], beta, label_word_ids)

    return chunk_loss


# --------------------------------------------------------------------------------------------------------
# the module


class HeadSweep(nn.Module):
    """``N`` head configurations on one frozen base model, trained together from the same batches.

    ``model`` is a backattn causal LM (``family_for(...)``, ``from_pretrained``); the sweep's heads are added to
    its heads container (``model.heads``, an ``nn.ModuleDict``) under their names, and train; any head the model
    already carries is frozen and not part of the sweep. ``forward`` takes what the model's forward takes for
    training (``input_ids``, ``labels``, ``attention_mask``, cached ``base_hidden_states`` /
    ``base_layer_states``, ``num_items_in_batch``) and returns a :class:`SweepOutput` whose loss is the sum of
    the heads' losses (see the module docstring). Train it with :class:`SweepTrainer`.
    """

    def __init__(self, model: nn.Module, heads: Sequence[SweepHead | Mapping]):
        super().__init__()
        if not (hasattr(model, "heads") and hasattr(model, "build_head") and hasattr(model, "save_head")):
            raise BackattnTypeError(
                f"HeadSweep needs a backattn model (family_for(config.model_type).from_pretrained(base)), got "
                f"{type(model).__name__}."
            )
        if model._rerank_top_k(None):
            raise BackattnValueError(
                f"config.rerank_top_k = {model.config.rerank_top_k}: a head alone would train re-ranking the base's "
                "top k tokens, and the sweep scores the whole vocabulary, so its heads would not train as alone. Set "
                "model.config.rerank_top_k = 0 (or None) for the sweep."
            )
        specs = check_sweep_heads(heads)
        resident = [spec.name for spec in specs if spec.name in model.heads]
        if resident:
            raise BackattnValueError(
                f"The model already carries head(s) {resident}; name the sweep's heads otherwise, or delete_head them."
            )
        built = {}
        for spec in specs:  # every head is built (and checked against this base) before the model changes
            if spec.init_from is None:
                try:
                    built[spec.name] = model.build_head(spec.head_config())
                except BackattnValueError as error:
                    raise BackattnValueError(f"Sweep head {spec.name!r}: {error}") from error
        loaded = []
        try:
            for spec in specs:
                if spec.init_from is None:
                    model.heads.add(spec.name, built[spec.name])
                else:
                    model.load_head(spec.init_from, head_name=spec.name, is_trainable=True)
                loaded.append(spec.name)
        except Exception:
            for name in loaded:
                model.heads.remove(name)
            raise
        model.set_trainable_heads([spec.name for spec in specs], others=False)
        if model.active_head() is None:
            model.set_head(specs[0].name)
        self.model = model
        self.specs = {spec.name: spec for spec in specs}

    @classmethod
    def from_pretrained(cls, base: str | os.PathLike, heads: Sequence[SweepHead | Mapping], **kwargs) -> HeadSweep:
        """The sweep on a fresh copy of the base at ``base`` (a directory or Hub id; ``kwargs`` go to
        ``from_pretrained``)."""
        from transformers import AutoConfig

        from .modeling_families import family_for

        model_class = family_for(AutoConfig.from_pretrained(base).model_type)
        return cls(model_class.from_pretrained(base, **kwargs), heads)

    @property
    def head_names(self) -> list[str]:
        return list(self.specs)

    @property
    def heads(self) -> dict[str, BackwardAttentionHead]:
        """The sweep's heads by name (modules of ``model.heads``)."""
        return {name: self.model.heads[name] for name in self.specs}

    def learning_rates(self, default: float) -> dict[str, float]:
        """Each head's learning rate (``default`` where its configuration gives none)."""
        return {name: default if s.learning_rate is None else s.learning_rate for name, s in self.specs.items()}

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        base_hidden_states: torch.Tensor | None = None,
        base_layer_states: dict[int, torch.Tensor] | None = None,
        **kwargs,
    ) -> SweepOutput:
        """Every head's loss on this batch, the base logits made once per chunk of labelled positions."""
        model = self.model
        if labels is None and kwargs.get("shift_labels") is None:
            raise BackattnValueError("HeadSweep computes its heads' losses: pass labels= (or shift_labels=).")
        model._check_forward_inputs(input_ids, None, labels, base_hidden_states, None, None, None, kwargs)
        if base_hidden_states is not None:
            hidden = base_hidden_states.to(model.lm_head.weight.dtype)
            layer_states = model._given_layer_states(base_layer_states, hidden)
        else:
            if input_ids is None:
                raise BackattnValueError("Pass input_ids, or the base's cached features as base_hidden_states.")
            with torch.no_grad(), model.capture_block_outputs(model.feature_layers()) as layer_states:
                hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if model.config.check_finite_inputs and not bool(torch.isfinite(hidden).all()):
            where = "base_hidden_states (a damaged feature cache?)" if base_hidden_states is not None else "the base"
            raise BackattnValueError(f"The hidden states from {where} hold NaN or inf: the heads' losses would too.")
        layer = model.lm_head
        if type(layer) is not nn.Linear:
            raise BackattnValueError(
                f"HeadSweep makes the base logits l = h W^T (+ b) chunk by chunk, which needs the base's output layer "
                f"as a plain nn.Linear, not {type(layer).__name__} (no LoRA or quantisation on it)."
            )
        transforms = getattr(model, "_transforms_logits", None)  # the base's post-processing (e.g. soft-capping)
        transform = model.transform_logits if transforms is not None and transforms() else None
        context = model._sequence_context(hidden, layer_states, input_ids, attention_mask, None, 0, 0, None)
        keep, _ = _labelled(hidden, labels, kwargs.get("shift_labels"), kwargs.get("ignore_index", -100))
        losses = sweep_cross_entropy(
            list(self.heads.values()), hidden, labels, layer.weight, model.get_input_embeddings().weight,
            model.config.loss_chunk_size or SWEEP_CHUNK_SIZE, kwargs.get("num_items_in_batch"),
            kwargs.get("ignore_index", -100),
            kwargs.get("shift_labels"), context, output_bias=layer.bias, transform_logits=transform,
            training_terms=self.training,
        )  # fmt: skip
        return SweepOutput(loss=losses.sum(), head_losses=losses, target_tokens=keep.sum())

    @torch.no_grad()
    def target_cross_entropy(self, dataset, collator, batch_size: int = 8) -> dict[str, dict[str, float]]:
        """Each head's mean cross-entropy over the target tokens of ``dataset`` (labels not ``-100``), in one pass:
        ``{name: {"target_ce", "perplexity", "target_tokens"}}``, as :func:`backattn.evaluation.target_token_loss`
        gives for that head active."""
        was_training = self.training
        self.eval()
        device = self.model.lm_head.weight.device
        sums = torch.zeros(len(self.specs), dtype=torch.float64)
        tokens = 0
        try:
            for start in range(0, len(dataset), batch_size):
                batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
                batch = {k: _to(v, device) for k, v in batch.items() if k != "answer_labels"}
                output = self(**batch)
                count = int(output.target_tokens)
                if count:
                    sums += output.head_losses.double().cpu() * count
                    tokens += count
        finally:
            self.train(was_training)
        return {name: _summary(float(sums[k]), tokens) for k, name in enumerate(self.specs)}

    def save_heads(self, directory: str | os.PathLike, metrics: Mapping | None = None, **card) -> dict[str, Path]:
        """Save every head as an ordinary head directory, ``directory/<name>`` (``model.save_head``'s files);
        ``model.load_head(directory / name)`` loads one back. ``metrics`` (name -> metrics) go on each card; the
        head's sweep settings (learning rate, weight decay) are recorded in its metadata; ``card`` goes to
        ``save_head`` (``task``, ``training_data``, ``metadata``...)."""
        saved = {}
        for name, spec in self.specs.items():
            metadata = {**card.get("metadata", {}), "sweep": {k: v for k, v in vars(spec).items() if v is not None}}
            options = {**card, "metadata": metadata, "overwrite_model_card": True}
            if metrics and name in metrics:
                options["metrics"] = metrics[name]
            saved[name] = self.model.save_head(Path(directory) / name, head_name=name, **options)
        return saved

    def load_heads(self, directory: str | os.PathLike) -> None:
        """Put the weights saved by :meth:`save_heads` in ``directory`` back into the sweep's heads, in place."""
        for name in self.specs:
            self.model.load_head(Path(directory) / name, head_name=name, hotswap=True)


def _to(value, device):
    if isinstance(value, dict):
        return {k: v.to(device) for k, v in value.items()}
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _summary(loss_sum: float, tokens: int) -> dict[str, float]:
    loss = loss_sum / max(tokens, 1)
    return {"target_ce": loss, "perplexity": math.exp(loss), "target_tokens": tokens}


# --------------------------------------------------------------------------------------------------------
# the trainer


class SweepTrainer(Trainer):
    """The Transformers ``Trainer`` for a :class:`HeadSweep`: one optimiser, each head in its own parameter groups.

    Differences from the stock Trainer, each so that every head trains as it would alone:

    * the optimiser (``TrainingArguments.optim``, e.g. AdamW) has two groups per head (weight decay and none, as
      the Trainer splits them), each with that head's ``learning_rate`` and ``weight_decay``; the learning-rate
      schedule scales every group by the same factor;
    * ``max_grad_norm`` clips each head's gradient on its own (the stock Trainer clips the norm over every
      parameter, which would couple the heads); the logged ``grad_norm`` is still the norm over all heads;
    * checkpoints and ``save_model`` write one head directory per head (``save_head``'s files) instead of the
      whole model, and resuming or loading the best checkpoint puts them back in place;
    * training logs carry each head's loss (``loss_<name>``), evaluation each head's target CE
      (``eval_<name>_target_ce``) beside ``eval_loss``, the sum of the heads' target CEs.

    ``load_best_model_at_end`` picks one checkpoint for every head (by ``metric_for_best_model``: ``loss``, the
    sum of the heads' target CEs, or one head's ``<name>_target_ce``); to keep each head's own best, compare the
    heads' ``eval_<name>_target_ce`` in ``state.log_history`` and load their directories from those checkpoints.

    Written for single-process and data-parallel (DDP) runs, tested single-process; FSDP, DeepSpeed and XLA clip
    inside their own engines and are refused.
    """

    def __init__(self, model: HeadSweep, *args, head_metadata: dict | None = None, **kwargs):
        if not isinstance(model, HeadSweep):
            raise BackattnTypeError(f"SweepTrainer trains a HeadSweep, got {type(model).__name__}.")
        super().__init__(model, *args, **kwargs)
        if self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.XLA):
            raise BackattnValueError(
                f"SweepTrainer clips each head's gradient on its own, which {self.accelerator.distributed_type} "
                "does not allow; run the sweep single-process or data-parallel (DDP)."
            )
        self.head_metadata = head_metadata or {}
        self._head_loss_sums: torch.Tensor | None = None
        self._head_grad_norms: dict[str, float] = {}

    def _sweep(self) -> HeadSweep:
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def train(self, *args, **kwargs):
        """``Trainer.train``; a fresh run first fixes the statistics of heads with ``standardize_query_state``."""
        fit_for_a_fresh_run(self, self._sweep().model, args, kwargs)  # standardize_query_state's statistics
        return super().train(*args, **kwargs)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is not None:
            return self.optimizer
        sweep = self._sweep()
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, sweep)
        if not isinstance(optimizer_cls, type) or not issubclass(optimizer_cls, torch.optim.Optimizer):
            raise BackattnValueError(
                f"optim={self.args.optim!r} is not a per-parameter-group torch optimiser, which a sweep needs to "
                "give each head its own learning rate; use adamw_torch (the default) or another torch optimiser."
            )
        optimizer_kwargs = {k: v for k, v in optimizer_kwargs.items() if k not in ("params", "model")}
        rates = sweep.learning_rates(self.args.learning_rate)
        groups = []
        for name, head in sweep.heads.items():
            spec = sweep.specs[name]
            decay = set(self.get_decay_parameter_names(head))
            weight_decay = self.args.weight_decay if spec.weight_decay is None else spec.weight_decay
            trainable = [(n, p) for n, p in head.named_parameters() if p.requires_grad]
            for params, group_decay in (
                ([p for n, p in trainable if n in decay], weight_decay),
                ([p for n, p in trainable if n not in decay], 0.0),
            ):
                if params:
                    groups.append({"params": params, "weight_decay": group_decay, "lr": rates[name], "head": name})
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def _clip_grad_norm(self, model):
        """Each head's gradient clipped to ``max_grad_norm`` on its own; returns the norm over all heads (before
        clipping), as the stock Trainer reports it. Each head's norm is kept for the next log (``grad_norm_<name>``)."""
        self.accelerator.unscale_gradients()  # mixed precision: the gradients are unscaled once, before any norm
        norms = {
            name: torch.nn.utils.clip_grad_norm_(list(head.parameters()), self.args.max_grad_norm)
            for name, head in self._sweep().heads.items()
        }
        self._head_grad_norms = {name: float(norm) for name, norm in norms.items()}
        return torch.linalg.vector_norm(torch.stack([norm.float() for norm in norms.values()]))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        if model.training:
            losses = outputs["head_losses"].detach().float()
            if num_items_in_batch is None:  # a per-batch mean: the Trainer divides it across accumulated batches
                losses = losses / self.args.gradient_accumulation_steps
            self._head_loss_sums = losses if self._head_loss_sums is None else self._head_loss_sums + losses
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._head_loss_sums is not None:
            steps = max(self.state.global_step - getattr(self, "_head_losses_logged_at", 0), 1)
            sums = self.accelerator.reduce(self._head_loss_sums, reduction="mean").tolist()
            logs.update({f"loss_{name}": round(value / steps, 4) for name, value in zip(self._sweep().specs, sums)})
            logs.update({f"grad_norm_{name}": norm for name, norm in self._head_grad_norms.items()})
            self._head_loss_sums, self._head_losses_logged_at = None, self.state.global_step
        super().log(logs, start_time)

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ) -> EvalLoopOutput:
        """Each head's target CE on the evaluation data, in one pass (no predictions are gathered)."""
        sweep = self._sweep()
        was_training = sweep.training
        sweep.eval()
        device = sweep.model.lm_head.weight.device
        sums = torch.zeros(len(sweep.specs), dtype=torch.float64, device=device)
        tokens = torch.zeros((), dtype=torch.float64, device=device)
        samples = 0
        try:
            with torch.no_grad():
                for inputs in dataloader:
                    inputs = self._prepare_inputs(inputs)
                    output = sweep(**inputs)
                    sums += output.head_losses.double() * output.target_tokens
                    tokens += output.target_tokens
                    samples += inputs["labels"].shape[0]
        finally:
            sweep.train(was_training)
        sums, tokens = self.accelerator.reduce(sums, "sum"), self.accelerator.reduce(tokens, "sum")
        losses = (sums / tokens.clamp(min=1)).tolist()
        metrics = {f"{metric_key_prefix}_{name}_target_ce": loss for name, loss in zip(sweep.specs, losses)}
        metrics[f"{metric_key_prefix}_loss"] = sum(losses)
        return EvalLoopOutput(predictions=None, label_ids=None, metrics=metrics, num_samples=samples)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        self._sweep().save_heads(output_dir, metadata=self.head_metadata)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        self._sweep().load_heads(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self._sweep().load_heads(self.state.best_model_checkpoint)


__all__ = ["HeadSweep", "SweepHead", "SweepOutput", "SweepTrainer", "check_sweep_heads", "sweep_cross_entropy"]
