"""Head files: one head saved on its own, without its base model, and read back with every check.

A saved head is a directory (local, or a Hub repo) holding

* ``head_config.json``: the head's options (:class:`BackwardAttentionConfig`), its name, the base model it
  was built on (id, revision, model type, a fingerprint of the input-embedding table ``E``), the library
  version, the SHA-256 of the weights file and free-form metadata (task, prompt template, ...);
* ``head.safetensors``: the head's tensors alone (never the embedding table), loaded with safetensors only;
* ``README.md``: a Hub-ready model card (:mod:`backattn.head_card`).

Writing is atomic for the directory as a whole: the head is staged in a sibling directory that then takes
the directory's place in one step (:func:`write_head`), writers of one directory take a lock, and readers
read both files from one version of the directory. The config's checksum of the weights makes a mismatched
or damaged pair fail loudly on reading instead of loading wrong weights.

The model's ``save_head``, ``load_head`` (with ``hotswap=``) and ``push_head_to_hub`` are :func:`save_head`,
:func:`load_head` and :func:`push_head_to_hub` here. Head files of every format version so far load; version
1 (backattn 0.1.0) named two options ``num_heads`` and ``head_combine`` (see ``RENAMED_OPTIONS``).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from .configuration_backattn import BackwardAttentionConfig
from .errors import BackattnValueError, HeadFileError
from .head_card import build_head_card

HEAD_CONFIG_NAME = "head_config.json"
HEAD_WEIGHTS_NAME = "head.safetensors"
MODEL_CARD_NAME = "README.md"
FORMAT_VERSION = 2  # 1: backattn 0.1.0 (options num_heads, head_combine); 2: their new names
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def embedding_fingerprint(embeddings: torch.Tensor) -> str:
    """SHA-256 of the embedding table rounded to bfloat16 (so a float32 and a bfloat16 copy of one base agree)."""
    table = embeddings.detach().to(device="cpu", dtype=torch.bfloat16).contiguous()
    digest = hashlib.sha256(table.view(torch.int16).numpy().tobytes())
    digest.update(repr(tuple(table.shape)).encode())
    return "sha256-bf16:" + digest.hexdigest()


# --------------------------------------------------------------------------------------------------------
# writing a head directory atomically
#
# The head is written into a staging sibling ``.<name>.tmp-<id>``, which then takes the place of ``<name>``
# in one step: ``renameat2(RENAME_EXCHANGE)`` on Linux swaps the two directories atomically, so at every
# instant ``<name>`` is the old complete head or the new one. Where the system cannot swap directories,
# two renames do it (``<name>`` -> ``.<name>.old-<id>``, staging -> ``<name>``) and a reader that finds no
# ``<name>`` in between reads the old one. Writers of one directory are serialised by a ``filelock`` lock.
# Whatever a killed save leaves (staging or old siblings) is ignored by readers and cleared by the next save.

STAGING_INFIX, OLD_INFIX = ".tmp-", ".old-"
LOCK_TIMEOUT_SECONDS = 600.0
READ_RETRY_SECONDS = 10.0
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _after(step: str) -> None:
    """Called after each step of a save; fault-injection tests replace it to kill the process there."""


def _exchange(first: Path, second: Path) -> bool:
    """Swap two directories atomically (Linux ``renameat2``); False where the system or filesystem cannot."""
    if sys.platform != "linux":
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(second))


def _siblings(directory: Path, infix: str) -> list[Path]:
    return sorted(directory.parent.glob(f".{directory.name}{infix}*"))


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _carry_over(source: Path, target: Path, ours: set[str]) -> None:
    """Hard-link (or copy) every entry of ``source`` that is not one of our files into ``target``."""
    for entry in source.iterdir():
        if entry.name in ours:
            continue
        destination = target / entry.name
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, destination, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, destination)


def _link_or_copy(source, destination) -> None:
    if os.path.islink(source):
        os.symlink(os.readlink(source), destination)
        return
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def writer_lock(directory: Path):
    """The inter-process lock of one head directory's writers: one of 256 lock files in backattn's cache
    directory, chosen by the path's hash (head directories and their parents stay free of lock files, and
    the cache does not grow with every checkpoint; two paths sharing a file only wait for each other)."""
    from filelock import FileLock

    try:  # absolute (Transformers reads relative imports as files); absent when run as remote code
        from backattn.data.cache_dirs import default_cache_dir
    except ImportError:

        def default_cache_dir() -> Path:
            return Path(os.environ.get("BACKATTN_CACHE", "~/.cache/backattn")).expanduser()

    locks = default_cache_dir() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:2]
    return FileLock(locks / f"head-{key}.lock", timeout=LOCK_TIMEOUT_SECONDS)


def _recover(directory: Path) -> None:
    """Under the writer lock: restore a head a killed two-rename save left aside, clear every other leftover."""
    if not directory.exists() and _siblings(directory, OLD_INFIX):
        os.rename(_siblings(directory, OLD_INFIX)[-1], directory)
    for leftover in (*_siblings(directory, STAGING_INFIX), *_siblings(directory, OLD_INFIX)):
        shutil.rmtree(leftover, ignore_errors=True)


def is_backattn_card(directory: Path) -> bool:
    """Whether ``directory/README.md`` is the head card that ``save_head`` last wrote there (its SHA-256 is the
    one recorded in ``head_config.json``)."""
    card, config = directory / MODEL_CARD_NAME, directory / HEAD_CONFIG_NAME
    try:
        recorded = json.loads(config.read_text()).get("model_card_sha256")
        return recorded is not None and recorded == hashlib.sha256(card.read_bytes()).hexdigest()
    except (OSError, ValueError, AttributeError):
        return False


def _check_model_card(directory: Path, overwrite_model_card: bool) -> None:
    """Refuse to replace a ``README.md`` that the previous save into ``directory`` did not write."""
    card = directory / MODEL_CARD_NAME
    if overwrite_model_card or not card.is_file() or is_backattn_card(directory):
        return
    raise HeadFileError(
        f"{card} was not written by backattn (or was edited since): saving the head would replace it. Save "
        "into another directory, move the file, pass model_card=False to keep it, or overwrite_model_card=True."
    )


def write_head(
    save_directory: str | os.PathLike,
    state_dict: dict[str, torch.Tensor],
    record: dict[str, Any],
    model_card: str | None,
    overwrite_model_card: bool = False,
) -> Path:
    """Write a head's weights, model card and config as one directory, atomically; return the directory.

    Everything is serialised in memory first, so an error there (a bad tensor, a value JSON cannot hold)
    changes nothing on disk. Entries of an existing directory that are not the head's files are kept.
    """
    directory = Path(save_directory)
    if directory.exists() and not directory.is_dir():
        raise HeadFileError(f"Cannot save a head to {directory}: it is a file, not a directory. Give a directory path.")
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in state_dict.items()}
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise HeadFileError(f"Refusing to save head tensor {name!r}: it holds NaN or inf values.")
    weights = save(tensors, metadata={"format": "pt", "backattn_head": str(FORMAT_VERSION)})
    card = model_card.encode() if model_card is not None else None
    record = {**record, "format_version": FORMAT_VERSION, "weights_sha256": hashlib.sha256(weights).hexdigest()}
    if card is not None:
        record["model_card_sha256"] = hashlib.sha256(card).hexdigest()
    config = (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()

    from filelock import Timeout

    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        with writer_lock(directory):
            _recover(directory)
            if card is not None:
                _check_model_card(directory, overwrite_model_card)
            staging = directory.parent / f".{directory.name}{STAGING_INFIX}{uuid.uuid4().hex[:12]}"
            staging.mkdir()
            try:
                _write_file(staging / HEAD_WEIGHTS_NAME, weights)
                _after("weights")
                if card is not None:
                    _write_file(staging / MODEL_CARD_NAME, card)
                    _after("card")
                _write_file(staging / HEAD_CONFIG_NAME, config)
                _after("config")
                ours = {HEAD_WEIGHTS_NAME, HEAD_CONFIG_NAME} | ({MODEL_CARD_NAME} if card is not None else set())
                if directory.is_dir():
                    _carry_over(directory, staging, ours)
                    _after("carried")
                _fsync_directory(staging)
                _swap_in(staging, directory)
                _fsync_directory(directory.parent)
            finally:
                shutil.rmtree(staging, ignore_errors=True)  # the old head after a swap, or a failed staging
    except Timeout as error:
        raise HeadFileError(
            f"Another process has been saving a head into {directory} for {LOCK_TIMEOUT_SECONDS:.0f} s; wait for "
            "it to finish, or save into another directory."
        ) from error
    except OSError as error:
        raise HeadFileError(
            f"Could not save the head to {directory} ({error.strerror or error}); the directory holds what it held "
            "before. Free disk space or choose a writable directory."
        ) from error
    return directory


def _swap_in(staging: Path, directory: Path) -> None:
    """Put ``staging`` at ``directory``; afterwards ``staging`` holds the old directory, if any."""
    if not directory.exists():
        os.rename(staging, directory)
    elif not _exchange(staging, directory):
        old = directory.parent / f".{directory.name}{OLD_INFIX}{uuid.uuid4().hex[:12]}"
        os.rename(directory, old)
        _after("set aside")
        os.rename(staging, directory)
        os.rename(old, staging)
    _after("swapped")


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
        if not (path / HEAD_CONFIG_NAME).is_file() and (path / "head" / HEAD_CONFIG_NAME).is_file():
            return path / "head"  # a train_sft.py output directory: its head
        return path
    if not path.exists() and _siblings(path, OLD_INFIX):  # a two-rename save is between its renames
        return _siblings(path, OLD_INFIX)[-1]
    if path.exists():
        raise HeadFileError(
            f"{path} is a file; a head is a directory holding {HEAD_CONFIG_NAME} and {HEAD_WEIGHTS_NAME}."
        )
    text = str(name_or_path)
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or (path.parent != Path(".") and path.parent.is_dir()):
        raise HeadFileError(
            f"No head directory {path}: it does not exist here (read as a local path, since "
            f"{'its parent ' + str(path.parent) + ' exists' if path.parent.is_dir() else 'it is not a Hub id'}). "
            "Check the path, or give a Hub repo id (owner/name)."
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(
            snapshot_download(
                text,
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
        raise HeadFileError(f"{text!r} is neither a local directory nor a valid Hub repo id.") from error
    except RepositoryNotFoundError as error:
        raise HeadFileError(
            f"{text!r} is not a local directory, and the Hub has no repo of that id you can read: check the id, "
            "or log in (huggingface-cli login / token=) for a private or gated repo."
        ) from error
    except LocalEntryNotFoundError as error:
        raise HeadFileError(
            f"{text!r} is not a local directory, and it is not in the local Hub cache while offline "
            "(HF_HUB_OFFLINE=1 or local_files_only=True): download it once online, or give its local directory."
        ) from error


def _read_snapshot(directory: Path) -> tuple[bytes | None, bytes | None]:
    """The config's and the weights' bytes (None where missing), both from one version of the directory.

    Both files are opened relative to one open handle of the directory. If a save swapped the directory
    meanwhile (its inode changed) and a file vanished or the pair does not match, the read is repeated
    (for up to ``READ_RETRY_SECONDS``, while saves keep swapping it).
    """
    deadline = time.monotonic() + READ_RETRY_SECONDS
    while True:
        try:
            handle = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except FileNotFoundError:  # a two-rename save between its renames: the old head is aside
            if not _siblings(directory, OLD_INFIX):
                raise
            handle = os.open(_siblings(directory, OLD_INFIX)[-1], os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            contents = []
            for name in (HEAD_CONFIG_NAME, HEAD_WEIGHTS_NAME):
                try:
                    descriptor = os.open(name, os.O_RDONLY, dir_fd=handle)
                except FileNotFoundError:
                    contents.append(None)
                    continue
                with open(descriptor, "rb") as file:
                    contents.append(file.read())
            try:
                swapped = os.stat(directory).st_ino != os.fstat(handle).st_ino
            except FileNotFoundError:
                swapped = True
        finally:
            os.close(handle)
        config, weights = contents
        whole = config is not None and weights is not None and _matches(config, weights)
        if whole or not swapped or time.monotonic() > deadline:
            return config, weights
        time.sleep(0.001)


def _matches(config: bytes, weights: bytes) -> bool:
    try:
        return json.loads(config).get("weights_sha256") == hashlib.sha256(weights).hexdigest()
    except (ValueError, AttributeError):
        return False


def read_head(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The record of ``head_config.json`` and the tensors of ``head.safetensors``, checked against each other."""
    config_path, weights_path = directory / HEAD_CONFIG_NAME, directory / HEAD_WEIGHTS_NAME
    config, weights = _read_snapshot(directory)
    if weights is None:
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise HeadFileError(
                f"{directory} holds {', '.join(pickles)} but no {HEAD_WEIGHTS_NAME}: pickle files are never loaded "
                "(unpickling can run arbitrary code). Convert the weights to safetensors and save them again."
            )
        raise HeadFileError(f"No head weights in {directory}: {HEAD_WEIGHTS_NAME} is missing.")
    if config is None:
        raise HeadFileError(f"No head config in {directory}: {HEAD_CONFIG_NAME} is missing.")
    try:
        record = json.loads(config)
        if not isinstance(record, dict) or not isinstance(record.get("head_options"), dict):
            raise ValueError("it has no 'head_options' object")
    except ValueError as error:
        raise HeadFileError(f"{config_path} is not a valid head config ({error}); save the head again.") from error
    version = record.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise HeadFileError(
            f"{config_path} has format_version {version!r}, newer than this backattn reads ({FORMAT_VERSION}): "
            "upgrade backattn (pip install -U backattn)."
        )
    expected = record.get("weights_sha256")
    if expected is not None and hashlib.sha256(weights).hexdigest() != expected:
        raise HeadFileError(
            f"{weights_path} does not match its config (SHA-256 differs): the file is truncated, corrupted or "
            "from another save. Save or download the head again."
        )
    try:
        tensors = load(weights)
    except SafetensorError as error:
        raise HeadFileError(f"{weights_path} is not a readable safetensors file ({error}).") from error
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise HeadFileError(
                f"{weights_path}: tensor {name!r} has dtype {tensor.dtype}; a head's weights are floating point. "
                "Save the head again with save_head."
            )
        if not torch.isfinite(tensor).all():
            raise HeadFileError(f"{weights_path}: tensor {name!r} holds NaN or inf values; the head is damaged.")
    return record, tensors


