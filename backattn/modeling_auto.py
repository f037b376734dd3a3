"""A head-carrying class for every causal-LM architecture ``AutoModelForCausalLM`` knows, made by one factory.

:func:`backward_attention_class` builds, once per architecture (``model_type``), the two classes a family needs:

* ``<Prefix>BackwardAttentionConfig(BackwardAttentionModelFields, <Prefix>Config)``, ``model_type``
  ``"<base type>_backattn"``, the prefix being the base config class's name without ``Config``;
* ``<Prefix>BackwardAttentionForCausalLM(BackwardAttentionForCausalLMMixin, <base causal-LM class>)``;

and registers them as ``backattn`` registers GPT-2 and Llama: with ``AutoConfig`` and ``AutoModelForCausalLM``,
and for ``save_pretrained``'s ``auto_map`` (so a checkpoint also loads with ``trust_remote_code=True`` where
``backattn`` is not installed: the remote module's ``__getattr__`` builds the class a name asks for). A family is
built on first use: by :func:`family_for`, or when ``AutoConfig`` meets its ``model_type`` in a saved checkpoint
(:class:`_FamiliesOnLookup`), so ``AutoModelForCausalLM.from_pretrained`` loads any family's checkpoint once
``backattn`` is imported. GPT-2 and
Llama keep their named classes (``modeling_families.py``); the factory hands those out for ``gpt2`` and ``llama``.

The head must read exactly the logits the stock model produces. Most bases make them as ``l_t = h_t W^T`` (plus a
bias for a few); some post-process them: Gemma 2/3 soft-cap them, ``l = c tanh(l / c)`` with ``c =
config.final_logit_softcapping``; Cohere multiplies by ``config.logit_scale``; Granite divides by
``config.logits_scaling``. :func:`logit_steps` reads the post-processing from the stock class's own ``forward``
(its syntax tree: every statement that reassigns the output layer's result), so nothing is guessed from config
field names; a statement it does not recognise makes the architecture refuse a head with an error naming that
line, rather than give a head logits the base never produced. The models apply those steps in the same order and
with the same operations (bit-for-bit the stock logits), and where they make the ``W^T Vv`` shortcut wrong (any step,
or a bias) the head takes its exact path; the chunked loss applies them inside each chunk.

Like its siblings, this module imports the rest of the package relatively (single-level), so ``save_pretrained``
copies it beside a checkpoint.
"""

from __future__ import annotations

import ast
import functools
import inspect
import re
import textwrap
from collections.abc import Iterator, Mapping

from transformers import AutoConfig, AutoModelForCausalLM
from transformers import __version__ as transformers_version
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import logging

from .configuration_backattn import BackwardAttentionModelFields, _fields_doc
from .errors import BackattnValueError
from .modeling_families import (
    BackwardAttentionForCausalLMMixin,
    GPT2BackwardAttentionForCausalLM,
    LlamaBackwardAttentionForCausalLM,
)

logger = logging.get_logger(__name__)

#: ``model_type`` suffix of a config that carries heads.
SUFFIX = "_backattn"

#: The families written out by name; the factory hands them out for their base types.
NAMED_FAMILIES = {"gpt2": GPT2BackwardAttentionForCausalLM, "llama": LlamaBackwardAttentionForCausalLM}

#: One step of the base's logit post-processing: ``(operation, config attribute)``; ``"softcap"`` is
#: ``c tanh(l / c)``, ``"multiply"`` ``l * s``, ``"divide"`` ``l / s``; a step whose attribute is ``None`` is skipped.
LogitStep = tuple[str, str | None]


def base_type_of(model_type: str) -> str:
    """The stock ``model_type`` of a base or of a config that carries heads (``"qwen2_backattn"`` -> ``"qwen2"``)."""
    return model_type.removesuffix(SUFFIX) if isinstance(model_type, str) else model_type


def supported_model_types() -> list[str]:
    """Every ``model_type`` ``AutoModelForCausalLM`` maps to a class (not all of them can carry a head: see
    :func:`backward_attention_class`)."""
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def backward_attention_class(model_type: str) -> type:
    """The head-carrying model class for a base of this ``model_type`` (plain, or ``"..._backattn"``), built and
    registered the first time; :class:`~backattn.errors.BackattnValueError` naming the reason (and what to do)
    when the architecture cannot carry a head."""
    if not isinstance(model_type, str):
        raise BackattnValueError(f"model_type must be a string such as 'qwen2', got {model_type!r}.")
    return _family(base_type_of(model_type), model_type)


