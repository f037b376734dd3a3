"""The head's training loss without ``batch x sequence x vocabulary`` tensors.

The straightforward loss builds the base logits ``l_t = h_t W^T`` and the head's logits for every position
(``batch x sequence x V`` each, ``V = 50257`` for GPT-2), then a cross-entropy over them. Here only the
positions that carry a label are scored, ``chunk_size`` of them at a time, and each chunk's gradient with
respect to the head is taken right away (as Liger-Kernel's fused linear cross-entropy does for an output
layer), so nothing vocabulary-sized outlives its chunk and nothing is recomputed in the backward pass:

1. pair each position with the next token's label and keep the ``N`` positions whose label is not ignored;
2. compute the head's weight-only tables (``K``, ``Vv``, and ``W^T Vv`` for raw weighting) once, with autograd;
3. for each chunk of positions: ``l = h W^T``, the head's logits ``z`` (``head_kernels.head_logits``),
   ``sum CE(z, y)`` (over the label words ``z[C]`` alone with the head's ``label_word_ids``; plus
   ``beta KL(softmax(l) || softmax(z))`` with its ``base_kl_weight``) and its gradients with respect to the
   tables and the head's other weights, accumulated;
4. the loss is the sum over chunks divided by ``num_items_in_batch`` (when the Trainer passes it, as for
   gradient accumulation) or by ``N``, as ``transformers``' own causal-LM loss divides it.

A head that reads the sequence around each position (``query_layers``, ``copy_attention``) gets its per-position
inputs once for the whole batch (:meth:`~backattn.modeling_backattn.BackwardAttentionHead.context_inputs`; the
copy attention's ``log a_tj`` with autograd, as the tables) and each chunk takes its positions' rows of them.
A copy head's ``copy_loss_weight`` term (:func:`copy_supervision`) reads those ``N x S`` weights alone, so it is
taken once for the batch, outside the chunks.

Results and gradients equal the straightforward computation's to float rounding (tested). A batch with
no labelled position is refused (:class:`~backattn.errors.BackattnValueError`: the mean over no tokens is
0/0) unless ``num_items_in_batch`` counts the labelled tokens of a larger accumulated batch, which this part
then adds 0 to. Only the head gets gradients: the model takes this path only when the base's hidden
states, output layer and embeddings are frozen.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint
from transformers.utils import ModelOutput

from .errors import BackattnValueError
from .head_kernels import head_logits, weight_tables
from .modeling_backattn import CopyInputs, LayerTables, SequenceContext


class _EagerChunkedLoss(torch.autograd.Function):
    """``sum_c chunk_loss(c, *tensors)`` whose gradients are taken chunk by chunk in the forward pass.

    The backward pass only scales the accumulated gradients by the incoming gradient, which is exact
    because the loss is a sum over chunks and the outer gradient is a scalar. Gradients accumulate in
    float32 at least, and are returned in each input's dtype.
    """

    @staticmethod
    def forward(ctx, chunk_loss: Callable, num_chunks: int, *tensors: torch.Tensor) -> torch.Tensor:
        wanted = [i for i, needed in enumerate(ctx.needs_input_grad[2:]) if needed]
        grads: list[torch.Tensor | None] = [None] * len(tensors)
        total = torch.zeros((), dtype=torch.float32, device=tensors[0].device)
        for chunk in range(num_chunks):
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_(i in wanted) for i, t in enumerate(tensors)]
                loss = chunk_loss(chunk, *leaves)
                parts = torch.autograd.grad(loss, [leaves[i] for i in wanted], allow_unused=True) if wanted else ()
            total += loss.detach()
            for i, part in zip(wanted, parts):
                if part is not None:
                    part = part.to(torch.promote_types(part.dtype, torch.float32))
                    grads[i] = part if grads[i] is None else grads[i].add_(part)
        ctx.grads, ctx.dtypes = grads, [t.dtype for t in tensors]
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grads = [None if g is None else (g * grad_output.to(g.dtype)).to(d) for g, d in zip(ctx.grads, ctx.dtypes)]
        return (None, None, *grads)


class _HeadLogits(nn.Module):
    """``head_kernels.head_logits`` as a module's forward, so that ``functional_call`` can swap the head's weights."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, logits, hidden, embeddings, output_weight, tables, layer_states=None, copy=None):
        return head_logits(
            self.head, logits, hidden, embeddings, output_weight, tables=tables, layer_states=layer_states, copy=copy
        )


