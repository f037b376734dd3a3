"""One head-carrying class per causal-LM architecture (backattn/modeling_auto.py), on small random configs.

For each architecture: the untrained gated head gives the stock model's ``.logits`` exactly (Gemma 3's final-logit
soft-capping on, Cohere's and Granite's logit scaling set, Phi's output-layer bias); a head with its gate open and
random weights equals a plain reference written here from the stock model's logits and hidden states (steps 1-7 of
``BackwardAttentionConfig``, float64); the model saves and loads back through ``AutoModelForCausalLM``; greedy
generation gives the same tokens with and without the KV cache; and the chunked training loss (and its gradients)
equals the exact loss where the base post-processes its logits.
"""

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import randomise, reload_without_backattn
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GPT2LMHeadModel, LlamaForCausalLM, OPTForCausalLM

from backattn import (
    FAMILIES,
    GPT2BackwardAttentionForCausalLM,
    LlamaBackwardAttentionForCausalLM,
    backward_attention_class,
    family_for,
)
from backattn.errors import BackattnValueError
from backattn.modeling_auto import logit_steps

REPO = Path(__file__).resolve().parents[1]
VOCAB, HIDDEN = 97, 24
DECODER = dict(
    vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0,
)  # fmt: skip

#: model_type -> the options of a small random config (beyond DECODER).
ARCHITECTURES = {
    "gpt2": dict(n_embd=HIDDEN, n_layer=2, n_head=2, n_positions=64, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0),
    "llama": dict(DECODER, tie_word_embeddings=True),
    "mistral": dict(DECODER, sliding_window=None),
    "qwen2": dict(DECODER),
    "qwen3": dict(DECODER, head_dim=12),
    "gemma3_text": dict(DECODER, head_dim=12, query_pre_attn_scalar=12, sliding_window=8, final_logit_softcapping=0.1),
    "phi3": dict(DECODER),
    "gpt_neox": dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,
        rotary_pct=0.5,
    ),  # fmt: skip
    "phi": dict(DECODER, num_key_value_heads=2),  # its output layer has a bias
    "cohere": dict(DECODER, logit_scale=0.5),  # l * logit_scale
    "granite": dict(DECODER, logits_scaling=3.0),  # l / logits_scaling
}
#: What each architecture does to h_t W^T, as the stock forward does it (checked against modeling_auto's reading).
POST_PROCESSING = {
    "gemma3_text": (("softcap", "final_logit_softcapping"),),
    "cohere": (("multiply", "logit_scale"),),
    "granite": (("divide", "logits_scaling"),),
}
OPEN_HEAD = {"score_mode": "gate", "use_hidden_state": True, "num_attention_heads": 2, "divide_by_vocab": False}


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
    """model_type -> a small random stock model of that architecture, saved (made on first use)."""
    made = {}

    def get(model_type):
        if model_type not in made:
            torch.manual_seed(0)
            config = AutoConfig.for_model(model_type, **ARCHITECTURES[model_type])
            stock = AutoModelForCausalLM.from_config(config)
            path = tmp_path_factory.mktemp(model_type)
            stock.save_pretrained(path)
            made[model_type] = path
        return made[model_type]

    return get


def stock_and_model(base_dirs, model_type, head_config):
    path = base_dirs(model_type)
    stock = AutoModelForCausalLM.from_pretrained(path).eval()
    model = family_for(model_type).from_pretrained(path, head_config=head_config).eval()
    return stock, model


