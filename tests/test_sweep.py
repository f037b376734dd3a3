"""HeadSweep / SweepTrainer: N heads trained in one pass over the same cached features, each as if alone."""

import math

import pytest
import torch
from conftest import randomise
from transformers import Trainer, TrainingArguments

import backattn.head_kernels as head_kernels
import backattn.sweep as sweep_module
from backattn import BackwardAttentionConfig, GPT2BackwardAttentionForCausalLM
from backattn.data.feature_cache import CachedFeaturesDataset, FeatureCache
from backattn.errors import BackattnTypeError, BackattnValueError, HeadFileError
from backattn.evaluation import target_token_loss
from backattn.head_loss import head_cross_entropy
from backattn.sweep import HeadSweep, SweepHead, SweepTrainer, check_sweep_heads
from backattn.trainer import HeadTrainer

#: Heads that differ in everything a sweep varies: preset, width, weighting, layers, learning rate, weight decay.
HEADS = [
    SweepHead("hidden", "hidden", learning_rate=3e-2, weight_decay=0.1),
    SweepHead("wide", "gated", {"latent_dim": 12, "out_dim": 16, "num_attention_heads": 2}, learning_rate=1e-2),
    SweepHead("raw", "seed", {"logit_weighting": "raw", "divide_by_vocab": False}, learning_rate=5e-2),
    SweepHead("stack", "gated", {"num_layers": 2, "layer_mode": "sequential"}, learning_rate=2e-2),
]


def pad_collator(features):
    """Right-pads input_ids (0), labels (-100), the attention mask and the cached hidden states (zeros)."""
    width = max(len(f["input_ids"]) for f in features)
    batch = {"input_ids": torch.zeros(len(features), width, dtype=torch.long),
             "labels": torch.full((len(features), width), -100, dtype=torch.long),
             "attention_mask": torch.zeros(len(features), width, dtype=torch.long)}  # fmt: skip
    hidden = "base_hidden_states" in features[0]
    if hidden:
        batch["base_hidden_states"] = torch.zeros(len(features), width, features[0]["base_hidden_states"].shape[-1])
    for row, feature in enumerate(features):
        n = len(feature["input_ids"])
        batch["input_ids"][row, :n] = torch.as_tensor(feature["input_ids"])
        batch["labels"][row, :n] = torch.as_tensor(feature["labels"])
        batch["attention_mask"][row, :n] = 1
        if hidden:
            batch["base_hidden_states"][row, :n] = feature["base_hidden_states"]
    return batch


@pytest.fixture(scope="module")
def examples():
    """24 random sequences of 6-20 tokens; the first 2-5 are the prompt (label -100)."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(24):
        length = int(torch.randint(6, 21, (1,), generator=generator))
        prompt = int(torch.randint(2, 6, (1,), generator=generator))
        ids = torch.randint(0, 97, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


@pytest.fixture(scope="module")
def cached(gpt2_base_dir, examples, tmp_path_factory):
    """The examples with the tiny base's final hidden states, from a feature cache built once."""
    base = GPT2BackwardAttentionForCausalLM.from_pretrained(gpt2_base_dir)
    cache = FeatureCache.build_or_load(
        base, [e["input_ids"] for e in examples], tmp_path_factory.mktemp("features"), "float32", progress=False
    )
    return CachedFeaturesDataset(examples, cache)


def make_sweep(base_dir, heads=HEADS, chunk=None):
    model = GPT2BackwardAttentionForCausalLM.from_pretrained(base_dir)
    if chunk:
        model.config.loss_chunk_size = chunk
    sweep = HeadSweep(model, heads)
    for index, head in enumerate(sweep.heads.values()):
        randomise(head, seed=index + 1)  # every term (gates, W_h) live, so every weight moves
    return sweep


def arguments(directory, **overrides):
    options = dict(
        output_dir=str(directory), per_device_train_batch_size=4, max_steps=5, learning_rate=1e-3,
        lr_scheduler_type="constant_with_warmup", warmup_steps=2, weight_decay=0.0, max_grad_norm=0.5,
        logging_steps=1, save_strategy="no", report_to="none", seed=3, disable_tqdm=True, use_cpu=True,
    )  # fmt: skip
    return TrainingArguments(**{**options, **overrides})


