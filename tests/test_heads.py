"""The heads container (heads.py): several task heads on one frozen base, switched, disabled, deleted and
mixed per row."""

import pytest
import torch
from conftest import fresh_base, ids_batch, logits
from transformers import GPT2LMHeadModel

from backattn import GPT2BackwardAttentionForCausalLM
from backattn.errors import BackattnTypeError


def test_two_heads_side_by_side_and_switching_is_exact_and_copies_nothing(saved_heads, base_dir):
    root, expected = saved_heads
    model = fresh_base(base_dir, root / "math", root / "sentiment")
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
    model = fresh_base(base_dir, root / "math", root / "sentiment")
    model.delete_head("math")
    assert model.list_heads() == ["sentiment"] and model.active_head() is None
    assert "math" not in model.config.heads
    model.set_head("sentiment")
    assert torch.equal(logits(model), expected["sentiment"])
    with pytest.raises(ValueError, match="No head named 'math'; the heads are \\['sentiment'\\]"):
        model.set_head("math")


def test_save_pretrained_keeps_every_resident_head(saved_heads, base_dir, tmp_path):
    root, expected = saved_heads
    model = fresh_base(base_dir, root / "math", root / "sentiment")
    model.set_head("sentiment")
    model.save_pretrained(tmp_path)
    reloaded = GPT2BackwardAttentionForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.list_heads() == ["math", "sentiment"] and reloaded.active_head() == "sentiment"
    assert torch.equal(logits(reloaded), expected["sentiment"])
    reloaded.set_head("math")
    assert torch.equal(logits(reloaded), expected["math"])


def test_mixed_head_batch_equals_rows_run_alone(saved_heads, base_dir):
    root, expected = saved_heads
    model = fresh_base(base_dir, root / "math", root / "sentiment")
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
    model = fresh_base(base_dir, root / "math", root / "sentiment")
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
    with pytest.raises(ValueError, match="No head directory .*it is not a Hub id"):
        model.load_head("not//a valid id")


# --------------------------------------------------------------------------------------------------------
# the container's own API


def test_disable_heads_as_a_context_manager_restores_the_previous_state(saved_heads, base_dir):
    root, expected = saved_heads
    plain = GPT2LMHeadModel.from_pretrained(base_dir).eval()
    with torch.no_grad():
        base_logits = plain(ids_batch()).logits
    model = fresh_base(base_dir)
    model.load_head(root / "math")
    with model.disable_heads() as heads:
        assert heads is model.heads and model.active_head() is None
        assert torch.equal(logits(model), base_logits)
    assert model.active_head() == "math" and torch.equal(logits(model), expected["math"])
    with pytest.raises(RuntimeError, match="inside the block"), model.disable_heads():
        raise RuntimeError("inside the block")
    assert model.active_head() == "math"  # restored on the exception too
    model.disable_heads()  # called plainly: off until enable_heads()
    with model.disable_heads():
        pass
    assert model.active_head() is None  # the block restores what was before it: disabled
    model.enable_heads()
    assert model.active_head() == "math"


def test_the_container_alone_keeps_config_heads_in_sync(saved_heads, base_dir, tmp_path):
    root, _ = saved_heads
    model = fresh_base(base_dir)
    steps = [
        lambda: model.load_head(root / "math"),
        lambda: model.add_head("gated", head_name="chat"),
        lambda: model.load_head(root / "sentiment"),
        lambda: model.delete_head("chat"),
    ]
    for step in steps:
        step()
        assert list(model.config.heads) == model.list_heads()
        for name in model.list_heads():
            assert model.config.heads[name] == model.heads[name].config.to_dict()
    assert model.config.active_head is None  # "chat" was active when it was deleted
    assert {key.split(".")[1] for key in model.state_dict() if key.startswith("heads.")} == {"math", "sentiment"}
    assert "heads.math.layers.0.w_key" in model.state_dict()  # the key names of version 0.1.0


@pytest.mark.parametrize("name", ["add", "keys", "route", "enabled", "model_config"])
def test_names_of_the_containers_own_attributes_are_refused(base_dir, name):
    model = fresh_base(base_dir)
    with pytest.raises(ValueError, match=f"Invalid head name '{name}'"):
        model.add_head("seed", head_name=name)
    assert model.list_heads() == [] and model.config.heads == {}


# --------------------------------------------------------------------------------------------------------
# the PEFT-shaped parts: which heads train, set_head's one name


def trains(model):
    return {name: all(p.requires_grad for p in head.parameters()) for name, head in model.heads.items()}


def test_add_head_trains_the_new_head_alone_unless_asked(base_dir):
    model = GPT2BackwardAttentionForCausalLM.from_pretrained(base_dir, head_config="seed", head_name="first")
    model.add_head("seed", head_name="second")  # as Transformers' add_adapter: the new one, active, trains alone
    assert trains(model) == {"first": False, "second": True} and model.active_head() == "second"
    model.add_head("seed", head_name="third", freeze_others=False)
    assert trains(model) == {"first": False, "second": True, "third": True}
    model.set_head("first")  # switching changes no head's setting
    assert trains(model) == {"first": False, "second": True, "third": True}
    model.set_trainable_heads(["first", "third"])
    assert trains(model) == {"first": True, "second": False, "third": True}
    model.set_trainable_heads("second", others=None)
    assert trains(model) == {"first": True, "second": True, "third": True}
    with pytest.raises(ValueError, match="No head named 'fourth'"):
        model.set_trainable_heads("fourth")


def test_set_head_takes_one_name_and_says_what_to_use_instead(saved_heads, base_dir):
    root, _ = saved_heads
    model = fresh_base(base_dir, root / "math", root / "sentiment")
    with pytest.raises(BackattnTypeError, match=r"set_head\(None\).*disable_heads\(\).*delete_head"):
        model.set_head(None)
    with pytest.raises(BackattnTypeError, match=r"set_head\(\['math', 'sentiment'\]\).*heads=\[name or None per row\]"):
        model.set_head(["math", "sentiment"])
    with pytest.raises(BackattnTypeError, match="takes a head name"):
        model.set_head(0)
    assert model.active_head() == "math"
