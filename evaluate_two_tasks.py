"""One base, two task heads: a math head and a sentiment head scored on both tasks, alone and in one mixed batch.

    python evaluate_two_tasks.py --math_head outputs/demo/head --sentiment_head outputs/demo_sentiment/head
    make demo-two-heads                     # trains both heads first (configs/demo.yaml, configs/demo_sentiment.yaml)

Both heads are loaded onto one frozen base (``load_head``; switching between them copies no weights). Every model
is scored on every task: the frozen base (heads off), the math head, the sentiment head, and the *mixed batch*,
where every batch holds math rows and sentiment rows together, each row with its own head (``forward(...,
heads=[...])``). Math: the held-out GSM-Symbolic problems (templates 80-99, teacher-forced target- and
answer-token CE); sentiment: held-out Rotten Tomatoes snippets (split by movie; accuracy, macro-F1 and label CE by
label-word likelihood). Each metric carries a 95% bootstrap interval over templates or movies, then rows. The
mixed batch's per-row scores are compared with each head's alone (the largest difference is reported). Last, one
mixed batch generates a math solution and a sentiment label side by side.

Writes ``two_tasks.json``, ``two_tasks.md`` and ``two_tasks.png`` to ``--output_dir``.
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoConfig, set_seed

from backattn import family_for
from backattn.bootstrap import bootstrap_interval
from backattn.classification import classification_metrics, classify, label_candidates
from backattn.data.classification_data import (
    ROTTEN_TOMATOES,
    data_classes,
    load_classification_dataset,
    template_for,
    tokenize_classification,
)
from backattn.data.gsm_symbolic import build_gsm_symbolic
from backattn.data.sft_data import IGNORE_INDEX, PromptTemplate, SFTCollator, sft_tokenizer, tokenize_examples
from backattn.evaluation import per_problem_scores
from backattn.offline import EMBEDDED_MODEL, resolve_base_model
from backattn.run_files import check_argument_values, parse_command_line, writable_directory, write_text_atomically

MATH, SENTIMENT = "math", "sentiment"


@dataclass
class TwoTaskArguments:
    math_head: str = field(metadata={"help": "A saved math head (directory or Hub repo id), e.g. outputs/demo/head."})
    sentiment_head: str = field(metadata={"help": "A saved sentiment head, e.g. outputs/demo_sentiment/head."})
    model_name_or_path: str = field(default=EMBEDDED_MODEL, metadata={"help": "The base both heads were trained on."})
    gsm_variants_per_template: int = field(default=2, metadata={"help": "GSM-Symbolic build (as the math head's)."})
    math_problems: int = field(default=40, metadata={"help": "Held-out math problems scored (the first N)."})
    sentiment_split: str = field(default="test", metadata={"help": "Rotten Tomatoes split scored (by movie)."})
    sentiment_rows: int = field(default=400, metadata={"help": "Held-out snippets scored (the first N)."})
    max_length: int = field(default=320, metadata={"help": "Longest prompt + target in tokens; longer rows skipped."})
    batch_size: int = field(default=8, metadata={"help": "Rows a batch (the mixed batch: half math, half sentiment)."})
    max_new_tokens: int = field(default=160, metadata={"help": "New tokens of the mixed batch's math solution."})
    n_resamples: int = field(default=2000, metadata={"help": "Bootstrap resamples for the intervals."})
    seed: int = field(default=0)
    output_dir: str = field(default="outputs/two_tasks")


ARGUMENT_RANGES = {
    name: ("a positive integer", lambda v: v >= 1)
    for name in ("gsm_variants_per_template", "math_problems", "sentiment_rows", "max_length", "batch_size",
                 "max_new_tokens", "n_resamples")
}  # fmt: skip


def math_metrics(scores: dict, groups, n_resamples: int, seed: int) -> dict:
    """Target- and answer-token CE (token-weighted) of per-problem scores, with intervals over templates."""
    options = {"groups": groups, "n_resamples": n_resamples, "seed": seed}
    results = {}
    for key in ("target", "answer"):
        if f"{key}_loss" in scores:
            interval = bootstrap_interval(scores[f"{key}_loss"], scores[f"{key}_tokens"], **options)
            results[f"{key}_ce"], results[f"{key}_ce_ci"] = interval.estimate, [interval.low, interval.high]
    return results


@torch.no_grad()
def mixed_batch_scores(model, tokenizer, math_examples, sentiment_examples, candidates, batch_size: int):
    """Per row, with math and sentiment rows in the same batches, each under its own head: every math problem's
    summed target CE and its target-token count, and every snippet's log-likelihood of each class."""
    if any(len(tokens) != 1 for tokens in candidates):
        raise ValueError(f"The mixed batch reads one-token label words; these take several: {candidates}.")
    collator, device = SFTCollator(tokenizer), next(model.parameters()).device
    label_tokens = torch.tensor([c[0] for c in candidates], device=device)
    half = max(batch_size // 2, 1)
    n_batches = max(-(-len(math_examples) // half), -(-len(sentiment_examples) // half))
    math_loss, math_tokens, sentiment = [], [], []
    for b in range(n_batches):
        maths = [math_examples[i] for i in range(b * half, min((b + 1) * half, len(math_examples)))]
        texts = [sentiment_examples[i] for i in range(b * half, min((b + 1) * half, len(sentiment_examples)))]
        rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in maths + texts]
        batch = {k: v.to(device) for k, v in collator(rows).items()}
        labels = batch.pop("labels")
        heads = [MATH] * len(maths) + [SENTIMENT] * len(texts)
        logits = model(**batch, heads=heads).logits.float()  # (rows, length, vocabulary)
        if maths:
            shifted = labels[: len(maths), 1:]
            losses = F.cross_entropy(logits[: len(maths), :-1].transpose(1, 2), shifted, reduction="none")
            math_loss += losses.sum(1).tolist()
            math_tokens += (shifted != IGNORE_INDEX).sum(1).tolist()
        if texts:
            rows_t = torch.arange(len(maths), len(rows), device=device)
            last = (labels[rows_t] != IGNORE_INDEX).int().argmax(1) - 1  # each prompt's last position
            log_probs = torch.log_softmax(logits[rows_t, last], -1)[:, label_tokens]
            sentiment += log_probs.cpu().tolist()
    return {"target_loss": math_loss, "target_tokens": math_tokens}, np.asarray(sentiment)


def with_log_likelihoods(scores: dict, log_likelihoods: np.ndarray) -> dict:
    """``classify``'s per-row output for the same rows with other class log-likelihoods."""
    classes = scores["classes"]
    gold = [classes.index(label) for label in scores["references"]]
    return {**scores, "log_likelihoods": log_likelihoods,
            "predictions": [classes[i] for i in log_likelihoods.argmax(1)],
            "label_loss": [-float(log_likelihoods[row, g]) for row, g in enumerate(gold)]}  # fmt: skip


def results_table(results: dict) -> str:
    def cell(scores, key, spec):
        low, high = scores[f"{key}_ci"]
        return f"{format(scores[key], spec)} [{format(low, spec)}, {format(high, spec)}]"

    lines = ["| model | math: target CE | math: answer-token CE | sentiment: accuracy | sentiment: macro-F1 |",
             "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for name, (maths, sentiment) in results.items():
        answer = cell(maths, "answer_ce", ".4f") if "answer_ce" in maths else "(per row as alone)"
        lines.append(f"| {name} | {cell(maths, 'target_ce', '.4f')} | {answer} | "
                     f"{cell(sentiment, 'accuracy', '.1%')} | {cell(sentiment, 'macro_f1', '.3f')} |")  # fmt: skip
    return "\n".join(lines)


def plot(results: dict, majority_rate: float, path) -> None:
    """Math target CE (lower is better) and sentiment accuracy (higher) per model, intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = ((0, "target_ce", "math: held-out target CE (lower is better)"),
              (1, "accuracy", "sentiment: held-out accuracy (higher is better)"))  # fmt: skip
    for axis, (task, key, label) in zip(axes, panels):
        values = [results[n][task][key] for n in names]
        errors = np.array([[v - results[n][task][f"{key}_ci"][0], results[n][task][f"{key}_ci"][1] - v]
                           for n, v in zip(names, values)]).T  # fmt: skip
        axis.bar(range(len(names)), values, yerr=errors, capsize=4, color=["gray", "C0", "C1", "C2"][: len(names)])
        axis.set_xticks(range(len(names)), [n.replace(" (", "\n(") for n in names], fontsize=8)
        axis.set_title(label, fontsize=10)
        low = min(v - e for v, e in zip(values, errors[0]))
        axis.set_ylim(low * 0.95, max(v + e for v, e in zip(values, errors[1])) * 1.02)
        if key == "accuracy":
            axis.axhline(majority_rate, linestyle="--", color="black", label=f"majority class {majority_rate:.1%}")
            axis.set_ylim(min(low, majority_rate) * 0.95, 1.0)
            axis.legend(fontsize=8)
    figure.suptitle("One base, two heads: each head on its own task and on the other (95% intervals)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


@torch.no_grad()
def side_by_side(model, tokenizer, math_prompt: str, sentiment_prompt: str, max_new_tokens: int) -> dict:
    """One mixed batch (left-padded) generating greedily under each row's head, and each row alone."""
    tokenizer.padding_side = "left"
    batch = tokenizer([math_prompt, sentiment_prompt], return_tensors="pt", padding=True)
    options = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    mixed = model.generate(**batch, heads=[MATH, SENTIMENT], **options)
    texts = tokenizer.batch_decode(mixed[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    alone = []
    for prompt, head in ((math_prompt, MATH), (sentiment_prompt, SENTIMENT)):
        single = tokenizer(prompt, return_tensors="pt")
        model.set_head(head)
        out = model.generate(**single, **options)
        alone.append(tokenizer.decode(out[0, single["input_ids"].shape[1] :], skip_special_tokens=True))
    return {"math": texts[0], "sentiment": texts[1].strip().split("\n")[0], "same_as_alone": texts == alone,
            "alone": alone}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_command_line(TwoTaskArguments, sys.argv[1:] if argv is None else argv)
    check_argument_values(args, ARGUMENT_RANGES)
    output = writable_directory(args.output_dir)
    set_seed(args.seed)
    base = resolve_base_model(args.model_name_or_path)
    model = family_for(AutoConfig.from_pretrained(base).model_type).from_pretrained(base).eval()
    model.load_head(args.math_head, head_name=MATH)  # checked against this base: a mismatch is refused
    model.load_head(args.sentiment_head, head_name=SENTIMENT)
    tokenizer = sft_tokenizer(base)

    problems = build_gsm_symbolic(variants_per_template=args.gsm_variants_per_template)["test"]
    problems = problems.select(range(min(args.math_problems, len(problems))))
    math_examples, _ = tokenize_examples(problems, tokenizer, PromptTemplate(), args.max_length, ("template_id",))
    template = template_for(ROTTEN_TOMATOES)
    snippets = load_classification_dataset(ROTTEN_TOMATOES, args.sentiment_split, template=template)
    snippets = snippets.select(range(min(args.sentiment_rows, len(snippets))))
    classes = data_classes(snippets, template)
    sentiment_examples, skipped = tokenize_classification(snippets, tokenizer, template, args.max_length, classes,
                                                          ("group",))  # fmt: skip
    candidates = label_candidates(tokenizer, template, classes)
    bootstrap = {"n_resamples": args.n_resamples, "seed": args.seed}
    templates = list(math_examples["template_id"])

    results, per_row = {}, {}
    answer_collator = SFTCollator(tokenizer, answer_labels=True)
    for name, head in (("frozen base", None), ("math head", MATH), ("sentiment head", SENTIMENT)):
        if head is not None:
            model.set_head(head)
        with model.disable_heads() if head is None else contextlib.nullcontext():
            maths = per_problem_scores(model, math_examples, answer_collator, args.batch_size, progress=True)
            sentiment = classify(model, tokenizer, sentiment_examples, template, classes, None, args.batch_size, True)
        per_row[name] = (maths, sentiment)
        results[name] = (math_metrics(maths, templates, **bootstrap), classification_metrics(sentiment, **bootstrap))

    mixed_maths, mixed_log_likelihoods = mixed_batch_scores(
        model, tokenizer, math_examples, sentiment_examples, candidates, args.batch_size
    )
    mixed_sentiment = with_log_likelihoods(per_row["sentiment head"][1], mixed_log_likelihoods)
    name = "mixed batch (each row its own head)"
    results[name] = (math_metrics(mixed_maths, templates, **bootstrap),
                     classification_metrics(mixed_sentiment, **bootstrap))  # fmt: skip
    largest_difference = {
        "math target loss (nats, summed per problem)": float(np.max(np.abs(
            np.asarray(mixed_maths["target_loss"]) - np.asarray(per_row["math head"][0]["target_loss"])))),
        "sentiment label log-likelihood": float(np.max(np.abs(
            mixed_log_likelihoods - per_row["sentiment head"][1]["log_likelihoods"]))),
    }  # fmt: skip

    math_prompt = PromptTemplate().render_prompt(problems[0])
    generated = side_by_side(model, tokenizer, math_prompt, template.render_prompt(snippets[0]), args.max_new_tokens)

    majority = results["frozen base"][1]["majority_rate"]
    table = results_table(results)
    record = {
        "arguments": asdict(args),
        "math_problems": len(math_examples),
        "sentiment_rows": len(sentiment_examples),
        "skipped": dict(skipped),
        "results": {name: {"math": m, "sentiment": s} for name, (m, s) in results.items()},
        "mixed_batch_largest_difference_to_alone": largest_difference,
        "side_by_side": generated,
    }
    write_text_atomically(output / "two_tasks.json", json.dumps(record, indent=2, default=float) + "\n")
    write_text_atomically(output / "two_tasks.md", table + "\n")
    plot(results, majority, output / "two_tasks.png")
    print(f"\nOne base, two heads ({len(math_examples)} held-out math problems, {len(sentiment_examples)} held-out "
          f"snippets; majority class {majority:.1%}; 95% intervals):\n\n{table}\n")  # fmt: skip
    print("Mixed batch against each head alone, largest difference per row:", largest_difference)
    print(f"\nOne mixed batch, generated side by side (same as each row alone: {generated['same_as_alone']}):")
    print(f"  math head:      {generated['math'].strip()[:300]}")
    print(f"  sentiment head: {generated['sentiment']}")
    print(f"\nWrote two_tasks.json, two_tasks.md and two_tasks.png to {output}")
    return record


if __name__ == "__main__":
    main()
