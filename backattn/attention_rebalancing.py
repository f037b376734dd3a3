"""Attention re-balancing on a frozen base (seed 002: Liao and Vargas 2024, "Extending Token Computation for
LLM Reasoning"), as an attention function registered with Transformers' attention interface.

The maths, per head ``h`` of one forward (a prefill, or one cached decode step). ``A_l`` is layer ``l``'s
post-softmax attention (queries x keys) as the family's eager attention computes it, ``L`` the number of
decoder layers:

* layer 0 runs as eager attention, and marks where it attends meaningfully:
  ``M = A_0 > threshold``, each query's own position removed (the diagonal in a prefill; with a KV cache the
  key at the query's own position, i.e. the newest column in a one-query decode step: the last key the
  query's causal mask allows, which also places it in a static cache);
* each later layer ``l = 1 .. L-1`` boosts the same positions before its weights meet the values:
  ``A_l[M] *= 1 + alpha * (1 - l / (L-1))``, with no renormalisation, then ``out_l = A_l V_l``.

The mask is recomputed at every forward, cached decode steps included. The seed's code (``alpha`` 0.2 at its
latest commit, 0.5 in another; ``threshold`` 0.01) writes ``l / 31`` for Llama-2-7B's 32 layers; ``L - 1``
here. ``alpha = 0`` is the family's eager attention exactly (the boost is skipped, not multiplied by 1).

Use::

    from backattn.attention_rebalancing import enable_attention_rebalancing
    enable_attention_rebalancing(model, alpha=0.2, threshold=0.01)  # any supported causal LM

The options live on the model's config (``config.attention_rebalancing = {"alpha": ..., "threshold": ...}``,
``None``: off, the default) and travel with ``save_pretrained``; the backattn model classes switch their
attention to :data:`ATTENTION_REBALANCING` on load whenever that option is set. A stock Transformers class
needs ``attn_implementation="backattn_rebalanced"`` at ``from_pretrained`` (after ``import backattn``).

Supported: every model whose attention modules call ``ALL_ATTENTION_FUNCTIONS`` with a ``layer_idx`` and whose
modeling file defines ``eager_attention_forward`` returning ``(output, weights)``: Llama (SmolLM2) and GPT-2
in Transformers 5 (GPT2Attention calls the interface; its ``reorder_and_upcast_attn`` path included), and
tested on the other families the project carries (Mistral without a window, Qwen2/3, Phi, Phi-3, GPT-NeoX,
Cohere, Granite) and on Gemma and OLMo-2. The weights come from that eager function, so its semantics
(scaling, soft-capping where a family has it) are kept. Refused with an error: sliding-window or other non-full
layers (``config.layer_types``, ``config.sliding_window``, a module's ``sliding_window``: Mistral, Gemma 2/3),
cross-attention, and attention implementations that never form the weights (``sdpa``, flash, flex): the mask
needs ``A_0``.

The per-forward state: layer 0's mask is kept in a thread-local table under the identity of the model's
config and of the causal-mask tensor that Transformers builds once per forward and hands to every layer; the
last layer drops it. Two models (or two threads, or a forward nested inside another's) therefore never read
each other's mask. Layers recomputed on their own (gradient checkpointing) find no mask and are refused.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import sys
import threading
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from .errors import BackattnTypeError, BackattnValueError

#: The name this attention function is registered under (``attn_implementation=`` / ``config._attn_implementation``).
ATTENTION_REBALANCING = "backattn_rebalanced"

#: The config attribute that holds the options (a dict, or None: off).
CONFIG_KEY = "attention_rebalancing"

#: Implementations whose semantics the re-balanced attention reproduces at ``alpha = 0``.
EAGER_IMPLEMENTATIONS = ("eager", ATTENTION_REBALANCING)


@dataclasses.dataclass(frozen=True)
class RebalancingOptions:
    """The two options: ``alpha >= 0`` (the boost at layer 1, falling linearly to none at the last layer) and
    ``0 < threshold < 1`` (the layer-0 attention weight above which a position counts as attended)."""

    alpha: float = 0.2
    threshold: float = 0.01

    def __post_init__(self) -> None:
        for name, value in (("alpha", self.alpha), ("threshold", self.threshold)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise BackattnTypeError(
                    f"attention_rebalancing {name} must be a number, got {type(value).__name__} {value!r}."
                )
            if not math.isfinite(value):
                raise BackattnValueError(f"attention_rebalancing {name} must be finite, got {value!r}.")
        if self.alpha < 0:
            raise BackattnValueError(
                f"attention_rebalancing alpha must be >= 0 (the boost 1 + alpha * (1 - l / (L-1)) of later layers; "
                f"0 leaves the base unchanged, the seed uses 0.2 and 0.5), got {self.alpha!r}."
            )
        if not 0 < self.threshold < 1:
            raise BackattnValueError(
                f"attention_rebalancing threshold must lie strictly between 0 and 1 (a post-softmax attention "
                f"weight; the seed uses 0.01), got {self.threshold!r}."
            )
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "threshold", float(self.threshold))

    @classmethod
    def coerce(cls, value: RebalancingOptions | dict) -> RebalancingOptions:
        """Options from a dict of them (as saved in a config) or options; unknown keys are refused."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise BackattnTypeError(
                f"config.{CONFIG_KEY} must be a dict such as {{'alpha': 0.2, 'threshold': 0.01}} (or None: off), "
                f"got {type(value).__name__} {value!r}."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise BackattnValueError(
                f"config.{CONFIG_KEY} has unknown option(s) {', '.join(map(repr, unknown))}; the options are "
                f"{', '.join(sorted(known))}."
            )
        return cls(**value)

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    def factor(self, layer: int, depth: int) -> float:
        """The boost of layer ``layer`` of ``depth``: ``1 + alpha * (1 - layer / (depth - 1))`` (1 at the last)."""
        return 1.0 + self.alpha * (1.0 - layer / (depth - 1))


