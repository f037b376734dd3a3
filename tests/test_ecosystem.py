"""backattn with the libraries around it, the real ones on tiny random models: TRL's SFTTrainer trains the head
(through TRL's fused LM-head protocol), LoRA on the base and a head on top train and save together, and the
PEFT-shaped head API."""

import json
import types

import pytest
import torch
from conftest import randomise, tiny_llama_config
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaForCausalLM, Trainer, TrainingArguments
from transformers.utils import logging as transformers_logging

from backattn import LlamaBackwardAttentionForCausalLM
from backattn.data.sft_data import SFTCollator
from backattn.errors import BackattnTypeError, BackattnValueError
from backattn.trainer import HeadTrainer

trl = pytest.importorskip("trl")
from trl import SFTConfig, SFTTrainer  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

ROWS = [f"Tom has {a} apples and buys {a + 3} more, so he has {2 * a + 3} apples." for a in range(2, 14)]


@pytest.fixture(autouse=True)
def quiet():
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # the load reports of fresh heads on a plain base
    yield
    transformers_logging.set_verbosity(verbosity)


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)  # the real SmolLM2 tokenizer; a tiny random base


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, smollm2_tokenizer):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama-smollm2-vocab")
    config = tiny_llama_config(
        vocab_size=len(smollm2_tokenizer), max_position_embeddings=128,
        bos_token_id=smollm2_tokenizer.bos_token_id, eos_token_id=smollm2_tokenizer.eos_token_id,
        pad_token_id=smollm2_tokenizer.pad_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


#: Head options that learn fast on a tiny random base, whose logits are nearly uniform (the seed's division by
#: the vocabulary size would make its first gradients tiny).
FAST = {"divide_by_vocab": False, "use_hidden_state": True}


def head_on(base, preset=FAST, seed=0):
    torch.manual_seed(seed)
    return LlamaBackwardAttentionForCausalLM.from_pretrained(base, head_config=preset)


def snapshot(model):
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


def changed(model, before):
    return {name for name, parameter in model.named_parameters() if not torch.equal(parameter, before[name])}


def sft_config(tmp_path, **overrides):
    options = dict(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=5e-2, logging_steps=1,
        report_to=[], use_cpu=True, bf16=False, save_strategy="no", max_length=32, seed=0, disable_tqdm=True,
    )  # fmt: skip
    return SFTConfig(**{**options, **overrides})


# --------------------------------------------------------------------------------------------------------
# TRL


def test_trl_sft_trainer_trains_the_head_and_nothing_else(tiny_base, smollm2_tokenizer, tmp_path):
    model = head_on(tiny_base)
    before = snapshot(model)
    trainer = SFTTrainer(
        model=model, args=sft_config(tmp_path), train_dataset=Dataset.from_dict({"text": ROWS}),
        processing_class=smollm2_tokenizer,
    )  # fmt: skip
    assert "forward" not in vars(model)  # TRL's fused LM head (which skips the head) is not installed
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(entry["grad_norm"] > 0 for entry in logs), logs
    assert logs[-1]["loss"] < logs[0]["loss"] - 0.1, logs
    assert 0 < logs[-1]["entropy"] and 0 <= logs[-1]["mean_token_accuracy"] <= 1
    assert changed(model, before) == {name for name in before if name.startswith("heads.")}


def test_trl_loss_and_gradients_equal_head_trainers_on_one_batch(tiny_base, smollm2_tokenizer, tmp_path):
    model = head_on(tiny_base)
    randomise(model.heads, seed=4)
    sft = SFTTrainer(
        model=model, args=sft_config(tmp_path / "sft"), train_dataset=Dataset.from_dict({"text": ROWS}),
        processing_class=smollm2_tokenizer,
    )  # fmt: skip
    batch = sft.data_collator([sft.train_dataset[i] for i in range(4)])
    assert (batch["labels"] == -100).any()  # padding: ignored positions in the batch
    head_trainer = HeadTrainer(
        model=model, args=TrainingArguments(output_dir=str(tmp_path / "head"), use_cpu=True, report_to=[])
    )
    model.train()
    losses, grads = [], []
    for trainer in (sft, head_trainer):
        model.zero_grad()
        loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
        losses.append(loss.detach())
        grads.append({name: p.grad.clone() for name, p in model.heads.named_parameters()})
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-7)


