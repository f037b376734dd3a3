"""Head files (head_files.py): one head saved on its own, read back with every check, hot-swapped, and
shared through the Hub.

The Hub's servers cannot be reached from here: the `hub` fixture serves tests/fake_hub.py on 127.0.0.1 in
their place. The client side is the real huggingface_hub; backattn calls only its public API.
"""

import errno
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import VOCAB, copy_head, fresh_base, ids_batch, logits, randomise, reference_head_logits, tiny_gpt2_config
from huggingface_hub import constants
from safetensors.torch import load_file, save_file

from backattn import GPT2BackwardAttentionForCausalLM
from backattn.errors import HeadFileError
from backattn.head_files import HEAD_CONFIG_NAME, HEAD_WEIGHTS_NAME, MODEL_CARD_NAME


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
    assert "| ppl | 3.5 |" in card and 'head_name="math"' in card
    assert "base_model:" not in card and "huggingface.co//" not in card and f"`{base_dir}` (a local model)" in card


def test_the_model_card_is_hub_ready(saved_heads, base_dir, tmp_path):
    from huggingface_hub import ModelCard

    from backattn.head_card import build_head_card, hub_model_id

    root, _ = saved_heads
    card = ModelCard.load(root / "math" / MODEL_CARD_NAME)  # parses as the Hub parses it
    data = card.data.to_dict()
    assert data["library_name"] == "backattn" and data["pipeline_tag"] == "text-generation"
    assert data["tags"] == ["backattn", "backward-attention", "math"]
    (result,) = data["model-index"][0]["results"]
    assert result["metrics"] == [{"type": "ppl", "value": 3.5, "name": "ppl"}]
    # A base from the Hub cache is named by its Hub id; a Hub data set is listed; a license is the caller's.
    record = json.loads((root / "math" / HEAD_CONFIG_NAME).read_text())
    record["base_model_name_or_path"] = "/cache/hub/models--openai-community--gpt2/snapshots/0123abc/"
    card = build_head_card("math", record, 10, "math word problems", "nvidia/OpenMathInstruct-2 (train_1M)",
                           {"accuracy": 0.25}, license="apache-2.0")  # fmt: skip
    assert card.data.base_model == "openai-community/gpt2" and card.data.license == "apache-2.0"
    assert card.data.datasets == ["nvidia/OpenMathInstruct-2"] and "math-word-problems" in card.data.tags
    assert "[`openai-community/gpt2`](https://huggingface.co/openai-community/gpt2)" in card.text
    assert card.data.eval_results[0].metric_value == 0.25
    # A local data file is not a Hub data set, and no task leaves no tag for it.
    card = build_head_card("math", record, 10, None, f"{tmp_path}/rows.jsonl", None)
    assert card.data.datasets is None and card.data.tags == ["backattn", "backward-attention"]
    assert hub_model_id("gpt2") == "gpt2" and hub_model_id(str(tmp_path)) is None


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


def test_refuses_a_head_from_another_base(loaded, other_base_dir, saved_heads):
    model, root = loaded
    other = fresh_base(other_base_dir)
    with pytest.raises(ValueError, match="trained on a different base model.*fingerprint.*ignore_base_mismatch=True"):
        other.load_head(root / "math")
    assert other.list_heads() == []
    with pytest.warns(UserWarning, match="Loading it anyway"):
        other.load_head(root / "math", ignore_base_mismatch=True)
    assert other.list_heads() == ["math"]


