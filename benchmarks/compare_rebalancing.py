"""Seed 002's attention re-balancing against a head and with one, on the comparison's protocol (issue 18).

    .venv/bin/python benchmarks/compare_rebalancing.py benchmarks/compare_rebalancing_validation.yaml  # 1. alpha
    .venv/bin/python benchmarks/compare_rebalancing.py                                                # 2. held out
    .venv/bin/python benchmarks/compare_rebalancing.py --report_only true      # the models scored so far, reported

Four models on the held-out GSM-Symbolic problems of ``compare_heads.py`` (templates 80-99): the frozen base;
the re-balanced base (``backattn.attention_rebalancing``: no training; ``alpha`` chosen in stage 1 by target CE
on the validation templates 64-79, never on the held-out ones); the head (``--head_method`` at the learning rate
``compare_heads.py``'s validation chose, trained for the steps of the comparison's budget ``--head_budget``); and
the same head trained, from cached features, on the re-balanced base, for the same steps (its feature cache is
the re-balanced base's: the cache key holds the re-balancing options). ``compare_heads.py``'s held-out run must
have the same setup (same data, same tokenization): its head's steps at that budget are the steps both heads
train here (so the same training seconds), its frozen base's scores are reused, and its head's teacher-forced
scores are checked against the head trained again here (which is also scored greedily). Every metric comes
with its 95% interval over templates, then problems, and its paired difference to the frozen base
(``backattn.evaluation.summarise_scores``). Resumable: each model's scores are written once finished. Writes
``results.json``, ``results.md`` and ``rebalancing.png`` to ``--output_dir``.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import AutoModelForCausalLM, HfArgumentParser, set_seed

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_heads as machinery  # noqa: E402  (the comparison's machinery, beside this file)

from backattn.attention_rebalancing import enable_attention_rebalancing  # noqa: E402
from backattn.data.feature_cache import CachedFeaturesDataset, FeatureCache  # noqa: E402
from backattn.data.sft_data import SFTCollator  # noqa: E402

BASE, REBALANCED, HEAD, BOTH = "frozen base", "re-balanced base", "head", "head on the re-balanced base"


@dataclass
class RebalancingArguments(machinery.ComparisonArguments):
    alphas: list[float] = field(
        default_factory=lambda: [0.1, 0.2, 0.5],
        metadata={"help": "Stage 1 (--split_name validation): the boosts tried; the seed's code uses 0.2 and 0.5."},
    )
    threshold: float = field(default=0.01, metadata={"help": "Layer 0's attention weight above which a key counts."})
    head_method: str = field(default="head hidden", metadata={"help": "The head: a compare_heads.py method."})
    head_budget: float = field(default=1.0, metadata={"help": "The comparison budget (in T) whose steps it trains."})
    comparison_dir: str = field(
        default="benchmarks/results/compare_heads",
        metadata={"help": "compare_heads.py's held-out results: the frozen base and the head are read from there."},
    )
    output_dir: str = field(default="benchmarks/results/compare_rebalancing")
    work_dir: str = field(default="outputs/compare_rebalancing")
    validation_results: str = field(
        default="benchmarks/results/compare_rebalancing_validation/results.json",
        metadata={"help": "Stage 1's results, whose chosen_alpha the held-out run uses."},
    )
    head_validation_results: str = field(
        default="benchmarks/results/compare_heads_validation/results.json",
        metadata={"help": "compare_heads.py's stage 1, whose learning rate for --head_method is used."},
    )


def rebalanced(model, options, alpha: float):
    return enable_attention_rebalancing(model, alpha=alpha, threshold=options.threshold)


def comparison_result(options, run_name: str, budget: float | None, setup: dict) -> dict | None:
    """A result of ``compare_heads.py``'s run, if that run had this setup (same data and tokenization)."""
    directory = machinery.ROOT / options.comparison_dir
    theirs = directory / "setup.json"
    if not theirs.is_file() or json.loads(theirs.read_text()) != setup:
        return None
    name = "scores.json" if budget is None else f"budget-{budget:g}T.json"
    path = directory / "runs" / run_name.replace(" ", "_") / name
    return json.loads(path.read_text()) if path.is_file() else None


