"""train_sft.py end to end on a small local file, its configuration forms, bad input and a killed run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file

import train_sft
from backattn import BackwardAttentionConfig
from backattn.errors import BackattnValueError, RunDirectoryError
from backattn.head_files import HEAD_WEIGHTS_NAME

ROOT = Path(__file__).resolve().parents[1]


def arguments(tiny_gpt2_dir, math_jsonl, tmp_path, **overrides):
    options = {
        "model_name_or_path": str(tiny_gpt2_dir), "dataset": str(math_jsonl), "eval_size": "8",
        "output_dir": str(tmp_path / "out"), "cache_dir": str(tmp_path / "cache"), "max_steps": "6",
        "save_steps": "3", "eval_steps": "3", "logging_steps": "1", "per_device_train_batch_size": "4",
        "learning_rate": "0.03", "num_generation_examples": "2", "max_new_tokens": "4", "max_length": "96",
        "disable_tqdm": "true",
    }  # fmt: skip
    options.update(overrides)
    return [item for key, value in options.items() for item in (f"--{key}", value)]


def test_a_short_run_end_to_end(tiny_gpt2_dir, math_jsonl, tmp_path, capsys, monkeypatch):
    committed = tmp_path / "committed.json"  # as if this run were on the setup of the committed comparison
    row = {"method": "head hidden", "budget": 1, "metrics": {"target_ce": {"value": 1.25, "low": 1.0, "high": 1.5}}}
    committed.write_text(json.dumps({"rows": {"head hidden lr=0.001 @1T": row}, "held_out_problems": 340}))
    monkeypatch.setattr(train_sft, "COMPARISON_RESULTS", committed)
    monkeypatch.setattr(train_sft, "same_setup_as_comparison", lambda *args: True)
    results = train_sft.main(arguments(tiny_gpt2_dir, math_jsonl, tmp_path))
    out = tmp_path / "out"
    assert {"head", "loss_curve.png", "comparison.md", "eval_results.json"} <= {p.name for p in out.iterdir()}
    assert {p.name for p in (out / "head").iterdir()} == {"head.safetensors", "head_config.json", "README.md"}
    assert not list(out.rglob("model.safetensors"))  # never a copy of the base
    record = json.loads((out / "head" / "head_config.json").read_text())
    assert record["metadata"]["prompt_template"]["prompt"] == "Question: {problem}\nAnswer: "
    comparison = results["comparison"]
    assert set(comparison) == {"frozen base", "base + trained head"}
    assert comparison["base + trained head"]["target_ce"] < comparison["frozen base"]["target_ce"]
    assert results["train_examples"] == 32 and results["eval_examples"] == 8
    printed = capsys.readouterr().out
    assert "| frozen base |" in printed and "| answer-token CE |" in printed and "Example (held out):" in printed
    head, base = comparison["base + trained head"], comparison["frozen base"]
    difference = head["summary"]["target_ce"]["minus_base"]
    assert difference["value"] == pytest.approx(head["target_ce"] - base["target_ce"], abs=1e-9)
    assert difference["low"] <= difference["value"] <= difference["high"]
    assert f"| base + trained head minus frozen base | {difference['value']:+.4f} [" in printed
    assert {"mc_direct", "parse_rate", "repetition_rate"} <= set(head["summary"])
    assert "full comparison" in printed and "| head hidden lr=0.001 @1T | 1.2500 [1.0000, 1.5000] |" in printed
    card = (out / "head" / "README.md").read_text()
    assert "| accuracy |" in card and "| target_ce |" in card and "| answer_ce |" in card


def test_a_yaml_config_file_is_the_same_as_the_command_line(tiny_gpt2_dir, math_jsonl, tmp_path):
    args = arguments(tiny_gpt2_dir, math_jsonl, tmp_path)
    options = {key[2:]: yaml.safe_load(value) for key, value in zip(args[::2], args[1::2])}  # typed, as people write
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(options))
    parsed = train_sft.parse_arguments([str(config)])
    assert parsed == train_sft.parse_arguments(args)
    assert parsed[2].dataset == str(math_jsonl) and parsed[3].max_steps == 6
    # flags after the file override its arguments (and add others), as on the command line alone
    changed = train_sft.parse_arguments([str(config), "--max_steps", "3", "--head_options", '{"base_kl_weight": 1}'])
    expected = train_sft.parse_arguments([*args, "--max_steps", "3", "--head_options", '{"base_kl_weight": 1}'])
    assert changed == expected and changed[3].max_steps == 3 and changed[1].head_config().base_kl_weight == 1


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        ({"preset": "turbo"}, ValueError, "Unknown head preset 'turbo'"),
        ({"head_options": '{"out_dim": 31, "num_heads": 2}'}, ValueError, "does not divide"),
        ({"head_options": "{out_dim: 3"}, ValueError, "--head_options is not valid JSON"),
        ({"prompt_template": "Q: {question}"}, ValueError, "prompt template uses"),
        ({"streaming": "true", "dataset": "nvidia/OpenMathInstruct-2"}, ValueError, "set --max_train_samples"),
        ({"gradient_checkpointing": "true"}, ValueError, "forces gradients through the frozen base"),
        ({"label_smoothing_factor": "0.1"}, ValueError, "label_smoothing_factor"),
        ({"feature_cache_dtype": "int8"}, ValueError, "float16 or float32"),
        ({"resume_from_checkpoint": "/no/such/checkpoint"}, ValueError, "is not a directory"),
        ({"dataset": "/no/such/file.jsonl"}, BackattnValueError, "No data file"),
        ({"learning_rate": "-0.1"}, BackattnValueError, "--learning_rate must be a positive number, got -0.1"),
        ({"learning_rate": "nan"}, BackattnValueError, "--learning_rate must be a positive number, got nan"),
        ({"per_device_train_batch_size": "0"}, BackattnValueError, "--per_device_train_batch_size must be positive"),
        ({"per_device_eval_batch_size": "0"}, BackattnValueError, "--per_device_eval_batch_size must be positive"),
        ({"max_new_tokens": "-1"}, BackattnValueError, "--max_new_tokens must be 0 or more, got -1"),
        ({"num_generation_examples": "-2"}, BackattnValueError, "--num_generation_examples must be 0 or more"),
        ({"max_length": "0"}, BackattnValueError, "--max_length must be positive"),
        ({"max_steps": "0"}, BackattnValueError, "Nothing to train"),
        ({"max_steps": "-1", "num_train_epochs": "0"}, BackattnValueError, "Nothing to train"),
        ({"output_dir": __file__}, RunDirectoryError, "is a file; give a directory"),
        ({"resume_from_checkpoint": "True"}, RunDirectoryError, "found no complete checkpoint"),
    ],
)
def test_bad_arguments_fail_before_any_model_is_loaded(
    tiny_gpt2_dir, math_jsonl, tmp_path, monkeypatch, overrides, error, message
):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the arguments were checked")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_loading)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_loading)
    with pytest.raises(error, match=message):
        train_sft.main(arguments(tiny_gpt2_dir, math_jsonl, tmp_path, **overrides))


def test_missing_columns_are_named(tiny_gpt2_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(json.dumps({"question": f"q{i}", "answer": "1"}) for i in range(20)))
    with pytest.raises(ValueError, match="lacks the column\\(s\\) problem, generated_solution, expected_answer"):
        train_sft.main(arguments(tiny_gpt2_dir, bad, tmp_path))


def test_a_run_killed_with_sigkill_resumes_from_its_last_checkpoint(tiny_gpt2_dir, math_jsonl, tmp_path):
    common = {"max_steps": "14", "save_steps": "3", "eval_strategy": "no", "save_total_limit": "10"}
    straight = train_sft.main(arguments(tiny_gpt2_dir, math_jsonl, tmp_path / "straight", **common))
    assert straight["train_examples"] == 32

    run = tmp_path / "killed"
    command = [sys.executable, str(ROOT / "train_sft.py"), *arguments(tiny_gpt2_dir, math_jsonl, run, **common)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not (run / "out" / "checkpoint-6" / "trainer_state.json").exists():
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint-6 within 240 s"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    checkpoints = sorted(int(p.name.split("-")[1]) for p in (run / "out").glob("checkpoint-*"))
    assert 6 <= checkpoints[-1] < 14, checkpoints  # killed mid-run
    assert not (run / "out" / "head").exists()
    # A save killed midway: the newest checkpoint lacks its trainer state; resume skips it and says so.
    newest = run / "out" / f"checkpoint-{checkpoints[-1] + 3}"
    newest.mkdir()
    (newest / "head.safetensors").write_bytes(b"partial")

    resumed = subprocess.run(
        command + ["--resume_from_checkpoint", "True"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"skipped the incomplete {newest.name}" in resumed.stderr
    state = json.loads((run / "out" / "checkpoint-14" / "trainer_state.json").read_text())
    steps = [entry["step"] for entry in state["log_history"] if "loss" in entry]
    assert steps == list(range(1, 15))  # every step once: nothing lost, nothing repeated
    expected = load_file(tmp_path / "straight" / "out" / "checkpoint-14" / "head.safetensors")
    got = load_file(run / "out" / "checkpoint-14" / "head.safetensors")
    for name, tensor in expected.items():
        assert torch.allclose(got[name], tensor, atol=1e-6), name


def test_accelerate_launch_runs_it_data_parallel(tiny_gpt2_dir, math_jsonl, tmp_path):
    """Two CPU processes through `accelerate launch`, with no code change: each step sees 2 x 4 rows.

    `--multi_gpu` is accelerate's torchrun launcher (its `--cpu` starts one process); on a machine without
    GPUs the Trainer then needs `--use_cpu true` to run data-parallel on the CPU (gloo).
    """
    accelerate = Path(sys.executable).parent / "accelerate"
    command = [
        str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "train_sft.py"),
        *arguments(tiny_gpt2_dir, math_jsonl, tmp_path, max_steps="4", save_steps="4", eval_strategy="no",
                   use_cpu="true"),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads((tmp_path / "out" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert state["epoch"] == pytest.approx(1.0)  # 32 training rows / (2 processes x batch 4) = 4 steps an epoch
    assert (tmp_path / "out" / "head" / "head.safetensors").exists()


def test_a_second_run_never_destroys_the_first(tiny_gpt2_dir, math_jsonl, tmp_path, monkeypatch):
    args = arguments(tiny_gpt2_dir, math_jsonl, tmp_path, max_steps="3")
    train_sft.main(args)
    out = tmp_path / "out"
    first = {p.name: p.read_bytes() for p in (out / "head").iterdir()}
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(
        RunDirectoryError, match=r"holds an earlier run \(checkpoint-3, comparison.md, .*--overwrite_output_dir"
    ):
        train_sft.main(args)
    assert sorted(p.name for p in out.iterdir()) == before
    assert {p.name: p.read_bytes() for p in (out / "head").iterdir()} == first

    # Overwriting: a failure after training (here, in the held-out evaluation) still leaves the new head saved.
    def fail(*args, **kwargs):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(train_sft, "compare_with_base", fail)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        train_sft.main([*args, "--overwrite_output_dir", "true", "--learning_rate", "0.01"])
    assert not (out / "eval_results.json").exists()  # the earlier run's results went with --overwrite_output_dir
    second = {p.name: p.read_bytes() for p in (out / "head").iterdir()}
    assert second[HEAD_WEIGHTS_NAME] != first[HEAD_WEIGHTS_NAME] and "Not measured yet" in second["README.md"].decode()


def test_settings_the_base_cannot_hold_fail_before_the_data_is_loaded(tiny_gpt2_dir, math_jsonl, tmp_path, monkeypatch):
    monkeypatch.setattr(train_sft, "load_splits", lambda *a: pytest.fail("the data was loaded first"))
    with pytest.raises(BackattnValueError, match="exceeds the base's context window of 128 tokens"):
        train_sft.main(arguments(tiny_gpt2_dir, math_jsonl, tmp_path, max_length="96", max_new_tokens="40"))


@pytest.mark.parametrize(
    "text, message",
    [
        ("max_steps: [1,\n  batch: 3\n", r"line 3: not valid YAML"),
        ("max_stepz: 3\n", r"unknown argument\(s\) max_stepz \(did you mean max_steps"),
        ("", "is empty"),
        ("- 1\n- 2\n", "must hold a mapping of argument names to values"),
    ],
)
def test_a_bad_config_file_is_named_with_its_line(tmp_path, text, message):
    config = tmp_path / "config.yaml"
    config.write_text(text)
    with pytest.raises(BackattnValueError, match=message):
        train_sft.parse_arguments([str(config)])


def test_the_committed_comparison_is_shown_for_the_same_preset(tmp_path):
    def metric(value):
        return {"value": value, "low": value - 0.1, "high": value + 0.1, "minus_base": {"value": value - 1.5,
                "low": value - 1.6, "high": value - 1.4}}  # fmt: skip

    def row(method, budget, value):
        return {"method": method, "budget": budget, "metrics": {"target_ce": metric(value)}}

    rows = {"frozen base": row("frozen base", 0, 1.5), "LoRA attention lr=0.01 @1T": row("LoRA attention", 1, 1.1),
            "head seed lr=0.1 @1T": row("head seed", 1, 1.4), "head hidden lr=0.001 @2T": row("head hidden", 2, 1.3),
            "head hidden lr=0.001 @1T": row("head hidden", 1, 1.2)}  # fmt: skip
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"rows": rows, "held_out_problems": 340}))
    hidden = BackwardAttentionConfig.from_preset("hidden")
    lines = train_sft.committed_comparison(hidden, path).splitlines()
    assert lines[0].startswith("340 held-out problems")
    names = [line.split(" | ")[0][2:] for line in lines[3:]]
    heads, lora = ["head hidden lr=0.001 @1T", "head hidden lr=0.001 @2T"], "LoRA attention lr=0.01 @1T"
    assert names == ["frozen base", *heads, lora, *(f"{name} minus frozen base" for name in (*heads, lora))]
    assert lines[-1].endswith("| -0.4000 [-0.5000, -0.3000] |")
    assert train_sft.committed_comparison(BackwardAttentionConfig.from_preset("gated"), path) is None
    assert train_sft.committed_comparison(hidden, tmp_path / "absent.json") is None

    # A head with options beyond its preset is found by its recorded config, not by its name.
    kl = {"preset": "hidden", "options": {"base_kl_weight": 1.0}}
    rows["head hidden + KL lr=0.003 @1T"] = {**row("head hidden + KL", 1, 1.15), "head": kl}
    path.write_text(json.dumps({"rows": rows, "held_out_problems": 340}))
    with_kl = BackwardAttentionConfig.from_preset("hidden", base_kl_weight=1.0)
    names = [line.split(" | ")[0][2:] for line in train_sft.committed_comparison(with_kl, path).splitlines()[3:]]
    assert names[:3] == ["frozen base", "head hidden + KL lr=0.003 @1T", lora]
    assert "head hidden + KL" not in train_sft.committed_comparison(hidden, path)
