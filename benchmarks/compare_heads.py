"""Is a head worth training instead of LoRA? Every method on one frozen base, at equal parameters and equal time.

    .venv/bin/python benchmarks/compare_heads.py benchmarks/compare_heads_validation.yaml   # 1. learning rates
    .venv/bin/python benchmarks/compare_heads.py                                            # 2. the held-out run
    .venv/bin/python benchmarks/compare_heads.py --report_only true                         # tables and plots again

Flags after a YAML file override its keys (``stage.yaml --report_only true``).

Methods (all on the same frozen base, the same training rows in the same order, batch size and warm-up):
the frozen base; the head presets (trained from cached base features); PEFT LoRA on attention and on the
output layer; PEFT IA3; LM-Steer (trained from cached features too); a LoReFT intervention on the last layer
(a torch hook: ``pyreft`` 0.1.0 pins Transformers 4.45). Their trainable parameters are matched to the
``hidden`` head's where a method's size can be chosen.

Equal wall-clock: ``T`` is one LoRA-on-attention epoch over ``budget_problems`` problems. Each method trains
once at a constant learning rate after warm-up and is scored at ``T``, ``2T``, ``4T`` training-seconds, where
a method's seconds are its steps times its step time (the median of ``calibration_steps`` whole ``Trainer``
steps, data loading and optimiser included, timed once per method and kept in ``calibration.json``), plus,
for a method trained from cached features, the recorded time of building that cache, paid through the first
epoch as a run that caches while it trains would pay it (:func:`budget_steps`). The learning rate of each
method is the one with the lowest target cross-entropy on the validation split (whole training templates
held out, a grid extended past a winning edge), read from that run's results.

Held-out metrics, each with a 95% bootstrap interval resampling templates then problems
(:mod:`backattn.bootstrap`), and the paired difference to the frozen base: target-token CE and perplexity,
final-answer-token CE and accuracy, multiple-choice accuracy against three distractors (direct and after
the gold solution, raw and length-normalised log-likelihood), and from greedy solutions at the last budget:
accuracy, parse rate and repetition rate.

Resumable: each (method, learning rate, budget) result is written as it finishes and never recomputed;
training resumes from the last budget checkpoint. Results go to ``output_dir`` (json, md, plots).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.modeling_outputs import CausalLMOutput
from transformers.utils import logging

from backattn import BackwardAttentionConfig, family_for
from backattn.baselines import (
    attention_lora_config,
    ia3_on_top_layers,
    lm_steer,
    lora_on_attention,
    lora_on_output_layer,
    loreft_on_last_layer,
    trainable_parameters,
)
from backattn.data.feature_cache import CachedFeaturesDataset, FeatureCache
from backattn.data.sft_data import PromptTemplate, SFTCollator, load_math_dataset, sft_tokenizer, tokenize_examples
from backattn.evaluation import (
    HELD_OUT_METRICS,
    answer_exact,
    answer_is_copyable,
    choice_tokens,
    continuation_scores,
    generate_solutions,
    multiple_choice,
    per_problem_scores,
    shared_prefix_outputs,
    solution_scores,
    summarise_scores,
)
from backattn.offline import smollm2_path
from backattn.query_standardization import fit_query_standardization
from backattn.run_files import parse_command_line

ROOT = Path(__file__).resolve().parents[1]
TRAINABLE_NAME = "trainable.safetensors"
REFERENCE = "head hidden"  # the parameter budget every sizable method is matched to
#: Settings that change every result: a sitting with other values must not resume this comparison's results.
SETUP_FIELDS = ("model_name_or_path", "budget_problems", "batch_size", "warmup_steps", "charge_feature_cache",
                "calibration_steps", "seed")  # fmt: skip


@dataclass
class ComparisonOptions:
    """The options every task's comparison shares (the math task's are :class:`ComparisonArguments`)."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "Base model; default: embedded SmolLM2."})
    dataset: str = field(
        default="gsm_symbolic",
        metadata={"help": "'gsm_symbolic' (generated offline) or a .jsonl/.parquet/.csv file with a template_id."},
    )
    split_name: str = field(default="test", metadata={"help": "Name of this run's results ('test', 'validation')."})
    methods: list[str] = field(default_factory=lambda: list(METHODS), metadata={"help": "Methods to run."})
    learning_rates: list[float] | None = field(
        default=None,
        metadata={"help": "Try each of these learning rates (a validation sweep); default: the validation choice."},
    )
    extend_learning_rates: bool = field(
        default=True,
        metadata={
            "help": "In a sweep, while a method's best rate is the grid's lowest or highest, try the next "
            "rate beyond it on the 1-3-10 scale (at most two more)."
        },
    )
    budgets: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0], metadata={"help": "Budgets, in T."})
    budget_problems: int = field(default=250, metadata={"help": "T = one LoRA-on-attention epoch over this many."})
    charge_feature_cache: bool = field(
        default=True, metadata={"help": "Charge the feature cache's build time to methods trained from it."}
    )
    batch_size: int = field(default=8)
    warmup_steps: int = field(default=5)
    max_length: int = field(default=384, metadata={"help": "Longest prompt + target in tokens; longer rows dropped."})
    calibration_steps: int = field(default=6, metadata={"help": "Timed steps per method (after 2 untimed)."})
    metrics: list[str] = field(
        default_factory=lambda: ["teacher_forced", "multiple_choice", "generation"],
        metadata={"help": "What to score: teacher_forced, multiple_choice, generation (at the last budget)."},
    )
    max_eval_problems: int | None = field(
        default=None, metadata={"help": "Score only the first N held-out (a quick look)."}
    )
    n_resamples: int = field(default=2000, metadata={"help": "Bootstrap resamples per interval."})
    output_dir: str = field(default="benchmarks/results/compare_heads", metadata={"help": "Results (committed)."})
    work_dir: str = field(default="outputs/compare_heads", metadata={"help": "Checkpoints and caches (not committed)."})
    validation_results: str = field(
        default="benchmarks/results/compare_heads_validation/results.json",
        metadata={"help": "The validation run whose best learning rate per method this run uses."},
    )
    seed: int = field(default=0)
    report_only: bool = field(
        default=False, metadata={"help": "Only write the report of the results so far (while a run goes on)."}
    )
    calibrate_only: bool = field(
        default=False,
        metadata={
            "help": "Only time every method's step and the feature cache's build, then stop: run it on a quiet "
            "machine, and the rest (whose charges are those timings) may share the machine afterwards."
        },
    )


