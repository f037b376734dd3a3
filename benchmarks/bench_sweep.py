"""What a sweep of N heads in one pass costs, against N separate runs, from the same cached SmolLM2 features.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python benchmarks/bench_sweep.py

The frozen base is the offline SmolLM2-135M-Instruct (vocabulary 49,152); the batches are the comparison's
validation-stage training problems (GSM-Symbolic templates 0-63, batch 8) from their feature cache, which is
built once and not timed (``benchmarks/sweep_heads.py``'s ``cached_features`` reads the comparison's cache if
it exists). Each run is a whole ``Trainer`` run of ``--steps`` timed steps after 2 untimed ones; a step's time
is the median interval between optimiser steps (data loading, forward, backward, clipping and the optimiser
included), as ``benchmarks/compare_heads.py`` times steps. Measured in each round, in a rotating order:

* the ordinary single-head run (``HeadTrainer``, the ``hidden`` preset): the unit, a "single-head pass";
* ``SweepTrainer`` over ``N`` = 1, 4, 8 ``hidden`` heads at different learning rates (a learning-rate sweep).

N separate runs cost N single-head passes (the heads have one shape, so each separate run is the unit). The
issue's target for one pass over N heads is at most ``1 + 0.25 N`` single-head passes. A second measurement
splits one batch's forward and backward into what the heads share (the base logits ``h W^T`` and their softmax,
chunk by chunk) and what each head adds, from ``torch.utils.benchmark`` medians on one batch with 1 and 8 heads.
One thread (``torch.set_num_threads(1)``): the machine is shared, so every ratio is taken within this run,
and on the process's CPU time (``time.process_time``; with one thread, the work the step did, which waiting
for a busy core does not inflate as it inflates wall time); wall times are recorded beside them. The one-batch
split is timed in CPU seconds too (median of 3 after one untimed call). Writes ``benchmarks/results/sweep.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, TrainerCallback, TrainingArguments
from transformers.utils import logging

from backattn import family_for
from backattn.data.sft_data import SFTCollator
from backattn.sweep import HeadSweep, SweepHead, SweepTrainer, base_logits
from backattn.trainer import HeadTrainer

ROOT = Path(__file__).resolve().parents[1]
RATES = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1]


class StepClock(TrainerCallback):
    """The wall clock and this process's CPU time at the end of every optimiser step."""

    def __init__(self):
        self.ends: list[tuple[float, float]] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append((time.perf_counter(), time.process_time()))


def step_seconds(make_trainer, steps: int) -> dict[str, float]:
    """Median wall and CPU seconds between optimiser steps of a fresh run, over ``steps`` steps after 2 untimed."""
    clock = StepClock()
    trainer = make_trainer(steps + 3, clock)
    trainer.train()
    pairs = list(zip(clock.ends[2:], clock.ends[3:]))
    return {kind: statistics.median(b[i] - a[i] for a, b in pairs) for i, kind in enumerate(("wall", "cpu"))}


