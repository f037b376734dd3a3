"""Which of the frozen base's layers can tell a fresh snippet from a rotten one? (train and validation only)

    .venv/bin/python benchmarks/probe_sentiment_layers.py --output benchmarks/results/probe_sentiment_layers.json

A sentiment head trained with the label-word loss is, on the label position, a linear classifier of its query
state ``r_t`` (``s_t[pos] - s_t[neg] = q_t . (K_pos - K_neg)`` with ``q_t`` linear in ``r_t``): the base's final
hidden state ``h_t``, or with ``query_layers`` a mix of decoder blocks' outputs. So the accuracy of a plain
logistic-regression probe of each block's output at the prompt's last token bounds what such a head can reach,
and says which blocks ``query_layers`` should read. The probes fit on the ``train`` split and are scored on
``validation``; the test split is not read. For reference, the same probe of the mean over the snippet's
positions (which no head reads) and the zero-shot label-word accuracy of the base.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from backattn.data.classification_data import (  # noqa: E402
    data_classes,
    load_classification_dataset,
    template_for,
    tokenize_classification,
)
from backattn.offline import smollm2_path  # noqa: E402


@torch.no_grad()
def layer_features(model, rows, pad_id: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each block's output (``hidden_states[k + 1]``; the last one after the final norm) at the prompt's last
    token, ``rows x (layers + 1) x d`` with the embeddings first, and the same averaged over the prompt."""
    last, mean = [], []
    for start in tqdm(range(0, len(rows), batch_size), desc="Base states"):
        batch = rows[start : start + batch_size]
        length = max(len(r) for r in batch)
        ids = torch.full((len(batch), length), pad_id)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
        states = torch.stack(model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states, 1)
        ends = mask.sum(1) - 1
        last.append(states[torch.arange(len(batch)), :, ends])
        weights = mask[:, None, :, None].float()
        mean.append((states * weights).sum(2) / weights.sum(2))
    return torch.cat(last), torch.cat(mean)


def probe_accuracy(train_x, train_y, test_x, test_y, weight_decay: float) -> float:
    """A logistic-regression probe (standardised features, L2 ``weight_decay``, L-BFGS) fit on train, scored on test."""
    mu, sigma = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mu) / sigma, (test_x - mu) / sigma
    w = torch.zeros(train_x.shape[1], requires_grad=True, dtype=torch.float64)
    b = torch.zeros((), requires_grad=True, dtype=torch.float64)
    optimiser = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn="strong_wolfe")
    x, y = train_x.double(), train_y.double()

    def closure():
        optimiser.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + weight_decay * w.square().sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    with torch.no_grad():
        return float(((test_x.double() @ w + b > 0).double() == test_y.double()).double().mean())


def adam_probe_accuracy(train_x, train_y, test_x, test_y, lr: float, standardise: bool, steps: int = 309) -> float:
    """A logistic probe trained as a head is: Adam, batches of 8, 5 warm-up steps then a constant rate."""
    torch.manual_seed(0)
    mu, sigma = (train_x[:256].mean(0), train_x[:256].std(0)) if standardise else (0.0, 1.0)
    train_x, test_x = (train_x - mu) / sigma, (test_x - mu) / sigma
    w = torch.zeros(train_x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    optimiser = torch.optim.Adam([w, b], lr=lr)
    order = torch.randperm(len(train_x))
    for step in range(steps):
        for group in optimiser.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 5)
        rows = order[(step * 8) % len(order) :][:8]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(train_x[rows] @ w + b, train_y[rows].float())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        return float(((test_x @ w + b > 0).long() == test_y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="benchmarks/results/probe_sentiment_layers.json")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_train", type=int, default=3000, help="The first rows of train the probes fit on.")
    parser.add_argument("--weight_decays", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2])
    args = parser.parse_args()
    base = str(smollm2_path())
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    template = template_for("rotten_tomatoes")
    features, labels = {}, {}
    for split in ("train", "validation"):
        rows = load_classification_dataset("rotten_tomatoes", split, template=template)
        if split == "train":
            rows = rows.shuffle(seed=0).select(range(min(args.max_train, len(rows))))
        classes = data_classes(rows, template)
        tokenized, _ = tokenize_classification(rows, tokenizer, template, 128, classes)
        prompts = [[t for t, y in zip(ids, lab) if y == -100] for ids, lab in zip(tokenized["input_ids"],
                                                                                   tokenized["labels"])]  # fmt: skip
        features[split] = layer_features(model, prompts, tokenizer.eos_token_id, args.batch_size)
        labels[split] = torch.tensor([classes.index(label) for label in tokenized["label"]])
    majority = float(max(labels["validation"].float().mean(), 1 - labels["validation"].float().mean()))
    results = {"validation_snippets": len(labels["validation"]), "train_snippets": len(labels["train"]),
               "majority_rate": majority, "classes": list(classes), "layers": []}  # fmt: skip
    num_states = features["train"][0].shape[1]
    for k in range(num_states):
        row = {"state": "embeddings" if k == 0 else f"block {k - 1}" + (" (after final norm)" if k == num_states - 1
                                                                         else "")}  # fmt: skip
        for name, index in (("last_token", 0), ("mean_over_prompt", 1)):
            row[name] = {str(wd): probe_accuracy(features["train"][index][:, k], labels["train"],
                                                 features["validation"][index][:, k], labels["validation"], wd)
                         for wd in args.weight_decays}  # fmt: skip
        results["layers"].append(row)
        print(row["state"], {n: max(row[n].values()) for n in ("last_token", "mean_over_prompt")}, flush=True)
    # What a head's optimiser sees: Adam, 309 steps of 8 (the `hidden` head's budget at 4T), on the final state,
    # raw or standardised per dimension with the first 256 rows' statistics (standardize_query_state).
    final = (features["train"][0][:, -1], labels["train"], features["validation"][0][:, -1], labels["validation"])
    results["final_state_offsets"] = {"max_abs_mean": float(final[0].mean(0).abs().max()),
                                      "median_std": float(final[0].std(0).median())}  # fmt: skip
    results["adam_309_steps"] = {f"{kind} lr={lr:g}": adam_probe_accuracy(*final, lr, kind == "standardised")
                                 for kind in ("raw", "standardised") for lr in (1e-3, 3e-3, 1e-2)}  # fmt: skip
    print(results["final_state_offsets"], results["adam_309_steps"], flush=True)
    temporary = Path(args.output).with_suffix(".tmp")
    temporary.parent.mkdir(parents=True, exist_ok=True)
    temporary.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(temporary, args.output)


if __name__ == "__main__":
    main()