def batch(seed, rows=2, length=9):
    ids = torch.randint(1, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    return ids, mask


def reference_logits(head, logits, hidden, embeddings):
    """Steps 1-7 of BackwardAttentionConfig for one gated layer (latent, sub-heads, W_h), in float64, from the
    stock model's logits l (... x V) and final hidden states h (... x d)."""
    layer, config = head.layers[0], head.config
    eps, E, z, h = config.rms_norm_eps, embeddings.double(), logits.double(), hidden.double()
    E_n = E / torch.sqrt(E.square().mean(-1, keepdim=True) + eps) * layer.norm.weight.double()  # 1
    L = E_n @ layer.w_latent.double()  # 2
    K, Vv = L @ layer.w_key.double(), L @ layer.w_value.double()  # 3
    p = torch.softmax(z / torch.sqrt(z.square().mean(-1, keepdim=True) + eps), dim=-1)  # 4
    u = p @ Vv  # 5 (no division by V)
    q = u @ layer.w_query.double() + h @ layer.w_hidden.double()
    width = config.out_dim // config.num_attention_heads
    s = sum(
        q[..., j * width : (j + 1) * width] @ K[:, j * width : (j + 1) * width].T / math.sqrt(width)
        for j in range(config.num_attention_heads)
    )  # 6
    return z + head.gate[0].double() * s  # 7


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_the_untrained_gated_head_gives_the_stock_logits_exactly(model_type, base_dirs):
    stock, model = stock_and_model(base_dirs, model_type, "hidden")
    assert type(model).__name__.endswith("BackwardAttentionForCausalLM") and type(model) is family_for(model_type)
    assert type(model).logit_steps == POST_PROCESSING.get(model_type, ())
    ids, mask = batch(1)
    with torch.no_grad():
        expected = stock(ids, attention_mask=mask).logits
        assert torch.equal(model(ids, attention_mask=mask).logits, expected)
        # the last position alone: the output layer multiplies a strided slice there, whose kernel may round
        # differently from one call to the next (by an ulp), in the stock model too
        kept = model(ids, logits_to_keep=1).logits
        torch.testing.assert_close(kept, stock(ids, logits_to_keep=1).logits, rtol=0, atol=1e-6)
        raw = stock.lm_head(stock.base_model(ids, attention_mask=mask).last_hidden_state)
    if model_type in POST_PROCESSING:  # the post-processing matters on these logits: the head reproduces it
        assert not torch.allclose(raw, expected, atol=1e-3)
    if model_type == "gemma3_text":
        assert expected.abs().max() < 0.1 < raw.abs().max()  # soft-capped at c = 0.1 (random logits are small)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_a_random_open_head_is_the_reference_on_the_stock_logits(model_type, base_dirs):
    stock, model = stock_and_model(base_dirs, model_type, OPEN_HEAD)
    randomise(model.heads)
    ids, mask = batch(2)
    with torch.no_grad():
        logits = stock(ids, attention_mask=mask).logits
        hidden = stock.base_model(ids, attention_mask=mask).last_hidden_state
        expected = reference_logits(model.heads.default, logits, hidden, stock.get_input_embeddings().weight)
        out = model(ids, attention_mask=mask).logits
        assert not torch.allclose(out, logits, atol=1e-2)  # the head moves the logits
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)
        kept = model(ids, attention_mask=mask, logits_to_keep=2).logits
        torch.testing.assert_close(kept, out[:, -2:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_a_trained_head_round_trips_through_auto_model_for_causal_lm(model_type, base_dirs, tmp_path):
    _, model = stock_and_model(base_dirs, model_type, OPEN_HEAD)
    randomise(model.heads)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model) and reloaded.config.model_type == f"{model_type}_backattn"
    assert AutoConfig.from_pretrained(tmp_path).model_type == f"{model_type}_backattn"
    ids, _ = batch(3)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_greedy_generation_is_the_same_with_and_without_the_kv_cache(model_type, base_dirs):
    _, model = stock_and_model(base_dirs, model_type, OPEN_HEAD)
    randomise(model.heads)
    prompt = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(4))
    options = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    cached = model.generate(prompt, attention_mask=torch.ones_like(prompt), use_cache=True, **options)
    uncached = model.generate(prompt, attention_mask=torch.ones_like(prompt), use_cache=False, **options)
    assert cached.shape == (2, 11) and torch.equal(cached, uncached)
    ids = prompt
    with torch.no_grad():  # greedy follows the head's own argmax, step by step
        for _ in range(6):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, ids)


