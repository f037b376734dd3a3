"""Supervised fine-tuning data: math problems in the OpenMathInstruct-2 columns, as prompt and target tokens.

Each row has ``problem``, ``generated_solution`` and ``expected_answer`` (the columns of
``nvidia/OpenMathInstruct-2``). A :class:`PromptTemplate` turns a row into a prompt (``problem``) and a target
(``generated_solution`` followed by a final-answer line carrying ``expected_answer``); the loss covers the
target tokens only (prompt labels are ``-100``). Rows that cannot be used are skipped and counted by reason.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import string
from collections import Counter
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

from ..errors import BackattnTypeError, BackattnValueError

OPENMATHINSTRUCT2 = "nvidia/OpenMathInstruct-2"
OPENMATHINSTRUCT2_SPLITS = ("train", "train_1M", "train_2M", "train_5M")
REQUIRED_COLUMNS = ("problem", "generated_solution", "expected_answer")
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
IGNORE_INDEX = -100


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    """How a row becomes text: ``prompt`` may use ``{problem}``; ``target`` also ``{generated_solution}`` and
    ``{expected_answer}``. The tokenizer's end-of-sequence token closes every target."""

    prompt: str = "Question: {problem}\nAnswer: "
    target: str = "{generated_solution}\nThe final answer is {expected_answer}."

    def __post_init__(self) -> None:
        for name, text, allowed in (
            ("prompt", self.prompt, {"problem"}),
            ("target", self.target, set(REQUIRED_COLUMNS)),
        ):
            if not isinstance(text, str):
                raise BackattnTypeError(
                    f"The {name} template must be a str (a format string), got {type(text).__name__} {text!r}."
                )
            try:
                fields = {field for _, field, _, _ in string.Formatter().parse(text) if field is not None}
            except ValueError as error:
                raise BackattnValueError(
                    f"The {name} template {text!r} is not a valid format string: {error}."
                ) from error
            if not fields <= allowed:
                raise BackattnValueError(
                    f"The {name} template uses {sorted(fields - allowed)}; it may use only {sorted(allowed)}."
                )
        if "{problem}" not in self.prompt:
            raise BackattnValueError(f"The prompt template {self.prompt!r} must contain {{problem}}.")

    def render_prompt(self, row: dict[str, str]) -> str:
        return self.prompt.format(problem=row["problem"])

    def render_target(self, row: dict[str, str]) -> str:
        return self.target.format(**{column: row[column] for column in REQUIRED_COLUMNS})

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


def load_math_dataset(
    name_or_path: str, split: str = "train", streaming: bool = False, max_samples: int | None = None
) -> datasets.Dataset:
    """A math data set with the OpenMathInstruct-2 columns, from a local file or the Hub.

    A path ending in ``.json``, ``.jsonl``, ``.parquet`` or ``.csv`` is read locally (``split`` is ignored);
    anything else is a Hub id such as ``nvidia/OpenMathInstruct-2`` (splits ``train``, ``train_1M``,
    ``train_2M``, ``train_5M``). With ``streaming`` (for the 14M-row set), the first ``max_samples`` rows
    are streamed and kept; ``max_samples`` is then required.
    """
    if name_or_path == OPENMATHINSTRUCT2 and not streaming and split not in OPENMATHINSTRUCT2_SPLITS:
        raise BackattnValueError(
            f"{OPENMATHINSTRUCT2} has the splits {', '.join(OPENMATHINSTRUCT2_SPLITS)}; got {split!r}."
        )
    needs = f"a math data set needs rows with the columns {', '.join(REQUIRED_COLUMNS)}"
    dataset = load_rows(name_or_path, split, streaming, max_samples, needs,
                        check=lambda columns: check_columns(columns or REQUIRED_COLUMNS, name_or_path))  # fmt: skip
    check_columns(dataset.column_names, name_or_path)
    return dataset


def load_rows(
    name_or_path: str,
    split: str = "train",
    streaming: bool = False,
    max_samples: int | None = None,
    needs: str = "a data set needs rows",
    check=None,
) -> datasets.Dataset:
    """Rows of a local ``.json`` / ``.jsonl`` / ``.parquet`` / ``.csv`` file (``split`` ignored) or of a Hub data set
    (``datasets.load_dataset``; with ``streaming``, the first ``max_samples`` rows, whose column names go to
    ``check`` before any row is read). ``needs`` says what the rows must hold, in the errors."""
    check_max_samples(max_samples)
    path = Path(name_or_path)
    if path.suffix in LOCAL_FORMATS:
        if not path.is_file():
            raise FileNotFoundError(f"No data file at {path}.")
        dataset = _load_local_file(path, needs)
    elif path.exists():
        raise BackattnValueError(f"{path}: use a .json, .jsonl, .parquet or .csv file, or a Hub data set id.")
    elif streaming:
        if max_samples is None:
            raise BackattnValueError(
                "Streaming keeps the first max_samples rows: set max_samples (--max_train_samples)."
            )
        stream = datasets.load_dataset(name_or_path, split=split, streaming=True)
        if check is not None:
            check(stream.column_names)
        return datasets.Dataset.from_list(list(stream.take(max_samples)))
    else:
        dataset = datasets.load_dataset(name_or_path, split=split)
    return first_rows(dataset, max_samples)


