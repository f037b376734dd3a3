"""Fixing the statistics of ``standardize_query_state`` (step 5) from training rows, once, before training.

A head with ``standardize_query_state`` divides its query state per dimension, ``(r_t - mu) / sqrt(sigma^2 + eps)``
(see :class:`~backattn.BackwardAttentionConfig`). ``mu`` and ``sigma^2`` are not trained: they are the mean and
variance of ``r_t`` over the labelled positions (those whose next token carries a label) of the first rows of
the training set, as a linear probe standardises its features before fitting. :class:`~backattn.trainer.HeadTrainer`
calls :func:`fit_query_standardization` at the start of a fresh run; the statistics travel in the head's file.
"""

from __future__ import annotations

import torch

from .errors import BackattnValueError

#: Training rows read for the statistics (in the training set's order).
DEFAULT_ROWS = 256
#: The columns of a training row the statistics read (the rest, such as prompt text, is left to the Trainer).
MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "base_hidden_states", "base_layer_states")


def needs_standardization(model) -> list[str]:
    """The heads of ``model`` with ``standardize_query_state`` whose statistics are still the identity (0 and 1)."""
    heads = getattr(model, "heads", None) or {}
    return [name for name, head in heads.items() if head.query_mean is not None and _is_identity(head)]


def _is_identity(head) -> bool:
    return bool((head.query_mean == 0).all() and (head.query_variance == 1).all())


@torch.no_grad()
def fit_query_standardization(
    model, dataset, data_collator, num_rows: int = DEFAULT_ROWS, batch_size: int = 8, head_names=None
) -> list[str]:
    """Set ``mu`` and ``sigma^2`` of the heads ``head_names`` (default: those :func:`needs_standardization` names)
    from the first ``num_rows`` rows of ``dataset``, batched by ``data_collator``; returns the heads set.

    Rows are what the model trains on: token ids (the base runs on them) or cached features
    (``base_hidden_states``, with ``base_layer_states`` for ``query_layers``); each needs ``labels``."""
    names = needs_standardization(model) if head_names is None else list(head_names)
    if not names:
        return []
    rows = [{k: v for k, v in dataset[i].items() if k in MODEL_INPUTS} for i in range(min(num_rows, len(dataset)))]
    states: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(rows), batch_size):
            batch = data_collator(rows[start : start + batch_size])
            hidden, layer_states = _base_states(model, batch, device)
            labels = batch["labels"].to(device)
            keep = torch.zeros_like(labels, dtype=torch.bool)
            keep[:, :-1] = labels[:, 1:] != -100  # position t predicts token t + 1
            for name in names:
                head = model.heads[name]
                layers = head.config.query_layers
                stacked = None if layers is None else torch.stack([layer_states[k] for k in layers], dim=-2)[keep]
                dtype = head.layers[0].w_key.dtype
                states[name].append(head.unstandardized_query_state(hidden[keep].to(dtype), stacked))
    finally:
        model.train(was_training)
    for name in names:
        collected = torch.cat(states[name])
        if collected.shape[0] < 2:
            raise BackattnValueError(
                f"Head {name!r} standardises its query state, but the first {len(rows)} training rows hold "
                f"{collected.shape[0]} labelled position(s): it needs at least 2. Check the labels."
            )
        model.heads[name].set_query_standardization(collected)
    return names


def fit_for_a_fresh_run(trainer, model, train_args: tuple, train_kwargs: dict) -> None:
    """What a head trainer's ``train(*train_args, **train_kwargs)`` does first: unless it resumes from a checkpoint
    (which holds the statistics), fit those of ``model``'s heads from the trainer's training set."""
    resuming = train_kwargs.get("resume_from_checkpoint") or (train_args[0] if train_args else None)
    if not resuming and trainer.train_dataset is not None:
        fit_query_standardization(model, trainer.train_dataset, trainer.data_collator,
                                  batch_size=trainer.args.per_device_train_batch_size)  # fmt: skip


def _base_states(model, batch: dict, device) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The base's final hidden states of a batch and the outputs of the blocks its heads read."""
    if "base_hidden_states" in batch:
        hidden = batch["base_hidden_states"].to(device)
        return hidden, model._given_layer_states(batch.get("base_layer_states"), hidden)
    mask = batch.get("attention_mask")
    with model.capture_block_outputs(model.feature_layers()) as layer_states:
        output = model.base_model(input_ids=batch["input_ids"].to(device),
                                  attention_mask=None if mask is None else mask.to(device))  # fmt: skip
    return output.last_hidden_state, dict(layer_states)