@functools.cache
def _family(base_type: str, model_type: str) -> type:
    if base_type in NAMED_FAMILIES:
        return NAMED_FAMILIES[base_type]
    if base_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        close = [t for t in supported_model_types() if t.startswith(str(base_type)[:4])][:8]
        hint = f" Close names: {', '.join(close)}." if close else ""
        raise BackattnValueError(
            f"No backward-attention family for model_type {model_type!r}: AutoModelForCausalLM knows no causal-LM "
            f"architecture of that type (in this Transformers version).{hint} A head attaches to any type that "
            "backattn.modeling_auto.supported_model_types() lists; for a model whose code lives in its own "
            "repository (trust_remote_code), no head family can be made."
        )
    if model_type != base_type:  # "qwen2_backattn": the one class of "qwen2"
        return _family(base_type, base_type)
    base_config = CONFIG_MAPPING[base_type]
    base_class = MODEL_FOR_CAUSAL_LM_MAPPING[base_config]
    base_class = base_class[0] if isinstance(base_class, (tuple, list)) else base_class  # the first, as Auto does
    _check_text_config(base_type, base_config, base_class)
    steps = logit_steps(base_class)
    prefix = base_config.__name__.removesuffix("Config")
    config_name, model_name = f"{prefix}BackwardAttentionConfig", f"{prefix}BackwardAttentionForCausalLM"
    config_class = type(
        config_name,
        (BackwardAttentionModelFields, base_config),
        {
            "model_type": base_type + SUFFIX,
            "__module__": __name__,
            "__qualname__": config_name,
            "__doc__": f"A :class:`~transformers.{base_config.__name__}` plus the backward-attention heads "
            f"attached to the model (made by backattn.modeling_auto).\n\n{_fields_doc(BackwardAttentionModelFields)}\n",
        },
    )
    model_class = type(
        model_name,
        (BackwardAttentionForCausalLMMixin, base_class),
        {
            "config_class": config_class,
            "logit_steps": steps,
            "__module__": __name__,
            "__qualname__": model_name,
            "__doc__": f"A {base_class.__name__} (frozen) with backward-attention heads on its logits (made by "
            "backattn.modeling_auto).",
        },
    )
    # Transformers 5 renames checkpoint keys by model_type or class name (GPT-NeoX's `embed_out` is `lm_head` in
    # the model): the family loads and saves the base's checkpoints with the base's renamings
    renamings = get_checkpoint_conversion_mapping(base_class.__name__) or get_checkpoint_conversion_mapping(base_type)
    if renamings:
        register_checkpoint_conversion_mapping(model_name, renamings, overwrite=True)
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)
    config_class.register_for_auto_class()
    model_class.register_for_auto_class("AutoModelForCausalLM")
    return model_class


def _check_text_config(base_type: str, base_config: type, base_class: type) -> None:
    """Refuse composite (multimodal) configs: the head needs one vocabulary, one hidden size, one output layer."""
    composite = [
        k
        for k in getattr(base_config, "sub_configs", None) or {}
        if k.endswith(("text_config", "vision_config", "audio_config", "encoder", "decoder"))
    ]  # fmt: skip  (DBRX's attn_config and ffn_config are fine)
    if composite:
        text = f"{base_type}_text"
        hint = (
            f" Load its text model instead (model_type {text!r})." if text in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else ""
        )
        raise BackattnValueError(
            f"{base_class.__name__} (model_type {base_type!r}) cannot carry a backward-attention head: "
            f"its config holds sub-configs ({', '.join(composite)}), not one text decoder's vocabulary and width."
            + hint
        )


# --------------------------------------------------------------------------------------------------------
# the base's logit post-processing, read from its forward

#: Statements the stock forwards use to post-process ``logits = self.lm_head(...)``, as ``ast.unparse`` writes
#: them with the variable named ``x``, and the steps each is (``None``: part of the soft-capping that its first
#: statement, ``x / c``, stands for). A cast to float32 is a step: a bf16 base soft-caps in float32 (Beam).
_FLOAT: LogitStep = ("float", None)
_KNOWN_STATEMENTS = {
    "x / self.config.final_logit_softcapping": [("softcap", "final_logit_softcapping")],
    "torch.tanh(x)": None,  # the middle of soft-capping
    "x * self.config.final_logit_softcapping": None,  # its end
    "x * self.logit_scale": [("multiply", "logit_scale")],
    "x * self.config.logit_scale": [("multiply", "logit_scale")],
    "x / self.config.logits_scaling": [("divide", "logits_scaling")],
    "x / self.logits_scaling": [("divide", "logits_scaling")],
    "x * self.config.logits_scaling": [("multiply", "logits_scaling")],
    "x.float() / self.config.final_logit_softcapping": [_FLOAT, ("softcap", "final_logit_softcapping")],
    "x.float()": [_FLOAT],
    "x.to(torch.float32)": [_FLOAT],
    "x.contiguous()": [],  # a memory layout
}


