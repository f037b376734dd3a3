"""evaluate_math.py and the ecosystem check through EleutherAI's lm-evaluation-harness."""

import json

import pytest
import torch
from conftest import randomise
from transformers import AutoTokenizer, GPT2LMHeadModel

import evaluate_math
from backattn import GPT2BackwardAttentionForCausalLM
from backattn.data.sft_data import PromptTemplate, load_math_dataset, tokenize_examples
from backattn.evaluation import evaluate_model


@pytest.fixture(scope="module")
def model_with_head_dir(tiny_gpt2_dir, tmp_path_factory):
    model = GPT2BackwardAttentionForCausalLM.from_pretrained(tiny_gpt2_dir, head_config="hidden")
    randomise(model.heads, seed=2)
    path = tmp_path_factory.mktemp("with-head")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_gpt2_dir).save_pretrained(path)
    return path


def run(model_dir, math_jsonl, tmp_path, *extra):
    args = ["--model_name_or_path", str(model_dir), "--dataset", str(math_jsonl), "--max_samples", "6",
            "--num_generation_examples", "3", "--max_new_tokens", "5", "--max_length", "120", "--batch_size", "4",
            "--output_dir", str(tmp_path), *extra]  # fmt: skip
    return evaluate_math.main(args)


def test_writes_every_metric_as_json_and_markdown(model_with_head_dir, math_jsonl, tmp_path):
    results = run(model_with_head_dir, math_jsonl, tmp_path, "--name", "head")
    scores = results["head"]
    for key in (
        "target_ce",
        "perplexity",
        "answer_ce",
        "accuracy",
        "precision",
        "recall",
        "f1",
        "mse",
        "rmse",
        "parse_rate",
    ):
        assert key in scores, key
    assert scores["answers_scored"] == 3
    record = json.loads((tmp_path / "eval_results.json").read_text())
    assert record["examples"] == 6 and record["results"]["head"]["target_ce"] == scores["target_ce"]
    assert "| head |" in (tmp_path / "eval_results.md").read_text()


def test_intervals_agree_with_the_pooled_metrics(model_with_head_dir, math_jsonl, tmp_path):
    scores = run(model_with_head_dir, math_jsonl, tmp_path, "--name", "head")["head"]
    summary = scores["summary"]
    for pooled, summarised in (("target_ce", "target_ce"), ("answer_ce", "answer_ce"), ("perplexity", "perplexity"),
                               ("accuracy", "greedy_accuracy"), ("parse_rate", "parse_rate"),
                               ("repetition_rate", "repetition_rate")):  # fmt: skip
        assert summary[summarised]["value"] == pytest.approx(scores[pooled], rel=1e-9), pooled
        assert summary[summarised]["low"] <= summary[summarised]["value"] <= summary[summarised]["high"]
    assert summary["mc_direct"]["n"] == 6 and summary["greedy_accuracy"]["n"] == 3
    table = (tmp_path / "eval_results.md").read_text()
    ce = summary["target_ce"]
    assert f"| head | {ce['value']:.4f} [{ce['low']:.4f}, {ce['high']:.4f}] |" in table and "| MC direct |" in table


def test_heads_off_scores_exactly_like_the_plain_base(model_with_head_dir, tiny_gpt2_dir, math_jsonl, tmp_path):
    with_head = run(model_with_head_dir, math_jsonl, tmp_path / "on", "--name", "m")["m"]
    heads_off = run(model_with_head_dir, math_jsonl, tmp_path / "off", "--heads_off", "--name", "m")["m"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    tokenizer.pad_token = tokenizer.eos_token
    rows = load_math_dataset(str(math_jsonl), max_samples=6)
    examples, _ = tokenize_examples(rows, tokenizer, PromptTemplate(), 512)
    plain = evaluate_model(GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval(), tokenizer, examples, None, 3, 5, 4)
    for key in ("target_ce", "answer_ce", "accuracy", "f1", "parse_rate"):
        assert heads_off[key] == pytest.approx(plain[key], rel=1e-6), key
    assert heads_off["example_solution"] == plain["example_solution"]
    assert with_head["target_ce"] != pytest.approx(plain["target_ce"], rel=1e-3)  # the head does change things


def test_top_k_mode_scores_the_reranked_model(model_with_head_dir, math_jsonl, tmp_path):
    full = run(model_with_head_dir, math_jsonl, tmp_path / "full", "--name", "m")["m"]
    top_k = run(model_with_head_dir, math_jsonl, tmp_path / "k", "--rerank_top_k", "3", "--name", "m")["m"]
    model = GPT2BackwardAttentionForCausalLM.from_pretrained(model_with_head_dir).eval()
    model.config.rerank_top_k = 3
    tokenizer = AutoTokenizer.from_pretrained(model_with_head_dir)
    tokenizer.pad_token = tokenizer.eos_token
    examples, _ = tokenize_examples(load_math_dataset(str(math_jsonl), max_samples=6), tokenizer, PromptTemplate(), 512)
    expected = evaluate_model(model, tokenizer, examples, None, 3, 5, 4)
    assert top_k["target_ce"] == pytest.approx(expected["target_ce"], rel=1e-6)
    assert top_k["target_ce"] != pytest.approx(full["target_ce"], rel=1e-4)


def test_lm_evaluation_harness_loglikelihood_equals_ours(model_with_head_dir):
    pytest.importorskip("lm_eval", reason="lm-eval is installed by `make test` (the eval extra)")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    tokenizer = AutoTokenizer.from_pretrained(model_with_head_dir)
    model = GPT2BackwardAttentionForCausalLM.from_pretrained(model_with_head_dir).eval()
    harness = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2)
    pairs = [("Question: What is 2 + 3?\nAnswer:", " 5"), ("Question: Tom has 4 apples.", " He eats 1 and has 3 left.")]
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]
    theirs = [loglikelihood for loglikelihood, _ in harness.loglikelihood(requests)]
    ours = []
    with torch.no_grad():
        for context, continuation in pairs:
            context_ids, continuation_ids = tokenizer(context)["input_ids"], tokenizer(continuation)["input_ids"]
            log_probs = model(torch.tensor([context_ids + continuation_ids])).logits[0].log_softmax(-1)
            ours.append(
                sum(log_probs[len(context_ids) - 1 + i, token].item() for i, token in enumerate(continuation_ids))
            )
    assert theirs == pytest.approx(ours, abs=1e-4)
