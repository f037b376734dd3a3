"""Every bad input a clear error: each case asserts the backattn error class and a phrase of its message.

The cases run on the tiny random bases of conftest.py (vocabulary 97, width 24, 64 positions). Each one
raises only because of the check it names: without that check the input would load, run or train silently
(NaN, a loss of 0, letters read as head names) or fail deep inside torch with a message that names nothing.
"""

import json
import math

import pytest
import torch
from conftest import HIDDEN, VOCAB, ids_batch
from transformers import TrainingArguments

import evaluate_math
from backattn import BackwardAttentionConfig, GPT2BackwardAttentionConfig, GPT2BackwardAttentionForCausalLM
from backattn.data.sft_data import PromptTemplate, load_math_dataset, tokenize_examples
from backattn.errors import BackattnTypeError, BackattnValueError, RunDirectoryError
from backattn.head_loss import head_cross_entropy
from backattn.trainer import HeadTrainer

WINDOW = 64  # n_positions of conftest.tiny_gpt2_config
NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def model(gpt2_base_dir):
    """One head, 'math' (the hidden preset), active; the tests below leave its state as they found it."""
    return GPT2BackwardAttentionForCausalLM.from_pretrained(
        gpt2_base_dir, head_config="hidden", head_name="math"
    ).eval()


@pytest.fixture
def fresh(gpt2_base_dir):
    """A model of its own, for the cases that train it, freeze it or damage it."""
    return GPT2BackwardAttentionForCausalLM.from_pretrained(gpt2_base_dir, head_config="hidden", head_name="math")


def ids(rows=2, length=7):
    return ids_batch(rows, length)


# --------------------------------------------------------------------------------------------------------
# configuration: NaN, inf and out-of-range options, wrong types


CONFIG_CASES = {
    "rms_norm_eps-nan": ({"rms_norm_eps": NAN}, r"rms_norm_eps must be a positive number, got nan \(NaN and inf"),
    "rms_norm_eps-inf": ({"rms_norm_eps": INF}, r"rms_norm_eps must be a positive number, got inf \(NaN and inf"),
    "rms_norm_eps-minus-inf": ({"rms_norm_eps": -INF}, r"rms_norm_eps .* got -inf \(NaN and inf are refused\)"),
    "rms_norm_eps-negative": ({"rms_norm_eps": -1e-6}, "rms_norm_eps must be a positive number, got -1e-06"),
    "dropout-nan": ({"dropout": NAN}, r"dropout must be a number in \[0, 1\), got nan \(NaN and inf"),
    "dropout-inf": ({"dropout": INF}, r"dropout must be a number in \[0, 1\), got inf .*the default is 0.0"),
    "dropout-negative": ({"dropout": -0.1}, r"dropout must be a number in \[0, 1\), got -0.1"),
    "dropout-str": ({"dropout": "0.1"}, r"dropout must be a number in \[0, 1\), got '0.1'"),
    "out_dim-bool": ({"out_dim": True}, "out_dim must be a positive integer, got True"),
    "score_mode-unknown": ({"score_mode": "mul"}, "score_mode must be one of 'add', 'gate', 'replace', got 'mul'"),
}


@pytest.mark.parametrize("options, message", CONFIG_CASES.values(), ids=CONFIG_CASES.keys())
def test_bad_head_options(options, message):
    with pytest.raises(BackattnValueError, match=message):
        BackwardAttentionConfig(**options)


MODEL_CONFIG_CASES = {
    "check_finite_inputs-str": ({"check_finite_inputs": "yes"}, "config.check_finite_inputs must be True or False"),
    "loss_chunk_size-zero": ({"loss_chunk_size": 0}, "config.loss_chunk_size must be a positive integer"),
    "heads-list": ({"heads": ["math"]}, "config.heads must map head names to head options, got list"),
    "active_head-unknown": ({"active_head": "math"}, "config.active_head='math' names no head"),
}


