"""The benchmark scripts still run (smoke tests at a tiny scale; their figures come from full runs)."""

import importlib.util
import json
import math
import re
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_script(name):
    if str(ROOT / "benchmarks") not in sys.path:  # as when run as a script: `import measure` (benchmarks/measure.py)
        sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
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
    training = {
        v: script.measure_training("gpt2-small", v, options) for v in ("frozen base forward", "LoRA on attention")
    }
    training["head, chunked loss"] = script.measure_training("gpt2-small", "head, chunked loss", options)
    head, lora = training["head, chunked loss"], training["LoRA on attention"]
    assert abs(lora["trainable_parameters"] - head["trainable_parameters"]) <= 0.1 * head["trainable_parameters"]
    assert all(r["seconds"] > 0 and r["peak_mib"] > 0 for r in training.values())
    generation = script.measure_generation("smollm2", options)
    assert set(generation) == {"plain base", "head, full", "head, top-4"} and min(generation.values()) > 0
    table = script.report("gpt2-small", training, generation, options)
    assert "| head, chunked loss | " in table and "| head, top-4 |" in table


def test_benchmark_timer_and_peak_memory_helpers():
    measure = load_script("measure")
    calls = []
    timed = measure.median_seconds(lambda: (calls.append(1), time.sleep(0.02)), calls=3)
    # Slow calls one at a time: the Timer's untimed warm-up and one timed call, then (as often as needed) one
    # more warm-up and about the missing ones.
    assert len(timed.times) >= 3 and timed.number_per_run == 1 and len(calls) >= 5
    assert 0.02 <= timed.median < 0.5 and measure.counted(timed) == f"median of {len(timed.times)}"
    fast = measure.median_seconds(lambda: None, min_run_time=0.05)  # fast calls: in blocks
    assert fast.number_per_run > 1 and measure.counted(fast).startswith(f"median of {len(fast.times)} blocks of ")
    with measure.WallClock() as clock:
        time.sleep(0.01)
    assert clock.seconds >= 0.01
    with measure.PeakMemory() as memory:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del block
    assert memory.peak_mib >= memory.added_mib >= 60


def test_heads_benchmark_runs_on_a_tiny_model(tiny_llama_and_rows, monkeypatch, capsys):
    script = load_script("bench_heads")
    monkeypatch.setattr(script, "smollm2_path", lambda: tiny_llama_and_rows / "model")
    script.main()
    out = capsys.readouterr().out
    assert int(re.search(r"full model from_pretrained: [\d.]+ s \(median of (\d+)\)", out).group(1)) >= 3
    assert "| seed | " in out and "| hidden | " in out and "set_head (switch the active head):" in out


def test_feature_cache_benchmark_runs_on_a_tiny_model(tiny_llama_and_rows, monkeypatch, capsys):
    import datasets

    script = load_script("bench_feature_cache")
    rows = datasets.load_dataset("json", data_files=str(tiny_llama_and_rows / "rows.jsonl"), split="train")
    monkeypatch.setattr(script, "smollm2_path", lambda: tiny_llama_and_rows / "model")
    monkeypatch.setattr(script, "build_gsm_symbolic", lambda **kwargs: {"train": rows})
    script.main(["--examples", "8", "--batch_size", "4"])
    out = capsys.readouterr().out
    assert "| epoch, base run every step |" in out and "| epoch from the feature cache |" in out
    assert "| building the cache (once) |" in out and "largest difference" in out


