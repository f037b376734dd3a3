"""Accuracy and macro-F1 of predicted label strings (classification, e.g. sentiment), as an ``evaluate`` metric.

Written out here (a few counts) rather than through scikit-learn, which the package does not depend on; the
tests check it against ``sklearn.metrics.f1_score(average="macro")`` where scikit-learn is installed.
"""

from collections import Counter

import datasets
import evaluate

_DESCRIPTION = """\
Accuracy and macro-averaged F1 of predicted labels against reference labels, both given as strings (compared
exactly). A label's F1 is 2 TP / (2 TP + FP + FN), 0 when it has no true positive; macro-F1 is the unweighted
mean over the labels: those given in `labels`, else every label that occurs in the references or the
predictions (as scikit-learn's `f1_score(average="macro", zero_division=0)`).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): predicted labels.
    references (`list` of `str`): reference labels.
    labels (`list` of `str`, optional): the labels to average over (default: every label seen in either list).
Returns:
    accuracy (`float`): share of predictions equal to their reference.
    macro_f1 (`float`): mean per-label F1.
    per_label_f1 (`dict` of `str` to `float`): each label's F1.
Examples:
    >>> from backattn.metrics import load_metric
    >>> metric = load_metric("label_accuracy_f1")  # evaluate.load of this directory
    >>> metric.compute(predictions=["positive", "negative"], references=["positive", "positive"])["accuracy"]
    0.5
"""

_CITATION = """\
@article{sokolova2009systematic,
  title={A systematic analysis of performance measures for classification tasks},
  author={Sokolova, Marina and Lapalme, Guy},
  journal={Information Processing \\& Management},
  volume={45},
  number={4},
  pages={427--437},
  year={2009}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class LabelAccuracyF1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
            reference_urls=["https://en.wikipedia.org/wiki/F-score"],
        )

    def _compute(self, predictions, references, labels=None):
        pairs = list(zip(predictions, references))
        labels = list(labels) if labels is not None else sorted(set(predictions) | set(references))
        true_positives = Counter(p for p, r in pairs if p == r)
        predicted, actual = Counter(predictions), Counter(references)
        per_label = {}
        for label in labels:
            tp = true_positives[label]
            # 2 TP + FP + FN = (TP + FP) + (TP + FN): how often the label is predicted plus how often it is true.
            per_label[label] = 2 * tp / (predicted[label] + actual[label]) if tp else 0.0
        return {
            "accuracy": sum(p == r for p, r in pairs) / max(len(pairs), 1),
            "macro_f1": sum(per_label.values()) / max(len(per_label), 1),
            "per_label_f1": per_label,
        }
