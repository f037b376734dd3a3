"""Fan-out (issue 16, item 5): one base forward serving several heads, ``forward(..., fan_out=[...])``, and
``generate(..., fan_out=[...])`` decoding one prompt under several heads from one shared prefill; the mixed batch
of two trained heads on the real SmolLM2 (issue 16's acceptance test).

"Alone" is always the single-head path a user takes: ``set_head(name)`` (``disable_heads()`` for the base) and
a plain ``forward`` / ``generate`` on the same batch. Fan-out runs the same kernels on the same tensors, only
computing once what the heads share, so its logits equal those exactly (``torch.equal``), and its greedy tokens
equal each head's own ``generate``, with and without the KV cache.
"""

import contextlib

import pytest
import torch
from conftest import VOCAB, head_model, randomise

from backattn import GPT2BackwardAttentionForCausalLM, LlamaBackwardAttentionForCausalLM, head_kernels

#: One head of each kind the forward serves differently: softmax weighting added (seed), gated, the raw-weighting
#: shortcut, query_layers (block hooks), copy_attention (the sequence context, kept on the KV cache), and a
#: sequential head whose second layer reads the first one's logits.
HEADS = {
    "plain": "seed",
    "gated": "gated",
    "raw": {"logit_weighting": "raw", "divide_by_vocab": False, "score_mode": "gate"},
    "layers": {"query_layers": [0, 1], "use_hidden_state": True, "score_mode": "gate"},
    "copy": {"copy_attention": True, "score_mode": "gate"},
    "sequential": {"num_layers": 2, "layer_mode": "sequential", "score_mode": "gate", "out_dim": 12},
}
FAMILIES = {"gpt2": GPT2BackwardAttentionForCausalLM, "llama": LlamaBackwardAttentionForCausalLM}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def model(request, gpt2_base_dir, llama_base_dir):
    """A small random GPT-2 or Llama carrying every head of HEADS, all with random weights (gates open)."""
    base_dir = gpt2_base_dir if request.param == "gpt2" else llama_base_dir
    names = list(HEADS)
    model = head_model(base_dir, HEADS[names[0]], FAMILIES[request.param])
    model.delete_head("default")
    for name in names:
        model.add_head(HEADS[name], head_name=name)
    randomise(model.heads, seed=5)
    return model.eval()


def batch(rows=3, length=7, seed=0):
    """Random ids with left padding (row 1 starts 2 positions late, row 2 one) and their mask."""
    ids = torch.randint(1, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[1, :2] = 0
    mask[2 % rows, :1] = 0
    ids[mask == 0] = 0
    return ids, mask


@contextlib.contextmanager
def serving(model, name):
    """``name`` active (``None``: heads disabled, the base's own logits), the active head restored after."""
    active = model.active_head()
    if name is None:
        with model.disable_heads():
            yield
        return
    model.set_head(name)
    try:
        yield
    finally:
        if active is not None:
            model.set_head(active)


def alone(model, name, ids, mask, **kwargs):
    with torch.no_grad(), serving(model, name):
        return model(ids, attention_mask=mask, **kwargs)


@contextlib.contextmanager
def counted_base_calls(model):
    """The sequence lengths of every base (decoder) forward inside the block."""
    lengths = []
    handle = model.base_model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append((kwargs.get("input_ids") if args == () else args[0]).shape[1]),
        with_kwargs=True,
    )
    try:
        yield lengths
    finally:
        handle.remove()


# --------------------------------------------------------------------------------------------------------
# forward(..., fan_out=[...])