def test_compare_heads_runs_every_method_resumes_and_splits_by_template(tiny_llama_and_rows, tmp_path, monkeypatch):
    script = load_script("compare_heads")
    rows_file = str(tiny_llama_and_rows / "rows.jsonl")
    argv = ["--model_name_or_path", str(tiny_llama_and_rows / "model"), "--dataset", rows_file,
            "--train_templates", "0-3", "--eval_templates", "4-5", "--budgets", "1", "2", "--budget_problems", "8",
            "--batch_size", "4", "--calibration_steps", "1", "--generation_problems", "3", "--max_new_tokens", "3",
            "--n_resamples", "50", "--max_eval_problems", "5", "--output_dir", str(tmp_path / "out"),
            "--work_dir", str(tmp_path / "work"), "--learning_rates", "0.003"]  # fmt: skip
    summary = script.main(argv)
    rows = summary["rows"]
    assert {r["method"] for r in rows.values()} == {"frozen base", *script.METHODS}
    assert summary["held_out_problems"] == 5 and summary["held_out_templates"] == 2
    for name, row in rows.items():
        if name == "frozen base":
            continue
        assert row["training_seconds"] <= row["budget"] * row["T_seconds"] + 1e-9  # never over its budget
        metrics = row["metrics"]
        assert {"target_ce", "answer_ce", "mc_direct", "mc_after_solution"} <= set(metrics)
        assert ("greedy_accuracy" in metrics) == (row["budget"] == 2)
        assert metrics["target_ce"]["low"] <= metrics["target_ce"]["value"] <= metrics["target_ce"]["high"]
        assert "minus_base" in metrics["target_ce"]
        lora = rows[f"LoRA attention lr=0.003 @{row['budget']:g}T"]["metrics"]
        if row["method"] == "LoRA attention":
            assert "minus_lora" not in row
        else:  # paired to LoRA at the same budget: a difference of means is the difference of the two means
            for metric in ("mc_direct", "copied_answer"):
                difference = metrics[metric]["value"] - lora[metric]["value"]
                assert row["minus_lora"][metric]["value"] == pytest.approx(difference, abs=1e-12), (name, metric)
    assert "Paired difference to LoRA attention" in (tmp_path / "out" / "results.md").read_text()
    for name in ("results.json", "results.md", "pareto_target_ce.png", "pareto_mc.png", "greedy.png"):
        assert (tmp_path / "out" / name).is_file()

    # The report alone, from the results so far, without training or scoring anything.
    assert script.main([*argv, "--report_only", "true"])["rows"].keys() == rows.keys()

    # A second sitting finds every result and trains nothing.
    monkeypatch.setattr(script.BudgetTrainer, "train", lambda *a, **k: pytest.fail("trained again"))
    again = script.main(argv)
    assert again["rows"].keys() == rows.keys()
    assert again["rows"]["LoRA attention lr=0.003 @2T"]["metrics"] == rows["LoRA attention lr=0.003 @2T"]["metrics"]

    # A sitting with other settings refuses to mix its results with these.
    with pytest.raises(ValueError, match=r"another setup \(differs in \['batch_size'\]\)"):
        script.main([*argv, "--batch_size", "2"])

    # Without --learning_rates, the rates come from a validation run, and there is none here.
    with pytest.raises(ValueError, match="No validation choice of learning rate"):
        script.main([*argv[:-2], "--validation_results", str(tmp_path / "missing.json")])

    # The split is by template: every held-out problem's template is outside the training templates.
    options = script.ComparisonArguments(dataset=rows_file, train_templates="0-3", eval_templates="4-5")
    train, held_out = script.load_rows(options)
    assert set(held_out["template_id"]) == {4, 5} and not set(train["template_id"]) & set(held_out["template_id"])
    with pytest.raises(ValueError, match="overlap"):
        script.load_rows(script.ComparisonArguments(dataset=rows_file, train_templates="0-4", eval_templates="4-5"))