def train_head(options, base: str, tokenizer, train_examples, learning_rate: float, steps: int, alpha, directory):
    """The head trained from cached features for ``steps`` steps, on the base re-balanced by ``alpha`` (``None``:
    the plain base). Both bases' caches live side by side in ``directory / "features"`` (their keys differ)."""
    method = machinery.METHODS[options.head_method]
    model = method.build(base, machinery.reference_parameters(base))
    if alpha is not None:
        rebalanced(model, options, alpha)
    cache = FeatureCache.build_or_load(model, train_examples["input_ids"], directory / "features", "float16",
                                       options.batch_size)  # fmt: skip
    set_seed(options.seed)
    trainer = machinery.BudgetTrainer(
        model=model,
        args=machinery.training_arguments(options, directory / f"training alpha={alpha}", learning_rate, steps),
        train_dataset=CachedFeaturesDataset(train_examples, cache), data_collator=SFTCollator(tokenizer),
    )  # fmt: skip
    if steps:  # no steps: the untrained head, as compare_heads.py scores a budget spent before its first step
        trainer.train()
    return model.eval()


def main(argv: list[str] | None = None) -> dict:
    started = time.perf_counter()
    task = machinery.MathTask()
    parser = HfArgumentParser(RebalancingArguments)
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        (options,) = parser.parse_yaml_file(Path(argv[0]).resolve(), allow_extra_keys=False)
    else:
        (options,) = parser.parse_args_into_dataclasses(args=argv)
    if options.head_method not in machinery.METHODS or not machinery.METHODS[options.head_method].features:
        raise ValueError(f"--head_method must be a head of compare_heads.py, got {options.head_method!r}.")
    validating = options.split_name == "validation"
    if not validating:  # before anything slow: both choices were made on validation data
        path = machinery.ROOT / options.validation_results
        if not path.is_file():
            raise ValueError(f"No chosen alpha in {path}: run stage 1 first (benchmarks/compare_rebalancing_"
                             "validation.yaml); the held-out set is never used to choose.")  # fmt: skip
        alpha = json.loads(path.read_text())["chosen_alpha"]
        learning_rate = machinery.chosen_learning_rates(
            machinery.ComparisonOptions(
                methods=[options.head_method], validation_results=options.head_validation_results
            )
        )[options.head_method]
    run, base, tokenizer, train_examples, eval_examples, groups = machinery.prepare_run(options, task)
    setup = json.loads((run.output / "setup.json").read_text())

    def scored(name: str, build, generate: bool = True) -> dict | None:
        """``name``'s per-problem scores: read if written before, else computed and written (with
        ``--report_only``, ``None``: the report shows the models scored so far)."""
        path = run.result_path(name, None)
        if run.read(path) is None:
            if options.report_only:
                return None
            model = build()
            run.write(path, {"scores": task.score(model.eval(), tokenizer, eval_examples, options, generate)})
            del model
        return run.read(path)["scores"]

    def plain_base():
        return AutoModelForCausalLM.from_pretrained(base)

    if validating:  # stage 1: the re-balanced base at every alpha, teacher-forced, against the base
        rows = {BASE: scored(BASE, plain_base, False)}
        for alpha in options.alphas:
            build = lambda a=alpha: rebalanced(plain_base(), options, a)  # noqa: E731
            rows[f"{REBALANCED}, alpha {alpha:g}"] = scored(f"{REBALANCED} alpha={alpha:g}", build, False)
        losses = {a: task.summarise(rows[f"{REBALANCED}, alpha {a:g}"], None, groups, 1)[task.selection]["value"]
                  for a in options.alphas}  # fmt: skip
        return report(run, options, rows, groups, started, task, {"chosen_alpha": min(losses, key=losses.get)})

    head_result = comparison_result(options, f"{options.head_method} lr={learning_rate:g}", options.head_budget, setup)
    if head_result is None:
        raise ValueError(f"No held-out result of {options.head_method} at {options.head_budget:g}T with this setup "
                         f"in {options.comparison_dir}: run benchmarks/compare_heads.py first.")  # fmt: skip
    base_result = comparison_result(options, BASE, None, setup)
    steps = head_result["steps"]  # the comparison's steps at that budget: the same training seconds

    def head(on_alpha):
        return lambda: train_head(options, base, tokenizer, train_examples, learning_rate, steps, on_alpha, run.work)

    # The head is trained again here (the same steps, seed and data as in the comparison) to be scored greedily
    # as well; its teacher-forced scores are checked against the comparison's (`head_against_comparison`).
    rows = {
        BASE: base_result["scores"] if base_result else scored(BASE, plain_base),
        f"{REBALANCED}, alpha {alpha:g}": scored(f"{REBALANCED} alpha={alpha:g}",
                                                 lambda: rebalanced(plain_base(), options, alpha)),
        f"{HEAD} ({options.head_method}, {steps} steps)": scored(HEAD, head(None)),
        f"{BOTH}, alpha {alpha:g}": scored(f"{BOTH} alpha={alpha:g}", head(alpha)),
    }  # fmt: skip
    extra = {"alpha": alpha, "learning_rate": learning_rate, "head_steps": steps}
    ours, theirs = rows[f"{HEAD} ({options.head_method}, {steps} steps)"], head_result["scores"]
    if ours is not None:
        difference = max(abs(a - b) for a, b in zip(ours["target_loss"], theirs["target_loss"]))
        extra["head_against_comparison"] = {"largest_target_loss_difference": difference}
    return report(run, options, {name: scores for name, scores in rows.items() if scores is not None}, groups,
                  started, task, extra)  # fmt: skip


