"""Classification rows as prompt and target tokens (backattn/data/classification_data.py): templates whose
placeholders name the columns, label words, the Hub-format loaders (read here from local files in the Hub sets'
own columns), and bad rows skipped and counted."""

import json

import datasets
import pytest

from backattn.data import classification_data
from backattn.data.classification_data import (
    IGNORE_INDEX,
    KNOWN_SOURCES,
    ClassificationTemplate,
    data_classes,
    load_classification_dataset,
    template_for,
    tokenize_classification,
)
from backattn.errors import BackattnValueError

REVIEW = "Review: {text}\nSentiment:"


@pytest.fixture
def tokenizer(gpt2_tokenizer):
    return gpt2_tokenizer


def test_placeholders_name_the_columns_and_label_words_map_the_labels(tokenizer):
    template = ClassificationTemplate(REVIEW, " {label}", {"fresh": "positive", "rotten": "negative"})
    assert template.prompt_columns == ["text"] and template.label_column == "label"
    assert template.classes == ("positive", "negative")
    rows = datasets.Dataset.from_list(
        [{"text": "A delight.", "label": "fresh"}, {"text": "A bore.", "label": "rotten"}]
    )
    examples, skipped = tokenize_classification(rows, tokenizer, template, 64)
    assert not skipped and examples["label"] == ["positive", "negative"] == examples["expected_answer"]
    first = examples[0]
    prompt_ids = tokenizer("Review: A delight.\nSentiment:")["input_ids"]
    word_ids = tokenizer(" positive", add_special_tokens=False)["input_ids"]
    assert first["prompt"] == "Review: A delight.\nSentiment:"
    assert first["input_ids"] == prompt_ids + word_ids + [tokenizer.eos_token_id]
    assert first["labels"] == [IGNORE_INDEX] * len(prompt_ids) + word_ids + [tokenizer.eos_token_id]
    assert first["answer_labels"] == [IGNORE_INDEX] * len(prompt_ids) + word_ids + [IGNORE_INDEX]