def test_compare_heads_calibrates_alone_and_the_run_reuses_its_timings(tiny_llama_and_rows, tmp_path, monkeypatch):
    script = load_script("compare_heads")
    rows_file = str(tiny_llama_and_rows / "rows.jsonl")
    argv = ["--model_name_or_path", str(tiny_llama_and_rows / "model"), "--dataset", rows_file,
            "--train_templates", "0-3", "--eval_templates", "4-5", "--budgets", "1", "--budget_problems", "8",
            "--batch_size", "4", "--calibration_steps", "1", "--metrics", "teacher_forced", "--n_resamples", "50",
            "--max_eval_problems", "4", "--output_dir", str(tmp_path / "out"), "--work_dir", str(tmp_path / "work"),
            "--methods", "head hidden", "IA3", "--validation_results", str(tmp_path / "none.json")]  # fmt: skip
    # No validation choice is needed to time steps, and nothing is scored or trained.
    monkeypatch.setattr(script, "score", lambda *a, **k: pytest.fail("scored while calibrating"))
    calibration = script.main([*argv, "--calibrate_only", "true"])
    assert {key.split(":")[1] for key in calibration if key.startswith("step_seconds")} == {
        "LoRA attention", "head hidden", "IA3"}  # fmt: skip
    assert "feature_cache_seconds:test:16" in calibration
    assert not (tmp_path / "out" / "runs").exists()
    # The run proper reads those timings and times nothing again.
    monkeypatch.undo()
    monkeypatch.setattr(script, "step_seconds", lambda *a, **k: pytest.fail("timed again"))
    summary = script.main([*argv, "--learning_rates", "0.003"])
    row = summary["rows"]["IA3 lr=0.003 @1T"]
    assert row["step_seconds"] == calibration["step_seconds:IA3:4"]
    assert row["T_seconds"] == 2 * calibration["step_seconds:LoRA attention:4"]  # ceil(8 / 4) LoRA steps

    # Re-timed later (calibration.json rewritten): a method whose step time now affords other steps is trained
    # and scored again; one whose steps are unchanged keeps its scores, and only the seconds charged are rewritten.
    calibration_path = tmp_path / "out" / "calibration.json"
    timings = {
        "step_seconds:LoRA attention:4": 1.0,
        "step_seconds:head hidden:4": 0.25,
        "step_seconds:IA3:4": 0.5,
        "feature_cache_seconds:test:16": 1.0,
    }  # T = 2 s: 4 steps each (the cache paid in the first epoch)
    calibration_path.write_text(json.dumps({**calibration, **timings}))
    before = script.main([*argv, "--learning_rates", "0.003"])["rows"]
    assert before["head hidden lr=0.003 @1T"]["steps"] == before["IA3 lr=0.003 @1T"]["steps"] == 4
    timings.update({"step_seconds:head hidden:4": 0.5, "step_seconds:IA3:4": 0.499})  # head: 2 // (0.5 + 4/16)
    calibration_path.write_text(json.dumps({**calibration, **timings}))
    trained, train = [], script.BudgetTrainer.train
    monkeypatch.setattr(script.BudgetTrainer, "train", lambda self, **k: (trained.append(self.args.output_dir),
                                                                          train(self, **k))[1])  # fmt: skip
    after = script.main([*argv, "--learning_rates", "0.003"])["rows"]
    assert [Path(directory).name for directory in trained] == ["head_hidden_lr=0.003"]
    assert after["head hidden lr=0.003 @1T"]["steps"] == 2
    ia3 = after["IA3 lr=0.003 @1T"]
    assert ia3["steps"] == 4 and ia3["step_seconds"] == 0.499 and ia3["training_seconds"] == 4 * 0.499
    assert ia3["metrics"] == before["IA3 lr=0.003 @1T"]["metrics"]


@pytest.mark.parametrize("method", ["head hidden", "LM-Steer", "LoRA output layer"])
def test_compare_heads_scores_output_side_methods_from_cached_states_exactly(method, tiny_llama_and_rows, tmp_path):
    import torch

    script = load_script("compare_heads")
    base = str(tiny_llama_and_rows / "model")
    options = script.ComparisonArguments(
        model_name_or_path=base, batch_size=3, metrics=["teacher_forced", "multiple_choice"]
    )
    tokenizer = script.sft_tokenizer(base)
    rows = script.load_math_dataset(str(tiny_llama_and_rows / "rows.jsonl")).select(range(5))
    keep = ("template_id", "problem", "generated_solution")
    examples, _ = script.tokenize_examples(rows, tokenizer, script.PromptTemplate(), 384, keep)
    torch.manual_seed(1)
    model = script.METHODS[method].build(base, 500)
    with torch.no_grad():  # trained-looking weights: an untrained method would equal the base and hide a bug
        for parameter in (p for p in model.parameters() if p.requires_grad):
            parameter.normal_(0, 0.5)
    model.eval()
    states = script.HeldOutStates(base, tokenizer, examples, options, tmp_path)
    full = script.score(model, tokenizer, examples, options, generate=False)
    cached = script.score(model, tokenizer, examples, options, generate=False, states=states)
    assert full.keys() == cached.keys() and "mc_after_solution" in full
    for key in full:
        assert cached[key] == pytest.approx(full[key], rel=1e-4, abs=1e-4), key
    assert full["target_loss"] != pytest.approx(script.score(
        script.METHODS[method].build(base, 500).eval(), tokenizer, examples, options, generate=False
    )["target_loss"], rel=1e-3)  # fmt: skip


