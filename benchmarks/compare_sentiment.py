"""A second task for the comparison: is a sentiment head worth training instead of LoRA? (Rotten Tomatoes)

    .venv/bin/python benchmarks/compare_sentiment.py benchmarks/compare_sentiment_validation.yaml  # 1. rates
    .venv/bin/python benchmarks/compare_sentiment.py                                               # 2. held out

The machinery is ``compare_heads.py``'s (the same methods, parameter budgets, time budgets ``T``, ``2T``, ``4T``
with ``T`` one LoRA-on-attention epoch over ``budget_problems`` rows, calibration, resumption, intervals and
report); this file supplies the task. Data: the offline Rotten Tomatoes snippets (``backattn.data.rotten_tomatoes``,
split by movie): methods train on the ``train`` split, learning rates are chosen on ``validation``, and the
held-out run scores the ``test`` split (2,425 snippets of 97 movies), which chooses nothing. The prompt template
and label words are those fixed on validation data before any test number was looked at
(``backattn.data.classification_data.SENTIMENT_PROMPT``).

Each class is scored by the log-likelihood of its label word after the prompt (``backattn.classification``), so
the frozen base is scored zero-shot the same way. Metrics, each with a 95% bootstrap interval that resamples
movies, then snippets within them, and the paired difference to the frozen base: accuracy, macro-F1 and the
label CE (the gold label word's cross-entropy, which also chooses the learning rates).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_heads as machinery  # noqa: E402  (the comparison's machinery, beside this file)

from backattn.bootstrap import bootstrap_statistic  # noqa: E402
from backattn.classification import classify, label_word_training_rows, macro_f1_statistic  # noqa: E402
from backattn.data.classification_data import (  # noqa: E402
    data_classes,
    load_classification_dataset,
    template_for,
    tokenize_classification,
)
from backattn.evaluation import summarise_scores  # noqa: E402
from backattn.head_loss import LabelWordLoss  # noqa: E402

#: Heads and the PEFT methods of about their size (LoReFT, output-layer LoRA and the stacked method are left
#: to the math comparison, which found them behind LoRA on attention).
SENTIMENT_METHODS = ["head hidden", "LoRA attention", "head hidden + standardized", "head gated", "head seed"]


@dataclass
class SentimentComparisonArguments(machinery.ComparisonOptions):
    """The sentiment comparison: a classification data set's splits (Rotten Tomatoes by default)."""

    dataset: str = field(
        default="rotten_tomatoes",
        metadata={"help": "'rotten_tomatoes' (offline, split by movie), a local file or a Hub id with text+label."},
    )
    split_name: str = field(
        default="test", metadata={"help": "The split scored: 'validation' chooses learning rates, 'test' is held out."}
    )
    train_split: str = field(default="train", metadata={"help": "The split every method trains on."})
    eval_dataset: str | None = field(
        default=None, metadata={"help": "Held-out rows from another source (a file); default: dataset's split_name."}
    )
    methods: list[str] = field(default_factory=lambda: list(SENTIMENT_METHODS), metadata={"help": "Methods to run."})
    max_length: int = field(default=128, metadata={"help": "Longest prompt + label in tokens; longer rows dropped."})
    metrics: list[str] = field(default_factory=lambda: ["classification"], metadata={"help": "Only classification."})
    prompt_template: str | None = field(default=None, metadata={"help": "Default: the data set's known template."})
    target_template: str | None = field(default=None, metadata={"help": "Default: ' {label}'."})
    label_words: str | None = field(default=None, metadata={"help": "JSON label -> word; default: the known ones."})
    label_word_loss: bool = field(
        default=False,
        metadata={"help": "Train every method on the label word alone, with the cross-entropy over the classes' "
                  "label words (a head's label_word_ids; for the others the same loss as the Trainer's "
                  "compute_loss_func). Default: the cross-entropy over the vocabulary at every target token."},
    )  # fmt: skip
    output_dir: str = field(default="benchmarks/results/compare_sentiment", metadata={"help": "Results (committed)."})
    work_dir: str = field(default="outputs/compare_sentiment", metadata={"help": "Checkpoints (not committed)."})
    validation_results: str = field(
        default="benchmarks/results/compare_sentiment_validation/results.json",
        metadata={"help": "The validation run whose best learning rate per method this run uses."},
    )


