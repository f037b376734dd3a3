"""HeadTrainer: the Transformers Trainer, training only the head, checkpointing only the head."""

import os

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

from backattn import GPT2BackwardAttentionForCausalLM
from backattn.data.feature_cache import CachedFeaturesDataset, FeatureCache
from backattn.data.sft_data import SFTCollator
from backattn.head_files import HEAD_WEIGHTS_NAME
from backattn.trainer import HeadTrainer, is_backattn_card


@pytest.fixture(scope="module")
def setup(tiny_gpt2_math_rows):
    return tiny_gpt2_math_rows


def make_trainer(tiny_gpt2_dir, setup, output_dir, dataset=None, preset="hidden", callbacks=None, **overrides):
    tokenizer, examples = setup
    torch.manual_seed(0)
    model = GPT2BackwardAttentionForCausalLM.from_pretrained(tiny_gpt2_dir, head_config=preset)
    options = dict(
        output_dir=str(output_dir), per_device_train_batch_size=4, learning_rate=3e-2, max_steps=8,
        logging_steps=1, save_steps=4, report_to="none", seed=7, disable_tqdm=True, use_cpu=True,
    )  # fmt: skip
    args = TrainingArguments(**{**options, **overrides})
    return HeadTrainer(
        model=model, args=args, train_dataset=dataset if dataset is not None else examples,
        data_collator=SFTCollator(tokenizer), processing_class=tokenizer, head_metadata={"note": "test"},
        callbacks=callbacks,
    )  # fmt: skip


def head_state(trainer):
    return {k: v.clone() for k, v in trainer.model.heads["default"].state_dict().items()}


def test_training_lowers_the_loss_and_changes_only_the_head(tiny_gpt2_dir, setup, tmp_path):
    trainer = make_trainer(tiny_gpt2_dir, setup, tmp_path, max_steps=12, preset="seed", learning_rate=0.1)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(tensor, before[name]) != name.startswith("heads."), name
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in trainer.model.heads.parameters()}


def test_checkpoints_hold_the_head_not_the_base(tiny_gpt2_dir, setup, tmp_path):
    trainer = make_trainer(tiny_gpt2_dir, setup, tmp_path, max_steps=4)
    trainer.train()
    files = set(os.listdir(tmp_path / "checkpoint-4"))
    assert {HEAD_WEIGHTS_NAME, "head_config.json", "optimizer.pt", "trainer_state.json"} <= files
    assert not {"model.safetensors", "pytorch_model.bin"} & files
    assert (tmp_path / "checkpoint-4" / HEAD_WEIGHTS_NAME).stat().st_size < 100_000
    loaded = GPT2BackwardAttentionForCausalLM.from_pretrained(tiny_gpt2_dir)
    loaded.load_head(tmp_path / "checkpoint-4")
    for name, tensor in trainer.model.heads["default"].state_dict().items():
        assert torch.equal(loaded.heads["default"].state_dict()[name], tensor)


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("interrupted")


