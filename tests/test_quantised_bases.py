"""Quantised bases (issue 17, item 4): a head trains the same way on a base loaded from a GGUF file (without
converting it first) and on a bitsandbytes 8-bit or 4-bit base (where bitsandbytes is installed; it runs on CPU
since 0.46), since the base is frozen: only the head's parameters change, and a saved head reloads exactly."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from backattn import family_for

gguf = pytest.importorskip("gguf")

VOCAB = 96  # small, and row lengths that are multiples of 32, as GGUF's Q8_0 blocks need


def tiny_llama(seed=0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def write_gguf(model: LlamaForCausalLM, path, quantization) -> None:
    """``model`` as a llama.cpp-style GGUF file: its metadata, and its tensors under GGUF names, the query and key
    rows permuted as llama.cpp's converter does (Transformers undoes it on load); 2-D tensors in ``quantization``."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(config.vocab_size)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight":  # tied: no output.weight, so the loader ties it again
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        data = tensor.float().numpy()
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config.num_attention_heads if "attn_q" in name else config.num_key_value_heads
            data = data.reshape(heads, 2, data.shape[0] // heads // 2, data.shape[1]).swapaxes(1, 2).reshape(data.shape)
        if data.ndim == 2 and quantization != gguf.GGMLQuantizationType.F32:
            packed = gguf.quants.quantize(data, quantization)
            writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=quantization)
        else:
            writer.add_tensor(name, np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def train_a_few_steps(model, steps=8, seed=0) -> list[float]:
    """Head-only training on random ids; returns the losses."""
    ids = torch.randint(1, VOCAB, (4, 12), generator=torch.Generator().manual_seed(seed))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(trainable, lr=3e-2)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
        losses.append(loss.item())
    return losses


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal as multisets of values: bitsandbytes' CPU backend re-lays out a 4-bit weight's absmax blocks between
    inference and training forwards (its CPU kernel wants another order), which is no update."""
    return a.numel() == b.numel() and torch.equal(a.flatten().sort().values, b.flatten().sort().values)


def tensors(model):
    """Every parameter and buffer of ``model`` (a 4-bit weight as its packed bytes), by name."""
    yield from model.named_parameters()
    yield from model.named_buffers()


def check_head_only_training(model, load, tmp_path):
    """Train; only head parameters may change (the base's packed quantised weights compared too); the saved head
    on a fresh base of the same kind reproduces the trained model's logits exactly."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("heads.") for name in trainable)
    # Parameters and buffers, not state_dict(): bitsandbytes' CPU 4-bit layers re-lay out their weights when
    # saving them, and the next forward then differs (by up to 0.05 here) from a fresh model's.
    before = {name: tensor.detach().clone() for name, tensor in tensors(model)}
    losses = train_a_few_steps(model)
    assert losses[-1] < losses[0]
    after = dict(tensors(model))
    assert after.keys() == before.keys()
    changed = {name for name in before if not same_values(before[name], after[name])}
    assert changed == trainable
    model.eval().save_head(tmp_path / "head")
    fresh = load(head=False).eval()
    fresh.load_head(tmp_path / "head")
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        # bitsandbytes' CPU 4-bit backend repacks a weight for its inference kernel during the first no-grad
        # forward, and that forward's logits differ from later ones (by 1e-2 here): settle both models first.
        fresh(ids), model(ids)
        assert torch.equal(fresh(ids).logits, model(ids).logits)


@pytest.mark.parametrize("quantization", ["F32", "Q8_0"])
def test_a_head_trains_on_a_base_loaded_from_a_gguf_file(tmp_path, quantization):
    source = tiny_llama()
    kind = getattr(gguf.GGMLQuantizationType, quantization)
    write_gguf(source, tmp_path / f"tiny-{quantization}.gguf", kind)
    family = family_for("llama")

    def load(head=True):
        options = {"head_config": "hidden"} if head else {}
        return family.from_pretrained(tmp_path, gguf_file=f"tiny-{quantization}.gguf", **options)

    model = load().eval()
    stock = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=f"tiny-{quantization}.gguf").eval()
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, stock(ids).logits)  # the untrained gated head: the GGUF base exactly
        if quantization == "F32":  # the file holds the source weights: GGUF names and permutations are right
            assert torch.equal(stock(ids).logits, source(ids).logits)
        else:  # Q8_0 rounds the weights a little
            assert 0 < (stock(ids).logits - source(ids).logits).abs().max() < 0.05
    check_head_only_training(model, load, tmp_path)


@pytest.mark.parametrize("bits", [8, 4])
def test_a_head_trains_on_a_bitsandbytes_base(tmp_path, bits):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    tiny_llama().save_pretrained(tmp_path / "base")
    if bits == 8:
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    else:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
    family = family_for("llama")

    def load(head=True):
        options = {"head_config": "hidden"} if head else {}
        return family.from_pretrained(tmp_path / "base", quantization_config=quantization, device_map="cpu", **options)

    model = load().eval()
    quantised = type(model.model.layers[0].self_attn.q_proj).__name__
    assert quantised == ("Linear8bitLt" if bits == 8 else "Linear4bit")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quantization, device_map="cpu")
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, stock.eval()(ids).logits)  # the untrained gated head: the base exactly
    check_head_only_training(model, load, tmp_path)