def test_fused_lm_head_outputs_are_the_heads_log_probabilities_at_trls_temperature(tiny_base):
    model = head_on(tiny_base).eval()
    randomise(model.heads, seed=5)
    add_fused_lm_head(model, temperature=0.5, outputs=("log_probs", "entropy", "is_top1"))
    assert "forward" not in vars(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :4] = -100
    with torch.no_grad():
        fused = model(ids, labels=labels, fused_lm_head=True)
        log_probs = torch.log_softmax(model(ids).logits[:, :-1] / 0.5, dim=-1)
    targets, mask = labels[:, 1:], labels[:, 1:] != -100
    expected = log_probs.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * mask
    torch.testing.assert_close(fused.log_probs, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(fused.label_mask, mask)
    assert torch.equal(fused.is_top1, (log_probs.argmax(-1) == targets) & mask)
    torch.testing.assert_close(fused.entropy, -(log_probs.exp() * log_probs).sum(-1) * mask, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused.loss, -expected.sum() / mask.sum())
    with pytest.raises(BackattnValueError, match="fused_lm_head=True .* no labels"):
        model(ids, fused_lm_head=True)


def test_fused_lm_head_serves_heads_per_row_and_the_base(tiny_base):
    model = head_on(tiny_base).eval()
    randomise(model.heads, seed=6)
    ids = torch.randint(0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mixed = model(ids, labels=ids, heads=["default", None], fused_lm_head=True).log_probs
        with model.disable_heads():
            base = model(ids, labels=ids, fused_lm_head=True).log_probs
        active = model(ids, labels=ids, fused_lm_head=True).log_probs
    assert torch.allclose(mixed[0], active[0], atol=1e-5) and torch.allclose(mixed[1], base[1], atol=1e-5)
    assert not torch.allclose(active[1], base[1], atol=1e-3)


def test_liger_kernels_fused_loss_is_refused_with_the_setting_named(tiny_base):
    model = head_on(tiny_base)
    namespace = {"__name__": "liger_kernel.transformers.model.llama"}
    exec("def lce_forward(self, *args, **kwargs):\n    pass\n", namespace)
    with pytest.raises(BackattnValueError, match="fused_linear_cross_entropy': False"):
        model.forward = types.MethodType(namespace["lce_forward"], model)
    assert "forward" not in vars(model)


# --------------------------------------------------------------------------------------------------------
# LoRA on the base and a head on top


def lora_config():
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def test_add_adapter_keeps_the_head_training_beside_lora(tiny_base):
    model = head_on(tiny_base)
    model.add_adapter(lora_config())  # adapter "default" beside head "default": separate names
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {name for name in trainable if "lora_" in name} and {name for name in trainable if "heads." in name}
    assert trainable == {name for name in trainable if "lora_" in name or name.startswith("heads.")}
    assert model.active_adapters() == ["default"] and model.active_head() == "default"
    ids = torch.randint(0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(2))
    with pytest.raises(BackattnTypeError, match=r"adapter_names.*heads="):
        model(ids, adapter_names=["default", "default"])
    # the *_adapter methods drive LoRA, the *_heads methods the heads
    with torch.no_grad():
        for layer in model.model.layers:
            torch.nn.init.normal_(layer.self_attn.q_proj.lora_B["default"].weight)
        both = model(ids).logits
        model.disable_adapters()
        head_alone = model(ids).logits
        model.enable_adapters()
        with model.disable_heads():
            lora_alone = model(ids).logits
    assert not torch.allclose(both, head_alone) and not torch.allclose(both, lora_alone)
    assert model.active_head() == "default"


def test_lora_and_head_train_together_and_round_trip_exactly(tiny_base, smollm2_tokenizer, tmp_path):
    model = head_on(tiny_base)
    model.add_adapter(lora_config())
    before = snapshot(model)
    rows = smollm2_tokenizer(ROWS)
    dataset = Dataset.from_dict({"input_ids": rows["input_ids"], "labels": rows["input_ids"]})
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=4, learning_rate=5e-2,
        report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
    )  # fmt: skip
    seen = set()

    class Gradients(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            seen.update(n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0)
            return loss

    Gradients(model=model, args=args, train_dataset=dataset, data_collator=SFTCollator(smollm2_tokenizer)).train()
    moved = changed(model, before)
    assert {n for n in moved if "lora_A" in n} and {n for n in moved if "lora_B" in n}
    assert {n for n in moved if n.startswith("heads.")} == {n for n in before if n.startswith("heads.")}
    assert moved == {n for n in moved if "lora_" in n or n.startswith("heads.")}  # the base itself never moves
    assert {n for n in seen if "lora_" in n} and {n for n in seen if n.startswith("heads.")}

    model.eval()
    model.save_pretrained(tmp_path / "saved")
    saved = tmp_path / "saved"
    assert not any(key.split(".", 2)[2].startswith("heads.") for key in load_file(saved / "adapter_model.safetensors"))
    assert json.loads((saved / "heads" / "heads.json").read_text())["active_head"] == "default"
    ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(ids).logits
    reloaded = LlamaBackwardAttentionForCausalLM.from_pretrained(saved).eval()  # base + adapter + heads
    fresh = LlamaBackwardAttentionForCausalLM.from_pretrained(tiny_base).eval()
    fresh.load_adapter(saved)  # or onto a base already in memory
    for model_again in (reloaded, fresh):
        assert model_again.active_adapters() == ["default"] and model_again.list_heads() == ["default"]
        with torch.no_grad():
            assert torch.equal(model_again(ids).logits, expected)
    # the head alone, by save_head / load_head, as ever
    model.save_head(tmp_path / "head-alone")
    assert fresh.load_head(tmp_path / "head-alone", head_name="copy") == "copy"


def test_get_peft_model_freezes_heads_as_it_freezes_everything_outside_the_adapter(tiny_base, tmp_path):
    peft_model = get_peft_model(head_on(tiny_base), lora_config())
    model = peft_model.get_base_model()
    assert not any(p.requires_grad for p in model.heads.parameters())  # PEFT's rule
    with pytest.raises(BackattnValueError, match="no head to train.*requires_grad_"):
        HeadTrainer(model=peft_model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True)).train()
    model.set_trainable_heads("default")  # the one line that puts the head back in training
    trainable, total = peft_model.get_nb_trainable_parameters()
    assert (
        trainable == sum(p.numel() for n, p in peft_model.named_parameters() if p.requires_grad) and total > trainable
    )
    with pytest.raises(TypeError, match="modules_to_save cannot be applied"):  # PEFT cannot wrap the heads container
        get_peft_model(head_on(tiny_base), LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["heads"]))


