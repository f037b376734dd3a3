"""What a script run writes and checks before its work: a writable output directory, files written atomically,
and settings the base model's context window cannot hold (``train_sft.py``, ``evaluate_math.py``)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import BackattnValueError, RunDirectoryError


def writable_directory(path: str | os.PathLike, option: str = "--output_dir") -> Path:
    """``path`` as a directory that exists and can be written (created if missing); a clear error otherwise."""
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise RunDirectoryError(f"{option} {directory} is a file; give a directory.")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise RunDirectoryError(f"{option} {directory} is not writable ({error.strerror}); choose another.") from error
    return directory


def write_text_atomically(path: Path, text: str) -> None:
    """Write under a temporary name, then rename: the file is the old one or the new one, never half of one."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def check_context_window(config, max_length: int, max_new_tokens: int) -> None:
    """Prompt plus target (``max_length``) plus generated tokens must fit the base's context window."""
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if context and max_length + max_new_tokens > context:
        raise BackattnValueError(
            f"--max_length {max_length} + --max_new_tokens {max_new_tokens} exceeds the base's context window of "
            f"{context} tokens: lower one of them."
        )
