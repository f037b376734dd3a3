"""Final-answer accuracy and parse rate of generated math solutions, as an ``evaluate`` metric.

The parsing and scoring are :mod:`backattn.evaluation`'s (``parse_final_answer``, ``answer_metrics``): this
script only adapts them to ``evaluate``, so the metric and ``evaluate_model`` cannot disagree.
"""

import datasets
import evaluate

from backattn.evaluation import answer_metrics, parse_final_answer

_DESCRIPTION = """\
Final-answer accuracy of math solutions: the answer each solution states (the text after "final answer is",
else its last number) is compared with the reference answer, numbers as numbers ("1,000.0" equals "1000",
"3/4" equals "0.75") and anything else as trimmed, case-folded text. Also returned: the parse rate (the share
of pairs where both the stated and the reference answer parse as numbers), the squared error over those pairs
(mse, rmse; nan when none parses), and SQuAD-style token-overlap precision, recall and F1 of the answers.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): generated solutions (or, with `predictions_are_answers=True`, the final
        answers already extracted from them).
    references (`list` of `str`): the expected final answers.
    predictions_are_answers (`bool`, default `False`): skip extracting the final answer from each prediction.
Returns:
    accuracy (`float`): share of predictions whose final answer matches the reference.
    parse_rate (`float`): share of pairs where both answers parse as numbers.
    mse (`float`), rmse (`float`): squared error of the answers over those pairs.
    precision (`float`), recall (`float`), f1 (`float`): mean token overlap of the answers.
Examples:
    >>> from backattn.metrics import load_metric
    >>> metric = load_metric("math_answer_accuracy")  # evaluate.load of this directory
    >>> metric.compute(predictions=["2 + 2 = 4. The final answer is 4.", "no idea"], references=["4", "5"])["accuracy"]
    0.5
"""

_CITATION = """\
@article{cobbe2021gsm8k,
  title={Training Verifiers to Solve Math Word Problems},
  author={Cobbe, Karl and Kosaraju, Vineet and Bavarian, Mohammad and Chen, Mark and Jun, Heewoo and
          Kaiser, Lukasz and Plappert, Matthias and Tworek, Jerry and Hilton, Jacob and Nakano, Reiichiro and
          Hesse, Christopher and Schulman, John},
  journal={arXiv preprint arXiv:2110.14168},
  year={2021}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MathAnswerAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
            reference_urls=["https://arxiv.org/abs/2110.14168"],
        )

    def _compute(self, predictions, references, predictions_are_answers=False):
        answers = list(predictions) if predictions_are_answers else [parse_final_answer(p or "") for p in predictions]
        return answer_metrics(answers, list(references))