@pytest.mark.parametrize("options, message", MODEL_CONFIG_CASES.values(), ids=MODEL_CONFIG_CASES.keys())
def test_bad_model_config_fields(options, message):
    with pytest.raises(BackattnValueError, match=message):
        GPT2BackwardAttentionConfig(**options)


def test_unknown_preset_option_and_head_config_type():
    with pytest.raises(BackattnValueError, match="Unknown head preset 'fast'; choose one of"):
        BackwardAttentionConfig.from_preset("fast")
    with pytest.raises(BackattnValueError, match="Unknown head option.* latent"):
        BackwardAttentionConfig.from_dict({"latent": 4})
    with pytest.raises(BackattnValueError, match="A head config must be a BackwardAttentionConfig.*got int"):
        BackwardAttentionConfig.coerce(3)


# --------------------------------------------------------------------------------------------------------
# forward: input_ids, labels, the context window, cached features, inputs_embeds


def _heads_off(m, call):
    with m.disable_heads():
        return call()


def _long(length):
    return torch.randint(1, VOCAB, (1, length), generator=torch.Generator().manual_seed(5))


FORWARD_CASES = {
    "input_ids-1d": (
        lambda m: m(ids()[0]),
        BackattnValueError,
        r"input_ids must be 2-D \(batch x sequence\), got shape \(7,\)",
    ),
    "input_ids-3d": (lambda m: m(ids()[None]), BackattnValueError, r"got shape \(1, 2, 7\): flatten it"),
    "input_ids-empty": (
        lambda m: m(torch.zeros(2, 0, dtype=torch.long)),
        BackattnValueError,
        r"input_ids is empty \(shape \(2, 0\)\)",
    ),
    "input_ids-float": (
        lambda m: m(ids().float()),
        BackattnTypeError,
        "input_ids must hold integer token ids .*torch.float32",
    ),
    "input_ids-bool": (
        lambda m: m(ids() > 50),
        BackattnTypeError,
        "input_ids must hold integer token ids .*torch.bool",
    ),
    "input_ids-list": (lambda m: m([[1, 2, 3]]), BackattnTypeError, "input_ids must be a torch.LongTensor .*got list"),
    "input_ids-outside-vocabulary": (
        lambda m: m(ids() * 0 + VOCAB),
        BackattnValueError,
        r"token id 97, outside this model's vocabulary \[0, 97\)",
    ),
    "labels-shorter": (
        lambda m: m(ids(), labels=ids()[:, :5]),
        BackattnValueError,
        r"labels has shape \(2, 5\) but the input has shape \(2, 7\)",
    ),
    "labels-longer": (
        lambda m: m(ids(), labels=torch.cat([ids(), ids()], 1)),
        BackattnValueError,
        r"labels has shape \(2, 14\) but the input has shape \(2, 7\)",
    ),
    "labels-above-vocabulary": (
        lambda m: m(ids(), labels=ids().index_fill(1, torch.tensor([3]), VOCAB + 5)),
        BackattnValueError,
        r"labels holds 2 id\(s\) outside \[0, 97\) that are not -100 .*e\.g\. 102",
    ),
    "labels-negative": (
        lambda m: m(ids(), labels=ids().index_fill(1, torch.tensor([2]), -1)),
        BackattnValueError,
        r"labels holds 2 id\(s\) outside \[0, 97\) .*e\.g\. -1",
    ),
    "labels-float": (
        lambda m: m(ids(), labels=ids().float()),
        BackattnTypeError,
        "labels must hold integer token ids .*float32",
    ),
    "labels-all-ignored": (
        lambda m: m(ids(), labels=torch.full_like(ids(), -100)),
        BackattnValueError,
        "No target tokens in this batch",
    ),
    "labels-only-the-first-position": (  # the first label is never a target: the shift drops it
        lambda m: m(ids(), labels=torch.full_like(ids(), -100).index_fill(1, torch.tensor([0]), 3)),
        BackattnValueError,
        "No target tokens in this batch",
    ),
    "shift_labels-shape": (
        lambda m: m(ids(), shift_labels=ids()[:, 1:]),
        BackattnValueError,
        r"shift_labels has shape \(2, 6\)",
    ),
    "sequence-longer-than-window": (
        lambda m: m(_long(WINDOW + 1)),
        BackattnValueError,
        "The input is 65 tokens long, longer than the base model's context window of 64 positions",
    ),
    "position_ids-beyond-window": (
        lambda m: m(ids(1), position_ids=torch.arange(60, 67)[None]),
        BackattnValueError,
        "position_ids reach position 66, beyond the base model's context window of 64",
    ),
    "generate-past-the-window": (
        lambda m: m.generate(_long(WINDOW - 4), max_new_tokens=10, do_sample=False, pad_token_id=0),
        BackattnValueError,
        "beyond the base model's context window of 64 positions.*lower max_new_tokens",
    ),
    "base_hidden_states-sequence": (
        lambda m: m(ids(), base_hidden_states=torch.zeros(2, 6, HIDDEN)),
        BackattnValueError,
        r"base_hidden_states has shape \(2, 6, 24\), but these inputs need \(2, 7, 24\)",
    ),
    "base_hidden_states-width": (
        lambda m: m(ids(), base_hidden_states=torch.zeros(2, 7, HIDDEN + 1)),
        BackattnValueError,
        r"base_hidden_states has shape \(2, 7, 25\)",
    ),
    "base_hidden_states-integer": (
        lambda m: m(ids(), base_hidden_states=torch.zeros(2, 7, HIDDEN, dtype=torch.long)),
        BackattnTypeError,
        "base_hidden_states must be a floating-point tensor",
    ),
    "base_hidden_states-nan": (
        lambda m: m(ids(), base_hidden_states=torch.full((2, 7, HIDDEN), NAN)),
        BackattnValueError,
        "base_hidden_states holds NaN or inf values .*check_finite_inputs = False",
    ),
    "base_hidden_states-inf": (
        lambda m: m(ids(), base_hidden_states=torch.zeros(2, 7, HIDDEN).index_fill(1, torch.tensor([4]), INF)),
        BackattnValueError,
        "base_hidden_states holds NaN or inf values",
    ),
    "inputs_embeds-nan": (
        lambda m: m(inputs_embeds=torch.full((1, 3, HIDDEN), NAN)),
        BackattnValueError,
        "inputs_embeds holds NaN or inf values, and the head would turn them into NaN logits",
    ),
    "inputs_embeds-width": (
        lambda m: m(inputs_embeds=torch.zeros(1, 3, HIDDEN - 1)),
        BackattnValueError,
        r"inputs_embeds must be batch x sequence x 24 .*got shape \(1, 3, 23\)",
    ),
    "rerank_top_k-negative-heads-off": (  # refused even where no head would read it
        lambda m: _heads_off(m, lambda: m(ids(), rerank_top_k=-1)),
        BackattnValueError,
        r"rerank_top_k must be a positive integer \(or 0 / None: off\), got -1",
    ),
    "rerank_top_k-str": (
        lambda m: _heads_off(m, lambda: m(ids(), rerank_top_k="5")),
        BackattnValueError,
        "rerank_top_k must be a positive integer .*got '5'",
    ),
    "inputs_embeds-integer": (
        lambda m: m(inputs_embeds=torch.zeros(1, 3, HIDDEN, dtype=torch.long)),
        BackattnTypeError,
        "inputs_embeds must be a floating-point tensor .*pass token ids as input_ids",
    ),
}