@pytest.mark.parametrize("model_type", ["gemma3_text", "cohere", "granite", "phi", "qwen2"])
@pytest.mark.parametrize("options", [OPEN_HEAD, dict(OPEN_HEAD, logit_weighting="raw")], ids=["softmax", "raw"])
def test_the_chunked_loss_equals_the_exact_loss_with_post_processed_logits(model_type, options, base_dirs):
    """Soft-capping, scaling and the output layer's bias are applied inside each chunk (3 positions a chunk);
    with raw weighting the W^T Vv shortcut must not be taken for them."""
    _, model = stock_and_model(base_dirs, model_type, options)
    randomise(model.heads)
    model.train()
    ids, mask = batch(5, rows=3, length=8)
    labels = ids.masked_fill(mask == 0, -100)
    results = {}
    for chunk in (3, None):
        model.config.loss_chunk_size = chunk
        model.zero_grad()
        out = model(ids, attention_mask=mask, labels=labels)
        assert (out.logits is None) == (chunk is not None)  # the chunked path was taken
        out.loss.backward()
        results[chunk] = out.loss.detach(), {n: p.grad.clone() for n, p in model.heads.named_parameters()}
    (chunked, chunked_grads), (exact, exact_grads) = results[3], results[None]
    torch.testing.assert_close(chunked, exact, rtol=1e-5, atol=1e-6)
    for name, grad in exact_grads.items():
        assert grad.abs().sum() > 0, name
        # float32 sums in another order (per chunk): a few 1e-6 on gradients of about 1e-2, by CPU (seen on EPYC)
        tolerance = max(1e-6, 1e-4 * grad.abs().max().item())
        torch.testing.assert_close(
            chunked_grads[name], grad, rtol=1e-4, atol=tolerance, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_the_factory_makes_one_class_per_architecture_and_keeps_the_named_ones():
    assert family_for("gpt2") is GPT2BackwardAttentionForCausalLM is family_for("gpt2_backattn")
    assert family_for("llama") is LlamaBackwardAttentionForCausalLM is backward_attention_class("llama_backattn")
    qwen = family_for("qwen2")
    assert qwen is family_for("qwen2_backattn") is FAMILIES["qwen2"] and "qwen2" in FAMILIES
    assert qwen.__name__ == "Qwen2BackwardAttentionForCausalLM" and qwen.config_class.model_type == "qwen2_backattn"
    assert qwen.config_class.__name__ == "Qwen2BackwardAttentionConfig"
    assert AutoConfig.for_model("qwen2_backattn").__class__ is qwen.config_class
    import backattn.modeling_auto as modeling_auto

    assert modeling_auto.Qwen2BackwardAttentionForCausalLM is qwen  # by name, as remote code asks for it
    assert modeling_auto.Gemma3TextBackwardAttentionConfig is family_for("gemma3_text").config_class
    types = list(FAMILIES)  # the types that can carry a head, each one a key that FAMILIES serves
    assert len(FAMILIES) == len(types) > 100 and "qwen3" in types and "bert" not in types


def test_architectures_that_cannot_carry_a_head_are_refused_with_the_reason():
    with pytest.raises(BackattnValueError, match=r"model_type 'bert-like'.*AutoModelForCausalLM knows no"):
        family_for("bert-like")
    with pytest.raises(BackattnValueError, match=r"sub-configs.*text model instead \(model_type 'gemma3_text'\)"):
        family_for("gemma3")  # the multimodal Gemma 3
    with pytest.raises(BackattnValueError, match="makes no logits with self.lm_head"):
        family_for("bert")  # BertLMHeadModel scores through self.cls
    assert "gemma3" not in FAMILIES and "bert" not in FAMILIES and "no-such-model" not in FAMILIES

    class Shifted(LlamaForCausalLM):
        def forward(self, input_ids=None, **kwargs):
            hidden = self.model(input_ids).last_hidden_state
            logits = self.lm_head(hidden)
            logits = logits + 1.0
            return logits

    with pytest.raises(
        BackattnValueError, match=r"post-processes the output layer's logits with `logits = logits \+ 1"
    ):
        logit_steps(Shifted)

    class Scaled(LlamaForCausalLM):
        def forward(self, input_ids=None, **kwargs):
            hidden = self.model(input_ids).last_hidden_state
            logits = self.lm_head(hidden[:, -1:, :] * 2.0)
            return logits

    with pytest.raises(BackattnValueError, match=r"output layer reads `self.lm_head\(hidden\[:, -1:, :\] \* 2.0\)`"):
        logit_steps(Scaled)
    assert logit_steps(GPT2LMHeadModel) == () and logit_steps(LlamaForCausalLM) == ()
    assert logit_steps(OPTForCausalLM) == ()  # `logits = self.lm_head(h).contiguous()`: a layout, not a value
    assert "dbrx" in FAMILIES  # its attn_config / ffn_config sub-configs are parts of one text decoder


def test_a_cast_to_float32_before_soft_capping_is_kept():
    """Beam soft-caps in float32 (`logits.float() / c`): a bf16 base's logits are capped after the same cast."""
    from types import SimpleNamespace

    from transformers.models.beam.modeling_beam import BeamForCausalLM

    assert logit_steps(BeamForCausalLM) == (("float", None), ("softcap", "final_logit_softcapping"))
    family = family_for("beam")
    logits = (torch.randn(2, 5, 11) * 40).to(torch.bfloat16)
    model = SimpleNamespace(logit_steps=family.logit_steps, config=SimpleNamespace(final_logit_softcapping=30.0))
    capped = family.transform_logits(model, logits)
    assert capped.dtype == torch.float32 and torch.equal(capped, torch.tanh(logits.float() / 30.0) * 30.0)


def test_generic_decoder_blocks_feed_query_layers(base_dirs):
    """query_layers reads the blocks the generic search finds (GPT-NeoX's gpt_neox.layers here)."""
    options = {"query_layers": [0, 1], "use_hidden_state": True, "score_mode": "gate"}
    stock, model = stock_and_model(base_dirs, "gpt_neox", options)
    assert model.decoder_layers() is model.gpt_neox.layers
    ids, _ = batch(6)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, stock(ids).logits)  # the gate is closed
        randomise(model.heads)
        moved = model(ids).logits
        with model.capture_block_outputs([0, 1]) as states:
            model.base_model(ids)
        hidden = model.base_model(ids).last_hidden_state
        again = model(ids, base_hidden_states=hidden, base_layer_states=states).logits
    assert not torch.allclose(moved, stock(ids).logits, atol=1e-3) and torch.allclose(again, moved, atol=1e-6)
    with pytest.raises(BackattnValueError, match="query_layers"):
        model.add_head({"query_layers": [0, 2], "use_hidden_state": True}, head_name="deep")


