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


@pytest.fixture
def three_sums(tiny_gpt2_dir, gpt2_tokenizer):
    """Three tokenized problems of different lengths, a tiny GPT-2 with a head, and the evaluation collator."""
    import datasets

    from backattn import GPT2BackwardAttentionForCausalLM
    from backattn.data.sft_data import PromptTemplate, SFTCollator, tokenize_examples

    gpt2_tokenizer.pad_token = gpt2_tokenizer.eos_token
    rows = [{"problem": f"What is {a} + 3?", "generated_solution": f"{a} + 3 = {a + 3}.", "expected_answer": str(a + 3)}
            for a in (4, 120, 7)]  # fmt: skip
    examples, _ = tokenize_examples(datasets.Dataset.from_list(rows), gpt2_tokenizer, PromptTemplate(), 64)
    model = GPT2BackwardAttentionForCausalLM.from_pretrained(tiny_gpt2_dir, head_config="seed").eval()
    return examples, model, SFTCollator(gpt2_tokenizer, answer_labels=True)


def test_target_and_answer_loss_equal_a_manual_computation(three_sums):
    import torch
    import torch.nn.functional as F

    from backattn.evaluation import target_token_loss

    examples, model, collator = three_sums
    scores = target_token_loss(model, examples, collator, batch_size=2)
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


def test_per_problem_scores_match_one_problem_at_a_time(three_sums):
    from backattn.evaluation import per_problem_scores

    examples, model, collator = three_sums
    batched = per_problem_scores(model, examples, collator, batch_size=3)  # padded to the longest
    alone = [per_problem_scores(model, examples.select([i]), collator, batch_size=1) for i in range(3)]
    for key in ("target_loss", "target_tokens", "answer_loss", "answer_tokens", "answer_correct"):
        assert batched[key] == pytest.approx([scores[key][0] for scores in alone], rel=1e-5)
    assert all(0 <= c <= n for c, n in zip(batched["answer_correct"], batched["answer_tokens"]))


def test_answer_exact_is_one_only_where_every_answer_token_is_ranked_first(three_sums):
    """An oracle whose logits peak at each next token gets every whole answer right; moving one answer token of
    one problem off the top makes that problem's answer_exact 0 and leaves the others at 1."""
    import torch

    from backattn.evaluation import per_problem_scores, summarise_scores

    examples, _, collator = three_sums
    spoiled = 1, next(t for t, label in enumerate(examples[1]["answer_labels"]) if label != -100)

    class Oracle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask=None, **kwargs):
            logits = torch.nn.functional.one_hot(input_ids.roll(-1, dims=1), 50257).float()
            if input_ids.shape[0] == 3:  # the batch of all three: spoil one answer token of the second problem
                logits[spoiled[0], spoiled[1] - 1] = 0.0
            return type("Output", (), {"logits": logits})

    scores = per_problem_scores(Oracle(), examples, collator, batch_size=3)
    assert scores["answer_exact"] == [1.0, 0.0, 1.0]
    assert scores["answer_correct"][1] == scores["answer_tokens"][1] - 1
    older = {key: value for key, value in scores.items() if key != "answer_exact"}  # a score file from before it
    summary = summarise_scores(older, older, None, n_resamples=50)
    assert summary["answer_exact"]["value"] == pytest.approx(2 / 3)
    assert summary["answer_exact"]["minus_base"]["value"] == 0.0


def test_an_answer_is_copyable_where_it_appears_earlier_as_a_whole_number():
    from backattn.evaluation import answer_is_copyable

    assert answer_is_copyable("Tom has 18 apples.", "He keeps them.", "18")
    assert answer_is_copyable("Tom has 3 boxes.", "3 * 6 = 18 apples.\nThe final answer is 18.", "18")
    assert not answer_is_copyable("Tom has 3 boxes.", "He has 3 * 6 apples.\nThe final answer is 18.", "18")
    assert not answer_is_copyable("It costs 118 or 1.18 or 180.", "So.", "18")  # a part of another number


@pytest.mark.parametrize(
    "text, loops",
    [
        ("The final answer is 5. " * 3, False),  # every 6-gram at most twice
        ("The final answer is 5. " * 4, True),
        ("He pays 3 + 4 = 7 dollars. " + "So he has 7 apples and 7 pears left. " * 3, True),
        ("She has 5 apples. She buys 5 apples. She eats 5 apples. She has 10 apples now.", False),
        ("short", False),
        ("", False),
    ],
)
def test_repetition_detector_on_crafted_loops_and_non_loops(text, loops):
    from backattn.evaluation import repeats_itself

    assert repeats_itself(text) is loops