def test_compare_heads_runs_the_kl_and_copy_heads_of_issue_15(tiny_llama_and_rows, tmp_path):
    """The two issue-15 methods carry their options, train from cached features, and are scored: the KL head
    from the base's states (output side), the copy head by full forwards (it reads the input ids too)."""
    script = load_script("compare_heads")
    base = str(tiny_llama_and_rows / "model")
    kl, copy = script.METHODS["head hidden + KL"], script.METHODS["head hidden + copy"]
    supervised = script.METHODS["head hidden + copy, supervised"]
    assert kl.features and kl.output_side and copy.features and not copy.output_side and not supervised.output_side
    assert kl.build(base, 500).heads.default.config.base_kl_weight == 1.0
    assert copy.build(base, 500).heads.default.config.copy_attention
    assert supervised.build(base, 500).heads.default.config.copy_loss_weight == 1.0
    both = script.METHODS["head hidden + copy + KL"].build(base, 500).heads.default.config
    assert both.copy_attention and both.base_kl_weight == 1.0
    argv = ["--model_name_or_path", base, "--dataset", str(tiny_llama_and_rows / "rows.jsonl"),
            "--train_templates", "0-3", "--eval_templates", "4-5", "--budgets", "1", "--budget_problems", "8",
            "--batch_size", "4", "--calibration_steps", "1", "--metrics", "teacher_forced", "--n_resamples", "50",
            "--max_eval_problems", "4", "--output_dir", str(tmp_path / "out"), "--work_dir", str(tmp_path / "work"),
            "--methods", "head hidden + KL", "head hidden + copy", "head hidden + copy, supervised",
            "--learning_rates", "0.003",
            "--validation_results", str(tmp_path / "none.json")]  # fmt: skip
    calibration = script.main([*argv, "--calibrate_only", "true"])
    timings = {key: 0.25 for key in calibration if key.startswith("step_seconds") and "LoRA" not in key}
    timings["step_seconds:LoRA attention:4"] = 1.0  # T = 2 s: some steps for each head, whatever this machine's speed
    (tmp_path / "out" / "calibration.json").write_text(json.dumps({**calibration, **timings}))
    rows = script.main(argv)["rows"]
    for name in ("head hidden + KL", "head hidden + copy", "head hidden + copy, supervised"):
        row = rows[f"{name} lr=0.003 @1T"]
        assert row["steps"] > 0 and math.isfinite(row["metrics"]["target_ce"]["value"]), name
        assert 0 <= row["metrics"]["copied_answer"]["value"] <= 1 and 0 <= row["metrics"]["answer_exact"]["value"] <= 1
    assert rows["head hidden + KL lr=0.003 @1T"]["head"] == {"preset": "hidden", "options": {"base_kl_weight": 1.0}}

    # An unfinished run left by a sitting with another calibration (checkpoints at other steps) trains afresh.
    (tmp_path / "out" / "runs" / "head_hidden_+_KL_lr=0.003" / "budget-1T.json").unlink()
    (work,) = (tmp_path / "work").glob("*/head_hidden_+_KL_lr=0.003")
    stale = work / "checkpoint-999"
    stale.mkdir(parents=True)
    again = script.main(argv)["rows"]["head hidden + KL lr=0.003 @1T"]
    assert not stale.exists() and again["steps"] == rows["head hidden + KL lr=0.003 @1T"]["steps"]


def test_copy_task_marks_the_copies_and_its_copy_head_learns_them(tmp_path):
    """The synthetic rows: exactly the marked positions' next token is the one that followed the same token
    earlier. A short run trains and scores every method, keeps a finished method's results on a rerun, and
    writes its report and plot; the copy head already copies some tokens the base cannot."""
    script = load_script("copy_task")
    args = script.CopyTaskArguments(noise_tokens=20, span=4, vocab_size=200)
    rows = script.copy_sequences(30, args, seed=5)
    for ids, marks in zip(rows["input_ids"], rows["copy_mask"]):
        start = len(ids) - args.span
        assert [t for t, m in enumerate(marks) if m] == list(range(start, len(ids) - 1))
        for t in range(start, len(ids) - 1):
            assert any(ids[j] == ids[t] and ids[j + 1] == ids[t + 1] for j in range(start))
    argv = ["--noise_tokens", "20", "--span", "4", "--train_sequences", "400", "--validation_sequences", "20",
            "--test_sequences", "40", "--max_steps", "50", "--eval_every", "25", "--learning_rates", "0.01",
            "--output_dir", str(tmp_path)]  # fmt: skip
    results = script.main(argv)
    methods = results["methods"]
    assert list(methods) == list(script.METHODS)
    assert [step for step, _ in methods["head hidden + copy"]["curve"]] == [25, 50]
    base = methods["base"]["summary"]["copy accuracy"]["estimate"]
    assert methods["head hidden + copy"]["summary"]["copy accuracy"]["estimate"] > base + 0.1
    assert (tmp_path / "results.md").exists() and (tmp_path / "copy_task.png").exists()
    trained = []
    script.train = lambda *a, **k: trained.append(a) or (_ for _ in ()).throw(AssertionError("retrained"))
    again = script.main(argv)  # every method finished: nothing trains again
    assert not trained and again["methods"]["head hidden"] == json.loads(json.dumps(methods["head hidden"]))


