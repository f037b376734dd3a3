"""Head files: one head saved on its own, without its base model, and read back with every check.

A saved head is a directory (local, or a Hub repo) holding

* ``head_config.json``: the head's options (:class:`BackwardAttentionConfig`), its name, the base model it
  was built on (id, revision, model type, a fingerprint of the input-embedding table ``E``), the library
  version, the SHA-256 of the weights file and free-form metadata (task, prompt template, ...);
* ``head.safetensors``: the head's tensors alone (never the embedding table), loaded with safetensors only;
* ``README.md``: a model card made from ``templates/model_card.md``.

Writing is atomic per file (a temporary name, then ``os.replace``), the config last; the config's checksum
of the weights makes a mismatched or damaged pair fail loudly on reading instead of loading wrong weights.

The model's ``save_head``, ``load_head`` (with ``hotswap=``) and ``push_head_to_hub`` are :func:`save_head`,
:func:`load_head` and :func:`push_head_to_hub` here. Head files of every format version so far load; version
1 (backattn 0.1.0) named two options ``num_heads`` and ``head_combine`` (see ``RENAMED_OPTIONS``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from .configuration_backattn import BackwardAttentionConfig

HEAD_CONFIG_NAME = "head_config.json"
HEAD_WEIGHTS_NAME = "head.safetensors"
MODEL_CARD_NAME = "README.md"
FORMAT_VERSION = 2  # 1: backattn 0.1.0 (options num_heads, head_combine); 2: their new names
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MODEL_CARD_TEMPLATE = Path(__file__).resolve().parent / "templates" / "model_card.md"


def embedding_fingerprint(embeddings: torch.Tensor) -> str:
    """SHA-256 of the embedding table rounded to bfloat16 (so a float32 and a bfloat16 copy of one base agree)."""
    table = embeddings.detach().to(device="cpu", dtype=torch.bfloat16).contiguous()
    digest = hashlib.sha256(table.view(torch.int16).numpy().tobytes())
    digest.update(repr(tuple(table.shape)).encode())
    return "sha256-bf16:" + digest.hexdigest()


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_head(
    save_directory: str | os.PathLike,
    state_dict: dict[str, torch.Tensor],
    record: dict[str, Any],
    model_card: str | None,
) -> Path:
    """Write a head's weights, model card and config (in that order, each atomically); return the directory.

    Everything is serialised in memory first, so an error there (a bad tensor, a value JSON cannot hold)
    leaves whatever the directory held before untouched.
    """
    directory = Path(save_directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"Cannot save a head to {directory}: it is a file, not a directory.")
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in state_dict.items()}
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise ValueError(f"Refusing to save head tensor {name!r}: it holds NaN or inf values.")
    weights = save(tensors, metadata={"format": "pt", "backattn_head": str(FORMAT_VERSION)})
    record = {**record, "format_version": FORMAT_VERSION, "weights_sha256": hashlib.sha256(weights).hexdigest()}
    config = (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()

    directory.mkdir(parents=True, exist_ok=True)
    _write_atomically(directory / HEAD_WEIGHTS_NAME, weights)
    if model_card is not None:
        _write_atomically(directory / MODEL_CARD_NAME, model_card.encode())
    _write_atomically(directory / HEAD_CONFIG_NAME, config)
    return directory


def resolve_head_directory(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> Path:
    """A local directory holding the head files: ``name_or_path`` itself, or a Hub repo's snapshot.

    Hub downloads go through ``huggingface_hub.snapshot_download``, so they use the local Hub cache and
    honour ``HF_HUB_OFFLINE=1`` and ``HF_ENDPOINT``.
    """
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path} is a file; a head is a directory holding {HEAD_CONFIG_NAME} and {HEAD_WEIGHTS_NAME}.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(
            snapshot_download(
                str(name_or_path),
                revision=revision,
                token=token,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                allow_patterns=[
                    HEAD_CONFIG_NAME,
                    HEAD_WEIGHTS_NAME,
                    MODEL_CARD_NAME,
                    *(f"*{s}" for s in PICKLE_SUFFIXES),
                ],
            )
        )
    except HFValidationError as error:
        raise ValueError(f"{name_or_path!r} is neither a local directory nor a valid Hub repo id.") from error


def read_head(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The record of ``head_config.json`` and the tensors of ``head.safetensors``, checked against each other."""
    config_path, weights_path = directory / HEAD_CONFIG_NAME, directory / HEAD_WEIGHTS_NAME
    if not weights_path.is_file():
        pickles = (
            sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES) if directory.is_dir() else []
        )
        if pickles:
            raise ValueError(
                f"{directory} holds {', '.join(pickles)} but no {HEAD_WEIGHTS_NAME}: pickle files are never loaded "
                "(unpickling can run arbitrary code). Convert the weights to safetensors and save them again."
            )
        raise FileNotFoundError(f"No head weights in {directory}: {HEAD_WEIGHTS_NAME} is missing.")
    if not config_path.is_file():
        raise FileNotFoundError(f"No head config in {directory}: {HEAD_CONFIG_NAME} is missing.")
    try:
        record = json.loads(config_path.read_text())
        if not isinstance(record, dict) or not isinstance(record.get("head_options"), dict):
            raise ValueError("it has no 'head_options' object")
    except ValueError as error:
        raise ValueError(f"{config_path} is not a valid head config ({error}); save the head again.") from error

    weights = weights_path.read_bytes()
    expected = record.get("weights_sha256")
    if expected is not None and hashlib.sha256(weights).hexdigest() != expected:
        raise ValueError(
            f"{weights_path} does not match its config (SHA-256 differs): the file is truncated, corrupted or "
            "from another save. Save or download the head again."
        )
    try:
        tensors = load(weights)
    except SafetensorError as error:
        raise ValueError(f"{weights_path} is not a readable safetensors file ({error}).") from error
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{weights_path}: tensor {name!r} holds NaN or inf values; the head is damaged.")
    return record, tensors


