"""Seed 002's attention re-balancing (backattn/attention_rebalancing.py) on small random bases and the real SmolLM2.

The boosted weights are checked against a reference written here from the formula (queries and keys projected
and rotated by hand, softmax, the layer-0 mask, the boost), never calling the code under test. ``alpha = 0`` is
checked to equal the base's eager attention exactly, and the default SDPA base within 1e-5 (float32, tiny
random bases) or 1e-4 (SmolLM2, whose logits span about -8..33).
"""

import math
import threading

import pytest
import torch
from conftest import VOCAB, randomise, tiny_gpt2_config, tiny_llama_config
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from backattn import GPT2BackwardAttentionForCausalLM, LlamaBackwardAttentionConfig, LlamaBackwardAttentionForCausalLM
from backattn.attention_rebalancing import (
    ATTENTION_REBALANCING,
    active_rebalancing,
    disable_attention_rebalancing,
    enable_attention_rebalancing,
)
from backattn.data.feature_cache import FeatureCache
from backattn.errors import BackattnTypeError, BackattnValueError

#: The families the project carries, each as (stock class, backattn class, tiny config). GPT-2 in Transformers 5
#: computes attention through the attention interface (GPT2Attention calls ALL_ATTENTION_FUNCTIONS), so it is here.
FAMILIES = {
    "llama": (
        LlamaForCausalLM,
        LlamaBackwardAttentionForCausalLM,
        lambda **o: tiny_llama_config(num_hidden_layers=3, **o),
    ),
    "gpt2": (GPT2LMHeadModel, GPT2BackwardAttentionForCausalLM, lambda **o: tiny_gpt2_config(n_layer=3, **o)),
}
SDPA_TOLERANCE = 1e-5


def tiny_pair(family, seed=0, **config):
    """A stock model (eager) and the backattn family with the same random weights."""
    stock_class, family_class, make_config = FAMILIES[family]
    torch.manual_seed(seed)
    stock = stock_class(make_config(**config)).eval()
    ours = family_class(make_config(**config)).eval()
    missing, unexpected = ours.load_state_dict(stock.state_dict(), strict=False)
    assert not unexpected and all(name.startswith("heads.") for name in missing)
    stock.set_attn_implementation("eager")
    return stock, ours


def ids_batch(rows=2, length=9, seed=3):
    return torch.randint(1, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, ids, **kwargs):
    return model(ids, **kwargs).logits


# ----------------------------------------------------------------------------------------------------------
# alpha = 0 is the base


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_alpha_zero_is_the_eager_base_exactly_and_the_sdpa_base_within_tolerance(family):
    eager, ours = tiny_pair(family)
    ids = ids_batch()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    enable_attention_rebalancing(ours, alpha=0.0)
    assert ours.config._attn_implementation == ATTENTION_REBALANCING
    assert torch.equal(logits(ours, ids, attention_mask=mask), logits(eager, ids, attention_mask=mask))
    eager.set_attn_implementation("sdpa")  # Transformers' default
    difference = (logits(ours, ids) - logits(eager, ids)).abs().max().item()
    assert difference <= SDPA_TOLERANCE


def test_alpha_zero_on_gpt2s_reordered_and_upcast_eager_path():
    eager, ours = tiny_pair("gpt2", reorder_and_upcast_attn=True)
    enable_attention_rebalancing(ours, alpha=0.0)
    ids = ids_batch()
    assert torch.equal(logits(ours, ids), logits(eager, ids))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_positive_alpha_changes_the_base(family):
    eager, ours = tiny_pair(family)
    enable_attention_rebalancing(ours, alpha=0.5)
    ids = ids_batch()
    boosted = logits(ours, ids)
    assert torch.isfinite(boosted).all()
    assert (boosted - logits(eager, ids)).abs().max() > 1e-4