def test_distractors_are_near_wrong_and_fixed():
    from backattn.evaluation import distractors

    for answer in ("18", "0", "1", "1000", "3.5", "-4"):
        chosen = distractors(answer, "Tom has apples.")
        assert len(set(chosen)) == 3 and answer not in chosen
        assert chosen == distractors(answer, "Tom has apples.")  # the same on every call and machine
        if "." not in answer:
            assert all("." not in c for c in chosen)
        if not answer.startswith("-"):
            assert all(not c.startswith("-") for c in chosen)
    assert distractors("18", "a") != distractors("18", "b") or distractors("18", "c") != distractors("18", "a")
    assert distractors("18", "Tom has apples.") == ["16", "8", "28"]  # pinned: the rule must not drift


def test_continuations_scored_from_one_shared_prefix_equal_full_forwards(tiny_gpt2_dir):
    import torch
    from transformers import GPT2LMHeadModel

    from backattn.evaluation import continuation_log_likelihoods

    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval()
    prefix, continuations = [5, 17, 300, 2], [[7], [8, 9, 10], [11, 12]]
    scores = continuation_log_likelihoods(model, prefix, continuations)
    with torch.no_grad():
        for score, tokens in zip(scores, continuations):
            log_probs = torch.log_softmax(model(torch.tensor([prefix + tokens])).logits[0].float(), -1)
            expected = sum(log_probs[len(prefix) - 1 + i, t] for i, t in enumerate(tokens))
            assert score == pytest.approx(float(expected), abs=1e-4)


def test_multiple_choice_picks_the_line_the_model_prefers(gpt2_tokenizer):
    import torch
    from transformers import DynamicCache
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from backattn.data.sft_data import PromptTemplate
    from backattn.evaluation import distractors, multiple_choice

    class Prefers(torch.nn.Module):
        """Logits that favour one token at every position: the line holding that token must win."""

        def __init__(self, token):
            super().__init__()
            self.token, self.anchor = token, torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=False):
            logits = torch.zeros(*input_ids.shape, len(gpt2_tokenizer))
            logits[..., self.token] = 10.0
            return CausalLMOutputWithPast(logits=logits, past_key_values=past_key_values or DynamicCache())

    row = {"problem": "Tom has apples.", "generated_solution": "He has 9 + 9 = 18 apples.", "expected_answer": "18"}
    wrong = distractors("18", row["problem"])[0]
    for favoured, right in (("18", 1.0), (wrong, 0.0)):
        model = Prefers(gpt2_tokenizer(" " + favoured)["input_ids"][0])
        for after_solution in (False, True):
            picked = multiple_choice(model, gpt2_tokenizer, [row], PromptTemplate(), after_solution=after_solution)
            assert picked == {"correct": [right], "correct_normalised": [right]}


def test_summaries_pair_with_the_base_and_the_table_shows_both():
    from backattn.evaluation import results_table, summarise_scores

    base = {"target_loss": [2.0, 4.0, 6.0], "target_tokens": [1, 1, 2], "greedy_parsed": [1.0, 0.0],
            "generation_index": [0, 1]}  # fmt: skip
    head = {"target_loss": [1.0, 3.0, 4.0], "target_tokens": [1, 1, 2], "greedy_parsed": [1.0, 1.0],
            "generation_index": [0, 1]}  # fmt: skip
    summaries = {"base": summarise_scores(base, None, None, 200), "head": summarise_scores(head, base, None, 200)}
    assert summaries["base"]["target_ce"]["value"] == 12 / 4 and summaries["head"]["target_ce"]["value"] == 8 / 4
    assert summaries["head"]["target_ce"]["minus_base"]["value"] == pytest.approx(-1.0)
    assert summaries["head"]["parse_rate"]["minus_base"]["value"] == pytest.approx(0.5)
    assert "minus_base" not in summaries["head"]["perplexity"]  # a transformed statistic is not paired
    lines = results_table(summaries).splitlines()
    assert lines[0] == "| model | target CE | parse rate |"
    assert lines[2].startswith("| base | 3.0000 [") and lines[3].startswith("| head | 2.0000 [")
    assert lines[4].startswith("| head minus base | -1.0000 [") and "| +50% [" in lines[4]


def test_an_answer_too_large_to_square_gives_an_infinite_rmse_not_a_crash():
    huge = "1" * 200  # a looping generation's "number": 1e199 squared overflows a float
    metrics = answer_metrics([huge, "4"], ["3", "4"])
    assert metrics["rmse"] == float("inf") and metrics["parse_rate"] == 1.0 and metrics["accuracy"] == 0.5
