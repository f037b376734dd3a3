"""The benchmark scripts still run (smoke tests at a tiny scale; their figures come from full runs)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_baselines_runs_every_variant(tiny_gpt2_dir, math_jsonl, tmp_path):
    script = load_script("compare_baselines")
    results = script.main([
        "--model_name_or_path", str(tiny_gpt2_dir), "--dataset", str(math_jsonl), "--train_examples", "8",
        "--eval_examples", "4", "--generation_examples", "1", "--max_new_tokens", "2", "--batch_size", "4",
        "--no-sweep", "--output_dir", str(tmp_path),
    ])  # fmt: skip
    assert list(results) == [
        "frozen base", "head (seed)", "head (hidden)", "LoRA on attention", "rank-1 LoRA on the output layer",
        "output layer retrained",
    ]  # fmt: skip
    head, lora = results["head (hidden)"]["trainable_parameters"], results["LoRA on attention"]["trainable_parameters"]
    assert abs(lora - head) <= 0.1 * head
    assert (tmp_path / "results.md").exists() and (tmp_path / "results.json").exists()


def test_efficiency_benchmark_measures_and_reports(tmp_path):
    """In-process, at a tiny scale: the real script spawns one process per measurement."""
    script = load_script("bench_efficiency")
    options = script.arguments(["--tiny", "--batch_size", "2", "--seq_len", "12", "--steps", "1", "--new_tokens", "3",
                                "--repeats", "1", "--top_k", "4"])  # fmt: skip
    training = {v: script.measure_training("gpt2-small", v, options) for v in ("frozen base forward", "LoRA on attention")}
    training["head, chunked loss"] = script.measure_training("gpt2-small", "head, chunked loss", options)
    head, lora = training["head, chunked loss"], training["LoRA on attention"]
    assert abs(lora["trainable_parameters"] - head["trainable_parameters"]) <= 0.1 * head["trainable_parameters"]
    assert all(r["seconds"] > 0 and r["peak_mib"] > 0 for r in training.values())
    generation = script.measure_generation("smollm2", options)
    assert set(generation) == {"plain base", "head, full", "head, top-4"} and min(generation.values()) > 0
    table = script.report("gpt2-small", training, generation, options)
    assert "| head, chunked loss | " in table and "| head, top-4 |" in table