# ----------------------------------------------------------------------------------------------------------
# the boosted weights against a hand reference


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def reference_llama_attention(attention, hidden, cos, sin, past=None):
    """One Llama attention layer by hand: post-softmax weights (batch x heads x Q x K) and values (same heads)."""
    config = attention.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    width = config.hidden_size // heads
    batch, length, _ = hidden.shape

    def project(linear, count):
        return (hidden @ linear.weight.T).view(batch, length, count, width).transpose(1, 2)

    q, k, v = project(attention.q_proj, heads), project(attention.k_proj, kv_heads), project(attention.v_proj, kv_heads)
    q = q * cos[:, None] + rotate_half(q) * sin[:, None]
    k = k * cos[:, None] + rotate_half(k) * sin[:, None]
    if past is not None:  # the keys and values of earlier positions (a decode step)
        k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
    kv = (k, v)
    group = heads // kv_heads
    k = torch.stack([k[:, h // group] for h in range(heads)], dim=1)
    v = torch.stack([v[:, h // group] for h in range(heads)], dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(width)
    keys = k.shape[2]
    for i in range(length):  # causal: query i (key position keys - length + i) sees keys up to its own
        scores[:, :, i, keys - length + i + 1 :] = -math.inf
    return torch.softmax(scores, dim=-1), v, kv


def capture_attention(model):
    """Forward hooks keeping each Llama attention layer's input (hidden states, rotary cos/sin) and its output
    (attention output before o_proj is not exposed, so the output after it, and the weights)."""
    records, handles = {}, []
    for index, layer in enumerate(model.model.layers):

        def before(module, args, kwargs, index=index):
            hidden = args[0] if args else kwargs["hidden_states"]
            records.setdefault(index, {})["input"] = (hidden, *kwargs["position_embeddings"])

        def after(module, args, kwargs, output, index=index):
            records[index]["output"], records[index]["weights"] = output

        handles.append(layer.self_attn.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(layer.self_attn.register_forward_hook(after, with_kwargs=True))
    return records, handles


def peaked_llama(layers=4, seed=5):
    """A tiny float64 Llama (4 query heads on 2 key/value heads) whose attention is far from uniform, so that a
    threshold keeps some positions of layer 0 and drops others."""
    torch.manual_seed(seed)
    config = tiny_llama_config(num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).double().eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                linear.weight.normal_(0, 0.6)
    return model


def test_boosted_weights_equal_the_hand_reference():
    alpha, threshold = 0.5, 0.15
    model = peaked_llama()
    depth = model.config.num_hidden_layers
    enable_attention_rebalancing(model, alpha=alpha, threshold=threshold)
    ids = ids_batch(rows=2, length=8)
    records, handles = capture_attention(model)
    with torch.no_grad():
        model(ids)
        for handle in handles:
            handle.remove()
        eye = torch.eye(ids.shape[1], dtype=torch.bool)
        mask = None
        for layer in range(depth):
            hidden, cos, sin = records[layer]["input"]
            attention = model.model.layers[layer].self_attn
            weights, values, _ = reference_llama_attention(attention, hidden, cos, sin)
            if layer == 0:
                mask = (weights > threshold) & ~eye
                off_diagonal = mask[..., ~eye]
                assert 0 < off_diagonal.double().mean() < 0.9  # the threshold keeps some positions, drops others
            else:
                factor = 1 + alpha * (1 - layer / (depth - 1))
                boosted = weights.clone()
                boosted[mask] *= factor
                weights = boosted
            # Llama's eager softmax runs in float32 even on float64 inputs: hence 1e-6, not 1e-12
            torch.testing.assert_close(records[layer]["weights"], weights, rtol=0, atol=1e-6)
            output = attention.o_proj((weights @ values).transpose(1, 2).reshape(*hidden.shape[:2], -1))
            torch.testing.assert_close(records[layer]["output"], output, rtol=0, atol=1e-6)
        assert depth == 4 and not torch.equal(records[1]["weights"], reference_llama_attention(
            model.model.layers[1].self_attn, *records[1]["input"])[0])  # fmt: skip
        attentions = model(ids, output_attentions=True).attentions  # what a user sees: the boosted weights
        assert all(torch.equal(attentions[layer], records[layer]["weights"]) for layer in range(depth))


def test_a_cached_decode_step_drops_the_newest_column_and_matches_the_full_forward():
    alpha, threshold = 0.5, 0.15
    model = peaked_llama()
    enable_attention_rebalancing(model, alpha=alpha, threshold=threshold)
    ids = ids_batch(rows=2, length=8)
    with torch.no_grad():
        full_records, handles = capture_attention(model)
        full = model(ids).logits
        for handle in handles:
            handle.remove()
        prefill = model(ids[:, :-1], use_cache=True)
        step_records, handles = capture_attention(model)
        step = model(ids[:, -1:], past_key_values=prefill.past_key_values, use_cache=True).logits
        for handle in handles:
            handle.remove()
    # Transformers' eager attention takes its softmax in float32 even in a float64 model, and a 1-row softmax can
    # round differently from an 8-row one (2e-8 apart for the stock eager model on some CPUs): far below a change
    torch.testing.assert_close(step[:, -1], full[:, -1], rtol=0, atol=1e-6)
    for layer in range(model.config.num_hidden_layers):
        assert step_records[layer]["weights"].shape[-2:] == (1, 8)
        step_row, full_row = step_records[layer]["weights"][..., 0, :], full_records[layer]["weights"][..., -1, :]
        torch.testing.assert_close(step_row, full_row, rtol=0, atol=1e-6)  # the same float32 softmax
    # By hand: the step's layer-0 mask leaves out the newest column (the query's own key), so layer 1 keeps
    # its own weight there unboosted while boosting other kept positions.
    hidden0, cos0, sin0 = step_records[0]["input"]
    hidden1, cos1, sin1 = step_records[1]["input"]
    cache = prefill.past_key_values
    past0 = (cache.layers[0].keys[:, :, :-1], cache.layers[0].values[:, :, :-1])
    past1 = (cache.layers[1].keys[:, :, :-1], cache.layers[1].values[:, :, :-1])
    with torch.no_grad():
        a0 = reference_llama_attention(model.model.layers[0].self_attn, hidden0, cos0, sin0, past0)[0]
        a1 = reference_llama_attention(model.model.layers[1].self_attn, hidden1, cos1, sin1, past1)[0]
    mask = a0 > threshold
    mask[..., -1] = False
    expected = torch.where(mask, a1 * (1 + alpha * (1 - 1 / 3)), a1)
    assert (a0[..., -1] > threshold).any() and mask.any()  # so dropping the newest column matters here
    torch.testing.assert_close(step_records[1]["weights"], expected, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# generation, heads and the feature cache


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generation_with_and_without_the_kv_cache_agree(family):
    _, model = tiny_pair(family, seed=1)
    enable_attention_rebalancing(model, alpha=0.5, threshold=0.05)
    ids = ids_batch(rows=2, length=6, seed=7)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    options = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None,
                   output_logits=True, return_dict_in_generate=True)  # fmt: skip
    uncached = model.generate(ids, use_cache=False, **options)
    # a dynamic cache (keys = past + new), and a static one (keys = every slot, the later ones masked)
    for cache in ({}, {"cache_implementation": "static"}):
        cached = model.generate(ids, use_cache=True, **cache, **options)
        assert torch.equal(cached.sequences, uncached.sequences)
        torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits), rtol=0, atol=1e-5)


def test_a_head_sees_the_rebalanced_base_and_its_feature_cache_is_keyed_by_the_options(tmp_path):
    torch.manual_seed(0)
    model = LlamaBackwardAttentionForCausalLM(tiny_llama_config(num_hidden_layers=3), head_config="hidden").eval()
    randomise(model.heads)
    ids = ids_batch(rows=2, length=7)
    with torch.no_grad():
        plain_hidden = model.base_model(ids).last_hidden_state
        enable_attention_rebalancing(model, alpha=0.5, threshold=0.05)
        hidden = model.base_model(ids).last_hidden_state
        assert (hidden - plain_hidden).abs().max() > 1e-4
        served = model(ids).logits
        assert torch.equal(served, model(ids, base_hidden_states=hidden).logits)
        assert not torch.allclose(served, model(ids, base_hidden_states=plain_hidden).logits)

    examples = ids.tolist()
    rebalanced = FeatureCache.build_or_load(model, examples, tmp_path, dtype="float32", progress=False)
    assert rebalanced.meta["attention_rebalancing"] == {"alpha": 0.5, "threshold": 0.05}
    torch.testing.assert_close(rebalanced[0], hidden[0], rtol=0, atol=1e-6)
    enable_attention_rebalancing(model, alpha=0.2, threshold=0.05)
    other_alpha = FeatureCache.build_or_load(model, examples, tmp_path, dtype="float32", progress=False)
    disable_attention_rebalancing(model)
    plain = FeatureCache.build_or_load(model, examples, tmp_path, dtype="float32", progress=False)
    assert len({rebalanced.directory, other_alpha.directory, plain.directory}) == 3
    assert "attention_rebalancing" not in plain.meta
    torch.testing.assert_close(plain[0], plain_hidden[0], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# saving and loading


def test_the_options_round_trip_through_save_pretrained(tmp_path):
    _, model = tiny_pair("llama", seed=2)
    enable_attention_rebalancing(model, alpha=0.3, threshold=0.02)
    ids = ids_batch()
    expected = logits(model, ids)
    model.save_pretrained(tmp_path / "ours")
    loaded = LlamaBackwardAttentionForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert loaded.config.attention_rebalancing == {"alpha": 0.3, "threshold": 0.02}
    assert loaded.config._attn_implementation == ATTENTION_REBALANCING
    assert torch.equal(logits(loaded, ids), expected)
    with pytest.raises(BackattnValueError, match="cannot honour"):
        LlamaBackwardAttentionForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="sdpa")

    # A stock Transformers class keeps the options in its config.json; it re-balances when asked to.
    stock, _ = tiny_pair("llama", seed=2)
    enable_attention_rebalancing(stock, alpha=0.3, threshold=0.02)
    assert torch.equal(logits(stock, ids), expected)
    stock.save_pretrained(tmp_path / "stock")
    again = LlamaForCausalLM.from_pretrained(tmp_path / "stock", attn_implementation=ATTENTION_REBALANCING).eval()
    assert torch.equal(logits(again, ids), expected)
    unaware = LlamaForCausalLM.from_pretrained(tmp_path / "stock")  # sdpa: it would give plain features
    with pytest.raises(BackattnValueError, match="does not re-balance"):
        active_rebalancing(unaware)

    disable_attention_rebalancing(loaded)
    assert loaded.config.attention_rebalancing is None and loaded.config._attn_implementation == "sdpa"
    loaded.save_pretrained(tmp_path / "off")
    assert LlamaBackwardAttentionForCausalLM.from_pretrained(tmp_path / "off").config._attn_implementation == "sdpa"


# ----------------------------------------------------------------------------------------------------------
# bad options and what is not supported


@pytest.mark.parametrize(
    "options, error, words",
    [
        ({"alpha": -0.1}, BackattnValueError, "alpha must be >= 0"),
        ({"alpha": math.nan}, BackattnValueError, "alpha must be finite"),
        ({"alpha": "0.2"}, BackattnTypeError, "alpha must be a number"),
        ({"threshold": 0.0}, BackattnValueError, "strictly between 0 and 1"),
        ({"threshold": 1.0}, BackattnValueError, "strictly between 0 and 1"),
        ({"threshold": -0.01}, BackattnValueError, "strictly between 0 and 1"),
        ({"threshold": math.inf}, BackattnValueError, "threshold must be finite"),
    ],
)
def test_bad_options_are_refused(options, error, words):
    _, model = tiny_pair("llama")
    with pytest.raises(error, match=words):
        enable_attention_rebalancing(model, **options)
    assert model.config.attention_rebalancing is None and model.config._attn_implementation != ATTENTION_REBALANCING
    with pytest.raises(error, match=words):
        LlamaBackwardAttentionConfig(vocab_size=VOCAB, attention_rebalancing={"alpha": 0.2, **options})


def test_bad_config_values_and_unsupported_implementations_are_refused(llama_base_dir):
    with pytest.raises(BackattnValueError, match="unknown option.*'beta'"):
        LlamaBackwardAttentionConfig(vocab_size=VOCAB, attention_rebalancing={"alpha": 0.2, "beta": 1})
    with pytest.raises(BackattnTypeError, match="must be a dict"):
        LlamaBackwardAttentionConfig(vocab_size=VOCAB, attention_rebalancing=0.2)
    _, model = tiny_pair("llama")
    enable_attention_rebalancing(model, alpha=0.2)
    for implementation in ("sdpa", "eager"):
        with pytest.raises(BackattnValueError, match=f"{implementation!r} cannot honour"):
            model.set_attn_implementation(implementation)
    assert model.config._attn_implementation == ATTENTION_REBALANCING
    stock = LlamaForCausalLM(tiny_llama_config())
    with pytest.raises(BackattnValueError, match="needs config.attention_rebalancing"):
        LlamaBackwardAttentionForCausalLM.from_pretrained(llama_base_dir, attn_implementation=ATTENTION_REBALANCING)
    stock.config._attn_implementation = ATTENTION_REBALANCING  # forced past every check: the forward refuses
    with pytest.raises(BackattnValueError, match="needs the re-balancing options"):
        stock(ids_batch())


def test_sliding_window_and_cross_attention_are_refused():
    sliding = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, use_sliding_window=True, sliding_window=4, max_window_layers=0,
    ))  # fmt: skip
    with pytest.raises(BackattnValueError, match="sliding_attention layers"):
        enable_attention_rebalancing(sliding, alpha=0.2)
    assert getattr(sliding.config, "attention_rebalancing", None) is None
    cross = GPT2LMHeadModel(tiny_gpt2_config(add_cross_attention=True))
    with pytest.raises(BackattnValueError, match="cross-attention"):
        enable_attention_rebalancing(cross, alpha=0.2)


#: Other architectures whose attention goes through the interface (the bases the project's factory families wrap):
#: small configs, full attention in every layer.
SMALL = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2)
OTHER_ARCHITECTURES = {
    "qwen2": dict(num_key_value_heads=1),
    "gemma": dict(num_key_value_heads=1, head_dim=8),
    "gpt_neox": dict(),
    "olmo2": dict(num_key_value_heads=1),
}


def tiny_other(model_type, **overrides):
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **SMALL, **OTHER_ARCHITECTURES.get(model_type, {}), **overrides)
    return AutoModelForCausalLM.from_config(config).eval()


def check_rebalances(model, changed: float) -> None:
    """alpha = 0 is the eager attention exactly, alpha = 0.5 moves the logits by more than ``changed``, and greedy
    generation with the KV cache equals generation without it."""
    model.set_attn_implementation("eager")
    ids = ids_batch()
    eager = logits(model, ids)
    enable_attention_rebalancing(model, alpha=0.0)
    assert torch.equal(logits(model, ids), eager)
    enable_attention_rebalancing(model, alpha=0.5, threshold=0.05)
    assert (logits(model, ids) - eager).abs().max() > changed
    options = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None, output_logits=True,
                   return_dict_in_generate=True)  # fmt: skip
    cached, uncached = (model.generate(ids, use_cache=c, **options) for c in (True, False))
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits), rtol=0, atol=1e-5)


