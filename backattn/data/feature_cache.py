"""The frozen base's final hidden states for a tokenized data set, computed once and memory-mapped from disk.

The base never trains, so ``h_t`` (the input of its output layer) for a fixed data set never changes. A
feature cache stores them once (half precision by default) and every epoch trains the head from them
(``forward(base_hidden_states=...)``) without running the base again: each step then costs the output layer
``l_t = h_t W_out`` and the head only.

A head with ``query_layers`` also reads the outputs of some of the base's decoder blocks (before its final
norm): the cache then stores those blocks' states too (``layers``, by default the blocks the model's resident
heads read, :meth:`~backattn.modeling_families.BackwardAttentionForCausalLMMixin.feature_layers`), and
:class:`CachedFeaturesDataset` hands them over as ``base_layer_states``.

A cache lives in ``<cache_dir>/features/<key>/`` where the key hashes the base's weights and config, the exact
token ids of every example (so data, prompt template, tokenizer and ``max_length`` are all in it), the
storage dtype, the stored blocks and the base's attention re-balancing options
(:mod:`backattn.attention_rebalancing`; none for a plain base): a stale cache is never used. It is built once,
atomically (:mod:`backattn.data.cache_dirs`).

A base sharded across processes (:mod:`backattn.sharding`, ``train_sft.py --shard_base``) cannot run on one
process alone, so its cache is built by all of them together: every process runs its share of the batches (the
base's weights gathered layer by layer, FSDP2's way), the states are exchanged (``all_gather_object``), and the
first process of each machine (``LOCAL_RANK`` 0) writes the whole cache, which every process then reads. Every
process must call :meth:`FeatureCache.build_or_load` with the same token ids, at the same point.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..attention_rebalancing import active_rebalancing
from ..configuration_backattn import BackwardAttentionModelFields
from ..sharding import full_tensor, is_sharded
from .cache_dirs import build_once

FEATURES_NAME = "features.npy"
LAYER_FEATURES_NAME = "layer_features.npy"
OFFSETS_NAME = "offsets.npy"
META_NAME = "meta.json"
DTYPES = {"float16": np.float16, "float32": np.float32}


#: Config fields that describe the heads, not the base: a base with heads (any, trained or frozen, in any order)
#: and the plain base share their features. Re-balancing, which changes them, is keyed on its own.
HEAD_FIELDS = frozenset(field.name for field in dataclasses.fields(BackwardAttentionModelFields)) | {"_name_or_path"}


def base_fingerprint(model) -> str:
    """SHA-256 of the base model's config and weights (not the heads), in bfloat16 so float32 and bf16 copies agree."""
    digest = hashlib.sha256()
    config = {k: v for k, v in model.config.to_diff_dict().items() if k not in HEAD_FIELDS}
    if isinstance(config.get("model_type"), str):  # a family's "llama_backattn" is the plain "llama"
        config["model_type"] = config["model_type"].removesuffix("_backattn")
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith("heads."):
            continue
        tensor = full_tensor(tensor)  # a sharded base: gathered (every process hashes the same tensors in order)
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def data_fingerprint(input_ids: list[list[int]]) -> str:
    digest = hashlib.sha256()
    for ids in input_ids:
        digest.update(np.asarray(ids, dtype=np.int64).tobytes())
        digest.update(b"|")
    return digest.hexdigest()