@pytest.mark.parametrize("options", [{}, {"logits_to_keep": 2}, {"rerank_top_k": 5}], ids=["all", "keep-2", "top-5"])
def test_fan_out_equals_each_head_alone(model, options):
    ids, mask = batch()
    labels = ids.masked_fill(mask == 0, -100) if not options else None
    names = [*HEADS, None]
    with counted_base_calls(model) as calls, torch.no_grad():
        fanned = model(ids, attention_mask=mask, labels=labels, fan_out=names, **options)
    assert calls == [ids.shape[1]]  # one base forward for every head
    assert list(fanned.logits) == names
    for name in names:
        expected = alone(model, name, ids, mask, labels=labels, **options)
        assert torch.equal(fanned.logits[name], expected.logits), name
        if labels is not None:
            assert torch.equal(fanned.loss[name], expected.loss), name
    assert not torch.equal(fanned.logits["plain"], fanned.logits[None])  # the heads are not the base
    assert not torch.equal(fanned.logits["plain"], fanned.logits["gated"])
    assert fanned.past_key_values is not None  # the base's cache, as forward returns it


def test_fan_out_computes_the_base_logits_softmax_once(model, monkeypatch):
    """Step 4's softmax(l / rms(l)) of the base logits is shared: computed once for the softmax-weighted heads,
    plus once for the sequential head's second layer, which reads the logits its first layer made."""
    calls = []
    inverse_rms = head_kernels._inverse_rms
    monkeypatch.setattr(head_kernels, "_inverse_rms", lambda *args: calls.append(1) or inverse_rms(*args))
    ids, mask = batch()
    with torch.no_grad():
        model(ids, attention_mask=mask, fan_out=list(HEADS))
        assert len(calls) == 2
        calls.clear()
        for name in HEADS:
            alone(model, name, ids, mask)
        assert len(calls) == 6  # plain, gated, layers, copy, and the sequential head's two layers


def test_fan_out_of_cached_features_and_a_kv_cache(model):
    """``base_hidden_states`` (the base not run at all) and decoding with a KV cache serve fan-out as they serve
    one head: the copy head reads the positions kept on the cache."""
    ids, mask = batch()
    with torch.no_grad():
        with model.capture_block_outputs([0, 1]) as states:
            hidden = model.base_model(ids, attention_mask=mask).last_hidden_state
        cached = model(
            ids, attention_mask=mask, fan_out=list(HEADS), base_hidden_states=hidden, base_layer_states=states
        )
        for name in HEADS:
            assert torch.equal(cached.logits[name], alone(model, name, ids, mask).logits), name
        first = model(ids[:, :5], attention_mask=mask[:, :5], use_cache=True, fan_out=list(HEADS))
        step = model(ids[:, 5:], attention_mask=mask, past_key_values=first.past_key_values, fan_out=list(HEADS))
    for name in HEADS:
        full = alone(model, name, ids, mask).logits
        assert torch.allclose(step.logits[name], full[:, 5:], atol=1e-4), name  # cached attention: other op order


# --------------------------------------------------------------------------------------------------------
# generate(..., fan_out=[...])


@pytest.mark.parametrize("options", [{}, {"use_cache": False}, {"num_beams": 2}], ids=["cache", "no-cache", "beams"])
def test_fan_out_generate_equals_each_heads_own_generate(model, options):
    ids, mask = batch()
    names = [*HEADS, None]
    new_tokens = 4
    options = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None, **options)
    with counted_base_calls(model) as calls:
        fanned = model.generate(ids, attention_mask=mask, fan_out=names, **options)
    assert list(fanned) == names
    for name in names:
        with serving(model, name):
            own = model.generate(ids, attention_mask=mask, **options)
        assert torch.equal(fanned[name], own), name
        if options.get("use_cache", True):
            with serving(model, name):
                uncached = model.generate(ids, attention_mask=mask, **{**options, "use_cache": False})
            assert torch.equal(fanned[name], uncached), name
    prompt = ids.shape[1]
    if options.get("use_cache", True):  # one prefill, then each head's own decoding steps of one token
        assert calls == [prompt] + [1] * (len(names) * (new_tokens - 1))
    else:  # the first step is shared; without a cache every later one reads the whole sequence
        assert calls == [prompt] + [prompt + t for _ in names for t in range(1, new_tokens)]