def rebalancing_options(value: Any) -> dict[str, float] | None:
    """``config.attention_rebalancing`` checked and normalised (``None`` stays ``None``: off)."""
    return None if value is None else RebalancingOptions.coerce(value).to_dict()


def options_of(config) -> RebalancingOptions | None:
    """The re-balancing options a config holds, or ``None`` (off)."""
    value = getattr(config, CONFIG_KEY, None)
    return None if value is None else RebalancingOptions.coerce(value)


def layer_zero_mask(
    weights: torch.Tensor, threshold: float, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``M = A_0 > threshold`` (batch x heads x queries x keys), each query's own key removed.

    A query's own key is the last key its causal mask lets it see (``attention_mask``, the 4-D mask eager
    attention gets: 0 or ``True`` where allowed): the diagonal without a cache, the newest column in a one-query
    decode step with a dynamic cache, the query's slot in a static cache (whose later slots are masked). Without
    a mask the ``Q`` queries are taken as the last ``Q`` of the ``K`` keys (query ``i`` at key ``K - Q + i``).
    A query that may see no key at all (a padding row) has no own key.
    """
    mask = weights > threshold
    queries, keys = mask.shape[-2:]
    if attention_mask is None:
        rows = torch.arange(queries, device=mask.device)
        mask[..., rows, rows + (keys - queries)] = False
        return mask
    causal = attention_mask[..., -queries:, :keys]
    allowed = causal if causal.dtype == torch.bool else causal > torch.finfo(causal.dtype).min / 2
    positions = torch.arange(keys, device=mask.device, dtype=torch.int32)
    own = torch.where(allowed, positions, -1).amax(dim=-1, keepdim=True)  # batch x 1 x Q x 1
    return mask & (positions != own)


# ----------------------------------------------------------------------------------------------------------
# the per-forward state: layer 0's mask, by thread, model config and the forward's causal-mask tensor


class _MasksInFlight(threading.local):
    """Per thread: ``(id(config), id(causal mask)) -> (causal mask, M)`` for the forwards between their layer 0
    and their last layer. The causal mask is held, so its ``id`` cannot be reused while the entry lives."""

    LIMIT = 16  # entries of forwards that raised before their last layer are dropped, oldest first

    def __init__(self) -> None:
        self.entries: dict[tuple[int, int], tuple[torch.Tensor | None, torch.Tensor]] = {}

    def put(self, config, attention_mask, mask: torch.Tensor) -> None:
        key = (id(config), id(attention_mask))
        self.entries.pop(key, None)
        self.entries[key] = (attention_mask, mask)
        while len(self.entries) > self.LIMIT:
            self.entries.pop(next(iter(self.entries)))

    def get(self, config, attention_mask, layer: int, last: bool) -> torch.Tensor:
        key = (id(config), id(attention_mask))
        entry = self.entries.get(key)
        if entry is None or entry[0] is not attention_mask:
            raise BackattnValueError(
                f"Attention re-balancing: layer {layer} ran without layer 0 of the same forward, so there is no "
                "layer-0 mask to boost. Run the whole decoder in one forward; gradient checkpointing (which "
                "recomputes layers on their own) is not supported with re-balancing."
            )
        if last:
            del self.entries[key]
        return entry[1]


_MASKS = _MasksInFlight()


# ----------------------------------------------------------------------------------------------------------
# the registered attention function


@functools.cache
def _family_eager(module_class: type):
    """The ``eager_attention_forward`` of the modeling file that defines ``module_class``."""
    eager = getattr(sys.modules.get(module_class.__module__), "eager_attention_forward", None)
    if eager is None:
        raise BackattnValueError(
            f"Attention re-balancing reuses the family's eager attention, but {module_class.__module__} defines no "
            f"eager_attention_forward for {module_class.__name__}: this family is not supported."
        )
    return eager


def _check_module(module, kwargs) -> None:
    """Refuse the attention layers whose semantics the re-balancing cannot honour."""
    if getattr(module, "layer_idx", None) is None:
        raise BackattnValueError(
            f"Attention re-balancing needs each attention module's layer index, but {type(module).__name__} has "
            "no layer_idx: build the module inside its model (layer_idx=i)."
        )
    if getattr(module, "is_cross_attention", False):
        raise BackattnValueError(
            "Attention re-balancing is for a decoder's self-attention; this model has cross-attention "
            "(add_cross_attention), which it does not support."
        )
    if kwargs.get("sliding_window") is not None or getattr(module, "sliding_window", None) is not None:
        raise BackattnValueError(
            f"Attention re-balancing does not support sliding-window attention ({type(module).__name__}, layer "
            f"{module.layer_idx}): layer 0's mask spans keys that a windowed layer neither sees nor caches."
        )


def rebalanced_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention with the re-balancing boost (see the module docstring), registered as
    :data:`ATTENTION_REBALANCING`. ``query`` is batch x heads x Q x d, ``key``/``value`` batch x kv-heads x K x d;
    returns the output (batch x Q x heads x d) and the weights that met the values (batch x heads x Q x K; what
    ``output_attentions=True`` returns, boosted in layers 1 .. L-2)."""
    options = options_of(module.config)
    if options is None:
        raise BackattnValueError(
            f"attn_implementation={ATTENTION_REBALANCING!r} needs the re-balancing options on the config: "
            "enable_attention_rebalancing(model, alpha=..., threshold=...) sets both, or set "
            f"config.{CONFIG_KEY} = {{'alpha': 0.2, 'threshold': 0.01}} before loading."
        )
    _check_module(module, kwargs)
    if getattr(module, "reorder_and_upcast_attn", False):  # GPT-2's other eager path, as it runs under "eager"
        output, weights = module._upcast_and_reordered_attn(query, key, value, attention_mask)
    else:
        eager = _family_eager(type(module))
        output, weights = eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    layer, depth = module.layer_idx, module.config.num_hidden_layers
    if options.alpha == 0 or depth < 2:
        return output, weights  # the base's eager attention, exactly
    if layer == 0:
        _MASKS.put(module.config, attention_mask, layer_zero_mask(weights, options.threshold, attention_mask))
        return output, weights
    mask = _MASKS.get(module.config, attention_mask, layer, last=layer == depth - 1)
    if mask.shape != weights.shape:
        raise BackattnValueError(
            f"Attention re-balancing: layer {layer}'s weights have shape {tuple(weights.shape)} but layer 0's mask "
            f"{tuple(mask.shape)}; every layer must attend over the same keys (no sliding windows, no cache that "
            "drops keys)."
        )
    factor = options.factor(layer, depth)
    if factor == 1.0:
        return output, weights  # the last layer
    weights = torch.where(mask, weights * factor, weights)
    heads, kv_heads = weights.shape[1], value.shape[1]
    if heads != kv_heads:  # grouped-query attention: each key/value head serves heads // kv_heads query heads
        batch, _, keys, width = value.shape
        value = value[:, :, None].expand(batch, kv_heads, heads // kv_heads, keys, width)
        value = value.reshape(batch, heads, keys, width)
    boosted = torch.matmul(weights, value).transpose(1, 2).contiguous()
    if boosted.shape != output.shape:
        raise BackattnValueError(
            f"Attention re-balancing: {type(module).__name__}'s eager attention returns an output of shape "
            f"{tuple(output.shape)}, not batch x queries x heads x head_dim {tuple(boosted.shape)}: this family is "
            "not supported."
        )
    return boosted, weights


AttentionInterface.register(ATTENTION_REBALANCING, rebalanced_attention_forward)
AttentionMaskInterface.register(ATTENTION_REBALANCING, eager_mask)  # the float mask eager attention gets


# ----------------------------------------------------------------------------------------------------------
# turning it on and off, and what a model class asks at init


def resolve_attn_implementation(config, requested: str | None) -> str | None:
    """The attention implementation a model with this config must run: :data:`ATTENTION_REBALANCING` when the
    config holds re-balancing options and none was asked for (or that one was), ``requested`` otherwise.

    ``BackattnValueError`` when the options are set but another implementation is asked for (it could not honour
    them, and would silently run the plain base), and when :data:`ATTENTION_REBALANCING` is asked for without
    options."""
    options = options_of(config)
    if options is None:
        if requested == ATTENTION_REBALANCING:
            raise BackattnValueError(
                f"attn_implementation={ATTENTION_REBALANCING!r} needs config.{CONFIG_KEY} (alpha, threshold): use "
                "enable_attention_rebalancing(model, alpha=..., threshold=...)."
            )
        return requested
    if requested not in (None, ATTENTION_REBALANCING):
        raise BackattnValueError(
            f"config.{CONFIG_KEY} = {options.to_dict()} needs the post-softmax attention weights, so the model runs "
            f"attn_implementation={ATTENTION_REBALANCING!r} (eager semantics); {requested!r} cannot honour it. Load "
            f"without attn_implementation, or turn re-balancing off first (disable_attention_rebalancing(model), or "
            f"config.{CONFIG_KEY} = None)."
        )
    return ATTENTION_REBALANCING


def check_supported(model) -> None:
    """``BackattnValueError`` unless every layer of ``model`` can run the re-balanced attention (see the module
    docstring for what is supported)."""
    config = model.config
    name = type(model).__name__
    if hasattr(model, "_can_set_attn_implementation") and not model._can_set_attn_implementation():
        raise BackattnValueError(
            f"{name} does not compute attention through Transformers' attention interface, so attention "
            "re-balancing cannot reach its weights."
        )
    layer_types = getattr(config, "layer_types", None) or []
    other = sorted({t for t in layer_types if t != "full_attention"})
    if other:
        raise BackattnValueError(
            f"Attention re-balancing supports full causal attention in every layer; {name} has {', '.join(other)} "
            "layers (config.layer_types), whose keys differ from layer 0's."
        )
    if getattr(config, "sliding_window", None) is not None:
        raise BackattnValueError(
            f"Attention re-balancing does not support sliding-window attention, and {name} has "
            f"config.sliding_window={config.sliding_window}: layer 0's mask spans keys that a windowed layer neither "
            "sees nor caches. (config.sliding_window = None gives full attention, if the model allows it.)"
        )
    depth = getattr(config, "num_hidden_layers", None)
    attention = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "config") and "Attention" in
                 type(m).__name__]  # fmt: skip
    if not attention or not depth:
        raise BackattnValueError(f"{name} has no attention layers with a layer_idx: attention re-balancing needs them.")
    for module in attention:
        _check_module(module, {})
        _family_eager(type(module))
        _check_one_map_per_layer(type(module))