def test_resume_continues_at_the_right_step_with_the_same_result(tiny_gpt2_dir, setup, tmp_path):
    straight = make_trainer(tiny_gpt2_dir, setup, tmp_path / "straight")
    straight.train()

    interrupted = make_trainer(tiny_gpt2_dir, setup, tmp_path / "resumed", callbacks=[StopAt(6)])
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    resumed = make_trainer(tiny_gpt2_dir, setup, tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-4"))
    first_logged = min(e["step"] for e in resumed.state.log_history if "loss" in e and e["step"] > 4)
    assert first_logged == 5 and resumed.state.global_step == 8

    straight_losses = {e["step"]: e["loss"] for e in straight.state.log_history if "loss" in e}
    resumed_losses = {e["step"]: e["loss"] for e in resumed.state.log_history if "loss" in e}
    for step in range(5, 9):
        assert resumed_losses[step] == pytest.approx(straight_losses[step], rel=1e-5)
    for name, tensor in head_state(straight).items():
        assert torch.allclose(head_state(resumed)[name], tensor, atol=1e-6), name


def test_cached_features_train_exactly_like_the_base(tiny_gpt2_dir, setup, tmp_path):
    tokenizer, examples = setup
    plain = make_trainer(tiny_gpt2_dir, setup, tmp_path / "plain", max_steps=5, save_strategy="no")
    plain.train()
    cache = FeatureCache.build_or_load(plain.model, examples["input_ids"], tmp_path / "cache", dtype="float32")
    cached = make_trainer(
        tiny_gpt2_dir, setup, tmp_path / "cached", dataset=CachedFeaturesDataset(examples, cache), max_steps=5,
        save_strategy="no",
    )  # fmt: skip
    cached.train()
    plain_losses = [e["loss"] for e in plain.state.log_history if "loss" in e]
    cached_losses = [e["loss"] for e in cached.state.log_history if "loss" in e]
    assert cached_losses == pytest.approx(plain_losses, rel=1e-5)
    for name, tensor in head_state(plain).items():
        assert torch.allclose(head_state(cached)[name], tensor, atol=1e-5), name


def test_the_heads_model_card_is_kept_by_create_model_card_and_push_to_hub(tiny_gpt2_dir, setup, tmp_path, hub):
    trainer = make_trainer(
        tiny_gpt2_dir, setup, tmp_path, max_steps=2, save_strategy="no", hub_model_id="me/head",
        hub_token="fake-token",
    )  # fmt: skip
    trainer.train()
    trainer.save_model()
    card = (tmp_path / "README.md").read_bytes()
    assert b"backward-attention head" in card and is_backattn_card(tmp_path)
    trainer.create_model_card(model_name="head", tags=["extra"])  # the stock Trainer would write its own card
    assert (tmp_path / "README.md").read_bytes() == card
    with hub.as_default_endpoint():
        trainer.push_to_hub(commit_message="head")
    assert hub.repos["me/head"]["README.md"] == card
    assert {"head_config.json", HEAD_WEIGHTS_NAME} <= set(hub.repos["me/head"])
    (tmp_path / "README.md").write_text("# my own notes\n")  # not the head's card: the Trainer's rules apply
    assert not is_backattn_card(tmp_path)
    trainer.create_model_card(model_name="head")
    assert "# my own notes" not in (tmp_path / "README.md").read_text()


def test_a_plain_base_and_the_same_base_with_heads_share_one_feature_cache(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from backattn import LlamaBackwardAttentionForCausalLM
    from backattn.data.feature_cache import FeatureCache, base_fingerprint

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    plain = LlamaForCausalLM(config)
    with_heads = LlamaBackwardAttentionForCausalLM(config, head_config="hidden")
    with_heads.load_state_dict(plain.state_dict(), strict=False)
    with_heads.add_head("seed", head_name="second")  # another head, the first frozen: the head bookkeeping changes
    assert base_fingerprint(with_heads) == base_fingerprint(plain)
    ids = [[1, 2, 3, 4], [5, 6, 7]]
    first = FeatureCache.build_or_load(plain, ids, tmp_path, dtype="float32", progress=False)
    second = FeatureCache.build_or_load(with_heads, ids, tmp_path, dtype="float32", progress=False)
    assert first.directory == second.directory
    assert base_fingerprint(LlamaForCausalLM(config)) != base_fingerprint(plain)  # other weights, another key


def test_a_fresh_run_fixes_the_query_statistics_and_a_resumed_run_keeps_the_checkpoints(tiny_gpt2_dir, setup, tmp_path):
    from backattn.query_standardization import fit_query_standardization

    preset = {"use_hidden_state": True, "standardize_query_state": True, "score_mode": "gate"}
    straight = make_trainer(tiny_gpt2_dir, setup, tmp_path / "straight", preset=preset)
    straight.train()
    head = straight.model.heads["default"]
    expected = make_trainer(tiny_gpt2_dir, setup, tmp_path / "expected", preset=preset).model
    fit_query_standardization(expected, setup[1], SFTCollator(setup[0]), batch_size=4)
    assert torch.equal(head.query_mean, expected.heads["default"].query_mean)  # the first 256 rows' statistics
    assert not torch.equal(head.query_mean, torch.zeros_like(head.query_mean))

    resumed = make_trainer(tiny_gpt2_dir, setup, tmp_path / "straight", preset=preset)
    resumed.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-4"))  # statistics from the file
    for name, tensor in head_state(straight).items():
        assert torch.allclose(head_state(resumed)[name], tensor, atol=1e-6), name