def check_max_samples(max_samples: int | None) -> None:
    if max_samples is not None and (
        isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1
    ):
        raise BackattnValueError(f"max_samples must be a positive integer (or None: every row), got {max_samples!r}.")


def first_rows(dataset: datasets.Dataset, max_samples: int | None) -> datasets.Dataset:
    """The first ``max_samples`` rows (all of them with None)."""
    return dataset if max_samples is None else dataset.select(range(min(max_samples, len(dataset))))


def _load_local_file(path: Path, needs: str) -> datasets.Dataset:
    """A local data file as a data set; ``BackattnValueError`` naming the file (and the line, where there is
    one) when it is empty, not UTF-8 text, or not readable in its format."""
    file_format = LOCAL_FORMATS[path.suffix]
    if file_format != "parquet":
        _check_utf8(path)
    if path.stat().st_size == 0 or (file_format != "parquet" and not _has_text(path)):
        raise BackattnValueError(f"{path} is empty: {needs}.")
    try:
        dataset = datasets.load_dataset(file_format, data_files=str(path), split="train")
    except (datasets.exceptions.DatasetGenerationError, StopIteration, ValueError, OSError) as error:
        raise BackattnValueError(_unreadable(path, error)) from error
    if len(dataset) == 0:
        raise BackattnValueError(f"{path} holds no rows: {needs}.")
    return dataset


def _check_utf8(path: Path, chunk_size: int = 1 << 20) -> None:
    """``BackattnValueError`` naming the first line of ``path`` that is not UTF-8 (read in chunks, no copy kept)."""
    decoder, line = codecs.getincrementaldecoder("utf-8")(), 1
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(chunk_size)
            try:
                line += decoder.decode(chunk, final=not chunk).count("\n")
            except UnicodeDecodeError as error:
                line += error.object[: error.start].count(b"\n")
                raise BackattnValueError(
                    f"{path}, line {line}: not UTF-8 text ({error.reason} at byte "
                    f"{error.object[error.start : error.start + 1]!r}). Save the file as UTF-8 (for example "
                    f"iconv -f latin1 -t utf-8), or fix that line."
                ) from None
            if not chunk:
                return


def _has_text(path: Path, chunk_size: int = 1 << 20) -> bool:
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            if chunk.strip():
                return True
    return False


def _unreadable(path: Path, error: BaseException) -> str:
    """Why ``path`` could not be read: for JSON, the first line that does not parse (or is not an object)."""
    cause = error.__cause__ or error.__context__ or error
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as handle:
            for number, text in enumerate(handle, start=1):
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as bad:
                    return f"{path}, line {number}: not valid JSON ({bad.msg}, column {bad.colno}); fix or remove it."
                if not isinstance(row, dict):
                    return (
                        f"{path}, line {number}: a JSON {type(row).__name__}, not an object; each line must be one "
                        f"object with the columns {', '.join(REQUIRED_COLUMNS)}."
                    )
    if path.suffix == ".json":
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as bad:
            return f"{path}, line {bad.lineno}: not valid JSON ({bad.msg}, column {bad.colno}); fix the file."
        if not content:
            return f"{path} holds no rows: a math data set needs rows with the columns {', '.join(REQUIRED_COLUMNS)}."
    if "corresponds to no data" in str(cause):  # datasets' words for a file without rows (a CSV header alone)
        return f"{path} holds no rows: a math data set needs rows with the columns {', '.join(REQUIRED_COLUMNS)}."
    return (
        f"{path} could not be read as {LOCAL_FORMATS[path.suffix]} ({type(cause).__name__}: {cause}); check that the "
        f"file is a valid {path.suffix} file, or convert it to .jsonl."
    )


def check_columns(column_names: list[str], source: str) -> None:
    missing = [column for column in REQUIRED_COLUMNS if column not in column_names]
    if missing:
        raise BackattnValueError(
            f"{source} lacks the column(s) {', '.join(missing)}; a math data set needs {', '.join(REQUIRED_COLUMNS)} "
            f"(the OpenMathInstruct-2 columns). It has: {', '.join(column_names)}."
        )


def _as_text(value: Any, column: str) -> str | None:
    """The field as non-empty text, or ``None``. Numeric answers (as CSV or parquet may store them) are text."""
    if column == "expected_answer" and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(int(value)) if float(value).is_integer() else repr(value)
    if not isinstance(value, str) or not value.strip():
        return None
    return value.strip()