def train_alone(base_dir, spec, initial, dataset, directory, chunk=None, **options):
    """One head trained on its own by HeadTrainer (the ordinary path), from the given initial weights."""
    model = GPT2BackwardAttentionForCausalLM.from_pretrained(base_dir, head_config=spec.head_config())
    if chunk:
        model.config.loss_chunk_size = chunk
    model.heads["default"].load_state_dict(initial)
    args = arguments(directory, learning_rate=spec.learning_rate, weight_decay=spec.weight_decay or 0.0, **options)
    HeadTrainer(model=model, args=args, train_dataset=dataset, data_collator=pad_collator).train()
    return model.heads["default"].state_dict()


def test_heads_trained_together_end_as_each_trained_alone(gpt2_base_dir, cached, tmp_path):
    """The key property: one pass over N heads = N separate runs (same seed, data, schedule, own lr and decay),
    with gradient clipping active (max_grad_norm below the heads' gradient norms)."""
    sweep = make_sweep(gpt2_base_dir, chunk=16)
    initial = {name: {k: v.clone() for k, v in head.state_dict().items()} for name, head in sweep.heads.items()}
    trainer = SweepTrainer(model=sweep, args=arguments(tmp_path / "sweep"), train_dataset=cached,
                           data_collator=pad_collator)  # fmt: skip
    trainer.train()
    groups = {(g["head"], g["lr"], g["weight_decay"]) for g in trainer.optimizer.param_groups}
    assert {(name, lr) for name, lr, _ in groups} == {(s.name, s.learning_rate) for s in HEADS}
    assert ("hidden", 3e-2, 0.1) in groups and ("hidden", 3e-2, 0.0) in groups  # decay and no-decay, per head
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(entry[f"grad_norm_{s.name}"] > 0.5 for entry in logged[:2] for s in HEADS)  # clipping is active
    for step in logged:
        assert math.isclose(step["loss"], sum(step[f"loss_{s.name}"] for s in HEADS), rel_tol=1e-3, abs_tol=1e-3)
    for spec in HEADS:
        alone = train_alone(gpt2_base_dir, spec, initial[spec.name], cached, tmp_path / spec.name, chunk=16)
        together = sweep.heads[spec.name].state_dict()
        assert any(not torch.equal(alone[k], initial[spec.name][k]) for k in alone)  # it did train
        for key, value in alone.items():  # the same operations on the same numbers: equal to the bit
            assert torch.equal(together[key], value), (spec.name, key, (together[key] - value).abs().max())


def test_with_gradient_accumulation_too(gpt2_base_dir, cached, tmp_path):
    """Accumulated batches (the Trainer's num_items_in_batch divides every head's summed loss) change nothing."""
    heads = [HEADS[0], HEADS[2]]
    sweep = make_sweep(gpt2_base_dir, heads, chunk=16)
    initial = {name: {k: v.clone() for k, v in head.state_dict().items()} for name, head in sweep.heads.items()}
    options = dict(max_steps=3, gradient_accumulation_steps=2, per_device_train_batch_size=2)
    SweepTrainer(model=sweep, args=arguments(tmp_path / "sweep", **options), train_dataset=cached,
                 data_collator=pad_collator).train()  # fmt: skip
    for spec in heads:
        alone = train_alone(gpt2_base_dir, spec, initial[spec.name], cached, tmp_path / spec.name, 16, **options)
        for key, value in alone.items():
            assert torch.equal(sweep.heads[spec.name].state_dict()[key], value), (spec.name, key)


