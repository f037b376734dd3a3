"""Classification by label-word likelihood (backattn/classification.py): the scores against log-likelihoods computed
by hand from a model's own logits, a model whose logits are forced (the answers known), and the metrics with their
bootstrap intervals."""

import math
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
from conftest import randomise
from transformers import AutoTokenizer, GPT2LMHeadModel

from backattn import GPT2BackwardAttentionForCausalLM
from backattn.bootstrap import bootstrap_statistic
from backattn.classification import (
    classification_metrics,
    classification_table,
    classify,
    evaluate_classifier,
    label_candidates,
    label_log_likelihoods,
    macro_f1_statistic,
    paired_differences,
)
from backattn.data.classification_data import ClassificationTemplate, tokenize_classification
from backattn.metrics import load_metric

WORDS = {"fresh": "positive", "rotten": "negative"}
TEXTS = ["a good film", "a dull film", "good acting", "no plot at all", "good, not great", "awful", "fine"]
LABELS = ["fresh", "rotten", "fresh", "rotten", "rotten", "rotten", "fresh"]
GROUPS = ["m1", "m1", "m2", "m2", "m3", "m3", "m4"]


@pytest.fixture(scope="module")
def tokenizer(tiny_gpt2_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def examples_for(tokenizer, template):
    rows = datasets.Dataset.from_dict({"text": TEXTS, "label": LABELS, "group": GROUPS})
    examples, skipped = tokenize_classification(rows, tokenizer, template, 64, keep_columns=("group",))
    assert not skipped
    return examples


def by_hand(model, tokenizer, examples, template, classes) -> np.ndarray:
    """log p(target | prompt) from one forward of prompt + target each, summed token by token."""
    scores = np.zeros((len(examples), len(classes)))
    with torch.no_grad():
        for row, prompt in enumerate(examples["prompt"]):
            prompt_ids = tokenizer(prompt)["input_ids"]
            for column, word in enumerate(classes):
                target = tokenizer(template.render_target(word), add_special_tokens=False)["input_ids"]
                log_probs = model(torch.tensor([prompt_ids + target])).logits[0].float().log_softmax(-1)
                scores[row, column] = sum(log_probs[len(prompt_ids) - 1 + i, t].item() for i, t in enumerate(target))
    return scores


@pytest.mark.parametrize("head", [False, True])
def test_label_scores_are_the_models_own_log_likelihoods(tiny_gpt2_dir, tokenizer, head):
    if head:
        model = randomise(GPT2BackwardAttentionForCausalLM.from_pretrained(tiny_gpt2_dir, head_config="hidden"))
    else:
        model = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir)
    model.eval()
    template = ClassificationTemplate("Review: {text}\nSentiment:", " {label}", WORDS)
    examples = examples_for(tokenizer, template)
    candidates = label_candidates(tokenizer, template, template.classes)
    assert all(len(c) == 1 for c in candidates)  # " positive" and " negative" are one GPT-2 token each
    expected = by_hand(model, tokenizer, examples, template, template.classes)
    batched = label_log_likelihoods(model, tokenizer, examples, candidates, batch_size=3)
    shared = label_log_likelihoods(model, tokenizer, examples, candidates, method="shared_prefix")
    np.testing.assert_allclose(batched, expected, atol=1e-4)
    np.testing.assert_allclose(shared, expected, atol=1e-4)


def test_multi_token_label_words_are_scored_over_every_token(tiny_gpt2_dir, tokenizer):
    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval()
    words = {"fresh": "certainly worth seeing", "rotten": "a waste of time"}
    template = ClassificationTemplate("Critic: {text}\nVerdict:", " {label}.", words)
    examples = examples_for(tokenizer, template)
    candidates = label_candidates(tokenizer, template, template.classes)
    assert min(len(c) for c in candidates) > 2
    scores = classify(model, tokenizer, examples, template, template.classes)
    expected = by_hand(model, tokenizer, examples, template, template.classes)
    np.testing.assert_allclose(scores["log_likelihoods"], expected, atol=1e-4)
    assert scores["predictions"] == [template.classes[i] for i in expected.argmax(1)]
    gold = [template.classes.index(w) for w in examples["label"]]
    assert scores["label_loss"] == pytest.approx([-expected[r, g] for r, g in enumerate(gold)], abs=1e-4)
    assert scores["label_tokens"] == [len(candidates[g]) for g in gold]
    with pytest.raises(ValueError, match="needs every class's target to be one token"):
        label_log_likelihoods(model, tokenizer, examples, candidates, method="next_token")


class KeywordModel(torch.nn.Module):
    """Forced logits: 4 on ' positive' after any prompt holding ' good', 0 otherwise; 2 on ' negative'; 0 elsewhere."""

    def __init__(self, tokenizer):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # a device to read
        self.vocab = len(tokenizer)
        self.good = tokenizer(" good", add_special_tokens=False)["input_ids"][0]
        self.positive = tokenizer(" positive", add_special_tokens=False)["input_ids"][0]
        self.negative = tokenizer(" negative", add_special_tokens=False)["input_ids"][0]

    def forward(self, input_ids, attention_mask=None, **kwargs):
        seen = torch.cumsum(input_ids == self.good, dim=1) > 0
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.negative] = 2.0
        logits[..., self.positive] = torch.where(seen, 4.0, 0.0)
        return SimpleNamespace(logits=logits)


