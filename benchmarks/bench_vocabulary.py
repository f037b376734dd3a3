"""How the head's cost grows with the vocabulary: train step time, peak memory and generation overhead.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_vocabulary.py        # 32k, 64k, 128k, 256k rows
    .venv/bin/python benchmarks/bench_vocabulary.py --sizes 1000 2000 --hidden 32 --rounds 1   # a quick look

For each vocabulary size ``V`` a small random Llama-like base (``--hidden`` wide, ``--layers`` blocks, tied
embeddings, as SmolLM2 and Gemma 3 tie them) carries a fresh head (``--preset``, its gate opened so that every
term runs). On one fixed batch (``--batch_size`` rows of ``--seq_len`` tokens, the last 60 % labelled):

* ``train step``: a whole head training step from token ids (base forward, the chunked loss of
  :mod:`backattn.head_loss` in chunks of ``--loss_chunk_size`` positions, backward, an Adam step); against
  ``base forward``: the frozen base's own forward
  with the same labels (the stock model's loss, no gradients), the least any step must cost;
* ``peak memory``: what each of those adds to the resident set of the loaded model (``measure.PeakMemory``), and
  the same for a head step with the exact loss (full ``batch x sequence x V`` logits, ``loss_chunk_size=None``),
  what the chunked loss saves;
* ``generate``: greedy decoding of ``--new_tokens`` tokens (batch 1, KV cache) with the head against the base's
  own ``generate`` (the same model with its heads disabled).

Times are medians of ``--rounds`` rounds, the head and its baseline interleaved within each round (so load on a
shared machine hits both), each round a ``measure.median_seconds`` of several calls; ratios are taken within a
round and their median reported. Run with one thread (``torch.set_num_threads(1)``, set here) on a shared machine.
Writes ``--output`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from measure import PeakMemory, median_seconds
from transformers import LlamaConfig

from backattn import LlamaBackwardAttentionForCausalLM

SIZES = (32_768, 65_536, 131_072, 262_144)


def arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=list(SIZES))
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--preset", default="hidden")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--new_tokens", type=int, default=16)
    parser.add_argument("--loss_chunk_size", type=int, default=64, help="positions per chunk of the chunked loss")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per size (medians are reported)")
    parser.add_argument("--calls", type=int, default=2, help="timed calls per measurement within a round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "vocabulary.json")
    return parser.parse_args(argv)


def build(vocab_size: int, args) -> LlamaBackwardAttentionForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=args.seq_len + args.new_tokens + 8, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    model = LlamaBackwardAttentionForCausalLM(config, head_config=args.preset)
    model.config.loss_chunk_size = args.loss_chunk_size
    with torch.no_grad():
        model.heads.default.gate.fill_(0.5)  # open: every term of the head runs (a closed gate costs the same)
    return model


def batch(vocab_size: int, args) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab_size, (args.batch_size, args.seq_len), generator=generator)
    labels = ids.clone()
    labels[:, : int(0.4 * args.seq_len)] = -100  # the prompt
    return ids, labels


def measure_size(vocab_size: int, args) -> dict:
    model = build(vocab_size, args).train()
    ids, labels = batch(vocab_size, args)
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    prompt = ids[:1, :32]
    common = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)

    def train_step(chunk_size=args.loss_chunk_size):
        model.config.loss_chunk_size = chunk_size
        optimiser.zero_grad(set_to_none=True)
        model(ids, labels=labels).loss.backward()
        optimiser.step()

    def exact_step():
        train_step(chunk_size=None)
        model.config.loss_chunk_size = args.loss_chunk_size

    def base_forward():
        with torch.no_grad(), model.disable_heads():
            model(ids, labels=labels)

    def generate_head():
        model.eval()
        model.generate(prompt, attention_mask=torch.ones_like(prompt), **common)

    def generate_base():
        model.eval()
        with model.disable_heads():
            model.generate(prompt, attention_mask=torch.ones_like(prompt), **common)

    rounds = []
    for _ in range(args.rounds):
        model.train()
        row = {"base_forward_s": median_seconds(base_forward, args.calls).median}
        row["train_step_s"] = median_seconds(train_step, args.calls).median
        row["generate_base_s"] = median_seconds(generate_base, args.calls).median
        row["generate_head_s"] = median_seconds(generate_head, args.calls).median
        rounds.append(row)
    model.train()
    memory = {}
    for name, step in (("base_forward", base_forward), ("train_step", train_step), ("exact_train_step", exact_step)):
        with PeakMemory() as peak:
            step()
        memory[f"{name}_added_mib"] = round(peak.added_mib, 1)

    def median(key):
        return statistics.median(r[key] for r in rounds)

    def ratio(numerator, denominator):
        return round(statistics.median(r[numerator] / r[denominator] for r in rounds), 3)

    result = {
        "vocab_size": vocab_size,
        "base_parameters": sum(p.numel() for n, p in model.named_parameters() if not n.startswith("heads.")),
        "head_parameters": sum(p.numel() for p in model.heads.parameters()),
        **{key: round(median(key), 4) for key in rounds[0]},
        "train_step_over_base_forward": ratio("train_step_s", "base_forward_s"),
        "generate_head_over_base": ratio("generate_head_s", "generate_base_s"),
        "generate_overhead_ms_per_token": round(
            1000 * (median("generate_head_s") - median("generate_base_s")) / args.new_tokens, 2
        ),
        **memory,
        "rounds": rounds,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}), flush=True)
    return result


def main(argv=None) -> dict:
    args = arguments(argv)
    torch.set_num_threads(args.threads)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results = [measure_size(size, args) for size in args.sizes]
    report = {
        "what": "head cost against vocabulary size: small random Llama-like bases, tied embeddings",
        "started": started,
        "setup": {
            "hidden": args.hidden,
            "layers": args.layers,
            "preset": args.preset,
            "gate": 0.5,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "labelled_fraction": 0.6,
            "loss_chunk_size": args.loss_chunk_size,
            "new_tokens": args.new_tokens,
            "rounds": args.rounds,
            "calls_per_measurement": args.calls,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
            "note": "2-core machine shared with another benchmark: one thread, interleaved rounds",
        },  # fmt: skip
        "sizes": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    return report


if __name__ == "__main__":
    main()
