"""Several task heads on one frozen base: save, load, switch, disable, delete and mix them per row."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2LMHeadModel

from backattn import GPT2BackwardAttentionForCausalLM
from backattn.head_files import HEAD_CONFIG_NAME, HEAD_WEIGHTS_NAME, MODEL_CARD_NAME
from test_modeling_backattn import VOCAB, randomise, tiny_gpt2_config


@pytest.fixture(scope="module")
def base_dir(gpt2_base_dir):
    return gpt2_base_dir


@pytest.fixture(scope="module")
def other_base_dir(tmp_path_factory):
    torch.manual_seed(1)  # same sizes, different weights: only the fingerprint tells them apart
    path = tmp_path_factory.mktemp("other-base")
    GPT2LMHeadModel(tiny_gpt2_config()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def saved_heads(base_dir, tmp_path_factory):
    """Two trained-looking heads saved from one base: 'math' (hidden preset) and 'sentiment' (seed)."""
    model = GPT2BackwardAttentionForCausalLM.from_pretrained(base_dir, head_config="hidden", head_name="math")
    model.add_head({"num_heads": 2, "out_dim": 8, "latent_dim": 6}, head_name="sentiment")
    randomise(model.heads, seed=3)
    root = tmp_path_factory.mktemp("heads")
    for name in ("math", "sentiment"):
        model.save_head(root / name, head_name=name, task=name, metrics={"ppl": 3.5})
    ids = ids_batch()
    with torch.no_grad():
        expected = {}
        for name in ("math", "sentiment"):
            model.set_head(name)
            expected[name] = model.eval()(ids).logits
    return root, expected


def ids_batch(rows=3, length=7, seed=0):
    return torch.randint(1, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def fresh_base(base_dir):
    return GPT2BackwardAttentionForCausalLM.from_pretrained(base_dir).eval()


def logits(model, ids=None, **kwargs):
    with torch.no_grad():
        return model(ids_batch() if ids is None else ids, **kwargs).logits


def test_head_files_hold_only_the_head(saved_heads, base_dir):
    root, _ = saved_heads
    files = sorted(os.listdir(root / "math"))
    assert files == sorted([MODEL_CARD_NAME, HEAD_CONFIG_NAME, HEAD_WEIGHTS_NAME])
    record = json.loads((root / "math" / HEAD_CONFIG_NAME).read_text())
    assert record["head_name"] == "math" and record["base_model_type"] == "gpt2"
    assert record["base_model_name_or_path"] == str(base_dir)
    assert record["head_options"]["use_hidden_state"] and record["head_options"]["vocab_size"] == VOCAB
    assert record["embedding_fingerprint"].startswith("sha256-bf16:")
    tensors = load_file(root / "math" / HEAD_WEIGHTS_NAME)
    model = fresh_base(base_dir)
    model.load_head(root / "math")
    assert tensors.keys() == model.heads["math"].state_dict().keys()  # the head's tensors and nothing else
    assert all(VOCAB not in t.shape for t in tensors.values())
    card = (root / "math" / MODEL_CARD_NAME).read_text()
    assert f"base_model: {base_dir}" in card and "| ppl | 3.5 |" in card and 'head_name="math"' in card


def test_a_gpt2_sized_seed_head_is_a_few_hundred_kb(tmp_path):
    config = tiny_gpt2_config(vocab_size=50257, n_embd=768, n_layer=1, n_head=12)
    model = GPT2BackwardAttentionForCausalLM(config, head_config="seed")
    model.save_head(tmp_path)
    head_bytes = (tmp_path / HEAD_WEIGHTS_NAME).stat().st_size
    assert 99_000 < head_bytes < 300_000  # 24,852 float32 parameters, not the 50257 x 768 table
    model.save_pretrained(tmp_path / "whole")
    assert head_bytes < (tmp_path / "whole" / "model.safetensors").stat().st_size / 100


def test_save_then_load_on_a_fresh_base_reproduces_logits_exactly(saved_heads, base_dir):
    root, expected = saved_heads
    model = fresh_base(base_dir)
    assert model.load_head(root / "math") == "math"
    assert model.active_head() == "math"  # the first head loaded becomes active
    assert torch.equal(logits(model), expected["math"])
    assert not any(p.requires_grad for p in model.heads["math"].parameters())
    model.load_head(root / "sentiment", is_trainable=True)
    assert all(p.requires_grad for p in model.heads["sentiment"].parameters())


def test_two_heads_side_by_side_and_switching_is_exact_and_copies_nothing(saved_heads, base_dir):
    root, expected = saved_heads
    model = fresh_base(base_dir)
    model.load_head(root / "math")
    model.load_head(root / "sentiment")
    assert model.list_heads() == ["math", "sentiment"] and model.active_head() == "math"
    pointers = {n: p.data_ptr() for n, p in model.heads.named_parameters()}
    for name in ["sentiment", "math", "sentiment", "math"]:
        model.set_head(name)
        assert model.active_head() == name
        assert torch.equal(logits(model), expected[name])
    assert pointers == {n: p.data_ptr() for n, p in model.heads.named_parameters()}


def test_disabled_heads_give_the_plain_base_exactly(saved_heads, base_dir):
    root, expected = saved_heads
    plain = GPT2LMHeadModel.from_pretrained(base_dir).eval()
    model = fresh_base(base_dir)
    model.load_head(root / "math")
    model.disable_heads()
    assert model.active_head() is None
    with torch.no_grad():
        assert torch.equal(logits(model), plain(ids_batch()).logits)
    model.enable_heads()
    assert torch.equal(logits(model), expected["math"])


def test_delete_head(saved_heads, base_dir):
    root, expected = saved_heads
    model = fresh_base(base_dir)
    model.load_head(root / "math")
    model.load_head(root / "sentiment")
    model.delete_head("math")
    assert model.list_heads() == ["sentiment"] and model.active_head() is None
    assert "math" not in model.config.heads
    model.set_head("sentiment")
    assert torch.equal(logits(model), expected["sentiment"])
    with pytest.raises(ValueError, match="No head named 'math'; the heads are \\['sentiment'\\]"):
        model.set_head("math")


def test_save_pretrained_keeps_every_resident_head(saved_heads, base_dir, tmp_path):
    root, expected = saved_heads
    model = fresh_base(base_dir)
    model.load_head(root / "math")
    model.load_head(root / "sentiment")
    model.set_head("sentiment")
    model.save_pretrained(tmp_path)
    reloaded = GPT2BackwardAttentionForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.list_heads() == ["math", "sentiment"] and reloaded.active_head() == "sentiment"
    assert torch.equal(logits(reloaded), expected["sentiment"])
    reloaded.set_head("math")
    assert torch.equal(logits(reloaded), expected["math"])


def test_mixed_head_batch_equals_rows_run_alone(saved_heads, base_dir):
    root, expected = saved_heads
    model = fresh_base(base_dir)
    model.load_head(root / "math")
    model.load_head(root / "sentiment")
    plain = GPT2LMHeadModel.from_pretrained(base_dir).eval()
    ids = ids_batch()
    mixed = logits(model, ids, heads=["sentiment", None, "math"])
    # float32, and each head runs on a sub-batch of another shape than the whole batch: rounding differs
    assert torch.allclose(mixed[0], expected["sentiment"][0], atol=2e-5)
    with torch.no_grad():
        assert torch.equal(mixed[1], plain(ids).logits[1])
    assert torch.allclose(mixed[2], expected["math"][2], atol=2e-5)
    with pytest.raises(ValueError, match="heads= names 'chat', which is not loaded"):
        logits(model, ids, heads=["chat", None, "math"])
    with pytest.raises(ValueError, match="one entry per batch row: got 2 for a batch of 3"):
        logits(model, ids, heads=["math", None])


@pytest.mark.parametrize("num_beams", [1, 2])
def test_mixed_head_generate_equals_rows_generated_alone(saved_heads, base_dir, num_beams):
    root, _ = saved_heads
    model = fresh_base(base_dir)
    model.load_head(root / "math")
    model.load_head(root / "sentiment")
    prompts = ids_batch(rows=3, length=5, seed=4)
    options = dict(max_new_tokens=6, do_sample=False, num_beams=num_beams, pad_token_id=0, eos_token_id=None)
    mixed = model.generate(prompts, heads=["math", "sentiment", None], **options)
    for row, name in enumerate(["math", "sentiment", None]):
        if name is None:
            model.disable_heads()
        else:
            model.enable_heads()
            model.set_head(name)
        alone = model.generate(prompts[row : row + 1], **options)
        assert torch.equal(mixed[row], alone[0]), name
    model.enable_heads()


# --------------------------------------------------------------------------------------------------------
# bad input: a clear error, and the heads already loaded stay intact and active


@pytest.fixture
def loaded(saved_heads, base_dir):
    root, expected = saved_heads
    model = fresh_base(base_dir)
    model.load_head(root / "math")
    yield model, root
    assert model.list_heads() == ["math"] and model.active_head() == "math"
    assert torch.equal(logits(model), expected["math"])


def copy_head(root, name, tmp_path, copy_name=None):
    target = tmp_path / (copy_name or f"copy-{name}")
    target.mkdir()
    for file in (root / name).iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target


def test_refuses_a_head_from_another_base(loaded, other_base_dir, saved_heads):
    model, root = loaded
    other = fresh_base(other_base_dir)
    with pytest.raises(ValueError, match="trained on a different base model.*fingerprint.*ignore_base_mismatch=True"):
        other.load_head(root / "math")
    assert other.list_heads() == []
    with pytest.warns(UserWarning, match="Loading it anyway"):
        other.load_head(root / "math", ignore_base_mismatch=True)
    assert other.list_heads() == ["math"]


def test_refuses_a_head_of_other_sizes(loaded, tmp_path):
    model, root = loaded
    bad = copy_head(root, "sentiment", tmp_path)
    record = json.loads((bad / HEAD_CONFIG_NAME).read_text())
    record["head_options"]["hidden_size"] = 768
    (bad / HEAD_CONFIG_NAME).write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"hidden_size 768 \(head\) != 24 \(base model\)"):
        model.load_head(bad)


def test_missing_files(loaded, tmp_path):
    model, root = loaded
    bad = copy_head(root, "sentiment", tmp_path)
    (bad / HEAD_WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="head.safetensors is missing"):
        model.load_head(bad)
    bad = copy_head(root, "math", tmp_path, copy_name="no-config")
    (bad / HEAD_CONFIG_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="head_config.json is missing"):
        model.load_head(bad, head_name="other")


def test_truncated_and_corrupted_weights(loaded, tmp_path):
    model, root = loaded
    bad = copy_head(root, "sentiment", tmp_path)
    data = (bad / HEAD_WEIGHTS_NAME).read_bytes()
    (bad / HEAD_WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated, corrupted"):
        model.load_head(bad)
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF
    (bad / HEAD_WEIGHTS_NAME).write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="truncated, corrupted"):
        model.load_head(bad)


def test_corrupted_config(loaded, tmp_path):
    model, root = loaded
    bad = copy_head(root, "sentiment", tmp_path)
    (bad / HEAD_CONFIG_NAME).write_text('{"head_options": ')
    with pytest.raises(ValueError, match="is not a valid head config"):
        model.load_head(bad)


def test_weights_that_do_not_fit_the_config(loaded, tmp_path):
    model, root = loaded
    bad = copy_head(root, "sentiment", tmp_path)
    record = json.loads((bad / HEAD_CONFIG_NAME).read_text())
    record["head_options"]["out_dim"] = 10
    record["head_options"]["num_heads"] = 1
    (bad / HEAD_CONFIG_NAME).write_text(json.dumps(record))
    with pytest.raises(ValueError, match="do not fit the head described by its config"):
        model.load_head(bad)


def test_nan_weights_are_refused(loaded, tmp_path):
    model, root = loaded
    bad = tmp_path / "nan-head"
    bad.mkdir()
    record = json.loads((root / "sentiment" / HEAD_CONFIG_NAME).read_text())
    record.pop("weights_sha256")
    (bad / HEAD_CONFIG_NAME).write_text(json.dumps(record))
    tensors = {n: t.clone() for n, t in model.heads["math"].state_dict().items()}
    tensors["layers.0.w_key"][0, 0] = float("nan")
    save_file(tensors, bad / HEAD_WEIGHTS_NAME)
    with pytest.raises(ValueError, match="NaN or inf"):
        model.load_head(bad)


def test_pickle_files_are_never_loaded(loaded, tmp_path):
    model, root = loaded
    bad = copy_head(root, "sentiment", tmp_path)
    (bad / HEAD_WEIGHTS_NAME).unlink()
    torch.save(model.heads["math"].state_dict(), bad / "head.bin")
    with pytest.raises(ValueError, match="pickle files are never loaded"):
        model.load_head(bad)


def test_unknown_and_duplicate_and_bad_names(loaded):
    model, root = loaded
    with pytest.raises(ValueError, match="A head named 'math' is already loaded"):
        model.load_head(root / "math")
    with pytest.raises(ValueError, match="A head named 'math' already exists"):
        model.add_head("seed", head_name="math")
    with pytest.raises(ValueError, match="No head named 'chat'"):
        model.set_head("chat")
    with pytest.raises(ValueError, match="No head named 'chat'"):
        model.delete_head("chat")
    with pytest.raises(ValueError, match="Invalid head name 'a.b'"):
        model.load_head(root / "sentiment", head_name="a.b")
    with pytest.raises(ValueError, match="neither a local directory nor a valid Hub repo id"):
        model.load_head("not//a valid id")


def test_failed_save_leaves_the_previous_head_intact(loaded, tmp_path, monkeypatch):
    model, root = loaded
    target = copy_head(root, "math", tmp_path)
    before = {f.name: f.read_bytes() for f in target.iterdir()}

    def fail(*args, **kwargs):
        raise OSError("disk full")

    import backattn.head_files as head_files

    monkeypatch.setattr(head_files.os, "fsync", fail)
    model.add_head("seed", head_name="new")
    with pytest.raises(OSError, match="disk full"):
        model.save_head(target, head_name="new")
    assert {f.name: f.read_bytes() for f in target.iterdir()} == before  # no temporary files left either
    model.delete_head("new")
    model.set_head("math")


def test_saving_nan_weights_is_refused(loaded, tmp_path):
    model, _ = loaded
    model.add_head("seed", head_name="broken")
    with torch.no_grad():
        model.heads["broken"].layers[0].w_query[0, 0] = float("inf")
    with pytest.raises(ValueError, match="holds NaN or inf"):
        model.save_head(tmp_path / "broken", head_name="broken")
    assert not (tmp_path / "broken").exists() or not any((tmp_path / "broken").iterdir())
    model.delete_head("broken")
    model.set_head("math")
