"""The project's metrics as Hugging Face ``evaluate`` modules, shipped inside the package.

Each metric is a directory here holding a script of the same name (an ``evaluate.Metric`` subclass), the
layout ``evaluate.load`` takes from a local path, so loading one reads nothing from the network::

    from backattn.metrics import load_metric

    accuracy = load_metric("math_answer_accuracy")
    accuracy.compute(predictions=["... The final answer is 72."], references=["72"])

``math_answer_accuracy``: final-answer accuracy and parse rate of generated math solutions (the parsing and
scoring of :mod:`backattn.evaluation`, which the script calls). ``label_accuracy_f1``: accuracy and macro-F1
of predicted label strings against reference labels (classification, e.g. sentiment).
"""

from __future__ import annotations

from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent
METRIC_NAMES = ("math_answer_accuracy", "label_accuracy_f1")


def metric_path(name: str) -> Path:
    """The directory of the metric ``name`` (what ``evaluate.load`` takes)."""
    if name not in METRIC_NAMES:
        raise ValueError(f"Unknown metric {name!r}; the metrics are {', '.join(METRIC_NAMES)}.")
    return METRICS_DIR / name


def load_metric(name: str, **kwargs):
    """``evaluate.load`` of the metric ``name`` from its local directory; ``kwargs`` go to ``evaluate.load``
    (``keep_in_memory=True``, ``cache_dir``, ``experiment_id``, ``num_process`` / ``process_id``)."""
    import evaluate

    return evaluate.load(str(metric_path(name)), **kwargs)


__all__ = ["METRICS_DIR", "METRIC_NAMES", "load_metric", "metric_path"]
