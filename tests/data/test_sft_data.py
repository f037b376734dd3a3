import datasets
import pytest
import torch

from backattn.data.sft_data import IGNORE_INDEX, PromptTemplate, SFTCollator, load_math_dataset, tokenize_examples

ROW = {"problem": "What is 2 + 3?", "generated_solution": "2 + 3 = 5.", "expected_answer": "5"}


def test_prompt_tokens_carry_no_loss_and_the_target_ends_with_eos(gpt2_tokenizer):
    template = PromptTemplate()
    examples, skipped = tokenize_examples(datasets.Dataset.from_list([ROW]), gpt2_tokenizer, template, 128)
    assert not skipped
    ids, labels = examples[0]["input_ids"], examples[0]["labels"]
    prompt_ids = gpt2_tokenizer(template.render_prompt(ROW))["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids
    assert labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert labels[len(prompt_ids) :] == ids[len(prompt_ids) :]
    assert ids[-1] == gpt2_tokenizer.eos_token_id
    assert gpt2_tokenizer.decode(ids[len(prompt_ids) : -1]) == "2 + 3 = 5.\nThe final answer is 5."
    assert examples[0]["prompt"] == "Question: What is 2 + 3?\nAnswer: " and examples[0]["expected_answer"] == "5"


def test_custom_template_is_used(gpt2_tokenizer):
    template = PromptTemplate(prompt="Q: {problem}\nA:", target=" {generated_solution} #### {expected_answer}")
    examples, _ = tokenize_examples(datasets.Dataset.from_list([ROW]), gpt2_tokenizer, template, 128)
    assert gpt2_tokenizer.decode(examples[0]["input_ids"]) == "Q: What is 2 + 3?\nA: 2 + 3 = 5. #### 5<|endoftext|>"


@pytest.mark.parametrize(
    "prompt, target, message",
    [
        ("Question: {question}", "{generated_solution}", r"prompt template uses \['question'\]"),
        ("No problem here", "{generated_solution}", "must contain {problem}"),
        ("{problem}", "{answer}", r"target template uses \['answer'\]"),
        ("{problem", "{generated_solution}", "not a valid format string"),
    ],
)
def test_bad_templates(prompt, target, message):
    with pytest.raises(ValueError, match=message):
        PromptTemplate(prompt=prompt, target=target)


def test_bad_rows_are_skipped_and_counted(gpt2_tokenizer):
    rows = [
        ROW,
        {**ROW, "problem": ""},
        {**ROW, "problem": None},
        {**ROW, "generated_solution": "   "},
        {**ROW, "expected_answer": None},
        {**ROW, "generated_solution": "step " * 200},  # does not fit max_length
        {**ROW, "expected_answer": "12"},
    ]
    examples, skipped = tokenize_examples(datasets.Dataset.from_list(rows), gpt2_tokenizer, PromptTemplate(), 64)
    assert examples["expected_answer"][:] == ["5", "12"]
    assert skipped == {
        "missing_or_empty_problem": 2,
        "missing_or_empty_generated_solution": 1,
        "missing_or_empty_expected_answer": 1,
        "too_long": 1,
    }


def test_numeric_answers_count_as_text_and_other_types_do_not(gpt2_tokenizer):
    numbers = datasets.Dataset.from_list([{**ROW, "expected_answer": 7}, {**ROW, "expected_answer": 2}])
    examples, skipped = tokenize_examples(numbers, gpt2_tokenizer, PromptTemplate(), 64)
    assert examples["expected_answer"][:] == ["7", "2"] and not skipped
    lists = datasets.Dataset.from_list([{**ROW, "problem": ["What", "is"]}])
    with pytest.raises(ValueError, match="No usable rows: 1 missing_or_empty_problem"):
        tokenize_examples(lists, gpt2_tokenizer, PromptTemplate(), 64)


def test_nothing_usable_is_an_error(gpt2_tokenizer):
    rows = [{**ROW, "problem": ""}, {**ROW, "generated_solution": "x " * 500}]
    with pytest.raises(ValueError, match="No usable rows: 1 missing_or_empty_problem, 1 too_long"):
        tokenize_examples(datasets.Dataset.from_list(rows), gpt2_tokenizer, PromptTemplate(), 64)


def test_openmathinstruct2_columns_from_a_local_parquet_file(tmp_path, gpt2_tokenizer):
    """A parquet file in the OpenMathInstruct-2 schema (problem, generated_solution, expected_answer,
    problem_source)."""
    rows = {
        "problem": ["Solve for y: $y + 2 = 5$", "Eva drives 20 miles a day for 10 days. How far?"],
        "generated_solution": ["Subtract 2: $y = \\boxed{3}$.", "20 * 10 = 200 miles."],
        "expected_answer": ["3", "200"],
        "problem_source": ["augmented_math", "augmented_gsm8k"],
    }
    path = tmp_path / "openmath.parquet"
    datasets.Dataset.from_dict(rows).to_parquet(path)
    dataset = load_math_dataset(str(path))
    examples, skipped = tokenize_examples(dataset, gpt2_tokenizer, PromptTemplate(), 256)
    assert len(examples) == 2 and not skipped
    assert gpt2_tokenizer.decode(examples[1]["input_ids"]).endswith(
        "20 * 10 = 200 miles.\nThe final answer is 200.<|endoftext|>"
    )


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_local_file_formats(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    dataset = datasets.Dataset.from_list([ROW, {**ROW, "expected_answer": "12"}])
    {".jsonl": dataset.to_json, ".json": dataset.to_json, ".csv": dataset.to_csv}[suffix](path)
    loaded = load_math_dataset(str(path), max_samples=1)
    assert len(loaded) == 1 and loaded[0]["problem"] == ROW["problem"]


def test_missing_columns_are_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    datasets.Dataset.from_list([{"question": "q", "generated_solution": "s"}]).to_json(path)
    with pytest.raises(ValueError, match="lacks the column\\(s\\) problem, expected_answer"):
        load_math_dataset(str(path))


def test_bad_sources():
    with pytest.raises(FileNotFoundError, match="No data file"):
        load_math_dataset("missing.jsonl")
    with pytest.raises(ValueError, match="has the splits"):
        load_math_dataset("nvidia/OpenMathInstruct-2", split="validation")
    with pytest.raises(ValueError, match="set max_samples"):
        load_math_dataset("nvidia/OpenMathInstruct-2", split="train_1M", streaming=True)


@pytest.mark.parametrize("side", ["right", "left"])
def test_collator_pads_ids_labels_and_cached_states_together(gpt2_tokenizer, side):
    gpt2_tokenizer.pad_token = gpt2_tokenizer.eos_token
    gpt2_tokenizer.padding_side = side
    features = [
        {"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "base_hidden_states": torch.ones(3, 4)},
        {"input_ids": [5], "labels": [5], "base_hidden_states": torch.full((1, 4), 2.0)},
    ]
    batch = SFTCollator(gpt2_tokenizer)(features)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, 3)
    assert batch["base_hidden_states"].shape == (2, 3, 4)
    real = batch["attention_mask"][1].bool()
    assert batch["labels"][1][~real].tolist() == [IGNORE_INDEX, IGNORE_INDEX]
    assert torch.equal(batch["base_hidden_states"][1][real], torch.full((1, 4), 2.0))
    assert batch["base_hidden_states"][1][~real].abs().sum() == 0


def test_answer_labels_mark_the_final_answer_tokens(gpt2_tokenizer):
    row = {**ROW, "generated_solution": "5 + 1,245 = 1,250.", "expected_answer": "1,250"}
    examples, _ = tokenize_examples(datasets.Dataset.from_list([row]), gpt2_tokenizer, PromptTemplate(), 128)
    ids, answer = examples[0]["input_ids"], examples[0]["answer_labels"]
    marked = [token for token, label in zip(ids, answer) if label != IGNORE_INDEX]
    assert gpt2_tokenizer.decode(marked).strip() == "1,250"  # the final-answer line's, not the solution's
    last = max(i for i, label in enumerate(answer) if label != IGNORE_INDEX)
    assert gpt2_tokenizer.decode(ids[last + 1 :]) == ".<|endoftext|>"
    batch = SFTCollator(_padded(gpt2_tokenizer), answer_labels=True)([examples[0], examples[0]])
    assert torch.equal(batch["answer_labels"][0], torch.tensor(answer))


def _padded(tokenizer):
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
