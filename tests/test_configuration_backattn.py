import dataclasses
import json
import typing

import pytest
from transformers import GPT2Config, LlamaConfig

from backattn import (
    DEFAULT_PRESET,
    PRESETS,
    BackwardAttentionConfig,
    GPT2BackwardAttentionConfig,
    LlamaBackwardAttentionConfig,
)
from backattn.configuration_backattn import RENAMED_OPTIONS, BackwardAttentionModelFields


def test_defaults_are_the_seed_preset():
    seed = BackwardAttentionConfig.from_preset("seed")
    assert seed == BackwardAttentionConfig()
    assert (seed.latent_dim, seed.out_dim, seed.num_attention_heads) == (28, 30, 1)
    assert (seed.score_mode, seed.logit_weighting, seed.divide_by_vocab) == ("add", "softmax", True)


def test_presets_and_overrides():
    assert set(PRESETS) >= {"seed", "gated", "hidden"}
    hidden = BackwardAttentionConfig.from_preset("hidden", out_dim=64, latent_dim=None)
    assert hidden.use_hidden_state and hidden.score_mode == "gate" and not hidden.divide_by_vocab
    assert (hidden.out_dim, hidden.latent_dim) == (64, None)
    with pytest.raises(ValueError, match="Unknown head preset 'nope'"):
        BackwardAttentionConfig.from_preset("nope")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"out_dim": 30, "num_attention_heads": 4}, "num_attention_heads=4 does not divide out_dim=30"),
        ({"out_dim": 0}, "out_dim must be a positive integer"),
        ({"num_attention_heads": -1}, "num_attention_heads must be a positive integer"),
        ({"num_layers": 0}, "num_layers must be a positive integer"),
        ({"latent_dim": 0}, r"latent_dim must be a positive integer \(or None"),
        ({"vocab_chunk_size": -5}, "vocab_chunk_size must be a positive integer"),
        ({"out_dim": 2.5}, "out_dim must be a positive integer"),
        ({"score_mode": "multiply"}, "score_mode must be one of 'add', 'gate', 'replace', got 'multiply'"),
        ({"logit_weighting": "linear"}, "logit_weighting must be one of 'softmax', 'raw'"),
        ({"attention_head_combine": "max"}, "attention_head_combine must be one of 'sum', 'mix'"),
        ({"layer_mode": "stacked"}, "layer_mode must be one of 'parallel', 'sequential'"),
        ({"dropout": 1.0}, r"dropout must be a number in \[0, 1\)"),
        ({"base_kl_weight": -0.1}, "base_kl_weight must be a finite number >= 0, got -0.1"),
        ({"base_kl_weight": float("nan")}, "base_kl_weight must be a finite number >= 0, got nan"),
        ({"divide_by_vocab": "yes"}, "divide_by_vocab must be True or False"),
        ({"rms_norm_eps": 0}, "rms_norm_eps must be a positive number"),
        ({"score_maps": "triple"}, "score_maps must be one of 'single', 'differential', got 'triple'"),
        ({"copy_attention": 1}, "copy_attention must be True or False"),
        ({"label_word_ids": [4]}, "label_word_ids must be None or a list of at least two token ids"),
        ({"label_word_ids": "4 5"}, "label_word_ids must be None or a list of at least two token ids"),
        ({"label_word_ids": [4, -5]}, r"label_word_ids must hold token ids \(integers from 0\)"),
        ({"label_word_ids": [4, 4]}, "label_word_ids must name each token once"),
        ({"label_word_ids": [4, 99], "vocab_size": 99}, "label_word_ids holds 99, outside the vocabulary of 99"),
        ({"query_layers": [], "use_hidden_state": True}, "query_layers must be None or a non-empty list"),
        ({"query_layers": 3, "use_hidden_state": True}, "query_layers must be None or a non-empty list"),
        ({"query_layers": [1, -1], "use_hidden_state": True}, r"query_layers must hold decoder block indices"),
        ({"query_layers": [True], "copy_attention": True}, r"query_layers must hold decoder block indices"),
        ({"query_layers": [2, 2], "copy_attention": True}, "query_layers must name each decoder block once"),
        ({"query_layers": [2]}, "query_layers feeds the query state r_t, which only use_hidden_state"),
    ],
)
def test_bad_options_name_the_problem(options, message):
    with pytest.raises(ValueError, match=message):
        BackwardAttentionConfig(**options)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ValueError) as error:
        BackwardAttentionConfig(out_dim=-1, score_mode="x")
    assert "out_dim" in str(error.value) and "score_mode" in str(error.value)


def test_unknown_option_in_a_dict_is_refused():
    with pytest.raises(ValueError, match="Unknown head option"):
        BackwardAttentionConfig.from_dict({"out_dimension": 8})


def test_coerce_accepts_config_dict_preset_and_none():
    config = BackwardAttentionConfig(out_dim=8)
    assert BackwardAttentionConfig.coerce(config) == config and BackwardAttentionConfig.coerce(config) is not config
    assert BackwardAttentionConfig.coerce({"out_dim": 8}) == config
    assert BackwardAttentionConfig.coerce("gated") == BackwardAttentionConfig.from_preset("gated")
    assert (
        BackwardAttentionConfig.coerce(None)
        == BackwardAttentionConfig.from_preset(DEFAULT_PRESET)
        == BackwardAttentionConfig.from_preset("hidden")
    )
    assert BackwardAttentionConfig() == BackwardAttentionConfig.from_preset("seed")
    with pytest.raises(ValueError, match="must be a BackwardAttentionConfig"):
        BackwardAttentionConfig.coerce(3)


