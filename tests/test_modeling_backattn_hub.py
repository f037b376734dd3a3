"""Heads shared through the Hub: push_head_to_hub and load_head by repo id, online and from the cache.

The Hub's servers cannot be reached from here: the `hub` fixture serves tests/fake_hub.py on 127.0.0.1 in
their place. The client side is the real huggingface_hub; backattn calls only its public API.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import save_file

from backattn import GPT2BackwardAttentionForCausalLM
from backattn.head_files import HEAD_CONFIG_NAME, HEAD_WEIGHTS_NAME, MODEL_CARD_NAME
from test_modeling_backattn import VOCAB, randomise

REPO = "fake-user/math-head"


@pytest.fixture(scope="module")
def base_dir(gpt2_base_dir):
    return gpt2_base_dir


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
    with hub.as_default_endpoint(), pytest.raises(FileNotFoundError, match="outgoing traffic has been disabled"):
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