@functools.cache
def _check_one_map_per_layer(attention_class: type) -> None:
    """Layer 0's mask boosts one attention map per later layer: a module whose forward calls the attention function
    more than once (DiffLlama's two maps) is refused, as its second call would find that layer's state spent."""
    try:
        calls = inspect.getsource(attention_class.forward).count("attention_interface(")
    except (OSError, TypeError):  # no source to read: the per-forward state still refuses a second call clearly
        return
    if calls > 1:
        raise BackattnValueError(
            f"{attention_class.__name__} computes {calls} attention maps per layer (its forward calls the attention "
            f"function {calls} times); attention re-balancing boosts one map per layer and does not support it."
        )


def enable_attention_rebalancing(model, alpha: float = 0.2, threshold: float = 0.01):
    """Turn re-balancing on (or change its options) for ``model``: the options go to
    ``model.config.attention_rebalancing`` (saved with the model) and the model's attention to
    :data:`ATTENTION_REBALANCING`. Returns the model. Errors name unsupported models and bad options."""
    options = RebalancingOptions(alpha=alpha, threshold=threshold)
    check_supported(model)
    before, running = getattr(model.config, CONFIG_KEY, None), model.config._attn_implementation
    setattr(model.config, CONFIG_KEY, options.to_dict())
    try:
        model.set_attn_implementation(ATTENTION_REBALANCING)
        if model.config._attn_implementation != ATTENTION_REBALANCING:
            raise BackattnValueError(f"{type(model).__name__} could not switch its attention to re-balancing.")
    except Exception:
        setattr(model.config, CONFIG_KEY, before)
        raise
    if running != ATTENTION_REBALANCING:
        model._attn_implementation_before_rebalancing = running  # what disable_attention_rebalancing restores
    return model


