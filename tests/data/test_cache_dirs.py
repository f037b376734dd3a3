"""Cache directories built once, atomically (backattn/data/cache_dirs.py). The SmolLM2 conversion's use of them
is tested in test_offline.py."""

import json
import os
import subprocess
import sys
import time

import pytest

from backattn.data.cache_dirs import build_once, default_cache_dir, read_marker

MARKER = ".done.json"


def _complete(path):
    return read_marker(path, MARKER, 1) is not None


def _writer(calls):
    def build(directory):
        calls.append(directory)
        (directory / "rows.txt").write_text("rows\n")
        (directory / MARKER).write_text(json.dumps({"format": 1}))  # last

    return build


def test_built_once_then_reused(tmp_path):
    calls = []
    final = tmp_path / "root" / "thing"
    assert build_once(final, _writer(calls), _complete) is True
    assert build_once(final, _writer(calls), _complete) is False
    assert len(calls) == 1 and calls[0] != final and not calls[0].exists()  # built in a renamed temporary
    assert (final / "rows.txt").read_text() == "rows\n"
    assert sorted(p.name for p in final.parent.iterdir()) == [".thing.lock", "thing"]


def test_a_failed_build_leaves_nothing(tmp_path):
    def fail(directory):
        (directory / "rows.txt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_once(tmp_path / "thing", fail, _complete)
    assert [p.name for p in tmp_path.iterdir()] == [".thing.lock"]


def test_leftover_temporaries_are_removed_and_markers_checked(tmp_path):
    leftover = tmp_path / ".thing.tmp-dead"
    leftover.mkdir()
    old = time.time() - 7200
    os.utime(leftover, (old, old))
    build_once(tmp_path / "thing", _writer([]), _complete)
    assert not leftover.exists()
    assert read_marker(tmp_path / "thing", MARKER, 2) is None  # another format number
    assert read_marker(tmp_path, MARKER, 1) is None  # no marker


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("BACKATTN_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path


def test_the_build_holds_an_inter_process_lock(tmp_path):
    """While one process builds, another cannot take the build's lock (filelock.FileLock, flock on POSIX)."""
    probe = (
        "import sys, filelock\n"
        "try:\n    filelock.FileLock(sys.argv[1]).acquire(timeout=0.2)\n"
        "except filelock.Timeout:\n    sys.exit(3)\n"
    )
    lock_file = tmp_path / ".thing.lock"
    codes = []

    def build(directory):
        codes.append(subprocess.run([sys.executable, "-c", probe, str(lock_file)], timeout=60).returncode)
        _writer([])(directory)

    build_once(tmp_path / "thing", build, _complete)
    assert codes == [3]  # held during the build
    assert subprocess.run([sys.executable, "-c", probe, str(lock_file)], timeout=60).returncode == 0  # then free