def head_options(record: dict[str, Any]) -> BackwardAttentionConfig:
    """The head's options; ``from_dict`` reads the 0.1.0 option names as well."""
    return BackwardAttentionConfig.from_dict(record["head_options"])


def render_model_card(
    head_name: str,
    record: dict[str, Any],
    num_parameters: int,
    task: str | None = None,
    training_data: str | None = None,
    metrics: dict[str, float] | str | None = None,
) -> str:
    """The model card of a saved head, from ``templates/model_card.md``."""
    if isinstance(metrics, dict):
        metrics = "| metric | value |\n| --- | --- |\n" + "\n".join(
            f"| {name} | {value:.4g} |" if isinstance(value, float) else f"| {name} | {value} |"
            for name, value in metrics.items()
        )
    base = record.get("base_model_name_or_path") or "unknown"
    family = "Llama" if record.get("base_model_type") == "llama" else "GPT2"
    how_to_load = (
        f'model = {family}BackwardAttentionForCausalLM.from_pretrained("{base}")\n'
        f'model.load_head("<this repo id or directory>", head_name="{head_name}")\n'
        f'model.set_head("{head_name}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{base}")'
    )
    return MODEL_CARD_TEMPLATE.read_text().format(
        base_model=base,
        head_name=head_name,
        task=task or "unspecified",
        training_data=training_data or "not recorded",
        metrics=metrics or "Not measured yet.",
        num_parameters=f"{num_parameters:,}",
        head_options=json.dumps(record["head_options"], sort_keys=True),
        how_to_load=how_to_load,
        family=family,
        backattn_version=record.get("backattn_version", "unknown"),
    )


# --------------------------------------------------------------------------------------------------------
# a model's heads, saved, loaded, hot-swapped and shared through the Hub
#
# ``model`` is a backattn model (modeling_families.py): ``model.heads`` is its heads container (heads.py),
# ``model.build_head(options)`` a fresh head for its base. The model classes take these functions as their
# methods ``save_head``, ``load_head`` and ``push_head_to_hub``, so ``model`` is their ``self``.


def library_version() -> str:
    try:
        return importlib.metadata.version("backattn")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def save_head(
    model,
    save_directory: str | os.PathLike,
    head_name: str | None = None,
    task: str | None = None,
    training_data: str | None = None,
    metrics: dict | str | None = None,
    metadata: dict | None = None,
) -> Path:
    """Save one head (default: the active one) on its own: config, safetensors weights and model card.

    Only the head's tensors are written, never the base's. Each file is written under a temporary name
    and renamed into place, so a save that fails leaves the directory as it was.
    """
    head_name = head_name or model.config.active_head
    if head_name is None:
        raise ValueError("No head is active; name the head to save with head_name=.")
    head = model.heads.require(head_name)
    record = {
        "head_name": head_name,
        "head_options": head.config.to_dict(),
        "base_model_name_or_path": model.config._name_or_path or None,
        "base_model_revision": getattr(model.config, "_commit_hash", None),
        "base_model_type": model.config.model_type.removesuffix("_backattn"),
        "embedding_fingerprint": model.embedding_fingerprint(),
        "backattn_version": library_version(),
        "metadata": metadata or {},
    }
    num_parameters = sum(p.numel() for p in head.parameters())
    card = render_model_card(head_name, record, num_parameters, task=task, training_data=training_data, metrics=metrics)
    return write_head(save_directory, head.state_dict(), record, card)


