"""The evaluate metric modules shipped in backattn/metrics: hand-computed values, and loading them offline."""

import json
import os
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import pytest

from backattn import evaluation
from backattn.metrics import METRIC_NAMES, METRICS_DIR, load_metric, metric_path

ROOT = Path(__file__).resolve().parents[1]

SOLUTIONS = [
    "48 + 24 = 72 clips.\nThe final answer is 72.",  # stated answer, right
    "The final answer is $1,250.",  # "$1,250" equals "1250" as a number
    "She ate 1/4, so 3/4 of the pie is left.",  # no statement: the last number, 3/4 equals 0.75
    "I cannot work this out.",  # nothing to parse
]
ANSWERS = ["72", "1250", "0.75", "10"]


@pytest.fixture(scope="module")
def math_metric():
    return load_metric("math_answer_accuracy", keep_in_memory=True)


@pytest.fixture(scope="module")
def label_metric():
    return load_metric("label_accuracy_f1", keep_in_memory=True)


def test_math_accuracy_and_parse_rate_by_hand(math_metric):
    scores = math_metric.compute(predictions=SOLUTIONS, references=ANSWERS)
    assert scores["accuracy"] == 0.75  # 3 of 4 right
    assert scores["parse_rate"] == 0.75  # 3 of 4 stated answers parse as numbers
    assert scores["mse"] == 0.0 and scores["rmse"] == 0.0  # the three that parse are exact
    # Already extracted answers (None: nothing was found) give the same scores.
    answers = ["72", "$1,250", "3/4", None]
    assert math_metric.compute(predictions=answers, references=ANSWERS, predictions_are_answers=True) == scores


def test_math_metric_is_answer_metrics(math_metric):
    """One implementation: the module calls backattn.evaluation's functions, it does not copy them."""
    script = sys.modules[type(math_metric).__module__]
    assert script.answer_metrics is evaluation.answer_metrics
    assert script.parse_final_answer is evaluation.parse_final_answer
    parsed = [evaluation.parse_final_answer(s) for s in SOLUTIONS]
    assert math_metric.compute(predictions=SOLUTIONS, references=ANSWERS) == evaluation.answer_metrics(parsed, ANSWERS)


def test_math_metric_accumulates_batches(math_metric):
    for start in (0, 2):
        math_metric.add_batch(predictions=SOLUTIONS[start : start + 2], references=ANSWERS[start : start + 2])
    assert math_metric.compute()["accuracy"] == 0.75


# Three labels, six examples. Per label (TP; times predicted; times true) and F1 = 2 TP / (predicted + true):
#   positive: 2; 2; 3 -> 4/5     negative: 1; 2; 2 -> 1/2     neutral: 1; 2; 1 -> 2/3
# macro-F1 = (4/5 + 1/2 + 2/3) / 3 = 59/90; accuracy = 4/6.
REFERENCES = ["positive", "positive", "positive", "negative", "negative", "neutral"]
PREDICTIONS = ["positive", "positive", "negative", "negative", "neutral", "neutral"]


def test_label_accuracy_and_macro_f1_by_hand(label_metric):
    scores = label_metric.compute(predictions=PREDICTIONS, references=REFERENCES)
    assert scores["accuracy"] == pytest.approx(4 / 6)
    assert scores["macro_f1"] == pytest.approx(59 / 90)
    assert scores["per_label_f1"] == pytest.approx({"negative": 1 / 2, "neutral": 2 / 3, "positive": 4 / 5})


def test_label_f1_labels_never_true_or_never_predicted(label_metric):
    # "mixed" is predicted once but never true: F1 0, and it counts in the average.
    scores = label_metric.compute(predictions=["mixed", "positive"], references=["positive", "positive"])
    assert scores["per_label_f1"] == pytest.approx({"mixed": 0.0, "positive": 2 / 3})
    assert scores["macro_f1"] == pytest.approx(1 / 3) and scores["accuracy"] == 0.5
    # A label given in `labels` that neither side has scores 0 (as scikit-learn's zero_division=0).
    scores = label_metric.compute(predictions=["positive"], references=["positive"], labels=["positive", "negative"])
    assert scores["per_label_f1"] == {"positive": 1.0, "negative": 0.0} and scores["macro_f1"] == 0.5


def test_label_macro_f1_matches_sklearn(label_metric):
    metrics = pytest.importorskip("sklearn.metrics")
    cases = [
        (PREDICTIONS, REFERENCES, None),
        (["mixed", "positive"], ["positive", "positive"], None),
        (["a", "b", "b", "c", "a", "a", "c"], ["a", "b", "c", "c", "b", "a", "a"], None),
        (["positive"], ["positive"], ["positive", "negative"]),
    ]
    for predictions, references, labels in cases:
        ours = label_metric.compute(predictions=predictions, references=references, labels=labels)
        expected = metrics.f1_score(references, predictions, labels=labels, average="macro", zero_division=0)
        assert ours["macro_f1"] == pytest.approx(expected)
        assert ours["accuracy"] == pytest.approx(metrics.accuracy_score(references, predictions))


def test_metric_modules_describe_themselves(math_metric, label_metric):
    for metric in (math_metric, label_metric):
        assert metric.description and metric.citation.startswith("@") and metric.inputs_description
        assert set(metric.features) == {"predictions", "references"}
    with pytest.raises(ValueError, match="Unknown metric 'bleu'"):
        metric_path("bleu")


def test_metric_scripts_ship_in_the_package():
    """Each metric directory holds a script of its own name (what evaluate.load of a directory looks for), and
    pyproject's package-data takes it into the wheel."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert sorted(p.name for p in METRICS_DIR.iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(
        METRIC_NAMES
    )
    for name in METRIC_NAMES:
        script = metric_path(name) / f"{name}.py"
        assert script.is_file()
        assert any(fnmatch(str(script.relative_to(METRICS_DIR.parent)), p) for p in package_data["backattn"])


OFFLINE_LOAD = """
import json, socket, sys


def refuse(*args, **kwargs):
    raise OSError("network access attempted")


socket.socket.connect = socket.socket.connect_ex = socket.create_connection = refuse
from backattn.metrics import load_metric

math_metric, label_metric = load_metric("math_answer_accuracy"), load_metric("label_accuracy_f1")
print(json.dumps({
    "module_file": sys.modules[type(math_metric).__module__].__file__,
    "math": math_metric.compute(predictions=json.loads(sys.argv[1]), references=json.loads(sys.argv[2])),
    "labels": label_metric.compute(predictions=["a", "b"], references=["a", "a"]),
}))
"""


def test_loading_is_offline(tmp_path):
    """evaluate.load of the local directories, in a fresh process with the Hub and evaluate offline, every socket
    refused and empty caches: nothing is fetched, and the modules are imported from the fresh modules cache."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf"), "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "HF_METRICS_CACHE": str(tmp_path / "metrics")}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", OFFLINE_LOAD, json.dumps(SOLUTIONS), json.dumps(ANSWERS)],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(result["module_file"]).is_relative_to(tmp_path / "modules")
    assert result["math"]["accuracy"] == 0.75 and result["math"]["parse_rate"] == 0.75
    assert result["labels"] == {"accuracy": 0.5, "macro_f1": pytest.approx(1 / 3), "per_label_f1": pytest.approx(
        {"a": 2 / 3, "b": 0.0})}  # fmt: skip
