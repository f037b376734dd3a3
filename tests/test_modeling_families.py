"""The model families (modeling_families.py): a head on a small random GPT-2 or Llama base, through the
whole Transformers surface (from_pretrained, save_pretrained, Auto classes, trust_remote_code, generate)."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    HIDDEN,
    VOCAB,
    head_model,
    randomise,
    reference_head_logits,
    reference_sequence_logits,
    reload_without_backattn,
    tiny_gpt2_config,
)
from transformers import AutoModelForCausalLM, GPT2LMHeadModel, LlamaForCausalLM, pipeline

from backattn import GPT2BackwardAttentionForCausalLM, LlamaBackwardAttentionForCausalLM
from backattn.errors import BackattnTypeError, BackattnValueError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("family, base", [("gpt2", GPT2LMHeadModel), ("llama", LlamaForCausalLM)])
def test_fresh_head_on_a_plain_base(family, base, gpt2_base_dir, llama_base_dir):
    base_dir = gpt2_base_dir if family == "gpt2" else llama_base_dir
    model_class = GPT2BackwardAttentionForCausalLM if family == "gpt2" else LlamaBackwardAttentionForCausalLM
    plain = base.from_pretrained(base_dir).eval()
    model = head_model(base_dir, "gated", model_class)
    head_state = {k for k in model.state_dict() if k.startswith("heads.")}
    assert head_state and {k for k in model.state_dict()} - head_state == set(plain.state_dict())
    for name, tensor in plain.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name  # base weights load unchanged
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("heads.default.") for name in trainable)
    assert model.config.heads["default"]["vocab_size"] == VOCAB

    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)  # the zero gate gives the base exactly


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_model_logits_are_the_head_applied_to_the_base(family, gpt2_base_dir, llama_base_dir):
    base_dir = gpt2_base_dir if family == "gpt2" else llama_base_dir
    model_class = GPT2BackwardAttentionForCausalLM if family == "gpt2" else LlamaBackwardAttentionForCausalLM
    model = head_model(
        base_dir, {"num_attention_heads": 2, "use_hidden_state": True, "score_mode": "gate"}, model_class
    )
    randomise(model.heads)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        base_out = model.base_model(ids)
        hidden = base_out.last_hidden_state
        base_logits = model.lm_head(hidden)
        expected = torch.stack(
            [
                reference_head_logits(
                    model.heads.default, base_logits[b], hidden[b], model.get_input_embeddings().weight
                )
                for b in range(2)
            ]
        )
        assert torch.allclose(model(ids).logits, expected, atol=1e-5)


def test_generate_passes_top_k_reranking_to_every_step(gpt2_base_dir):
    model = head_model(gpt2_base_dir, {"num_attention_heads": 2, "use_hidden_state": True, "score_mode": "gate"})
    randomise(model.heads)
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                   rerank_top_k=3, pad_token_id=0)  # fmt: skip
        for step in range(ids.shape[1], generated.shape[1]):
            logits = model(generated[:, :step], rerank_top_k=3).logits[:, -1]
            assert torch.equal(generated[:, step], logits.argmax(-1))


def test_config_rerank_top_k_is_the_default_for_every_call_and_is_saved(gpt2_base_dir, tmp_path):
    model = head_model(gpt2_base_dir, {"score_mode": "gate"})
    randomise(model.heads)
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        full, top3 = model(ids).logits, model(ids, rerank_top_k=3).logits
        model.config.rerank_top_k = 3
        assert torch.equal(model(ids).logits, top3) and not torch.equal(top3, full)
        assert torch.equal(model(ids, rerank_top_k=0).logits, full)  # 0: the whole vocabulary for this call
        model.save_pretrained(tmp_path)
        reloaded = GPT2BackwardAttentionForCausalLM.from_pretrained(tmp_path).eval()
        assert reloaded.config.rerank_top_k == 3 and torch.equal(reloaded(ids).logits, top3)
    with pytest.raises(ValueError, match="rerank_top_k must be a positive integer or None"):
        type(model.config)(rerank_top_k=-1)


def test_one_optimiser_step_changes_only_head_tensors(gpt2_base_dir):
    model = head_model(gpt2_base_dir, "seed").train()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(5))
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("heads."))
    optimiser.step()
    for name, tensor in model.state_dict().items():
        if name.startswith("heads."):
            assert not torch.equal(tensor, before[name]), f"head tensor {name} did not train"
        else:
            assert torch.equal(tensor, before[name]), f"base tensor {name} changed"


def test_zero_gate_passes_gradient_only_to_the_gate(gpt2_base_dir):
    model = head_model(gpt2_base_dir, "gated").train()
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(6))
    model(ids, labels=ids).loss.backward()
    for name, parameter in model.heads.default.named_parameters():
        if name == "gate":
            assert parameter.grad.abs().sum() > 0
        else:
            assert torch.count_nonzero(parameter.grad) == 0, name


def test_training_mode_keeps_the_frozen_base_deterministic(gpt2_base_dir):
    model = head_model(gpt2_base_dir, "gated").train()
    assert model.heads.training and not model.base_model.training
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)


def test_loss_is_shifted_masked_cross_entropy(gpt2_base_dir):
    model = head_model(gpt2_base_dir, "seed")
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(8))
    labels = ids.clone()
    labels[0, :3] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
        expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, expected, atol=1e-6)


def test_logits_to_keep_and_hidden_states(gpt2_base_dir):
    model = head_model(gpt2_base_dir, "hidden")
    randomise(model.heads)
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        full = model(ids, output_hidden_states=True)
        last = model(ids, logits_to_keep=1)
        positions = model(ids, logits_to_keep=torch.tensor([2, 5]))
    assert len(full.hidden_states) == model.config.n_layer + 1
    assert last.logits.shape == (2, 1, VOCAB) and torch.allclose(last.logits, full.logits[:, -1:], rtol=1e-5, atol=1e-5)
    assert torch.allclose(positions.logits, full.logits[:, [2, 5]], atol=1e-6)
    tuple_out = model(ids, return_dict=False)
    assert torch.allclose(tuple_out[0], full.logits, atol=1e-6)


def test_attention_mask_is_honoured_and_padding_rows_stay_finite(gpt2_base_dir):
    model = head_model(gpt2_base_dir, "hidden")
    randomise(model.heads)
    ids = torch.randint(1, VOCAB, (3, 6), generator=torch.Generator().manual_seed(10))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    mask[2] = 0  # a row of padding only
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # GPT-2's absolute positions start after the padding
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=position_ids).logits
        alone = model(ids[1:2, 2:]).logits
    assert torch.isfinite(out).all()
    assert torch.allclose(out[1, 2:], alone[0], atol=1e-4)


def test_token_ids_outside_the_vocabulary_are_refused(gpt2_base_dir):
    model = head_model(gpt2_base_dir, "seed")
    with pytest.raises(ValueError, match=r"token id 97, outside this model's vocabulary \[0, 97\)"):
        model(torch.tensor([[1, 2, VOCAB]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[-1, 2]]))


def test_a_head_built_for_another_base_is_refused(gpt2_base_dir, tmp_path):
    model = head_model(gpt2_base_dir, "seed")
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"vocab_size 97 \(head\) != 120 \(base model\)"):
        GPT2BackwardAttentionForCausalLM(GPT2BackwardAttentionConfig_from(model.config, vocab_size=120))
    with pytest.raises(ValueError, match="already carries heads"):
        GPT2BackwardAttentionForCausalLM.from_pretrained(tmp_path, head_config="seed")


def GPT2BackwardAttentionConfig_from(config, **changes):
    options = config.to_dict()
    options.update(changes)
    return type(config).from_dict(options)


def test_save_and_auto_load_gives_identical_logits(gpt2_base_dir, tmp_path):
    model = head_model(gpt2_base_dir, {"num_layers": 2, "layer_mode": "sequential", "score_mode": "gate"})
    randomise(model.heads)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is GPT2BackwardAttentionForCausalLM
    assert {n for n, p in reloaded.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_trust_remote_code_loads_without_backattn(family, gpt2_base_dir, llama_base_dir, tmp_path):
    base_dir = gpt2_base_dir if family == "gpt2" else llama_base_dir
    model_class = GPT2BackwardAttentionForCausalLM if family == "gpt2" else LlamaBackwardAttentionForCausalLM
    model = head_model(base_dir, "hidden", model_class)
    randomise(model.heads)
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(12))
    # the head files work from the remote code too: save_head, and the saved head loads back
    more_checks = f"""
        model.save_head({str(tmp_path / "head")!r}, task="remote")
        assert model.load_head({str(tmp_path / "head")!r}, head_name="again") == "again"
        model.set_head("again")
        with torch.no_grad():
            assert torch.equal(model(expected["ids"]).logits, expected["logits"])
        """
    checkpoint = reload_without_backattn(model, ids, tmp_path, more_checks)
    assert {"head_card.py", "head_files.py", "errors.py"} <= {f.name for f in checkpoint.iterdir()}
    assert (tmp_path / "head" / "README.md").read_text().startswith("---\n")  # the card, built in code
    reloaded = model_class.from_pretrained(base_dir)  # and the head saved remotely loads where backattn is
    reloaded.load_head(tmp_path / "head")
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(ids).logits, model(ids).logits)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generate_greedy_with_and_without_cache(family, gpt2_base_dir, llama_base_dir):
    base_dir = gpt2_base_dir if family == "gpt2" else llama_base_dir
    model_class = GPT2BackwardAttentionForCausalLM if family == "gpt2" else LlamaBackwardAttentionForCausalLM
    model = head_model(base_dir, {"use_hidden_state": True, "num_attention_heads": 2}, model_class)
    randomise(model.heads)
    prompt = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(13))
    options = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    cached = model.generate(prompt, use_cache=True, **options)
    uncached = model.generate(prompt, use_cache=False, **options)
    assert cached.shape == (2, 13) and torch.equal(cached, uncached)
    # greedy follows the head's own argmax, step by step
    ids = prompt
    with torch.no_grad():
        for _ in range(8):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, ids)


def test_generate_sampling_and_beam_search(gpt2_base_dir):
    model = head_model(gpt2_base_dir, "seed")
    prompt = torch.randint(1, VOCAB, (2, 4), generator=torch.Generator().manual_seed(14))
    common = dict(max_new_tokens=6, pad_token_id=0, eos_token_id=None)
    torch.manual_seed(0)
    sampled = model.generate(prompt, do_sample=True, top_k=20, temperature=0.8, **common)
    torch.manual_seed(0)
    assert torch.equal(sampled, model.generate(prompt, do_sample=True, top_k=20, temperature=0.8, **common))
    assert sampled.shape == (2, 10) and sampled.max() < VOCAB
    beams = model.generate(prompt, num_beams=3, do_sample=False, use_cache=True, **common)
    assert torch.equal(beams, model.generate(prompt, num_beams=3, do_sample=False, use_cache=False, **common))


def test_real_gpt2_tokenizer_and_pipeline(gpt2_tokenizer, tmp_path):
    torch.manual_seed(0)
    base = GPT2LMHeadModel(tiny_gpt2_config(vocab_size=len(gpt2_tokenizer), bos_token_id=50256, eos_token_id=50256))
    base.save_pretrained(tmp_path)
    model = GPT2BackwardAttentionForCausalLM.from_pretrained(tmp_path, head_config="hidden").eval()
    randomise(model.heads)
    text = "Question: Tom has 3 apples and buys 4 more. How many apples does he have?\nAnswer:"
    inputs = gpt2_tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        assert model(**inputs).logits.shape == (1, inputs.input_ids.shape[1], 50257)
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=gpt2_tokenizer.eos_token_id)
    continuation = gpt2_tokenizer.decode(generated[0, inputs.input_ids.shape[1] :])
    generator = pipeline("text-generation", model=model, tokenizer=gpt2_tokenizer)
    result = generator(text, max_new_tokens=5, do_sample=False, pad_token_id=gpt2_tokenizer.eos_token_id)
    assert result[0]["generated_text"] == text + continuation


# --------------------------------------------------------------------------------------------------------
# the state of the heads survives save_pretrained / from_pretrained; forward's keywords; torch.compile


def test_head_order_active_head_enabled_state_and_trainable_flags_round_trip(llama_base_dir, tmp_path):
    model = LlamaBackwardAttentionForCausalLM.from_pretrained(llama_base_dir, head_config="seed", head_name="zeta")
    model.add_head("hidden", head_name="alpha", freeze_others=False)
    model.add_head("gated", head_name="mid", freeze_others=False)
    model.heads["zeta"].requires_grad_(False)  # wholly frozen
    model.heads["mid"].layers[0].w_key.requires_grad_(False)  # partly frozen
    model.set_head("alpha")
    model.disable_heads()
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["head_order"] == ["zeta", "alpha", "mid"] and list(saved["heads"]) == ["alpha", "mid", "zeta"]
    assert saved["frozen_heads"] == ["zeta", "mid.layers.0.w_key"] and saved["heads_enabled"] is False
    for loader in (LlamaBackwardAttentionForCausalLM, AutoModelForCausalLM):
        reloaded = loader.from_pretrained(tmp_path)
        assert reloaded.list_heads() == ["zeta", "alpha", "mid"] and list(reloaded.config.heads) == [
            "zeta",
            "alpha",
            "mid",
        ]
        assert reloaded.active_head() is None and reloaded.config.active_head == "alpha"
        assert {name: p.requires_grad for name, p in reloaded.named_parameters()} == flags
        reloaded.enable_heads()
        assert reloaded.active_head() == "alpha"


def test_checkpoints_of_before_the_state_fields_load_with_every_head_training(gpt2_base_dir, tmp_path):
    model = head_model(gpt2_base_dir, "seed")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("head_order", "heads_enabled", "frozen_heads"):
        config.pop(key, None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.active_head() == "default" and all(p.requires_grad for p in reloaded.heads.parameters())


def test_forward_refuses_keywords_it_would_ignore_and_takes_the_families_own(gpt2_base_dir):
    model = head_model(gpt2_base_dir, "seed")
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    with pytest.raises(BackattnTypeError, match=r"'adapter_names'.*PEFT.*heads="):
        model(ids, adapter_names=["a", "b"])
    with pytest.raises(BackattnTypeError, match=r"'colour'.*would be ignored"):
        model(ids, colour="blue")
    with torch.no_grad():  # GPT-2's own token_type_ids, and Transformers' keywords, pass
        out = model(ids, token_type_ids=torch.zeros_like(ids), output_hidden_states=True, return_dict=True)
    assert len(out.hidden_states) == 3


def test_torch_compile_fullgraph_with_the_active_head(llama_base_dir):
    """The input checks that read values are skipped while compiling (backends "eager" / "aot_eager": ~10 s)."""
    model = head_model(llama_base_dir, "hidden", LlamaBackwardAttentionForCausalLM)
    randomise(model.heads)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
        mixed = model(ids, heads=["default", None]).logits
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, expected)
        torch.testing.assert_close(compiled(ids, heads=["default", None]).logits, mixed)
    model.train()  # a training step: the loss is the straightforward one under compile
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = compiled(ids, labels=ids).loss
    loss.backward()
    assert model.heads["default"].gate.grad is not None
    torch.testing.assert_close(loss, model(ids, labels=ids).loss)
    model.heads["default"].config.base_kl_weight = 0.5  # the KL-to-base term compiles too, and adds to the loss
    torch._dynamo.reset()
    penalised = torch.compile(model, fullgraph=True, backend="aot_eager")(ids, labels=ids).loss
    torch.testing.assert_close(penalised, model(ids, labels=ids).loss)
    assert penalised > loss
    labels = torch.full_like(ids, -100)  # the label-word loss compiles too: label words at two positions a row
    labels[:, 2], labels[:, 4] = 7, 11
    model.heads.set_training_options("default", base_kl_weight=0.0, label_word_ids=[7, 11, 3])
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(ids, labels=labels).loss, model(ids, labels=labels).loss)
    labels[0, 4] = 12  # not a label word: no check runs while compiling, so the loss says so with NaN
    assert torch.isnan(compiled(ids, labels=labels).loss)
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------------------
# query_layers, differential score maps and the copy term on a whole model

NEW_OPTIONS = {
    "query-layers": {"query_layers": [0, 1], "use_hidden_state": True, "score_mode": "gate"},
    "differential": {"score_maps": "differential", "use_hidden_state": True, "score_mode": "gate"},
    "copy": {"copy_attention": True, "score_mode": "gate"},
    "all-three": {
        "query_layers": [1, 0],
        "score_maps": "differential",
        "copy_attention": True,
        "use_hidden_state": True,
        "score_mode": "gate",
        "num_attention_heads": 2,
        "divide_by_vocab": False,
    },  # fmt: skip
}
FAMILY_CLASSES = {"gpt2": GPT2BackwardAttentionForCausalLM, "llama": LlamaBackwardAttentionForCausalLM}


def block_outputs(base, ids, attention_mask=None):
    """Each decoder block's output (before the final norm), taken here by the test's own hooks."""
    blocks = base.transformer.h if hasattr(base, "transformer") else base.model.layers
    outputs = {}
    handles = [
        block.register_forward_hook(lambda m, i, o, k=k: outputs.__setitem__(k, o[0] if isinstance(o, tuple) else o))
        for k, block in enumerate(blocks)
    ]
    try:
        final = base.base_model(ids, attention_mask=attention_mask).last_hidden_state
    finally:
        for handle in handles:
            handle.remove()
    return final, outputs


@pytest.mark.parametrize("options", NEW_OPTIONS.values(), ids=NEW_OPTIONS.keys())
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_fresh_gated_head_with_the_new_options_gives_the_base_exactly(family, options, gpt2_base_dir, llama_base_dir):
    base_dir = gpt2_base_dir if family == "gpt2" else llama_base_dir
    plain = (GPT2LMHeadModel if family == "gpt2" else LlamaForCausalLM).from_pretrained(base_dir).eval()
    model = head_model(base_dir, options, FAMILY_CLASSES[family])
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)
        assert torch.equal(model(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits)
        prompt = ids[:, :4]
        generated = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert torch.equal(generated, plain.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0,
                                                     eos_token_id=None))  # fmt: skip


@pytest.mark.parametrize("options", NEW_OPTIONS.values(), ids=NEW_OPTIONS.keys())
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_model_logits_are_the_reference_head_on_the_base_features(family, options, gpt2_base_dir, llama_base_dir):
    base_dir = gpt2_base_dir if family == "gpt2" else llama_base_dir
    model = head_model(base_dir, options, FAMILY_CLASSES[family])
    randomise(model.heads)
    head = model.heads.default
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    with torch.no_grad():
        out = model(ids, attention_mask=mask).logits
        hidden, blocks = block_outputs(model, ids, mask)
        layers = head.config.query_layers
        stacked = None if layers is None else torch.stack([blocks[k] for k in layers], dim=-2)
        embeddings = model.get_input_embeddings().weight
        for b in range(2):
            expected = reference_sequence_logits(
                head, model.lm_head(hidden[b]), hidden[b], embeddings, ids[b], mask[b].bool(),
                None if stacked is None else stacked[b],
            )  # fmt: skip
            assert torch.allclose(out[b], expected, atol=1e-4), b
        kept = model(ids, attention_mask=mask, logits_to_keep=2).logits
        assert torch.allclose(kept, out[:, -2:], atol=1e-5)


@pytest.mark.parametrize("options", NEW_OPTIONS.values(), ids=NEW_OPTIONS.keys())
def test_heads_with_the_new_options_round_trip_through_head_files_and_checkpoints(options, gpt2_base_dir, tmp_path):
    model = head_model(gpt2_base_dir, options)
    randomise(model.heads)
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(ids).logits
    model.save_head(tmp_path / "head")
    fresh = GPT2BackwardAttentionForCausalLM.from_pretrained(gpt2_base_dir).eval()
    fresh.load_head(tmp_path / "head")
    assert fresh.heads.default.config == model.heads.default.config
    model.save_pretrained(tmp_path / "checkpoint")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint").eval()
    saved = json.loads((tmp_path / "checkpoint" / "config.json").read_text())["heads"]["default"]
    assert {k: saved[k] for k in options} == options
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, expected)
        assert torch.equal(reloaded(ids).logits, expected)
    fresh.load_head(tmp_path / "head", hotswap=True)  # same options: the weights swap in place
    fresh.heads.set_training_options("default", label_word_ids=[3, 4])  # other options: refused, naming them
    with pytest.raises(BackattnValueError, match=r"differ .* in \{'label_word_ids': \(None, \[3, 4\]\)\}"):
        fresh.load_head(tmp_path / "head", hotswap=True)


@pytest.mark.parametrize("options", [NEW_OPTIONS["copy"], NEW_OPTIONS["all-three"]], ids=["copy", "all-three"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_copy_heads_generate_the_same_tokens_with_and_without_the_kv_cache(family, options, gpt2_base_dir,
                                                                            llama_base_dir):  # fmt: skip
    base_dir = gpt2_base_dir if family == "gpt2" else llama_base_dir
    model = head_model(base_dir, options, FAMILY_CLASSES[family])
    randomise(model.heads)
    with torch.no_grad():
        model.heads.default.copy_gate.fill_(3.0)  # copying dominates: the cached context matters
    prompt = torch.randint(1, VOCAB, (3, 6), generator=torch.Generator().manual_seed(13))
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0  # a left-padded row
    common = dict(attention_mask=mask, max_new_tokens=8, pad_token_id=0, eos_token_id=None)
    cached = model.generate(prompt, do_sample=False, use_cache=True, **common)
    assert torch.equal(cached, model.generate(prompt, do_sample=False, use_cache=False, **common))
    ids, full_mask = prompt, mask
    with torch.no_grad():  # greedy follows the head's own argmax over the whole sequence, step by step
        for _ in range(8):
            positions = (full_mask.cumsum(-1) - 1).clamp(min=0)  # as generate makes them for left padding
            logits = model(ids, attention_mask=full_mask, position_ids=positions).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
            full_mask = torch.cat([full_mask, torch.ones_like(full_mask[:, :1])], 1)
    assert torch.equal(cached, ids)
    beams = model.generate(prompt, num_beams=3, do_sample=False, use_cache=True, **common)
    assert torch.equal(beams, model.generate(prompt, num_beams=3, do_sample=False, use_cache=False, **common))


def test_cached_decoding_keeps_the_context_on_the_cache_and_follows_its_reorders(gpt2_base_dir):
    model = head_model(gpt2_base_dir, NEW_OPTIONS["all-three"])
    randomise(model.heads)
    ids = torch.randint(1, VOCAB, (3, 8), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = model(ids).logits
        prefix = model(ids[:, :5], use_cache=True)
        cache = prefix.past_key_values
        assert cache._backattn_context.hidden.shape == (3, 5, HIDDEN)
        step = model(ids[:, 5:], past_key_values=cache, use_cache=True).logits
        assert torch.allclose(step, full[:, 5:], atol=1e-5)
        assert cache._backattn_context.input_ids.shape == (3, 8) and torch.equal(cache._backattn_context.input_ids, ids)
        order = torch.tensor([2, 0, 0])
        cache.reorder_cache(order)  # as beam search does: the kept context follows
        assert torch.equal(cache._backattn_context.input_ids, ids[order])
        nxt = torch.randint(1, VOCAB, (3, 1), generator=torch.Generator().manual_seed(7))
        following = model(nxt, past_key_values=cache, use_cache=True).logits
        assert torch.allclose(following, model(torch.cat([ids[order], nxt], 1)).logits[:, -1:], atol=1e-5)
        base_only = model.base_model(ids[:, :5], use_cache=True).past_key_values  # filled without the model
        with pytest.raises(ValueError, match="KV cache holds 5 positions whose states this model did not keep"):
            model(ids[:, 5:6], past_key_values=base_only)


def test_query_layers_beyond_the_base_and_missing_inputs_are_refused(gpt2_base_dir):
    with pytest.raises(ValueError, match=r"query_layers \[0, 2\] name decoder block\(s\) \[2\], but this base has 2"):
        head_model(gpt2_base_dir, {"query_layers": [0, 2], "use_hidden_state": True})
    model = head_model(gpt2_base_dir, NEW_OPTIONS["all-three"])
    ids = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        hidden, blocks = block_outputs(model, ids)
        with pytest.raises(ValueError, match=r"states of block\(s\) \[1\] were not given"):
            model(ids, base_hidden_states=hidden, base_layer_states={0: blocks[0]})
        with pytest.raises(ValueError, match=r"base_layer_states\[1\] must be a tensor of shape \(2, 5, 24\)"):
            model(ids, base_hidden_states=hidden, base_layer_states={0: blocks[0], 1: blocks[1][:, :3]})
        with pytest.raises(ValueError, match="needs input_ids"):
            model(inputs_embeds=model.get_input_embeddings()(ids))


@pytest.mark.parametrize("options", NEW_OPTIONS.values(), ids=NEW_OPTIONS.keys())
def test_fused_lm_head_and_mixed_batches_serve_the_new_options(options, gpt2_base_dir):
    model = head_model(gpt2_base_dir, options)
    model.add_head("seed", head_name="plain", freeze_others=False)
    randomise(model.heads)
    model.set_head("default")
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(9))
    labels = ids.clone()
    labels[0, :3] = -100
    with torch.no_grad():
        logits = model(ids).logits
        fused = model(ids, labels=labels, fused_lm_head=True)
        expected = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
        assert torch.allclose(fused.log_probs[fused.label_mask], expected[fused.label_mask], atol=1e-5)
        mixed = model(ids, heads=["plain", "default"]).logits
        model.set_head("plain")
        assert torch.allclose(mixed[0], model(ids[:1]).logits[0], atol=1e-6)
        assert torch.allclose(mixed[1], logits[1], atol=1e-6)


# --------------------------------------------------------------------------------------------------------
# the copy term learns to copy: a synthetic task no frozen base can do

BOS, SEP, SPAN = 0, 1, 8


def copy_task(rows, generator):
    """``BOS a_1 .. a_8 SEP a_1 .. a_8`` (a_i distinct, from the vocabulary but BOS and SEP); labels: the copy."""
    spans = torch.stack([torch.randperm(VOCAB - 2, generator=generator)[:SPAN] + 2 for _ in range(rows)])
    ids = torch.cat([torch.full((rows, 1), BOS), spans, torch.full((rows, 1), SEP), spans], dim=1)
    labels = ids.clone()
    labels[:, : SPAN + 2] = -100
    return ids, labels


def copied_accuracy(model, ids):
    with torch.no_grad():
        predicted = model(ids).logits[:, SPAN + 1 : -1].argmax(-1)  # at SEP and a_1 .. a_7: a_1 .. a_8
    return (predicted == ids[:, SPAN + 2 :]).float().mean().item()


def train_on_copy_task(base_dir, options, steps=200, seed=0):
    torch.manual_seed(seed)
    model = head_model(base_dir, options).train()
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids, labels = copy_task(16, generator)
        loss = model(ids, labels=labels).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


def test_the_copy_head_learns_to_copy_what_the_frozen_base_cannot(gpt2_base_dir):
    """A tiny random GPT-2, frozen; only the head trains, 200 steps of 16 sequences (~3 s on one thread). The
    copy head gets the copied half right (> 0.9; 0.996 when written), the base is at chance (1/95) and so
    is the 'hidden' preset trained the same way (its scores cannot see the earlier positions)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is ~30x faster than two on a busy machine
    try:
        held_out, _ = copy_task(64, torch.Generator().manual_seed(123))
        copier = train_on_copy_task(gpt2_base_dir, {"copy_attention": True, "score_mode": "gate"})
        control = train_on_copy_task(gpt2_base_dir, "hidden")
        with copier.disable_heads():
            base = copied_accuracy(copier, held_out)
        head, without_copy = copied_accuracy(copier, held_out), copied_accuracy(control, held_out)
        assert head > 0.9 and base < 0.05 and without_copy < 0.05, (head, base, without_copy)
        prompt = held_out[:8, : SPAN + 2]
        common = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=SPAN, do_sample=False, eos_token_id=None)
        common["pad_token_id"] = 0  # BOS: the attention mask says it is no padding
        generated = copier.generate(prompt, use_cache=True, **common)
        assert torch.equal(generated, copier.generate(prompt, use_cache=False, **common))
        assert (generated[:, SPAN + 2 :] == held_out[:8, SPAN + 2 :]).float().mean() > 0.9
    finally:
        torch.set_num_threads(threads)
