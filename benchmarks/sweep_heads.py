"""Train a list of head configurations in one pass over the same cached features, and score each on validation.

    .venv/bin/python benchmarks/sweep_heads.py benchmarks/sweep_heads_validation.yaml
    .venv/bin/python benchmarks/sweep_heads.py benchmarks/sweep_heads_validation.yaml --max_steps 40 \
        --output_dir outputs/sweep_heads_validation_40_steps      # options on top of the YAML's

The YAML holds the options of :class:`SweepArguments` and of ``TrainingArguments`` side by side (parsed by
``HfArgumentParser``), and ``heads``: a list of head configurations, each ``{name, preset, options,
learning_rate, weight_decay, init_from}`` (:class:`backattn.sweep.SweepHead`; a missing learning rate is the
``learning_rate`` option). The protocol is the comparison's validation stage
(``benchmarks/compare_heads_validation.yaml``): GSM-Symbolic, training on whole templates 0-63, scoring the
target cross-entropy on templates 64-79 (never the held-out 80-99), batch 8, constant learning rate after
warm-up. Every head sees the same batches in the same order (one ``SweepTrainer``: see ``backattn/sweep.py``).

Writes ``output_dir/results.json`` and ``results.md`` (each head's validation target CE, its difference from
the frozen base and the wall time of the pass), and ``output_dir/heads/<name>``: each head as an ordinary head
directory, ``model.load_head(path)`` loads it. Caches (features) go to ``work_dir``; a feature cache that
``feature_cache_dirs`` already hold for the same base and data (the comparison's) is read from there.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from transformers import AutoModelForCausalLM, HfArgumentParser, TrainingArguments, set_seed
from transformers.trainer_utils import SaveStrategy, SchedulerType
from transformers.utils import logging

from backattn.data.feature_cache import CachedFeaturesDataset, FeatureCache, base_fingerprint, data_fingerprint
from backattn.data.sft_data import PromptTemplate, SFTCollator, sft_tokenizer, tokenize_examples
from backattn.errors import BackattnValueError
from backattn.offline import smollm2_path
from backattn.sweep import HeadSweep, SweepTrainer, check_sweep_heads

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class SweepArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "Base model; default: embedded SmolLM2."})
    heads: list[dict] = field(default_factory=list, metadata={"help": "The head configurations (YAML list)."})
    dataset: str = field(default="gsm_symbolic", metadata={"help": "'gsm_symbolic' or a file with a template_id."})
    variants_per_template: int = field(default=16, metadata={"help": "GSM-Symbolic variants per template."})
    train_templates: str = field(default="0-63", metadata={"help": "Training templates, e.g. '0-63'."})
    eval_templates: str = field(default="64-79", metadata={"help": "Validation templates, e.g. '64-79'."})
    max_length: int = field(default=384, metadata={"help": "Longest prompt + target in tokens; longer rows dropped."})
    max_train_problems: int | None = field(default=None, metadata={"help": "Train on the first N problems only."})
    max_eval_problems: int | None = field(default=None, metadata={"help": "Score only the first N validation."})
    work_dir: str = field(default="outputs/sweep_heads", metadata={"help": "Caches (not committed)."})
    feature_cache_dirs: list[str] = field(
        default_factory=lambda: ["outputs/compare_heads/validation/features"],
        metadata={"help": "Directories searched (read only) for a feature cache of the same base and data."},
    )


@dataclass
class SweepTrainingArguments(TrainingArguments):
    output_dir: str = field(default="benchmarks/results/sweep_heads")
    per_device_train_batch_size: int = field(default=8)
    per_device_eval_batch_size: int = field(default=8)
    lr_scheduler_type: SchedulerType | str = field(default="constant_with_warmup")
    warmup_steps: float = field(default=5)
    logging_steps: float = field(default=10)
    save_strategy: SaveStrategy | str = field(default="no")
    report_to: None | str | list[str] = field(default="none")
    seed: int = field(default=0)
    dataloader_pin_memory: bool = field(default_factory=torch.cuda.is_available)


def parse_arguments(argv: list[str] | None = None) -> tuple[SweepArguments, SweepTrainingArguments]:
    """``CONFIG.yaml [--option value ...]``: the YAML's options, each ``--option value`` (read as YAML: numbers,
    lists) on top; or the options alone on the command line (no head list then but an empty one)."""
    parser = HfArgumentParser((SweepArguments, SweepTrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0].endswith((".yaml", ".yml")):
        options = yaml.safe_load(Path(argv[0]).resolve().read_text()) or {}
        overrides = argv[1:]
        if len(overrides) % 2 or not all(name.startswith("--") for name in overrides[::2]):
            raise BackattnValueError(f"After {argv[0]}, give options as --name value pairs, got {overrides}.")
        options.update({name[2:]: yaml.safe_load(value) for name, value in zip(overrides[::2], overrides[1::2])})
        return parser.parse_dict(options, allow_extra_keys=False)
    return parser.parse_args_into_dataclasses(args=argv)


def cached_features(base, examples, dtype: str, batch_size: int, directories: list[Path]) -> FeatureCache:
    """The frozen base's features for ``examples``: a cache already built in one of ``directories`` (searched in
    order) if one holds them, else the cache of this plain base in the last directory (built there if needed).

    A cache elsewhere may have been keyed from a model carrying heads or adapters (its key hashes the whole
    model), so it is recognised by its contents: the same dtype, no stored blocks, the same length for every
    example, and, for three examples spread over the data, rows equal to the base's final hidden states for these
    token ids (to the storage dtype's rounding)."""
    ids = examples["input_ids"]
    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    key = hashlib.sha256(f"{base_fingerprint(plain)}:{data_fingerprint(ids)}:{dtype}".encode()).hexdigest()[:24]
    lengths = np.array([0, *np.cumsum([len(row) for row in ids])])
    for directory in directories:
        for meta in sorted((directory / "features").glob("*/meta.json")):
            found = FeatureCache(meta.parent)
            if meta.parent.name == key or _holds(found, plain, ids, dtype, lengths):
                del plain
                return found
    cache = FeatureCache.build_or_load(plain, ids, directories[-1], dtype, batch_size)
    del plain
    return cache


def _holds(cache: FeatureCache, plain, ids, dtype: str, offsets) -> bool:
    if cache.meta.get("dtype") != dtype or cache.layers or not np.array_equal(cache.offsets, offsets):
        return False
    if cache.meta.get("attention_rebalancing") is not None:  # another base's states, whatever rows match
        return False
    tolerance = 1e-2 if dtype == "float16" else 1e-5
    with torch.no_grad():
        for index in sorted({0, len(ids) // 2, len(ids) - 1}):
            states = plain.base_model(input_ids=torch.tensor([ids[index]])).last_hidden_state[0]
            if not torch.allclose(cache[index].float(), states, rtol=tolerance, atol=tolerance):
                return False
    return True


def load_protocol(options) -> tuple:
    """Tokenized training and validation examples of the protocol, their cached features, and the tokenizer."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from compare_heads import load_rows

    base = options.model_name_or_path or str(smollm2_path())
    tokenizer = sft_tokenizer(base)
    train_rows, eval_rows = load_rows(options)
    train, _ = tokenize_examples(train_rows, tokenizer, PromptTemplate(), options.max_length)
    held, _ = tokenize_examples(eval_rows, tokenizer, PromptTemplate(), options.max_length)
    train = train.remove_columns(["prompt", "expected_answer"])
    if options.max_train_problems is not None:
        train = train.select(range(min(options.max_train_problems, len(train))))
    if options.max_eval_problems is not None:
        held = held.select(range(min(options.max_eval_problems, len(held))))
    work = ROOT / options.work_dir
    search = [ROOT / d for d in options.feature_cache_dirs] + [work / "features"]
    train_features = cached_features(base, train, "float16", 8, search)
    eval_features = cached_features(base, held, "float32", 8, [work / "held_out_states"])
    return base, tokenizer, CachedFeaturesDataset(train, train_features), CachedFeaturesDataset(held, eval_features)


def frozen_base_ce(base: str, dataset, collator, batch_size: int) -> float:
    """The frozen base's target CE on the validation data (from the same cached features)."""
    from transformers import AutoConfig

    from backattn import family_for

    model = family_for(AutoConfig.from_pretrained(base).model_type).from_pretrained(base).eval()
    total = tokens = 0.0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            logits = model(base_hidden_states=batch["base_hidden_states"]).logits[:, :-1].float()
            labels = batch["labels"][:, 1:]
            total += float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="sum"))
            tokens += int((labels != -100).sum())
    return total / tokens


def main(argv: list[str] | None = None) -> dict:
    options, training = parse_arguments(argv)
    specs = check_sweep_heads(options.heads)  # bad head lists fail before anything loads
    if training.max_steps <= 0 and training.num_train_epochs <= 0:
        raise BackattnValueError("Nothing to train: set max_steps (or num_train_epochs) above 0.")
    logging.set_verbosity_error()
    set_seed(training.seed)
    base, tokenizer, train, held = load_protocol(options)
    print(f"{len(train)} training problems ({options.train_templates}), {len(held)} validation "
          f"({options.eval_templates}); {len(specs)} heads", file=sys.stderr)  # fmt: skip
    sweep = HeadSweep.from_pretrained(base, specs)
    collator = SFTCollator(tokenizer)
    output = ROOT / training.output_dir
    training.output_dir = str(ROOT / options.work_dir / "run")
    trainer = SweepTrainer(model=sweep, args=training, train_dataset=train, data_collator=collator)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    scores = sweep.target_cross_entropy(held, collator, training.per_device_eval_batch_size)
    base_ce = frozen_base_ce(base, held, collator, training.per_device_eval_batch_size)
    rates = sweep.learning_rates(training.learning_rate)
    metrics = {
        name: {"target_ce": s["target_ce"], "minus_base": s["target_ce"] - base_ce} for name, s in scores.items()
    }
    sweep.save_heads(output / "heads", metrics=metrics, task="math word problems",
                     training_data=f"GSM-Symbolic templates {options.train_templates}")  # fmt: skip
    results = {
        "options": asdict(options), "steps": trainer.state.global_step, "train_seconds": seconds,
        "threads": torch.get_num_threads(), "frozen_base_target_ce": base_ce,
        "validation_tokens": next(iter(scores.values()))["target_tokens"],
        "heads": {name: {"config": asdict(sweep.specs[name]), "learning_rate": rates[name],
                         "parameters": sum(p.numel() for p in sweep.heads[name].parameters()), **metrics[name]}
                  for name in sweep.head_names},
    }  # fmt: skip
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = [f"Validation target CE (templates {options.eval_templates}, {len(held)} problems) after "
             f"{results['steps']} steps of batch {training.per_device_train_batch_size}, all heads in one pass "
             f"({seconds:.0f} s on {results['threads']} thread(s)); frozen base {base_ce:.4f}.\n",
             "| head | params | learning rate | target CE | minus base |",
             "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for name, row in sorted(results["heads"].items(), key=lambda item: item[1]["target_ce"]):
        lines.append(f"| {name} | {row['parameters']:,} | {row['learning_rate']:g} | {row['target_ce']:.4f} | "
                     f"{row['minus_base']:+.4f} |")  # fmt: skip
    (output / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