def test_fan_out_generate_returns_what_generate_returns(model):
    ids, mask = batch(rows=2)
    options = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    fanned = model.generate(ids, attention_mask=mask, fan_out=["copy", "layers"], **options)
    for name in ("copy", "layers"):
        with serving(model, name):
            own = model.generate(ids, attention_mask=mask, **options)
        assert torch.equal(fanned[name].sequences, own.sequences)
        assert all(torch.equal(a, b) for a, b in zip(fanned[name].logits, own.logits))
    assert fanned["copy"].past_key_values is not fanned["layers"].past_key_values  # a cache of its own each


# --------------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "fan_out, error, message",
    [
        ([], ValueError, "fan_out= is empty: name at least one head"),
        (["plain", "chat", "nope"], ValueError, "fan_out= names 'chat', 'nope', which are not loaded; the heads are"),
        (["plain", "gated", "plain"], ValueError, "fan_out= names 'plain' more than once"),
        ([None, None], ValueError, "fan_out= names None more than once"),
        ("plain", TypeError, r"fan_out= takes a list of head names .* \(for one head on every row: heads='plain'\)"),
        (torch.tensor([0, 1]), TypeError, "fan_out= takes a list of head names"),
        (["plain", 3], TypeError, "fan_out= entries must be head names"),
    ],
)
def test_bad_fan_out_is_refused_clearly(model, fan_out, error, message):
    ids, mask = batch()
    with pytest.raises(error, match=message):
        model(ids, attention_mask=mask, fan_out=fan_out)
    with pytest.raises(error, match=message):
        model.generate(ids, attention_mask=mask, fan_out=fan_out, max_new_tokens=1, pad_token_id=0)


def test_fan_out_with_other_head_choices_is_refused(model):
    ids, mask = batch()
    with pytest.raises(ValueError, match=r"both fan_out= \(every row under each head\) and heads="):
        model(ids, attention_mask=mask, fan_out=["plain"], heads=["plain", None, None])
    with pytest.raises(ValueError, match="both fan_out= .* and fused_lm_head=True"):
        model(ids, attention_mask=mask, labels=ids, fan_out=["plain"], fused_lm_head=True)
    with pytest.raises(ValueError, match="got both heads= .* and fan_out="):
        model.generate(ids, attention_mask=mask, fan_out=["plain"], heads="gated", max_new_tokens=1, pad_token_id=0)
    with torch.no_grad():
        cache = model(ids, attention_mask=mask, use_cache=True).past_key_values
    with pytest.raises(ValueError, match="cannot start from a past_key_values you pass"):
        model.generate(ids, attention_mask=mask, past_key_values=cache, fan_out=["plain"], max_new_tokens=1)
    with model.disable_heads(), pytest.raises(ValueError, match=r"fan_out=\['plain'\] was given while heads are disab"):
        model(ids, attention_mask=mask, fan_out=["plain"])


# --------------------------------------------------------------------------------------------------------
# issue 16's acceptance test: two trained heads on the real SmolLM2

MATH = [
    "Question: Tom has 3 apples and buys 4 more. How many apples does he have?\nAnswer: 3 + 4 = 7. The answer is 7.",
    "Question: A box holds 6 pens. How many pens are in 2 boxes?\nAnswer: 6 * 2 = 12. The answer is 12.",
    "Question: Ann had 10 sweets and ate 3. How many are left?\nAnswer: 10 - 3 = 7. The answer is 7.",
]
SENTIMENT = [
    "Review: a warm, funny and moving film.\nSentiment: positive",
    "Review: dull, slow and far too long.\nSentiment: negative",
    "Review: the best picture of the year.\nSentiment: positive",
    "Review: a lifeless script and wooden acting.\nSentiment: negative",
]
PROMPTS = [
    "Question: Sara has 12 pencils and gives 5 to Tom. How many pencils does she have left?\nAnswer:",
    "Review: an utterly charming comedy.\nSentiment:",
    "Question: 8 birds sit on a tree and 3 fly away. How many are left?\nAnswer:",
    "Review: boring.\nSentiment:",
]