@pytest.mark.parametrize("call, error, message", FORWARD_CASES.values(), ids=FORWARD_CASES.keys())
def test_bad_forward_inputs(model, call, error, message):
    with torch.no_grad(), pytest.raises(error, match=message):
        call(model)


def test_nan_in_the_bases_own_hidden_states_is_named(fresh):
    with torch.no_grad():
        fresh.transformer.ln_f.weight.fill_(NAN)
    with torch.no_grad(), pytest.raises(BackattnValueError, match="the base model's final hidden states hold NaN"):
        fresh.eval()(ids())


def test_the_finite_check_turns_off_and_stays_off_for_the_bare_base(model):
    nan_states = torch.full((2, 7, HIDDEN), NAN)
    model.config.check_finite_inputs = False
    try:
        with torch.no_grad():
            assert torch.isnan(model(ids(), base_hidden_states=nan_states).logits).all()
    finally:
        model.config.check_finite_inputs = True
    with torch.no_grad(), model.disable_heads():  # no head reads them: the base's own logits, NaN and all
        assert torch.isnan(model(ids(), base_hidden_states=nan_states).logits).all()


# --------------------------------------------------------------------------------------------------------
# heads= routing


ROUTING_CASES = {
    "name-not-loaded-as-str": (lambda m: m(ids(), heads="chat"), BackattnValueError, "heads= names 'chat', which"),
    "name-not-loaded-in-list": (
        lambda m: m(ids(), heads=["math", "chat"]),
        BackattnValueError,
        "heads= names 'chat', which is not loaded",
    ),
    "an-int": (lambda m: m(ids(), heads=3), BackattnTypeError, "heads= must be one head name, a list .*got int 3"),
    "a-dict": (lambda m: m(ids(), heads={"math": 1}), BackattnTypeError, "heads= must be one head name.*got dict"),
    "int-entries": (
        lambda m: m(ids(), heads=[0, 1]),
        BackattnTypeError,
        "heads= entries must be head names .*got int 0",
    ),
    "float-tensor": (
        lambda m: m(ids(), heads=torch.zeros(2)),
        BackattnTypeError,
        "heads= as a tensor must hold integer head indices",
    ),
    "index-out-of-range": (
        lambda m: m(ids(), heads=torch.tensor([0, 5])),
        BackattnValueError,
        r"1-D head indices in \[-1, 1\)",
    ),
    "one-entry-short": (
        lambda m: m(ids(3), heads=["math", None]),
        BackattnValueError,
        "one entry per batch row: got 2",
    ),
    "generate-name-not-loaded": (
        lambda m: m.generate(ids(), heads="chat", max_new_tokens=2),
        BackattnValueError,
        "heads= names 'chat'",
    ),
}