def test_a_made_family_loads_with_trust_remote_code_where_backattn_is_not_installed(base_dirs, tmp_path):
    _, model = stock_and_model(base_dirs, "gemma3_text", OPEN_HEAD)
    randomise(model.heads)
    checkpoint = reload_without_backattn(model, batch(7)[0], tmp_path)
    assert type(model).__name__ == "Gemma3TextBackwardAttentionForCausalLM"
    assert {"modeling_auto.py", "modeling_families.py", "configuration_backattn.py"} <= {
        f.name for f in checkpoint.iterdir()
    }


def test_output_layer_bias_is_applied_and_the_shortcut_refused(base_dirs):
    """Phi's lm_head has a bias: logits are h W^T + b, so the W^T Vv shortcut (u = h W^T Vv) would be wrong."""
    _, model = stock_and_model(base_dirs, "phi", dict(OPEN_HEAD, logit_weighting="raw"))
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.bias is not None
    assert model._output_weight() is None
    gemma = stock_and_model(base_dirs, "gemma3_text", OPEN_HEAD)[1]
    assert gemma._output_weight() is None  # soft-capped: not h W^T either
    gemma.config.final_logit_softcapping = None  # the stock forward skips the step then, and so does the model
    assert gemma._output_weight() is gemma.lm_head.weight
    ids, _ = batch(8)
    with torch.no_grad():
        hidden = model.base_model(ids).last_hidden_state
        torch.testing.assert_close(
            model.base_logits(hidden), F.linear(hidden, model.lm_head.weight, model.lm_head.bias)
        )


def test_a_fresh_process_loads_any_familys_checkpoint_through_the_auto_classes(base_dirs, tmp_path):
    """After ``import backattn`` (nothing else), AutoConfig meets 'qwen3_backattn' and the family is built."""
    _, model = stock_and_model(base_dirs, "qwen3", OPEN_HEAD)
    randomise(model.heads)
    model.save_pretrained(tmp_path / "checkpoint")
    ids, _ = batch(9)
    with torch.no_grad():
        save_file({"ids": ids, "logits": model(ids).logits.contiguous()}, tmp_path / "expected.safetensors")
    script = textwrap.dedent(
        f"""
        import torch, backattn
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "checkpoint")!r}).eval()
        expected = load_file({str(tmp_path / "expected.safetensors")!r})
        with torch.no_grad():
            assert torch.equal(model(expected["ids"]).logits, expected["logits"])
        assert type(model) is backattn.family_for("qwen3"), type(model)
        print("OK", type(model).__module__, type(model).__name__)
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK backattn.modeling_auto Qwen3BackwardAttentionForCausalLM" in result.stdout


@pytest.mark.parametrize("model_type", ["gemma3_text", "phi"])
def test_trls_fused_lm_head_protocol_reads_the_post_processed_logits(model_type, base_dirs):
    """forward(..., fused_lm_head=True) (TRL's trainers) scores through the soft-capped (or biased) logits too."""
    _, model = stock_and_model(base_dirs, model_type, OPEN_HEAD)
    randomise(model.heads)
    ids, mask = batch(10)
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        fused = model(ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    expected = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    keep = fused.label_mask
    torch.testing.assert_close(fused.log_probs[keep], expected[keep], rtol=1e-5, atol=1e-5)