def load_head(
    model,
    head_name_or_path: str | os.PathLike,
    head_name: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    is_trainable: bool = False,
    ignore_base_mismatch: bool = False,
    hotswap: bool = False,
) -> str:
    """Load a saved head from a directory or a Hub repo id and keep it resident under ``head_name``.

    The head is checked before anything changes: its vocabulary and hidden sizes must match this base
    (always an error otherwise), and so must the fingerprint of the embedding table (an error, or only a
    warning with ``ignore_base_mismatch=True``). A failed load leaves the resident heads and the active
    head as they were. The loaded head becomes active only when no head is active yet (use
    ``set_head`` to switch). Returns the name it was loaded under (default: the name it was saved with).

    With ``hotswap=True`` the weights replace, in place, those of the resident head of that name, whose
    options must be the same (as PEFT's ``hotswap``; an optimiser holding those parameters keeps them).
    """
    directory = resolve_head_directory(head_name_or_path, revision, token, cache_dir, local_files_only)
    record, tensors = read_head(directory)
    head_name = head_name or record.get("head_name") or "default"
    model.heads.check_name(head_name)
    if hotswap:
        model.heads.require(head_name)
    elif head_name in model.heads:
        raise ValueError(
            f"A head named {head_name!r} is already loaded; pass another head_name=, hotswap=True, or "
            "delete_head it first."
        )
    head_config = head_options(record)
    if head_config.vocab_size is None or head_config.hidden_size is None:
        raise ValueError(f"The head config in {directory} does not record the base's vocab_size and hidden_size.")
    head = model.build_head(head_config)
    _check_fingerprint(model, record, head_name, head_name_or_path, ignore_base_mismatch)
    try:
        head.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise ValueError(f"The weights in {directory} do not fit the head described by its config: {error}") from error
    if hotswap:
        hotswap_weights(model.heads[head_name], head, head_name)
        return head_name
    head.requires_grad_(is_trainable)
    model.heads.add(head_name, head)
    if model.config.active_head is None:
        model.heads.set_active(head_name)
    return head_name


def _check_fingerprint(model, record: dict, head_name: str, source, ignore_base_mismatch: bool) -> None:
    fingerprint = model.embedding_fingerprint()
    if record.get("embedding_fingerprint") == fingerprint:
        return
    message = (
        f"Head {head_name!r} from {source} was trained on a different base model "
        f"({record.get('base_model_name_or_path')!r}): its embedding-table fingerprint "
        f"{record.get('embedding_fingerprint')} differs from this model's {fingerprint}."
    )
    if not ignore_base_mismatch:
        raise ValueError(message + " Load it on the base it was trained on, or pass ignore_base_mismatch=True.")
    warnings.warn(message + " Loading it anyway (ignore_base_mismatch=True).", stacklevel=3)


def hotswap_weights(resident: torch.nn.Module, loaded: torch.nn.Module, head_name: str) -> None:
    """Copy ``loaded``'s weights into ``resident`` in place (as PEFT's ``hotswap``: an optimiser holding the
    resident parameters keeps them); the two heads' options must be the same."""
    if resident.config != loaded.config:
        raise ValueError(
            f"Cannot hotswap head {head_name!r}: the saved head's options {loaded.config.to_dict()} differ from "
            f"the resident head's {resident.config.to_dict()}."
        )
    with torch.no_grad():
        for name, tensor in loaded.state_dict().items():
            resident.get_parameter(name).copy_(tensor)


def push_head_to_hub(
    model,
    repo_id: str,
    head_name: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
    **card_fields,
) -> str:
    """Save one head (see :func:`save_head`) and upload it to a Hub model repo; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as directory:
        save_head(model, directory, head_name=head_name, **card_fields)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=directory,
            commit_message=commit_message or f"Upload backward-attention head {head_name or model.config.active_head}",
            revision=revision,
        )
    return str(commit)