def test_for_base_binds_sizes_and_refuses_another_base():
    bound = BackwardAttentionConfig().for_base(vocab_size=100, hidden_size=32)
    assert (bound.vocab_size, bound.hidden_size) == (100, 32)
    assert bound.for_base(100, 32) == bound
    with pytest.raises(ValueError, match=r"vocab_size 100 \(head\) != 50257 \(base model\)"):
        bound.for_base(50257, 32)
    with pytest.raises(ValueError, match=r"hidden_size 32 \(head\) != 768"):
        bound.for_base(100, 768)


@pytest.mark.parametrize("config_class", [GPT2BackwardAttentionConfig, LlamaBackwardAttentionConfig])
def test_model_configs_round_trip_through_json(config_class, tmp_path):
    config = config_class(heads={"math": "gated", "chat": {"out_dim": 8}}, active_head="math")
    assert config.model_type.endswith("_backattn")
    assert config.heads["math"] == BackwardAttentionConfig.from_preset("gated").to_dict()
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["heads"]["chat"]["out_dim"] == 8
    reloaded = config_class.from_pretrained(tmp_path)
    assert reloaded.heads == config.heads and reloaded.active_head == "math"


def test_active_head_must_name_a_head():
    with pytest.raises(ValueError, match="active_head='math' names no head"):
        GPT2BackwardAttentionConfig(heads={"chat": {}}, active_head="math")


# --------------------------------------------------------------------------------------------------------
# typed, documented options; 0.1.0 names; the fields both families share


def test_every_option_is_typed_and_documented():
    types = typing.get_type_hints(BackwardAttentionConfig)
    for option in dataclasses.fields(BackwardAttentionConfig):
        assert option.metadata.get("help"), option.name
    for name in ("attention_head_combine", "logit_weighting", "score_mode", "layer_mode", "score_maps"):
        assert typing.get_origin(types[name]) is typing.Literal, name
    assert typing.get_args(types["score_mode"]) == ("add", "gate", "replace")
    assert typing.get_args(types["score_maps"]) == ("single", "differential")
    assert types["copy_attention"] is bool and types["query_layers"] == list[int] | None
    for name in ("query_layers", "score_maps", "copy_attention", "label_word_ids"):  # each in the docstring
        assert f"``{name}" in BackwardAttentionConfig.__doc__, name
    for formula in (
        "2410.05258",
        "0.8 - 0.6 exp(-0.3 depth)",
        "z_t + g_c log(1 - lambda_t + lambda_t c_t / softmax(z_t))",
    ):
        assert formula in BackwardAttentionConfig.__doc__


def test_the_new_options_default_off_and_round_trip_through_json():
    config = BackwardAttentionConfig()
    assert (config.query_layers, config.score_maps, config.copy_attention) == (None, "single", False)
    for preset in PRESETS.values():  # the presets are unchanged
        assert not {"query_layers", "score_maps", "copy_attention"} & set(preset)
    assert config.base_kl_weight == 0.0
    options = {"query_layers": (3, 1), "use_hidden_state": True, "score_maps": "differential", "copy_attention": True}
    options["base_kl_weight"] = 0.25
    config = BackwardAttentionConfig(**options)
    assert config.query_layers == [3, 1]  # a tuple is kept as the list JSON gives back
    assert BackwardAttentionConfig.from_dict(json.loads(config.to_json_string())) == config


def test_option_names_of_version_0_1_0_are_read_as_the_new_ones():
    assert RENAMED_OPTIONS == {"num_heads": "num_attention_heads", "head_combine": "attention_head_combine"}
    old = BackwardAttentionConfig.from_dict({"num_heads": 2, "head_combine": "mix", "out_dim": 8})
    assert old == BackwardAttentionConfig(num_attention_heads=2, attention_head_combine="mix", out_dim=8)
    assert BackwardAttentionConfig.from_preset("hidden", num_heads=3).num_attention_heads == 3
    assert BackwardAttentionConfig.coerce({"num_heads": 5}).num_attention_heads == 5
    with pytest.raises(ValueError, match="both 'num_heads' .* and 'num_attention_heads'"):
        BackwardAttentionConfig.from_dict({"num_heads": 2, "num_attention_heads": 2})
    config = GPT2BackwardAttentionConfig(heads={"math": {"num_heads": 2, "out_dim": 8}}, active_head="math")
    assert config.heads["math"]["num_attention_heads"] == 2 and "num_heads" not in config.heads["math"]


def test_the_families_share_one_declaration_of_their_added_fields(tmp_path):
    shared = {option.name for option in dataclasses.fields(BackwardAttentionModelFields)}
    assert shared == {
        "heads", "active_head", "head_order", "heads_enabled", "frozen_heads", "loss_chunk_size", "check_finite_inputs",
        "rerank_top_k", "attention_rebalancing",
    }  # fmt: skip
    for config_class, base_class in (
        (GPT2BackwardAttentionConfig, GPT2Config),
        (LlamaBackwardAttentionConfig, LlamaConfig),
    ):
        assert issubclass(config_class, BackwardAttentionModelFields) and issubclass(config_class, base_class)
        assert shared <= {option.name for option in dataclasses.fields(config_class)}
        assert "loss_chunk_size (`int | None`, *optional*, defaults to 256)" in config_class.__doc__
        assert config_class._auto_class == "AutoConfig" and config_class.model_type != base_class.model_type
        config = config_class.from_dict(base_class(vocab_size=50).to_dict())  # a plain base config
        assert (config.vocab_size, config.heads, config.active_head, config.loss_chunk_size) == (50, {}, None, 256)
        config.save_pretrained(tmp_path / config_class.model_type)
        saved = json.loads((tmp_path / config_class.model_type / "config.json").read_text())
        assert saved["model_type"] == config_class.model_type and saved["loss_chunk_size"] == 256
