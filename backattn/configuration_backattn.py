"""Configuration of the backward-attention head and of the causal-LM families that carry it.

Two kinds of configuration live here:

* :class:`BackwardAttentionConfig` holds the options of **one** head (the maths of DESIGN.md section 2).
  It is a small dataclass, saved as plain JSON, so a head can travel without its base model.
* :class:`GPT2BackwardAttentionConfig` and :class:`LlamaBackwardAttentionConfig` are the base models' own
  configurations plus the fields of :class:`BackwardAttentionModelFields`: ``heads`` (the options of every
  head attached to the model, by name), ``active_head`` and two speed options. Each has its own
  ``model_type`` so that the Auto classes can tell it from the stock model.

Every option is a typed field whose help text sits in its metadata (as PEFT's ``LoraConfig`` does); the
per-field checks are read from the types (``Literal`` choices, booleans, positive integers, the numeric
domain in the metadata), and ``validate`` adds the one rule across fields.

This module imports nothing from the rest of the package except through relative imports, so that a
saved checkpoint loads with ``trust_remote_code=True`` where ``backattn`` is not installed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import textwrap
import typing
from dataclasses import field
from typing import Any, Literal

from transformers import GPT2Config, LlamaConfig

from .attention_rebalancing import rebalancing_options
from .errors import BackattnValueError

#: Option names of version 0.1.0 and the names that replaced them; old head files and configs still load.
RENAMED_OPTIONS = {"num_heads": "num_attention_heads", "head_combine": "attention_head_combine"}


@dataclasses.dataclass
class BackwardAttentionConfig:
    r"""Options of one backward-attention head.

    Notation of DESIGN.md section 2: ``E`` is the base model's input-embedding table (``V x d``), ``l_t`` the
    frozen base model's logits at position ``t``, ``h_t`` its final hidden state and ``x_{t+1}`` the input
    token after position ``t``. One backward-attention layer computes

    1. ``E_n = RMSNorm(E)`` with a learned scale of size ``d``;
    2. ``L = E_n W_l`` (``d -> latent_dim``) when ``latent_dim`` is set, else ``L = E_n``;
    3. ``K = L W_k`` and ``Vv = L W_v`` (both ``V x out_dim``);
    4. ``p_t = dropout(softmax(l_t / rms(l_t)))`` (``logit_weighting="softmax"``, the seed's code) or
       ``p_t = dropout(l_t)`` (``"raw"``, the seed's slides);
    5. ``u_t = (p_t Vv) / V`` (the division only when ``divide_by_vocab``), ``q_t = u_t W_q``, plus
       ``r_t W_h`` when ``use_hidden_state`` (``W_h`` is ``d x out_dim`` and starts at zero). The query state
       ``r_t`` is ``h_t``, or with ``query_layers`` a learned mix of intermediate layers,
       ``r_t = sum_k a_k RMSNorm_q(y_t^k)``: ``y_t^k`` is the output of the base's decoder block ``k`` (counted
       from 0), taken by a forward hook *before* the base's final RMSNorm / LayerNorm (the base applies that
       norm to its last block's output only, so every chosen state is normalised here by the head's own
       ``RMSNorm_q``, learned scale of size ``d`` starting at 1), and ``a = softmax(w_a)`` with ``w_a``
       starting at 0 (a uniform mix). With ``standardize_query_state`` the query state is standardised per
       dimension, ``r_t <- (r_t - mu) / sqrt(sigma^2 + eps)``, where ``mu`` and ``sigma^2`` (buffers of size ``d``,
       not trained) are the means and variances of ``r_t`` over the labelled positions of the first training
       rows, fixed once before training, as linear probes standardise their features (the base's states carry
       a few dimensions with large constant offsets, which otherwise slow ``W_h``'s training and unsettle it);
    6. ``s_t = sum_j c_j q_t^j (K^j)^T / sqrt(out_dim / num_attention_heads)`` over the attention sub-heads
       ``j`` (slices of ``out_dim``), with ``c_j = 1`` (``attention_head_combine="sum"``, the seed) or
       learned, starting at 1 (``"mix"``). With ``score_maps="differential"`` (the Differential Transformer,
       Ye et al. 2024, arXiv 2410.05258) the layer has a second query and key projection (``W_q2``, ``W_k2``,
       and ``W_h2`` starting at zero) giving a second map ``s2_t`` as above, ``s1_t`` being the first, and
       ``s_t = (1 - lambda_init) (s1_t - lambda s2_t)`` with
       ``lambda = exp(sum(lambda_q1 * lambda_k1)) - exp(sum(lambda_q2 * lambda_k2)) + lambda_init``: the four
       lambda vectors (size ``out_dim / num_attention_heads``, one lambda per layer shared by its sub-heads)
       are learned, drawn from a normal distribution of mean 0 and standard deviation 0.1. ``lambda_init`` is
       the constant 0.8: the paper sets ``lambda_init = 0.8 - 0.6 exp(-0.3 depth)`` per layer and reports a
       constant 0.8 to work as well; the head sits on top of the base's blocks, where that formula is already
       close to 0.8 (0.78 after GPT-2's 12 blocks, 0.80 after SmolLM2's 30), while counting the head's own
       layers from depth 0 would give 0.2. The paper subtracts softmax-normalised attention maps, which then
       weight values; here the map itself is the output and is added to the logits, i.e. it lives in log
       space, where normalising each map changes nothing that matters: ``log_softmax(s1) - lambda log_softmax(s2)
       = s1 - lambda s2 + const_t`` and step 7's softmax ignores the per-position constant. So the raw scores
       are subtracted (subtracting probabilities instead would bound every score by about ``1 / V`` in
       magnitude); the paper's per-head RMSNorm of ``A V`` has no counterpart (there is no ``A V``), its
       ``(1 - lambda_init)`` scaling is kept;
    7. the scores meet the logits: ``z_t = l_t + dropout(s_t)`` (``score_mode="add"``, the seed's code),
       ``l_t + g * dropout(s_t)`` with a learned scalar ``g`` that starts at zero (``"gate"``: the untrained
       head reproduces the base model exactly), or ``dropout(s_t)`` alone (``"replace"``, the seed's slides).

    With ``num_layers > 1`` the layers run either in ``"parallel"`` on the base logits, their scores mixed
    with learned weights that start at ``1 / num_layers`` before step 7, or ``"sequential"``: each layer
    reads the logits the previous one produced and applies step 7 with its own gate.

    ``copy_attention`` adds a copy (pointer) term after step 7 (See et al. 2017's pointer-generator, for a
    decoder-only model): the query state ``r_t`` (step 5: ``h_t`` or the ``query_layers`` mix) attends back over
    the states ``r_j`` of earlier positions and raises the logit of the token that followed each,

    8. ``a_tj = softmax_{j in J_t}((r_t W_cq) . (r_j W_ck) / sqrt(out_dim))`` over
       ``J_t = {j < t : attention_mask_j = 1}`` (``W_cq``, ``W_ck``: ``d x out_dim``);
       ``c_t[w] = sum_{j in J_t} a_tj [x_{j+1} = w]``, the copy distribution over the vocabulary;
       ``lambda_t = sigmoid(w_g . r_t + b)``; and the head's logits are
       ``z_t + g_c log(1 - lambda_t + lambda_t c_t / softmax(z_t))`` (computed in log space, ``logaddexp`` of
       ``log(1 - lambda_t)`` and ``log lambda_t + log c_t - log_softmax(z_t)``), where ``g_c`` is a learned
       scalar that starts at zero with ``score_mode="gate"`` (so the untrained head still gives the base's
       logits exactly) and is 1 otherwise. At ``g_c = 1`` the next-token distribution is exactly See et al.'s
       mixture ``(1 - lambda_t) softmax(z_t) + lambda_t c_t``; between 0 and 1 it interpolates geometrically
       between ``softmax(z_t)`` and that mixture. Only ``j < t`` is attended, not ``j <= t``: the token a
       position ``j`` copies is ``x_{j+1}``, which for ``j = t`` is the very token being predicted (the label
       in training, unknown while generating). Where ``J_t`` is empty (the first position, or only padding
       before it) the term is 0. It needs the input ids and the states of all earlier positions: the models
       keep those of the positions in their KV cache while generating.

    ``vocab_chunk_size`` walks the vocabulary in slices of that many rows: steps 1-3 and 5-7 are computed
    slice by slice (the softmax of step 4 keeps its full-vocabulary normaliser, so the result equals the
    unchunked one) and, when gradients are needed, each slice is recomputed in the backward pass instead
    of being stored. It trades time for memory and never changes the output.

    Training minimises, over the labelled positions ``t``, ``CE(z_t, x_{t+1}) + beta KL(softmax(l_t) ||
    softmax(z_t))`` with ``beta = base_kl_weight`` (0 by default: the plain cross-entropy). The second term is
    the KL divergence from the frozen base's next-token distribution to the head's, as a distillation or
    RLHF reference term; at a head that reproduces the base it and its gradient are 0. With
    ``label_word_ids`` ``C`` (a classification head: the token ids of its classes' label words), the
    cross-entropy is taken over those tokens' logits alone, ``-log softmax(z_t[C])[y_t]``, the label-word
    (verbalizer) loss of PET and LM-BFF (Schick and Schuetze 2021; Gao et al. 2021): every labelled target must
    be one of ``C``, and all of the gradient goes to telling the classes apart rather than to putting mass on
    the label words. With ``copy_loss_weight`` ``gamma`` (and ``copy_attention``) the loss adds
    ``gamma * -log c_t(x_{t+1})`` at each labelled position whose target is copyable (``x_{j+1} = x_{t+1}`` for
    some ``j`` in ``J_t``): the copy attention is taught where to look even while its gate ``lambda_t`` is
    small, as pointer networks supervise their attention where the target occurs in the input. All three are
    applied in training mode only (like dropout), so evaluation losses stay the plain cross-entropy.

    ``vocab_size`` and ``hidden_size`` record the base model a head was built for; they are filled in when
    the head is attached and checked against the base every time after.

    "Head" alone means a task head (a whole :class:`BackwardAttentionHead`); its attention sub-heads are
    the ``num_attention_heads`` slices of step 6. Files saved with the 0.1.0 names (``num_heads``,
    ``head_combine``, see :data:`RENAMED_OPTIONS`) still load through :meth:`from_dict`.
    """

    latent_dim: int | None = field(
        default=28,
        metadata={"help": "Width of L in step 2 (L = E_n W_l); None: L = E_n.", "if_none": "(or None to turn it off)"},
    )
    out_dim: int = field(default=30, metadata={"help": "Width d_out of K, Vv and q_t (step 3)."})
    num_attention_heads: int = field(
        default=1,
        metadata={"help": "Attention sub-heads h of step 6: slices of out_dim, each scaled by 1/sqrt(out_dim/h)."},
    )
    attention_head_combine: Literal["sum", "mix"] = field(
        default="sum", metadata={"help": "Step 6: sub-head scores summed (c_j = 1) or mixed by learned c_j."}
    )
    logit_weighting: Literal["softmax", "raw"] = field(
        default="softmax", metadata={"help": "Step 4: p_t = softmax(l_t / rms(l_t)) or the raw logits l_t."}
    )
    divide_by_vocab: bool = field(default=True, metadata={"help": "Step 5: divide u_t by the vocabulary size V."})
    dropout: float = field(
        default=0.0,
        metadata={
            "help": "Dropout on p_t (step 4) and s_t (step 7), in training only.",
            "domain": ("a number in [0, 1)", lambda x: 0 <= x < 1),
        },
    )
    score_mode: Literal["add", "gate", "replace"] = field(
        default="add", metadata={"help": "Step 7: l_t + s_t, l_t + g s_t (g starts at 0), or s_t alone."}
    )
    base_kl_weight: float = field(
        default=0.0,
        metadata={
            "help": "Training only: beta in the loss CE(z_t, x_{t+1}) + beta KL(softmax(l_t) || softmax(z_t)) at each "
            "labelled position, which keeps the head's next-token distribution near the frozen base's. 0: the plain "
            "cross-entropy.",
            "domain": ("a finite number >= 0", lambda x: x >= 0),
        },
    )
    label_word_ids: list[int] | None = field(
        default=None,
        metadata={
            "help": "Training only, for classification: the token ids C of the classes' label words; the "
            "cross-entropy at each labelled position is then taken over z_t[C] alone, and every label must be in C. "
            "None: the cross-entropy over the whole vocabulary.",
        },
    )
    copy_loss_weight: float = field(
        default=0.0,
        metadata={
            "help": "Training only, with copy_attention: gamma in the loss term gamma * -log c_t(x_{t+1}) at each "
            "labelled position whose target followed an attended earlier position (x_{j+1} = x_{t+1}, j in J_t): "
            "it supervises the copy attention directly, whatever its gate. 0: no such term.",
            "domain": ("a finite number >= 0", lambda x: x >= 0),
        },
    )
    num_layers: int = field(default=1, metadata={"help": "Backward-attention layers in the head."})
    layer_mode: Literal["parallel", "sequential"] = field(
        default="parallel", metadata={"help": "Layers on the base logits with mixed scores, or one after another."}
    )
    use_hidden_state: bool = field(default=False, metadata={"help": "Step 5: q_t also gets h_t W_h (W_h starts at 0)."})
    query_layers: list[int] | None = field(
        default=None,
        metadata={
            "help": "Step 5: the query state r_t (in r_t W_h and the copy term) is a learned softmax mix, starting "
            "uniform, of these decoder blocks' outputs (indices from 0, taken before the base's final norm, each "
            "normalised by the head's own RMSNorm); None: the base's final hidden state h_t.",
        },
    )
    standardize_query_state: bool = field(
        default=False,
        metadata={
            "help": "Step 5: the query state becomes (r_t - mu) / sqrt(sigma^2 + eps) per dimension, mu and sigma^2 "
            "the means and variances of r_t over the labelled positions of the first training rows, fixed once "
            "before training (backattn.fit_query_standardization; the head Trainer does it); until then 0 and 1.",
        },
    )
    score_maps: Literal["single", "differential"] = field(
        default="single",
        metadata={
            "help": "Step 6: one score map, or the Differential Transformer's two, s = (1 - 0.8) (s1 - lambda s2) "
            "with a learned lambda (arXiv 2410.05258)."
        },
    )
    copy_attention: bool = field(
        default=False,
        metadata={
            "help": "Step 8: a copy (pointer) term: r_t attends over earlier positions j < t and raises the logits "
            "of the tokens x_{j+1} that followed them, through a learned gate lambda_t = sigmoid(w_g . r_t + b)."
        },
    )
    vocab_chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "Walk the vocabulary in slices of this many rows (memory only; same output).",
            "if_none": "(or None to turn it off)",
        },
    )
    rms_norm_eps: float = field(
        default=1e-6,
        metadata={
            "help": "epsilon of both RMS norms (steps 1 and 4).",
            "domain": ("a positive number", lambda x: x > 0),
        },
    )
    vocab_size: int | None = field(default=None, metadata={"help": "V of the base model the head was built for."})
    hidden_size: int | None = field(default=None, metadata={"help": "d of the base model the head was built for."})

    def __post_init__(self) -> None:
        if isinstance(self.query_layers, tuple):
            self.query_layers = list(self.query_layers)
        if isinstance(self.label_word_ids, tuple):
            self.label_word_ids = list(self.label_word_ids)
        self.validate()

    def validate(self) -> None:
        """Raise :class:`~backattn.errors.BackattnValueError` (a ``ValueError``) naming every option that is out
        of range (NaN and inf included) or does not fit with another."""
        problems = field_problems(self, BackwardAttentionConfig)
        heads, width = self.num_attention_heads, self.out_dim
        if not any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in (heads, width)) and width % heads:
            problems.append(
                f"num_attention_heads={heads} does not divide out_dim={width}: "
                "choose an out_dim that is a multiple of num_attention_heads"
            )
        layers = self.query_layers
        if layers is not None:
            if not isinstance(layers, list) or not layers:
                problems.append(
                    f"query_layers must be None or a non-empty list of decoder block indices, got {layers!r}"
                )
            elif any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in layers):
                problems.append(f"query_layers must hold decoder block indices (integers from 0), got {layers!r}")
            elif len(set(layers)) != len(layers):
                problems.append(f"query_layers must name each decoder block once, got {layers!r}")
            elif not (self.use_hidden_state is True or self.copy_attention is True):
                problems.append(
                    "query_layers feeds the query state r_t, which only use_hidden_state (r_t W_h) and "
                    "copy_attention read: turn one of them on, or leave query_layers None"
                )
        if self.standardize_query_state is True and not (self.use_hidden_state is True or self.copy_attention is True):
            problems.append(
                "standardize_query_state standardises the query state r_t, which only use_hidden_state (r_t W_h) "
                "and copy_attention read: turn one of them on, or leave standardize_query_state False"
            )
        if self.copy_loss_weight and self.copy_attention is not True:
            problems.append(
                f"copy_loss_weight={self.copy_loss_weight} supervises the copy attention, which this head lacks: "
                "turn copy_attention on, or leave copy_loss_weight 0"
            )
        words = self.label_word_ids
        if words is not None:
            vocab = self.vocab_size if type(self.vocab_size) is int else None  # a bool is no size
            if not isinstance(words, list) or len(words) < 2:
                problems.append(f"label_word_ids must be None or a list of at least two token ids, got {words!r}")
            elif any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in words):
                problems.append(f"label_word_ids must hold token ids (integers from 0), got {words!r}")
            elif len(set(words)) != len(words):
                problems.append(f"label_word_ids must name each token once, got {words!r}")
            elif vocab is not None and max(words) >= vocab:
                problems.append(f"label_word_ids holds {max(words)}, outside the vocabulary of {vocab} tokens")
        if problems:
            raise BackattnValueError("Invalid BackwardAttentionConfig: " + "; ".join(problems) + ".")

    # ----------------------------------------------------------------------------------------------------
    # presets

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> BackwardAttentionConfig:
        """A named preset (see :data:`PRESETS`), with any option overridden by keyword (0.1.0 names too)."""
        if name not in PRESETS:
            raise BackattnValueError(f"Unknown head preset {name!r}; choose one of {', '.join(map(repr, PRESETS))}.")
        return cls.from_dict({**PRESETS[name], **upgrade_options(overrides)})

    @classmethod
    def coerce(cls, value: BackwardAttentionConfig | dict | str | None) -> BackwardAttentionConfig:
        """Accept a config, a dict of options, a preset name or ``None`` (the :data:`DEFAULT_PRESET`)."""
        if value is None:
            return cls.from_preset(DEFAULT_PRESET)
        if isinstance(value, cls):
            return cls(**value.to_dict())
        if isinstance(value, str):
            return cls.from_preset(value)
        if isinstance(value, dict):
            return cls.from_dict(value)
        raise BackattnValueError(
            f"A head config must be a BackwardAttentionConfig, a dict of its options or a preset name, "
            f"got {type(value).__name__}."
        )

    # ----------------------------------------------------------------------------------------------------
    # serialisation

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> BackwardAttentionConfig:
        """The config of a dict of options; the 0.1.0 names of :data:`RENAMED_OPTIONS` are read as the new ones."""
        options = upgrade_options(options)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise BackattnValueError(
                f"Unknown head option(s) {', '.join(unknown)}; known options are {', '.join(sorted(known))}."
            )
        return cls(**options)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def for_base(self, vocab_size: int, hidden_size: int) -> BackwardAttentionConfig:
        """This config bound to a base model's sizes; ``ValueError`` if it was built for another base."""
        mismatches = [
            f"{name} {mine} (head) != {theirs} (base model)"
            for name, mine, theirs in (
                ("vocab_size", self.vocab_size, vocab_size),
                ("hidden_size", self.hidden_size, hidden_size),
            )
            if mine is not None and mine != theirs
        ]
        if mismatches:
            raise BackattnValueError(
                "This head was built for a different base model: " + "; ".join(mismatches) + ". "
                "Attach it to the base it was trained on, or build a fresh head for this base."
            )
        return dataclasses.replace(self, vocab_size=vocab_size, hidden_size=hidden_size)


def upgrade_options(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with the 0.1.0 names of :data:`RENAMED_OPTIONS` replaced by the current ones."""
    upgraded = dict(options)
    for old, new in RENAMED_OPTIONS.items():
        if old in upgraded:
            if new in upgraded:
                raise BackattnValueError(f"Head options give both {old!r} (the 0.1.0 name) and {new!r}; keep {new!r}.")
            upgraded[new] = upgraded.pop(old)
    return upgraded


@functools.cache
def _field_types(fields_class: type) -> dict[str, Any]:
    return typing.get_type_hints(fields_class)


def field_problems(options: Any, fields_class: type) -> list[str]:
    """What is wrong with each field ``fields_class`` declares on ``options``, read from its type and metadata.

    ``Literal[...]``: one of those values; ``bool``: True or False; ``int``: a positive integer (``None``
    too when the type allows it, ``if_none`` saying what it means); ``float``: a finite number (never NaN
    or inf) in the field's ``domain`` (a description and a test).
    """
    problems, types = [], _field_types(fields_class)
    for option in dataclasses.fields(fields_class):
        kind, value = types[option.name], getattr(options, option.name)
        choices = typing.get_args(kind)
        optional = type(None) in choices
        if value is None and optional:
            continue
        if typing.get_origin(kind) is Literal:
            if value not in choices:
                problems.append(f"{option.name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        elif kind is bool:
            if not isinstance(value, bool):
                problems.append(f"{option.name} must be True or False, got {value!r}")
        elif kind is int or (optional and int in choices):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                hint = f" {option.metadata['if_none']}" if "if_none" in option.metadata else ""
                problems.append(f"{option.name} must be a positive integer{hint}, got {value!r}")
        elif kind is float:
            description, allowed = option.metadata["domain"]
            number = not isinstance(value, bool) and isinstance(value, (int, float))
            if number and not math.isfinite(value):
                problems.append(
                    f"{option.name} must be {description}, got {value!r} (NaN and inf are refused); "
                    f"the default is {option.default!r}"
                )
            elif not number or not allowed(value):
                problems.append(f"{option.name} must be {description}, got {value!r}")
    return problems


#: The seed project's defaults (DESIGN.md section 2) and the variants DESIGN.md section 6 measured.
PRESETS: dict[str, dict[str, Any]] = {
    # The seed's code: latent 28, output 30, one attention sub-head, softmax weighting, division by V, added.
    "seed": {},
    # The seed's head without the division by V, its scores entering through a zero-initialised gate.
    "gated": {"divide_by_vocab": False, "score_mode": "gate"},
    # As "gated", and the query also sees the base's final hidden state (best in DESIGN.md section 6).
    "hidden": {"divide_by_vocab": False, "score_mode": "gate", "use_hidden_state": True},
}


#: The head ``add_head()`` and ``train_sft.py`` build when no options are given; chosen from the measured
#: comparison in BENCHMARKS.md ("Does the head help?"): of the presets, only ``hidden`` measurably lowers
#: held-out loss. ``BackwardAttentionConfig()`` itself holds the seed's options.
DEFAULT_PRESET = "hidden"

#: The options that act on the training loss alone: a head's weights and logits do not depend on them.
TRAINING_ONLY_OPTIONS = ("base_kl_weight", "label_word_ids", "copy_loss_weight")

LOGIT_WEIGHTINGS = typing.get_args(typing.get_type_hints(BackwardAttentionConfig)["logit_weighting"])
HEAD_COMBINES = typing.get_args(typing.get_type_hints(BackwardAttentionConfig)["attention_head_combine"])
SCORE_MODES = typing.get_args(typing.get_type_hints(BackwardAttentionConfig)["score_mode"])
LAYER_MODES = typing.get_args(typing.get_type_hints(BackwardAttentionConfig)["layer_mode"])
SCORE_MAPS = typing.get_args(typing.get_type_hints(BackwardAttentionConfig)["score_maps"])


@dataclasses.dataclass(kw_only=True, repr=False, eq=False)
class BackwardAttentionModelFields:
    """The fields both families add to their base config (a dataclass mixin: Transformers 5 configs are
    dataclasses, so a family config is ``class X(BackwardAttentionModelFields, BaseConfig)``)."""

    heads: dict | None = field(
        default=None,
        metadata={"help": "Options of each attached head (see BackwardAttentionConfig), by head name."},
    )
    active_head: str | None = field(
        default=None,
        metadata={"help": "The head that scores the next token; None gives the base model's own logits."},
    )
    head_order: list | None = field(
        default=None,
        metadata={
            "help": "The heads' names in the order they were added (the JSON file sorts the keys of heads); None: "
            "the order of heads.",
        },
    )
    heads_enabled: bool = field(
        default=True,
        metadata={"help": "False while heads are disabled (model.disable_heads()): the base model's own logits."},
    )
    frozen_heads: list | None = field(
        default=None,
        metadata={
            "help": "What of the heads does not train (requires_grad False), as saved: a head's name when all of its "
            "parameters are frozen, 'name.parameter' for each frozen parameter of a partly frozen head. None or "
            "empty: every head trains.",
        },
    )
    loss_chunk_size: int | None = field(
        default=256,
        metadata={
            "help": "Positions per chunk of the training loss (see backattn.head_loss): while training a head "
            "with labels, only labelled positions are scored, this many at a time, and logits are not returned. "
            "None builds the full logits and takes the usual cross-entropy (the straightforward path).",
            "if_none": "or None (full logits)",
        },
    )
    check_finite_inputs: bool = field(
        default=True,
        metadata={
            "help": "Before a head runs, check once per forward that the inputs it reads (the base's final hidden "
            "states, or the base_hidden_states passed in, which the base logits are computed from) hold no NaN "
            "or inf, and raise an error naming the input if they do (inputs_embeds is named when it is the "
            "cause). Costs one reduction and one device sync per forward; skipped under torch.compile. False "
            "turns it off.",
        },
    )
    rerank_top_k: int | None = field(
        default=None,
        metadata={
            "help": "When set, the active head re-ranks only the base model's k most likely tokens at each "
            "position and leaves the other logits as they are (cheaper, an approximation); None scores the whole "
            "vocabulary. A rerank_top_k= argument to forward or generate overrides it for one call. Training with "
            "it set takes the plain loss over the re-ranked logits, not the chunked loss over the whole vocabulary.",
            "if_none": "or None (the whole vocabulary)",
        },
    )
    attention_rebalancing: dict | None = field(
        default=None,
        metadata={
            "help": "Seed 002's attention re-balancing of the frozen base (backattn.attention_rebalancing), e.g. "
            "{'alpha': 0.2, 'threshold': 0.01}: each decoder layer l >= 1 multiplies its attention weights, where "
            "layer 0's exceed the threshold (each query's own position excluded), by 1 + alpha (1 - l / (L-1)), "
            "without renormalising; the model then runs attn_implementation='backattn_rebalanced' (eager "
            "semantics). None: off.",
        },
    )

    def __post_init__(self, **kwargs):
        self.attention_rebalancing = rebalancing_options(self.attention_rebalancing)
        self.normalise_heads()
        super().__post_init__(**kwargs)

    def normalise_heads(self) -> None:
        """Turn ``heads`` into ``{name: options dict}`` (0.1.0 option names upgraded); check the other fields."""
        problems = field_problems(self, BackwardAttentionModelFields)
        if problems:
            raise BackattnValueError(f"config.{problems[0]}.")
        heads = self.heads or {}
        if not isinstance(heads, dict):
            raise BackattnValueError(f"config.heads must map head names to head options, got {type(heads).__name__}.")
        self.heads = {str(name): BackwardAttentionConfig.coerce(options).to_dict() for name, options in heads.items()}
        if self.active_head is not None and self.active_head not in self.heads:
            raise BackattnValueError(
                f"config.active_head={self.active_head!r} names no head; the heads are {sorted(self.heads) or 'none'}."
            )
        order = self.head_order
        if order is not None:
            if not isinstance(order, (list, tuple)) or sorted(map(str, order)) != sorted(self.heads):
                raise BackattnValueError(
                    f"config.head_order={order!r} must list each head of config.heads ({sorted(self.heads)}) once."
                )
            self.head_order = [str(name) for name in order]
            self.heads = {name: self.heads[name] for name in self.head_order}
        frozen = self.frozen_heads
        if frozen is not None:
            if not isinstance(frozen, (list, tuple)) or not all(isinstance(entry, str) for entry in frozen):
                raise BackattnValueError(f"config.frozen_heads must be a list of head names, got {frozen!r}.")
            unknown = [entry for entry in frozen if entry.split(".")[0] not in self.heads]
            if unknown:
                raise BackattnValueError(
                    f"config.frozen_heads names {unknown[0]!r}, not a head of config.heads ({sorted(self.heads)})."
                )
            self.frozen_heads = list(frozen)


def _fields_doc(fields_class: type) -> str:
    """The docstring section of the fields ``fields_class`` adds, from their metadata."""
    lines = []
    for option in dataclasses.fields(fields_class):
        default = "" if option.default is None else f", defaults to {option.default}"
        lines.append(f"    {option.name} (`{option.type}`, *optional*{default}):")
        lines += textwrap.wrap(option.metadata["help"], 112, initial_indent=" " * 8, subsequent_indent=" " * 8)
    return "\n".join(lines)


class GPT2BackwardAttentionConfig(BackwardAttentionModelFields, GPT2Config):
    __doc__ = f"""A :class:`~transformers.GPT2Config` plus the backward-attention heads attached to the model.

{_fields_doc(BackwardAttentionModelFields)}
"""

    model_type = "gpt2_backattn"


class LlamaBackwardAttentionConfig(BackwardAttentionModelFields, LlamaConfig):
    __doc__ = f"""A :class:`~transformers.LlamaConfig` plus the backward-attention heads attached to the model.

{_fields_doc(BackwardAttentionModelFields)}
"""

    model_type = "llama_backattn"


GPT2BackwardAttentionConfig.register_for_auto_class()
LlamaBackwardAttentionConfig.register_for_auto_class()

__all__ = [
    "DEFAULT_PRESET",
    "PRESETS",
    "RENAMED_OPTIONS",
    "BackwardAttentionConfig",
    "BackwardAttentionModelFields",
    "GPT2BackwardAttentionConfig",
    "LlamaBackwardAttentionConfig",
]