@functools.cache
def logit_steps(base_class: type) -> tuple[LogitStep, ...]:
    """The post-processing ``base_class.forward`` applies to its output layer's result, as :data:`LogitStep` s.

    Read from the syntax tree of the forward (``inspect.getsource``): the variable first assigned from a call of
    ``self.lm_head``, then every later statement assigning that variable, each matched against
    :data:`_KNOWN_STATEMENTS`. ``BackattnValueError`` for one that is not known, or when no ``self.lm_head`` call
    is found (the head would not know which logits the base returns)."""
    forward = next(c.forward for c in base_class.__mro__ if "forward" in vars(c))
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(forward)))
    except (OSError, TypeError, SyntaxError) as error:  # e.g. Transformers installed without its .py sources
        raise BackattnValueError(
            f"{base_class.__name__}: backattn reads the base's logit post-processing from the source of its forward, "
            f"which cannot be read here ({error}); install Transformers with its Python sources."
        ) from error
    assignments = sorted(
        (n for n in ast.walk(tree) if isinstance(n, (ast.Assign, ast.AugAssign))),
        key=lambda n: (n.lineno, n.col_offset),
    )  # in the order of the source
    variable, steps, softcap_parts = None, [], 0
    for node in assignments:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        names = [t.id for t in targets if isinstance(t, ast.Name)]
        value = node.value if isinstance(node, ast.Assign) else ast.BinOp(targets[0], node.op, node.value)
        if not names or (variable is None and not _calls_lm_head(value)) or (variable and variable not in names):
            continue
        if variable is None:
            _check_output_layer_input(base_class, value)
        variable = variable or names[0]
        statement = _normalised(value, variable)
        if statement == "x":  # logits = self.lm_head(...)
            continue
        if statement not in _KNOWN_STATEMENTS:
            raise BackattnValueError(
                f"{base_class.__name__} cannot carry a backward-attention head: its forward post-processes the "
                f"output layer's logits with `{variable} = {ast.unparse(value)}`, which backattn does not know, so "
                "the head could not read the logits the base returns. Open an issue naming the architecture."
            )
        known = _KNOWN_STATEMENTS[statement]
        softcap_parts += known is None
        steps += known or []
    if variable is None:
        raise BackattnValueError(
            f"{base_class.__name__} cannot carry a backward-attention head: its forward makes no logits with "
            "self.lm_head(...), so the head would not know which logits the base returns."
        )
    if softcap_parts != 2 * sum(step[0] == "softcap" for step in steps):
        raise BackattnValueError(
            f"{base_class.__name__} cannot carry a backward-attention head: its forward soft-caps the logits in a "
            "form backattn does not know (expected l / c, tanh, * c)."
        )
    return tuple(steps)


def _calls_lm_head(node: ast.AST) -> bool:
    return any(
        isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "lm_head"
        for n in ast.walk(node)
    )


def _check_output_layer_input(base_class: type, value: ast.AST) -> None:
    """The output layer must read the decoder's states as they are: a name, its positions (``h[:, s, :]``), or a
    cast of either; anything else (``self.lm_head(h * m)``) would be logits the head does not reproduce."""
    call = next(n for n in ast.walk(value) if isinstance(n, ast.Call) and getattr(n.func, "attr", None) == "lm_head")
    argument = call.args[0] if len(call.args) == 1 and not call.keywords else None
    while (
        isinstance(argument, ast.Call)
        and isinstance(argument.func, ast.Attribute)
        and argument.func.attr in ("to", "float", "contiguous")
    ):
        argument = argument.func.value
    if isinstance(argument, ast.Subscript):
        argument = argument.value
    if not isinstance(argument, ast.Name):
        raise BackattnValueError(
            f"{base_class.__name__} cannot carry a backward-attention head: its output layer reads "
            f"`{ast.unparse(call)}`, not the decoder's hidden states as they are, so the head could not read the "
            "logits the base returns. Open an issue naming the architecture."
        )


def _normalised(value: ast.AST, variable: str) -> str:
    """The statement's right-hand side with the logits variable written ``x`` (and the lm_head call too)."""
    text = ast.unparse(value)
    text = re.sub(r"self\.lm_head\([^()]*(\([^()]*\))?[^()]*\)", "x", text)
    return re.sub(rf"\b{re.escape(variable)}\b", "x", text)


