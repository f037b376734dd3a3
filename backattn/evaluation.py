"""Scoring a causal LM (with or without a head) on math problems: target-token loss and final answers."""

from __future__ import annotations

import math
import re
from collections import Counter
from fractions import Fraction

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .sft_data import IGNORE_INDEX

_FINAL_ANSWER = re.compile(r"final answer is:?\s*\$?\\?(?:boxed\{)?\s*([^\n]*)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+")


def parse_number(text: str | None) -> float | None:
    """A number from text such as ``"1,234"``, ``"$5.50"``, ``"-3"``, ``"3/4"`` or ``"12."``; else ``None``."""
    if text is None:
        return None
    cleaned = text.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    cleaned = cleaned.removeprefix("\\(").removesuffix("\\)").rstrip("}").rstrip(".")
    try:
        return float(Fraction(cleaned)) if "/" in cleaned else float(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def parse_final_answer(text: str) -> str | None:
    """The answer a solution states: the text after "final answer is", else the last number in the text."""
    stated = _FINAL_ANSWER.search(text)
    if stated:
        numbers = _NUMBER.findall(stated.group(1))
        return numbers[0].strip() if numbers else stated.group(1).strip().rstrip(".") or None
    numbers = _NUMBER.findall(text)
    return numbers[-1].strip() if numbers else None


def answers_match(predicted: str | None, expected: str) -> bool:
    """Numbers are compared as numbers (``"1,000.0"`` equals ``"1000"``); anything else as trimmed text."""
    if predicted is None:
        return False
    a, b = parse_number(predicted), parse_number(expected)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    return predicted.strip().lower() == expected.strip().lower()


@torch.no_grad()
def target_token_loss(model, dataset, collator, batch_size: int = 8, progress: bool = False) -> dict[str, float]:
    """Mean cross-entropy and perplexity over the target tokens (labels not ``-100``) of a tokenized data set,
    and over the final-answer tokens alone when the collator gives ``answer_labels``."""
    model.eval()
    totals = {"labels": [0.0, 0], "answer_labels": [0.0, 0]}
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(dataset), batch_size), desc="Scoring", disable=not progress):
        batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        batch = {k: v.to(device) for k, v in batch.items()}
        targets = {key: batch.pop(key) for key in totals if key in batch}
        logits = model(**batch).logits[:, :-1].float().transpose(1, 2)
        for key, labels in targets.items():
            shifted = labels[:, 1:]
            totals[key][0] += F.cross_entropy(logits, shifted, ignore_index=IGNORE_INDEX, reduction="sum").item()
            totals[key][1] += int((shifted != IGNORE_INDEX).sum())
    loss = totals["labels"][0] / max(totals["labels"][1], 1)
    results = {"target_ce": loss, "perplexity": math.exp(loss), "target_tokens": totals["labels"][1]}
    if totals["answer_labels"][1]:
        results["answer_ce"] = totals["answer_labels"][0] / totals["answer_labels"][1]
        results["answer_tokens"] = totals["answer_labels"][1]
    return results


@torch.no_grad()
def generate_solutions(
    model, tokenizer, prompts: list[str], max_new_tokens: int = 256, batch_size: int = 8, progress: bool = False,
    **generation_options,
) -> list[str]:
    """Continuations of ``prompts`` (batched, left-padded; greedy unless ``generation_options`` say otherwise),
    decoded without special tokens."""
    model.eval()
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    outputs = []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc="Generating", disable=not progress):
            batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True)
            batch = batch.to(next(model.parameters()).device)
            options = {"do_sample": False, **generation_options}
            generated = model.generate(
                **batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **options
            )
            new_tokens = generated[:, batch["input_ids"].shape[1] :]
            outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = padding_side
    return outputs


def _answer_tokens(text: str | None) -> list[str]:
    """Lower-cased word and number tokens of an answer, thousands separators and a trailing period removed."""
    if text is None:
        return []
    return re.findall(r"-?\d+(?:\.\d+)?(?:/\d+)?|\w+", text.lower().replace(",", "").rstrip("."))