@pytest.mark.parametrize("call, error, message", ROUTING_CASES.values(), ids=ROUTING_CASES.keys())
def test_bad_heads_routing(model, call, error, message):
    with torch.no_grad(), pytest.raises(error, match=message):
        call(model)


DISABLED_CASES = {
    "forward": (lambda m: m(ids(), heads=["math", None]), r"heads=\['math', None\] was given"),
    "forward-tensor": (lambda m: m(ids(), heads=torch.tensor([0, -1])), "heads=a tensor of 2 head indices was given"),
    "forward-one-name": (lambda m: m(ids(), heads="math"), "heads='math' was given"),
    # refused by generate itself, before any step (the steps would see the routed tensor, as "forward-tensor")
    "generate": (
        lambda m: m.generate(ids(), heads=["math", None], max_new_tokens=2, do_sample=False, pad_token_id=0),
        r"heads=\['math', None\] was given",
    ),
}


@pytest.mark.parametrize("call, given", DISABLED_CASES.values(), ids=DISABLED_CASES.keys())
def test_heads_while_heads_are_disabled_is_refused(model, call, given):
    with torch.no_grad(), model.disable_heads():
        with pytest.raises(BackattnValueError, match=given + r" while heads are disabled .*model.enable_heads\(\)"):
            call(model)


def test_one_head_name_serves_every_row(model):
    """``heads="math"`` is one name (not the letters m, a, t, h): every row gets the math head."""
    batch = ids(3)
    with torch.no_grad():
        expected = model(batch).logits
        assert torch.allclose(model(batch, heads="math").logits, expected, atol=1e-5)
        options = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, num_beams=2)
        assert torch.equal(model.generate(batch, heads="math", **options), model.generate(batch, **options))


