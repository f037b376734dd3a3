import pytest
import torch

from backattn import GPT2BackwardAttentionForCausalLM
from backattn.data import feature_cache
from backattn.data.feature_cache import CachedFeaturesDataset, FeatureCache

IDS = [[464, 3290, 318, 257], [15496, 995], [40, 588, 6097, 13, 632, 318]]


@pytest.fixture
def model(tiny_gpt2_dir):
    return GPT2BackwardAttentionForCausalLM.from_pretrained(tiny_gpt2_dir, head_config="hidden").eval()


def test_cached_states_are_the_base_final_hidden_states(model, tmp_path):
    cache = FeatureCache.build_or_load(model, IDS, tmp_path, dtype="float32", batch_size=2)
    assert len(cache) == 3
    with torch.no_grad():
        for index, ids in enumerate(IDS):
            expected = model.base_model(torch.tensor([ids])).last_hidden_state[0]
            assert cache[index].shape == expected.shape
            assert torch.allclose(cache[index], expected, atol=1e-5)
    half = FeatureCache.build_or_load(model, IDS, tmp_path, dtype="float16")
    assert half.directory != cache.directory and half[0].dtype == torch.float16
    assert torch.allclose(half[0].float(), cache[0], atol=1e-2, rtol=1e-2)


def test_built_once_then_read_from_disk(model, tmp_path, monkeypatch):
    calls = []
    compute = feature_cache._compute
    monkeypatch.setattr(feature_cache, "_compute", lambda *a: calls.append(1) or compute(*a))
    first = FeatureCache.build_or_load(model, IDS, tmp_path)
    second = FeatureCache.build_or_load(model, IDS, tmp_path)
    assert len(calls) == 1 and first.directory == second.directory
    assert isinstance(second.features, __import__("numpy").memmap)


def test_a_stale_cache_is_never_used(model, tmp_path, tiny_gpt2_dir):
    original = FeatureCache.build_or_load(model, IDS, tmp_path).directory
    assert FeatureCache.build_or_load(model, IDS[:2], tmp_path).directory != original  # other data
    assert FeatureCache.build_or_load(model, [IDS[0], IDS[1], IDS[2] + [13]], tmp_path).directory != original
    other_base = GPT2BackwardAttentionForCausalLM.from_pretrained(tiny_gpt2_dir, head_config="seed").eval()
    assert FeatureCache.build_or_load(other_base, IDS, tmp_path).directory == original  # heads are not the base
    with torch.no_grad():
        other_base.transformer.h[0].mlp.c_fc.weight[0, 0] += 1.0  # another base
    assert FeatureCache.build_or_load(other_base, IDS, tmp_path).directory != original


def test_an_interrupted_build_leaves_nothing_that_looks_finished(model, tmp_path, monkeypatch):
    def fail(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(feature_cache, "_compute", fail)
    with pytest.raises(KeyboardInterrupt):
        FeatureCache.build_or_load(model, IDS, tmp_path)
    assert [p for p in (tmp_path / "features").iterdir() if not p.name.endswith(".lock")] == []


def test_dataset_pairs_examples_with_their_states(model, tmp_path):
    cache = FeatureCache.build_or_load(model, IDS, tmp_path)
    examples = [{"input_ids": ids, "labels": ids} for ids in IDS]
    dataset = CachedFeaturesDataset(examples, cache)
    assert dataset[2]["base_hidden_states"].shape == (6, model.config.hidden_size)
    with pytest.raises(ValueError, match="holds 3 examples, the data set 2"):
        CachedFeaturesDataset(examples[:2], cache)


def test_forward_from_cached_states_equals_forward_from_ids(model, tmp_path):
    cache = FeatureCache.build_or_load(model, IDS, tmp_path, dtype="float32")
    with torch.no_grad():
        torch.nn.init.normal_(model.heads["default"].gate, 0.0, 1.0)
        ids = torch.tensor([IDS[2]])
        direct = model(ids, labels=ids)
        cached = model(ids, labels=ids, base_hidden_states=cache[2][None])
    assert torch.allclose(cached.logits, direct.logits, atol=1e-5)
    assert torch.allclose(cached.loss, direct.loss, atol=1e-6)
