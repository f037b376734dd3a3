"""Score a causal LM, with or without a backward-attention head, on held-out math word problems.

    python evaluate_math.py                                         # the frozen embedded base, GSM-Symbolic test split
    python evaluate_math.py --head outputs/demo                     # the same base with a trained head
    python evaluate_math.py --model_name_or_path openai-community/gpt2 --dataset problems.jsonl
    python evaluate_math.py --do_sample --temperature 0.7 --top_k 40  # sampled instead of greedy solutions
    python evaluate_math.py --head outputs/demo --rerank_top_k 50    # the head in top-k re-ranking mode

Writes ``eval_results.json`` and ``eval_results.md`` to ``--output_dir``. The metrics
(:func:`backattn.evaluation.evaluate_model`): target- and answer-token cross-entropy and perplexity
(teacher-forced), and from generated solutions final-answer accuracy (numbers compared as numbers),
token-overlap precision/recall/F1, MSE/RMSE over answers that parse, the parse and repetition rates, and
multiple-choice accuracy against three distractors, each with a 95% interval (templates resampled, then
problems, where the rows have a ``template_id``). The library functions live in ``backattn.evaluation``;
this file is the command line.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field

from transformers import AutoConfig, AutoModelForCausalLM, set_seed

from backattn import FAMILIES, family_for
from backattn.data.sft_data import PromptTemplate, load_math_dataset, sft_tokenizer, tokenize_examples
from backattn.errors import BackattnValueError
from backattn.evaluation import HELD_OUT_COLUMNS, choice_template, evaluate_model, results_table
from backattn.offline import EMBEDDED_DATASET, EMBEDDED_MODEL, resolve_base_model
from backattn.run_files import (
    check_argument_values,
    check_context_window,
    parse_command_line,
    writable_directory,
    write_text_atomically,
)


@dataclass
class ScoredModelArguments:
    """The model to score: a base, with or without a head (shared with ``evaluate_sentiment.py``)."""

    model_name_or_path: str = field(default=EMBEDDED_MODEL, metadata={"help": "A causal LM, or 'embedded' (SmolLM2)."})
    head: str | None = field(default=None, metadata={"help": "A saved head (directory or Hub repo id) to load."})
    heads_off: bool = field(default=False, metadata={"help": "Score with heads disabled: the base model's own logits."})
    rerank_top_k: int | None = field(
        default=None, metadata={"help": "The head re-ranks only the base's k most likely tokens (top-k mode)."}
    )
    name: str | None = field(default=None, metadata={"help": "Row name in the results table."})


@dataclass
class EvaluationArguments(ScoredModelArguments):
    dataset: str = field(
        default=EMBEDDED_DATASET, metadata={"help": "'gsm_symbolic' (its held-out split), a file or Hub id."}
    )
    dataset_split: str = field(default="train")
    gsm_variants_per_template: int = field(default=5)
    max_samples: int | None = field(default=None)
    max_length: int = field(default=512)
    prompt_template: str = field(default=PromptTemplate.prompt)
    target_template: str = field(default=PromptTemplate.target)
    num_generation_examples: int = field(default=32)
    max_new_tokens: int = field(default=256)
    batch_size: int = field(default=8)
    do_sample: bool = field(default=False)
    temperature: float = field(default=1.0)
    top_k: int = field(default=50)
    seed: int = field(default=0)
    output_dir: str = field(default="outputs/eval")


#: The range each numeric argument must lie in (a description and a test), checked before anything loads.
ARGUMENT_RANGES = {
    "max_new_tokens": ("a positive integer", lambda v: v >= 1),
    "batch_size": ("a positive integer", lambda v: v >= 1),
    "max_length": ("a positive integer", lambda v: v >= 1),
    "gsm_variants_per_template": ("a positive integer", lambda v: v >= 1),
    "max_samples": ("a positive integer (or None: every row)", lambda v: v >= 1),
    "num_generation_examples": ("a non-negative integer (0: no generation)", lambda v: v >= 0),
    "rerank_top_k": ("a positive integer (0: off)", lambda v: v >= 0),
    "top_k": ("a non-negative integer (0: no top-k filter)", lambda v: v >= 0),
    "temperature": ("a finite positive number", lambda v: math.isfinite(v) and v > 0),
}


def check_arguments(args: EvaluationArguments) -> None:
    """``BackattnTypeError`` / ``BackattnValueError`` naming the first argument of the wrong type or out of range
    (a YAML or JSON file's values are not converted, so their types are checked here too)."""
    check_argument_values(args, ARGUMENT_RANGES)


def parse_arguments(argv: list[str]) -> EvaluationArguments:
    """The command line (or one ``.yaml`` / ``.yml`` / ``.json`` file of arguments), checked."""
    (args,) = parse_command_line(EvaluationArguments, argv)
    check_arguments(args)
    writable_directory(args.output_dir)
    return args


def load_model(args: EvaluationArguments):
    """The model to score: a backattn family when a head is involved, else any ``AutoModelForCausalLM``."""
    base = resolve_base_model(args.model_name_or_path)
    model_type = AutoConfig.from_pretrained(base).model_type
    if args.head is None and model_type not in FAMILIES:
        return AutoModelForCausalLM.from_pretrained(base).eval(), base
    model = family_for(model_type).from_pretrained(base).eval()
    if args.head is not None:
        model.set_head(model.load_head(args.head))
    if args.heads_off:
        model.disable_heads()
    if args.rerank_top_k is not None:
        if args.rerank_top_k < 0:
            raise BackattnValueError(f"--rerank_top_k must be a positive integer (0: off), got {args.rerank_top_k}.")
        model.config.rerank_top_k = args.rerank_top_k or None
    return model, base


def main(argv: list[str] | None = None) -> dict:
    args = parse_arguments(sys.argv[1:] if argv is None else argv)
    template = PromptTemplate(prompt=args.prompt_template, target=args.target_template)
    base_config = AutoConfig.from_pretrained(resolve_base_model(args.model_name_or_path))
    check_context_window(base_config, args.max_length, args.max_new_tokens)  # before the data is built
    set_seed(args.seed)

    if args.dataset == EMBEDDED_DATASET:
        from backattn.data.gsm_symbolic import build_gsm_symbolic

        rows = build_gsm_symbolic(variants_per_template=args.gsm_variants_per_template)["test"]
    else:
        rows = load_math_dataset(args.dataset, args.dataset_split)
    if args.max_samples is not None:
        rows = rows.select(range(min(args.max_samples, len(rows))))

    model, base = load_model(args)
    tokenizer = sft_tokenizer(base)
    kept = tuple(c for c in HELD_OUT_COLUMNS if c in rows.column_names)
    examples, skipped = tokenize_examples(rows, tokenizer, template, args.max_length, kept)
    choices = choice_template(template, kept)
    sampling = {"do_sample": True, "temperature": args.temperature, "top_k": args.top_k} if args.do_sample else {}
    name = args.name or (args.head and f"{base} + head {args.head}") or base
    results = {name: evaluate_model(model, tokenizer, examples, None, args.num_generation_examples,
                                    args.max_new_tokens, args.batch_size, template=choices, **sampling)}  # fmt: skip
    output = writable_directory(args.output_dir)
    record = {"arguments": vars(args), "examples": len(examples), "skipped": dict(skipped), "results": results}
    table = results_table({name: scores["summary"] for name, scores in results.items()})
    write_text_atomically(output / "eval_results.json", json.dumps(record, indent=2) + "\n")
    write_text_atomically(output / "eval_results.md", table + "\n")
    print(table)
    return results


if __name__ == "__main__":
    main()
