"""The head-file fault tests, run many times: kills after every step of a save, kills at random moments,
concurrent writers against a reader, a full disk. Each repetition is a fresh pytest process.

    .venv/bin/python benchmarks/repeat_fault_tests.py --repetitions 20

Writes ``benchmarks/results/fault_tests.json``: repetitions run and passed, and the random kills survived.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
SELECTION = "killed or random_moments or concurrent or full_disk"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repetitions", type=int, default=20)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "fault_tests.json"))
    args = parser.parse_args(argv)
    command = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "tests/test_head_files.py",
               "-k", SELECTION]  # fmt: skip
    passed, kills, outcomes, failures, started = 0, 0, {}, [], time.perf_counter()
    for repetition in tqdm(range(args.repetitions), desc="fault-test repetitions"):
        environment = {**os.environ, "BACKATTN_FAULT_SEED": str(repetition)}  # other random kill moments each time
        run = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True)
        passed += run.returncode == 0
        if run.returncode != 0:
            failed = re.findall(r"^(?:FAILED|ERROR) .*$", run.stdout, re.M)
            failures.append({"repetition": repetition, "failed": failed, "output_tail": run.stdout[-3000:]})
        found = re.search(r"(\d+) random kills during repeated saves: every head whole \((.*)\)", run.stdout)
        if run.returncode == 0 and found:
            kills += int(found.group(1))
            for name, count in re.findall(r"'(\w+)': (\d+)", found.group(2)):
                outcomes[name] = outcomes.get(name, 0) + int(count)
        tests = re.search(r"(\d+) passed", run.stdout)
    summary = {
        "command": " ".join(command[2:]), "repetitions": args.repetitions, "passed": passed,
        "tests_per_repetition": int(tests.group(1)) if tests else None, "random_kills_survived": kills,
        "head_found_after_random_kills": outcomes, "seconds": round(time.perf_counter() - started, 1),
        "failures": failures,
    }  # fmt: skip
    Path(args.output).write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