def test_global_clipping_would_couple_the_heads(gpt2_base_dir, cached, tmp_path):
    """The control of the test above: the stock Trainer's clipping (one norm over all heads) changes the result,
    so the per-head clipping is what makes the sweep equal to separate runs."""
    heads = HEADS[:2]
    runs = {}
    for clip in ("per head", "global"):
        sweep = make_sweep(gpt2_base_dir, heads)
        trainer = SweepTrainer(model=sweep, args=arguments(tmp_path / clip.replace(" ", "_"), max_steps=3),
                               train_dataset=cached, data_collator=pad_collator)  # fmt: skip
        if clip == "global":
            trainer._clip_grad_norm = lambda model, self=trainer: Trainer._clip_grad_norm(self, model)
        trainer.train()
        runs[clip] = {name: head.state_dict() for name, head in sweep.heads.items()}
    differs = [
        not torch.allclose(runs["per head"][name][k], runs["global"][name][k], rtol=1e-4, atol=1e-5)
        for name in runs["global"]
        for k in runs["global"][name]
    ]
    assert any(differs)


def test_base_logits_and_their_softmax_are_computed_once_per_chunk(gpt2_base_dir, cached, monkeypatch):
    """N heads cost one base-logit product and one softmax of them per chunk (the counts do not grow with N);
    each head's loss and gradients still equal its own chunked loss."""
    counts = {"base": 0, "rms": 0}
    base_logits, inverse_rms = sweep_module.base_logits, head_kernels._inverse_rms

    def counted_base(*args):
        counts["base"] += 1
        return base_logits(*args)

    def counted_rms(*args):
        counts["rms"] += 1
        return inverse_rms(*args)

    monkeypatch.setattr(sweep_module, "base_logits", counted_base)
    monkeypatch.setattr(head_kernels, "_inverse_rms", counted_rms)
    softmax_heads = [HEADS[0], HEADS[1], SweepHead("seed", "seed")]  # every one weights by softmax(l / rms(l))
    batch = pad_collator([cached[i] for i in range(8)])
    chunks = -(-int((batch["labels"][:, 1:] != -100).sum()) // 8)
    assert chunks >= 3
    for heads in (softmax_heads[:1], softmax_heads):
        sweep = make_sweep(gpt2_base_dir, heads, chunk=8).train()
        counts.update(base=0, rms=0)
        output = sweep(**batch)
        output.loss.backward()
        assert counts == {"base": chunks, "rms": chunks}, (len(heads), counts)
    model = sweep.model
    for k, (name, head) in enumerate(sweep.heads.items()):
        gradients = [p.grad.clone() for p in head.parameters()]
        head.zero_grad()
        counts.update(rms=0)
        alone = head_cross_entropy(head, batch["base_hidden_states"], batch["labels"], model.lm_head.weight,
                                   model.get_input_embeddings().weight, 8)  # fmt: skip
        assert counts["rms"] == chunks  # alone, each head makes its own softmax weights
        assert torch.equal(output.head_losses[k], alone), name
        alone.backward()
        for mine, theirs in zip(gradients, (p.grad for p in head.parameters())):
            torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-7)
    assert int(output.target_tokens) == int((batch["labels"][:, 1:] != -100).sum())


def each_head_alone(sweep, output, batch, chunk) -> list[tuple]:
    """Check that each head's entry of a sweep's (backpropagated) output, and its gradients, are those of its own
    chunked loss; returns each head's arguments of ``head_cross_entropy``."""
    model, calls = sweep.model, []
    for k, head in enumerate(sweep.heads.values()):
        gradients = [p.grad.clone() for p in head.parameters()]
        head.zero_grad()
        arguments = (head, batch["base_hidden_states"], batch["labels"], model.lm_head.weight,
                     model.get_input_embeddings().weight, chunk)  # fmt: skip
        alone = head_cross_entropy(*arguments)
        assert torch.equal(output.head_losses[k], alone)
        alone.backward()
        for mine, theirs in zip(gradients, (p.grad for p in head.parameters())):
            torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-7)
        calls.append(arguments)
    return calls