# --------------------------------------------------------------------------------------------------------
# training when nothing trainable produces the loss; the loss with no target token


def _no_active_head(m):
    m.config.active_head = None


def _frozen(m):
    m.heads["math"].requires_grad_(False)


TRAINING_CASES = {
    "heads-disabled": (lambda m: m.disable_heads(), {}, "heads are disabled .*call model.enable_heads"),
    "no-head": (lambda m: m.delete_head("math"), {}, "the model carries no head.*model.add_head"),
    "no-active-head": (_no_active_head, {}, r"no head is active .*model.set_head\(name\) with one of \['math'\]"),
    "head-frozen": (_frozen, {}, r"head\(s\) \['math'\] have no parameter that requires grad .*requires_grad_\(True\)"),
    "every-row-to-the-base": (lambda m: None, {"heads": [None, None]}, r"heads= sends every row to the base \(None\)"),
}


@pytest.mark.parametrize("damage, options, message", TRAINING_CASES.values(), ids=TRAINING_CASES.keys())
def test_training_with_nothing_trainable_is_refused_at_forward(fresh, damage, options, message):
    damage(fresh)
    fresh.train()
    with pytest.raises(BackattnValueError, match="nothing trainable produces the loss: " + message):
        fresh(ids(), labels=ids(), **options)


@pytest.mark.parametrize("damage", [lambda m: m.disable_heads(), lambda m: m.delete_head("math")], ids=["off", "none"])
def test_head_trainer_refuses_to_start_without_a_head_to_train(fresh, damage, tmp_path):
    damage(fresh)
    rows = [{"input_ids": ids(1)[0], "labels": ids(1)[0]} for _ in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to="none", use_cpu=True, disable_tqdm=True)
    trainer = HeadTrainer(model=fresh, args=args, train_dataset=rows)
    with pytest.raises(BackattnValueError, match="HeadTrainer has no head to train: "):
        trainer.train()
    assert trainer.state.global_step == 0


@pytest.mark.parametrize("num_items", [None, 0, torch.tensor(0)], ids=["none", "zero", "zero-tensor"])
def test_the_chunked_loss_refuses_a_batch_without_targets(fresh, num_items):
    head, hidden = fresh.heads["math"], torch.randn(2, 7, HIDDEN)
    weight = fresh.lm_head.weight
    with pytest.raises(BackattnValueError, match="No target tokens in this batch: every label the loss reads is -100"):
        head_cross_entropy(head, hidden, torch.full((2, 7), -100), weight, weight, 4, num_items)


# --------------------------------------------------------------------------------------------------------
# a checkpoint whose head holds NaN or inf


@pytest.mark.parametrize(
    "tensor, value",
    [("layers.0.w_key", NAN), ("gate", INF), ("layers.0.norm.weight", -INF)],
    ids=["nan", "inf", "-inf"],
)
def test_from_pretrained_refuses_a_head_with_nan_or_inf(fresh, tmp_path, tensor, value):
    with torch.no_grad():
        fresh.heads["math"].get_parameter(tensor).view(-1)[0] = value
    fresh.save_pretrained(tmp_path)
    message = rf"Head tensor 'heads\.math\.{tensor}' loaded from {tmp_path} \(.*model\.safetensors\) holds NaN or inf"
    with pytest.raises(BackattnValueError, match=message):
        GPT2BackwardAttentionForCausalLM.from_pretrained(tmp_path)


# --------------------------------------------------------------------------------------------------------
# data files


ROW = json.dumps({"problem": "1 + 1?", "generated_solution": "1 + 1 = 2.", "expected_answer": "2"})