class FeatureCache:
    """Read-only view of a built cache: ``cache[i]`` is example ``i``'s ``(length, hidden)`` tensor of final hidden
    states, ``cache.layer_states(i)`` its ``{block: (length, hidden)}`` states of the stored ``cache.layers``."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.meta = json.loads((self.directory / META_NAME).read_text())
        self.offsets = np.load(self.directory / OFFSETS_NAME)
        self.features = np.load(self.directory / FEATURES_NAME, mmap_mode="r")
        self.layers: list[int] = list(self.meta.get("layers", []))
        self.layer_features = (
            np.load(self.directory / LAYER_FEATURES_NAME, mmap_mode="r") if self.layers else None
        )  # tokens x len(layers) x hidden

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> torch.Tensor:
        rows = np.array(self.features[self.offsets[index] : self.offsets[index + 1]])  # a writable copy
        return torch.from_numpy(rows)

    def layer_states(self, index: int) -> dict[int, torch.Tensor]:
        """Example ``index``'s states of the stored decoder blocks, ``{block: (length, hidden)}`` (empty if none)."""
        if self.layer_features is None:
            return {}
        rows = np.array(self.layer_features[self.offsets[index] : self.offsets[index + 1]])
        return {k: torch.from_numpy(rows[:, i]) for i, k in enumerate(self.layers)}

    @classmethod
    def build_or_load(
        cls,
        model,
        input_ids: list[list[int]],
        cache_dir: str | os.PathLike,
        dtype: str = "float16",
        batch_size: int = 8,
        progress: bool = True,
        layers: list[int] | None = None,
    ) -> FeatureCache:
        """The cache for ``model``'s base and these token ids: loaded if built before, else built now.

        ``layers``: the decoder blocks whose outputs to store as well (for heads with ``query_layers``); ``None``:
        those the model's resident heads read (``model.feature_layers()``), none for other heads."""
        if dtype not in DTYPES:
            raise ValueError(f"Feature cache dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
        if layers is None:
            layers = model.feature_layers() if hasattr(model, "feature_layers") else []
        layers = sorted(set(layers))
        fingerprints = f"{base_fingerprint(model)}:{data_fingerprint(input_ids)}:{dtype}"
        if layers:  # caches of the final states alone keep the keys they always had
            fingerprints += ":layers=" + ",".join(map(str, layers))
        rebalancing = active_rebalancing(model)  # a re-balanced base's features are never the plain base's
        if rebalancing is not None:
            fingerprints += ":attention_rebalancing=" + json.dumps(rebalancing, sort_keys=True)
        key = hashlib.sha256(fingerprints.encode()).hexdigest()[:24]
        final = Path(cache_dir) / "features" / key

        def finish(directory: Path) -> None:
            meta = {"key": key, "dtype": dtype, "examples": len(input_ids), "hidden_size": model.config.hidden_size}
            if layers:
                meta["layers"] = layers
            if rebalancing is not None:
                meta["attention_rebalancing"] = rebalancing
            (directory / META_NAME).write_text(json.dumps(meta))  # last: marks the cache finished

        def build(directory: Path) -> None:
            _compute(model, input_ids, directory, DTYPES[dtype], batch_size, progress, layers)
            finish(directory)

        if is_sharded(model):
            _build_sharded(model, input_ids, final, finish, batch_size, progress, layers, DTYPES[dtype])
        else:
            build_once(final, build, lambda path: (path / META_NAME).is_file())
        return cls(final)


def _build_sharded(model, input_ids, final: Path, finish, batch_size, progress, layers, dtype) -> None:
    """``build_or_load`` for a base sharded across processes: every process computes its share, the first of each
    machine writes the cache (see the module's docstring). The collectives all run before ``build_once`` takes its
    lock (writers on machines that share a file system wait on it), so the writers hold every example's states in
    memory, in the cache's dtype, until they write them."""
    import torch.distributed as dist

    complete = (final / META_NAME).is_file()
    flag = torch.tensor([int(complete)], device=_device(model))
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)  # the processes agree: all read it, or all build it
    if not flag.item():
        writer = int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0
        rows = _compute_sharded(model, input_ids, batch_size, progress and dist.get_rank() == 0, layers, writer, dtype)

        def write(directory: Path) -> None:
            _write(directory, input_ids, rows, dtype, model.config.hidden_size, layers)
            finish(directory)

        if writer:
            build_once(final, write, lambda path: (path / META_NAME).is_file())
    dist.barrier()


def _device(model) -> torch.device:
    device = model.lm_head.weight.device
    return device if device.type != "meta" else torch.device("cpu")