@pytest.mark.parametrize("model_type", sorted(OTHER_ARCHITECTURES))
def test_other_architectures_through_the_attention_interface(model_type):
    check_rebalances(tiny_other(model_type), changed=1e-4)


@pytest.mark.parametrize(
    "model_type, overrides, words",
    [
        ("mistral", dict(sliding_window=4), "sliding-window attention"),
        ("gemma3_text", dict(head_dim=8, num_key_value_heads=1, sliding_window=4), "sliding_attention layers"),
    ],
)
def test_windowed_architectures_are_refused(model_type, overrides, words):
    model = tiny_other(model_type, **overrides)
    with pytest.raises(BackattnValueError, match=words):
        enable_attention_rebalancing(model, alpha=0.2)


def test_a_factory_family_rebalances_and_keeps_its_options(tmp_path):
    from backattn import modeling_auto  # the families made for any architecture

    stock = tiny_other("qwen2")
    family = modeling_auto.backward_attention_class("qwen2")
    model = family(stock.config).eval()
    model.load_state_dict(stock.state_dict(), strict=False)
    enable_attention_rebalancing(stock, alpha=0.5, threshold=0.05)
    enable_attention_rebalancing(model, alpha=0.5, threshold=0.05)
    ids = ids_batch()
    assert torch.equal(logits(model, ids), logits(stock, ids))
    model.save_pretrained(tmp_path)
    loaded = family.from_pretrained(tmp_path).eval()
    assert loaded.config._attn_implementation == ATTENTION_REBALANCING
    assert torch.equal(logits(loaded, ids), logits(stock, ids))