@dataclass
class ComparisonArguments(ComparisonOptions):
    """The math comparison: GSM-Symbolic problems split by template."""

    variants_per_template: int = field(default=16, metadata={"help": "GSM-Symbolic variants per template."})
    train_templates: str = field(default="0-79", metadata={"help": "Training templates, e.g. '0-79'."})
    eval_templates: str = field(default="80-99", metadata={"help": "Held-out templates, e.g. '80-99'."})
    generation_problems: int = field(default=100, metadata={"help": "Held-out problems solved greedily."})
    max_new_tokens: int = field(default=256)


# --------------------------------------------------------------------------------------------------------
# the methods


@dataclass(frozen=True)
class Method:
    """How to build one competitor on a fresh base.

    ``features``: it trains from cached base features. ``output_side``: its logits are a function of the frozen
    base's final hidden states alone, so it is scored from the base's held-out states, computed once.
    """

    build: Callable  # (base path, reference parameters) -> model whose trainable parameters are the method's
    features: bool = False
    output_side: bool = False
    standardizes: bool = False  # a head with standardize_query_state: its statistics read STANDARDIZATION_ROWS rows
    head: dict | None = None  # a head alone: {"preset": ..., "options": {...}}, recorded in results.json's rows


#: Training rows a head with ``standardize_query_state`` reads for its statistics before training.
STANDARDIZATION_ROWS = 256


def _head(preset: str, **options) -> Method:
    def build(base: str, budget: int):
        head = BackwardAttentionConfig.from_preset(preset, **options)
        return family_for(AutoConfig.from_pretrained(base).model_type).from_pretrained(base, head_config=head)

    # a copy head reads the input ids too, so it is scored by full forwards, not from the base's final states
    return Method(build, features=True, output_side=not options.get("copy_attention"),
                  standardizes=bool(options.get("standardize_query_state")),
                  head={"preset": preset, "options": options})  # fmt: skip


def _head_and_lora(preset: str) -> Method:
    """A head on top and a LoRA on attention below, trained together; the LoRA takes the budget the head leaves."""

    def build(base: str, budget: int):
        model = _head(preset).build(base, budget)
        head_parameters = sum(p.numel() for p in model.heads.parameters())
        model.add_adapter(attention_lora_config(model, max(budget - head_parameters, 1)))  # the head keeps training
        return model

    return Method(build)


def _plain(attach: Callable, features: bool = False, output_side: bool = False) -> Method:
    return Method(
        lambda base, budget: attach(AutoModelForCausalLM.from_pretrained(base), budget), features, output_side
    )


def _rank(model, budget: int) -> int:
    """The rank whose ``2 d r`` parameters come closest to the budget (LM-Steer's, LoReFT's size)."""
    return max(1, round(budget / (2 * model.config.hidden_size)))


#: In the order they run (the decisive pair first, so a sitting that ends early has it).
METHODS: dict[str, Method] = {
    "head hidden": _head("hidden"),
    "LoRA attention": _plain(lambda m, budget: lora_on_attention(m, budget)),
    "LM-Steer": _plain(lambda m, budget: lm_steer(m, _rank(m, budget)), features=True, output_side=True),
    "LoReFT (hook)": _plain(lambda m, budget: loreft_on_last_layer(m, _rank(m, budget))),
    "IA3": _plain(lambda m, budget: ia3_on_top_layers(m, budget)),
    "LoRA output layer": _plain(lambda m, budget: lora_on_output_layer(m, rank=1), output_side=True),
    "head gated": _head("gated"),
    "head seed": _head("seed"),
    "head seed + LoRA attention": _head_and_lora("seed"),
    # issue 15: the hidden head trained with CE + beta KL(base || head); beta = 1 was fixed before any run
    "head hidden + KL": _head("hidden", base_kl_weight=1.0),
    "head hidden + copy": _head("hidden", copy_attention=True),
    # the copy attention supervised where the target followed an earlier position (copy_loss_weight, fixed at 1)
    "head hidden + copy, supervised": _head("hidden", copy_attention=True, copy_loss_weight=1.0),
    # issue 16: the query state standardised per dimension (the sentiment probes of probe_sentiment_layers.py)
    "head hidden + standardized": _head("hidden", standardize_query_state=True),
    # issue 15: the copy term for the final answer with the KL term for greedy health (beta = 1, as above)
    "head hidden + copy + KL": _head("hidden", copy_attention=True, base_kl_weight=1.0),
}
#: The rate of the LoRA run that times one step to set ``T`` (step time does not depend on it).
CALIBRATION_LEARNING_RATE = 3e-3


def reference_parameters(base: str) -> int:
    config = AutoConfig.from_pretrained(base)
    head = BackwardAttentionConfig.from_preset("hidden")
    model = family_for(config.model_type)(config, head_config=head)
    return sum(p.numel() for p in model.heads.parameters())


# --------------------------------------------------------------------------------------------------------
# training to a time budget