def test_compare_heads_charges_the_feature_cache_through_the_first_epoch():
    script = load_script("compare_heads")
    # 100 problems, batches of 10: a first-epoch step costs 1 s + 10 problems x 0.5 s of cache = 6 s.
    steps, charged = script.budget_steps, script.charged_seconds
    assert steps(59.9, 1.0, 50.0, 100, 10) == 9 and steps(60.0, 1.0, 50.0, 100, 10) == 10
    assert charged(9, 1.0, 50.0, 100, 10) == 54.0 and charged(10, 1.0, 50.0, 100, 10) == 60.0
    # After the first epoch (10 steps, 60 s) the cache is paid for: each further step costs 1 s.
    assert steps(72.5, 1.0, 50.0, 100, 10) == 22 and charged(22, 1.0, 50.0, 100, 10) == 72.0
    # A budget smaller than one step affords none; without a cache, steps are seconds over step time.
    assert steps(5.9, 1.0, 50.0, 100, 10) == 0 and steps(7.0, 2.0, 0.0, 100, 10) == 3
    for seconds in (0.0, 3.0, 33.3, 60.0, 61.0, 500.0):  # never charged more than the budget
        assert charged(steps(seconds, 1.0, 50.0, 100, 10), 1.0, 50.0, 100, 10) <= seconds


def test_compare_heads_extends_the_learning_rate_grid_only_past_a_winning_edge():
    script = load_script("compare_heads")
    beyond = script.rate_beyond_edge
    assert beyond({1e-3: 1.0, 3e-3: 1.1, 1e-2: 1.2}) == 3e-4  # exactly: it names a run
    assert beyond({1e-3: 1.2, 3e-3: 1.1, 1e-2: 1.0}) == pytest.approx(3e-2)
    assert beyond({1e-3: 1.2, 3e-3: 1.0, 1e-2: 1.1}) is None  # the best is inside the grid
    assert beyond({3e-4: 1.0, 1e-3: 1.1}) == pytest.approx(1e-4)
    assert beyond({1e-3: 1.0}) is None  # one rate has no edge to go past
    assert beyond({0.1: 1.0, 0.3: 0.9}) is None  # the scale ends at 0.3
    # A diverged run (NaN) ranks last.
    assert script._finite(float("nan")) == float("inf") and script._finite(1.5) == 1.5


def test_compare_sentiment_reuses_the_comparison_and_scores_label_words(tiny_llama_and_rows, tmp_path, capsys):
    import json

    from transformers import AutoModelForCausalLM

    from backattn.classification import classify
    from backattn.data.classification_data import ClassificationTemplate, tokenize_classification
    from backattn.data.sft_data import sft_tokenizer

    script = load_script("compare_sentiment")
    words = ["great", "awful", "fine", "dull", "superb", "boring"]
    for name, count in (("train", 16), ("held_out", 10)):
        with open(tmp_path / f"{name}.jsonl", "w") as handle:
            for i in range(count):
                row = {"text": f"A {words[i % 6]} film, part {i}.", "label": "fresh" if i % 2 else "rotten",
                       "group": f"movie {i % 4}"}  # fmt: skip
                handle.write(json.dumps(row) + "\n")
            handle.write(json.dumps({"text": "", "label": "fresh", "group": "movie 0"}) + "\n")  # skipped, counted
            handle.write(json.dumps({"text": "Odd.", "label": "meh", "group": "movie 0"}) + "\n")
    model_dir = str(tiny_llama_and_rows / "model")
    argv = ["--model_name_or_path", model_dir, "--dataset", str(tmp_path / "train.jsonl"),
            "--eval_dataset", str(tmp_path / "held_out.jsonl"), "--label_words", '{"fresh": "positive", "rotten": '
            '"negative"}', "--methods", "head hidden", "LoRA attention", "--learning_rates", "0.003", "--budgets",
            "1", "--budget_problems", "8", "--batch_size", "4", "--calibration_steps", "1", "--n_resamples", "50",
            "--output_dir", str(tmp_path / "out"), "--work_dir", str(tmp_path / "work")]  # fmt: skip
    summary = script.main(argv)
    assert "skipped {'missing_or_empty_text': 1, 'unknown_label': 1}" in capsys.readouterr().err
    rows = summary["rows"]
    assert set(rows) == {"frozen base", "head hidden lr=0.003 @1T", "LoRA attention lr=0.003 @1T"}
    assert summary["held_out_problems"] == 10 and summary["held_out_movies"] == 4

    # The base's accuracy is that of label-word classification, computed here independently.
    template = ClassificationTemplate(label_words={"fresh": "positive", "rotten": "negative"})
    tokenizer = sft_tokenizer(model_dir)
    rows_file = script.load_classification_dataset(str(tmp_path / "held_out.jsonl"), template=template)
    held_out, _ = tokenize_classification(rows_file, tokenizer, template, 128, ("positive", "negative"), ("group",))
    scored = classify(AutoModelForCausalLM.from_pretrained(model_dir), tokenizer, held_out, template,
                      ("positive", "negative"))  # fmt: skip
    expected = sum(p == r for p, r in zip(scored["predictions"], scored["references"])) / 10
    base = rows["frozen base"]["metrics"]
    assert base["accuracy"]["value"] == pytest.approx(expected)
    assert base["label_ce"]["value"] == pytest.approx(sum(scored["label_loss"]) / sum(scored["label_tokens"]))
    pairs = list(zip(scored["predictions"], scored["references"]))
    f1 = []
    for label in ("positive", "negative"):  # macro-F1 by hand: every class's 2 tp / (2 tp + fp + fn), averaged
        tp = sum(p == r == label for p, r in pairs)
        wrong = sum((p == label) != (r == label) for p, r in pairs)
        f1.append(2 * tp / (2 * tp + wrong) if tp else 0.0)
    assert base["macro_f1"]["value"] == pytest.approx(sum(f1) / 2)
    for name in ("head hidden lr=0.003 @1T", "LoRA attention lr=0.003 @1T"):
        metrics = rows[name]["metrics"]
        assert {"accuracy", "macro_f1", "label_ce"} <= set(metrics)
        assert metrics["macro_f1"]["low"] <= metrics["macro_f1"]["value"] <= metrics["macro_f1"]["high"]
        assert "minus_base" in metrics["macro_f1"] and "minus_base" in metrics["accuracy"]
    assert summary["chosen_learning_rates"] == {"head hidden": 0.003, "LoRA attention": 0.003}
    for name in ("results.md", "pareto_accuracy.png", "pareto_label_ce.png"):
        assert (tmp_path / "out" / name).is_file()
    assert "| macro-F1 |" in (tmp_path / "out" / "results.md").read_text()