def labelled_positions(
    hidden: torch.Tensor,
    labels: torch.Tensor | None,
    shift_labels: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1: the hidden states (``N x d``) of the positions with a next-token label, and those labels.

    ``labels`` are aligned with the inputs (as for every ``...ForCausalLM``); ``shift_labels`` already
    hold the next token of each position.
    """
    keep, shift_labels = _labelled(hidden, labels, shift_labels, ignore_index)
    return hidden[keep], shift_labels[keep]


def _labelled(hidden, labels, shift_labels, ignore_index) -> tuple[torch.Tensor, torch.Tensor]:
    """Which positions carry a next-token label (``batch x sequence``), and every position's next-token label."""
    if shift_labels is None:
        shift_labels = F.pad(labels[..., 1:], (0, 1), value=ignore_index)
    shift_labels = shift_labels.to(hidden.device)
    return shift_labels != ignore_index, shift_labels


def base_logits(
    hidden: torch.Tensor,
    output_weight: torch.Tensor,
    output_bias: torch.Tensor | None = None,
    transform_logits: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``l_t = f(h_t W^T + b)`` of a chunk of positions (``n x d`` -> ``n x V``), as the chunked loss makes them
    (``b``: the output layer's bias, ``f``: the base's own post-processing such as soft-capping; each optional)."""
    logits = hidden @ output_weight.T if output_bias is None else F.linear(hidden, output_weight, output_bias)
    return logits if transform_logits is None else transform_logits(logits)


def token_losses(
    z: torch.Tensor,
    logits: torch.Tensor,
    targets: torch.Tensor,
    base_kl_weight: float = 0.0,
    label_word_ids: list[int] | None = None,
):
    """``sum_t CE(z_t, y_t) + beta KL(softmax(l_t) || softmax(z_t))`` over a chunk's positions (``n x V`` each):
    the head's logits ``z``, the base logits ``l`` and ``beta = base_kl_weight`` (see
    :class:`~backattn.configuration_backattn.BackwardAttentionConfig`; at 0 only the cross-entropy is taken),
    in float32 as ``transformers``' causal-LM loss takes it. With ``label_word_ids`` ``C`` the cross-entropy is
    over ``z_t[C]`` alone (:func:`label_word_targets`); the KL term stays over the whole vocabulary."""
    z = z.float()
    if label_word_ids is not None:  # the targets were checked once for the batch (check_label_word_targets)
        ce = F.cross_entropy(z[:, label_word_ids], label_word_targets(targets, label_word_ids), reduction="sum")
        return ce if not base_kl_weight else ce + base_kl_weight * base_kl(torch.log_softmax(z, -1), logits).sum()
    if not base_kl_weight:
        return F.cross_entropy(z, targets, reduction="sum")
    log_q = torch.log_softmax(z, dim=-1)  # one softmax for both terms
    return F.nll_loss(log_q, targets, reduction="sum") + base_kl_weight * base_kl(log_q, logits).sum()


def label_word_targets(targets: torch.Tensor, label_word_ids: list[int]) -> torch.Tensor:
    """Each target token's index in ``label_word_ids`` (the classes of the label-word loss); -1 for a target that
    is not a label word (which :func:`check_label_word_targets` refuses)."""
    matches = targets[..., None] == torch.as_tensor(label_word_ids, device=targets.device)
    return torch.where(matches.any(-1), matches.long().argmax(-1), -1)


def check_label_word_targets(targets: torch.Tensor, label_word_ids: list[int] | None) -> None:
    """A clear error when a labelled target is not one of ``label_word_ids`` (once per batch, in eager mode; under
    ``torch.compile`` :func:`label_word_loss` makes such a batch's loss NaN instead)."""
    if label_word_ids is None or torch.compiler.is_compiling():
        return
    stray = label_word_targets(targets, label_word_ids) < 0
    if bool(stray.any()):
        examples = sorted(set(targets[stray].tolist()))[:5]
        raise BackattnValueError(
            f"The head's label_word_ids are {label_word_ids}, but the labels hold other tokens too (e.g. "
            f"{examples}): the label-word loss needs every labelled target to be a label word. Label the label word "
            "alone (a classification row's answer_labels do; train_sft.py --label_word_loss trains on them), or "
            "train this head on the whole vocabulary: model.heads.set_training_options(name, label_word_ids=None)."
        )


def base_kl(log_q: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(l_t) || softmax(z_t))`` per position (``... x V -> ...``) from the head's float32
    log-probabilities ``log_q = log_softmax(z_t)``. The base's distribution is the fixed reference: no gradient
    reaches ``l`` (a LoRA on the base, say)."""
    log_p = torch.log_softmax(logits.detach().float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def base_kl_penalty(
    z: torch.Tensor,
    logits: torch.Tensor,
    weights: torch.Tensor,
    labels: torch.Tensor | None,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """The straightforward path's KL-to-base term: ``sum_t beta_row KL(softmax(l_t) || softmax(z_t))`` over the
    labelled positions (``z``, ``l``: ``batch x sequence x V``; ``weights``: each row's ``beta``), divided as the
    cross-entropy is (:func:`per_target`), so that it adds to ``transformers``' causal-LM loss exactly as
    :func:`token_losses` adds to the chunked one."""
    keep, _ = _labelled(z, labels, shift_labels, ignore_index)
    # masked rather than indexed: no data-dependent shapes (torch.compile's fullgraph)
    kl = base_kl(torch.log_softmax(z.float(), dim=-1), logits)
    return per_target((weights.to(z.device)[:, None] * keep * kl).sum(), keep.sum(), num_items_in_batch)


def label_word_loss(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    label_word_ids: list[int],
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """The label-word loss from whole logits (``batch x sequence x V``, any causal LM's): at each labelled
    position ``-log softmax(z_t[C])[y_t]`` over the label words ``C = label_word_ids``, divided as the causal-LM
    loss is (:func:`per_target`). The straightforward path's counterpart of :func:`token_losses` with
    ``label_word_ids``, and, through :class:`LabelWordLoss`, a ``Trainer``'s ``compute_loss_func`` for any model
    (a PEFT LoRA, say) trained with the same objective. A labelled target that is not a label word is refused
    (:func:`check_label_word_targets`), or while compiling makes the loss NaN (never a wrong class)."""
    keep, targets = _labelled(logits, labels, shift_labels, ignore_index)
    # masked rather than indexed: no data-dependent shapes (torch.compile's fullgraph)
    targets = torch.where(keep, targets, label_word_ids[0])
    check_label_word_targets(targets, label_word_ids)
    classes = label_word_targets(targets, label_word_ids)
    words = logits[..., label_word_ids].float()
    losses = F.cross_entropy(words.flatten(0, -2), classes.clamp(min=0).flatten(), reduction="none").view_as(keep)
    losses = torch.where(classes < 0, torch.nan, losses)  # a stray target (only unchecked, while compiling): NaN
    return per_target((losses * keep).sum(), keep.sum(), num_items_in_batch)


class LabelWordLoss:
    """``compute_loss_func`` for ``transformers.Trainer``: :func:`label_word_loss` of the model's ``logits``, so
    that a model without a head (a PEFT LoRA, say) trains on the objective of a head with ``label_word_ids``.
    Train on rows whose labels mark the label word alone (a classification row's ``answer_labels``). The
    ``Trainer`` calls it for its evaluation loss too, where a head's own loss is the plain cross-entropy."""

    def __init__(self, label_word_ids: list[int]):
        self.label_word_ids = list(label_word_ids)

    def __call__(self, outputs, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None):
        return label_word_loss(outputs.logits, labels, self.label_word_ids, num_items_in_batch=num_items_in_batch)


def copy_supervision(copy: CopyInputs, targets: torch.Tensor) -> torch.Tensor:
    """``-log c_t(y_t)`` at each position whose target is copyable (``x_{j+1} = y_t`` for some attended ``j``), 0
    elsewhere: the term ``copy_loss_weight`` weighs. ``c_t(y) = sum_{j: x_{j+1} = y} a_tj`` from step 8's
    ``log a_tj`` (``copy.log_weights``, ``... x S``, ``-inf`` outside ``J_t``) and the tokens ``x_{j+1}``
    (``copy.next_ids``), for the targets ``y_t`` (``...``; an ignored label matches no token). Nothing
    vocabulary-sized is made."""
    hits = (copy.next_ids == targets[..., None].to(copy.next_ids.device)) & torch.isfinite(copy.log_weights)
    copyable = hits.any(-1, keepdim=True)
    # rows with no hit take logsumexp over zeros (finite, and dropped below): no -inf - -inf in the backward
    log_weights = torch.where(copyable, copy.log_weights.float().masked_fill(~hits, -math.inf), 0.0)
    return -torch.where(copyable[..., 0], torch.logsumexp(log_weights, dim=-1), 0.0)


def per_target(total: torch.Tensor, count, num_items_in_batch: int | torch.Tensor | None) -> torch.Tensor:
    """A loss summed over target tokens, divided as ``transformers``' causal-LM loss divides it: by
    ``num_items_in_batch`` when the Trainer passes it (gradient accumulation), else by the ``count`` of targets."""
    if num_items_in_batch is None:
        return total / count
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def check_has_targets(positions: torch.Tensor, num_items_in_batch, ignore_index: int) -> None:
    """A clear error for a batch without one labelled position (its mean loss would be 0/0)."""
    if not positions.shape[0] and (num_items_in_batch is None or int(num_items_in_batch) == 0):
        raise BackattnValueError(
            f"No target tokens in this batch: every label the loss reads is {ignore_index}, so the loss is "
            "undefined (0/0). Drop the batch, or check the collator and max_length (prompts may fill the whole "
            "sequence); with gradient accumulation pass num_items_in_batch, the labelled tokens of the whole batch."
        )


def labelled_context(head: nn.Module, context: SequenceContext | None, keep: torch.Tensor):
    """What a head with ``query_layers`` or ``copy_attention`` reads of the sequence, at the labelled positions
    ``keep``: ``(layer_states, copy)``, each ``None`` where the head does not read it."""
    if head.config.query_layers is None and not head.config.copy_attention:
        return None, None
    if context is None:
        raise BackattnValueError("This head reads the sequence around each position: pass context=.")
    layer_states, copy = head.context_inputs(context)
    layer_states = None if layer_states is None else layer_states[keep]
    copy = None if copy is None else CopyInputs(copy.log_weights[keep], copy.next_ids[keep])
    return layer_states, copy


def head_cross_entropy(
    head: nn.Module,
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
) -> torch.Tensor:
    """Steps 1-4: the causal-LM cross-entropy of ``head``'s logits over the base logits, chunk by chunk (over the
    label words alone when the head's ``label_word_ids`` are set), plus ``beta KL(softmax(l_t) || softmax(z_t))``
    at each position when the head's ``base_kl_weight`` ``beta`` is set, plus ``gamma`` times
    :func:`copy_supervision` when its ``copy_loss_weight`` ``gamma`` is.

    ``hidden`` (``batch x sequence x d``) are the base's final hidden states and ``output_weight`` its output
    layer ``W`` (``V x d``); the base logits are ``l_t = f(h_t W^T + b)``, with the output layer's bias ``b``
    (``output_bias``, ``None``: none) and the base's own post-processing ``f`` (``transform_logits``, e.g. Gemma's
    soft-capping ``c tanh(l / c)`` or a logit scale; ``None``: the identity), both applied inside each chunk, so
    nothing vocabulary-sized is made for the whole batch. The ``W^T Vv`` shortcut of raw weighting is taken only
    when ``l_t = h_t W^T`` exactly (no bias, no ``f``). Only the head's weights receive gradients. ``context`` is
    the sequence (its ``positions`` every one of ``hidden``'s), for a head with ``query_layers`` or ``copy_attention``.
    """
    keep, shift_targets = _labelled(hidden, labels, shift_labels, ignore_index)
    positions, targets = hidden[keep], shift_targets[keep]
    layer_states, copy = labelled_context(head, context, keep)
    check_has_targets(positions, num_items_in_batch, ignore_index)
    check_label_word_targets(targets, head.config.label_word_ids)
    linear = output_bias is None and transform_logits is None  # l_t = h_t W^T: the W^T Vv shortcut holds
    tables = weight_tables(head, embeddings, output_weight if linear else None)
    dtype = head.layers[0].w_key.dtype
    positions, output_weight = positions.to(dtype), output_weight.to(dtype)
    output_bias = None if output_bias is None else output_bias.to(dtype)
    flat_tables = [t for layer in tables for t in layer if t is not None]
    copy_weights = () if copy is None else (copy.log_weights,)  # N x S, made with autograd: an input as the tables
    scorer = _HeadLogits(head)
    names, parameters = zip(*scorer.named_parameters())
    num_chunks = -(-positions.shape[0] // chunk_size)

    def chunk_loss(chunk: int, *tensors: torch.Tensor) -> torch.Tensor:
        weights = tensors[: len(names)]
        table_tensors = iter(tensors[len(names) : len(tensors) - len(copy_weights)])
        chunk_tables = [LayerTables(*(None if t is None else next(table_tensors) for t in layer)) for layer in tables]
        rows = slice(chunk * chunk_size, (chunk + 1) * chunk_size)
        h = positions[rows]
        chunk_states = None if layer_states is None else layer_states[rows]
        chunk_copy = None if copy is None else CopyInputs(tensors[-1][rows], copy.next_ids[rows])
        logits = base_logits(h, output_weight, output_bias, transform_logits)
        shortcut = output_weight if linear else None
        arguments = (logits, h, embeddings, shortcut, chunk_tables, chunk_states, chunk_copy)
        z = functional_call(scorer, dict(zip(names, weights)), arguments)
        return token_losses(z, logits, targets[rows], head.config.base_kl_weight, head.config.label_word_ids)

    total = _EagerChunkedLoss.apply(chunk_loss, num_chunks, *parameters, *flat_tables, *copy_weights)
    if head.config.copy_loss_weight:  # copy is set: the option needs copy_attention
        total = total + head.config.copy_loss_weight * copy_supervision(copy, targets).sum()
    return per_target(total, positions.shape[0], num_items_in_batch)


# --------------------------------------------------------------------------------------------------------
# per-token log-probabilities through the head: the fused LM-head protocol of TRL's trainers


@dataclass
class FusedHeadOutput(ModelOutput):
    """What ``forward(..., labels=..., fused_lm_head=True)`` returns: the fields of TRL's
    ``FusedCausalLMOutput`` (``trl.trainer.utils.add_fused_lm_head``), computed from the active head's logits.

    Every per-token field has the shape of the shifted labels (``batch x (sequence - 1)``, or of
    ``shift_labels``) and is zero where the label is ignored. ``log_probs`` carries gradients; the others
    do not.
    """

    loss: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    label_mask: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


def _token_statistics(score: Callable, inputs: torch.Tensor, targets: torch.Tensor, temperature: float, *extras):
    z = score(inputs, *extras).float() / temperature
    log_probs = torch.log_softmax(z, dim=-1)
    chosen = log_probs.gather(-1, targets[:, None])[:, 0]
    with torch.no_grad():
        probs = log_probs.exp()
        entropy = -(probs * log_probs).sum(-1)
        log_sum_sq_probs = torch.logsumexp(2 * log_probs, dim=-1)
        mean_logits = z.mean(-1)
        is_top1 = z.argmax(-1) == targets
    return chosen, entropy, log_sum_sq_probs, mean_logits, is_top1


def head_token_log_probs(
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    labels: torch.Tensor | None,
    chunk_size: int,
    shift_labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    num_items_in_batch: int | torch.Tensor | None = None,
    extras: tuple[torch.Tensor, ...] = (),
) -> FusedHeadOutput:
    """The log-probability (and entropy, top-1 hit, ...) of each next-token label under ``score``'s logits.

    ``score(h, rows)`` gives the logits (``n x V``) of ``n`` positions from their hidden states ``h``
    (``n x d``) and batch rows ``rows``. Only the labelled positions are scored, ``chunk_size`` at a time,
    and with gradients each chunk is recomputed in the backward pass (``torch.utils.checkpoint``) instead
    of keeping its logits: nothing vocabulary-sized outlives its chunk. ``loss`` is the mean negative
    log-likelihood (over ``num_items_in_batch`` when given), as the model's own loss. ``extras`` are further
    per-position inputs (``batch x sequence x ...``, as ``hidden``), taken position by position as ``hidden`` is and
    passed on: ``score(h, rows, *extras)``.
    """
    if shift_labels is None:
        hidden, targets = hidden[:, :-1], labels[:, 1:]
        extras = tuple(extra[:, :-1] for extra in extras)
    else:
        targets = shift_labels
    targets = targets.to(hidden.device)
    mask = targets != ignore_index
    rows = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]
    positions, goals = hidden[mask], targets[mask]
    extras = tuple(extra[mask] for extra in extras)
    wants_grad = torch.is_grad_enabled()
    parts = []
    for start in range(0, positions.shape[0], chunk_size):
        chunk = slice(start, start + chunk_size)

        def chunk_score(h: torch.Tensor, *chunk_extras, chunk_rows: torch.Tensor = rows[chunk]) -> torch.Tensor:
            return score(h, chunk_rows, *chunk_extras)

        arguments = (chunk_score, positions[chunk], goals[chunk], temperature, *(extra[chunk] for extra in extras))
        if wants_grad:
            parts.append(checkpoint(_token_statistics, *arguments, use_reentrant=False))
        else:
            parts.append(_token_statistics(*arguments))
    fields = []
    for index in range(5):
        values = [part[index] for part in parts]
        empty_dtype = torch.bool if index == 4 else torch.float32
        flat = torch.cat(values) if values else positions.new_zeros(0, dtype=empty_dtype)
        fields.append(flat.new_zeros(mask.shape).masked_scatter(mask, flat))
    log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1 = fields
    count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    if isinstance(count, torch.Tensor):
        count = count.to(log_probs.device)
    return FusedHeadOutput(
        loss=-log_probs.sum() / count,
        log_probs=log_probs,
        entropy=entropy,
        log_sum_sq_probs=log_sum_sq_probs,
        mean_logits=mean_logits,
        is_top1=is_top1,
        label_mask=mask,
    )
