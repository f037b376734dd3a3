"""Is the head cheap next to the base and LoRA? Training step time, peak memory and generation speed.

    .venv/bin/python benchmarks/bench_efficiency.py                       # SmolLM2 and a GPT-2-small-sized model
    .venv/bin/python benchmarks/bench_efficiency.py --models smollm2 --batch_size 4 --seq_len 128   # a quick look

For each model, on one fixed batch (``--batch_size`` rows of ``--seq_len`` tokens, the last 60 % of each
row labelled, as the target of an SFT example):

* a training step (forward, backward, AdamW step) of the head (``--preset``) with the straightforward loss
  (full logits) and with the chunked loss (:mod:`backattn.head_loss`), each running the base and from
  cached base features; of LoRA (PEFT) on attention at the head's parameter budget; and the frozen base's
  forward alone (no gradients), the reference for memory;
* its time: the median of ``--steps`` steps timed by ``torch.utils.benchmark.Timer`` (see
  ``benchmarks/measure.py``; the Timer's untimed first call is the warm-up: first-call kernels, optimiser
  state);
* peak memory of each: the process's peak resident set during one more step after the timed ones (each
  variant runs in a fresh process; before that step glibc is told to return every freed block of 64 KiB
  or more to the system, so the peak follows live tensors), and the part of it the step adds on top of
  the loaded model (``measure.PeakMemory``);
* greedy ``generate`` tokens per second (batch 1, KV cache): the plain base model, the head in full mode
  and in top-k re-ranking mode (``--top_k``), each the median of ``--repeats`` calls, modes interleaved.

Ratios are against figures measured in the same run. ``gpt2-small`` is GPT-2 small's configuration
(vocabulary 50257, 12 layers, width 768) with random weights, so nothing needs downloading.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import torch
from measure import PeakMemory, median_seconds

MODELS = ("smollm2", "gpt2-small")
TRAINING_VARIANTS = (
    "frozen base forward",
    "head, full logits",
    "head, chunked loss",
    "head, full logits, cached features",
    "head, chunked loss, cached features",
    "LoRA on attention",
)


def arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--preset", default="hidden")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed training steps (after the Timer's untimed warm-up)")
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--top_k", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3, help="generate runs per mode (the median is kept)")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests: small random models
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------------------
# models


def base_config(name: str, tiny: bool):
    from transformers import AutoConfig, GPT2Config, LlamaConfig

    if tiny:
        if name == "gpt2-small":
            return GPT2Config(vocab_size=1000, n_embd=32, n_layer=2, n_head=2, n_positions=128)
        return LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)  # fmt: skip
    if name == "gpt2-small":
        return GPT2Config()  # GPT-2 small: vocabulary 50257, 12 layers, width 768
    from backattn.offline import smollm2_path

    return AutoConfig.from_pretrained(smollm2_path())


def load(name: str, tiny: bool, head: str | None):
    """The plain base (``head=None``) or the backattn family with a fresh head of that preset, in eval mode.

    SmolLM2 loads its real weights; the others get random weights from a fixed seed.
    """
    from transformers import AutoModelForCausalLM

    from backattn import family_for
    from backattn.offline import smollm2_path

    torch.manual_seed(0)
    config = base_config(name, tiny)
    family = family_for(config.model_type)
    if name == "smollm2" and not tiny:
        model = (
            family.from_pretrained(smollm2_path(), head_config=head)
            if head
            else AutoModelForCausalLM.from_pretrained(smollm2_path())
        )
    else:
        model = family(config, head_config=head) if head else AutoModelForCausalLM.from_config(config)
    return model.eval()


def fixed_batch(vocab_size: int, batch_size: int, seq_len: int):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
    labels = ids.clone()
    labels[:, : int(0.4 * seq_len)] = -100
    return ids, labels


# --------------------------------------------------------------------------------------------------------
# one measurement, in its own process


def measure_training(model_name: str, variant: str, options) -> dict:
    from backattn.baselines import lora_on_attention, trainable_parameters

    head_model = load(model_name, options.tiny, options.preset)
    ids, labels = fixed_batch(head_model.config.vocab_size, options.batch_size, options.seq_len)
    if variant == "frozen base forward":
        model = load(model_name, options.tiny, None)
        del head_model

        def step():
            with torch.no_grad():
                model(ids)

    else:
        if variant == "LoRA on attention":
            model = lora_on_attention(load(model_name, options.tiny, None), trainable_parameters(head_model)).train()
            del head_model
            inputs = {"input_ids": ids, "labels": labels}
        else:
            model = head_model.train()
            model.config.loss_chunk_size = None if "full logits" in variant else model.config.loss_chunk_size
            inputs = {"input_ids": ids, "labels": labels}
            if "cached features" in variant:
                with torch.no_grad():  # as backattn.feature_cache stores them: float16
                    features = model.base_model(ids).last_hidden_state.to(torch.float16)
                inputs["base_hidden_states"] = features
        optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

        def step():
            model(**inputs).loss.backward()
            optimiser.step()
            optimiser.zero_grad(set_to_none=True)

    # Timed with the allocator's default settings; the Timer's first, untimed call is the warm-up (first-call
    # kernels, optimiser state).
    seconds = median_seconds(step, calls=options.steps).median
    with PeakMemory() as memory:
        step()
    return {"seconds": seconds, "peak_mib": memory.peak_mib, "step_mib": memory.added_mib,
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}  # fmt: skip


def measure_generation(model_name: str, options) -> dict:
    plain = load(model_name, options.tiny, None)
    head = load(model_name, options.tiny, options.preset)
    with torch.no_grad():  # an open gate, so the head really changes the logits
        for module in head.heads.modules():
            if getattr(module, "gate", None) is not None:
                module.gate.fill_(1.0)
    prompt = fixed_batch(plain.config.vocab_size, 1, 32)[0]
    settings = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=options.new_tokens,
                    min_new_tokens=options.new_tokens, do_sample=False, pad_token_id=0)  # fmt: skip
    modes = {
        "plain base": (plain, {}),
        "head, full": (head, {}),
        f"head, top-{options.top_k}": (head, {"rerank_top_k": options.top_k}),
    }
    times = {mode: [] for mode in modes}
    with torch.no_grad():
        # Modes interleaved, so drifts in machine load hit all alike: one timed call of each mode per round, each
        # right after the Timer's untimed warm-up call of the same mode.
        for _ in range(options.repeats):
            for mode, (model, extra) in modes.items():
                call = median_seconds(lambda: model.generate(prompt, **settings, **extra))
                times[mode].extend(call.times)
    return {mode: options.new_tokens / statistics.median(seconds) for mode, seconds in times.items()}


def in_subprocess(task: dict, argv: list[str]) -> dict:
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    command = [sys.executable, os.path.abspath(__file__), *argv, "--worker", json.dumps(task)]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"Benchmark worker {task} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------------
# report


def report(model_name: str, training: dict, generation: dict, options) -> str:
    base = training["frozen base forward"]
    lora = training["LoRA on attention"]
    lines = [
        f"### {model_name}: batch {options.batch_size} x {options.seq_len} tokens, head preset `{options.preset}`",
        "",
        "| training step | trainable params | seconds | vs LoRA (speed-up) | peak MiB | peak vs base forward | "
        "added MiB | added vs base forward |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for variant, r in training.items():
        frozen = variant == "frozen base forward"
        speedup = "" if frozen else f"{lora['seconds'] / r['seconds']:.2f}x"
        parameters = "—" if frozen else f"{r['trainable_parameters']:,}"
        lines.append(
            f"| {variant} | {parameters} | {r['seconds']:.3f} | {speedup} | {r['peak_mib']:.0f} | "
            f"{r['peak_mib'] / base['peak_mib']:.2f}x | {r['step_mib']:.0f} | {r['step_mib'] / base['step_mib']:.2f}x |"
        )
    plain = generation["plain base"]
    lines += ["", "| greedy generate | tokens/s | vs plain base |", "| --- | --- | --- |"]
    lines += [f"| {mode} | {speed:.1f} | {speed / plain:.2f}x |" for mode, speed in generation.items()]
    return "\n".join(lines)


def main(argv=None) -> dict:
    options = arguments(argv)
    if options.worker:
        task = json.loads(options.worker)
        if task["kind"] == "training":
            result = measure_training(task["model"], task["variant"], options)
        else:
            result = measure_generation(task["model"], options)
        print(json.dumps(result))
        return result

    passthrough = [a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("--worker")]
    results, sections = {}, []
    for model_name in options.models:
        training = {}
        for variant in TRAINING_VARIANTS:
            training[variant] = in_subprocess(
                {"kind": "training", "model": model_name, "variant": variant}, passthrough
            )
            print(f"{model_name} | {variant}: {json.dumps(training[variant])}", flush=True)
        generation = in_subprocess({"kind": "generation", "model": model_name}, passthrough)
        print(f"{model_name} | generate: {json.dumps(generation)}", flush=True)
        results[model_name] = {"training": training, "generation": generation}
        sections.append(report(model_name, training, generation, options))
    print("\n\n".join(sections))
    return results


if __name__ == "__main__":
    main()