def test_each_heads_kl_to_base_is_its_own_in_training_and_left_out_in_evaluation(gpt2_base_dir, cached):
    """A sweep of KL weights: each head's entry (and gradients) equals its own chunked loss with its own beta;
    in evaluation mode every entry is the plain cross-entropy."""
    heads = [SweepHead(f"beta-{k}", "hidden", {"base_kl_weight": beta}) for k, beta in enumerate((0.0, 0.5, 2.0))]
    batch = pad_collator([cached[i] for i in range(6)])
    sweep = make_sweep(gpt2_base_dir, heads, chunk=8).train()
    output = sweep(**batch)
    output.loss.backward()
    plain = []
    for head, arguments in zip(sweep.heads.values(), each_head_alone(sweep, output, batch, 8)):
        beta, head.config.base_kl_weight = head.config.base_kl_weight, 0.0
        with torch.no_grad():
            plain.append(head_cross_entropy(*arguments))
        head.config.base_kl_weight = beta
    assert output.head_losses[2] > output.head_losses[1] > plain[1]  # randomised heads: KL > 0
    with torch.no_grad():
        evaluated = sweep.eval()(**batch).head_losses
    torch.testing.assert_close(evaluated, torch.stack(plain), rtol=1e-6, atol=0)


def test_each_copy_heads_supervision_is_its_own_in_training_and_left_out_in_evaluation(gpt2_base_dir, cached):
    """Three copy heads with the same weights and copy_loss_weight 0, 0.5, 1.5: each entry equals its own chunked
    loss (the sequence context made as the sweep makes it); the entries move by gamma times one positive term,
    their gradients likewise; in evaluation mode all three give the plain cross-entropy."""
    heads = [
        SweepHead(f"gamma-{k}", "hidden", {"copy_attention": True, "copy_loss_weight": g})
        for k, g in enumerate((0, 0.5, 1.5))
    ]
    batch = pad_collator([cached[i] for i in range(6)])
    sweep = make_sweep(gpt2_base_dir, heads, chunk=8).train()
    for head in sweep.heads.values():
        randomise(head, seed=7)  # one set of weights: only gamma differs
    output = sweep(**batch)
    output.loss.backward()
    model = sweep.model
    context = model._sequence_context(batch["base_hidden_states"], None, batch["input_ids"], batch["attention_mask"],
                                      None, 0, 0, None)  # fmt: skip
    gradients = []
    for k, head in enumerate(sweep.heads.values()):
        gradients.append([p.grad.clone() for p in head.parameters()])
        alone = head_cross_entropy(head, batch["base_hidden_states"], batch["labels"], model.lm_head.weight,
                                   model.get_input_embeddings().weight, 8, context=context)  # fmt: skip
        torch.testing.assert_close(output.head_losses[k], alone, rtol=1e-6, atol=0)
    losses = output.head_losses.detach()
    term = (losses[1] - losses[0]) / 0.5
    assert term > 0.1
    torch.testing.assert_close(losses[2] - losses[0], 1.5 * term, rtol=1e-4, atol=0)
    for g0, g1, g2 in zip(*gradients):
        torch.testing.assert_close(g2 - g0, 3 * (g1 - g0), rtol=1e-3, atol=1e-6)
    with torch.no_grad():
        evaluated = sweep.eval()(**batch).head_losses
    torch.testing.assert_close(evaluated, losses[:1].expand(3), rtol=1e-6, atol=0)


def test_a_label_word_head_in_a_sweep_takes_its_own_loss_in_training_and_the_plain_one_in_evaluation(
    gpt2_base_dir, cached
):
    batch = pad_collator([cached[i] for i in range(6)])
    targets = batch["labels"][:, 1:][batch["labels"][:, 1:] != -100]
    words = [int(t) for t in torch.unique(targets, return_counts=True)[0][:3]]
    batch["labels"][~torch.isin(batch["labels"], torch.tensor(words))] = -100  # label words alone
    heads = [SweepHead("plain", "hidden"), SweepHead("words", "hidden", {"label_word_ids": words})]
    sweep = make_sweep(gpt2_base_dir, heads, chunk=5).train()
    output = sweep(**batch)
    output.loss.backward()
    arguments = each_head_alone(sweep, output, batch, 5)[-1]
    assert output.head_losses[1] < output.head_losses[0]  # three classes, not the vocabulary
    with torch.no_grad():
        evaluated = sweep.eval()(**batch).head_losses
        sweep.heads["words"].config.label_word_ids = None
        plain = head_cross_entropy(sweep.heads["words"], *arguments[1:])
    torch.testing.assert_close(evaluated[1], plain, rtol=1e-6, atol=0)


