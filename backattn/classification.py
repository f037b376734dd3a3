"""Classification by label-word likelihood: a causal LM picks the class whose label word it finds most likely
after the prompt, so a frozen base (zero-shot) and the base with a trained head are scored the same way.

For each held-out row (tokenized by :func:`backattn.data.classification_data.tokenize_classification`), each class's
target (the target template with that class's label word, e.g. ``" positive"``, tokenized as in training, without
the end-of-sequence token) is scored as ``log p(target | prompt)`` with
:func:`backattn.evaluation.continuation_log_likelihoods` (the prompt runs once; its key-value cache serves every
class), or, when every class's target is a single token, from the next-token distribution at the prompt's last
position in batched passes (the same numbers, faster; and with a feature cache, from the cached base states).
The prediction is the class of highest log-likelihood (the first class on a tie).

Metrics (:func:`classification_metrics`): accuracy and macro-F1 (the ``label_accuracy_f1`` metric, averaged over
every class), the label CE (``-log p`` of the gold target per token) and the majority-class rate (the share of the
most common gold class: what always answering it scores), each with a 95% percentile-bootstrap interval
(:mod:`backattn.bootstrap`) that resamples groups (movies), then rows within them, when the rows carry a ``group``.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
from tqdm.auto import tqdm

from .bootstrap import Interval, bootstrap_interval, bootstrap_statistic
from .data.sft_data import IGNORE_INDEX
from .errors import BackattnValueError
from .evaluation import continuation_log_likelihoods

N_RESAMPLES = 2000


def label_candidates(tokenizer, template, classes) -> list[list[int]]:
    """Each class's target tokens (no end-of-sequence token), as ``tokenize_classification`` tokenizes them."""
    candidates = [tokenizer(template.render_target(word), add_special_tokens=False)["input_ids"] for word in classes]
    if any(not tokens for tokens in candidates):
        raise ValueError(f"A class's target tokenizes to nothing: {dict(zip(classes, candidates))}.")
    if len({tuple(tokens) for tokens in candidates}) < len(candidates):
        raise ValueError(f"Two classes' targets tokenize alike, so no score can tell them apart: {classes}.")
    return candidates


def label_word_training_rows(examples, tokenizer, template, classes):
    """For the label-word loss: the classes' one-token label-word ids (a head's ``label_word_ids``) and the
    training rows labelled at the label word alone (their ``answer_labels``); a clear error when a label word is
    more than one token."""
    candidates = label_candidates(tokenizer, template, classes)
    if any(len(tokens) != 1 for tokens in candidates):
        spelled = {word: tokenizer.convert_ids_to_tokens(tokens) for word, tokens in zip(classes, candidates)}
        raise BackattnValueError(
            f"--label_word_loss needs every class's label word to be one token, but they tokenize as {spelled}: "
            "choose one-token label words (--label_words) or a --target_template that makes them so."
        )
    rows = examples.remove_columns("labels").rename_column("answer_labels", "labels")
    return [tokens[0] for tokens in candidates], rows


def prompt_tokens(example: dict) -> list[int]:
    """The prompt's token ids of a tokenized row: the positions before the first target label."""
    length = next((i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX), len(example["labels"]))
    return list(example["input_ids"][:length])


