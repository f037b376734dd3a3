import pytest
import torch

from backattn import GPT2BackwardAttentionForCausalLM
from backattn.data import feature_cache
from backattn.data.feature_cache import CachedFeaturesDataset, FeatureCache
from backattn.data.sft_data import SFTCollator

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


# --------------------------------------------------------------------------------------------------------
# heads that read decoder blocks (query_layers) and earlier positions (copy_attention)

READING = {
    "query_layers": [1, 0], "use_hidden_state": True, "copy_attention": True, "score_maps": "differential",
    "score_mode": "gate", "divide_by_vocab": False, "standardize_query_state": True,
}  # fmt: skip


@pytest.fixture
def reading_model(gpt2_base_dir):
    model = GPT2BackwardAttentionForCausalLM.from_pretrained(gpt2_base_dir, head_config=READING).eval()
    with torch.no_grad():
        for parameter in model.heads.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.5)
        model.heads.default.query_mean.normal_()
        model.heads.default.query_variance.uniform_(0.2, 3.0)
    return model


SMALL_IDS = [[5, 17, 3, 5, 17, 9, 3], [40, 2, 40], [8, 8, 1, 60, 8, 1]]


def test_the_cache_stores_the_blocks_the_heads_read_and_its_key_names_them(reading_model, tmp_path):
    assert reading_model.feature_layers() == [0, 1]
    cache = FeatureCache.build_or_load(reading_model, SMALL_IDS, tmp_path, dtype="float32", batch_size=2)
    assert cache.layers == [0, 1] and cache.meta["layers"] == [0, 1]
    blocks = reading_model.transformer.h
    with torch.no_grad():
        for index, ids in enumerate(SMALL_IDS):
            outputs = reading_model.transformer(torch.tensor([ids]), output_hidden_states=True).hidden_states
            states = cache.layer_states(index)
            assert set(states) == {0, 1}
            assert torch.allclose(states[0], outputs[1][0], atol=1e-5)  # block 0's output
            assert torch.allclose(reading_model.transformer.ln_f(states[1]), outputs[2][0], atol=1e-5)  # before ln_f
            assert len(blocks) == 2
    plain = FeatureCache.build_or_load(reading_model, SMALL_IDS, tmp_path, dtype="float32", layers=[])
    assert plain.directory != cache.directory and plain.layers == [] and plain.layer_states(0) == {}
    other = FeatureCache.build_or_load(reading_model, SMALL_IDS, tmp_path, dtype="float32", layers=[1])
    assert other.directory not in (cache.directory, plain.directory)
    seed_head = GPT2BackwardAttentionForCausalLM.from_pretrained(reading_model.name_or_path, head_config="seed")
    assert FeatureCache.build_or_load(seed_head.eval(), SMALL_IDS, tmp_path, "float32").directory == plain.directory


def test_scoring_and_training_from_cached_features_equal_the_full_forward(reading_model, tmp_path, gpt2_tokenizer):
    """Collated, padded batches from the cache give the logits, the loss and the gradients of running the base."""
    cache = FeatureCache.build_or_load(reading_model, SMALL_IDS, tmp_path, dtype="float32")
    examples = [{"input_ids": ids, "labels": ids} for ids in SMALL_IDS]
    dataset = CachedFeaturesDataset(examples, cache)
    assert set(dataset[1]["base_layer_states"]) == {0, 1} and dataset[1]["base_layer_states"][1].shape == (3, 24)
    tokenizer = gpt2_tokenizer
    tokenizer.pad_token = tokenizer.eos_token
    batch = SFTCollator(tokenizer)([dataset[i] for i in range(3)])
    assert batch["base_layer_states"][0].shape == batch["base_hidden_states"].shape == (3, 7, 24)
    ids, mask = batch["input_ids"] % 97, batch["attention_mask"]  # the pad id, within this tiny vocabulary
    features = {"base_hidden_states": batch["base_hidden_states"], "base_layer_states": batch["base_layer_states"]}
    with torch.no_grad():
        direct = reading_model(ids, attention_mask=mask, labels=batch["labels"])
        cached = reading_model(ids, attention_mask=mask, labels=batch["labels"], **features)
    real = mask.bool()
    assert torch.allclose(cached.logits[real], direct.logits[real], atol=1e-5)  # the cache ran other batches
    assert torch.allclose(cached.loss, direct.loss, atol=1e-6)
    blocks, handles = {}, []  # the same batch's features, taken by hooks of the test's own: exactly equal
    for k, block in enumerate(reading_model.transformer.h):
        handles.append(block.register_forward_hook(lambda m, i, o, k=k: blocks.__setitem__(k, o)))
    with torch.no_grad():
        final = reading_model.transformer(ids, attention_mask=mask).last_hidden_state
        for handle in handles:
            handle.remove()
        exact = reading_model(ids, attention_mask=mask, labels=batch["labels"], base_hidden_states=final,
                              base_layer_states=blocks)  # fmt: skip
    assert torch.equal(exact.logits, direct.logits) and torch.equal(exact.loss, direct.loss)
    reading_model.train()  # the chunked training loss, from the cache and from the base
    results = []
    for extra in ({}, features):
        reading_model.zero_grad()
        loss = reading_model(ids, attention_mask=mask, labels=batch["labels"], **extra).loss
        loss.backward()
        results.append([loss.detach()] + [p.grad.clone() for p in reading_model.heads.parameters()])
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