def test_gradient_checkpointing_recomputation_is_refused_clearly():
    _, model = tiny_pair("llama")
    enable_attention_rebalancing(model, alpha=0.5)
    with torch.no_grad():
        model(ids_batch())  # a whole forward leaves nothing behind
        with pytest.raises(BackattnValueError, match="ran without layer 0"):
            layer = model.model.layers[1]
            hidden = torch.randn(1, 4, model.config.hidden_size)
            position = torch.arange(4)[None]
            layer(hidden, position_embeddings=model.model.rotary_emb(hidden, position), position_ids=position,
                  attention_mask=torch.zeros(1, 1, 4, 4))  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# concurrent models never read each other's layer-0 mask


def test_concurrent_and_nested_forwards_keep_their_own_masks():
    models = [tiny_pair("llama", seed=4)[1] for _ in range(2)]
    enable_attention_rebalancing(models[0], alpha=0.5, threshold=0.05)
    enable_attention_rebalancing(models[1], alpha=2.0, threshold=0.2)
    inputs = [ids_batch(rows=2, length=9, seed=8), ids_batch(rows=3, length=5, seed=9)]
    solo = [logits(m, x) for m, x in zip(models, inputs)]

    # Threads, each model many times at once, and model 0 in a third thread on model 1's inputs.
    jobs = [(models[0], inputs[0], solo[0]), (models[1], inputs[1], solo[1])]
    jobs.append((models[0], inputs[1], logits(models[0], inputs[1])))
    failures, barrier = [], threading.Barrier(len(jobs))

    def run(model, ids, expected):
        barrier.wait()
        for _ in range(20):
            if not torch.equal(logits(model, ids), expected):
                failures.append(ids.shape)

    threads = [threading.Thread(target=run, args=job) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []

    # Nested in one thread: model 1 runs whole between layer 0 and layer 1 of model 0, and then the same model
    # (one config object) runs nested inside itself, with other inputs.
    for inner_model, inner_ids in ((models[1], inputs[1]), (models[0], inputs[1])):
        seen = []

        def nested(*_, inner_model=inner_model, inner_ids=inner_ids, seen=seen):
            if not seen:  # once, and not again from inside the nested forward
                seen.append(None)
                seen[0] = logits(inner_model, inner_ids)

        hook = models[0].model.layers[1].register_forward_pre_hook(nested)
        try:
            assert torch.equal(logits(models[0], inputs[0]), solo[0])
        finally:
            hook.remove()
        assert torch.equal(seen[0], logits(inner_model, inner_ids))


# ----------------------------------------------------------------------------------------------------------
# the real SmolLM2


@pytest.mark.integration
def test_smollm2_alpha_zero_is_eager_exactly_and_a_boost_generates_the_same_with_and_without_cache(smollm2_dir):
    model = LlamaBackwardAttentionForCausalLM.from_pretrained(smollm2_dir).eval()
    ids = torch.tensor([[1, 17334, 30, 3060, 553, 216, 33, 32, 15101, 30, 1112, 614, 253, 1470, 47, 198, 21350, 42]])
    sdpa = logits(model, ids)
    model.set_attn_implementation("eager")
    eager = logits(model, ids)
    enable_attention_rebalancing(model, alpha=0.0)
    assert torch.equal(logits(model, ids), eager)
    assert (logits(model, ids) - sdpa).abs().max().item() <= 1e-4  # 4.6e-5 measured here
    enable_attention_rebalancing(model, alpha=0.2, threshold=0.01)
    boosted = logits(model, ids)
    assert torch.isfinite(boosted).all() and (boosted - eager).abs().max() > 1e-2
    options = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    cached, uncached = (model.generate(ids, use_cache=c, **options) for c in (True, False))
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits), rtol=0, atol=1e-3)