def test_a_head_from_one_architecture_is_refused_on_another_and_changes_nothing(tmp_path):
    """A Llama head on a Gemma 3 base of the same vocabulary and hidden sizes (and the other way round): only the
    fingerprint tells the bases apart; the refused load leaves the model exactly as it was."""
    from conftest import HIDDEN, tiny_llama_config
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaForCausalLM

    from backattn import family_for
    from backattn.errors import BackattnValueError

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(tmp_path / "llama")
    gemma_config = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=12, query_pre_attn_scalar=12, sliding_window=8, max_position_embeddings=64,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    Gemma3ForCausalLM(gemma_config).save_pretrained(tmp_path / "gemma")
    llama = family_for("llama").from_pretrained(tmp_path / "llama", head_config="hidden", head_name="math").eval()
    gemma = family_for("gemma3_text").from_pretrained(tmp_path / "gemma", head_config="gated", head_name="own").eval()
    randomise(llama.heads, seed=3)
    randomise(gemma.heads, seed=4)
    llama.save_head(tmp_path / "llama-head", head_name="math")
    gemma.save_head(tmp_path / "gemma-head", head_name="own")

    for model, head, trained_on in ((gemma, "llama-head", "llama"), (llama, "gemma-head", "gemma")):
        state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        trainable = {name: p.requires_grad for name, p in model.named_parameters()}
        config, heads, active, expected = model.config.to_dict(), model.list_heads(), model.active_head(), logits(model)
        with pytest.raises(
            BackattnValueError,
            match=rf"Head 'visitor' from .*{head} was trained on a different base model \(.*{trained_on}'\): "
            r"its embedding-table fingerprint .* differs from this model's .*ignore_base_mismatch=True",
        ):
            model.load_head(tmp_path / head, head_name="visitor")
        assert model.list_heads() == heads and model.active_head() == active
        assert model.config.to_dict() == config
        assert {name: p.requires_grad for name, p in model.named_parameters()} == trainable
        after = model.state_dict()
        assert after.keys() == state.keys() and all(torch.equal(after[name], state[name]) for name in state)
        assert torch.equal(logits(model), expected)


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
    with pytest.raises(HeadFileError, match="head.safetensors is missing"):
        model.load_head(bad)
    bad = copy_head(root, "math", tmp_path, copy_name="no-config")
    (bad / HEAD_CONFIG_NAME).unlink()
    with pytest.raises(HeadFileError, match="head_config.json is missing"):
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
    record["head_options"]["num_attention_heads"] = 1
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


def test_failed_save_leaves_the_previous_head_intact(loaded, tmp_path, monkeypatch):
    model, root = loaded
    target = copy_head(root, "math", tmp_path)
    before = {f.name: f.read_bytes() for f in target.iterdir()}

    def fail(*args, **kwargs):
        raise OSError("disk full")

    from backattn import head_files

    monkeypatch.setattr(head_files.os, "fsync", fail)
    model.add_head("seed", head_name="new")
    with pytest.raises(HeadFileError, match=r"\(disk full\); the directory holds what it held before"):
        model.save_head(target, head_name="new")
    assert {f.name: f.read_bytes() for f in target.iterdir()} == before
    assert sorted(p.name for p in target.parent.iterdir() if p.name.startswith(".")) == []  # no staging left
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


# --------------------------------------------------------------------------------------------------------
# the Hub


REPO = "fake-user/math-head"