# --------------------------------------------------------------------------------------------------------
# a saved checkpoint of any family loads through the Auto classes once backattn is imported


class _FamiliesOnLookup(dict):
    """``AutoConfig``'s table of registered configs (``CONFIG_MAPPING._extra_content``), which also answers a
    ``"<base type>_backattn"`` it does not hold yet by building that family (which registers it here and with
    ``AutoModelForCausalLM``). So ``AutoModelForCausalLM.from_pretrained`` of a checkpoint saved by any family
    works in a process that imported ``backattn``, as it does for GPT-2 and Llama, without building every
    architecture's classes (and importing every modeling module) at import time. A family that cannot be made is
    refused once, with its reason logged (Transformers then reports the type as unrecognised)."""

    refused: dict[str, str] = {}

    def __contains__(self, key: object) -> bool:
        if dict.__contains__(self, key):
            return True
        if not (
            isinstance(key, str) and key.endswith(SUFFIX) and base_type_of(key) in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        ):
            return False
        if key in self.refused:
            return False
        try:
            backward_attention_class(key)
        except BackattnValueError as error:
            self.refused[key] = str(error)
            logger.warning(f"A checkpoint of model_type {key!r} cannot be loaded: {error}")
            return False
        return dict.__contains__(self, key)


def _build_families_on_lookup() -> None:
    """Put :class:`_FamiliesOnLookup` in place of ``CONFIG_MAPPING._extra_content`` (once; Transformers 5 reads that
    dict with ``in`` before every lookup); left alone if a later Transformers keeps something else there."""
    extra = getattr(CONFIG_MAPPING, "_extra_content", None)
    if type(extra) is dict:
        CONFIG_MAPPING._extra_content = _FamiliesOnLookup(extra)
    elif not isinstance(extra, _FamiliesOnLookup):
        logger.warning(
            f"backattn could not hook AutoConfig's table of registered configs in Transformers {transformers_version} "
            f"(CONFIG_MAPPING._extra_content is {type(extra).__name__}): a checkpoint saved by a head-carrying family "
            "other than GPT-2's and Llama's loads only after backattn.family_for(<base model_type>) has built it."
        )


_build_families_on_lookup()


# --------------------------------------------------------------------------------------------------------
# every family by model_type, and the classes by name (remote code asks the module for them)


class _Families(Mapping):
    """``model_type`` -> head-carrying class, for every causal-LM type (``FAMILIES[t]`` builds it the first time;
    ``t in FAMILIES`` says whether one can be made). Iterates over the types ``AutoModelForCausalLM`` knows."""

    def __getitem__(self, model_type: str) -> type:
        try:
            return backward_attention_class(model_type)
        except BackattnValueError as error:
            raise KeyError(model_type) from error

    def __contains__(self, model_type: object) -> bool:
        try:
            backward_attention_class(model_type)
        except BackattnValueError:
            return False
        return True

    def __iter__(self) -> Iterator[str]:  # the types that can carry a head (builds each family to find out)
        return (model_type for model_type in supported_model_types() if model_type in self)

    def __len__(self) -> int:
        return sum(1 for _ in self)


FAMILIES = _Families()


def family_for(model_type: str) -> type:
    """The backattn model class for a base of this ``model_type`` (see :func:`backward_attention_class`)."""
    return backward_attention_class(model_type)


@functools.cache
def _model_type_of_prefix() -> dict[str, str]:
    """The class-name prefix (the base config's name without ``Config``) of every causal-LM ``model_type``."""
    prefixes = {}
    for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        config_name = CONFIG_MAPPING_NAMES.get(model_type)
        if config_name:
            prefixes.setdefault(config_name.removesuffix("Config"), model_type)
    return prefixes


def __getattr__(name: str):
    """``<Prefix>BackwardAttentionForCausalLM`` and ``<Prefix>BackwardAttentionConfig`` by name: what an ``auto_map``
    names, when Transformers loads this module as remote code (``trust_remote_code=True``), or pickle."""
    match = re.fullmatch(r"(\w+?)BackwardAttention(ForCausalLM|Config)", name)
    model_type = _model_type_of_prefix().get(match.group(1)) if match else None
    if model_type is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    model_class = backward_attention_class(model_type)
    return model_class if match.group(2) == "ForCausalLM" else model_class.config_class


__all__ = ["FAMILIES", "NAMED_FAMILIES", "backward_attention_class", "family_for", "logit_steps",
           "supported_model_types"]  # fmt: skip