def test_the_cost_benchmark_runs_on_a_tiny_model(tmp_path, monkeypatch, capsys):
    import importlib.util
    import json
    import sys
    from pathlib import Path

    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(benchmarks))  # as when run as a script: `import measure`
    spec = importlib.util.spec_from_file_location("bench_rebalancing", benchmarks / "bench_rebalancing.py")
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_rebalancing", script)
    spec.loader.exec_module(script)
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(num_hidden_layers=3)).save_pretrained(tmp_path / "model")
    monkeypatch.setattr(script, "smollm2_path", lambda: tmp_path / "model")
    threads = torch.get_num_threads()
    try:
        script.main(["--forward_tokens", "8", "--prompt_tokens", "4", "--new_tokens", "2", "--rounds", "1",
                     "--output", str(tmp_path / "cost.json")])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    for setting in ("base, SDPA", "base, eager", "re-balanced (alpha 0.2)"):
        assert f"| {setting} | " in out
    assert "| base, SDPA | " in out and "1.00x" in out
    figures = json.loads((tmp_path / "cost.json").read_text())
    assert set(figures["tokens_per_s"]) == {"wall", "cpu"}
    assert set(figures["tokens_per_s"]["cpu"]) == set(script.SETTINGS)
    assert "| setting | forward tokens per CPU second |" in out


