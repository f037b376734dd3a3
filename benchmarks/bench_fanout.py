"""Fan-out: scoring one batch under 1, 2, 4 and 8 heads from one base forward, against the ways LoRA does it.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python benchmarks/bench_fanout.py

On the real offline SmolLM2-135M-Instruct, one batch (8 rows x 128 tokens, every next token labelled), scored
as each head's logits and its cross-entropy on the labels. For ``n`` heads (preset ``hidden``, random weights,
gate open) or ``n`` LoRA adapters of about the same parameter count (``backattn.baselines.attention_lora_config``
at the head's count; ``B`` random, so the adapters really change the base):

* ``fan-out``: ``model(ids, labels=ids, fan_out=[n heads])``, one base forward;
* ``one forward per head``: ``set_head(name)`` and ``model(ids, labels=ids)`` for each head;
* ``LoRA, one forward per adapter``: PEFT's ``set_adapter(name)`` and a forward, for each adapter;
* ``LoRA, mixed-adapter batch``: one PEFT forward over the rows repeated ``n`` times, ``adapter_names=`` giving
  each copy its adapter (PEFT's way of serving several adapters in one batch);
* ``base alone``: the plain ``LlamaForCausalLM`` (no head, no adapter), the floor every method pays.

Each call is timed once per round by a wall clock (seconds are what a user waits for; a call takes seconds),
the methods and sizes interleaved within a round so that a change in the machine's load hits them alike; the
figures are medians over the rounds, and every ratio is to a cost measured in the same run: to one head's
plain forward (``one forward per head`` at ``n = 1``), and to the method's own ``n = 1``. Writes
``benchmarks/results/fanout.json`` and prints a Markdown table for BENCHMARKS.md. ``--tiny`` runs the same
on a small random Llama (the smoke test).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging

from backattn import LlamaBackwardAttentionForCausalLM
from backattn.baselines import attention_lora_config

ROOT = Path(__file__).resolve().parents[1]
METHODS = (
    "base alone",
    "fan-out",
    "one forward per head",
    "LoRA, one forward per adapter",
    "LoRA, mixed-adapter batch",
)


def arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8], help="numbers of heads / adapters")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (the median is reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    parser.add_argument("--preset", default="hidden")
    parser.add_argument(
        "--scoring", choices=["loss", "logits"], default="loss",
        help="loss: each head's logits and cross-entropy on the labels; logits: the logits alone",
    )  # fmt: skip
    parser.add_argument("--tiny", action="store_true", help="a small random Llama instead of SmolLM2 (smoke test)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "fanout.json")
    return parser.parse_args(argv)


def base_directory(options: argparse.Namespace, scratch: Path) -> Path:
    if not options.tiny:
        from backattn.offline import smollm2_path

        return smollm2_path()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=True,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(scratch)
    return scratch


def build(base_dir: Path, options: argparse.Namespace):
    """The head model carrying ``max(sizes)`` heads, the PEFT model carrying as many adapters, the plain base."""
    count, generator = max(options.sizes), torch.Generator().manual_seed(0)
    heads = LlamaBackwardAttentionForCausalLM.from_pretrained(base_dir).eval()
    for index in range(count):
        heads.add_head(options.preset, head_name=f"head{index}")
        with torch.no_grad():
            for parameter in heads.heads[f"head{index}"].parameters():  # trained-looking: every term nonzero
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
    head_parameters = sum(p.numel() for p in heads.heads["head0"].parameters())

    plain = LlamaForCausalLM.from_pretrained(base_dir).eval()
    lora_base = LlamaForCausalLM.from_pretrained(base_dir).eval()
    lora_config = attention_lora_config(lora_base, head_parameters)
    lora = get_peft_model(lora_base, lora_config, adapter_name="adapter0")
    for index in range(1, count):
        lora.add_adapter(f"adapter{index}", lora_config)
    with torch.no_grad():
        for name, parameter in lora.named_parameters():
            if "lora_B" in name:  # B = 0 at init would leave every adapter equal to the base
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    lora.eval()
    lora_parameters = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n and ".adapter0." in n)
    sizes = {"head_parameters": head_parameters, "lora_parameters": lora_parameters, "lora_rank": lora_config.r,
             "lora_targets": sorted(lora_config.target_modules),
             "lora_layers": len(lora_config.layers_to_transform or [])}  # fmt: skip
    return heads, lora, plain, sizes


def methods(heads, lora, plain, ids: torch.Tensor, with_labels: bool = True):
    """Method name -> a function of ``n`` that scores the batch under ``n`` heads (or adapters)."""
    rows = ids.shape[0]
    labels = ids if with_labels else None

    def base_alone(n):
        return plain(ids, labels=labels)

    def fan_out(n):
        return heads(ids, labels=labels, fan_out=[f"head{i}" for i in range(n)])

    def per_head(n):
        losses = []
        for index in range(n):
            heads.set_head(f"head{index}")
            losses.append(heads(ids, labels=labels))
        return losses

    def per_adapter(n):
        losses = []
        for index in range(n):
            lora.set_adapter(f"adapter{index}")
            losses.append(lora(input_ids=ids, labels=labels))
        return losses

    def mixed_adapters(n):
        names = [f"adapter{index}" for index in range(n) for _ in range(rows)]
        repeated = ids.repeat(n, 1)
        return lora(input_ids=repeated, labels=repeated if with_labels else None, adapter_names=names)

    return dict(zip(METHODS, (base_alone, fan_out, per_head, per_adapter, mixed_adapters)))


def measure(functions: dict, options: argparse.Namespace) -> dict:
    """Method -> n -> the seconds of each round (the base once per round: it does not depend on n)."""
    times = {method: {n: [] for n in options.sizes} for method in functions}
    with torch.no_grad():
        for method, function in functions.items():  # warm-up: allocations; fan-out computes every head's tables
            function(max(options.sizes) if method == "fan-out" else options.sizes[0])
        for _ in range(options.rounds):
            for n in options.sizes:
                for method, function in functions.items():
                    if method == "base alone" and n != options.sizes[0]:
                        continue
                    gc.collect()
                    start = time.perf_counter()
                    function(n)
                    times[method][n].append(time.perf_counter() - start)
    times["base alone"] = {n: times["base alone"][options.sizes[0]] for n in options.sizes}
    return times


def machine() -> dict:
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        cpu = models[0] if models else cpu
    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "load_average_at_end": os.getloadavg(),
    }  # fmt: skip


def report(results: dict) -> str:
    sizes, medians = results["options"]["sizes"], results["median_seconds"]
    one = medians["one forward per head"][str(sizes[0])]
    lines = [
        f"| method | {' | '.join(f'{n} head(s): s' for n in sizes)} | {' | '.join(f'{n}: x one head' for n in sizes)} "
        f"| {sizes[-1]} vs its own {sizes[0]} |",
        "| --- |" + " --- |" * (2 * len(sizes) + 1),
    ]
    for method in METHODS:
        seconds = [medians[method][str(n)] for n in sizes]
        ratios = [s / one for s in seconds]
        lines.append(
            f"| {method} | {' | '.join(f'{s:.3f}' for s in seconds)} | {' | '.join(f'{r:.2f}x' for r in ratios)} "
            f"| {seconds[-1] / seconds[0]:.2f}x |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    options = arguments(argv)
    torch.set_num_threads(options.threads)
    logging.set_verbosity_error()
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        heads, lora, plain, sizes = build(base_directory(options, Path(scratch)), options)
    ids = torch.randint(
        0, heads.config.vocab_size, (options.rows, options.seq_len), generator=torch.Generator().manual_seed(1)
    )
    times = measure(methods(heads, lora, plain, ids, options.scoring == "loss"), options)
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": "tiny random Llama" if options.tiny else "SmolLM2-135M-Instruct",
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(options).items()},
        "machine": machine(),
        **sizes,
        "seconds": {m: {str(n): t for n, t in by_n.items()} for m, by_n in times.items()},
        "median_seconds": {m: {str(n): statistics.median(t) for n, t in by_n.items()} for m, by_n in times.items()},
    }
    one = results["median_seconds"]["one forward per head"][str(options.sizes[0])]
    results["ratio_to_one_head"] = {
        m: {n: s / one for n, s in by_n.items()} for m, by_n in results["median_seconds"].items()
    }
    options.output.parent.mkdir(parents=True, exist_ok=True)
    options.output.write_text(json.dumps(results, indent=2) + "\n")
    print(
        f"{results['model']}: batch {options.rows} x {options.seq_len}, head preset {options.preset} "
        f"({sizes['head_parameters']:,} parameters), LoRA r={sizes['lora_rank']} on {sizes['lora_targets']} of "
        f"{sizes['lora_layers']} layers ({sizes['lora_parameters']:,} parameters); {options.threads} thread(s), "
        f"median of {options.rounds} rounds; scoring: {options.scoring}\n"
    )
    print(report(results))
    return results


if __name__ == "__main__":
    main()
