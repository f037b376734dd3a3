"""bfloat16 and float16 bases, autocast and GradScaler: the head's softmax, norms and loss accumulate in float32.

On a half-precision base the head's weights are float32 (``build_head``), so the head computes in float32 from the
base's half-precision logits and states. CPU tests run everywhere (float16 where this CPU runs half-precision
matmuls). Tests marked ``cuda`` need a CUDA device and are skipped without one. Tolerances are stated where a test
uses one: a bfloat16 result carries 8 significant bits (relative rounding 2^-8 = 0.4 %), a float16 one 11 (0.05 %).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import randomise
from transformers import LlamaConfig, LlamaForCausalLM

from backattn import LlamaBackwardAttentionForCausalLM
from backattn.head_kernels import _TABLES_CACHE, weight_tables

#: A vocabulary large enough that a softmax normaliser or a norm summed in bfloat16 would be far off (4096 terms
#: of about 2^-12 each stop growing a bfloat16 sum near 2^-4), small enough to be quick.
VOCAB, HIDDEN = 4096, 16
OPEN_HEAD = {"score_mode": "gate", "use_hidden_state": True, "num_attention_heads": 2, "divide_by_vocab": False}


def half_matmul_works(dtype) -> bool:
    try:
        torch.ones(2, 2, dtype=dtype) @ torch.ones(2, 2, dtype=dtype)
        F.softmax(torch.ones(2, dtype=dtype), -1)
    except RuntimeError:
        return False
    return True


CPU_DTYPES = [
    torch.bfloat16,
    pytest.param(
        torch.float16,
        marks=pytest.mark.skipif(not half_matmul_works(torch.float16), reason="no float16 matmul on this CPU"),
    ),
]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        tie_word_embeddings=True,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("llama-4k")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def tokens(seed, rows=2, length=12):
    ids = torch.randint(1, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:, :4] = -100
    return ids, labels


def reference_logits(head, logits, hidden, embeddings):
    """Steps 1-7 of BackwardAttentionConfig for one gated layer, in float64 (the weights as stored, upcast)."""
    layer, config = head.layers[0], head.config
    eps, E, z, h = config.rms_norm_eps, embeddings.double(), logits.double(), hidden.double()
    E_n = E / torch.sqrt(E.square().mean(-1, keepdim=True) + eps) * layer.norm.weight.double()
    L = E_n @ layer.w_latent.double()
    K, Vv = L @ layer.w_key.double(), L @ layer.w_value.double()
    p = torch.softmax(z / torch.sqrt(z.square().mean(-1, keepdim=True) + eps), dim=-1)
    q = (p @ Vv) @ layer.w_query.double() + h @ layer.w_hidden.double()
    width = config.out_dim // config.num_attention_heads
    s = sum(
        q[..., j * width : (j + 1) * width] @ K[:, j * width : (j + 1) * width].T / math.sqrt(width)
        for j in range(config.num_attention_heads)
    )
    return z + head.gate[0].double() * s


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_a_half_precision_base_serves_the_head_forward_and_generate(dtype, base_dir):
    stock = LlamaForCausalLM.from_pretrained(base_dir, dtype=dtype).eval()
    model = LlamaBackwardAttentionForCausalLM.from_pretrained(base_dir, head_config=OPEN_HEAD, dtype=dtype).eval()
    assert model.lm_head.weight.dtype == dtype and model.heads.default.gate.dtype == torch.float32
    ids, _ = tokens(1)
    with torch.no_grad():
        expected = stock(ids).logits
        closed = model(ids).logits
        assert closed.dtype == torch.float32 and torch.equal(closed, expected.float())  # the stock logits exactly
        randomise(model.heads)
        with torch.no_grad():
            model.heads.default.gate.fill_(1.0)
        out = model(ids).logits
        hidden = stock.base_model(ids).last_hidden_state
        reference = reference_logits(model.heads.default, expected, hidden, stock.get_input_embeddings().weight)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    # the head's scores move the logits by a lot, and from the same half-precision logits and states the head
    # gives the float64 reference to float32 rounding (1e-5 of the scale), where computing in `dtype` would be
    # off by its rounding at least (2^-8 for bfloat16), and a softmax normaliser summed in it by a factor
    scale = reference.abs().max()
    assert (reference - expected.double()).abs().max() > 0.5 * scale
    assert (out.double() - reference).abs().max() < 1e-5 * scale
    prompt = ids[:, :5]
    options = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False, pad_token_id=0)
    generated = model.generate(prompt, eos_token_id=None, **options)
    assert generated.shape == (2, 9) and generated.max() < VOCAB
    with torch.no_grad():
        first = model(prompt).logits[:, -1].argmax(-1)
    assert torch.equal(generated[:, 5], first)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_a_half_precision_base_trains_the_head_with_a_float32_loss(dtype, base_dir):
    model = LlamaBackwardAttentionForCausalLM.from_pretrained(base_dir, head_config=OPEN_HEAD, dtype=dtype).train()
    randomise(model.heads)
    ids, labels = tokens(2)
    results = {}
    for chunk in (5, None):  # the chunked loss and the exact one
        model.config.loss_chunk_size = chunk
        model.zero_grad()
        loss = model(ids, labels=labels).loss
        loss.backward()
        results[chunk] = loss.detach(), model.heads.default.layers[0].w_key.grad.float().clone()
    (chunked, chunked_grad), (exact, exact_grad) = results[5], results[None]
    assert chunked.dtype == exact.dtype == torch.float32
    # both read the same half-precision logits; the head's logits round differently on the two paths
    assert abs(chunked.item() - exact.item()) < 0.02 * exact.item()
    assert torch.isfinite(chunked_grad).all() and (chunked_grad - exact_grad).norm() < 0.1 * exact_grad.norm()
    model.config.loss_chunk_size = 256
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        optimiser.zero_grad()
        loss = model(ids, labels=labels).loss
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    assert {p.dtype for n, p in model.named_parameters() if not n.startswith("heads.")} == {dtype}
    assert {p.dtype for p in model.heads.parameters()} == {torch.float32}


def test_the_tables_cache_follows_the_dtype_and_device_of_the_base(base_dir):
    model = LlamaBackwardAttentionForCausalLM.from_pretrained(base_dir, head_config=OPEN_HEAD).eval()
    randomise(model.heads)
    ids, _ = tokens(3)
    head = model.heads.default
    with torch.no_grad():
        full = model(ids).logits
        assert _TABLES_CACHE[head][1][0].keys.dtype == torch.float32
        model.to(torch.bfloat16)  # the heads too
        half = model(ids).logits
        cached = _TABLES_CACHE[head][1][0].keys
        assert cached.dtype == torch.bfloat16
        fresh = weight_tables(head, model.get_input_embeddings().weight)  # computed now (and the cache dropped)
        assert torch.equal(cached, fresh[0].keys)
        model.to(torch.float32)  # (the base's weights keep their bfloat16 rounding)
        again = model(ids).logits
        assert _TABLES_CACHE[head][1][0].keys.dtype == torch.float32  # not the bfloat16 tables of before
        _TABLES_CACHE.pop(head)
        assert torch.equal(model(ids).logits, again)  # the same as from tables computed afresh
    assert half.dtype == torch.bfloat16 and (half.float() - full).abs().max() < 0.05 * full.abs().max()


def test_device_map_auto_loads_base_and_heads(base_dir, tmp_path):
    """``device_map="auto"`` (accelerate's placement; every module on the CPU here, on the GPUs where there are):
    a saved model with a head loads so, and gives the logits it gave before saving."""
    model = LlamaBackwardAttentionForCausalLM.from_pretrained(base_dir, head_config=OPEN_HEAD).eval()
    randomise(model.heads)
    model.save_pretrained(tmp_path)
    placed = LlamaBackwardAttentionForCausalLM.from_pretrained(tmp_path, device_map="auto").eval()
    assert {p.device for p in placed.heads.parameters()} == {placed.lm_head.weight.device}
    ids, _ = tokens(7)
    with torch.no_grad():
        assert torch.equal(placed(ids.to(placed.device)).logits.cpu(), model(ids).logits)


def chunked_and_exact(model, ids, labels, autocast_device, dtype, scaler=None):
    """Loss and the head's gradients (unscaled) of the chunked and the exact loss under autocast."""
    results = {}
    for chunk in (5, None):
        model.config.loss_chunk_size = chunk
        model.zero_grad()
        with torch.autocast(autocast_device, dtype=dtype):
            out = model(ids, labels=labels)
        assert (out.logits is None) == (chunk is not None)
        (scaler.scale(out.loss) if scaler is not None else out.loss).backward()
        scale = scaler.get_scale() if scaler is not None else 1.0
        grads = {n: p.grad.float() / scale for n, p in model.heads.named_parameters()}
        results[chunk] = out.loss.detach().float(), grads
    return results[5], results[None]


def assert_close_paths(chunked, exact, tolerance):
    (loss_c, grads_c), (loss_e, grads_e) = chunked, exact
    assert abs(loss_c.item() - loss_e.item()) <= tolerance * abs(loss_e.item())
    for name, grad in grads_e.items():
        assert torch.isfinite(grads_c[name]).all(), name
        assert (grads_c[name] - grad).norm() <= tolerance * grad.norm() + 1e-6, name


def test_the_chunked_loss_under_cpu_autocast_equals_the_exact_loss(base_dir):
    """bfloat16 autocast on CPU: loss within 1 %, each gradient within 5 % (relative norm) of the exact path's."""
    model = LlamaBackwardAttentionForCausalLM.from_pretrained(base_dir, head_config=OPEN_HEAD).train()
    randomise(model.heads)
    ids, labels = tokens(4)
    chunked, exact = chunked_and_exact(model, ids, labels, "cpu", torch.bfloat16)
    assert_close_paths(chunked, exact, 0.05)
    assert abs(chunked[0].item() - exact[0].item()) <= 0.01 * exact[0].item()


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_chunked_loss_under_cuda_autocast_equals_the_exact_loss(dtype, base_dir):
    """CUDA autocast (float16 with a GradScaler): loss within 1 %, gradients within 5 % of the exact path's."""
    model = LlamaBackwardAttentionForCausalLM.from_pretrained(base_dir, head_config=OPEN_HEAD).cuda().train()
    randomise(model.heads)
    ids, labels = (t.cuda() for t in tokens(5))
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    chunked, exact = chunked_and_exact(model, ids, labels, "cuda", dtype, scaler)
    assert_close_paths(chunked, exact, 0.05)
    assert abs(chunked[0].item() - exact[0].item()) <= 0.01 * exact[0].item()
    if scaler is not None:  # a scaled step runs: no inf/NaN in the head's gradients
        optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        scaler.step(optimiser)
        scaler.update()
        assert scaler.get_scale() > 0 and all(torch.isfinite(p).all() for p in model.heads.parameters())


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_base_on_cuda_forward_generate_and_tables_cache(dtype, base_dir):
    model = LlamaBackwardAttentionForCausalLM.from_pretrained(base_dir, head_config=OPEN_HEAD, dtype=dtype).eval()
    stock = LlamaForCausalLM.from_pretrained(base_dir, dtype=dtype).cuda().eval()
    model.cuda()
    ids = tokens(6)[0].cuda()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, stock(ids).logits.float())  # float32 heads, the stock values
        randomise(model.heads)  # copies CPU draws into the CUDA parameters
        model.heads.default.gate.fill_(1.0)
        out = model(ids).logits
        keys = _TABLES_CACHE[model.heads.default][1][0].keys
        assert keys.device.type == "cuda" and keys.dtype == torch.float32
        model.cpu()
        on_cpu = model(ids.cpu()).logits
        assert _TABLES_CACHE[model.heads.default][1][0].keys.device.type == "cpu"
    assert (out.cpu().float() - on_cpu.float()).abs().max() < 0.02 * on_cpu.float().abs().max()
    model.cuda()
    generated = model.generate(ids[:, :4], max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert generated.shape == (2, 8)