def carried_architectures():
    """The architectures the project's families are tested on (tests/test_architectures.py's table)."""
    from test_architectures import ARCHITECTURES

    return ARCHITECTURES


@pytest.mark.parametrize("model_type", sorted(carried_architectures()))
def test_every_carried_family_rebalances_or_refuses_clearly(model_type):
    from backattn import family_for

    options = dict(carried_architectures()[model_type])
    options["n_layer" if "n_layer" in options else "num_hidden_layers"] = 3  # two layers: only L-1, never boosted
    torch.manual_seed(0)
    model = family_for(model_type)(AutoConfig.for_model(model_type, **options)).eval()
    windowed = getattr(model.config, "sliding_window", None) is not None or any(
        kind != "full_attention" for kind in getattr(model.config, "layer_types", None) or ()
    )
    if windowed:
        with pytest.raises(BackattnValueError, match="sliding"):
            enable_attention_rebalancing(model, alpha=0.2)
        return
    check_rebalances(model, changed=1e-5)


def test_disabling_restores_the_attention_the_model_ran_before():
    model = tiny_other("qwen2")
    model.set_attn_implementation("eager")
    enable_attention_rebalancing(model, alpha=0.2)
    enable_attention_rebalancing(model, alpha=0.5)  # new options keep the implementation recorded first
    disable_attention_rebalancing(model)
    assert model.config._attn_implementation == "eager" and model.config.attention_rebalancing is None
    enable_attention_rebalancing(model, alpha=0.2)
    with pytest.raises(Exception, match="no_such_attention"):
        disable_attention_rebalancing(model, "no_such_attention")
    assert model.config.attention_rebalancing == {"alpha": 0.2, "threshold": 0.01}  # left as it was
    assert model.config._attn_implementation == ATTENTION_REBALANCING


def test_an_attention_with_two_maps_per_layer_is_refused():
    from transformers import DiffLlamaConfig, DiffLlamaForCausalLM

    config = DiffLlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    with pytest.raises(BackattnValueError, match="computes 2 attention maps per layer"):
        enable_attention_rebalancing(DiffLlamaForCausalLM(config), alpha=0.2)
