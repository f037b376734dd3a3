"""What step 8's copy term costs in the head's training loss, on the real offline SmolLM2-135M-Instruct.

    .venv/bin/python benchmarks/bench_copy_term.py

One batch of GSM-Symbolic training problems goes through the frozen base once; then the head's chunked loss
(``backattn.head_loss.head_cross_entropy``, forward and backward, what a cached-features training step does
besides the optimiser) is timed for the ``hidden`` head, the ``hidden`` head with ``copy_attention`` as the
library computes it (the copy term at the ``S`` copied tokens, plus one constant per position), and the same
copy head with the term written over the whole vocabulary, as the definition reads
(:func:`dense_copy_term`). The three are interleaved and their results checked equal. Prints the medians and
their ratios to the plain head's, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer
from transformers.utils import logging

from backattn import BackwardAttentionConfig, LlamaBackwardAttentionForCausalLM
from backattn.data.gsm_symbolic import build_gsm_symbolic
from backattn.data.sft_data import PromptTemplate
from backattn.head_loss import head_cross_entropy
from backattn.modeling_backattn import SequenceContext
from backattn.offline import smollm2_path


def dense_copy_term(head, z, state, copy):
    """Step 8 over the whole vocabulary: ``z_t + g_c logaddexp(log(1 - lambda_t), log lambda_t + log c_t -
    log_softmax(z_t))`` with ``c_t`` scattered into a ``V``-sized tensor (the formulation before 2026-12-04)."""
    log_weights, next_ids = copy.log_weights.to(z.dtype), copy.next_ids.to(z.device)
    c = torch.zeros_like(z).scatter_add(-1, next_ids, log_weights.exp())
    present = c > 0
    log_c = torch.where(present, torch.log(torch.where(present, c, 1.0)), -math.inf)
    gate_logit = (state @ head.copy_gate_weight + head.copy_gate_bias)[..., None]
    copied = F.logsigmoid(gate_logit) + log_c - torch.log_softmax(z, dim=-1)
    term = torch.logaddexp(F.logsigmoid(-gate_logit), copied)
    term = torch.where(torch.isfinite(log_weights).any(-1, keepdim=True), term, 0.0)
    return z + (head.copy_gate * term if head.copy_gate is not None else term)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=8, help="Problems in the batch (the comparison's batch size).")
    parser.add_argument("--rounds", type=int, default=5, help="Timed rounds, each running every variant once.")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/copy_term.json"))
    args = parser.parse_args()
    logging.set_verbosity_error()
    torch.manual_seed(0)
    base_dir = smollm2_path()
    model = LlamaBackwardAttentionForCausalLM.from_pretrained(base_dir, head_config="hidden", head_name="hidden")
    model.add_head(BackwardAttentionConfig.from_preset("hidden", copy_attention=True), head_name="copy")
    model.heads.requires_grad_(True)  # both heads train here
    with torch.no_grad():
        model.heads["copy"].copy_gate.fill_(0.5)  # as after training: the copy term is really added
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    template = PromptTemplate()
    problems = build_gsm_symbolic(variants_per_template=16)["train"].select(range(args.rows))
    texts = [template.render_prompt(row) + template.render_target(row) + tokenizer.eos_token for row in problems]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    labels = ids.masked_fill(~mask, -100)
    with torch.no_grad():
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state  # the frozen base, once
    weight, embeddings = model.lm_head.weight.detach(), model.get_input_embeddings().weight.detach()
    context = SequenceContext(hidden, None, ids, mask, torch.arange(ids.shape[1]).expand_as(ids))
    copy_head = model.heads["copy"]

    def loss_and_gradients(head) -> tuple[torch.Tensor, list[torch.Tensor]]:
        head.zero_grad(set_to_none=True)
        loss = head_cross_entropy(head, hidden, labels, weight, embeddings, model.config.loss_chunk_size,
                                  context=context)  # fmt: skip
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in head.parameters() if p.grad is not None]

    def dense(head):
        head.add_copy = lambda z, state, copy: dense_copy_term(head, z, state, copy)
        try:
            return loss_and_gradients(head)
        finally:
            del head.add_copy

    variants = {
        "hidden": lambda: loss_and_gradients(model.heads["hidden"]),
        "hidden + copy (at the S copied tokens)": lambda: loss_and_gradients(copy_head),
        "hidden + copy (over the whole vocabulary)": lambda: dense(copy_head),
    }
    sparse_result, dense_result = variants["hidden + copy (at the S copied tokens)"](), dense(copy_head)
    for a, b in zip([sparse_result[0], *sparse_result[1]], [dense_result[0], *dense_result[1]]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    seconds = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, run in variants.items():
            started = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    unit = medians["hidden"]
    labelled = int((labels[:, 1:] != -100).sum())
    print(
        f"{args.rows} problems, {labelled} labelled positions, S = {ids.shape[1]}, V = {weight.shape[0]}, "
        f"{torch.get_num_threads()} threads; loss forward + backward, median of {args.rounds} rounds\n"
    )
    print("| head | seconds | in plain-head steps |\n| --- | --- | --- |")
    for name, value in medians.items():
        print(f"| {name} | {value:.3f} | {value / unit:.2f} |")
    result = {"rows": args.rows, "labelled_positions": labelled, "sequence": ids.shape[1],
              "threads": torch.get_num_threads(), "seconds": seconds, "median_seconds": medians,
              "ratio_to_plain_head": {name: value / unit for name, value in medians.items()}}  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    temporary = args.output.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(result, indent=1))
    temporary.replace(args.output)


if __name__ == "__main__":
    main()