def test_saved_heads_load_with_the_ordinary_api_and_reproduce_their_logits(gpt2_base_dir, cached, tmp_path):
    sweep = make_sweep(gpt2_base_dir, HEADS[:3])
    trainer = SweepTrainer(model=sweep, args=arguments(tmp_path / "run", max_steps=2), train_dataset=cached,
                           data_collator=pad_collator)  # fmt: skip
    trainer.train()
    saved = sweep.save_heads(tmp_path / "heads", metrics={"raw": {"target_ce": 1.5}}, task="test")
    assert sorted(path.name for path in saved.values()) == ["hidden", "raw", "wide"]
    batch = pad_collator([cached[i] for i in range(4)])
    trained = sweep.model.eval()
    for name in sweep.head_names:
        loaded = GPT2BackwardAttentionForCausalLM.from_pretrained(gpt2_base_dir).eval()
        assert loaded.load_head(tmp_path / "heads" / name) == name
        trained.set_head(name)
        with torch.no_grad():
            expected = trained(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            got = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        assert loaded.heads[name].config == sweep.heads[name].config
    card = (tmp_path / "heads" / "raw" / "README.md").read_text()
    assert "1.5" in card


def test_evaluation_gives_each_heads_target_ce_and_checkpoints_resume(gpt2_base_dir, cached, examples, tmp_path):
    """eval_<name>_target_ce equals target_token_loss of that head alone; a checkpoint holds one head directory
    per head and resuming from it ends where the uninterrupted run ends."""
    sweep = make_sweep(gpt2_base_dir, HEADS[:2])
    args = arguments(tmp_path / "run", max_steps=4, save_strategy="steps", save_steps=2)
    trainer = SweepTrainer(model=sweep, args=args, train_dataset=cached, eval_dataset=cached,
                           data_collator=pad_collator)  # fmt: skip
    trainer.train()
    metrics = trainer.evaluate()
    for name in sweep.head_names:
        sweep.model.set_head(name)
        expected = target_token_loss(sweep.model, cached, pad_collator, batch_size=8)["target_ce"]
        assert math.isclose(metrics[f"eval_{name}_target_ce"], expected, rel_tol=1e-5), name
        assert math.isclose(sweep.target_cross_entropy(cached, pad_collator)[name]["target_ce"], expected, rel_tol=1e-5)
    assert math.isclose(metrics["eval_loss"], sum(metrics[f"eval_{n}_target_ce"] for n in sweep.head_names))
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert {"hidden", "wide", "optimizer.pt", "trainer_state.json"} <= {p.name for p in checkpoint.iterdir()}
    assert not list(checkpoint.glob("*.safetensors"))  # no copy of the base
    resumed = make_sweep(gpt2_base_dir, HEADS[:2])
    SweepTrainer(model=resumed, args=args, train_dataset=cached, data_collator=pad_collator).train(
        resume_from_checkpoint=str(checkpoint)
    )
    for name in sweep.head_names:
        for key, value in sweep.heads[name].state_dict().items():
            torch.testing.assert_close(resumed.heads[name].state_dict()[key], value, rtol=1e-6, atol=1e-7)


def test_bad_sweeps_are_refused_with_clear_errors(gpt2_base_dir, llama_base_dir, tmp_path):
    with pytest.raises(BackattnValueError, match=r"\['a'\] appear more than once"):
        check_sweep_heads([SweepHead("a"), SweepHead("a", "seed")])
    with pytest.raises(BackattnValueError, match="at least one head"):
        check_sweep_heads([])
    with pytest.raises(BackattnValueError, match="unknown key.*'lr'"):
        check_sweep_heads([{"name": "a", "lr": 1e-3}])
    with pytest.raises(BackattnValueError, match="learning_rate must be positive"):
        check_sweep_heads([SweepHead("a", learning_rate=0.0)])
    with pytest.raises(BackattnValueError, match="Invalid head name"):
        check_sweep_heads([SweepHead("a b")])
    with pytest.raises(BackattnValueError, match="keeps that head's options"):
        check_sweep_heads([SweepHead("a", options={"out_dim": 8}, init_from=str(tmp_path))])
    model = GPT2BackwardAttentionForCausalLM.from_pretrained(gpt2_base_dir)
    other_base = BackwardAttentionConfig.from_preset("hidden").for_base(50257, 768)
    with pytest.raises(BackattnValueError, match="Sweep head 'b'.*different base model"):
        HeadSweep(model, [SweepHead("a"), SweepHead("b", options=other_base.to_dict())])
    assert model.list_heads() == []  # nothing was added
    from backattn import LlamaBackwardAttentionForCausalLM

    llama = LlamaBackwardAttentionForCausalLM.from_pretrained(llama_base_dir, head_config="seed")
    llama.save_head(tmp_path / "llama-head")
    with pytest.raises((BackattnValueError, HeadFileError), match="different base model"):
        HeadSweep(model, [SweepHead("a"), SweepHead("b", init_from=str(tmp_path / "llama-head"))])
    assert model.list_heads() == []  # the head added before the failure was taken out again
    model.add_head("seed", "taken")
    with pytest.raises(BackattnValueError, match="already carries head"):
        HeadSweep(model, [SweepHead("taken")])
    default, model.config.rerank_top_k = model.config.rerank_top_k, 8  # alone, a head would train re-ranking
    with pytest.raises(BackattnValueError, match="rerank_top_k = 8"):
        HeadSweep(model, [SweepHead("fresh")])
    model.config.rerank_top_k = default
    with pytest.raises(BackattnTypeError, match="needs a backattn model"):
        HeadSweep(torch.nn.Linear(2, 2), [SweepHead("a")])
    with pytest.raises(BackattnTypeError, match="trains a HeadSweep"):
        SweepTrainer(model=model, args=arguments(tmp_path / "x"))


def test_a_sweep_from_a_saved_head_continues_it(gpt2_base_dir, cached, tmp_path):
    """init_from starts a sweep head from a saved directory (checked against the base), with its options."""
    donor = make_sweep(gpt2_base_dir, HEADS[1:2])
    donor.save_heads(tmp_path)
    sweep = HeadSweep(GPT2BackwardAttentionForCausalLM.from_pretrained(gpt2_base_dir),
                      [SweepHead("again", init_from=str(tmp_path / "wide")), SweepHead("fresh")])  # fmt: skip
    assert sweep.heads["again"].config == donor.heads["wide"].config
    for key, value in donor.heads["wide"].state_dict().items():
        assert torch.equal(sweep.heads["again"].state_dict()[key], value)
    assert all(p.requires_grad for head in sweep.heads.values() for p in head.parameters())


def test_the_sweep_command_trains_every_head_and_saves_loadable_heads(tiny_gpt2_dir, tmp_path):
    """benchmarks/sweep_heads.py from a YAML list of heads, on a tiny base and a small templated data set."""
    import json
    import sys
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "benchmarks"))
    import sweep_heads

    rows = tmp_path / "rows.jsonl"
    with open(rows, "w") as handle:
        for index in range(24):
            a, b = index + 2, 3 * index + 1
            handle.write(json.dumps({"problem": f"Tom has {a} apples and buys {b}. How many?",
                                     "generated_solution": f"{a} + {b} = {a + b}.", "expected_answer": str(a + b),
                                     "template_id": index % 6}) + "\n")  # fmt: skip
    config = {
        "model_name_or_path": str(tiny_gpt2_dir), "dataset": str(rows), "train_templates": "0-3",
        "eval_templates": "4-5", "max_length": 64, "feature_cache_dirs": [], "work_dir": str(tmp_path / "work"),
        "output_dir": str(tmp_path / "out"), "max_steps": 2, "per_device_train_batch_size": 4, "use_cpu": True,
        "heads": [{"name": "fast", "preset": "hidden", "learning_rate": 0.05},
                  {"name": "narrow", "preset": "gated", "options": {"out_dim": 8}, "learning_rate": 0.01}],
    }  # fmt: skip
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    results = sweep_heads.main([str(path), "--max_steps", "3"])  # an option on top of the YAML
    assert results["steps"] == 3 and set(results["heads"]) == {"fast", "narrow"}
    assert results["heads"]["fast"]["learning_rate"] == 0.05
    assert all(math.isfinite(row["target_ce"]) for row in results["heads"].values())
    assert (tmp_path / "out" / "results.md").is_file()
    model = GPT2BackwardAttentionForCausalLM.from_pretrained(tiny_gpt2_dir)
    model.load_head(tmp_path / "out" / "heads" / "narrow")
    assert model.heads["narrow"].config.out_dim == 8
    config["heads"].append({"name": "fast"})
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(BackattnValueError, match="more than once"):
        sweep_heads.main([str(path)])
    shipped, training = sweep_heads.parse_arguments([str(root / "benchmarks" / "sweep_heads_validation.yaml")])
    assert len(check_sweep_heads(shipped.heads)) == 4 and training.max_steps == 157  # the shipped sweep parses