def _batches(input_ids: list[list[int]], batch_size: int) -> list[np.ndarray]:
    """The examples in batches of similar length (little padding), longest first."""
    lengths = np.array([len(ids) for ids in input_ids], dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def _base_states(model, input_ids, batch, device, layers):
    """The base's final hidden states (and the stored blocks' states) of one batch, as float32 numpy arrays."""
    width = max(len(input_ids[index]) for index in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for row, index in enumerate(batch):
        ids[row, : len(input_ids[index])] = torch.tensor(input_ids[index])
        mask[row, : len(input_ids[index])] = 1
    capture = model.capture_block_outputs(layers) if layers else contextlib.nullcontext({})
    kept = {}
    # Through the model itself, the root of the sharding (FSDP2 starts there), with its heads off and one position
    # of logits; the base's output is taken on its way.
    keep = model.base_model.register_forward_hook(lambda module, args, output: kept.update(hidden=output[0]))
    heads_off = model.disable_heads() if hasattr(model, "disable_heads") else contextlib.nullcontext()  # plain base
    try:
        with capture as states, heads_off:
            model(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=1, use_cache=False)
    finally:
        keep.remove()
    hidden = kept["hidden"]
    blocks = np.stack([states[k].float().cpu().numpy() for k in layers], axis=2) if layers else None
    return hidden.float().cpu().numpy(), blocks


class _CacheWriter:
    """A cache's files for examples of these lengths, filled example by example in any order, then closed."""

    def __init__(self, directory: Path, input_ids, dtype, hidden_size: int, layers):
        self.directory = directory
        self.offsets = np.concatenate([[0], np.cumsum([len(ids) for ids in input_ids])]).astype(np.int64)
        rows = int(self.offsets[-1])
        self.features = np.lib.format.open_memmap(
            directory / FEATURES_NAME, mode="w+", dtype=dtype, shape=(rows, hidden_size)
        )
        self.layer_features = None
        if layers:
            self.layer_features = np.lib.format.open_memmap(
                directory / LAYER_FEATURES_NAME, mode="w+", dtype=dtype, shape=(rows, len(layers), hidden_size)
            )

    def put(self, example: int, hidden: np.ndarray, blocks: np.ndarray | None) -> None:
        """Example ``example``'s states, ``(length, hidden)`` and ``(length, blocks, hidden)``, unpadded."""
        span = slice(self.offsets[example], self.offsets[example + 1])
        self.features[span] = hidden
        if self.layer_features is not None:
            self.layer_features[span] = blocks

    def close(self) -> None:
        for array in (self.features, self.layer_features):
            if array is not None:
                array.flush()
        self.features = self.layer_features = None
        np.save(self.directory / OFFSETS_NAME, self.offsets)  # the states are on disk before their index


@torch.no_grad()
def _compute_sharded(model, input_ids, batch_size, progress, layers, keep: bool, dtype=np.float32) -> dict:
    """Every process runs batches ``rank, rank + world, ...`` through the sharded base, in step (a process short
    of a batch runs its first one again, and drops it), and all of them receive every batch's states; ``keep``:
    whether this process keeps them (the writers), as ``{example: (hidden, blocks)}``."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    batches = _batches(input_ids, batch_size)
    rows, device = {}, _device(model)
    was_training = model.training
    model.eval()
    try:
        steps = range(0, len(batches), world)
        for start in tqdm(steps, desc="Caching base features (sharded base)", disable=not progress):
            index = start + rank
            mine = index if index < len(batches) else None  # in step with the others: recompute, then drop
            hidden, blocks = _base_states(model, input_ids, batches[mine if mine is not None else 0], device, layers)
            gathered = [None] * world
            dist.all_gather_object(gathered, (mine, hidden, blocks))
            for got, got_hidden, got_blocks in gathered:
                if keep and got is not None:
                    for row, example in enumerate(batches[got]):
                        length = len(input_ids[example])
                        states = None if got_blocks is None else got_blocks[row, :length].astype(dtype)
                        rows[int(example)] = (got_hidden[row, :length].astype(dtype), states)
    finally:
        model.train(was_training)
    return rows


def _write(directory: Path, input_ids, rows: dict, dtype, hidden_size: int, layers) -> None:
    """The files of a cache from the states of every example (``_compute_sharded``'s ``rows``)."""
    writer = _CacheWriter(directory, input_ids, dtype, hidden_size, layers)
    for example, (hidden, blocks) in rows.items():
        writer.put(example, hidden, blocks)
    writer.close()


@torch.no_grad()
def _compute(
    model, input_ids: list[list[int]], directory: Path, dtype, batch_size: int, progress: bool, layers=()
) -> None:
    """The cache of an unsharded base, streamed to disk batch by batch."""
    writer = _CacheWriter(directory, input_ids, dtype, model.config.hidden_size, layers)
    was_training = model.training
    model.eval()
    device = _device(model)
    try:
        for batch in tqdm(_batches(input_ids, batch_size), desc="Caching base features", disable=not progress):
            hidden, blocks = _base_states(model, input_ids, batch, device, layers)
            for row, example in enumerate(batch):
                length = len(input_ids[example])
                writer.put(example, hidden[row, :length], None if blocks is None else blocks[row, :length])
    finally:
        model.train(was_training)
    writer.close()


class CachedFeaturesDataset(torch.utils.data.Dataset):
    """A tokenized data set whose examples also carry the base's cached hidden states (``base_hidden_states``), and
    the cached states of decoder blocks (``base_layer_states``, ``{block: (length, hidden)}``) when it holds some."""

    def __init__(self, examples, cache: FeatureCache):
        if len(examples) != len(cache):
            raise ValueError(f"The feature cache holds {len(cache)} examples, the data set {len(examples)}.")
        self.examples, self.cache = examples, cache

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        example = self.examples[index]
        item = {key: example[key] for key in ("input_ids", "labels", "answer_labels") if key in example}
        item["base_hidden_states"] = self.cache[index]
        if self.cache.layers:
            item["base_layer_states"] = self.cache.layer_states(index)
        return item