DATA_CASES = {
    "empty-jsonl": ("data.jsonl", b"", "data.jsonl is empty: a math data set needs rows"),
    "blank-lines-jsonl": ("data.jsonl", b"\n  \n\n", "data.jsonl is empty"),
    "empty-json": ("data.json", b"", "data.json is empty"),
    "empty-csv": ("data.csv", b"", "data.csv is empty"),
    "empty-parquet": ("data.parquet", b"", "data.parquet is empty"),
    "not-utf8": (
        "data.jsonl",
        (ROW + "\n" + ROW + "\n").encode() + b'{"problem": "caf\xe9"}\n',
        r"data.jsonl, line 3: not UTF-8 text .*Save the file as UTF-8",
    ),
    "not-utf8-csv": (
        "data.csv",
        b"problem,generated_solution,expected_answer\n\xff\xfe,a,1\n",
        "data.csv, line 2: not",
    ),
    "bad-json-line": ("data.jsonl", (ROW + "\n{oops\n").encode(), "data.jsonl, line 2: not valid JSON"),
    "json-line-not-an-object": ("data.jsonl", (ROW + "\n[1, 2]\n").encode(), "line 2: a JSON list, not an object"),
    "bad-json-file": ("data.json", b'[\n{"problem": 1},\n{oops}\n]', "data.json, line 3: not valid JSON"),
    "no-rows-json": ("data.json", b"[]", "data.json holds no rows"),
    "no-rows-csv": ("data.csv", b"problem,generated_solution,expected_answer\n", "data.csv holds no rows"),
    "garbage-parquet": ("data.parquet", b"not a parquet file", "data.parquet could not be read as parquet"),
}


@pytest.mark.parametrize("name, content, message", DATA_CASES.values(), ids=DATA_CASES.keys())
def test_bad_data_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(BackattnValueError, match=message):
        load_math_dataset(str(path))


@pytest.mark.parametrize("max_samples", [0, -1, 2.5], ids=["zero", "negative", "float"])
def test_bad_max_samples(math_jsonl, max_samples):
    with pytest.raises(BackattnValueError, match=rf"max_samples must be a positive integer .*got {max_samples}"):
        load_math_dataset(str(math_jsonl), max_samples=max_samples)


def test_bad_tokenize_arguments_and_templates(math_jsonl, gpt2_tokenizer):
    rows = load_math_dataset(str(math_jsonl), max_samples=2)
    with pytest.raises(BackattnValueError, match="max_length must be a positive integer .*got 0"):
        tokenize_examples(rows, gpt2_tokenizer, PromptTemplate(), 0)
    with pytest.raises(BackattnValueError, match=r"keep_columns names \['template_id'\], which the data set lacks"):
        tokenize_examples(rows, gpt2_tokenizer, PromptTemplate(), 64, keep_columns=("template_id",))
    with pytest.raises(BackattnTypeError, match="The prompt template must be a str .*got int 3"):
        PromptTemplate(prompt=3)
    with pytest.raises(BackattnValueError, match=r"The target template uses \['answer'\]"):
        PromptTemplate(target="{answer}")


# --------------------------------------------------------------------------------------------------------
# evaluate_math.py: refused before any data set or model is loaded


@pytest.fixture
def nothing_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("evaluate_math loaded data or a model before checking its arguments")

    for name in ("load_model", "load_math_dataset", "sft_tokenizer", "set_seed"):
        monkeypatch.setattr(evaluate_math, name, refuse)