def test_trl_trains_lora_and_head_together_and_saves_both(tiny_base, smollm2_tokenizer, tmp_path):
    model = head_on(tiny_base)
    model.add_adapter(lora_config())
    before = snapshot(model)
    trainer = SFTTrainer(
        model=model, args=sft_config(tmp_path / "run", max_steps=3), train_dataset=Dataset.from_dict({"text": ROWS}),
        processing_class=smollm2_tokenizer,
    )  # fmt: skip
    trainer.train()
    moved = changed(model, before)
    assert {n for n in moved if "lora_B" in n} and {n for n in moved if n.startswith("heads.")}
    assert moved == {n for n in moved if "lora_" in n or n.startswith("heads.")}
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = LlamaBackwardAttentionForCausalLM.from_pretrained(tmp_path / "saved").eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model.eval()(ids).logits)


def test_head_trainer_refuses_to_train_what_its_checkpoints_would_drop(tiny_base, tmp_path):
    model = head_on(tiny_base)
    model.add_adapter(lora_config())
    trainer = HeadTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True))
    with pytest.raises(BackattnValueError, match="other parameter.*lora_.*transformers.Trainer"):
        trainer.train()


# --------------------------------------------------------------------------------------------------------
# the PEFT-shaped head API


def test_trainable_parameter_counts_as_peft_prints_them(tiny_base, capsys):
    model = head_on(tiny_base)
    head = sum(p.numel() for p in model.heads.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert model.get_nb_trainable_parameters() == (head, total)
    model.print_trainable_parameters()
    assert capsys.readouterr().out == (
        f"trainable params: {head:,d} || all params: {total:,d} || trainable%: {100 * head / total:.4f}\n"
    )