def test_a_model_with_forced_logits_gives_the_known_answers_and_metrics(tokenizer):
    model = KeywordModel(tokenizer)
    template = ClassificationTemplate("Review: {text}\nSentiment:", " {label}", WORDS)
    examples = examples_for(tokenizer, template)
    metrics, scores = evaluate_classifier(model, tokenizer, examples, template, template.classes, progress=False)
    has_good = [" good" in f" {text}" or text.startswith("good") for text in TEXTS]
    assert scores["predictions"] == ["positive" if good else "negative" for good in has_good]
    # log-softmax of the forced logits, by hand
    rest = len(tokenizer) - 2
    with_good, without = math.log(rest + math.exp(2) + math.exp(4)), math.log(rest + 1 + math.exp(2))
    for row, good in enumerate(has_good):
        normaliser = with_good if good else without
        assert scores["log_likelihoods"][row] == pytest.approx(
            [(4 if good else 0) - normaliser, 2 - normaliser], abs=1e-4
        )
    # gold: positive, negative, positive, negative, negative, negative, positive; predicted: P N P N P N N
    assert metrics["accuracy"] == pytest.approx(5 / 7)
    f1_positive, f1_negative = 2 * 2 / (3 + 3), 2 * 3 / (4 + 4)
    assert metrics["per_label_f1"] == pytest.approx({"positive": f1_positive, "negative": f1_negative})
    assert metrics["macro_f1"] == pytest.approx((f1_positive + f1_negative) / 2)
    assert metrics["majority_label"] == "negative" and metrics["majority_rate"] == pytest.approx(4 / 7)
    assert metrics["groups"] == 4 and metrics["examples"] == 7 and "of groups" in metrics["interval"]
    for name in ("accuracy", "macro_f1", "label_ce", "majority_rate"):
        low, high = metrics[f"{name}_ci"]
        assert low <= metrics[name] <= high, name
    assert metrics["predicted"] == {"positive": 3, "negative": 4} and metrics["gold"] == {"positive": 3, "negative": 4}


def test_the_bootstrapped_macro_f1_is_the_metrics_macro_f1():
    rng = np.random.default_rng(0)
    classes = ("a", "b", "c")
    references = list(rng.choice(classes, 300))
    predictions = [r if rng.random() < 0.6 else rng.choice(classes) for r in references]
    statistic = macro_f1_statistic(predictions, references, classes)
    computed = load_metric("label_accuracy_f1", keep_in_memory=True).compute(
        predictions=predictions, references=references, labels=list(classes)
    )
    assert statistic(np.ones((1, 300)))[0] == pytest.approx(computed["macro_f1"])
    # a resample's weights: the metric on the rows drawn, repeated as often as they are drawn
    weights = rng.integers(0, 3, 300)
    drawn = [i for i in range(300) for _ in range(weights[i])]
    again = load_metric("label_accuracy_f1", keep_in_memory=True).compute(
        predictions=[predictions[i] for i in drawn], references=[references[i] for i in drawn], labels=list(classes)
    )
    assert statistic(weights[None, :].astype(float))[0] == pytest.approx(again["macro_f1"])
    interval = bootstrap_statistic(statistic, 300, n_resamples=500)
    assert interval.low < computed["macro_f1"] < interval.high and interval.high - interval.low < 0.2


def test_paired_differences_and_the_table():
    scores = {
        "classes": ("positive", "negative"),
        "predictions": ["positive", "negative", "negative", "positive"],
        "references": ["positive", "negative", "positive", "positive"],
        "label_loss": [0.1, 0.2, 2.0, 0.3],
        "label_tokens": [1, 1, 1, 1],
        "groups": None,
    }
    base = {**scores, "predictions": ["negative"] * 4}
    differences = paired_differences(scores, base, n_resamples=200)
    assert differences["accuracy_difference"] == pytest.approx(0.75 - 0.25)
    assert paired_differences(scores, scores, n_resamples=200)["macro_f1_difference_ci"] == [0.0, 0.0]
    metrics = classification_metrics(scores, n_resamples=200)
    assert metrics["groups"] is None and "of rows" in metrics["interval"]
    assert metrics["label_ce"] == pytest.approx(2.6 / 4)
    table = classification_table({"frozen base": metrics})
    assert table.splitlines()[0] == "| model | accuracy | macro-F1 | label CE | majority rate | rows |"
    assert "| frozen base | 75.0% [" in table and table.endswith("| 4 |")
    with pytest.raises(ValueError, match="same rows"):
        paired_differences(scores, {**base, "references": ["negative"] * 4})


def test_classes_that_tokenize_alike_are_refused(tokenizer):
    template = ClassificationTemplate("Review: {text}\n", " {label}", WORDS)
    with pytest.raises(ValueError, match="tokenize alike"):
        label_candidates(tokenizer, template, ("positive", "positive"))
