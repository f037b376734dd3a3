"""``evaluate_two_tasks.py``: two heads on one base, each scored on both tasks, and the mixed batch equal to each
head alone (a tiny random Llama with the real SmolLM2 tokenizer, the real offline Rotten Tomatoes snippets)."""

import json

import datasets
import pytest
import torch
from conftest import randomise

import evaluate_two_tasks as script
from backattn import LlamaBackwardAttentionForCausalLM


@pytest.fixture(scope="module")
def two_heads(tiny_llama_and_rows, tmp_path_factory):
    """A math head and a sentiment head, random and different, saved for the tiny base."""
    directory = tmp_path_factory.mktemp("two-heads")
    model = LlamaBackwardAttentionForCausalLM.from_pretrained(tiny_llama_and_rows / "model")
    for seed, name in enumerate(("math", "sentiment"), start=1):
        model.add_head("hidden", head_name=name)
        randomise(model.heads[name], seed=seed)
        model.save_head(directory / name, head_name=name)
    return directory


def test_two_heads_score_both_tasks_and_the_mixed_batch_equals_each_alone(
    tiny_llama_and_rows, two_heads, tmp_path, monkeypatch, capsys
):
    rows = datasets.load_dataset("json", data_files=str(tiny_llama_and_rows / "rows.jsonl"), split="train")
    monkeypatch.setattr(script, "build_gsm_symbolic", lambda **kwargs: {"test": rows})
    record = script.main([
        "--math_head", str(two_heads / "math"), "--sentiment_head", str(two_heads / "sentiment"),
        "--model_name_or_path", str(tiny_llama_and_rows / "model"), "--math_problems", "6", "--sentiment_rows", "10",
        "--batch_size", "4", "--max_new_tokens", "3", "--n_resamples", "50", "--output_dir", str(tmp_path),
    ])  # fmt: skip
    results = record["results"]
    assert list(results) == ["frozen base", "math head", "sentiment head", "mixed batch (each row its own head)"]
    assert record["math_problems"] == 6 and record["sentiment_rows"] == 10
    mixed, alone_math, alone_sentiment = (results[k] for k in list(results)[3:] + ["math head", "sentiment head"])
    # Every mixed-batch row gets what its head gives it alone (other rows, other padding, other heads beside it).
    assert all(value < 1e-4 for value in record["mixed_batch_largest_difference_to_alone"].values())
    assert mixed["math"]["target_ce"] == pytest.approx(alone_math["math"]["target_ce"], rel=1e-6)
    assert mixed["sentiment"]["accuracy"] == alone_sentiment["sentiment"]["accuracy"]
    assert mixed["sentiment"]["label_ce"] == pytest.approx(alone_sentiment["sentiment"]["label_ce"], rel=1e-6)
    # The two heads differ from the base and from each other on each task.
    ces = [results[k]["math"]["target_ce"] for k in ("frozen base", "math head", "sentiment head")]
    assert len({round(ce, 6) for ce in ces}) == 3
    labels = [results[k]["sentiment"]["label_ce"] for k in ("frozen base", "math head", "sentiment head")]
    assert len({round(ce, 6) for ce in labels}) == 3
    for scores in results.values():
        low, high = scores["sentiment"]["accuracy_ci"]
        assert low <= scores["sentiment"]["accuracy"] <= high
        assert torch.isfinite(torch.tensor(scores["math"]["target_ce"]))
    assert set(record["side_by_side"]) == {"math", "sentiment", "same_as_alone", "alone"}
    assert json.loads((tmp_path / "two_tasks.json").read_text())["sentiment_rows"] == 10
    assert (tmp_path / "two_tasks.png").stat().st_size > 0
    assert "| mixed batch (each row its own head) |" in (tmp_path / "two_tasks.md").read_text()
    assert "One mixed batch, generated side by side" in capsys.readouterr().out