def report(run, options, rows: dict, groups: list, started: float, task, extra: dict) -> dict:
    """results.json, results.md and rebalancing.png: every row's metrics with intervals and minus the base."""
    base = rows[BASE]
    summaries = {name: task.summarise(scores, None if name == BASE else base, groups, options.n_resamples)
                 for name, scores in rows.items()}  # fmt: skip
    summary = {"options": asdict(options), "rows": summaries, **extra, "held_out_problems": len(groups),
               "wall_seconds_this_sitting": time.perf_counter() - started}  # fmt: skip
    run.write(run.output / "results.json", summary)
    table = markdown(summaries, task)
    (run.output / "results.md").write_text(table + "\n")
    split = "validation templates" if options.split_name == "validation" else "held out"
    plot(summaries, run.output / "rebalancing.png", split)
    print(table)
    return summary


def markdown(summaries: dict, task) -> str:
    lines = []
    for title, metrics, spec in task.sections:
        present = [m for m in metrics if any(m in s for s in summaries.values())]
        if not present:
            continue
        labels = [task.metrics[m][3] for m in present]
        lines += [f"### {title}", "", "| model | " + " | ".join(labels) + " |", "|" + " --- |" * (len(present) + 1)]
        for name, summary in summaries.items():
            cells = []
            for metric in present:
                value = summary.get(metric)
                cell = machinery._cell(value, spec)
                if value and "minus_base" in value:
                    cell += f"; vs base {machinery._cell(value['minus_base'], '+' + spec)}"
                cells.append(cell)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(summaries: dict, path: Path, split: str) -> None:
    """Each model's paired difference to the frozen base, one panel a metric, 95% intervals as error bars (the
    differences are what the intervals resolve; the absolute values are in ``results.md``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(m, label) for m, label in (("target_ce", "target CE (lower is better)"),
                                          ("answer_ce", "answer-token CE (lower is better)"),
                                          ("mc_direct", "MC-direct accuracy (higher is better)"),
                                          ("repetition_rate", "greedy repetition rate (lower is better)"))
              if any("minus_base" in s.get(m, {}) for s in summaries.values())]  # fmt: skip
    if not panels:  # only the frozen base so far: nothing to compare
        return
    figure, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels) + 1, 4.2), squeeze=False)
    for axis, (metric, label) in zip(axes[0], panels):
        names = [n for n in summaries if "minus_base" in summaries[n].get(metric, {})]
        differences = [summaries[n][metric]["minus_base"] for n in names]
        values = [d["value"] for d in differences]
        errors = [[v - d["low"] for v, d in zip(values, differences)],
                  [d["high"] - v for v, d in zip(values, differences)]]  # fmt: skip
        axis.bar(range(len(names)), values, yerr=errors, capsize=4, color=[f"C{i + 1}" for i in range(len(names))])
        axis.axhline(0.0, color="black", linewidth=0.8)
        axis.set_xticks(range(len(names)), [n.replace(", ", "\n") for n in names], fontsize=7)
        axis.set_title(f"{label}\nminus the frozen base", fontsize=9)
    title = f"Attention re-balancing (seed 002) and a head, {split}: paired difference to the base, 95% intervals"
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
