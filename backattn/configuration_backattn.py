"""Configuration of the backward-attention head and of the causal-LM families that carry it.

Two kinds of configuration live here:

* :class:`BackwardAttentionConfig` holds the options of **one** head (the maths of DESIGN.md section 2).
  It is a small dataclass, saved as plain JSON, so a head can travel without its base model.
* :class:`GPT2BackwardAttentionConfig` and :class:`LlamaBackwardAttentionConfig` are the base models' own
  configurations plus two fields: ``heads`` (the options of every head attached to the model, by name) and
  ``active_head`` (the head that scores the next token, or ``None`` for the base model's own logits).
  Each has its own ``model_type`` so that the Auto classes can tell it from the stock model.

This module imports nothing from the rest of the package except through relative imports, so that a
saved checkpoint loads with ``trust_remote_code=True`` where ``backattn`` is not installed.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from transformers import GPT2Config, LlamaConfig

LOGIT_WEIGHTINGS = ("softmax", "raw")
HEAD_COMBINES = ("sum", "mix")
SCORE_MODES = ("add", "gate", "replace")
LAYER_MODES = ("parallel", "sequential")


@dataclasses.dataclass
class BackwardAttentionConfig:
    r"""Options of one backward-attention head.

    Notation of DESIGN.md section 2: ``E`` is the base model's input-embedding table (``V x d``), ``l_t`` the
    frozen base model's logits at position ``t`` and ``h_t`` its final hidden state. One backward-attention
    layer computes

    1. ``E_n = RMSNorm(E)`` with a learned scale of size ``d``;
    2. ``L = E_n W_l`` (``d -> latent_dim``) when ``latent_dim`` is set, else ``L = E_n``;
    3. ``K = L W_k`` and ``Vv = L W_v`` (both ``V x out_dim``);
    4. ``p_t = dropout(softmax(l_t / rms(l_t)))`` (``logit_weighting="softmax"``, the seed's code) or
       ``p_t = dropout(l_t)`` (``"raw"``, the seed's slides);
    5. ``u_t = (p_t Vv) / V`` (the division only when ``divide_by_vocab``), ``q_t = u_t W_q``, plus
       ``h_t W_h`` when ``use_hidden_state`` (``W_h`` is ``d x out_dim`` and starts at zero);
    6. ``s_t = sum_j c_j q_t^j (K^j)^T / sqrt(out_dim / num_heads)`` over the ``num_heads`` slices ``j`` of
       ``out_dim``, with ``c_j = 1`` (``head_combine="sum"``, the seed) or learned, starting at 1 (``"mix"``);
    7. the scores meet the logits: ``l_t + dropout(s_t)`` (``score_mode="add"``, the seed's code),
       ``l_t + g * dropout(s_t)`` with a learned scalar ``g`` that starts at zero (``"gate"``: the untrained
       head reproduces the base model exactly), or ``dropout(s_t)`` alone (``"replace"``, the seed's slides).

    With ``num_layers > 1`` the layers run either in ``"parallel"`` on the base logits, their scores mixed
    with learned weights that start at ``1 / num_layers`` before step 7, or ``"sequential"``: each layer
    reads the logits the previous one produced and applies step 7 with its own gate.

    ``vocab_chunk_size`` walks the vocabulary in slices of that many rows: steps 1-3 and 5 are computed
    slice by slice (the softmax of step 4 keeps its full-vocabulary normaliser, so the result equals the
    unchunked one) and, when gradients are needed, each slice is recomputed in the backward pass instead
    of being stored. It trades time for memory and never changes the output.

    ``vocab_size`` and ``hidden_size`` record the base model a head was built for; they are filled in when
    the head is attached and checked against the base every time after.
    """

    latent_dim: int | None = 28
    out_dim: int = 30
    num_heads: int = 1
    head_combine: str = "sum"
    logit_weighting: str = "softmax"
    divide_by_vocab: bool = True
    dropout: float = 0.0
    score_mode: str = "add"
    num_layers: int = 1
    layer_mode: str = "parallel"
    use_hidden_state: bool = False
    vocab_chunk_size: int | None = None
    rms_norm_eps: float = 1e-6
    vocab_size: int | None = None
    hidden_size: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming every option that is out of range or does not fit with another."""
        problems = []
        for name in ("divide_by_vocab", "use_hidden_state"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name, optional in (
            ("out_dim", False),
            ("num_heads", False),
            ("num_layers", False),
            ("latent_dim", True),
            ("vocab_chunk_size", True),
            ("vocab_size", True),
            ("hidden_size", True),
        ):
            value = getattr(self, name)
            if value is None and optional:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                hint = " (or None to turn it off)" if name in ("latent_dim", "vocab_chunk_size") else ""
                problems.append(f"{name} must be a positive integer{hint}, got {value!r}")
        for name, allowed in (
            ("logit_weighting", LOGIT_WEIGHTINGS),
            ("head_combine", HEAD_COMBINES),
            ("score_mode", SCORE_MODES),
            ("layer_mode", LAYER_MODES),
        ):
            if getattr(self, name) not in allowed:
                problems.append(f"{name} must be one of {', '.join(map(repr, allowed))}, got {getattr(self, name)!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            problems.append(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        if isinstance(self.rms_norm_eps, bool) or not isinstance(self.rms_norm_eps, (int, float)) or self.rms_norm_eps <= 0:
            problems.append(f"rms_norm_eps must be a positive number, got {self.rms_norm_eps!r}")
        if (
            isinstance(self.out_dim, int)
            and isinstance(self.num_heads, int)
            and self.num_heads > 0
            and self.out_dim % self.num_heads
        ):
            problems.append(
                f"num_heads={self.num_heads} does not divide out_dim={self.out_dim}: "
                "choose an out_dim that is a multiple of num_heads"
            )
        if problems:
            raise ValueError("Invalid BackwardAttentionConfig: " + "; ".join(problems) + ".")

    # ----------------------------------------------------------------------------------------------------
    # presets

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> BackwardAttentionConfig:
        """A named preset (see :data:`PRESETS`), with any option overridden by keyword."""
        if name not in PRESETS:
            raise ValueError(f"Unknown head preset {name!r}; choose one of {', '.join(map(repr, PRESETS))}.")
        return cls(**{**PRESETS[name], **overrides})

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
        raise ValueError(
            f"A head config must be a BackwardAttentionConfig, a dict of its options or a preset name, "
            f"got {type(value).__name__}."
        )

    # ----------------------------------------------------------------------------------------------------
    # serialisation

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> BackwardAttentionConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"Unknown head option(s) {', '.join(unknown)}; known options are {', '.join(sorted(known))}."
            )
        return cls(**options)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def for_base(self, vocab_size: int, hidden_size: int) -> BackwardAttentionConfig:
        """This config bound to a base model's sizes; ``ValueError`` if it was built for another base."""
        mismatches = [
            f"{name} {mine} (head) != {theirs} (base model)"
            for name, mine, theirs in (("vocab_size", self.vocab_size, vocab_size), ("hidden_size", self.hidden_size, hidden_size))
            if mine is not None and mine != theirs
        ]
        if mismatches:
            raise ValueError(
                "This head was built for a different base model: " + "; ".join(mismatches) + ". "
                "Attach it to the base it was trained on, or build a fresh head for this base."
            )
        return dataclasses.replace(self, vocab_size=vocab_size, hidden_size=hidden_size)


#: The seed project's defaults (DESIGN.md section 2) and the variants DESIGN.md section 6 measured.
PRESETS: dict[str, dict[str, Any]] = {
    # The seed's code: latent 28, output 30, one head, softmax weighting, division by V, scores added.
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


def _normalise_heads(config) -> None:
    """Turn ``config.heads`` into ``{name: options dict}``; check the other fields backattn adds."""
    for name, meaning in (("loss_chunk_size", "full logits"), ("rerank_top_k", "the whole vocabulary")):
        value = getattr(config, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ValueError(f"config.{name} must be a positive integer or None ({meaning}), got {value!r}.")
    heads = config.heads or {}
    if not isinstance(heads, dict):
        raise ValueError(f"config.heads must map head names to head options, got {type(heads).__name__}.")
    config.heads = {str(name): BackwardAttentionConfig.coerce(options).to_dict() for name, options in heads.items()}
    if config.active_head is not None and config.active_head not in config.heads:
        raise ValueError(
            f"config.active_head={config.active_head!r} names no head; the heads are {sorted(config.heads) or 'none'}."
        )


# The fields both families add to their base config, as documented in each class's docstring.
_FIELDS_DOC = """    heads (`dict[str, dict]`, *optional*):
        Options of each attached head (see :class:`BackwardAttentionConfig`), by head name.
    active_head (`str`, *optional*):
        The head that scores the next token; ``None`` gives the base model's own logits.
    loss_chunk_size (`int`, *optional*, defaults to 256):
        Positions per chunk of the training loss (see :mod:`backattn.head_loss`): while training a head with
        labels, only labelled positions are scored, this many at a time, and ``logits`` are not returned.
        ``None`` builds the full logits and takes the usual cross-entropy (the straightforward path).
    rerank_top_k (`int`, *optional*):
        When set, the active head re-ranks only the base model's ``k`` most likely tokens at each position
        and leaves the other logits as they are (cheaper, an approximation); ``None`` scores the whole
        vocabulary. A ``rerank_top_k=`` argument to ``forward`` or ``generate`` overrides it for one call.
        The chunked training loss always scores the whole vocabulary.
"""


class GPT2BackwardAttentionConfig(GPT2Config):
    __doc__ = f"""A :class:`~transformers.GPT2Config` plus the backward-attention heads attached to the model.

{_FIELDS_DOC}"""

    model_type = "gpt2_backattn"

    heads: dict | None = None
    active_head: str | None = None
    loss_chunk_size: int | None = 256
    rerank_top_k: int | None = None

    def __post_init__(self, **kwargs):
        _normalise_heads(self)
        super().__post_init__(**kwargs)


class LlamaBackwardAttentionConfig(LlamaConfig):
    __doc__ = f"""A :class:`~transformers.LlamaConfig` plus the backward-attention heads attached to the model.

{_FIELDS_DOC}"""

    model_type = "llama_backattn"

    heads: dict | None = None
    active_head: str | None = None
    loss_chunk_size: int | None = 256
    rerank_top_k: int | None = None

    def __post_init__(self, **kwargs):
        _normalise_heads(self)
        super().__post_init__(**kwargs)


GPT2BackwardAttentionConfig.register_for_auto_class()
LlamaBackwardAttentionConfig.register_for_auto_class()

__all__ = [
    "DEFAULT_PRESET",
    "BackwardAttentionConfig",
    "GPT2BackwardAttentionConfig",
    "LlamaBackwardAttentionConfig",
    "PRESETS",
]