def cpu_seconds(function, calls: int) -> float:
    """Median CPU seconds of ``function()`` over ``calls`` calls, after one untimed call."""
    function()
    times = []
    for _ in range(calls):
        start = time.process_time()
        function()
        times.append(time.process_time() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run (after 2 untimed)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of every run, in rotating order")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 8], help="heads per sweep")
    parser.add_argument("--output", default="benchmarks/results/sweep.json")
    parser.add_argument(
        "--profile_only", action="store_true", help="only profile what one more head adds (into --output's JSON)"
    )
    options = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.set_verbosity_error()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from sweep_heads import SweepArguments, load_protocol

    if options.profile_only:
        return profile_extra_head(ROOT / options.output, load_protocol(SweepArguments(max_eval_problems=8)))

    started = time.perf_counter()
    protocol = SweepArguments(max_eval_problems=8)
    base, tokenizer, train, _ = load_protocol(protocol)
    print(f"features ready ({len(train)} problems) in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    collator = SFTCollator(tokenizer)
    model_class = family_for(AutoConfig.from_pretrained(base).model_type)

    def arguments(directory: str, max_steps: int) -> TrainingArguments:
        return TrainingArguments(
            output_dir=directory, per_device_train_batch_size=8, max_steps=max_steps, learning_rate=3e-3,
            lr_scheduler_type="constant_with_warmup", warmup_steps=5, logging_steps=10_000, save_strategy="no",
            report_to="none", seed=0, disable_tqdm=True, dataloader_pin_memory=False,
        )  # fmt: skip

    def single(max_steps: int, clock):
        model = model_class.from_pretrained(base, head_config="hidden")
        return HeadTrainer(model=model, args=arguments("outputs/bench_sweep/single", max_steps), train_dataset=train,
                           data_collator=collator, callbacks=[clock])  # fmt: skip

    def sweep_of(size: int):
        def make(max_steps: int, clock):
            heads = [SweepHead(f"hidden-{k}", "hidden", learning_rate=RATES[k]) for k in range(size)]
            sweep = HeadSweep.from_pretrained(base, heads)
            return SweepTrainer(model=sweep, args=arguments(f"outputs/bench_sweep/sweep{size}", max_steps),
                                train_dataset=train, data_collator=collator, callbacks=[clock])  # fmt: skip

        return make

    runs = {"single-head run (HeadTrainer)": single, **{f"sweep of {n}": sweep_of(n) for n in options.sizes}}
    seconds: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in runs}
    names = list(runs)
    for round_index in range(options.rounds):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            measured = step_seconds(runs[name], options.steps)
            for kind, value in measured.items():
                seconds[name][kind].append(value)
            print(f"round {round_index + 1}: {name}: {measured['cpu']:.3f} CPU s, {measured['wall']:.3f} wall s a "
                  f"step (load {os.getloadavg()[0]:.1f})", file=sys.stderr)  # fmt: skip
    unit = {kind: statistics.median(seconds[names[0]][kind]) for kind in ("cpu", "wall")}
    rows = {}
    for n in options.sizes:
        measured = seconds[f"sweep of {n}"]
        step = {kind: statistics.median(measured[kind]) for kind in ("cpu", "wall")}
        passes = step["cpu"] / unit["cpu"]
        rows[str(n)] = {
            "step_cpu_seconds": step["cpu"], "step_wall_seconds": step["wall"], "per_round": measured,
            "one_pass_in_single_head_passes": passes,
            "one_pass_in_single_head_passes_wall": step["wall"] / unit["wall"],
            "separate_runs_in_single_head_passes": float(n), "target_in_single_head_passes": 1 + 0.25 * n,
            "per_extra_head": (passes - 1) / max(n - 1, 1),
        }  # fmt: skip

    # What one batch's forward + backward spends on the shared part and on each head.
    batch = collator([train[i] for i in range(8)])
    largest = max(options.sizes)
    breakdown = {}
    for n in (1, largest):
        sweep = HeadSweep.from_pretrained(base, [SweepHead(f"h{k}", "hidden") for k in range(n)]).train()

        def step(sweep=sweep):
            sweep.zero_grad(set_to_none=True)
            sweep(**batch).loss.backward()

        breakdown[n] = cpu_seconds(step, calls=3)
    model = sweep.model
    hidden = batch["base_hidden_states"].to(model.lm_head.weight.dtype)
    positions = hidden[:, :-1][batch["labels"][:, 1:] != -100]
    chunk, weight = model.config.loss_chunk_size, model.lm_head.weight

    def shared_part():
        for start in range(0, positions.shape[0], chunk):
            logits = base_logits(positions[start : start + chunk], weight)
            torch.softmax(logits * torch.rsqrt(logits.pow(2).mean(-1, keepdim=True) + 1e-6), -1)

    with torch.no_grad():
        shared = cpu_seconds(shared_part, calls=3)
    per_head = (breakdown[largest] - breakdown[1]) / (largest - 1)
    results = {
        "threads": torch.get_num_threads(), "steps_timed_per_run": options.steps, "rounds": options.rounds,
        "batch_size": 8, "vocab_size": model.config.vocab_size, "hidden_size": model.config.hidden_size,
        "labelled_positions_in_breakdown_batch": int(positions.shape[0]), "loss_chunk_size": chunk,
        "single_head_step_cpu_seconds": unit["cpu"], "single_head_step_wall_seconds": unit["wall"],
        "single_head_per_round": seconds[names[0]],
        "sweeps": rows,
        "one_batch_cpu_seconds": {"forward_backward": {str(k): v for k, v in breakdown.items()},
                                  "shared_base_logits_and_softmax": shared, "per_extra_head": per_head},
        "load_average": os.getloadavg(),
    }  # fmt: skip
    path = ROOT / options.output
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(markdown(results))
    return results


def profile_extra_head(path: Path, protocol) -> dict:
    """``torch.profiler`` self CPU time by operator of one batch's forward + backward with 2 heads minus with 1
    head: what one more head of a sweep costs, operator by operator (merged into the JSON at ``path``)."""
    base, tokenizer, train, _ = protocol
    batch = SFTCollator(tokenizer)([train[i] for i in range(8)])
    by_operator = {}
    for n in (1, 2):
        sweep = HeadSweep.from_pretrained(base, [SweepHead(f"h{k}", "hidden") for k in range(n)]).train()
        sweep(**batch).loss.backward()  # untimed: first-call allocations
        sweep.zero_grad(set_to_none=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            sweep(**batch).loss.backward()
        by_operator[n] = {e.key: e.self_cpu_time_total / 1e6 for e in profile.key_averages()}
    extra = {op: by_operator[2].get(op, 0.0) - by_operator[1].get(op, 0.0) for op in by_operator[2]}
    top = dict(sorted(extra.items(), key=lambda item: -item[1])[:10])
    results = json.loads(path.read_text()) if path.is_file() else {}
    results["extra_head_profile"] = {
        "self_cpu_seconds_by_operator": {op: round(seconds, 4) for op, seconds in top.items()},
        "extra_head_self_cpu_seconds": sum(extra.values()),
        "one_head_self_cpu_seconds": sum(by_operator[1].values()),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results["extra_head_profile"], indent=1))
    return results


def markdown(results: dict) -> str:
    lines = [
        f"Single-head step (HeadTrainer, batch 8, SmolLM2 cached features, {results['threads']} thread): "
        f"{results['single_head_step_cpu_seconds']:.3f} CPU s "
        f"({results['single_head_step_wall_seconds']:.3f} wall s).\n",
        "| heads N | one pass: CPU s a step | one pass, single-head passes (CPU; wall) | N separate runs | "
        "target 1 + 0.25 N |",
        "| --- | --- | --- | --- | --- |",
    ]
    for n, row in results["sweeps"].items():
        lines.append(
            f"| {n} | {row['step_cpu_seconds']:.3f} | {row['one_pass_in_single_head_passes']:.2f}; "
            f"{row['one_pass_in_single_head_passes_wall']:.2f} | {n} | {row['target_in_single_head_passes']:.2f} |"
        )
    one = results["one_batch_cpu_seconds"]
    lines.append(
        f"\nOne batch ({results['labelled_positions_in_breakdown_batch']} labelled positions), forward + backward, "
        "CPU s: "
        + ", ".join(f"{k} head(s) {v:.3f}" for k, v in one["forward_backward"].items())
        + f"; of which shared (base logits and softmax) {one['shared_base_logits_and_softmax']:.3f}; "
        f"each further head {one['per_extra_head']:.3f}."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