def test_a_target_with_text_around_the_label_marks_the_label_word_alone(tokenizer):
    template = ClassificationTemplate("{sentence}", " The review is {sentiment}.", {"1": "good", "0": "bad"})
    rows = datasets.Dataset.from_list([{"sentence": "Fine.", "sentiment": 1}])
    (example,) = tokenize_classification(rows, tokenizer, template, 64)[0]
    marked = [t for t in example["answer_labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(marked) == " good"


@pytest.mark.parametrize(
    "prompt, target, words, message",
    [
        (REVIEW, " {label} {other}", None, "exactly one placeholder"),
        (REVIEW, " positive", None, "exactly one placeholder"),
        ("Review: {text} ({label})", " {label}", None, "give the answer away"),
        ("Review:", " {label}", None, "names no column"),
        ("Review: {}", " {label}", None, "must be a column name"),
        ("Review: {text", " {label}", None, "not a valid format string"),
        (REVIEW, " {label}", "{fresh: 1", "--label_words is not valid JSON"),
        (REVIEW, " {label}", '["positive"]', "must be a JSON object"),
        (REVIEW, " {label}", '{"a": "yes", "b": "yes"}', "fewer than two classes"),
        (REVIEW, " {label}", '{"a": "yes", "b": ""}', "needs a non-empty word"),
    ],
)
def test_bad_templates_and_label_words_are_named(prompt, target, words, message):
    with pytest.raises(BackattnValueError, match=message):
        ClassificationTemplate(prompt, target, words)


def test_label_values_are_compared_as_text():
    template = ClassificationTemplate(REVIEW, " {label}", '{"0": "negative", "1": "positive"}')
    assert [template.label_word(v) for v in (0, 1, 1.0, "1", " 0 ", -1, None, "")] == [
        "negative", "positive", "positive", "positive", "negative", None, None, None,
    ]  # fmt: skip


def test_bad_rows_are_skipped_and_counted_never_crash(tokenizer, tmp_path):
    path = tmp_path / "reviews.jsonl"
    rows = [
        {"text": "Good.", "label": "fresh"},
        {"text": "", "label": "fresh"},
        {"text": "   ", "label": "rotten"},
        {"text": None, "label": "rotten"},
        {"label": "fresh"},
        {"text": "No label."},
        {"text": "Null label.", "label": None},
        {"text": "Odd label.", "label": "spoiled"},
        {"text": "Bad.", "label": "rotten"},
        {"text": "word " * 200, "label": "rotten"},
    ]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    template = template_for("rotten_tomatoes")  # the offline set's label words, on a file of the same columns
    data = load_classification_dataset(str(path), template=template)
    examples, skipped = tokenize_classification(data, tokenizer, template, 64)
    assert examples["label"] == ["positive", "negative"]
    assert skipped == {"missing_or_empty_text": 4, "missing_or_empty_label": 2, "unknown_label": 1, "too_long": 1}

    only_bad = datasets.Dataset.from_list([{"text": "x", "label": "spoiled"}, {"text": "y", "label": "meh"}])
    with pytest.raises(BackattnValueError, match=r"No usable rows: 2 unknown_label \(labels seen: 'spoiled', 'meh'"):
        tokenize_classification(only_bad, tokenizer, template, 64)


def test_without_label_words_the_classes_are_the_training_labels(tokenizer):
    template = ClassificationTemplate("Q: {question}\nA:", " {answer}")
    rows = datasets.Dataset.from_list([{"question": f"q{i}", "answer": ["yes", "no"][i % 2]} for i in range(6)])
    assert data_classes(rows, template) == ("no", "yes")
    held_out = datasets.Dataset.from_list([{"question": "q", "answer": "maybe"}, {"question": "r", "answer": "yes"}])
    examples, skipped = tokenize_classification(held_out, tokenizer, template, 64, classes=("no", "yes"))
    assert examples["label"] == ["yes"] and skipped == {"unknown_label": 1}
    with pytest.raises(BackattnValueError, match="holds 1 distinct value"):
        data_classes(held_out.select([1]), template)


def test_missing_columns_are_named_with_what_the_data_has(tmp_path):
    path = tmp_path / "math.jsonl"
    path.write_text(json.dumps({"problem": "1+1?", "generated_solution": "2", "expected_answer": "2"}) + "\n")
    with pytest.raises(BackattnValueError, match=r"lacks the column\(s\) text, label .* it has: problem"):
        load_classification_dataset(str(path), template=ClassificationTemplate())


@pytest.fixture
def hub_files(tmp_path):
    """Local files in the Hub sets' own formats: SST-2 (sentence, label 0/1, idx; its test split labels -1) as
    parquet, and Cornell's rotten_tomatoes (text, label 0/1) as JSON lines."""
    sst2 = {
        "validation": [
            {"idx": 0, "sentence": "a gorgeous film ", "label": 1},
            {"idx": 1, "sentence": "dull", "label": 0},
        ],
        "test": [{"idx": 0, "sentence": "unlabelled", "label": -1}],
    }
    paths = {}
    for split, rows in sst2.items():
        paths[("stanfordnlp/sst2", split)] = tmp_path / f"sst2-{split}.parquet"
        datasets.Dataset.from_list(rows).to_parquet(str(paths[("stanfordnlp/sst2", split)]))
    cornell = tmp_path / "rt-train.jsonl"
    cornell.write_text("\n".join(json.dumps({"text": t, "label": y}) for t, y in [("moving", 1), ("limp", 0)]))
    paths[("cornell-movie-review-data/rotten_tomatoes", "train")] = cornell
    return paths


def test_hub_sets_load_through_datasets_with_their_known_columns(hub_files, monkeypatch, tokenizer):
    calls = []
    real_load = datasets.load_dataset

    def hub(name, split=None, **kwargs):  # the Hub, unreachable here: the same rows from local files
        calls.append((name, split))
        path = hub_files[(name, split)]
        return real_load("parquet" if path.suffix == ".parquet" else "json", data_files=str(path), split="train")

    monkeypatch.setattr(classification_data.datasets, "load_dataset", hub)
    prompts = []
    for name, split in [("stanfordnlp/sst2", "validation"), ("cornell-movie-review-data/rotten_tomatoes", "train")]:
        template = template_for(name)  # no options: the known set's templates and label words
        assert template.label_words == KNOWN_SOURCES[name].label_words
        rows = load_classification_dataset(name, split, template=template)
        examples, skipped = tokenize_classification(rows, tokenizer, template, 64)
        assert examples["label"] == ["positive", "negative"] and not skipped
        prompts.append(examples["prompt"][0])
    assert calls == [("stanfordnlp/sst2", "validation"), ("cornell-movie-review-data/rotten_tomatoes", "train")]
    assert prompts == [
        "Review: a gorgeous film\nThe sentiment of this review is",
        "Review: moving\nThe sentiment of this review is",
    ]
    # SST-2's test split is unlabelled: every row is skipped as an unknown label, and the error says what it saw
    template = template_for("stanfordnlp/sst2")
    rows = load_classification_dataset("stanfordnlp/sst2", "test", template=template)
    with pytest.raises(BackattnValueError, match=r"1 unknown_label \(labels seen: '-1'"):
        tokenize_classification(rows, tokenizer, template, 64)


def test_local_files_in_the_hub_formats_need_only_the_columns_named(hub_files, tokenizer):
    """The same SST-2 parquet as a local file: the templates name its column, the label words its 0/1 labels."""
    template = ClassificationTemplate(
        "Review: {sentence}\nSentiment:", " {label}", '{"0": "negative", "1": "positive"}'
    )
    rows = load_classification_dataset(str(hub_files[("stanfordnlp/sst2", "validation")]), template=template)
    examples, _ = tokenize_classification(rows, tokenizer, template, 64)
    assert examples["label"] == ["positive", "negative"]


def test_a_missing_or_unreadable_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="No data file"):
        load_classification_dataset(str(tmp_path / "none.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(BackattnValueError, match="is empty"):
        load_classification_dataset(str(tmp_path / "empty.jsonl"))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(BackattnValueError, match="could not be read as parquet"):
        load_classification_dataset(str(tmp_path / "bad.parquet"))
    with pytest.raises(BackattnValueError, match="has the splits train, validation, test"):
        load_classification_dataset("rotten_tomatoes", "train_1M")