def test_vocabulary_benchmark_measures_every_size(tmp_path):
    script = load_script("bench_vocabulary")
    report = script.main(["--sizes", "300", "600", "--hidden", "16", "--layers", "1", "--batch_size", "2",
                          "--seq_len", "10", "--new_tokens", "2", "--rounds", "1", "--calls", "1",
                          "--loss_chunk_size", "4", "--output", str(tmp_path / "vocabulary.json")])  # fmt: skip
    assert [row["vocab_size"] for row in report["sizes"]] == [300, 600]
    for row in report["sizes"]:
        assert row["train_step_s"] > 0 and row["generate_head_over_base"] > 0 and row["exact_train_step_added_mib"] >= 0
    assert (tmp_path / "vocabulary.json").exists()


def test_compare_rebalancing_chooses_alpha_on_validation_and_stacks_on_the_comparison(tiny_llama_and_rows, tmp_path):
    """Stage 1 picks alpha on validation templates; stage 2 reuses the comparison's base and head, and at alpha 0
    (re-balancing that changes nothing) the head trained on the re-balanced base matches the comparison's head."""
    heads, script = load_script("compare_heads"), load_script("compare_rebalancing")
    common = ["--model_name_or_path", str(tiny_llama_and_rows / "model"), "--dataset",
              str(tiny_llama_and_rows / "rows.jsonl"), "--budget_problems", "8", "--batch_size", "4",
              "--calibration_steps", "1", "--generation_problems", "3", "--max_new_tokens", "3", "--n_resamples", "50",
              "--charge_feature_cache", "false"]  # fmt: skip
    validation = ["--split_name", "validation", "--train_templates", "0-2", "--eval_templates", "3",
                  "--metrics", "teacher_forced"]  # fmt: skip
    held_out = ["--train_templates", "0-3", "--eval_templates", "4-5", "--budgets", "1"]
    sweep = ["--budgets", "1", "--methods", "head hidden", "--learning_rates", "0.003", "--extend_learning_rates",
             "false", "--output_dir", str(tmp_path / "hv"), "--work_dir", str(tmp_path / "w")]  # fmt: skip
    heads.main(common + validation + sweep)
    chosen_rate = ["--validation_results", str(tmp_path / "hv/results.json")]
    heads.main(common + held_out + chosen_rate + ["--methods", "head hidden", "--output_dir", str(tmp_path / "h"),
                                                  "--work_dir", str(tmp_path / "w")])  # fmt: skip
    with pytest.raises(ValueError, match="run stage 1 first"):
        script.main(common + held_out + ["--validation_results", str(tmp_path / "missing.json")])

    chosen = script.main(common + validation + ["--alphas", "0", "--output_dir", str(tmp_path / "rv"),
                                                "--work_dir", str(tmp_path / "rw")])  # fmt: skip
    assert chosen["chosen_alpha"] == 0
    stage_1 = chosen["rows"]
    assert stage_1["re-balanced base, alpha 0"]["target_ce"]["value"] == pytest.approx(
        stage_1["frozen base"]["target_ce"]["value"], rel=1e-5
    )  # alpha 0 is the base (eager attention against SDPA: float noise only)

    stage_2 = common + held_out + ["--validation_results", str(tmp_path / "rv/results.json"),
                                   "--head_validation_results", str(tmp_path / "hv/results.json"),
                                   "--comparison_dir", str(tmp_path / "h"), "--output_dir", str(tmp_path / "r"),
                                   "--work_dir", str(tmp_path / "rw")]  # fmt: skip
    # before anything is scored, a report shows only the comparison's frozen base, and trains nothing
    assert list(script.main(stage_2 + ["--report_only", "true"])["rows"]) == ["frozen base"]
    assert not (tmp_path / "rw/features").exists()
    summary = script.main(stage_2)
    rows, steps = summary["rows"], summary["head_steps"]
    assert list(rows) == ["frozen base", "re-balanced base, alpha 0", f"head (head hidden, {steps} steps)",
                          "head on the re-balanced base, alpha 0"]  # fmt: skip
    comparison = json.loads((tmp_path / "h/results.json").read_text())["rows"]
    head_row = next(r for r in comparison.values() if r["method"] == "head hidden")
    # trained again here, for the comparison's steps with its seed and data: the comparison's head again
    assert summary["head_against_comparison"]["largest_target_loss_difference"] < 1e-3
    head_ce = rows[f"head (head hidden, {steps} steps)"]["target_ce"]["value"]
    assert head_ce == pytest.approx(head_row["metrics"]["target_ce"]["value"], rel=1e-5)
    assert "greedy_accuracy" in rows[f"head (head hidden, {steps} steps)"]
    assert rows["frozen base"]["target_ce"]["value"] == comparison["frozen base"]["metrics"]["target_ce"]["value"]
    both = rows["head on the re-balanced base, alpha 0"]
    assert both["target_ce"]["value"] == pytest.approx(head_row["metrics"]["target_ce"]["value"], rel=1e-3)
    assert "greedy_accuracy" in both and "minus_base" in both["target_ce"]
    assert (tmp_path / "r/rebalancing.png").stat().st_size > 0 and "### Greedy" in (
        tmp_path / "r/results.md"
    ).read_text()
    again = script.main(stage_2 + ["--report_only", "true"])["rows"]  # every model read back, none scored again
    target_ce = {name: row["target_ce"]["value"] for name, row in rows.items()}
    assert {name: row["target_ce"]["value"] for name, row in again.items()} == target_ce