def head_options(record: dict[str, Any]) -> BackwardAttentionConfig:
    """The head's options; ``from_dict`` reads the 0.1.0 option names as well."""
    return BackwardAttentionConfig.from_dict(record["head_options"])


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
    license: str | None = None,
    eval_dataset: str | None = None,
    model_card: bool = True,
    overwrite_model_card: bool = False,
) -> Path:
    """Save one head (default: the active one) on its own: config, safetensors weights and model card.

    Only the head's tensors are written, never the base's. The directory is replaced as a whole, atomically
    (see :func:`write_head`): at every instant it holds the old complete head or the new one, and a save
    that fails leaves it as it was. Other files in it are kept. A ``README.md`` that an earlier save did not
    write makes the save refuse, unless ``model_card=False`` (keep it, write no card) or
    ``overwrite_model_card=True``.
    """
    head_name = head_name or model.config.active_head
    if head_name is None:
        raise BackattnValueError("No head is active; name the head to save with head_name=, or set_head(name) first.")
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
    card = build_head_card(head_name, record, num_parameters, task, training_data, metrics, license, eval_dataset)
    return write_head(
        save_directory, head.state_dict(), record, str(card) if model_card else None, overwrite_model_card
    )


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
        raise BackattnValueError(
            f"A head named {head_name!r} is already loaded; pass another head_name=, hotswap=True, or "
            "delete_head it first."
        )
    head_config = head_options(record)
    if head_config.vocab_size is None or head_config.hidden_size is None:
        raise HeadFileError(f"The head config in {directory} does not record the base's vocab_size and hidden_size.")
    head = model.build_head(head_config)
    _check_fingerprint(model, record, head_name, head_name_or_path, ignore_base_mismatch)
    try:
        head.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise HeadFileError(
            f"The weights in {directory} do not fit the head described by its config: {error}"
        ) from error
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
        raise BackattnValueError(message + " Load it on the base it was trained on, or pass ignore_base_mismatch=True.")
    warnings.warn(message + " Loading it anyway (ignore_base_mismatch=True).", stacklevel=3)


