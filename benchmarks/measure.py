"""Timing and peak memory for the benchmark scripts (``bench_efficiency``, ``bench_heads``, ``bench_feature_cache``).

Repeated calls are timed by ``torch.utils.benchmark.Timer`` (:func:`median_seconds`) at the process's thread
count; a call that runs once by nature (an epoch that trains a fresh model, a cache built once) by a wall
clock (:class:`WallClock`). Peak memory (:class:`PeakMemory`) is the process's peak resident set during a block
(Linux): ``psutil`` reads the resident set, but neither it nor the standard library can reset or read a peak
within a running process (``resource.getrusage``'s ``ru_maxrss`` is the whole life's peak, and
``torch.profiler(profile_memory=True)`` counts tensor allocations, not the process, so model weights
mapped from disk and allocator overhead would be missed and the published figures would change meaning). The
kernel keeps that high-water mark (``VmHWM``, resettable through ``/proc/self/clear_refs``): it is read here.

Scripts run as ``python benchmarks/<script>.py``, so ``benchmarks/`` is on ``sys.path`` and ``import measure``
finds this file.
"""

from __future__ import annotations

import ctypes
import re
import time
from pathlib import Path

import psutil
import torch
from torch.utils.benchmark import Measurement, Timer


def timer(function) -> Timer:
    """A ``Timer`` of ``function()`` at the thread count torch uses now (``Timer``'s own default is 1 thread)."""
    return Timer(stmt="function()", globals={"function": function}, num_threads=torch.get_num_threads())


def median_seconds(function, calls: int = 1, min_run_time: float = 0.0) -> Measurement:
    """``Timer.blocked_autorange`` of ``function()`` until at least ``calls`` blocks are timed: the result's
    ``.median`` is the median seconds of one call, ``.times`` the seconds per call of each block.

    Each ``blocked_autorange`` first runs the statement untimed to choose a block size (a warm-up: one call
    for anything slower than about 10 ms; faster calls are then timed in blocks of 10, 100, ... calls), then
    times blocks for at least ``min_run_time`` seconds, and at least one. Slow calls want a count rather than
    a run time: while fewer than ``calls`` blocks are timed, another ``blocked_autorange`` (one more warm-up)
    is asked for the missing ones as a run time, ``missing - 1/2`` median blocks. So ``calls`` slow calls
    usually cost ``calls + 2`` (``2`` for one); calls that speed up or slow down may give a block more or
    need another round. As with ``timeit``, garbage collection is off while a block is timed.
    """
    clock = timer(function)
    measurement = clock.blocked_autorange(min_run_time=min_run_time)
    while (missing := calls - len(measurement.times)) > 0:
        block = measurement.median * measurement.number_per_run
        more = clock.blocked_autorange(min_run_time=(missing - 0.5) * block)
        (measurement,) = Measurement.merge([measurement, more])  # one task: one measurement, per-call times
    return measurement


class WallClock:
    """Seconds a block takes, once (``with WallClock() as clock: ...``, then ``clock.seconds``): for a call that
    cannot be repeated as it is (it trains a fresh model, or builds a cache that a second call would reuse),
    which ``Timer`` would run again as a warm-up and then time repeatedly."""

    seconds: float

    def __enter__(self) -> WallClock:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc_info) -> None:
        self.seconds = time.perf_counter() - self._start


def _high_water_kib() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


class PeakMemory:
    """The process's peak resident set during the block and what the block adds to the resident set it
    started from, in MiB (``with PeakMemory() as memory: ...``, then ``memory.peak_mib``, ``memory.added_mib``).

    Linux with glibc. On entry glibc is told to return every freed block of 64 KiB or more to the system from
    then on and to trim its heap now, so the peak follows live tensors rather than freed ones glibc kept; then
    the kernel's high-water mark is reset to the current resident set.
    """

    peak_mib: float
    added_mib: float

    def __enter__(self) -> PeakMemory:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 65536)  # M_MMAP_THRESHOLD: blocks of 64 KiB or more are mapped, and unmapped when freed
        libc.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        self._process = psutil.Process()
        self._before = self._process.memory_info().rss
        return self

    def __exit__(self, *exc_info) -> None:
        peak = max(_high_water_kib() * 1024, self._process.memory_info().rss)
        self.peak_mib, self.added_mib = peak / 2**20, (peak - self._before) / 2**20


def counted(measurement: Measurement) -> str:
    """``"median of 3"`` (calls timed one at a time, or merged rounds), ``"median of 12 blocks of 1000"``."""
    blocks, size = len(measurement.times), measurement.number_per_run
    return f"median of {blocks}" if size == 1 else f"median of {blocks} blocks of {size}"