@torch.no_grad()
def label_log_likelihoods(
    model, tokenizer, examples, candidates, scored=None, batch_size: int = 8, progress: bool = False, method=None
) -> np.ndarray:
    """``(rows, classes)``: ``log p(candidate | prompt)`` of every class for every tokenized row.

    ``method`` ``"shared_prefix"`` (the default when some class's target has several tokens): per row,
    :func:`backattn.evaluation.continuation_log_likelihoods`, the prompt run once for all classes.
    ``"next_token"`` (the default when every class's target is one token): the same numbers from batched
    teacher-forced passes over the rows (``scored``: the same rows with cached base features, default
    ``examples``), reading the distribution at each prompt's last position; rows are batched by length.
    """
    single = all(len(tokens) == 1 for tokens in candidates)
    method = method or ("next_token" if single else "shared_prefix")
    if method not in ("next_token", "shared_prefix"):
        raise ValueError(f"method must be 'next_token' or 'shared_prefix', got {method!r}.")
    if method == "next_token" and not single:
        raise ValueError("The next-token method needs every class's target to be one token; use 'shared_prefix'.")
    model.eval()
    if method == "shared_prefix":
        scores = [
            continuation_log_likelihoods(model, prompt_tokens(example), candidates)
            for example in tqdm(examples, desc="Scoring labels", disable=not progress)
        ]
        return np.asarray(scores, dtype=float).reshape(len(examples), len(candidates))

    from .data.sft_data import SFTCollator

    rows = scored if scored is not None else examples
    if len(rows) != len(examples):
        raise ValueError(f"scored holds {len(rows)} rows, examples {len(examples)}.")
    collator, device = SFTCollator(tokenizer), next(model.parameters()).device
    tokens = torch.tensor([c[0] for c in candidates], device=device)
    order = np.argsort([len(ids) for ids in examples["input_ids"]], kind="stable")
    scores = np.zeros((len(examples), len(candidates)))
    for start in tqdm(range(0, len(order), batch_size), desc="Scoring labels", disable=not progress):
        indices = order[start : start + batch_size]
        batch = {
            k: v.to(device) if torch.is_tensor(v) else v for k, v in collator([rows[int(i)] for i in indices]).items()
        }
        labels = batch.pop("labels")
        last = (labels != IGNORE_INDEX).int().argmax(1) - 1  # each prompt's last position
        logits = model(**batch).logits[torch.arange(len(indices), device=device), last].float()
        scores[indices] = torch.log_softmax(logits, -1)[:, tokens].cpu().numpy()
    return scores


def classify(
    model, tokenizer, examples, template, classes, scored=None, batch_size: int = 8, progress: bool = False, method=None
) -> dict:
    """Per row: the classes' log-likelihoods (:func:`label_log_likelihoods`), the predicted and gold classes, the
    gold target's loss and tokens, and the row's group (``None`` without a ``group`` column)."""
    classes = tuple(classes)
    candidates = label_candidates(tokenizer, template, classes)
    scores = label_log_likelihoods(model, tokenizer, examples, candidates, scored, batch_size, progress, method)
    gold = [classes.index(label) for label in examples["label"]]
    groups = list(examples["group"]) if "group" in examples.column_names else None
    return {
        "classes": classes,
        "log_likelihoods": scores,
        "predictions": [classes[i] for i in scores.argmax(1)],
        "references": list(examples["label"]),
        "label_loss": [-float(scores[row, g]) for row, g in enumerate(gold)],
        "label_tokens": [len(candidates[g]) for g in gold],
        "groups": groups,
    }


def _one_hot(labels, classes) -> np.ndarray:
    return (np.asarray(labels, dtype=object)[:, None] == np.asarray(classes, dtype=object)[None, :]).astype(float)


def macro_f1_statistic(predictions, references, classes):
    """A function of resample weights ``(B, n)`` -> macro-F1 of each resample (every class counted, a class
    without a true positive scoring 0: the ``label_accuracy_f1`` metric's definition)."""
    predicted, actual = _one_hot(predictions, classes), _one_hot(references, classes)
    hits = predicted * actual

    def statistic(weights: np.ndarray) -> np.ndarray:
        tp, count = weights @ hits, weights @ predicted + weights @ actual
        f1 = np.divide(2 * tp, count, out=np.zeros_like(tp), where=tp > 0)
        return f1.mean(1)

    return statistic


def _interval(value: Interval) -> list[float]:
    return [value.low, value.high]