class BudgetTrainer(Trainer):
    """A ``Trainer`` whose checkpoints hold the trainable parameters alone (safetensors), for any method.

    Batches with ``base_hidden_states`` train a model without heads (LM-Steer) through its output layer.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "base_hidden_states" in inputs and not hasattr(model, "heads"):
            hidden, labels = inputs["base_hidden_states"], inputs["labels"]
            output = model.get_output_embeddings()
            logits = output(hidden.to(output.weight.dtype))
            count = num_items_in_batch
            if self.compute_loss_func is not None:  # a task's own objective (the sentiment label-word loss)
                loss = self.compute_loss_func(CausalLMOutput(logits=logits), labels, num_items_in_batch=count)
            else:
                loss = model.loss_function(logits, labels, model.config.vocab_size, num_items_in_batch=count)
            return (loss, {"logits": logits}) if return_outputs else loss
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        directory = Path(output_dir or self.args.output_dir)
        directory.mkdir(parents=True, exist_ok=True)
        save_trainable(self.model, directory / TRAINABLE_NAME)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_trainable(model or self.model, Path(resume_from_checkpoint) / TRAINABLE_NAME)


def save_trainable(model, path: Path) -> None:
    tensors = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    temporary = path.with_name(path.name + ".tmp")
    save_file(tensors, str(temporary))
    os.replace(temporary, path)


def load_trainable(model, source: Path | dict) -> None:
    """Copy saved trainable parameters (a safetensors file, or a dict of tensors) into the model in place."""
    tensors = source if isinstance(source, dict) else load_file(str(source))
    parameters = dict(model.named_parameters())
    missing = sorted({n for n, p in parameters.items() if p.requires_grad} - set(tensors))
    if missing:
        raise ValueError(f"The saved parameters lack the trainable {missing[:3]}...")
    with torch.no_grad():
        for name, tensor in tensors.items():
            parameters[name].copy_(tensor)


def budget_steps(seconds: float, step: float, cache: float, problems: int, batch_size: int, extra_rows: int = 0) -> int:
    """The training steps a budget of ``seconds`` affords.

    A method trained from cached features pays for the cache as a run that caches while it trains would: in
    its first epoch each step also costs the base forward over its batch (``cache / problems`` a problem);
    after that, each step costs ``step``. ``extra_rows`` more rows are paid up front (the rows a head with
    ``standardize_query_state`` reads for its statistics, charged as if no training step read them again).
    """
    first_epoch = math.ceil(problems / batch_size)
    if seconds >= first_epoch * step + cache:
        return first_epoch + int((seconds - first_epoch * step - cache) // step)
    return max(0, int((seconds - cache * extra_rows / problems) // (step + batch_size * cache / problems)))


def charged_seconds(
    steps: int, step: float, cache: float, problems: int, batch_size: int, extra_rows: int = 0
) -> float:
    """The training seconds of ``steps`` steps, charged as :func:`budget_steps` charges them."""
    return steps * step + cache * min(1.0, (steps * batch_size + extra_rows) / problems)


#: The learning-rate scale a sweep extends on: 1e-6, 3e-6, 1e-5, ..., 0.3.
RATE_SCALE = [float(f"{m}e{e}") for e in range(-6, 0) for m in (1, 3)]


def rate_beyond_edge(losses: dict[float, float]) -> float | None:
    """The next rate past the grid's edge if the lowest loss sits at that edge (and the rate is new), else None."""
    rates = sorted(losses)
    best = min(rates, key=lambda rate: losses[rate])
    if len(rates) < 2 or best not in (rates[0], rates[-1]):
        return None
    nearest = min(range(len(RATE_SCALE)), key=lambda i: abs(math.log(RATE_SCALE[i] / best)))
    index = nearest - 1 if best == rates[0] else nearest + 1
    if not 0 <= index < len(RATE_SCALE) or any(math.isclose(RATE_SCALE[index], r) for r in rates):
        return None
    return RATE_SCALE[index]


def _finite(loss: float) -> float:
    """A diverged run's loss (NaN) ranks last."""
    return loss if math.isfinite(loss) else math.inf


class SaveAtSteps(TrainerCallback):
    """Checkpoint at exactly these global steps (the budgets) and nowhere else."""

    def __init__(self, steps: set[int]):
        self.steps = steps

    def on_step_end(self, args, state, control, **kwargs):
        control.should_save = state.global_step in self.steps
        return control


def training_arguments(options, directory: Path, learning_rate: float, max_steps: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(directory), per_device_train_batch_size=options.batch_size, max_steps=max(max_steps, 1),
        learning_rate=learning_rate, lr_scheduler_type="constant_with_warmup", warmup_steps=options.warmup_steps,
        logging_steps=10, save_strategy="no", report_to="none", seed=options.seed, disable_tqdm=False,
        dataloader_pin_memory=torch.cuda.is_available(), remove_unused_columns=False,
    )  # fmt: skip


class StepClock(TrainerCallback):
    """The wall time between consecutive optimiser steps of a ``Trainer`` run (batch loading included)."""

    def __init__(self):
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


def step_seconds(trainer: BudgetTrainer, steps: int) -> float:
    """Mean seconds of one whole training step of ``trainer`` (data, forward, backward, optimiser, logging),
    over ``steps`` steps after 2 untimed ones (the mean: a run's cost is its steps times it; the batches' lengths
    vary); the trainer's model is left as it was."""
    model = trainer.model
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    clock = StepClock()
    trainer.add_callback(clock)
    trainer.args.max_steps = steps + 3
    trainer.train()
    trainer.remove_callback(clock)
    load_trainable(model, initial)
    model.zero_grad(set_to_none=True)
    intervals = [b - a for a, b in zip(clock.ends[2:], clock.ends[3:])]
    return statistics.fmean(intervals)


# --------------------------------------------------------------------------------------------------------
# data


def template_range(text: str) -> list[int]:
    """``"0-63"`` or ``"0,5,7-9"`` -> template ids."""
    ids = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        ids.extend(range(int(low), int(high or low) + 1))
    return ids


def load_rows(options) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Training and held-out rows, split by template: no held-out template is ever trained on."""
    if options.dataset == "gsm_symbolic":
        from backattn.data.gsm_symbolic import build_gsm_symbolic

        built = build_gsm_symbolic(variants_per_template=options.variants_per_template, seed=0)
        rows = datasets.concatenate_datasets([built["train"], built["test"]])
    else:
        rows = load_math_dataset(options.dataset)
    train, held_out = set(template_range(options.train_templates)), set(template_range(options.eval_templates))
    if train & held_out:
        raise ValueError(f"Training and held-out templates overlap: {sorted(train & held_out)}.")
    return (rows.filter(lambda r: r["template_id"] in train), rows.filter(lambda r: r["template_id"] in held_out))


def generation_subset(examples, count: int) -> list[int]:
    """``count`` held-out problems, spread evenly over the templates (the first variants of each, round-robin)."""
    by_template: dict[int, list[int]] = {}
    for index, template in enumerate(examples["template_id"]):
        by_template.setdefault(template, []).append(index)
    chosen, depth = [], 0
    while len(chosen) < min(count, len(examples)):
        for indices in by_template.values():
            if depth < len(indices) and len(chosen) < count:
                chosen.append(indices[depth])
        depth += 1
    return sorted(chosen)


# --------------------------------------------------------------------------------------------------------
# scoring


def output_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """An output-side method's logits for the frozen base's final hidden states (... x d)."""
    if hasattr(model, "heads"):
        return model(base_hidden_states=hidden).logits
    output = model.get_output_embeddings()
    return output(hidden.to(output.weight.dtype))


class OutputSide(torch.nn.Module):
    """A model scored from cached base states: ``forward(base_hidden_states=...)`` gives its logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, base_hidden_states: torch.Tensor, **ignored) -> CausalLMOutput:
        return CausalLMOutput(logits=output_logits(self.model, base_hidden_states))


