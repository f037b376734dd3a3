"""Does the copy term learn to copy? A synthetic copy task on a tiny random base (issue 15 item 1).

Each sequence is ``noise_tokens`` random tokens, then a repeat of a random ``span``-token stretch of them: inside
the repeat every next token is the one that followed the current token earlier (an induction copy), and nothing
else predicts it. Every position is labelled, as in SFT, so only ``span - 1`` targets per sequence reward copying
(3 of 63 by default; the math task has about 2 final-answer tokens among 150). The frozen base is a random
2-layer Llama: it cannot copy. Competitors, each trained with ``HeadTrainer`` (the real ``Trainer``) on the
same rows, its learning rate chosen on validation sequences (``--learning_rates``, lowest validation CE at the
copy positions), then scored on held-out sequences (another seed):

* ``head hidden``: the default preset, no copy term;
* ``head hidden + copy``: with ``copy_attention`` (the pointer mixture of step 8, its gate ``g_c`` starting shut);
* ``head hidden + copy, supervised``: the same with ``copy_loss_weight = 1``, the term
  ``-log c_t(x_{t+1})`` at every position whose target followed an earlier position.

Metrics per held-out sequence, with 95% bootstrap intervals over sequences and paired to the base: the accuracy
of the greedy (argmax) next token at the copy positions, the CE there, and the CE over all other labelled
positions (a copy term must not harm them). Writes ``results.json``, ``results.md`` and ``copy_task.png`` (the
held-out copy accuracy through training) to ``--output_dir``; a finished method's results are kept, so a rerun
continues where one stopped.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/copy_task.py    # about 10 minutes on one thread
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, TrainerCallback, TrainingArguments, default_data_collator, set_seed
from transformers.utils import logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backattn import BackwardAttentionConfig, LlamaBackwardAttentionForCausalLM  # noqa: E402
from backattn.bootstrap import bootstrap_interval  # noqa: E402
from backattn.run_files import parse_command_line, write_text_atomically  # noqa: E402
from backattn.trainer import HeadTrainer  # noqa: E402

#: The competitors: head options over the ``hidden`` preset (None: the frozen base).
METHODS: dict[str, dict | None] = {
    "base": None,
    "head hidden": {},
    "head hidden + copy": {"copy_attention": True},
    "head hidden + copy, supervised": {"copy_attention": True, "copy_loss_weight": 1.0},
}


@dataclass
class CopyTaskArguments:
    output_dir: str = field(default="benchmarks/results/copy_task", metadata={"help": "Where results are written."})
    vocab_size: int = field(default=128, metadata={"help": "V of the tiny random base."})
    hidden_size: int = field(default=64, metadata={"help": "d of the tiny random base."})
    noise_tokens: int = field(default=60, metadata={"help": "Random tokens before the repeated stretch."})
    span: int = field(default=4, metadata={"help": "Length of the stretch repeated at the end."})
    train_sequences: int = field(default=8000, metadata={"help": "Training sequences (one epoch at most)."})
    validation_sequences: int = field(default=200, metadata={"help": "Sequences the learning rate is chosen on."})
    test_sequences: int = field(default=500, metadata={"help": "Held-out sequences the results are scored on."})
    max_steps: int = field(default=1000, metadata={"help": "Training steps of batch --batch_size."})
    batch_size: int = field(default=8)
    learning_rates: list[float] = field(default_factory=lambda: [1e-3, 3e-3, 1e-2])
    eval_every: int = field(default=50, metadata={"help": "Steps between held-out scorings (the plot's points)."})
    seed: int = field(default=0)


def copy_sequences(count: int, args: CopyTaskArguments, seed: int) -> datasets.Dataset:
    """``count`` rows: ``noise_tokens`` random tokens, then a repeat of ``span`` of them starting at a random
    place; ``copy_mask`` marks the positions whose next token is a copy (inside the repeat, after its first)."""
    generator = np.random.default_rng(seed)
    noise = generator.integers(0, args.vocab_size, size=(count, args.noise_tokens))
    starts = generator.integers(0, args.noise_tokens - args.span, size=count)
    repeats = np.stack([row[s : s + args.span] for row, s in zip(noise, starts)])
    ids = np.concatenate([noise, repeats], axis=1)
    copy_mask = np.zeros_like(ids, dtype=bool)
    copy_mask[:, args.noise_tokens : -1] = True  # position t predicts x_{t+1}: the repeat's second token on
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist(), "copy_mask": copy_mask})


def build_model(args: CopyTaskArguments, options: dict) -> LlamaBackwardAttentionForCausalLM:
    """The same random base every time (``seed``), with a fresh ``hidden`` head carrying ``options``."""
    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=4 * args.hidden_size,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=args.noise_tokens + args.span, tie_word_embeddings=True,
    )  # fmt: skip
    head = BackwardAttentionConfig.from_preset("hidden", **options)
    return LlamaBackwardAttentionForCausalLM(config, head_config=head)


@torch.no_grad()
def score(model, rows: datasets.Dataset, batch_size: int = 50) -> dict[str, list[float]]:
    """Per sequence: the copy positions' greedy accuracy and summed CE, the other positions' summed CE and count."""
    model.eval()
    scores = {"copy_correct": [], "copy_ce": [], "copy_count": [], "other_ce": [], "other_count": []}
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        ids = torch.tensor(batch["input_ids"])
        mask = torch.tensor(batch["copy_mask"])[:, :-1]
        logits = model(ids).logits[:, :-1].float()
        targets = ids[:, 1:]
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        correct = (logits.argmax(-1) == targets) & mask
        scores["copy_correct"] += correct.sum(1).tolist()
        scores["copy_ce"] += (ce * mask).sum(1).tolist()
        scores["copy_count"] += mask.sum(1).tolist()
        scores["other_ce"] += (ce * ~mask).sum(1).tolist()
        scores["other_count"] += (~mask).sum(1).tolist()
    model.train()
    return scores


def copy_accuracy(scores: dict) -> float:
    return float(np.sum(scores["copy_correct"]) / np.sum(scores["copy_count"]))


class HeldOutCurve(TrainerCallback):
    """The held-out copy accuracy every ``every`` steps (the plot's curve)."""

    def __init__(self, model, rows, every: int):
        self.model, self.rows, self.every, self.points = model, rows, every, []

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            self.points.append((state.global_step, copy_accuracy(score(self.model, self.rows))))


def train(args: CopyTaskArguments, options: dict, learning_rate: float, train_rows, curve_rows=None):
    model = build_model(args, options)
    callbacks = [HeldOutCurve(model, curve_rows, args.eval_every)] if curve_rows is not None else []
    with tempfile.TemporaryDirectory() as directory:
        training = TrainingArguments(
            output_dir=directory, per_device_train_batch_size=args.batch_size, max_steps=args.max_steps,
            learning_rate=learning_rate, lr_scheduler_type="constant_with_warmup", warmup_steps=5,
            save_strategy="no", report_to="none", seed=args.seed, disable_tqdm=True, logging_strategy="no",
            remove_unused_columns=False,
        )  # fmt: skip
        trainer = HeadTrainer(
            model=model, args=training, train_dataset=train_rows.remove_columns("copy_mask"),
            data_collator=default_data_collator, callbacks=callbacks,
        )  # fmt: skip
        trainer.train()
    return model, (callbacks[0].points if callbacks else [])


def summary(scores: dict, base: dict) -> dict:
    """The three metrics with intervals, and their paired differences to the base on the same sequences."""
    metrics = {
        "copy accuracy": ("copy_correct", "copy_count"),
        "copy CE": ("copy_ce", "copy_count"),
        "other CE": ("other_ce", "other_count"),
    }
    out = {}
    for name, (values, counts) in metrics.items():
        out[name] = bootstrap_interval(scores[values], scores[counts])._asdict()
        out[f"{name} - base"] = bootstrap_interval(
            scores[values], scores[counts], baseline=base[values], baseline_denominators=base[counts]
        )._asdict()
    return out


def report(results: dict, args: CopyTaskArguments) -> str:
    def cell(interval: dict, spec: str) -> str:
        return f"{interval['estimate']:{spec}} [{interval['low']:{spec}}, {interval['high']:{spec}}]"

    lines = [
        f"Synthetic copy task: {args.noise_tokens} random tokens then a repeat of {args.span} of them (V = "
        f"{args.vocab_size}), tiny random 2-layer Llama base (d = {args.hidden_size}), {args.max_steps} steps of "
        f"batch {args.batch_size}; {args.test_sequences} held-out sequences, 95% intervals over sequences.",
        "",
        "| method | lr | params | copy accuracy | minus base | copy CE | minus base | other CE minus base |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, result in results["methods"].items():
        s = result["summary"]
        lines.append(
            f"| {name} | {result.get('learning_rate', '-')} | {result['parameters']:,} | "
            f"{cell(s['copy accuracy'], '.3f')} | {cell(s['copy accuracy - base'], '+.3f')} | "
            f"{cell(s['copy CE'], '.3f')} | {cell(s['copy CE - base'], '+.3f')} | "
            f"{cell(s['other CE - base'], '+.3f')} |"
        )
    lines += ["", "Learning rates (validation CE at the copy positions):", ""]
    for name, result in results["methods"].items():
        for rate, ce in result.get("validation_copy_ce", {}).items():
            lines.append(f"- {name}, lr {rate}: {ce:.4f}")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4))
    base = results["methods"]["base"]["summary"]["copy accuracy"]["estimate"]
    axis.axhline(base, color="grey", linestyle="--", label=f"frozen base ({base:.2f})")
    for name, result in results["methods"].items():
        if result.get("curve"):
            steps, accuracy = zip(*result["curve"])
            axis.plot(steps, accuracy, marker="o", markersize=3, label=f"{name} (lr {result['learning_rate']})")
    axis.set_xlabel("training step (batch 8)")
    axis.set_ylabel("held-out copy accuracy (greedy)")
    axis.set_ylim(0, 1)
    axis.set_title("Synthetic copy task: does the copy term learn to copy?")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str]) -> dict:
    (args,) = parse_command_line((CopyTaskArguments,), argv)
    logging.set_verbosity_error()
    set_seed(args.seed)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    results_path = output / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if results.get("arguments") != asdict(args):
        results = {"arguments": asdict(args), "methods": {}}  # other arguments: nothing carries over
    train_rows = copy_sequences(args.train_sequences, args, seed=args.seed + 1)
    validation_rows = copy_sequences(args.validation_sequences, args, seed=args.seed + 2)
    test_rows = copy_sequences(args.test_sequences, args, seed=args.seed + 3)
    base = build_model(args, {})
    with base.disable_heads():
        base_scores = score(base, test_rows)
    runs = [(n, o) for n, o in METHODS.items() if o is not None and n not in results["methods"]]
    progress = tqdm(total=len(runs) * (len(args.learning_rates) + 1), desc="copy task runs")
    results["methods"]["base"] = {"parameters": 0, "summary": summary(base_scores, base_scores)}
    for name, options in runs:
        validation = {}
        for rate in args.learning_rates:  # the rate is chosen on validation sequences, never on the test ones
            model, _ = train(args, options, rate, train_rows)
            scores = score(model, validation_rows)
            validation[str(rate)] = float(np.sum(scores["copy_ce"]) / np.sum(scores["copy_count"]))
            progress.update()
        rate = float(min(validation, key=validation.get))
        model, curve = train(args, options, rate, train_rows, curve_rows=test_rows)
        progress.update()
        results["methods"][name] = {
            "learning_rate": rate,
            "parameters": sum(p.numel() for p in model.heads.parameters()),
            "validation_copy_ce": validation,
            "curve": curve,
            "summary": summary(score(model, test_rows), base_scores),
        }
        write_text_atomically(results_path, json.dumps(results, indent=1))  # a finished method is kept
    write_text_atomically(results_path, json.dumps(results, indent=1))
    write_text_atomically(output / "results.md", report(results, args))
    plot(results, output / "copy_task.png")
    print(report(results, args))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