def classification_metrics(scores: dict, n_resamples: int = N_RESAMPLES, seed: int = 0, level: float = 0.95) -> dict:
    """Accuracy, macro-F1, label CE and majority-class rate of :func:`classify`'s output, each with its bootstrap
    interval (``<name>_ci``: ``[low, high]``), plus the per-class F1, the predicted and gold class counts."""
    from .metrics import load_metric

    classes, predictions, references = scores["classes"], scores["predictions"], scores["references"]
    groups = scores["groups"]
    n = len(references)
    options = {"groups": groups, "level": level, "n_resamples": n_resamples, "seed": seed}
    metric = load_metric("label_accuracy_f1", keep_in_memory=True)
    computed = metric.compute(predictions=predictions, references=references, labels=list(classes))
    correct = [float(p == r) for p, r in zip(predictions, references)]
    majority_label = Counter(references).most_common(1)[0][0]
    intervals = {
        "accuracy": bootstrap_interval(correct, **options),
        "macro_f1": bootstrap_statistic(macro_f1_statistic(predictions, references, classes), n, **options),
        "label_ce": bootstrap_interval(scores["label_loss"], scores["label_tokens"], **options),
        "majority_rate": bootstrap_interval([float(r == majority_label) for r in references], **options),
    }
    results = {}
    for name, interval in intervals.items():
        results[name] = interval.estimate
        results[f"{name}_ci"] = _interval(interval)
    results["accuracy"], results["macro_f1"] = computed["accuracy"], computed["macro_f1"]  # the metric's own
    results.update(
        majority_label=majority_label,
        per_label_f1=computed["per_label_f1"],
        predicted=dict(Counter(predictions)),
        gold=dict(Counter(references)),
        examples=n,
        groups=len(set(groups)) if groups is not None else None,
        interval=f"{level:.0%} percentile bootstrap, {n_resamples} resamples"
        + (" of groups, then rows within them" if groups is not None else " of rows"),
    )
    return results


def paired_differences(
    scores: dict, baseline: dict, n_resamples: int = N_RESAMPLES, seed: int = 0, level: float = 0.95
) -> dict:
    """Accuracy and macro-F1 of ``scores`` minus those of ``baseline`` on the same rows, each with the paired
    bootstrap interval (both taken on the same resamples)."""
    if scores["references"] != baseline["references"]:
        raise ValueError("The two models were not scored on the same rows.")
    references, classes, groups = scores["references"], scores["classes"], scores["groups"]
    options = {"groups": groups, "level": level, "n_resamples": n_resamples, "seed": seed}
    correct = [float(p == r) for p, r in zip(scores["predictions"], references)]
    before = [float(p == r) for p, r in zip(baseline["predictions"], references)]
    f1, f1_before = (macro_f1_statistic(s["predictions"], references, classes) for s in (scores, baseline))
    accuracy = bootstrap_interval(correct, baseline=before, **options)
    macro_f1 = bootstrap_statistic(lambda weights: f1(weights) - f1_before(weights), len(references), **options)
    return {
        "accuracy_difference": accuracy.estimate,
        "accuracy_difference_ci": _interval(accuracy),
        "macro_f1_difference": macro_f1.estimate,
        "macro_f1_difference_ci": _interval(macro_f1),
    }


def evaluate_classifier(
    model,
    tokenizer,
    examples,
    template,
    classes,
    scored=None,
    batch_size: int = 8,
    progress: bool = True,
    **bootstrap_options,
) -> tuple[dict, dict]:
    """:func:`classification_metrics` of one model on tokenized held-out rows, and the per-row scores."""
    scores = classify(model, tokenizer, examples, template, classes, scored, batch_size, progress)
    return classification_metrics(scores, **bootstrap_options), scores


def classification_table(results: dict[str, dict]) -> str:
    """A Markdown table of :func:`classification_metrics` results, one row per model, intervals in brackets."""
    columns = [("accuracy", "accuracy", ".1%"), ("macro-F1", "macro_f1", ".3f"), ("label CE", "label_ce", ".4f"),
               ("majority rate", "majority_rate", ".1%")]  # fmt: skip
    lines = ["| model | " + " | ".join(c[0] for c in columns) + " | rows |", "|" + " --- |" * (len(columns) + 2)]
    for name, scores in results.items():
        cells = []
        for _, key, spec in columns:
            low, high = scores.get(f"{key}_ci", (float("nan"), float("nan")))
            cells.append(f"{format(scores.get(key, float('nan')), spec)} [{format(low, spec)}, {format(high, spec)}]")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {scores.get('examples', '')} |")
    return "\n".join(lines)
