"""A saved head's model card (its ``README.md``), Hub-ready, built with ``huggingface_hub.ModelCard``.

The card's metadata is a ``ModelCardData``: ``base_model`` as a Hub id when the base has one (a local path
never appears as a link), ``library_name``, ``pipeline_tag``, optional ``license`` and ``datasets``, tags,
and the held-out metrics as model-index results. The text is written here, not read from a template file,
so a head saved through ``trust_remote_code`` code needs no file beside the code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

HUB_CACHE_SNAPSHOT = re.compile(r"models--(?P<owner>[^/\\]+?)--(?P<name>[^/\\]+)[/\\]snapshots[/\\]")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # owner/name, or a legacy id such as gpt2


def hub_model_id(name_or_path: str | None) -> str | None:
    """The Hub id of a base model: the id itself, the repo of a Hub-cache snapshot, the Hub original of the
    embedded SmolLM2 copy; None for another local directory."""
    if not name_or_path:
        return None
    found = HUB_CACHE_SNAPSHOT.search(str(name_or_path))
    if found:
        return f"{found['owner']}/{found['name']}"
    try:  # absolute (Transformers reads relative imports as files); absent when run as remote code
        from backattn.offline import _MARKER, SMOLLM2_DIRNAME, SMOLLM2_HUB_ID
    except ImportError:
        _MARKER = SMOLLM2_DIRNAME = SMOLLM2_HUB_ID = None

    path = Path(name_or_path)
    if path.exists():  # a local directory: the embedded SmolLM2 copy (its conversion marker), or unknown
        embedded = SMOLLM2_DIRNAME is not None and path.name == SMOLLM2_DIRNAME and (path / _MARKER).is_file()
        return SMOLLM2_HUB_ID if embedded else None
    return str(name_or_path) if HUB_ID.match(str(name_or_path)) else None


def hub_dataset_id(training_data: str | None) -> str | None:
    """A Hub dataset id at the start of a training-data description (``owner/name (split)``), else None."""
    first = (training_data or "").split(" ")[0]
    return first if "/" in first and HUB_ID.match(first) and not Path(first).exists() else None


def build_head_card(
    head_name: str,
    record: dict[str, Any],
    num_parameters: int,
    task: str | None = None,
    training_data: str | None = None,
    metrics: dict[str, float] | str | None = None,
    license: str | None = None,
    eval_dataset: str | None = None,
) -> ModelCard:
    """The card of one saved head. ``metrics`` (name -> value, measured on ``eval_dataset``) become a table
    and model-index results; ``license`` is the head's (the base's license applies to the base)."""
    base_id = hub_model_id(record.get("base_model_name_or_path"))
    dataset_id = hub_dataset_id(training_data)
    results = []
    if isinstance(metrics, dict) and metrics:
        evaluated_on = eval_dataset or (f"{training_data}, held out" if training_data else "held-out data")
        results = [
            EvalResult(task_type="text-generation", dataset_type=dataset_id or "custom", dataset_name=evaluated_on,
                       metric_type=name, metric_name=name, metric_value=value)
            for name, value in metrics.items() if isinstance(value, (int, float))
        ]  # fmt: skip
    data = ModelCardData(
        base_model=base_id,
        library_name="backattn",
        pipeline_tag="text-generation",
        license=license,
        datasets=[dataset_id] if dataset_id else None,
        tags=["backattn", "backward-attention", *([slug(task)] if task else [])],
        model_name=head_name if results else None,
        eval_results=results or None,
    )
    text = card_text(head_name, record, num_parameters, base_id, task, training_data, metrics)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text}")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def card_text(head_name, record, num_parameters, base_id, task, training_data, metrics) -> str:
    base_path = record.get("base_model_name_or_path") or "unknown"
    base = f"[`{base_id}`](https://huggingface.co/{base_id})" if base_id else f"`{base_path}` (a local model)"
    if isinstance(metrics, dict):
        metrics = "| metric | value |\n| --- | --- |\n" + "\n".join(
            f"| {name} | {value:.4g} |" if isinstance(value, float) else f"| {name} | {value} |"
            for name, value in metrics.items()
        )
    family = "Llama" if record.get("base_model_type") == "llama" else "GPT2"
    load_from = base_id or base_path
    return f"""# {head_name}: a backward-attention head for {base_id or base_path}

A small trainable head that re-scores the next-token logits of the frozen base model {base}; only the
head was trained. It is a file of {num_parameters:,} parameters, not a copy of the base model.

- **Task:** {task or "not recorded"}
- **Training data:** {training_data or "not recorded"}
- **Head options:** `{json.dumps(record["head_options"], sort_keys=True)}`

## Results

{metrics or "Not measured yet."}

How heads compare with LoRA and other methods trained on the same data, at equal parameters and equal
training time: the "Does the head help?" section of backattn's README and `BENCHMARKS.md`.

## How to load

```python
from transformers import AutoTokenizer

from backattn import {family}BackwardAttentionForCausalLM

model = {family}BackwardAttentionForCausalLM.from_pretrained("{load_from}")
model.load_head("<this repo id or directory>", head_name="{head_name}")
model.set_head("{head_name}")
tokenizer = AutoTokenizer.from_pretrained("{load_from}")
```

Made with backattn {record.get("backattn_version", "unknown")}.
"""
