"""Scoring a causal LM (with or without a head) on math problems: per-problem scores, pooled metrics and intervals."""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections import Counter
from fractions import Fraction

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data.sft_data import IGNORE_INDEX

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
def per_problem_scores(model, dataset, collator, batch_size: int = 8, progress: bool = False) -> dict[str, list]:
    """Teacher-forced scores of each problem of a tokenized data set, in its order.

    ``target_loss`` / ``target_tokens``: summed cross-entropy and count of the target tokens (labels not
    ``-100``); with a collator that gives ``answer_labels``, also ``answer_loss`` / ``answer_tokens`` /
    ``answer_correct`` over the final-answer tokens alone (``answer_correct``: those the model ranks first), and
    ``answer_exact``: 1 where it ranks every one of them first (the whole number copied right), else 0.
    """
    model.eval()
    scores: dict[str, list] = {}
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(dataset), batch_size), desc="Scoring", disable=not progress):
        batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        batch = {k: v.to(device) for k, v in batch.items()}
        targets = {key: batch.pop(key) for key in ("labels", "answer_labels") if key in batch}
        logits = model(**batch).logits[:, :-1].float()
        for key, labels in targets.items():
            shifted = labels[:, 1:]
            mask = shifted != IGNORE_INDEX
            losses = F.cross_entropy(logits.transpose(1, 2), shifted, ignore_index=IGNORE_INDEX, reduction="none")
            prefix = key.removesuffix("_labels").replace("labels", "target")
            scores.setdefault(f"{prefix}_loss", []).extend(losses.sum(1).tolist())
            scores.setdefault(f"{prefix}_tokens", []).extend(mask.sum(1).tolist())
            if key == "answer_labels":
                correct = (logits.argmax(-1) == shifted) & mask
                scores.setdefault("answer_correct", []).extend(correct.sum(1).tolist())
    if "answer_correct" in scores:
        scores["answer_exact"] = answer_exact(scores)
    return scores


def answer_is_copyable(problem: str, solution: str, answer: str) -> bool:
    """Whether the final answer ``answer`` appears as a whole number earlier in the problem or in the solution
    before its final-answer line: then ranking it first under teacher forcing is a copy."""
    stated = _FINAL_ANSWER.search(solution)
    earlier = problem + "\n" + (solution[: stated.start()] if stated else solution)
    return re.search(r"(?<![\d.])" + re.escape(answer) + r"(?!\d)", earlier) is not None


def _with_answer_exact(scores: dict | None) -> dict | None:
    """``scores`` with :func:`answer_exact` added where they lack it (score files written before it)."""
    if scores is None or "answer_correct" not in scores or "answer_exact" in scores:
        return scores
    return {**scores, "answer_exact": answer_exact(scores)}


def answer_exact(scores: dict[str, list]) -> list[float]:
    """Per problem, 1.0 where every final-answer token is ranked first (``answer_correct == answer_tokens > 0``):
    the whole number copied right under teacher forcing. Derived, so older score files get it too."""
    return [float(0 < n == c) for c, n in zip(scores["answer_correct"], scores["answer_tokens"])]


def target_token_loss(model, dataset, collator, batch_size: int = 8, progress: bool = False) -> dict[str, float]:
    """Mean cross-entropy and perplexity over the target tokens (labels not ``-100``) of a tokenized data set,
    and over the final-answer tokens alone when the collator gives ``answer_labels``."""
    return _pooled_losses(per_problem_scores(model, dataset, collator, batch_size, progress))


def _pooled_losses(scores: dict[str, list]) -> dict[str, float]:
    """Token-weighted means of :func:`per_problem_scores`: target and final-answer CE, perplexity."""
    tokens = sum(scores["target_tokens"])
    loss = sum(scores["target_loss"]) / max(tokens, 1)
    results = {"target_ce": loss, "perplexity": math.exp(loss), "target_tokens": tokens}
    if sum(scores.get("answer_tokens", [])):
        results["answer_ce"] = sum(scores["answer_loss"]) / sum(scores["answer_tokens"])
        results["answer_tokens"] = sum(scores["answer_tokens"])
    return results