class SentimentTask:
    """Label-word classification: accuracy, macro-F1 and label CE, resampling movies (the rows' ``group``)."""

    arguments = SentimentComparisonArguments
    setup_fields = (*machinery.SETUP_FIELDS, "train_split", "eval_dataset", "prompt_template", "target_template",
                    "label_words", "label_word_loss")  # fmt: skip
    metrics = {
        "accuracy": ("correct", None, None, "accuracy"),
        "macro_f1": (None, None, None, "macro-F1"),  # not a mean of per-row values: see summarise
        "label_ce": ("label_loss", "label_tokens", None, "label CE"),
        "choice_ce": ("choice_loss", None, None, "label-word CE"),  # over the classes' label words alone
    }
    #: The metric that chooses learning rates: the label CE, or with ``label_word_loss`` the label-word CE (the
    #: loss those runs train; the vocabulary-wide label CE is no objective of theirs).
    selection = "label_ce"
    group_name = "movies"
    sections = (("Held-out classification", ["accuracy", "macro_f1", "label_ce"], ".3f"),)
    pareto = (("accuracy", "pareto_accuracy.png"), ("label_ce", "pareto_label_ce.png"))

    def __init__(self):
        self.template = self.classes = self.label_word_ids = None

    def examples(self, options, tokenizer) -> tuple[datasets.Dataset, datasets.Dataset]:
        if options.split_name == options.train_split and options.eval_dataset is None:
            raise ValueError(f"The scored split {options.split_name!r} is the training split; score another.")
        self.template = template_for(options.dataset, options.prompt_template, options.target_template,
                                     options.label_words)  # fmt: skip
        sources = {"train": (options.dataset, options.train_split),
                   "held out": (options.eval_dataset or options.dataset, options.split_name)}  # fmt: skip
        rows = {part: load_classification_dataset(name, split, template=self.template)
                for part, (name, split) in sources.items()}  # fmt: skip
        self.classes = data_classes(rows["train"], self.template)
        tokenized = {}
        for part, dataset in rows.items():
            keep = ("group",) if "group" in dataset.column_names else ()
            tokenized[part], skipped = tokenize_classification(dataset, tokenizer, self.template, options.max_length,
                                                               self.classes, keep)  # fmt: skip
            if skipped:  # bad rows (no text, an unknown label, too long) are skipped and counted, never fatal
                print(f"{part}: skipped {dict(skipped)}", file=sys.stderr)
        train, held_out = tokenized["train"], tokenized["held out"]
        if options.label_word_loss:  # the label word alone is labelled, and the loss is over the label words
            self.selection = "choice_ce"
            self.label_word_ids, train = label_word_training_rows(train, tokenizer, self.template, self.classes)
        return train.remove_columns([c for c in train.column_names if c not in ("input_ids", "labels")]), held_out

    def groups(self, held_out: datasets.Dataset) -> list:
        return held_out["group"] if "group" in held_out.column_names else list(range(len(held_out)))

    def describe(self, options) -> str:
        source = options.eval_dataset or f"{options.dataset} {options.split_name} split"
        return f"Held-out: {source}; 95% intervals resample movies, then snippets; classes {self.classes}."

    def held_out_states(self, *args):
        return None  # snippets are short: every method is scored by full forwards

    def score(self, model, tokenizer, held_out, options, last_budget: bool, states=None) -> dict[str, list]:
        scored = classify(model, tokenizer, held_out, self.template, self.classes, batch_size=4 * options.batch_size,
                          progress=True)  # fmt: skip
        return {
            "correct": [float(p == r) for p, r in zip(scored["predictions"], scored["references"])],
            "label_loss": scored["label_loss"],
            "label_tokens": scored["label_tokens"],
            "predictions": scored["predictions"],
            "references": scored["references"],
            "log_likelihoods": scored["log_likelihoods"].tolist(),
            "choice_loss": choice_losses(scored["log_likelihoods"].tolist(), scored["references"], self.classes),
        }

    def training_loss(self, model):
        """With ``label_word_loss``: a head trains with its ``label_word_ids`` set (scoring is unchanged: the option
        acts in training only); any other model gets the same loss as the Trainer's ``compute_loss_func``."""
        if self.label_word_ids is None:
            return None
        if hasattr(model, "heads"):
            for name in model.heads.names():
                model.heads.set_training_options(name, label_word_ids=list(self.label_word_ids))
            return None
        return LabelWordLoss(self.label_word_ids)

    def summarise(self, scores: dict, base: dict | None, groups: list, n_resamples: int) -> dict:
        """The comparison's metrics, with macro-F1 (a mean of per-class ratios) on the same resamples."""
        classes = self.classes or sorted(set(scores["references"]))
        scores, base = (
            {**s, "choice_loss": choice_losses(s["log_likelihoods"], s["references"], classes)}
            if s is not None
            else None
            for s in (scores, base)
        )  # fmt: skip  (results written before it)
        out = summarise_scores(scores, base, groups, n_resamples, self.metrics)
        options = {"groups": groups, "n_resamples": n_resamples}
        references = scores["references"]
        f1 = macro_f1_statistic(scores["predictions"], references, self.classes or sorted(set(references)))
        interval = bootstrap_statistic(f1, len(references), **options)
        out["macro_f1"] = {"value": interval.estimate, "low": interval.low, "high": interval.high,
                           "n": len(references)}  # fmt: skip
        if base is not None:
            f1_base = macro_f1_statistic(base["predictions"], references, self.classes or sorted(set(references)))
            paired = bootstrap_statistic(lambda w: f1(w) - f1_base(w), len(references), **options)
            out["macro_f1"]["minus_base"] = {"value": paired.estimate, "low": paired.low, "high": paired.high}
        return out


def choice_losses(log_likelihoods: list[list[float]], references: list[str], classes) -> list[float]:
    """Each row's ``-log softmax(ll)[gold]`` over its classes' label-word log-likelihoods ``ll``: the label-word
    CE, what ``label_word_loss`` trains (for one-token label words)."""
    gold = [list(classes).index(label) for label in references]
    return [float(np.logaddexp.reduce(row) - row[k]) for row, k in zip(np.asarray(log_likelihoods), gold)]


def main(argv: list[str] | None = None) -> dict:
    return machinery.main(argv, task=SentimentTask())


if __name__ == "__main__":
    main()
