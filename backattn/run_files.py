"""What a script run reads, writes and checks before its work: its arguments file, its arguments' types and ranges,
a writable output directory, files written atomically, and settings the base model's context window cannot hold
(``train_sft.py``, ``evaluate_math.py``, ``evaluate_sentiment.py``)."""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import tempfile
import typing
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from .errors import BackattnTypeError, BackattnValueError, RunDirectoryError

_TYPE_WORDS = {str: "a string", bool: "true or false", int: "an integer", float: "a number"}


def check_argument_values(args, ranges: dict) -> None:
    """``BackattnTypeError`` / ``BackattnValueError`` naming the first field of the dataclass ``args`` of the wrong
    type or out of range (a YAML or JSON file's values are not converted, so their types are checked here too).
    ``ranges``: field name -> (a description, a test of the value), for values that are not ``None``."""
    hints = typing.get_type_hints(type(args))
    for option in dataclasses.fields(args):
        name, value = option.name, getattr(args, option.name)
        choices = typing.get_args(hints[name])
        optional = type(None) in choices
        kind = next(c for c in choices if c is not type(None)) if optional else hints[name]
        if value is None and optional:
            continue
        if kind is bool:
            right_type = isinstance(value, bool)
        elif kind is float:
            right_type = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            right_type = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if not right_type:
            raise BackattnTypeError(
                f"--{name} must be {_TYPE_WORDS[kind]}{' (or None)' if optional else ''}, got "
                f"{type(value).__name__} {value!r}; the default is {option.default!r}."
            )
        if name in ranges:
            description, allowed = ranges[name]
            if not allowed(value):
                raise BackattnValueError(
                    f"--{name} must be {description}, got {value!r}; the default is {option.default!r}."
                )


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


def read_arguments_file(path: Path, *argument_classes) -> dict:
    """The arguments a YAML or JSON file holds, as a dict, every name one of ``argument_classes``' fields; a
    clear error naming the file (and line) otherwise."""
    if not path.is_file():
        raise BackattnValueError(f"No arguments file at {path}: check the path.")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise BackattnValueError(
                f"{path}, line {error.lineno}: not valid JSON ({error.msg}, column {error.colno}); fix the file."
            ) from None
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f", line {mark.line + 1}" if mark is not None else ""
            problem = getattr(error, "problem", None) or str(error)
            raise BackattnValueError(f"{path}{where}: not valid YAML ({problem}); fix the file.") from None
    if data is None:
        raise BackattnValueError(f"{path} is empty: give one argument per line, e.g. batch_size: 8.")
    if not isinstance(data, dict):
        raise BackattnValueError(
            f"{path} must hold a mapping of argument names to values (e.g. batch_size: 8), got "
            f"{type(data).__name__} {data!r}"[:300]
            + "."
        )
    known = {option.name for cls in argument_classes for option in dataclasses.fields(cls)}
    unknown = sorted(str(key) for key in data if key not in known)
    if unknown:
        hints = [f"{name} (did you mean {', '.join(close)}?)" if (close := difflib.get_close_matches(name, known))
                 else name for name in unknown]  # fmt: skip
        listing = f"; the arguments are {', '.join(sorted(known))}" if len(known) <= 40 else " (see --help)"
        raise BackattnValueError(f"{path} names unknown argument(s) {', '.join(hints)}{listing}.")
    return data


def parse_command_line(argument_classes, argv: list[str]) -> tuple:
    """``argument_classes`` (dataclasses) filled from ``argv``: ``[file] [--option value ...]``, where ``file`` is a
    ``.yaml`` / ``.yml`` / ``.json`` file of arguments (every name checked, :func:`read_arguments_file`) and each
    flag after it overrides (or adds to) the file's arguments, e.g. ``train_sft.py configs/demo.yaml --seed 1``."""
    parser = HfArgumentParser(argument_classes)
    if argv and argv[0].endswith((".json", ".yaml", ".yml")):
        options = read_arguments_file(Path(argv[0]).resolve(), *parser.dataclass_types)
        if len(argv) == 1:
            return parser.parse_dict(options, allow_extra_keys=False)
        parser.set_defaults(**options)  # the flags that follow override these
        for action in parser._actions:
            if action.dest in options:
                action.required = False  # given by the file
        argv = argv[1:]
    return parser.parse_args_into_dataclasses(args=argv)
