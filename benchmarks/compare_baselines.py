"""Does the head help? Heads and the usual alternatives, trained on the same data with the same budget.

    .venv/bin/python benchmarks/compare_baselines.py                      # the embedded default (SmolLM2, GSM-Symbolic)
    .venv/bin/python benchmarks/compare_baselines.py --train_examples 64 --eval_examples 16   # a quick look

Variants, all on the same frozen base, the same training rows, epochs, learning rate and batch size:
the frozen base (no training); the head with the ``seed`` preset and with the ``hidden`` preset (from cached
base features); LoRA (PEFT) on the attention layers at the head's parameter budget; rank-1 LoRA on the
output layer; the output layer retrained in full (untied). Each is scored on the held-out templates with
:func:`backattn.evaluation.evaluate_model`, then the frozen base and the ``hidden`` head again under a
sweep of sampling temperature and top-k. Writes ``results.json``, ``results.md`` and ``sampling_sweep.png``
to ``--output_dir`` and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments, set_seed
from transformers.utils import logging

from backattn import family_for
from backattn.baselines import lora_on_attention, lora_on_output_layer, output_layer_only, trainable_parameters
from backattn.data.feature_cache import CachedFeaturesDataset, FeatureCache
from backattn.data.sft_data import PromptTemplate, SFTCollator, sft_tokenizer, tokenize_examples
from backattn.evaluation import evaluate_model, results_table
from backattn.offline import default_cache_dir, smollm2_path
from backattn.trainer import HeadTrainer

HEAD_PRESETS = ("seed", "hidden")
SWEEP = {"temperature": (0.3, 0.7, 1.0, 1.3), "top_k": (10, 50)}


def arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_name_or_path", default=None, help="default: the embedded SmolLM2")
    parser.add_argument("--dataset", default=None, help="a .jsonl/.parquet/.csv file; default: GSM-Symbolic")
    parser.add_argument("--train_examples", type=int, default=212)
    parser.add_argument("--eval_examples", type=int, default=40)
    parser.add_argument("--generation_examples", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=160)
    parser.add_argument("--max_length", type=int, default=320)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--output_dir", default="outputs/baselines")
    return parser.parse_args(argv)


def load_rows(options):
    if options.dataset is None:
        from backattn.data.gsm_symbolic import build_gsm_symbolic

        splits = build_gsm_symbolic(variants_per_template=2)
        return splits["train"], splits["test"]
    from backattn.data.sft_data import load_math_dataset

    rows = load_math_dataset(options.dataset).train_test_split(test_size=options.eval_examples, seed=0)
    return rows["train"], rows["test"]


def train(model, dataset, collator, options, output_dir: Path, trainer_class=Trainer) -> float:
    """One training run with the shared budget; returns its wall-clock seconds."""
    args = TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=options.batch_size, num_train_epochs=options.epochs,
        learning_rate=options.learning_rate, lr_scheduler_type="constant_with_warmup", warmup_steps=3,
        logging_steps=5, save_strategy="no", report_to="none", seed=0, disable_tqdm=False,
        dataloader_pin_memory=torch.cuda.is_available(),
    )  # fmt: skip
    start = time.perf_counter()
    trainer_class(model=model, args=args, train_dataset=dataset, data_collator=collator).train()
    return time.perf_counter() - start


def plot_sweep(sweep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = {"accuracy": "final-answer accuracy", "f1": "answer token F1", "parse_rate": "answers that parse"}
    figure, axes = plt.subplots(1, len(metrics), figsize=(14, 4), sharex=True)
    for (name, top_k), points in sweep.items():
        temperatures = [t for t, _ in points]
        for axis, metric in zip(axes, metrics):
            axis.plot(temperatures, [s[metric] for _, s in points], marker="o", label=f"{name}, top-k {top_k}")
    for axis, metric in zip(axes, metrics.values()):
        axis.set_xlabel("temperature")
        axis.set_ylabel(metric)
        axis.legend(fontsize=8)
    figure.suptitle("Sampled solutions on held-out problems")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> dict:
    started = time.perf_counter()
    options = arguments(argv)
    logging.set_verbosity_error()
    set_seed(0)
    output = Path(options.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    base = options.model_name_or_path or str(smollm2_path())
    tokenizer = sft_tokenizer(base)
    train_rows, eval_rows = load_rows(options)
    train_examples, _ = tokenize_examples(train_rows, tokenizer, PromptTemplate(), options.max_length)
    eval_examples, _ = tokenize_examples(eval_rows, tokenizer, PromptTemplate(), options.max_length)
    train_examples = train_examples.select(range(min(options.train_examples, len(train_examples))))
    eval_examples = eval_examples.select(range(min(options.eval_examples, len(eval_examples))))
    collator = SFTCollator(tokenizer)
    family = family_for(AutoConfig.from_pretrained(base).model_type)
    scoring = dict(num_generation_examples=options.generation_examples, max_new_tokens=options.max_new_tokens,
                   batch_size=options.batch_size)  # fmt: skip

    results, models = {}, {}

    def score(name, model, parameters, seconds):
        results[name] = {"trainable_parameters": parameters, "train_seconds": seconds,
                         **evaluate_model(model, tokenizer, eval_examples, **scoring)}  # fmt: skip
        print(
            f"\n{name}: {parameters:,} trainable parameters, {seconds:.0f} s\n"
            + results_table({name: results[name]["summary"]})
        )

    score("frozen base", AutoModelForCausalLM.from_pretrained(base).eval(), 0, 0.0)
    for preset in HEAD_PRESETS:
        torch.manual_seed(0)
        model = family.from_pretrained(base, head_config=preset)
        cache = FeatureCache.build_or_load(model, train_examples["input_ids"], default_cache_dir(), "float16",
                                           options.batch_size)  # fmt: skip
        seconds = train(model, CachedFeaturesDataset(train_examples, cache), collator, options, output, HeadTrainer)
        score(f"head ({preset})", model.eval(), trainable_parameters(model), seconds)
        models[preset] = model
    head_budget = results["head (hidden)"]["trainable_parameters"]
    for name, build in (
        ("LoRA on attention", lambda m: lora_on_attention(m, head_budget)),
        ("rank-1 LoRA on the output layer", lambda m: lora_on_output_layer(m, rank=1)),
        ("output layer retrained", output_layer_only),
    ):
        torch.manual_seed(0)
        model = build(AutoModelForCausalLM.from_pretrained(base))
        seconds = train(model, train_examples.remove_columns(["prompt", "expected_answer", "answer_labels"]), collator,
                        options, output)  # fmt: skip
        score(name, model.eval(), trainable_parameters(model), seconds)

    sweep = {}
    if options.sweep:
        best = models["hidden"]
        for name, heads_on in (("frozen base", False), ("head (hidden)", True)):
            best.enable_heads() if heads_on else best.disable_heads()
            for top_k in SWEEP["top_k"]:
                points = []
                for temperature in SWEEP["temperature"]:
                    set_seed(0)
                    scores = evaluate_model(best, tokenizer, eval_examples, do_sample=True, temperature=temperature,
                                            top_k=top_k, progress=False, teacher_forced=False, **scoring)  # fmt: skip
                    points.append((temperature, scores))
                sweep[(name, top_k)] = points
        best.enable_heads()
        plot_sweep(sweep, output / "sampling_sweep.png")

    table = results_table({name: r["summary"] for name, r in results.items()})
    budget = "| model | trainable parameters | training seconds |\n| --- | --- | --- |\n" + "\n".join(
        f"| {name} | {r['trainable_parameters']:,} | {r['train_seconds']:.0f} |" for name, r in results.items()
    )
    (output / "results.md").write_text(f"{budget}\n\n{table}\n")
    serialisable_sweep = {f"{name}, top-k {k}": [[t, s] for t, s in points] for (name, k), points in sweep.items()}
    summary = {"options": vars(options), "results": results, "sampling_sweep": serialisable_sweep,
               "wall_seconds": time.perf_counter() - started}  # fmt: skip
    (output / "results.json").write_text(json.dumps(summary, indent=2))
    print(f"\n{budget}\n\n{table}\n\nWritten to {output}")
    return results


if __name__ == "__main__":
    main()