EVALUATE_CASES = {
    "max_new_tokens-negative": (["--max_new_tokens", "-1"], "--max_new_tokens must be a positive integer, got -1"),
    "max_new_tokens-zero": (["--max_new_tokens", "0"], "--max_new_tokens must be a positive integer, got 0"),
    "batch_size-zero": (["--batch_size", "0"], "--batch_size must be a positive integer, got 0; the default is 8"),
    "max_length-zero": (["--max_length", "0"], "--max_length must be a positive integer, got 0"),
    "max_samples-zero": (["--max_samples", "0"], r"--max_samples must be a positive integer \(or None"),
    "num_generation_examples-negative": (
        ["--num_generation_examples", "-1"],
        "--num_generation_examples must be a non",
    ),
    "gsm_variants-zero": (["--gsm_variants_per_template", "0"], "--gsm_variants_per_template must be a positive"),
    "temperature-zero": (["--temperature", "0"], "--temperature must be a finite positive number, got 0.0"),
    "temperature-nan": (["--temperature", "nan"], "--temperature must be a finite positive number, got nan"),
    "temperature-inf": (["--temperature", "inf"], "--temperature must be a finite positive number, got inf"),
    "top_k-negative": (["--top_k", "-1"], r"--top_k must be a non-negative integer \(0: no top-k filter\), got -1"),
    "rerank_top_k-negative": (
        ["--rerank_top_k", "-2"],
        r"--rerank_top_k must be a positive integer \(0: off\), got -2",
    ),
}


@pytest.mark.parametrize("argv, message", EVALUATE_CASES.values(), ids=EVALUATE_CASES.keys())
def test_bad_evaluate_math_arguments(nothing_loads, argv, message):
    with pytest.raises(BackattnValueError, match=message):
        evaluate_math.main(argv)


ARGUMENT_FILE_CASES = {
    "yaml-syntax": (
        "args.yaml",
        "max_new_tokens: [1,\n  batch_size: 3\n",
        BackattnValueError,
        "line 3: not valid YAML",
    ),
    "yaml-tab": (
        "args.yml",
        "batch_size: 3\n\tmax_length: 4\n",
        BackattnValueError,
        "args.yml, line 2: not valid YAML",
    ),
    "yaml-list": ("args.yaml", "- batch_size\n", BackattnValueError, "must hold a mapping of argument names to values"),
    "yaml-empty": ("args.yaml", "", BackattnValueError, "args.yaml is empty"),
    "yaml-unknown-key": ("args.yaml", "batchsize: 3\n", BackattnValueError, "names unknown argument.*batchsize"),
    "yaml-wrong-type": (
        "args.yaml",
        "batch_size: many\n",
        BackattnTypeError,
        "--batch_size must be an integer, got str",
    ),
    "yaml-bool-for-int": ("args.yaml", "max_length: true\n", BackattnTypeError, "--max_length must be an integer, got"),
    "yaml-out-of-range": ("args.yaml", "temperature: -.inf\n", BackattnValueError, "--temperature must be a finite"),
    "json-syntax": ("args.json", '{"batch_size": 3,}', BackattnValueError, "args.json, line 1: not valid JSON"),
}


@pytest.mark.parametrize("name, text, error, message", ARGUMENT_FILE_CASES.values(), ids=ARGUMENT_FILE_CASES.keys())
def test_bad_evaluate_math_argument_files(nothing_loads, tmp_path, name, text, error, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(error, match=message):
        evaluate_math.main([str(path)])


def test_a_good_argument_file_parses(tmp_path):
    path = tmp_path / "args.yaml"
    path.write_text("batch_size: 3\ntemperature: 0.5\nrerank_top_k: 0\n")
    args = evaluate_math.parse_arguments([str(path)])
    assert (args.batch_size, args.temperature, args.rerank_top_k) == (3, 0.5, 0)
    assert math.isfinite(args.temperature)


def test_evaluate_math_refuses_an_output_dir_that_is_a_file(nothing_loads, tmp_path):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(RunDirectoryError, match="is a file; give a directory"):
        evaluate_math.main(["--output_dir", str(tmp_path / "taken")])


def test_evaluate_math_checks_the_context_window_before_building_data(nothing_loads, tiny_gpt2_dir, tmp_path):
    argv = ["--model_name_or_path", str(tiny_gpt2_dir), "--max_length", "100", "--max_new_tokens", "29",
            "--output_dir", str(tmp_path / "out")]  # fmt: skip
    with pytest.raises(BackattnValueError, match="exceeds the base's context window of 128 tokens"):
        evaluate_math.main(argv)
