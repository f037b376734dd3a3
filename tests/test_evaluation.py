import math

import pytest

from backattn.evaluation import (
    answer_metrics,
    answers_match,
    parse_final_answer,
    parse_number,
    token_overlap,
)


@pytest.mark.parametrize(
    "text, number",
    [("72", 72.0), ("1,234", 1234.0), ("$5.50", 5.5), ("-3", -3.0), ("3/4", 0.75), ("12.", 12.0), ("0.5", 0.5),
     ("abc", None), ("", None), (None, None), ("1/0", None)],
)  # fmt: skip
def test_parse_number(text, number):
    assert parse_number(text) == number


@pytest.mark.parametrize(
    "solution, answer",
    [
        ("She sold 48 + 24 = 72 clips.\nThe final answer is 72.", "72"),
        ("The final answer is $1,250.", "1,250"),
        ("The final answer is -7", "-7"),
        ("The final answer is 3/4.", "3/4"),
        ("First 10, then 20, so 30 in all", "30"),
        ("no numbers at all", None),
    ],
)
def test_parse_final_answer(solution, answer):
    assert parse_final_answer(solution) == answer


def test_answers_match_numbers_as_numbers():
    assert answers_match("1,000.0", "1000") and answers_match("$5.50", "5.5") and answers_match("3/4", "0.75")
    assert not answers_match("71", "72") and not answers_match(None, "72") and not answers_match("-3", "3")
    assert answers_match("Yes", "yes")


def test_token_overlap():
    assert token_overlap("72", "72") == (1.0, 1.0, 1.0)
    assert token_overlap("1,000", "1000.") == (1.0, 1.0, 1.0)
    precision, recall, f1 = token_overlap("18 dollars", "18")
    assert (precision, recall) == (0.5, 1.0) and f1 == pytest.approx(2 / 3)
    assert token_overlap(None, "5") == (0.0, 0.0, 0.0) and token_overlap("6", "5") == (0.0, 0.0, 0.0)


def test_answer_metrics_on_hand_made_cases():
    predicted = ["72", "-3", "1,200", "3/4", None, "twelve"]
    expected = ["72", "3", "1200", "0.75", "10", "12"]
    metrics = answer_metrics(predicted, expected)
    assert metrics["accuracy"] == pytest.approx(3 / 6)  # 72, 1,200 and 3/4 match as numbers
    # parseable pairs: 72/72, -3/3, 1200/1200, 0.75/0.75 -> squared errors 0, 36, 0, 0
    assert metrics["parse_rate"] == pytest.approx(4 / 6)
    assert metrics["mse"] == pytest.approx(9.0) and metrics["rmse"] == pytest.approx(3.0)
    assert metrics["f1"] == pytest.approx(2 / 6)  # token overlap: "3/4" vs "0.75" share no token, nor "-3" vs "3"
    assert metrics["precision"] == metrics["recall"] == pytest.approx(2 / 6)


def test_answer_metrics_when_nothing_parses():
    metrics = answer_metrics([None, "abc"], ["1", "2"])
    assert metrics["accuracy"] == 0 and metrics["parse_rate"] == 0
    assert math.isnan(metrics["mse"]) and math.isnan(metrics["rmse"])
    with pytest.raises(ValueError, match="2 predicted answers for 1 expected"):
        answer_metrics(["1", "2"], ["1"])


def test_target_and_answer_loss_equal_a_manual_computation(tiny_gpt2_dir, gpt2_tokenizer):
    import datasets
    import torch
    import torch.nn.functional as F

    from backattn import GPT2BackwardAttentionForCausalLM
    from backattn.evaluation import target_token_loss
    from backattn.data.sft_data import PromptTemplate, SFTCollator, tokenize_examples

    gpt2_tokenizer.pad_token = gpt2_tokenizer.eos_token
    rows = [{"problem": f"What is {a} + 3?", "generated_solution": f"{a} + 3 = {a + 3}.", "expected_answer": str(a + 3)}
            for a in (4, 120, 7)]  # fmt: skip
    examples, _ = tokenize_examples(datasets.Dataset.from_list(rows), gpt2_tokenizer, PromptTemplate(), 64)
    model = GPT2BackwardAttentionForCausalLM.from_pretrained(tiny_gpt2_dir, head_config="seed").eval()
    scores = target_token_loss(model, examples, SFTCollator(gpt2_tokenizer, answer_labels=True), batch_size=2)
    losses = {"labels": [], "answer_labels": []}
    with torch.no_grad():
        for example in examples:  # one at a time, no padding
            logits = model(torch.tensor([example["input_ids"]])).logits[0, :-1]
            for key in losses:
                labels = torch.tensor(example[key][1:])
                kept = labels != -100
                losses[key].append(F.cross_entropy(logits[kept], labels[kept], reduction="none"))
    assert scores["target_ce"] == pytest.approx(torch.cat(losses["labels"]).mean().item(), rel=1e-5)
    assert scores["answer_ce"] == pytest.approx(torch.cat(losses["answer_labels"]).mean().item(), rel=1e-5)
    assert scores["answer_tokens"] == sum(len(x) for x in losses["answer_labels"]) < scores["target_tokens"]