@torch.no_grad()
def generate_solutions(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 256,
    batch_size: int = 8,
    progress: bool = False,
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


#: A generation "loops" when one word n-gram of this length occurs at least this many times in it. Fixed on
#: the gold solutions of training templates (none of them loops; see ``benchmarks/compare_heads.py``).
REPETITION_NGRAM = 6
REPETITION_THRESHOLD = 3


def repeats_itself(text: str, n: int = REPETITION_NGRAM, threshold: int = REPETITION_THRESHOLD) -> bool:
    """Whether some ``n`` consecutive words occur ``threshold`` or more times in ``text`` (a decoding loop)."""
    words = text.split()
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    return bool(grams) and max(grams.values()) >= threshold


def distractors(answer: str, key: str, count: int = 3) -> list[str]:
    """``count`` wrong final answers near ``answer``, the same for the same ``(answer, key)`` on any machine.

    The rule: from ``a +- 1, a +- 2, a +- 10, 2a, a / 2, 10a`` keep the values that differ from ``a``, are not
    negative when ``a`` is not, and are whole when ``a`` is; draw ``count`` of them with a generator seeded
    by a hash of ``key`` (the problem text). Near misses are what a model that almost solved it would write.
    """
    value = Fraction(answer.replace(",", ""))
    pool = [value + 1, value - 1, value + 2, value - 2, value + 10, value - 10, 2 * value, value / 2, 10 * value]
    allowed = sorted(
        {c for c in pool if c != value and (c >= 0 or value < 0) and (c.denominator == 1 or value.denominator != 1)}
    )
    rng = random.Random(int.from_bytes(hashlib.sha256(f"{answer}\n{key}".encode()).digest()[:8], "big"))
    return [_format_number(c) for c in rng.sample(allowed, count)]


def _format_number(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    return format(value.numerator / value.denominator, ".10g")


@torch.no_grad()
def shared_prefix_outputs(module, prefix: list[int], continuations: list[list[int]], field: str = "logits"):
    """One forward of the shared ``prefix``, whose key-value cache then serves every continuation at once (a
    batch of the continuations, right-padded). Returns ``field`` of the outputs (``"logits"`` of a causal LM,
    ``"last_hidden_state"`` of its decoder) at the prefix's last position and at every continuation position:
    ``(width,)`` and ``(len(continuations), longest, width)``."""
    device = next(module.parameters()).device
    lengths = [len(c) for c in continuations]
    if min(lengths) < 1:
        raise ValueError("Every continuation needs at least one token.")
    out = module(input_ids=torch.tensor([prefix], device=device), use_cache=True)
    ids = torch.zeros(len(continuations), max(lengths), dtype=torch.long, device=device)
    for row, tokens in enumerate(continuations):
        ids[row, : len(tokens)] = torch.tensor(tokens)
    cache = out.past_key_values
    cache.batch_repeat_interleave(len(continuations))
    real = torch.arange(ids.shape[1], device=device) < torch.tensor(lengths, device=device)[:, None]
    mask = torch.cat([real.new_ones(len(continuations), len(prefix)), real], dim=1).long()
    rest = module(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    return out[field][0, -1], rest[field]


def continuation_scores(
    first_logits: torch.Tensor, logits: torch.Tensor, continuations: list[list[int]]
) -> list[float]:
    """``log p(c | prefix)`` of each continuation ``c`` from the logits :func:`shared_prefix_outputs` gives."""
    first, log_probs = torch.log_softmax(first_logits.float(), -1), torch.log_softmax(logits.float(), -1)
    scores = []
    for row, tokens in enumerate(continuations):
        following = torch.tensor(tokens[1:], device=log_probs.device)
        rest = log_probs[row, : len(tokens) - 1].gather(-1, following[:, None]).sum()
        scores.append(float(first[tokens[0]] + rest))
    return scores


def continuation_log_likelihoods(model, prefix: list[int], continuations: list[list[int]]) -> list[float]:
    """``log p(c | prefix)`` under a causal LM for each token list ``c``, the prefix run once."""
    return continuation_scores(*shared_prefix_outputs(model, prefix, continuations), continuations)


def choice_tokens(tokenizer, row: dict, template, after_solution: bool) -> tuple[list[int], list[list[int]]]:
    """The shared prefix and the final-answer lines (gold first, then the three :func:`distractors`) of one
    problem, tokenized exactly as the training targets are (see :func:`multiple_choice`)."""
    answers = [row["expected_answer"], *distractors(row["expected_answer"], row["problem"])]
    prompt_ids = tokenizer(template.render_prompt(row))["input_ids"]
    token_lists = []
    for answer in answers:
        target = template.render_target({**row, "expected_answer": answer})
        line_start = target.rfind("\n", 0, target.rfind(answer)) + 1
        if not after_solution:
            target, line_start = target[line_start:], 0
        encoded = tokenizer(target, add_special_tokens=False, return_offsets_mapping=True)
        first_line_token = next(i for i, (start, end) in enumerate(encoded["offset_mapping"]) if end > line_start)
        token_lists.append((encoded["input_ids"], first_line_token))
    shared = min(first for _, first in token_lists)
    if any(ids[:shared] != token_lists[0][0][:shared] for ids, _ in token_lists):
        raise ValueError(f"The candidates' targets differ before their final-answer line: {row['problem']!r}.")
    return prompt_ids + token_lists[0][0][:shared], [ids[shared:] for ids, _ in token_lists]


def multiple_choice(
    model, tokenizer, rows, template, after_solution: bool, progress: bool = False, scorer=None
) -> dict[str, list]:
    """Per problem: does the gold final-answer line out-score three :func:`distractors`?

    The candidates are the target's final-answer line (for the default template ``The final answer is N.``)
    with ``N`` the gold answer or a distractor, tokenized exactly as in training. They follow the prompt
    alone (*direct*: the answer without written reasoning) or the prompt and the gold solution
    (``after_solution``: copying the result the reasoning reached). ``correct``: the gold line has the highest
    log-likelihood; ``correct_normalised``: the highest log-likelihood per token (ties count as wrong).
    ``scorer(index, prefix, lines)`` replaces :func:`continuation_log_likelihoods` under ``model`` (for
    scores computed from cached base states).
    """
    results: dict[str, list] = {"correct": [], "correct_normalised": []}
    if model is not None:
        model.eval()
    scorer = scorer or (lambda index, prefix, lines: continuation_log_likelihoods(model, prefix, lines))
    for index, row in enumerate(tqdm(rows, desc="Multiple choice", disable=not progress)):
        prefix, lines = choice_tokens(tokenizer, row, template, after_solution)
        scores = scorer(index, prefix, lines)
        normalised = [score / len(line) for score, line in zip(scores, lines)]
        results["correct"].append(float(all(scores[0] > s for s in scores[1:])))
        results["correct_normalised"].append(float(all(normalised[0] > s for s in normalised[1:])))
    return results


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
    they are ``nan`` when none does, and ``inf`` when an answer is too large for a float's square.
    """
    if len(predicted) != len(expected):
        raise ValueError(f"{len(predicted)} predicted answers for {len(expected)} expected ones.")
    n = max(len(expected), 1)
    overlaps = [token_overlap(p, e) for p, e in zip(predicted, expected)]
    pairs = [(parse_number(p), parse_number(e)) for p, e in zip(predicted, expected)]
    errors = [(a - b) * (a - b) for a, b in pairs if a is not None and b is not None]  # inf, not OverflowError
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


#: The columns held-out rows keep for scoring: the bootstrap's unit and the fields multiple choice renders.
HELD_OUT_COLUMNS = ("template_id", "problem", "generated_solution")


def choice_template(template, columns):
    """``template`` when multiple choice can be scored on rows with these ``columns`` (its target ends in the
    final answer and the rows keep the problem), else ``None``."""
    return template if "{expected_answer}" in template.target and "problem" in columns else None


def template_groups(examples) -> list | None:
    """The examples' template ids, the bootstrap's unit of resampling; ``None`` (problems alone) without them."""
    return examples["template_id"] if "template_id" in examples.column_names else None


def held_out_scores(
    model,
    tokenizer,
    examples,
    scored=None,
    num_generation_examples: int = 32,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    progress: bool = True,
    teacher_forced: bool = True,
    template=None,
    **generation_options,
) -> dict[str, list]:
    """Per-problem scores of one model on tokenized held-out examples (from ``sft_data.tokenize_examples``),
    in their order: what :func:`summarise_scores` turns into statistics with intervals.

    Teacher-forced (over ``scored``, the same examples possibly with cached base features; default
    ``examples``; skipped when not ``teacher_forced``): the keys of :func:`per_problem_scores`. With a
    ``template`` (a ``PromptTemplate``; the rows need its fields): ``mc_direct`` / ``mc_direct_normalised``
    of :func:`multiple_choice` after the prompt alone. Generated (greedy unless ``generation_options`` say
    otherwise, on the first ``num_generation_examples``): ``greedy_correct``, ``greedy_parsed``,
    ``greedy_repeats`` (:func:`repeats_itself`), with ``generation_index``, ``answers`` and ``solutions``.
    """
    from .data.sft_data import SFTCollator

    scores: dict[str, list] = {}
    if teacher_forced:
        data = scored if scored is not None else examples
        scores.update(per_problem_scores(model, data, SFTCollator(tokenizer, answer_labels=True), batch_size, progress))
    if template is not None:
        picked = multiple_choice(model, tokenizer, examples, template, after_solution=False, progress=progress)
        scores["mc_direct"], scores["mc_direct_normalised"] = picked["correct"], picked["correct_normalised"]
    problems = examples[:num_generation_examples]
    solutions = generate_solutions(
        model, tokenizer, problems["prompt"], max_new_tokens, batch_size, progress, **generation_options
    )
    scores["generation_index"] = list(range(len(solutions)))
    scores.update(solution_scores(solutions, problems["expected_answer"]))
    return scores


def solution_scores(solutions: list[str], expected: list[str]) -> dict[str, list]:
    """Per generated solution: ``greedy_correct`` (its final answer matches), ``greedy_parsed`` (it has one
    that reads as a number), ``greedy_repeats`` (it loops, :func:`repeats_itself`), and the ``answers``."""
    answers = [parse_final_answer(s) for s in solutions]
    return {
        "greedy_correct": [float(answers_match(a, e)) for a, e in zip(answers, expected)],
        "greedy_parsed": [float(parse_number(a) is not None) for a in answers],
        "greedy_repeats": [float(repeats_itself(s)) for s in solutions],
        "answers": answers,
        "solutions": solutions,
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
    template=None,
    **generation_options,
) -> dict:
    """Every metric for one model on tokenized held-out examples (:func:`held_out_scores` per problem).

    Pooled: target-token and answer-token cross-entropy, perplexity (teacher-forced); from the generated
    solutions final-answer accuracy, token-overlap precision/recall/F1, MSE/RMSE over parseable answers, the
    parse rate and the repetition rate. ``summary``: :func:`summarise_scores` of the same scores (95%
    intervals, resampling the examples' ``template_id`` where they have one), multiple choice included
    with a ``template``.
    """
    scores = held_out_scores(model, tokenizer, examples, scored, num_generation_examples, max_new_tokens,
                             batch_size, progress, teacher_forced, template, **generation_options)  # fmt: skip
    results = _pooled_losses(scores) if teacher_forced else {}
    results["summary"] = summarise_scores(scores, None, template_groups(examples))
    expected = examples[: len(scores["answers"])]["expected_answer"]
    results.update(answer_metrics(scores["answers"], expected))
    results["repetition_rate"] = sum(scores["greedy_repeats"]) / max(len(scores["solutions"]), 1)
    results["answers_scored"] = len(scores["solutions"])
    results["example_solution"] = scores["solutions"][0] if scores["solutions"] else ""
    return results


#: metric -> (per-problem numerator, denominator or None, transform of the statistic, label): the statistics
#: :func:`summarise_scores` takes of :func:`held_out_scores` (a ratio of sums where there is a denominator).
HELD_OUT_METRICS = {
    "target_ce": ("target_loss", "target_tokens", None, "target CE"),
    "perplexity": ("target_loss", "target_tokens", math.exp, "perplexity"),
    "answer_ce": ("answer_loss", "answer_tokens", None, "answer-token CE"),
    "answer_accuracy": ("answer_correct", "answer_tokens", None, "answer-token accuracy"),
    "answer_exact": ("answer_exact", None, None, "whole answer ranked first"),
    "copied_answer": ("answer_copied", "answer_copyable", None, "copyable answer ranked first"),
    "mc_direct": ("mc_direct", None, None, "MC direct"),
    "mc_direct_normalised": ("mc_direct_normalised", None, None, "MC direct (per token)"),
    "mc_after_solution": ("mc_after_solution", None, None, "MC after solution"),
    "mc_after_solution_normalised": ("mc_after_solution_normalised", None, None, "MC after solution (per token)"),
    "greedy_accuracy": ("greedy_correct", None, None, "greedy accuracy"),
    "parse_rate": ("greedy_parsed", None, None, "parse rate"),
    "repetition_rate": ("greedy_repeats", None, None, "repetition rate"),
}


def summarise_scores(
    scores: dict, base: dict | None, groups: list | None, n_resamples: int = 2000, metrics: dict = HELD_OUT_METRICS
) -> dict:
    """Every metric of ``metrics`` that ``scores`` holds, with its 95% bootstrap interval (resampling
    ``groups``, e.g. template ids, then problems within them; problems alone when ``None``), and its paired
    difference to ``base`` (the compared model's scores on the same problems) as ``minus_base``."""
    from .bootstrap import bootstrap_interval

    scores, base = (_with_answer_exact(s) for s in (scores, base))
    out = {}
    for metric, (numerator, denominator, transform, _) in metrics.items():
        if numerator not in scores:
            continue
        rows = scores.get("generation_index") if numerator.startswith("greedy") else None
        g = None if groups is None else [groups[i] for i in rows] if rows is not None else groups
        values, weights = scores[numerator], scores.get(denominator) if denominator else None
        interval = bootstrap_interval(values, weights, groups=g, n_resamples=n_resamples)
        if transform is not None:
            interval = type(interval)(*(transform(v) for v in interval))
        out[metric] = {"value": interval.estimate, "low": interval.low, "high": interval.high, "n": len(values)}
        if base is not None and numerator in base and transform is None:
            paired = bootstrap_interval(values, weights, groups=g, baseline=base[numerator],
                                        baseline_denominators=base.get(denominator) if denominator else None,
                                        n_resamples=n_resamples)  # fmt: skip
            out[metric]["minus_base"] = {"value": paired.estimate, "low": paired.low, "high": paired.high}
    return out


#: The columns a reader looks at first: (header, metric, format).
TABLE_COLUMNS = (("target CE", "target_ce", ".4f"), ("answer-token CE", "answer_ce", ".4f"),
                 ("MC direct", "mc_direct", ".1%"), ("greedy accuracy", "greedy_accuracy", ".1%"),
                 ("parse rate", "parse_rate", ".0%"), ("repetition rate", "repetition_rate", ".0%"))  # fmt: skip


def results_table(summaries: dict[str, dict]) -> str:
    """A Markdown table of :func:`summarise_scores` results, one row per model (value and 95% interval), then a
    row of each later model's paired difference to the first."""
    columns = [c for c in TABLE_COLUMNS if any(c[1] in s for s in summaries.values())]

    def cell(stat: dict | None, spec: str, sign: str = "") -> str:
        if stat is None:
            return "-"
        values = [format(stat[k], sign + spec) for k in ("value", "low", "high")]
        return f"{values[0]} [{values[1]}, {values[2]}]"

    lines = ["| model | " + " | ".join(c[0] for c in columns) + " |", "|" + " --- |" * (len(columns) + 1)]
    for name, summary in summaries.items():
        lines.append(f"| {name} | " + " | ".join(cell(summary.get(key), spec) for _, key, spec in columns) + " |")
    base = next(iter(summaries))
    for name, summary in list(summaries.items())[1:]:
        cells = [cell(summary.get(key, {}).get("minus_base"), spec, "+") for _, key, spec in columns]
        lines.append(f"| {name} minus {base} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
