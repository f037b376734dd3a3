"""One training epoch of a head on the real SmolLM2, from cached base features vs running the base each step.

    .venv/bin/python benchmarks/bench_feature_cache.py [--examples 48]

Same examples, same batches, same seed, in one run: prints the time to build the cache, the epoch time
with and without it, their ratio, and the largest difference between the two runs' logged losses.

Every time here is one wall-clock run (``measure.WallClock``), not ``torch.utils.benchmark.Timer``: an epoch
trains a fresh model from the same seed and the cache is built once, so neither can be repeated as it is (a
Timer would run each again as its warm-up, and a second build would only load the finished cache).
"""

import argparse
import tempfile

import torch
from measure import WallClock
from transformers import AutoTokenizer, TrainingArguments
from transformers.utils import logging

from backattn import LlamaBackwardAttentionForCausalLM
from backattn.data.feature_cache import CachedFeaturesDataset, FeatureCache
from backattn.data.gsm_symbolic import build_gsm_symbolic
from backattn.data.sft_data import PromptTemplate, SFTCollator, tokenize_examples
from backattn.offline import smollm2_path
from backattn.trainer import HeadTrainer


def epoch(base_dir, tokenizer, dataset, output_dir, batch_size):
    torch.manual_seed(0)
    model = LlamaBackwardAttentionForCausalLM.from_pretrained(base_dir, head_config="hidden")
    args = TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=batch_size, num_train_epochs=1, learning_rate=3e-3,
        logging_steps=1, save_strategy="no", report_to="none", seed=0, disable_tqdm=True, use_cpu=True,
        dataloader_pin_memory=False,
    )  # fmt: skip
    trainer = HeadTrainer(model=model, args=args, train_dataset=dataset, data_collator=SFTCollator(tokenizer))
    with WallClock() as clock:  # one epoch, once (see the module docstring)
        trainer.train()
    return clock.seconds, [e["loss"] for e in trainer.state.log_history if "loss" in e], model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=48)
    parser.add_argument("--batch_size", type=int, default=8)
    options = parser.parse_args(argv)
    logging.set_verbosity_error()

    base_dir = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    rows = build_gsm_symbolic(variants_per_template=2, progress=False)["train"].select(range(options.examples))
    examples, _ = tokenize_examples(rows, tokenizer, PromptTemplate(), 320)
    tokens = sum(len(ids) for ids in examples["input_ids"])

    with tempfile.TemporaryDirectory() as scratch:
        uncached_seconds, uncached_losses, model = epoch(base_dir, tokenizer, examples, scratch, options.batch_size)
        with WallClock() as build:  # built once: a second call would load the finished cache
            cache = FeatureCache.build_or_load(
                model, examples["input_ids"], scratch, "float16", options.batch_size, False
            )
        build_seconds = build.seconds
        cached = CachedFeaturesDataset(examples, cache)
        cached_seconds, cached_losses, _ = epoch(base_dir, tokenizer, cached, scratch, options.batch_size)

    drift = max(abs(a - b) for a, b in zip(uncached_losses, cached_losses))
    print(
        f"{len(examples)} examples, {tokens} tokens, batch {options.batch_size}, SmolLM2-135M-Instruct, "
        "head preset 'hidden'\n"
    )
    print("| | seconds | tokens/s | vs base each step |")
    print("| --- | --- | --- | --- |")
    print(f"| epoch, base run every step | {uncached_seconds:.1f} | {tokens / uncached_seconds:.0f} | 1.00x |")
    print(f"| epoch from the feature cache | {cached_seconds:.1f} | {tokens / cached_seconds:.0f} | "
          f"{uncached_seconds / cached_seconds:.2f}x faster |")  # fmt: skip
    print(f"| building the cache (once) | {build_seconds:.1f} | {tokens / build_seconds:.0f} | |")
    print(f"\nlargest difference between the two runs' step losses (float16 cache): {drift:.2e}")


if __name__ == "__main__":
    main()