DECODER = dict(
    vocab_size=97, hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0,
)  # fmt: skip


@pytest.mark.parametrize(
    "model_type, options",
    [("gemma3_text", dict(head_dim=12, query_pre_attn_scalar=12, sliding_window=8, final_logit_softcapping=0.1)),
     ("phi", {}), ("cohere", dict(logit_scale=0.5))],
    ids=["soft-capped", "output-bias", "scaled"],
)  # fmt: skip
def test_bases_whose_logits_are_not_h_w_share_them_too(model_type, options, tmp_path):
    """Soft-capping, an output-layer bias, a logit scale: each head's sweep loss and gradients equal the model's
    own chunked loss with that head active (raw weighting, whose W^T Vv shortcut must then be off, included)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from backattn import family_for

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **DECODER, **options)).save_pretrained(tmp_path)
    model = family_for(model_type).from_pretrained(tmp_path)
    model.config.loss_chunk_size = 5
    if model.lm_head.bias is not None:
        with torch.no_grad():
            model.lm_head.bias.normal_()  # it starts at zero, where forgetting it would go unnoticed
    sweep = HeadSweep(model, [HEADS[0], HEADS[2]])
    for index, head in enumerate(sweep.heads.values()):
        randomise(head, seed=index + 1)
    sweep.train()
    ids = torch.randint(1, 97, (3, 9), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :3] = -100
    output = sweep(input_ids=ids, labels=labels)
    output.loss.backward()
    together = {name: [p.grad.clone() for p in head.parameters()] for name, head in sweep.heads.items()}
    for k, (name, head) in enumerate(sweep.heads.items()):
        sweep.zero_grad()
        model.set_head(name)
        alone = model(input_ids=ids, labels=labels)
        assert alone.logits is None  # the model's chunked loss
        alone.loss.backward()
        torch.testing.assert_close(output.head_losses[k], alone.loss, rtol=1e-6, atol=1e-7)
        for mine, theirs in zip(together[name], (p.grad for p in head.parameters())):
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-7)


def test_a_standardized_head_in_a_sweep_gets_the_statistics_it_gets_alone(gpt2_base_dir, cached, tmp_path):
    """standardize_query_state: the sweep fixes mu and sigma^2 from the same first rows as HeadTrainer alone, then
    trains the head to the same bits."""
    spec = SweepHead("standardized", "hidden", {"standardize_query_state": True}, learning_rate=3e-2)
    sweep = HeadSweep(GPT2BackwardAttentionForCausalLM.from_pretrained(gpt2_base_dir), [spec])
    head = sweep.heads["standardized"]
    with torch.no_grad():  # live weights, identity statistics: the trainer must fit them
        for parameter in head.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.5)
    initial = {k: v.clone() for k, v in head.state_dict().items()}
    SweepTrainer(model=sweep, args=arguments(tmp_path / "sweep"), train_dataset=cached,
                 data_collator=pad_collator).train()  # fmt: skip
    assert not torch.equal(head.query_mean, initial["query_mean"])
    alone = train_alone(gpt2_base_dir, spec, initial, cached, tmp_path / "alone")
    for key, value in alone.items():
        assert torch.equal(head.state_dict()[key], value), key