def disable_attention_rebalancing(model, attn_implementation: str | None = None):
    """Turn re-balancing off: ``config.attention_rebalancing = None`` and the attention back to
    ``attn_implementation`` (``None``: the one the model ran before :func:`enable_attention_rebalancing`, else
    SDPA). Returns the model; on an error (an implementation the model lacks) it is left re-balancing."""
    implementation = attn_implementation or getattr(model, "_attn_implementation_before_rebalancing", None) or "sdpa"
    before = getattr(model.config, CONFIG_KEY, None)
    setattr(model.config, CONFIG_KEY, None)
    try:
        model.set_attn_implementation(implementation)
    except Exception:
        setattr(model.config, CONFIG_KEY, before)
        raise
    return model


def active_rebalancing(model) -> dict[str, float] | None:
    """The options ``model`` re-balances with, or ``None`` if it does not (what a feature cache keys on).

    ``BackattnValueError`` if the config holds options but the model runs another attention implementation
    (a stock class loaded without ``attn_implementation=``): its features would be the plain base's."""
    config = getattr(model, "config", None)
    options = options_of(config)
    running = getattr(config, "_attn_implementation", None)
    if options is None:
        return None
    if running != ATTENTION_REBALANCING:
        raise BackattnValueError(
            f"config.{CONFIG_KEY} = {options.to_dict()}, but the model runs {running!r} attention, so it does not "
            f"re-balance: load it with attn_implementation={ATTENTION_REBALANCING!r} or call "
            "enable_attention_rebalancing(model, ...)."
        )
    return options.to_dict()


__all__ = [
    "ATTENTION_REBALANCING",
    "RebalancingOptions",
    "active_rebalancing",
    "check_supported",
    "disable_attention_rebalancing",
    "enable_attention_rebalancing",
    "layer_zero_mask",
    "rebalanced_attention_forward",
    "resolve_attn_implementation",
]
