"""Score a causal LM, with or without a backward-attention head, as a classifier on held-out labelled text.

    python evaluate_sentiment.py                                   # the frozen embedded base, zero-shot, on the
                                                                   # Rotten Tomatoes test split (by movie)
    python evaluate_sentiment.py --head outputs/sentiment/head     # the same base with a trained head
    python evaluate_sentiment.py --dataset stanfordnlp/sst2 --dataset_split validation
    python evaluate_sentiment.py --dataset reviews.jsonl --prompt_template "Review: {review}\\nSentiment:" \\
        --target_template " {stars}" --label_words '{"1": "negative", "5": "positive"}'

Each class is scored by the log-likelihood of its label word after the prompt (``backattn.classification``), so a
frozen base is scored zero-shot exactly as a head model is. Writes ``eval_results.json`` and ``eval_results.md`` to
``--output_dir``: accuracy, macro-F1, the label CE and the majority-class rate of the same rows, each with a 95%
bootstrap interval (movies resampled, then snippets, where the rows name their movie). The options, their checks
and the outputs mirror ``evaluate_math.py``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

from transformers import AutoConfig, set_seed

from backattn.classification import classification_table, evaluate_classifier
from backattn.data.classification_data import (
    ROTTEN_TOMATOES,
    data_classes,
    load_classification_dataset,
    template_for,
    tokenize_classification,
)
from backattn.data.sft_data import sft_tokenizer
from backattn.offline import resolve_base_model
from backattn.run_files import (
    check_argument_values,
    check_context_window,
    parse_command_line,
    writable_directory,
    write_text_atomically,
)
from evaluate_math import ARGUMENT_RANGES as MATH_RANGES
from evaluate_math import ScoredModelArguments, load_model


@dataclass
class SentimentEvaluationArguments(ScoredModelArguments):
    dataset: str = field(
        default=ROTTEN_TOMATOES,
        metadata={"help": "'rotten_tomatoes' (offline, split by movie), a Hub id (stanfordnlp/sst2, "
                  "cornell-movie-review-data/rotten_tomatoes, ...) or a .json/.jsonl/.parquet/.csv file."},
    )  # fmt: skip
    dataset_split: str = field(default="test", metadata={"help": "Split of rotten_tomatoes or of a Hub data set."})
    max_samples: int | None = field(default=None, metadata={"help": "Score the first N rows only."})
    max_length: int = field(default=512, metadata={"help": "Longest prompt + target in tokens; longer rows skipped."})
    prompt_template: str | None = field(
        default=None, metadata={"help": "Placeholders name columns; default the data set's (see train_sft.py)."}
    )
    target_template: str | None = field(default=None, metadata={"help": "The label column alone, e.g. ' {label}'."})
    label_words: str | None = field(
        default=None, metadata={"help": "JSON object of label value -> word, e.g. '{\"0\": \"negative\", \"1\": "
                                "\"positive\"}'; default the known data set's, else the label values as text."}
    )  # fmt: skip
    batch_size: int = field(default=8)
    n_resamples: int = field(default=2000, metadata={"help": "Bootstrap resamples for the intervals."})
    seed: int = field(default=0)
    cache_dir: str | None = field(default=None, metadata={"help": "Cache of the rotten_tomatoes build."})
    output_dir: str = field(default="outputs/eval_sentiment")


#: The range each numeric argument must lie in (a description and a test), checked before anything loads.
ARGUMENT_RANGES = {name: MATH_RANGES[name] for name in ("batch_size", "max_length", "max_samples", "rerank_top_k")}
ARGUMENT_RANGES["n_resamples"] = ("a positive integer", lambda v: v >= 1)


def parse_arguments(argv: list[str]) -> SentimentEvaluationArguments:
    """The command line (or one ``.yaml`` / ``.yml`` / ``.json`` file of arguments), checked: types, ranges, the
    templates and label words, and a writable output directory, before anything loads."""
    (args,) = parse_command_line(SentimentEvaluationArguments, argv)
    check_argument_values(args, ARGUMENT_RANGES)
    template_for(args.dataset, args.prompt_template, args.target_template, args.label_words)
    writable_directory(args.output_dir)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_arguments(sys.argv[1:] if argv is None else argv)
    template = template_for(args.dataset, args.prompt_template, args.target_template, args.label_words)
    base_config = AutoConfig.from_pretrained(resolve_base_model(args.model_name_or_path))
    check_context_window(base_config, args.max_length, 0)  # before the data is loaded
    set_seed(args.seed)

    rows = load_classification_dataset(args.dataset, args.dataset_split, cache_dir=args.cache_dir, template=template)
    if args.max_samples is not None:
        rows = rows.select(range(min(args.max_samples, len(rows))))
    classes = data_classes(rows, template)
    model, base = load_model(args)
    tokenizer = sft_tokenizer(base)
    keep = ("group",) if "group" in rows.column_names else ()
    examples, skipped = tokenize_classification(rows, tokenizer, template, args.max_length, classes, keep)
    name = args.name or (args.head and f"{base} + head {args.head}") or base
    metrics, _ = evaluate_classifier(
        model, tokenizer, examples, template, classes, batch_size=args.batch_size, n_resamples=args.n_resamples,
        seed=args.seed,
    )  # fmt: skip
    results = {name: metrics}
    output = writable_directory(args.output_dir)
    record = {
        "arguments": vars(args),
        "template": template.to_dict(),
        "classes": list(classes),
        "examples": len(examples),
        "skipped": dict(skipped),
        "results": results,
    }
    write_text_atomically(output / "eval_results.json", json.dumps(record, indent=2) + "\n")
    table = classification_table(results)
    write_text_atomically(output / "eval_results.md", table + "\n")
    print(table)
    print(f"({metrics['interval']}; majority class {metrics['majority_label']!r}; skipped {dict(skipped) or 'none'})")
    return results


if __name__ == "__main__":
    main()