def test_push_then_pull_by_repo_id_then_offline_from_the_cache(hub, base_dir, tmp_path):
    model = GPT2BackwardAttentionForCausalLM.from_pretrained(base_dir, head_config="hidden", head_name="math").eval()
    randomise(model.heads)
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits

    with hub.as_default_endpoint():
        model.push_head_to_hub(REPO, token="fake-token", task="math word problems")
        assert set(hub.repos[REPO]) == {HEAD_CONFIG_NAME, HEAD_WEIGHTS_NAME, MODEL_CARD_NAME}
        assert "math word problems" in hub.repos[REPO][MODEL_CARD_NAME].decode()

        cache = tmp_path / "hub-cache"
        pulled = GPT2BackwardAttentionForCausalLM.from_pretrained(base_dir).eval()
        assert pulled.load_head(REPO, cache_dir=cache) == "math"
        with torch.no_grad():
            assert torch.equal(pulled(ids).logits, expected)

    # Offline, from the cache the online pull filled, in a fresh process with HF_HUB_OFFLINE=1.
    requests_before = len(hub.requests)
    save_file({"ids": ids, "logits": expected.contiguous()}, tmp_path / "expected.safetensors")
    script = textwrap.dedent(
        f"""
        import torch
        from huggingface_hub import constants
        from safetensors.torch import load_file
        from backattn import GPT2BackwardAttentionForCausalLM
        assert constants.HF_HUB_OFFLINE
        expected = load_file({str(tmp_path / "expected.safetensors")!r})
        model = GPT2BackwardAttentionForCausalLM.from_pretrained({str(base_dir)!r}).eval()
        model.load_head({REPO!r}, cache_dir={str(cache)!r})
        with torch.no_grad():
            assert torch.equal(model(expected["ids"]).logits, expected["logits"])
        print("OK")
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_TELEMETRY": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "OK"
    assert len(hub.requests) == requests_before  # nothing reached the server


def test_offline_pull_of_an_uncached_repo_fails_clearly_and_changes_nothing(hub, base_dir, tmp_path, monkeypatch):
    model = GPT2BackwardAttentionForCausalLM.from_pretrained(base_dir, head_config="gated").eval()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with hub.as_default_endpoint(), pytest.raises(HeadFileError, match="not in the local Hub cache while offline"):
        model.load_head("fake-user/never-pushed", cache_dir=tmp_path / "empty-cache")
    assert model.list_heads() == ["default"] and model.active_head() == "default"


def test_pushing_again_updates_the_repo(hub, base_dir, tmp_path):
    model = GPT2BackwardAttentionForCausalLM.from_pretrained(base_dir, head_config="seed", head_name="math").eval()
    with hub.as_default_endpoint():
        model.push_head_to_hub(REPO, token="fake-token")
        first = hub.repos[REPO][HEAD_WEIGHTS_NAME]
        randomise(model.heads, seed=5)
        model.push_head_to_hub(REPO, token="fake-token", commit_message="retrained")
        assert hub.repos[REPO][HEAD_WEIGHTS_NAME] != first
        assert hub.commits(REPO)[-1].message == "retrained"
        pulled = GPT2BackwardAttentionForCausalLM.from_pretrained(base_dir).eval()
        pulled.load_head(REPO, cache_dir=tmp_path / "cache")
        for name, tensor in model.heads["math"].state_dict().items():
            assert torch.equal(pulled.heads["math"].state_dict()[name], tensor)


# --------------------------------------------------------------------------------------------------------
# files written by backattn 0.1.0 still load

#: The options of a head as 0.1.0 saved them: every field, the sub-head count and mix under their old names.
OPTIONS_0_1_0 = {
    "divide_by_vocab": False, "dropout": 0.0, "head_combine": "mix", "hidden_size": 24, "latent_dim": 6,
    "layer_mode": "parallel", "logit_weighting": "softmax", "num_heads": 2, "num_layers": 1, "out_dim": 8,
    "rms_norm_eps": 1e-06, "score_mode": "gate", "use_hidden_state": True, "vocab_chunk_size": None,
    "vocab_size": VOCAB,
}  # fmt: skip


def write_head_0_1_0(directory, embeddings):
    """A head directory exactly as backattn 0.1.0's save_head wrote it, built here by hand (random weights)."""
    import hashlib

    from safetensors.torch import save

    generator = torch.Generator().manual_seed(5)
    shapes = {"gate": (1,), "layers.0.head_mix": (2,), "layers.0.norm.weight": (24,), "layers.0.w_hidden": (24, 8),
              "layers.0.w_key": (6, 8), "layers.0.w_latent": (24, 6), "layers.0.w_query": (8, 8),
              "layers.0.w_value": (6, 8)}  # fmt: skip
    tensors = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    weights = save(tensors, metadata={"format": "pt", "backattn_head": "1"})
    table = embeddings.detach().to(torch.bfloat16).contiguous()
    digest = hashlib.sha256(table.view(torch.int16).numpy().tobytes())
    digest.update(repr(tuple(table.shape)).encode())
    record = {
        "backattn_version": "0.1.0", "base_model_name_or_path": None, "base_model_revision": None,
        "base_model_type": "gpt2", "embedding_fingerprint": "sha256-bf16:" + digest.hexdigest(), "format_version": 1,
        "head_name": "old", "head_options": OPTIONS_0_1_0, "metadata": {},
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
    }  # fmt: skip
    directory.mkdir()
    (directory / HEAD_WEIGHTS_NAME).write_bytes(weights)
    (directory / MODEL_CARD_NAME).write_text("---\nlibrary_name: backattn\n---\n# old\n")
    (directory / HEAD_CONFIG_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return tensors


def test_a_head_saved_by_version_0_1_0_loads(base_dir, tmp_path):
    model = fresh_base(base_dir)
    tensors = write_head_0_1_0(tmp_path / "old", model.get_input_embeddings().weight)
    assert model.load_head(tmp_path / "old") == "old"
    head = model.heads["old"]
    assert (head.config.num_attention_heads, head.config.attention_head_combine) == (2, "mix")
    for name, tensor in tensors.items():
        assert torch.equal(head.state_dict()[name], tensor), name
    ids = ids_batch()
    with torch.no_grad():
        hidden = model.base_model(ids).last_hidden_state
        expected = torch.stack(
            [
                reference_head_logits(head, model.lm_head(hidden[b]), hidden[b], model.get_input_embeddings().weight)
                for b in range(3)
            ]
        )
        assert torch.allclose(logits(model, ids), expected, rtol=1e-4, atol=1e-4)  # float32, logits of size ~100
    model.save_head(tmp_path / "again", head_name="old")  # saved again under the new option names
    options = json.loads((tmp_path / "again" / HEAD_CONFIG_NAME).read_text())["head_options"]
    assert options["num_attention_heads"] == 2 and "num_heads" not in options


def test_a_model_saved_by_version_0_1_0_loads(base_dir, tmp_path):
    """A saved model whose config.json holds the heads' options under the 0.1.0 names (and 0.1.0's auto_map)."""
    from transformers import AutoModelForCausalLM

    model = GPT2BackwardAttentionForCausalLM.from_pretrained(base_dir, head_config={**OPTIONS_0_1_0}, head_name="math")
    randomise(model.heads)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["heads"] = {"math": OPTIONS_0_1_0}
    config["auto_map"] = {"AutoConfig": "configuration_backattn.GPT2BackwardAttentionConfig",
                          "AutoModelForCausalLM": "modeling_backattn.GPT2BackwardAttentionForCausalLM"}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    for loader in (GPT2BackwardAttentionForCausalLM, AutoModelForCausalLM):
        reloaded = loader.from_pretrained(tmp_path).eval()
        assert type(reloaded) is GPT2BackwardAttentionForCausalLM and reloaded.list_heads() == ["math"]
        assert reloaded.config.heads["math"]["num_attention_heads"] == 2
        assert torch.equal(logits(reloaded), logits(model.eval()))


# --------------------------------------------------------------------------------------------------------
# the directory as a whole: atomic replacement, kills, concurrent writers, foreign files

OURS = (HEAD_CONFIG_NAME, HEAD_WEIGHTS_NAME, MODEL_CARD_NAME)


@pytest.fixture
def two_heads(saved_heads, base_dir, tmp_path):
    """A model holding 'math' and 'sentiment', each head's files as one save writes them, and a target
    directory holding 'math' and a file of the user's."""
    root, _ = saved_heads
    model = fresh_base(base_dir, root / "math", root / "sentiment")
    files = {}
    for name in ("math", "sentiment"):
        directory = model.save_head(tmp_path / f"reference-{name}", head_name=name)
        files[name] = head_files_of(directory)
    target = model.save_head(tmp_path / "parent" / "target", head_name="math")
    (target / "notes.txt").write_text("mine")
    return model, files, target


def head_files_of(directory):
    """A head directory's files, by content: the config (less the weights' checksum, which covers the order of
    the safetensors metadata, not fixed across processes), the card, and each tensor's exact bytes."""
    state = {}
    if (directory / HEAD_CONFIG_NAME).is_file():
        state[HEAD_CONFIG_NAME] = {**json.loads((directory / HEAD_CONFIG_NAME).read_text()), "weights_sha256": None}
    if (directory / MODEL_CARD_NAME).is_file():
        state[MODEL_CARD_NAME] = (directory / MODEL_CARD_NAME).read_bytes()
    if (directory / HEAD_WEIGHTS_NAME).is_file():
        tensors = load_file(str(directory / HEAD_WEIGHTS_NAME))
        state[HEAD_WEIGHTS_NAME] = {k: (v.dtype, tuple(v.shape), v.numpy().tobytes()) for k, v in tensors.items()}
    return state


def in_child(action):
    """Run ``action`` in a forked child (which ends with os._exit); wait for it; return its exit status."""
    pid = os.fork()
    if pid == 0:  # the child
        try:
            action()
        finally:
            os._exit(0)
    return os.waitpid(pid, 0)[1]


def kill_at(step):
    from backattn import head_files

    def after(reached):
        if reached == step:
            os.kill(os.getpid(), signal.SIGKILL)

    head_files._after = after


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
@pytest.mark.parametrize("step", ["weights", "card", "config", "carried", "set aside", "swapped"])
def test_a_save_killed_after_any_step_leaves_the_old_head_or_the_new_one(two_heads, step, exchange, monkeypatch):
    from backattn import head_files

    if not exchange:
        monkeypatch.setattr(head_files, "_exchange", lambda first, second: False)
    elif step == "set aside":
        pytest.skip("an exchange has no set-aside step")
    model, files, target = two_heads

    def save():
        kill_at(step)
        model.save_head(target, head_name="sentiment")

    assert os.WTERMSIG(in_child(save)) == signal.SIGKILL
    model.load_head(target, head_name="after-kill")  # readable: never a half-written head
    model.delete_head("after-kill")
    state = head_files_of(target) if target.is_dir() else head_files_of(head_files.resolve_head_directory(target))
    assert state == files["sentiment" if step == "swapped" else "math"]
    # The next save clears what the killed one left and keeps the user's file.
    model.save_head(target, head_name="sentiment")
    assert head_files_of(target) == files["sentiment"] and (target / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in target.parent.iterdir()) == ["target"]


def test_saves_killed_at_random_moments_always_leave_a_whole_head(two_heads):
    model, files, target = two_heads
    random_state = random.Random(int(os.environ.get("BACKATTN_FAULT_SEED", "0")))  # repeat_fault_tests.py
    outcomes = {"math": 0, "sentiment": 0}
    for kill in range(24):
        pid = os.fork()
        if pid == 0:
            try:
                for index in itertools.count():
                    model.save_head(target, head_name=("math", "sentiment")[index % 2])
            finally:
                os._exit(0)
        time.sleep(random_state.uniform(0.0, 0.3))  # a save takes a few ms: many finish first
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        from backattn.head_files import read_head, resolve_head_directory

        record, _ = read_head(resolve_head_directory(target))  # checks the weights against the config
        state = head_files_of(resolve_head_directory(target))
        assert state in (files["math"], files["sentiment"]), f"kill {kill}"
        outcomes[record["head_name"]] += 1
    print(f"24 random kills during repeated saves: every head whole ({outcomes})")
    assert (target / "notes.txt").read_text() == "mine"


def test_concurrent_writers_are_serialised_and_readers_never_see_a_broken_head(two_heads):
    from backattn.head_files import read_head

    model, files, target = two_heads

    def writer(name):
        return lambda: [model.save_head(target, head_name=name) for _ in range(16)]

    children = []
    for name in ("math", "sentiment"):
        pid = os.fork()
        if pid == 0:
            try:
                writer(name)()
            finally:
                os._exit(0)
        children.append(pid)
    reads, running = 0, set(children)
    while running:
        record, _ = read_head(target)  # raises on a mismatched or partial pair
        assert record["head_name"] in ("math", "sentiment")
        reads += 1
        running -= {pid for pid in running if os.waitpid(pid, os.WNOHANG)[0] == pid}
    assert head_files_of(target) in (files["math"], files["sentiment"]) and reads > 0


def test_a_readme_that_is_not_ours_is_never_replaced(two_heads):
    model, files, target = two_heads
    model.save_head(target, head_name="sentiment")  # our own card is replaced silently
    assert head_files_of(target) == files["sentiment"]
    (target / MODEL_CARD_NAME).write_text("# my own notes\n")
    with pytest.raises(HeadFileError, match="was not written by backattn"):
        model.save_head(target, head_name="math")
    assert (target / MODEL_CARD_NAME).read_text() == "# my own notes\n"
    assert head_files_of(target)[HEAD_WEIGHTS_NAME] == files["sentiment"][HEAD_WEIGHTS_NAME]
    model.save_head(target, head_name="math", model_card=False)  # keep the user's card
    assert (target / MODEL_CARD_NAME).read_text() == "# my own notes\n"
    assert head_files_of(target)[HEAD_WEIGHTS_NAME] == files["math"][HEAD_WEIGHTS_NAME]
    model.save_head(target, head_name="math", overwrite_model_card=True)
    assert head_files_of(target) == files["math"]


def test_a_full_disk_keeps_the_old_head(two_heads, monkeypatch):
    from backattn import head_files

    model, files, target = two_heads
    real = head_files._write_file

    def fill_up(path, data):
        if path.name == HEAD_CONFIG_NAME:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(head_files, "_write_file", fill_up)
    with pytest.raises(HeadFileError, match="No space left on device.*holds what it held before"):
        model.save_head(target, head_name="sentiment")
    assert head_files_of(target) == files["math"] and sorted(p.name for p in target.parent.iterdir()) == ["target"]


def test_unreadable_head_files_are_refused_clearly(two_heads, tmp_path):
    model, _, target = two_heads
    record = json.loads((target / HEAD_CONFIG_NAME).read_text())
    future = copy_head(target.parent, "target", tmp_path, "future")
    (future / HEAD_CONFIG_NAME).write_text(json.dumps({**record, "format_version": 999}))
    with pytest.raises(HeadFileError, match="format_version 999, newer than this backattn reads"):
        model.load_head(future, head_name="future")
    integers = copy_head(target.parent, "target", tmp_path, "integers")
    tensors = {k: (v * 100).to(torch.int64) for k, v in load_file(str(target / HEAD_WEIGHTS_NAME)).items()}
    save_file(tensors, str(integers / HEAD_WEIGHTS_NAME))
    (integers / HEAD_CONFIG_NAME).write_text(json.dumps({**record, "weights_sha256": None}))
    with pytest.raises(HeadFileError, match="has dtype torch.int64; a head's weights are floating point"):
        model.load_head(integers, head_name="integers")
    with pytest.raises(HeadFileError, match=r"No head directory .*its parent .* exists"):
        model.load_head(target.parent / "tagret", head_name="typo")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(HeadFileError, match="it is a file, not a directory"):
        model.save_head(tmp_path / "a-file", head_name="math")
    assert model.list_heads() == ["math", "sentiment"]


def test_pushing_to_a_new_revision_creates_its_branch(hub, base_dir, tmp_path):
    model = GPT2BackwardAttentionForCausalLM.from_pretrained(base_dir, head_config="seed", head_name="math").eval()
    with hub.as_default_endpoint():
        model.push_head_to_hub(REPO, token="fake-token")
        main_weights = hub.repos[REPO][HEAD_WEIGHTS_NAME]
        randomise(model.heads, seed=9)
        model.push_head_to_hub(REPO, token="fake-token", revision="retrained")
        model.push_head_to_hub(REPO, token="fake-token", revision="retrained")  # the branch exists now: fine
        assert hub.head(REPO, "retrained") != hub.head(REPO, "main")
        assert hub.repos[REPO][HEAD_WEIGHTS_NAME] == main_weights  # main is unchanged
        other = GPT2BackwardAttentionForCausalLM.from_pretrained(base_dir)
        other.load_head(REPO, revision="retrained", cache_dir=tmp_path / "cache")
    assert torch.equal(logits(other), logits(model))