class HeldOutStates:
    """The frozen base's final hidden states on the held-out problems, computed once for every output-side
    method: at every position of the teacher-forced sequences (a feature cache) and at the multiple-choice
    positions (the prefix's last and each final-answer line's, in ``choices.safetensors``)."""

    def __init__(self, base: str, tokenizer, examples, options, directory: Path):
        self.base, self.tokenizer, self.examples, self.options, self.directory = (
            base,
            tokenizer,
            examples,
            options,
            directory,
        )
        self._cache = self._choices = None

    def teacher_forced(self):
        if self._cache is None:
            plain = AutoModelForCausalLM.from_pretrained(self.base).eval()
            self._cache = FeatureCache.build_or_load(plain, self.examples["input_ids"], self.directory, "float32",
                                                     self.options.batch_size)  # fmt: skip
        return CachedFeaturesDataset(self.examples, self._cache)

    def choices(self, kind: str, after_solution: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        path = self.directory / f"choices-{kind}.safetensors"
        if not path.is_file():
            decoder = AutoModelForCausalLM.from_pretrained(self.base).eval().base_model
            tensors = {}
            for index, row in enumerate(tqdm(self.examples, desc=f"Base states for {kind}")):
                prefix, lines = choice_tokens(self.tokenizer, row, PromptTemplate(), after_solution)
                first, rest = shared_prefix_outputs(decoder, prefix, lines, field="last_hidden_state")
                tensors[f"{index}.first"], tensors[f"{index}.rest"] = first.contiguous(), rest.contiguous()
            temporary = path.with_name(path.name + ".tmp")
            save_file(tensors, str(temporary))
            os.replace(temporary, path)
        tensors = load_file(str(path))
        return [(tensors[f"{i}.first"], tensors[f"{i}.rest"]) for i in range(len(self.examples))]


def score(model, tokenizer, examples, options, generate: bool, states: HeldOutStates | None = None) -> dict[str, list]:
    """Per-problem scores of one trained model on the held-out examples (lists, in the examples' order).

    With ``states`` (an output-side method), the teacher-forced and multiple-choice scores come from the
    base's cached held-out states; they equal those of full forwards (``tests/test_benchmarks.py``).
    """
    scores = {}
    if "teacher_forced" in options.metrics:
        collator = SFTCollator(tokenizer, answer_labels=True)
        scorer, data = (OutputSide(model), states.teacher_forced()) if states else (model, examples)
        scores.update(per_problem_scores(scorer, data, collator, options.batch_size, progress=True))
    if "multiple_choice" in options.metrics:
        template = PromptTemplate()
        for name, after in (("mc_direct", False), ("mc_after_solution", True)):
            choose = None
            if states is not None:
                cached = states.choices(name, after)

                def choose(index, prefix, lines, cached=cached):
                    first, rest = cached[index]
                    with torch.no_grad():
                        logits = output_logits(model, torch.cat([first[None], rest.flatten(0, 1)])[None])[0]
                    return continuation_scores(logits[0], logits[1:].unflatten(0, rest.shape[:2]), lines)

            picked = multiple_choice(model, tokenizer, examples, template, after, progress=True, scorer=choose)
            scores.update({f"{name}{'' if k == 'correct' else '_normalised'}": v for k, v in picked.items()})
    if generate and "generation" in options.metrics:
        subset = generation_subset(examples, options.generation_problems)
        problems = examples.select(subset)
        solutions = generate_solutions(model, tokenizer, problems["prompt"], options.max_new_tokens,
                                       options.batch_size, progress=True)  # fmt: skip
        scores["generation_index"] = subset
        scores.update(solution_scores(solutions, problems["expected_answer"]))
        del scores["answers"]  # the results keep the solutions; the answers are parsed from them again
    return scores


# --------------------------------------------------------------------------------------------------------
# the task: what is trained on, scored and reported (math here; benchmarks/compare_sentiment.py adds another)


class MathTask:
    """GSM-Symbolic word problems split by template: teacher-forced, multiple-choice and greedy metrics."""

    arguments = ComparisonArguments
    setup_fields = (*SETUP_FIELDS, "max_new_tokens", "generation_problems")
    metrics = HELD_OUT_METRICS
    #: The metric whose lowest value on the validation split chooses a method's learning rate.
    selection = "target_ce"
    #: The held-out rows' unit of resampling (a bootstrap draws these first), and its name in the results.
    group_name = "templates"
    #: The report's tables: (title, metrics, format).
    sections = (
        ("Teacher-forced and multiple-choice", ["target_ce", "perplexity", "answer_ce", "answer_accuracy",
         "answer_exact", "copied_answer", "mc_direct", "mc_after_solution", "mc_direct_normalised",
         "mc_after_solution_normalised"], ".3f"),
        ("Greedy", ["greedy_accuracy", "parse_rate", "repetition_rate"], ".2f"),
    )  # fmt: skip
    #: Metrics plotted against training seconds, and their files.
    pareto = (("target_ce", "pareto_target_ce.png"), ("mc_direct", "pareto_mc.png"))  # after-solution is saturated

    def examples(self, options, tokenizer) -> tuple[datasets.Dataset, datasets.Dataset]:
        """Tokenized training and held-out rows (the held-out keep their template and the text to score)."""
        train_rows, eval_rows = load_rows(options)
        keep = ("template_id", "problem", "generated_solution")
        train, _ = tokenize_examples(train_rows, tokenizer, PromptTemplate(), options.max_length)
        held_out, _ = tokenize_examples(eval_rows, tokenizer, PromptTemplate(), options.max_length, keep)
        self.answer_copyable = [
            float(answer_is_copyable(r["problem"], r["generated_solution"], r["expected_answer"])) for r in held_out
        ]  # the held-out answers that appear earlier (copied_answer's denominator)
        return train.remove_columns(["prompt", "expected_answer"]), held_out

    def groups(self, held_out: datasets.Dataset) -> list:
        return held_out["template_id"]

    def describe(self, options) -> str:
        return f"Held-out: templates {options.eval_templates}; 95% intervals resample templates, then problems."

    def held_out_states(self, base: str, tokenizer, held_out, options, directory: Path) -> HeldOutStates:
        return HeldOutStates(base, tokenizer, held_out, options, directory)

    def score(self, model, tokenizer, held_out, options, last_budget: bool, states=None) -> dict[str, list]:
        return score(model, tokenizer, held_out, options, last_budget, states)

    def training_loss(self, model):
        """The ``Trainer``'s ``compute_loss_func`` for a method's fresh ``model``; ``None``: the model's own loss."""
        return None

    def summarise(self, scores: dict, base: dict | None, groups: list, n_resamples: int) -> dict:
        scores, base = (self.with_copied_answers(s) for s in (scores, base))
        return summarise_scores(scores, base, groups, n_resamples, self.metrics)

    def with_copied_answers(self, scores: dict | None) -> dict | None:
        """``answer_copyable`` (1 where the answer appears earlier) and ``answer_copied`` (it does, and the whole
        answer is ranked first) for teacher-forced scores, so ``copied_answer`` is the share of those right."""
        copyable = getattr(self, "answer_copyable", None)
        if scores is None or copyable is None or "answer_correct" not in scores:
            return scores
        flags = copyable[: len(scores["answer_correct"])]
        return {**scores, "answer_copyable": flags,
                "answer_copied": [e * f for e, f in zip(answer_exact(scores), flags)]}  # fmt: skip


# --------------------------------------------------------------------------------------------------------
# the run


class Run:
    """Paths and saved state of one comparison (one split): every result is a small json written atomically."""

    def __init__(self, options):
        self.options = options
        self.output = ROOT / options.output_dir  # relative paths are the repository's
        self.work = ROOT / options.work_dir / options.split_name
        self.output.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.calibration_path = self.output / "calibration.json"  # kept with the results: later sittings reuse it

    def read(self, path: Path) -> dict | None:
        return json.loads(path.read_text()) if path.is_file() else None

    def write(self, path: Path, value: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps(value, indent=1))
        os.replace(temporary, path)

    def calibration(self) -> dict:
        return self.read(self.calibration_path) or {}

    def calibrate(self, key: str, value: float) -> None:
        self.write(self.calibration_path, {**self.calibration(), key: value})

    def check_same_setup(self, options, train_examples, eval_examples, fields=SETUP_FIELDS) -> None:
        """Results of earlier sittings are kept only if they came from the same data and training settings."""
        digest = hashlib.sha256()
        for ids in (*train_examples["input_ids"], b"|", *eval_examples["input_ids"]):
            digest.update(bytes(ids) if isinstance(ids, bytes) else json.dumps(ids).encode())
        settings = {name: getattr(options, name) for name in fields}
        setup = {"data_sha256": digest.hexdigest(), **settings}
        recorded = self.read(self.output / "setup.json")
        if recorded is None:
            self.write(self.output / "setup.json", setup)
        elif recorded != setup:
            changed = sorted(k for k in setup if recorded.get(k) != setup[k])
            raise ValueError(
                f"{self.output} holds results of another setup (differs in {changed}): resume with the same data "
                "and settings, or give another --output_dir (and --work_dir) for a new comparison."
            )

    def result_path(self, run_name: str, budget: float | None) -> Path:
        name = "scores.json" if budget is None else f"budget-{budget:g}T.json"
        return self.output / "runs" / run_name.replace(" ", "_") / name


def chosen_learning_rates(options) -> dict[str, float]:
    """The validation run's best learning rate per method (lowest validation target CE at its budget)."""
    if options.learning_rates:
        return {}
    path = ROOT / options.validation_results
    chosen = json.loads(path.read_text())["chosen_learning_rates"] if path.is_file() else {}
    missing = [m for m in options.methods if m not in chosen]
    if missing:
        raise ValueError(
            f"No validation choice of learning rate for {missing} in {path}: run "
            "`benchmarks/compare_heads.py benchmarks/compare_heads_validation.yaml` first (the held-out set is "
            "never used to choose), or name rates with --learning_rates."
        )
    return chosen


def prepare_run(options, task):
    """The run's folders, base, tokenizer, training and held-out rows and the held-out rows' groups; the setup
    checked against earlier sittings' (shared with the scripts built on this machinery)."""
    logging.set_verbosity_error()
    run = Run(options)
    base = options.model_name_or_path or str(smollm2_path())
    tokenizer = sft_tokenizer(base)
    train_examples, eval_examples = task.examples(options, tokenizer)
    if options.max_eval_problems is not None:
        eval_examples = eval_examples.select(range(min(options.max_eval_problems, len(eval_examples))))
    groups = task.groups(eval_examples)
    print(f"{len(train_examples)} training rows, {len(eval_examples)} held-out ({len(set(groups))} "
          f"{task.group_name}); {task.describe(options)}", file=sys.stderr)  # fmt: skip
    run.check_same_setup(options, train_examples, eval_examples, task.setup_fields)
    return run, base, tokenizer, train_examples, eval_examples, groups


def main(argv: list[str] | None = None, task=None) -> dict:
    started = time.perf_counter()
    task = task or MathTask()
    (options,) = parse_command_line(task.arguments, sys.argv[1:] if argv is None else argv)
    unknown = sorted(set(options.methods) - set(METHODS))
    if unknown:
        raise ValueError(f"Unknown method(s) {unknown}; choose from {list(METHODS)}.")
    # before anything slow: a missing choice fails now
    learning_rates = {} if options.calibrate_only else chosen_learning_rates(options)
    run, base, tokenizer, train_examples, eval_examples, groups = prepare_run(options, task)
    budget_parameters = reference_parameters(base)
    collator = SFTCollator(tokenizer)

    # The frozen base: scored once, the reference of every paired difference.
    base_path = run.result_path("frozen base", None)
    if options.report_only:
        return report(run, options, run.read(base_path)["scores"], groups, time.perf_counter() - started, task)
    if run.read(base_path) is None and not options.calibrate_only:
        model = AutoModelForCausalLM.from_pretrained(base).eval()
        run.write(base_path, {"scores": task.score(model, tokenizer, eval_examples, options, True)})
        del model

    features: dict[tuple, tuple] = {}  # the decoder blocks a cache stores -> (its dataset, its build seconds)
    cache_seconds: dict[str, float] = {}  # method -> the build seconds of the cache it trains from
    held_out = task.held_out_states(base, tokenizer, eval_examples, options, run.work / "held_out_states")

    def feature_dataset(model):
        """The cached-features training set (with the decoder blocks the model's heads read, ``query_layers``); its
        build time is recorded once per set of blocks and charged to every user."""
        layers = tuple(model.feature_layers()) if hasattr(model, "feature_layers") else ()
        if layers not in features:
            key = f"feature_cache_seconds:{options.split_name}:{len(train_examples)}"
            key += f":layers={','.join(map(str, layers))}" if layers else ""  # the final states' key is unchanged
            directory = run.work / ("features" if not layers else f"features-layers-{'-'.join(map(str, layers))}")
            if key not in run.calibration():  # its build time is unknown: build it afresh and time that
                shutil.rmtree(directory, ignore_errors=True)
            started_cache = time.perf_counter()
            cache = FeatureCache.build_or_load(model, train_examples["input_ids"], directory, "float16",
                                               options.batch_size)  # fmt: skip
            if key not in run.calibration():
                run.calibrate(key, time.perf_counter() - started_cache)
            features[layers] = CachedFeaturesDataset(train_examples, cache), run.calibration()[key]
        return features[layers]

    def trainer_for(name: str, learning_rate: float, max_steps: int = 0, callbacks=None):
        """A fresh model of the method and its trainer (``max_steps=0``: to time its steps)."""
        set_seed(options.seed)
        method = METHODS[name]
        model = method.build(base, budget_parameters)
        dataset = train_examples
        if method.features:
            dataset, cache_seconds[name] = feature_dataset(model)
        if method.standardizes:  # mu and sigma^2 from the first rows, the same in every sitting (charged as rows)
            fit_query_standardization(model, dataset, collator, STANDARDIZATION_ROWS, options.batch_size)
        directory = run.work / (f"{name} lr={learning_rate:g}" if max_steps else f"calibration/{name}").replace(
            " ", "_"
        )
        return BudgetTrainer(model=model, args=training_arguments(options, directory, learning_rate, max_steps),
                             train_dataset=dataset, data_collator=collator, callbacks=callbacks,
                             compute_loss_func=task.training_loss(model))  # fmt: skip

    def step_key(name: str) -> str:
        return f"step_seconds:{name}:{options.batch_size}"

    # Every method's step time, back to back (one machine state for all), before anything trains.
    for name in dict.fromkeys(["LoRA attention", *options.methods]):
        if step_key(name) not in run.calibration() or (METHODS[name].features and name not in cache_seconds):
            trainer = trainer_for(name, CALIBRATION_LEARNING_RATE)
            if step_key(name) not in run.calibration():
                run.calibrate(step_key(name), step_seconds(trainer, options.calibration_steps))
                run.calibrate(f"load_average_after:{name}", os.getloadavg()[0])
            del trainer
    if options.calibrate_only:
        print(json.dumps(run.calibration(), indent=1))
        return run.calibration()
    base_scores = run.read(base_path)["scores"]
    # T: one LoRA-on-attention epoch over budget_problems problems, at LoRA's calibrated step time.
    unit = math.ceil(options.budget_problems / options.batch_size) * run.calibration()[step_key("LoRA attention")]

    def train_and_score(name: str, learning_rate: float) -> None:
        """Train once to the largest budget, checkpointing at each; score every budget's checkpoint."""
        run_name = f"{name} lr={learning_rate:g}"
        seconds_per_step = run.calibration()[step_key(name)]
        cache = cache_seconds[name] if METHODS[name].features and options.charge_feature_cache else 0.0
        problems = len(train_examples)
        extra = STANDARDIZATION_ROWS if METHODS[name].standardizes else 0
        steps = {b: budget_steps(b * unit, seconds_per_step, cache, problems, options.batch_size, extra)
                 for b in options.budgets}  # fmt: skip

        def charges(budget: float) -> dict:
            seconds = charged_seconds(steps[budget], seconds_per_step, cache, problems, options.batch_size, extra)
            return {"steps": steps[budget], "training_seconds": seconds, "T_seconds": unit,
                    "step_seconds": seconds_per_step, "feature_cache_seconds": cache}  # fmt: skip

        kept = {b: run.read(run.result_path(run_name, b)) for b in options.budgets}
        if any(result and result["steps"] != steps[b] for b, result in kept.items()):
            # trained under an earlier calibration that afforded other steps: trained and scored again
            print(f"\n{run_name}: its results are for other steps than {steps} (re-timed since): retraining",
                  file=sys.stderr)  # fmt: skip
            for budget in options.budgets:
                run.result_path(run_name, budget).unlink(missing_ok=True)
            shutil.rmtree(run.work / run_name.replace(" ", "_"), ignore_errors=True)
            kept = dict.fromkeys(options.budgets)
        for budget, result in kept.items():  # the same steps: only the seconds charged for them may be new
            if result and any(result[key] != value for key, value in charges(budget).items()):
                run.write(run.result_path(run_name, budget), {**result, **charges(budget)})
        if all(kept.values()):
            return
        last = max(steps.values())
        work = run.work / run_name.replace(" ", "_")
        if any(int(p.name.split("-")[1]) not in steps.values() for p in work.glob("checkpoint-*")):
            # an unfinished run under an earlier calibration (other steps): its checkpoints are not these budgets'
            print(f"\n{run_name}: its checkpoints are for other steps than {steps}: training afresh", file=sys.stderr)
            shutil.rmtree(work)
        trainer = trainer_for(name, learning_rate, last, [SaveAtSteps(set(steps.values()))])
        model, directory = trainer.model, Path(trainer.args.output_dir)
        print(
            f"\n{run_name}: {trainable_parameters(model):,} trainable parameters, {seconds_per_step:.2f} s a step, "
            f"cache {cache:.0f} s, T = {unit:.0f} s, steps per budget {steps}",
            file=sys.stderr,
        )
        initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        finished = sorted(int(p.name.split("-")[1]) for p in directory.glob("checkpoint-*"))
        if last and (not finished or finished[-1] < last):
            trainer.train(resume_from_checkpoint=str(directory / f"checkpoint-{finished[-1]}") if finished else None)
        for budget in options.budgets:
            path = run.result_path(run_name, budget)
            if run.read(path):
                continue
            if steps[budget]:
                load_trainable(model, directory / f"checkpoint-{steps[budget]}" / TRAINABLE_NAME)
            else:  # the budget is spent before the first step: the untrained method
                load_trainable(model, initial)
            last_budget, states = budget == max(options.budgets), held_out if METHODS[name].output_side else None
            scores = task.score(model.eval(), tokenizer, eval_examples, options, last_budget, states)
            run.write(path, {"method": name, "learning_rate": learning_rate, "budget": budget, **charges(budget),
                             "trainable_parameters": trainable_parameters(model), "scores": scores})  # fmt: skip

    def validation_loss(name: str, learning_rate: float) -> float:
        result = run.read(run.result_path(f"{name} lr={learning_rate:g}", max(options.budgets)))
        numerator, denominator = task.metrics[task.selection][:2]
        total = sum(result["scores"][denominator]) if denominator else len(result["scores"][numerator])
        return _finite(sum(result["scores"][numerator]) / total)

    for name in options.methods:
        rates = list(options.learning_rates or [learning_rates[name]])
        for learning_rate in rates:
            train_and_score(name, learning_rate)
        while options.learning_rates and options.extend_learning_rates and len(rates) < len(options.learning_rates) + 2:
            beyond = rate_beyond_edge({rate: validation_loss(name, rate) for rate in rates})
            if beyond is None:
                break
            print(f"\n{name}: the best rate is at the grid's edge; trying {beyond:g}", file=sys.stderr)
            rates.append(beyond)
            train_and_score(name, beyond)
    return report(run, options, base_scores, groups, time.perf_counter() - started, task)


# --------------------------------------------------------------------------------------------------------
# the report


def report(run: Run, options, base_scores: dict, groups: list, seconds: float, task=None) -> dict:
    """results.json, results.md and the plots from every result written so far (finished or not)."""
    task = task or MathTask()
    rows = {"frozen base": {"method": "frozen base", "budget": 0, "training_seconds": 0.0, "trainable_parameters": 0,
                            "metrics": task.summarise(base_scores, None, groups, options.n_resamples)}}  # fmt: skip
    order = {name: index for index, name in enumerate(METHODS)}
    results = [json.loads(path.read_text()) for path in (run.output / "runs").glob("*/budget-*.json")]
    for result in results:  # rates written by an earlier sitting as 0.00030000000000000003 read as 0.0003
        result["learning_rate"] = float(f"{result['learning_rate']:.12g}")
    scores = {}  # row -> its per-problem scores, for the paired differences to LoRA below
    for result in sorted(results, key=lambda r: (order[r["method"]], r["learning_rate"], r["budget"])):
        key = f"{result['method']} lr={result['learning_rate']:g} @{result['budget']:g}T"
        scores[key] = result.pop("scores")
        rows[key] = {**result, "metrics": task.summarise(scores[key], base_scores, groups, options.n_resamples)}
        if METHODS[result["method"]].head is not None:  # train_sft.py finds a run's head config here
            rows[key]["head"] = METHODS[result["method"]].head
    chosen = {}
    for name in METHODS:
        candidates = [r for r in rows.values() if r["method"] == name and r["budget"] == max(options.budgets)]
        if candidates and all(task.selection in r["metrics"] for r in candidates):
            best = min(candidates, key=lambda r: _finite(r["metrics"][task.selection]["value"]))
            chosen[name] = best["learning_rate"]
    add_differences_to_lora(rows, scores, chosen.get(LORA), groups, options.n_resamples, task)
    summary = {"options": asdict(options), "rows": rows, "chosen_learning_rates": chosen,
               "held_out_problems": len(groups), f"held_out_{task.group_name}": len(set(groups)),
               "wall_seconds_this_sitting": seconds}  # fmt: skip
    run.write(run.output / "results.json", summary)
    (run.output / "results.md").write_text(markdown(rows, options, task))
    plot(rows, run.output, task)
    print(markdown(rows, options, task))
    return summary


#: The competitor every method is also paired with, at the same budget (its chosen learning rate).
LORA = "LoRA attention"


def add_differences_to_lora(rows: dict, scores: dict, lora_rate: float | None, groups, n_resamples: int, task):
    """``minus_lora`` in each trained row: every metric's paired difference to LoRA on attention at the same
    budget and LoRA's chosen rate, on the same problems (the head-minus-LoRA intervals of the acceptance)."""
    if lora_rate is None:
        return
    for key, row in rows.items():
        lora = f"{LORA} lr={lora_rate:g} @{row['budget']:g}T"
        if key not in scores or row["method"] == LORA or lora not in scores:
            continue
        paired = task.summarise(scores[key], scores[lora], groups, n_resamples)
        row["minus_lora"] = {metric: value["minus_base"] for metric, value in paired.items() if "minus_base" in value}


def _cell(metric: dict | None, spec: str) -> str:
    if metric is None:
        return "-"
    text = f"{metric['value']:{spec}} [{metric['low']:{spec}}, {metric['high']:{spec}}]"
    return text


def markdown(rows: dict, options, task=None) -> str:
    task = task or MathTask()
    reference = next((r["trainable_parameters"] for r in rows.values() if r["method"] == REFERENCE), None)
    lines = [task.describe(options) + "\n"]
    for title, keys, spec in task.sections:
        present = [k for k in keys if any(k in r["metrics"] for r in rows.values())]
        if not present:
            continue
        labels = " | ".join(task.metrics[k][3] for k in present)
        lines += [f"### {title}\n", f"| method | params | x ref | budget | train s | {labels} |",
                  "|" + " --- |" * (5 + len(present))]  # fmt: skip
        for name, r in rows.items():
            if not any(k in r["metrics"] for k in present):
                continue
            ratio = f"{r['trainable_parameters'] / reference:.2f}" if reference and r["trainable_parameters"] else "-"
            cells = [_cell(r["metrics"].get(k), spec) for k in present]
            lines.append(f"| {name} | {r['trainable_parameters']:,} | {ratio} | {r['budget']:g}T | "
                         f"{r['training_seconds']:.0f} | " + " | ".join(cells) + " |")  # fmt: skip
        lines.append("")
    every = [key for _, keys, _ in task.sections for key in keys]
    differences = [(n, r) for n, r in rows.items() if any("minus_base" in m for m in r["metrics"].values())]
    if differences:
        present = [k for k in every if any("minus_base" in r["metrics"].get(k, {}) for _, r in differences)]
        lines += [
            "### Paired difference to the frozen base (same problems)\n",
            "| method | " + " | ".join(task.metrics[k][3] for k in present) + " |",
            "|" + " --- |" * (1 + len(present)),
        ]
        for name, r in differences:
            cells = [_cell(r["metrics"].get(k, {}).get("minus_base"), "+.3f") for k in present]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    versus = [(n, r) for n, r in rows.items() if r.get("minus_lora")]
    if versus:
        present = [k for k in every if any(k in r["minus_lora"] for _, r in versus)]
        lines += [
            f"\n### Paired difference to {LORA} at the same budget (its chosen rate; same problems)\n",
            "| method | " + " | ".join(task.metrics[k][3] for k in present) + " |",
            "|" + " --- |" * (1 + len(present)),
        ]
        for name, r in versus:
            lines.append(f"| {name} | " + " | ".join(_cell(r["minus_lora"].get(k), "+.3f") for k in present) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: dict, output: Path, task=None) -> None:
    task = task or MathTask()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({r["method"] for r in rows.values()} - {"frozen base"})
    colours = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    base = rows["frozen base"]["metrics"]
    for metric, filename in task.pareto:
        if metric not in base:
            continue
        figure, axis = plt.subplots(figsize=(11, 5))
        axis.axhspan(base[metric]["low"], base[metric]["high"], color="black", alpha=0.1, label="frozen base (95% CI)")
        axis.axhline(base[metric]["value"], color="black", linewidth=1)
        for budget, unit in {(r["budget"], r["T_seconds"]) for r in rows.values() if "T_seconds" in r}:
            axis.axvline(budget * unit, color="black", linestyle=":", linewidth=0.8)
        series = sorted({(r["method"], r["learning_rate"]) for r in rows.values() if "learning_rate" in r})
        several_rates = len(series) > len({method for method, _ in series})
        for (method, rate), marker in zip(series, itertools.cycle("osD^v")):
            points = sorted(((r["training_seconds"], r["metrics"][metric]) for r in rows.values()
                             if (r["method"], r.get("learning_rate")) == (method, rate) and metric in r["metrics"]),
                            key=lambda point: point[0])  # fmt: skip
            if not points:
                continue
            x = [p[0] for p in points]
            y = [p[1]["value"] for p in points]
            error = [[p[1]["value"] - p[1]["low"] for p in points], [p[1]["high"] - p[1]["value"] for p in points]]
            label = f"{method}, lr {rate:g}" if several_rates else method
            axis.errorbar(x, y, yerr=error, marker=marker, capsize=3, label=label, color=colours[method])
        axis.set_xlabel("training seconds (steps x step time + feature cache); dotted: the budgets T, 2T, 4T")
        axis.set_ylabel(f"{task.metrics[metric][3]} (held out)")
        axis.set_title(f"{task.metrics[metric][3]} against training time, 95% intervals")
        axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        figure.tight_layout()
        figure.savefig(output / filename, dpi=120)
        plt.close(figure)
    rated = [r for r in rows.values() if "learning_rate" in r and task.selection in r["metrics"]]
    if len({r["budget"] for r in rated}) == 1 and len(rated) > len({r["method"] for r in rated}):
        plot_learning_rates(rated, base, task, colours, output / "learning_rates.png")
    greedy = [(n, r) for n, r in rows.items() if "greedy_accuracy" in r["metrics"]]
    if greedy:
        keys = ["greedy_accuracy", "parse_rate", "repetition_rate"]
        figure, axes = plt.subplots(1, len(keys), figsize=(15, 5), sharey=True)
        for axis, key in zip(axes, keys):
            values = [r["metrics"][key] for _, r in greedy]
            axis.barh(range(len(greedy)), [v["value"] for v in values],
                      xerr=[[v["value"] - v["low"] for v in values], [v["high"] - v["value"] for v in values]],
                      color=[colours.get(r["method"], "grey") for _, r in greedy], capsize=3)  # fmt: skip
            axis.set_yticks(range(len(greedy)), [n for n, _ in greedy], fontsize=8)
            axis.set_xlabel(task.metrics[key][3])
            axis.set_xlim(0, 1)
        figure.suptitle("Greedy solutions of held-out problems, 95% intervals")
        figure.tight_layout()
        figure.savefig(output / "greedy.png", dpi=120)
        plt.close(figure)


def plot_learning_rates(rated: list[dict], base: dict, task, colours: dict, path: Path) -> None:
    """A sweep at one budget: each method's selection metric against its learning rate, both on log axes
    (the metric only when it spans 10x, as a diverged rate does)."""
    import matplotlib.pyplot as plt

    metric = task.selection
    figure, axis = plt.subplots(figsize=(8, 5))
    axis.axhspan(base[metric]["low"], base[metric]["high"], color="black", alpha=0.1, label="frozen base (95% CI)")
    axis.axhline(base[metric]["value"], color="black", linewidth=1)
    for method in sorted({r["method"] for r in rated}):
        points = sorted((r["learning_rate"], r["metrics"][metric]) for r in rated if r["method"] == method)
        x = [rate for rate, _ in points]
        y = [metric["value"] for _, metric in points]
        error = [[m["value"] - m["low"] for _, m in points], [m["high"] - m["value"] for _, m in points]]
        axis.errorbar(x, y, yerr=error, marker="o", capsize=3, label=method, color=colours[method])
    axis.set_xscale("log")
    values = [r["metrics"][metric]["value"] for r in rated] + [base[metric]["value"]]
    if min(values) > 0 and max(values) > 10 * min(values):  # one diverged rate would flatten the rest
        axis.set_yscale("log")
    axis.set_xlabel("learning rate (constant after warm-up)")
    axis.set_ylabel(f"{task.metrics[metric][3]} (validation)")
    axis.set_title(f"Learning rates at {rated[0]['budget']:g}T each, 95% intervals")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