def token_overlap(predicted: str | None, expected: str) -> tuple[float, float, float]:
    """Precision, recall and F1 of the tokens two answers share (SQuAD-style bag-of-tokens overlap)."""
    predicted_tokens, expected_tokens = _answer_tokens(predicted), _answer_tokens(expected)
    common = sum((Counter(predicted_tokens) & Counter(expected_tokens)).values())
    if not predicted_tokens or not expected_tokens or not common:
        return 0.0, 0.0, 0.0
    precision, recall = common / len(predicted_tokens), common / len(expected_tokens)
    return precision, recall, 2 * precision * recall / (precision + recall)


def answer_metrics(predicted: list[str | None], expected: list[str]) -> dict[str, float]:
    """Exact match (numbers as numbers), token-overlap precision/recall/F1, and the numeric errors.

    ``mse`` and ``rmse`` are over the answers where both sides parse as numbers (``parse_rate`` of them);
    they are ``nan`` when none does.
    """
    if len(predicted) != len(expected):
        raise ValueError(f"{len(predicted)} predicted answers for {len(expected)} expected ones.")
    n = max(len(expected), 1)
    overlaps = [token_overlap(p, e) for p, e in zip(predicted, expected)]
    pairs = [(parse_number(p), parse_number(e)) for p, e in zip(predicted, expected)]
    errors = [(a - b) ** 2 for a, b in pairs if a is not None and b is not None]
    mse = sum(errors) / len(errors) if errors else float("nan")
    return {
        "accuracy": sum(answers_match(p, e) for p, e in zip(predicted, expected)) / n,
        "precision": sum(o[0] for o in overlaps) / n,
        "recall": sum(o[1] for o in overlaps) / n,
        "f1": sum(o[2] for o in overlaps) / n,
        "mse": mse,
        "rmse": math.sqrt(mse),
        "parse_rate": len(errors) / n,
    }


def evaluate_model(
    model,
    tokenizer,
    examples,
    scored=None,
    num_generation_examples: int = 32,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    progress: bool = True,
    teacher_forced: bool = True,
    **generation_options,
) -> dict:
    """Every metric for one model on tokenized held-out examples (from ``sft_data.tokenize_examples``).

    Teacher-forced: target-token and answer-token cross-entropy, perplexity (over ``scored``, the same
    examples possibly with cached base features; default ``examples``; skipped when not ``teacher_forced``,
    as in a sampling sweep, where they would not change). Generated (greedy unless
    ``generation_options`` say otherwise, on the first ``num_generation_examples``): final-answer accuracy,
    token-overlap precision/recall/F1, MSE/RMSE over parseable answers and the parse rate.
    """
    from .sft_data import SFTCollator

    results = {}
    if teacher_forced:
        results = target_token_loss(model, scored if scored is not None else examples,
                                    SFTCollator(tokenizer, answer_labels=True), batch_size, progress)  # fmt: skip
    problems = examples[:num_generation_examples]
    solutions = generate_solutions(
        model, tokenizer, problems["prompt"], max_new_tokens, batch_size, progress, **generation_options
    )
    results.update(answer_metrics([parse_final_answer(s) for s in solutions], problems["expected_answer"]))
    results["answers_scored"] = len(solutions)
    results["example_solution"] = solutions[0] if solutions else ""
    return results


def results_table(results: dict[str, dict]) -> str:
    """A Markdown table of :func:`evaluate_model` results, one row per model."""
    columns = [("target CE", "target_ce", ".4f"), ("perplexity", "perplexity", ".3f"),
               ("answer-token CE", "answer_ce", ".4f"), ("accuracy", "accuracy", ".1%"), ("F1", "f1", ".3f"),
               ("RMSE", "rmse", ".4g"), ("parse rate", "parse_rate", ".0%")]  # fmt: skip
    lines = ["| model | " + " | ".join(c[0] for c in columns) + " |", "|" + " --- |" * (len(columns) + 1)]
    for name, scores in results.items():
        cells = [format(scores.get(key, float("nan")), spec) for _, key, spec in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
