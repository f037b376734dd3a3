"""The cost of seed 002's attention re-balancing on the real SmolLM2: forward and generate tokens/s against the base.

    .venv/bin/python benchmarks/bench_rebalancing.py [--forward_tokens 256] [--prompt_tokens 64] [--new_tokens 32]

One model, one thread, one run: the base with SDPA (Transformers' default), the base with eager attention, and
the re-balanced base (``alpha`` 0.2, threshold 0.01: eager attention plus the layer-0 mask and the boost), each
timed by ``torch.utils.benchmark`` (``measure.median_seconds``, wall clock) and by the process's CPU seconds
(``time.process_time``, which other processes on a shared machine disturb less) in interleaved rounds, so
every ratio compares figures taken side by side. Forward: one sequence of ``--forward_tokens`` random ids, no
cache. Generate: greedy, ``--new_tokens`` new tokens after a ``--prompt_tokens`` prompt with the KV cache (the
prompt's forward included), tokens/s counting the new tokens. Prints two Markdown tables (wall clock, CPU)
and, with ``--output``, writes the figures as JSON.
This measures the cost only; whether re-balancing helps is a separate question (issue 18, item 3).
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from measure import counted, median_seconds
from transformers.utils import logging

from backattn import LlamaBackwardAttentionForCausalLM
from backattn.attention_rebalancing import disable_attention_rebalancing, enable_attention_rebalancing
from backattn.offline import smollm2_path
from backattn.run_files import write_text_atomically

SETTINGS = ("base, SDPA", "base, eager", "re-balanced (alpha 0.2)")


def use(model, setting: str) -> None:
    if setting == "re-balanced (alpha 0.2)":
        enable_attention_rebalancing(model, alpha=0.2, threshold=0.01)
    else:
        disable_attention_rebalancing(model, "sdpa" if setting == "base, SDPA" else "eager")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forward_tokens", type=int, default=256)
    parser.add_argument("--prompt_tokens", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each times every setting")
    parser.add_argument("--output", type=Path, default=None, help="write the figures here as JSON")
    options = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.set_verbosity_error()

    model = LlamaBackwardAttentionForCausalLM.from_pretrained(smollm2_path()).eval()
    generator = torch.Generator().manual_seed(0)
    forward_ids = torch.randint(0, model.config.vocab_size, (1, options.forward_tokens), generator=generator)
    prompt = torch.randint(0, model.config.vocab_size, (1, options.prompt_tokens), generator=generator)
    new = options.new_tokens
    generate_options = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, use_cache=True)

    def forward():
        with torch.no_grad():
            model(forward_ids, use_cache=False)

    def generate():
        model.generate(prompt, attention_mask=torch.ones_like(prompt), **generate_options)

    clocks = ("wall", "cpu")
    seconds = {clock: {setting: {"forward": [], "generate": []} for setting in SETTINGS} for clock in clocks}
    counts = {}
    for _ in range(options.rounds):
        for setting in SETTINGS:
            use(model, setting)
            for task, function in (("forward", forward), ("generate", generate)):
                measurement = median_seconds(function, calls=3)
                seconds["wall"][setting][task].append(measurement.median)
                counts[setting, task] = counted(measurement)
                seconds["cpu"][setting][task].append(cpu_seconds(function))
    use(model, "base, SDPA")

    tokens = {"forward": options.forward_tokens, "generate": new}
    rate = {
        clock: {s: {t: tokens[t] / statistics.median(seconds[clock][s][t]) for t in tokens} for s in SETTINGS}
        for clock in clocks
    }
    print(
        f"SmolLM2-135M-Instruct, float32, 1 thread, {platform.processor() or platform.machine()}; forward: 1 x "
        f"{options.forward_tokens} tokens, no cache; generate: {new} greedy tokens after a {options.prompt_tokens}-"
        f"token prompt, KV cache; medians over {options.rounds} interleaved rounds (wall clock: each a "
        f"{counts[SETTINGS[0], 'forward']} by torch.utils.benchmark; CPU: the process's CPU seconds, median of 3 "
        "calls, which other processes on a shared machine disturb less)\n"
    )
    for clock, title in (("wall", "tokens/s"), ("cpu", "tokens per CPU second")):
        print(f"| setting | forward {title} | vs SDPA | vs eager | generate {title} | vs SDPA | vs eager |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for setting in SETTINGS:
            cells = []
            for task in ("forward", "generate"):
                value = rate[clock][setting][task]
                sdpa, eager = value / rate[clock]["base, SDPA"][task], value / rate[clock]["base, eager"][task]
                cells += [f"{value:.0f}" if task == "forward" else f"{value:.1f}", f"{sdpa:.2f}x", f"{eager:.2f}x"]
            print(f"| {setting} | " + " | ".join(cells) + " |")
        print()
    if options.output is not None:
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(options).items()}
        figures = {"options": settings, "seconds": seconds, "tokens_per_s": rate}
        write_text_atomically(options.output, json.dumps(figures, indent=2) + "\n")


def cpu_seconds(function, calls: int = 3) -> float:
    """The median CPU seconds of ``calls`` calls of ``function`` (``time.process_time``: this process alone)."""
    times = []
    for _ in range(calls):
        start = time.process_time()
        function()
        times.append(time.process_time() - start)
    return statistics.median(times)


if __name__ == "__main__":
    main()