def test_comparison_reads_a_yaml_file_then_flags_override_it(tmp_path):
    script = load_script("compare_heads")
    settings = tmp_path / "stage.yaml"
    settings.write_text("split_name: validation\nlearning_rates: [0.001, 0.01]\nseed: 1\n")
    (options,) = script.parse_command_line(script.ComparisonArguments, [str(settings), "--seed", "7"])
    assert (options.split_name, options.learning_rates, options.seed) == ("validation", [0.001, 0.01], 7)
    assert script.parse_command_line(script.ComparisonArguments, [str(settings)])[0].seed == 1
    settings.write_text("split_name: validation\nlearning_rate: 0.01\n")  # a typo of learning_rates
    with pytest.raises(ValueError, match=r"unknown argument\(s\) learning_rate \(did you mean learning_rates"):
        script.parse_command_line(script.ComparisonArguments, [str(settings), "--seed", "7"])


def label_word_run(tiny_llama_and_rows, tmp_path, *methods):
    """The tiny base and the arguments of a label-word sentiment comparison of ``methods`` on 12 + 8 snippets."""
    import json

    for name, count in (("train", 12), ("held_out", 8)):
        with open(tmp_path / f"{name}.jsonl", "w") as handle:
            for i in range(count):
                row = {"text": f"A film, part {i}.", "label": "fresh" if i % 2 else "rotten", "group": f"m{i % 3}"}
                handle.write(json.dumps(row) + "\n")
    model_dir = str(tiny_llama_and_rows / "model")
    argv = ["--model_name_or_path", model_dir, "--dataset", str(tmp_path / "train.jsonl"),
            "--eval_dataset", str(tmp_path / "held_out.jsonl"), "--label_words", '{"fresh": "positive", "rotten": '
            '"negative"}', "--label_word_loss", "true", "--methods", *methods,
            "--learning_rates", "0.003", "--budgets", "1", "--budget_problems", "8", "--batch_size", "4",
            "--calibration_steps", "1", "--n_resamples", "20", "--output_dir", str(tmp_path / "out"),
            "--work_dir", str(tmp_path / "work")]  # fmt: skip
    return model_dir, argv


