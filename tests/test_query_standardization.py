"""standardize_query_state's statistics (backattn/query_standardization.py) against a plain base forward."""

import pytest
import torch
from transformers import GPT2LMHeadModel

from backattn import BackwardAttentionConfig, GPT2BackwardAttentionForCausalLM
from backattn.data.feature_cache import CachedFeaturesDataset, FeatureCache
from backattn.data.sft_data import SFTCollator
from backattn.errors import BackattnValueError
from backattn.query_standardization import fit_query_standardization, needs_standardization

STANDARDIZED = {"use_hidden_state": True, "standardize_query_state": True, "score_mode": "gate",
                "divide_by_vocab": False}  # fmt: skip


@pytest.fixture(scope="module")
def rows(tiny_gpt2_math_rows):
    return tiny_gpt2_math_rows


def reference_statistics(base_dir, examples, num_rows):
    """Mean and biased variance, in float64, of the plain base's final hidden states at every position whose next
    token is labelled, over the first ``num_rows`` rows, each run alone (no padding)."""
    base = GPT2LMHeadModel.from_pretrained(base_dir).eval()
    states = []
    with torch.no_grad():
        for ids, labels in zip(examples["input_ids"][:num_rows], examples["labels"][:num_rows]):
            hidden = base(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
            states += [hidden[t] for t in range(len(ids) - 1) if labels[t + 1] != -100]
    states = torch.stack(states).double()
    return states.mean(0), states.var(0, unbiased=False)


def test_statistics_are_the_labelled_positions_mean_and_variance(tiny_gpt2_dir, rows, tmp_path):
    tokenizer, examples = rows
    model = GPT2BackwardAttentionForCausalLM.from_pretrained(tiny_gpt2_dir, head_config=STANDARDIZED).eval()
    head = model.heads["default"]
    assert needs_standardization(model) == ["default"]
    assert torch.equal(head.query_mean, torch.zeros(16)) and torch.equal(head.query_variance, torch.ones(16))
    assert fit_query_standardization(model, examples, SFTCollator(tokenizer), num_rows=5, batch_size=2) == ["default"]
    mean, variance = reference_statistics(tiny_gpt2_dir, examples, 5)
    assert torch.allclose(head.query_mean.double(), mean, atol=1e-5)
    assert torch.allclose(head.query_variance.double(), variance, rtol=1e-4, atol=1e-6)
    assert needs_standardization(model) == []
    assert fit_query_standardization(model, examples, SFTCollator(tokenizer)) == []  # nothing left to fit

    # from cached features (what head-only training reads) the same statistics
    cached = GPT2BackwardAttentionForCausalLM.from_pretrained(tiny_gpt2_dir, head_config=STANDARDIZED).eval()
    cache = FeatureCache.build_or_load(cached, examples["input_ids"], tmp_path, dtype="float32", progress=False)
    fit_query_standardization(cached, CachedFeaturesDataset(examples, cache), SFTCollator(tokenizer), 5, 3)
    assert torch.allclose(cached.heads["default"].query_mean, head.query_mean, atol=1e-5)
    assert torch.allclose(cached.heads["default"].query_variance, head.query_variance, rtol=1e-4)


def test_the_statistics_travel_with_the_head_and_change_its_logits(tiny_gpt2_dir, rows, tmp_path):
    tokenizer, examples = rows
    model = GPT2BackwardAttentionForCausalLM.from_pretrained(tiny_gpt2_dir, head_config=STANDARDIZED).eval()
    with torch.no_grad():
        for parameter in model.heads.parameters():
            parameter.normal_()
    ids = torch.tensor([examples["input_ids"][0]])
    with torch.no_grad():
        identity = model(ids).logits
        fit_query_standardization(model, examples, SFTCollator(tokenizer), num_rows=4)
        fitted = model(ids).logits
    assert not torch.allclose(identity, fitted)  # the statistics are used
    model.save_head(tmp_path / "head")
    loaded = GPT2BackwardAttentionForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    loaded.load_head(tmp_path / "head")
    for name in ("query_mean", "query_variance"):
        assert torch.equal(getattr(loaded.heads["default"], name), getattr(model.heads["default"], name))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, fitted)


def test_bad_options_and_statistics_are_refused(tiny_gpt2_dir):
    with pytest.raises(BackattnValueError, match="standardize_query_state standardises the query state r_t"):
        BackwardAttentionConfig(standardize_query_state=True)
    model = GPT2BackwardAttentionForCausalLM.from_pretrained(tiny_gpt2_dir, head_config=STANDARDIZED)
    head = model.heads["default"]
    with pytest.raises(BackattnValueError, match="at least 2 finite states, got 3 .1 non-finite"):
        head.set_query_standardization(torch.tensor([[0.0] * 16, [1.0] * 16, [float("nan")] + [0.0] * 15]))
    assert torch.equal(head.query_mean, torch.zeros(16))  # nothing was half set
    plain = GPT2BackwardAttentionForCausalLM.from_pretrained(tiny_gpt2_dir, head_config="hidden")
    with pytest.raises(BackattnValueError, match="does not standardise its query state"):
        plain.heads["default"].set_query_standardization(torch.randn(4, 16))