def tokenize_examples(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    template: PromptTemplate,
    max_length: int,
    keep_columns: tuple[str, ...] = (),
) -> tuple[datasets.Dataset, Counter]:
    """Prompt + target token ids with target-only labels; returns the kept rows and the skips by reason.

    ``keep_columns`` are copied from the data set into the kept rows as they are (e.g. ``template_id``).

    ``answer_labels`` are the labels of the tokens spelling ``expected_answer`` in the target (its last
    occurrence), ``-100`` elsewhere: the loss on the final answer alone.

    Skipped: a missing, empty or non-text field (``missing_or_empty_<column>``), and a row whose prompt and
    target do not fit in ``max_length`` tokens (``too_long``). Raises ``ValueError`` when no row is left.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise BackattnValueError(
            f"max_length must be a positive integer (tokens per prompt + target), got {max_length!r}."
        )
    missing = [column for column in keep_columns if column not in dataset.column_names]
    if missing:
        raise BackattnValueError(
            f"keep_columns names {missing}, which the data set lacks; its columns are {dataset.column_names}."
        )
    if tokenizer.eos_token_id is None:
        raise BackattnValueError("The tokenizer has no end-of-sequence token; set tokenizer.eos_token.")
    skipped: Counter = Counter()
    kept: dict[str, list] = {"input_ids": [], "labels": [], "answer_labels": [], "prompt": [], "expected_answer": []}
    kept.update({column: [] for column in keep_columns})
    for row in dataset:
        fields = {column: _as_text(row.get(column), column) for column in REQUIRED_COLUMNS}
        bad = [column for column, value in fields.items() if value is None]
        if bad:
            skipped[f"missing_or_empty_{bad[0]}"] += 1
            continue
        prompt = template.render_prompt(fields)
        prompt_ids = tokenizer(prompt)["input_ids"]
        target = template.render_target(fields)
        encoded = tokenizer(target, add_special_tokens=False, return_offsets_mapping=True)
        target_ids = encoded["input_ids"] + [tokenizer.eos_token_id]
        # the tokens that spell the final answer: those overlapping its last occurrence in the target
        start = target.rfind(fields["expected_answer"])
        end = start + len(fields["expected_answer"])
        in_answer = [start >= 0 and a < end and b > start for a, b in encoded["offset_mapping"]] + [False]
        if len(prompt_ids) + len(target_ids) > max_length:
            skipped["too_long"] += 1
            continue
        kept["input_ids"].append(prompt_ids + target_ids)
        kept["labels"].append([IGNORE_INDEX] * len(prompt_ids) + target_ids)
        kept["answer_labels"].append(
            [IGNORE_INDEX] * len(prompt_ids) + [t if a else IGNORE_INDEX for t, a in zip(target_ids, in_answer)]
        )
        kept["prompt"].append(prompt)
        kept["expected_answer"].append(fields["expected_answer"])
        for column in keep_columns:
            kept[column].append(row[column])
    if not kept["input_ids"]:
        reasons = ", ".join(f"{count} {reason}" for reason, count in skipped.items()) or "the data set is empty"
        raise BackattnValueError(f"No usable rows: {reasons}. Check the columns' contents and max_length={max_length}.")
    return datasets.Dataset.from_dict(kept), skipped


def sft_tokenizer(model_name_or_path: str | Path) -> PreTrainedTokenizerBase:
    """The base model's tokenizer, set up for :func:`tokenize_examples` and :class:`SFTCollator`: padding on
    the right, with the end-of-sequence token as pad token when the tokenizer has none (GPT-2, SmolLM2)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


class SFTCollator:
    """Pads ``input_ids`` (pad token), ``labels`` (-100) and ``attention_mask`` with the Transformers
    collator, and pads precomputed ``base_hidden_states`` (from a feature cache) with zeros alongside, and each
    decoder block's ``base_layer_states`` the same way (for heads with ``query_layers``)."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None = None, answer_labels: bool = False
    ):
        self.pad = DataCollatorForSeq2Seq(
            tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, pad_to_multiple_of=pad_to_multiple_of
        )
        self.answer_labels = answer_labels  # also pad ``answer_labels`` (for evaluation; not a model input)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        hidden = [feature.get("base_hidden_states") for feature in features]
        batch = self.pad([{k: feature[k] for k in ("input_ids", "labels")} for feature in features])
        if self.answer_labels:
            answers = self.pad([{"input_ids": f["input_ids"], "labels": f["answer_labels"]} for f in features])
            batch["answer_labels"] = answers["labels"]
        length, left = batch["input_ids"].shape[1], self.pad.tokenizer.padding_side == "left"

        def padded(rows: list) -> torch.Tensor:
            out = torch.zeros(len(rows), length, rows[0].shape[-1], dtype=torch.as_tensor(rows[0]).dtype)
            for row, states in enumerate(rows):
                positions = slice(length - len(states), length) if left else slice(0, len(states))
                out[row, positions] = torch.as_tensor(states)
            return out

        if hidden[0] is not None:
            batch["base_hidden_states"] = padded(hidden)
        if features[0].get("base_layer_states"):
            blocks = features[0]["base_layer_states"]
            batch["base_layer_states"] = {k: padded([f["base_layer_states"][k] for f in features]) for k in blocks}
        return batch
