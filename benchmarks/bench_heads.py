"""Head files on the real offline SmolLM2-135M-Instruct: size, load time and switch time.

    .venv/bin/python benchmarks/bench_heads.py

Baselines measured in the same run: the base model's own safetensors file (size) and loading the whole
model with ``from_pretrained`` (time). Prints a Markdown table for BENCHMARKS.md. Times are medians from
``torch.utils.benchmark.Timer`` (``benchmarks/measure.py``), each after the Timer's untimed warm-up call.
"""

import statistics
import tempfile
from pathlib import Path

import torch
from measure import counted, median_seconds
from transformers.utils import logging

from backattn import LlamaBackwardAttentionForCausalLM
from backattn.head_files import HEAD_WEIGHTS_NAME, embedding_fingerprint
from backattn.offline import smollm2_path


def main() -> None:
    logging.set_verbosity_error()
    base_dir = smollm2_path()
    base_bytes = (base_dir / "model.safetensors").stat().st_size
    full_load = median_seconds(lambda: LlamaBackwardAttentionForCausalLM.from_pretrained(base_dir), calls=3)

    model = LlamaBackwardAttentionForCausalLM.from_pretrained(base_dir, head_config="seed", head_name="seed").eval()
    model.add_head("hidden", head_name="hidden")
    fingerprint = median_seconds(lambda: embedding_fingerprint(model.get_input_embeddings().weight), calls=3).median
    ids = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for preset in ("seed", "hidden"):
            directory = Path(root) / preset
            model.save_head(directory, head_name=preset)
            head_bytes = (directory / HEAD_WEIGHTS_NAME).stat().st_size

            def load_and_delete():
                model.load_head(directory, head_name="probe")
                model.delete_head("probe")

            load_and_delete()  # the embedding fingerprint is computed once per base, then cached
            load_seconds = median_seconds(load_and_delete, calls=20).median
            rows.append((preset, head_bytes, load_seconds))

    # Switching: two heads with the same options, so the only difference is the switch itself.
    model.add_head("hidden", head_name="hidden_b")
    switch = median_seconds(lambda: (model.set_head("hidden"), model.set_head("hidden_b")), min_run_time=1.0)
    with torch.no_grad():

        def forward_with(*names):
            for name in names:
                model.set_head(name)
                model(ids, logits_to_keep=1)

        forward_with("hidden", "hidden_b")  # weight tables are cached per head, once
        # Interleaved, so that drift in the machine's speed hits both alike; each timed call comes right after
        # the Timer's untimed warm-up call of the same statement (so "staying" never starts with a switch).
        switching, staying = [], []
        for _ in range(15):
            switching += median_seconds(lambda: forward_with("hidden", "hidden_b")).times
            staying += median_seconds(lambda: forward_with("hidden", "hidden")).times
        switch_forward, same_head_forward = statistics.median(switching) / 2, statistics.median(staying) / 2

    print(
        f"base model file: {base_bytes / 1e6:.1f} MB; full model from_pretrained: {full_load.median:.2f} s "
        f"({counted(full_load)})\n"
    )
    print("| head preset | head file | share of base file | load_head from local disk | vs full model load |")
    print("| --- | --- | --- | --- | --- |")
    for preset, head_bytes, load_seconds in rows:
        print(
            f"| {preset} | {head_bytes / 1e3:.1f} KB | {head_bytes / base_bytes:.5%} | {load_seconds * 1e3:.1f} ms "
            f"| {load_seconds / full_load.median:.4f}x |"
        )
    print(f"\nembedding fingerprint of the base (once per base, then cached): {fingerprint * 1e3:.0f} ms")
    print(f"set_head (switch the active head): {switch.median / 2 * 1e6:.1f} us ({counted(switch)}, 2 switches each)")
    print(
        f"32-token forward right after a switch: {switch_forward * 1e3:.1f} ms vs {same_head_forward * 1e3:.1f} ms "
        f"without switching ({switch_forward / same_head_forward:.2f}x)"
    )


if __name__ == "__main__":
    main()