def train_head(model, tokenizer, texts, steps=4, lr=1e-2):
    """A few Adam steps of the active head on ``texts``, from the base's hidden states computed once (about 1 s a
    step on one thread: the tables over the whole vocabulary, with gradients); the loss before and after."""
    tokenizer.padding_side = "right"
    inputs = tokenizer(texts, return_tensors="pt", padding=True)
    labels = inputs.input_ids.masked_fill(inputs.attention_mask == 0, -100)
    with torch.no_grad():
        hidden = model.base_model(**inputs).last_hidden_state
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        optimiser.zero_grad()
        loss = model(**inputs, labels=labels, base_hidden_states=hidden).loss
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        return losses[0], model(**inputs, labels=labels, base_hidden_states=hidden).loss.item()


@pytest.fixture(scope="module")
def smollm2_two_heads(smollm2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    model = LlamaBackwardAttentionForCausalLM.from_pretrained(smollm2_dir, head_config="hidden", head_name="math")
    math = train_head(model, tokenizer, MATH)
    model.add_head("hidden", head_name="sentiment")  # the math head is frozen from here on
    sentiment = train_head(model, tokenizer, SENTIMENT)
    assert math[1] < 0.9 * math[0] and sentiment[1] < 0.9 * sentiment[0]  # really trained, on its own data
    tokenizer.padding_side = "left"
    return model, tokenizer


@pytest.mark.integration
def test_two_trained_heads_on_smollm2_mixed_batch_and_fan_out(smollm2_two_heads):
    model, tokenizer = smollm2_two_heads
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    ids, mask = inputs.input_ids, inputs.attention_mask
    assert (mask == 0).any()  # left padding in the batch
    rows = ["math", "sentiment", "math", "sentiment"]
    names = ["math", "sentiment", None]
    with torch.no_grad():
        fanned = model(ids, attention_mask=mask, fan_out=names).logits
    for name in names:  # fan-out equals each head alone
        assert torch.equal(fanned[name], alone(model, name, ids, mask).logits), name
    real = mask.bool()
    for a, b in [("math", None), ("sentiment", None), ("math", "sentiment")]:  # trained: they differ
        assert (fanned[a][real] - fanned[b][real]).abs().max() > 0.5, (a, b)
        assert (fanned[a][real].argmax(-1) != fanned[b][real].argmax(-1)).any(), (a, b)

    options = dict(max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    mixed = model.generate(ids, attention_mask=mask, heads=rows, **options)
    for row, name in enumerate(rows):  # each row alone, the same left padding, its head active
        with serving(model, name):
            single = model.generate(ids[row : row + 1], attention_mask=mask[row : row + 1], **options)
        assert torch.equal(mixed[row], single[0]), (row, name)
    fanned_generated = model.generate(ids, attention_mask=mask, fan_out=["math", "sentiment"], **options)
    for name in ("math", "sentiment"):
        with serving(model, name):
            own = model.generate(ids, attention_mask=mask, **options)
        assert torch.equal(fanned_generated[name], own), name
        mine = [row for row, wanted in enumerate(rows) if wanted == name]
        assert torch.equal(fanned_generated[name][mine], mixed[mine]), name


def test_the_fan_out_benchmark_runs_and_reports(tmp_path):
    """benchmarks/bench_fanout.py at a tiny scale (a small random Llama); its figures come from full runs."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_fanout.py"
    spec = importlib.util.spec_from_file_location("bench_fanout", path)
    script = importlib.util.module_from_spec(spec)
    sys.modules["bench_fanout"] = script
    spec.loader.exec_module(script)
    threads = torch.get_num_threads()
    try:
        output = tmp_path / "fanout.json"
        options = ["--tiny", "--sizes", "1", "2", "--rounds", "1", "--rows", "2", "--seq_len", "16"]
        results = script.main([*options, "--output", str(output)])
    finally:
        torch.set_num_threads(threads)
    assert output.exists() and set(results["median_seconds"]) == set(script.METHODS)
    assert all(seconds > 0 for by_n in results["median_seconds"].values() for seconds in by_n.values())
    assert abs(results["lora_parameters"] - results["head_parameters"]) <= 0.1 * results["head_parameters"]
    assert results["ratio_to_one_head"]["one forward per head"]["1"] == 1.0