def hotswap_weights(resident: torch.nn.Module, loaded: torch.nn.Module, head_name: str) -> None:
    """Copy ``loaded``'s weights into ``resident`` in place (as PEFT's ``hotswap``: an optimiser holding the
    resident parameters keeps them); the two heads' options must be the same."""
    if resident.config != loaded.config:
        mine, theirs = resident.config.to_dict(), loaded.config.to_dict()
        changed = {key: (theirs[key], mine[key]) for key in mine if mine[key] != theirs.get(key)}
        raise BackattnValueError(
            f"Cannot hotswap head {head_name!r}: the saved head's options differ from the resident head's in "
            f"{changed} (saved, resident). Load it under another name, or build the resident head with the "
            "saved options (resuming a run: the same --preset, --head_options and --label_word_loss)."
        )
    resident_state = resident.state_dict(keep_vars=True)  # parameters and buffers (standardize_query_state's)
    with torch.no_grad():
        for name, tensor in loaded.state_dict().items():
            resident_state[name].copy_(tensor)


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
        if revision is not None:  # a new branch starts from main, as a Transformers push_to_hub(revision=) does
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=directory,
            commit_message=commit_message or f"Upload backward-attention head {head_name or model.config.active_head}",
            revision=revision,
        )
    return str(commit)