def test_compare_sentiment_with_the_label_word_loss_trains_every_method_on_it(
    tiny_llama_and_rows, tmp_path, monkeypatch
):

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from backattn.data.sft_data import sft_tokenizer
    from backattn.head_loss import LabelWordLoss

    script = load_script("compare_sentiment")
    model_dir, argv = label_word_run(tiny_llama_and_rows, tmp_path, "head hidden", "LoRA attention")
    task = script.SentimentTask()
    (options,) = script.machinery.parse_command_line(task.arguments, argv)
    tokenizer = sft_tokenizer(model_dir)
    train, _ = task.examples(options, tokenizer)
    words = [tokenizer(" positive", add_special_tokens=False)["input_ids"][0],
             tokenizer(" negative", add_special_tokens=False)["input_ids"][0]]  # fmt: skip
    assert task.label_word_ids == words
    for labels in train["labels"]:  # each row labels its label word alone
        assert [t for t in labels if t != -100] in ([words[0]], [words[1]])
    head = script.machinery.METHODS["head hidden"].build(model_dir, 100)
    assert task.training_loss(head) is None and head.heads.default.config.label_word_ids == words
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(target_modules=["q_proj"]))
    loss = task.training_loss(lora)
    assert isinstance(loss, LabelWordLoss) and loss.label_word_ids == words
    calls = []
    original = LabelWordLoss.__call__
    monkeypatch.setattr(LabelWordLoss, "__call__", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    summary = script.main(argv)  # and the whole run trains and scores with it: LoRA through LabelWordLoss
    assert set(summary["rows"]) == {"frozen base", "head hidden lr=0.003 @1T", "LoRA attention lr=0.003 @1T"}
    assert calls  # LoRA's steps (calibration and training) took the label-word loss
    assert task.selection == "choice_ce"  # rates are chosen on the loss these runs train
    assert "choice_ce" in summary["rows"]["LoRA attention lr=0.003 @1T"]["metrics"]
    # the label-word CE by hand: -log(e^-1 / (e^-1 + e^-3)) for a gold first class, the same with a gold second
    losses = script.choice_losses([[-1.0, -3.0], [-1.0, -3.0]], ["positive", "negative"], ["positive", "negative"])
    assert losses == pytest.approx([math.log(1 + math.exp(-2)), 2 + math.log(1 + math.exp(-2))])


def test_compare_sentiment_runs_the_standardized_head_and_charges_its_statistics_rows(tiny_llama_and_rows, tmp_path):
    """Issue 16's standardised head: its mu and sigma^2 are the first STANDARDIZATION_ROWS training rows' statistics
    (the same in every sitting, so a resumed run scores the head it trained), and those rows are charged."""
    import json

    script = load_script("compare_sentiment")
    compare = script.machinery
    method = compare.METHODS["head hidden + standardized"]
    assert method.features and method.output_side and method.standardizes
    # the rows are charged up front, as cache reads: 100 problems, a 50 s cache, 256 rows read: 128 s before step 1
    assert compare.charged_seconds(0, 1.0, 50.0, 100, 10, extra_rows=256) == 50.0  # at most the whole cache
    assert compare.charged_seconds(2, 1.0, 50.0, 1000, 10, extra_rows=256) == pytest.approx(2 + 50 * 276 / 1000)
    assert compare.budget_steps(2 + 50 * 276 / 1000, 1.0, 50.0, 1000, 10, extra_rows=256) == 2
    assert compare.budget_steps(10.0, 1.0, 50.0, 1000, 10, extra_rows=256) == 0  # the statistics cost 12.8 s
    model_dir, argv = label_word_run(tiny_llama_and_rows, tmp_path, "head hidden + standardized")
    calibration = script.main([*argv, "--calibrate_only", "true"])
    timings = {key: 0.25 for key in calibration if key.startswith("step_seconds") and "LoRA" not in key}
    timings["step_seconds:LoRA attention:4"] = 1.0
    timings = {**calibration, **timings, **{k: 0.5 for k in calibration if k.startswith("feature_cache_seconds")}}
    (tmp_path / "out" / "calibration.json").write_text(json.dumps(timings))
    row = script.main(argv)["rows"]["head hidden + standardized lr=0.003 @1T"]
    assert row["steps"] > 0 and math.isfinite(row["metrics"]["accuracy"]["value"])
