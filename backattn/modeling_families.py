"""The causal-LM families that carry backward-attention heads on a frozen base: GPT-2 and Llama.

:class:`BackwardAttentionForCausalLMMixin` is what every family shares: setting up the heads on the base,
``forward`` and ``generate``, and short methods that delegate to the heads container (``heads.py``) and
to the head files (``head_files.py``). The head's maths is in ``modeling_backattn.py``, the fast paths the
forward runs in ``head_kernels.py``, the chunked training loss in ``head_loss.py``.

Every sibling is imported relatively, so ``save_pretrained`` copies them beside a checkpoint and it loads
with ``trust_remote_code=True`` where ``backattn`` is not installed.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import json
import logging
import os
import re
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from transformers import GPT2LMHeadModel, LlamaForCausalLM
from transformers.modeling_flash_attention_utils import FlashAttentionKwargs
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils import logging as transformers_logging
from transformers.utils.generic import TransformersKwargs, can_return_tuple

from .attention_rebalancing import resolve_attn_implementation
from .configuration_backattn import BackwardAttentionConfig, GPT2BackwardAttentionConfig, LlamaBackwardAttentionConfig
from .errors import BackattnTypeError, BackattnValueError
from .head_files import embedding_fingerprint, load_head, push_head_to_hub, save_head  # the methods' namesakes
from .head_kernels import head_logits, weight_tables
from .head_loss import (
    FusedHeadOutput,
    base_kl_penalty,
    head_cross_entropy,
    head_token_log_probs,
    label_word_loss,
)
from .heads import BackwardAttentionHeads, FanOutOutput, HeadsDisabled
from .modeling_backattn import BackwardAttentionHead, BackwardAttentionLayer, CopyInputs, SequenceContext
from .sharding import full_tensor, gather_output_tables, local_tensor

#: Where ``save_pretrained`` puts the heads beside a PEFT adapter: ``heads/<name>/`` and ``heads/heads.json``.
HEADS_DIRNAME, HEADS_STATE_NAME = "heads", "heads.json"
HEADS_STATE_KEYS = ("head_order", "active_head", "heads_enabled", "frozen_heads")

#: Keywords forward takes beyond its named arguments, for every family: Transformers' own (attention and
#: loss options), and the loss's ``ignore_index`` / ``shift_labels``; plus the family's forward arguments.
_TRANSFORMERS_KEYWORDS = frozenset(
    {*TransformersKwargs.__optional_keys__, *FlashAttentionKwargs.__optional_keys__, "ignore_index", "shift_labels"}
)


@functools.cache
def _accepted_keywords(model_class: type) -> frozenset:
    """The keyword arguments ``model_class.forward`` takes through ``**kwargs``: Transformers' ones and the named
    arguments of the base family's own forward (e.g. GPT-2's ``token_type_ids``)."""
    family = next(c for c in model_class.__mro__ if c.__module__.startswith("transformers.") and "forward" in vars(c))
    parameters = inspect.signature(family.forward).parameters.values()
    named = {parameter.name for parameter in parameters if parameter.kind is parameter.POSITIONAL_OR_KEYWORD}
    return _TRANSFORMERS_KEYWORDS | named


class BackwardAttentionForCausalLMMixin:
    """Named task heads on a frozen base, the head API, and ``forward``.

    Put it first in the bases, before the family's ``...ForCausalLM`` class, which provides
    ``self.base_model`` (the decoder), ``self.lm_head`` and ``get_input_embeddings()``.

    The heads live in ``self.heads`` (a :class:`~backattn.heads.BackwardAttentionHeads`, which keeps their
    options in ``config.heads``), so ``save_pretrained`` / ``from_pretrained`` keep every resident head. The
    methods follow the Transformers adapter API with ``head`` for ``adapter`` (``add_head``, ``load_head``,
    ``set_head``, ``active_head``, ``disable_heads`` / ``enable_heads``, ``delete_head``, ``save_head``,
    ``push_head_to_hub``), which leaves the inherited PEFT adapter methods free for LoRA on the base: the
    ``*_adapter`` methods drive LoRA (``add_adapter`` / ``load_adapter`` leave the heads training as they
    were, and ``save_pretrained`` saves the heads beside the adapter), the ``*_head(s)`` methods the heads.
    ``print_trainable_parameters`` and ``get_nb_trainable_parameters`` are PEFT's. TRL's trainers work as
    they are: their fused LM head goes through the head (see ``__setattr__`` and ``forward``).
    """

    def __init__(
        self, config, head_config: BackwardAttentionConfig | dict | str | None = None, head_name: str = "default"
    ):
        if not isinstance(config, self.config_class):  # a stock config of the base family, e.g. GPT2Config
            config = self.config_class.from_dict(config.to_dict())
        if head_config is not None:
            BackwardAttentionHeads.attach_to_config(config, head_name, BackwardAttentionConfig.coerce(head_config))
        super().__init__(config)

    def post_init(self):
        # Called at the end of the family's __init__: the heads join the model before weights are initialised.
        self.heads = BackwardAttentionHeads(self.config)
        self._fingerprint_cache: tuple[tuple, str] | None = None
        self._fused_lm_head_options = {"temperature": 1.0}
        frozen = list(self.config.frozen_heads or [])
        for name, options in list(self.config.heads.items()):
            self.heads.add(name, self.build_head(BackwardAttentionConfig.from_dict(options)))
        self.config.frozen_heads = frozen
        super().post_init()
        self.freeze_base()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """``PreTrainedModel.from_pretrained``, then the base frozen again (loading makes fresh parameters).

        On a plain base checkpoint, ``head_config=`` (a :class:`BackwardAttentionConfig`, a dict of its
        options or a preset name) attaches a fresh head: the base weights load unchanged and only the head
        is initialised.
        """
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model.freeze_base()
        model.heads.apply_trainable()  # each head trains, or not, as it did when saved
        source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        model.check_finite_heads(source)
        return loaded

    def check_finite_heads(self, source: str | os.PathLike | None = None) -> None:
        """``BackattnValueError`` naming the first head tensor that holds NaN or inf (as loaded from ``source``).

        ``from_pretrained`` calls it, as ``load_head`` checks a head file: a damaged head would otherwise load
        and turn every logit into NaN. The heads are small, so this costs little next to loading the base.
        """
        for name, tensor in self.heads.state_dict(prefix="heads.").items():
            if tensor.is_floating_point() and tensor.device.type != "meta" and not torch.isfinite(tensor).all():
                where = ""
                if source is not None:
                    where = f" loaded from {source}"
                    weights = [
                        f for f in ("model.safetensors", "pytorch_model.bin") if os.path.isfile(os.path.join(source, f))
                    ]
                    if weights:
                        where += f" ({os.path.join(source, weights[0])})"
                raise BackattnValueError(
                    f"Head tensor {name!r}{where} holds NaN or inf values: the checkpoint's head is damaged. "
                    "Save the model again from a healthy copy, or delete the head (model.delete_head) and train "
                    "a new one."
                )

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, (BackwardAttentionLayer, BackwardAttentionHead)):
            module.reset_parameters()

    def freeze_base(self) -> None:
        """Freeze every base parameter (the embedding table too); the heads keep their own setting."""
        for name, parameter in self.named_parameters():
            if not name.startswith("heads."):
                parameter.requires_grad_(False)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)``: the number of parameters that train and of all parameters, as PEFT's."""
        trainable = total = 0
        for parameter in self.parameters():
            count = parameter.numel()
            total += count
            trainable += count if parameter.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print the counts of ``get_nb_trainable_parameters`` as PEFT's method of this name does."""
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    def train(self, mode: bool = True):
        """The frozen base always runs in eval mode (no dropout), so its features are deterministic."""
        super().train(mode)
        self.base_model.eval()
        return self

    def _check_and_adjust_attn_implementation(self, attn_implementation, is_init_check=False, allow_all_kernels=False):
        """Transformers' check of the attention implementation, after ``config.attention_rebalancing`` had its say:
        with re-balancing options set the model runs the re-balanced eager attention (``attention_rebalancing.py``),
        and asking for another implementation is refused rather than silently running the plain base."""
        attn_implementation = resolve_attn_implementation(self.config, attn_implementation)
        return super()._check_and_adjust_attn_implementation(
            attn_implementation, is_init_check=is_init_check, allow_all_kernels=allow_all_kernels
        )

    def build_head(self, head_config: BackwardAttentionConfig) -> BackwardAttentionHead:
        """A fresh head for this base, beside its output layer; ``ValueError`` if made for another base (or if
        its ``query_layers`` name a decoder block this base does not have).

        On a bfloat16 or float16 base the head's weights are float32 (as PEFT's ``autocast_adapter_dtype`` keeps
        adapters): the head then computes in float32 from the base's half-precision logits and states, so its
        softmax over the vocabulary, its norms and the loss accumulate in float32, and an optimiser's updates are
        not lost to half-precision rounding (Adam's ``eps`` of 1e-8 is 0 in float16). ``model.to(dtype)`` still
        casts the heads too, as it casts every parameter."""
        head = BackwardAttentionHead(head_config.for_base(self.config.vocab_size, self.config.hidden_size))
        depth = self.config.num_hidden_layers
        beyond = [k for k in head_config.query_layers or () if k >= depth]
        if beyond:
            raise BackattnValueError(
                f"query_layers {head_config.query_layers} name decoder block(s) {beyond}, but this base has "
                f"{depth} blocks (0-{depth - 1})."
            )
        dtype = self.lm_head.weight.dtype
        dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
        return head.to(device=self.lm_head.weight.device, dtype=dtype)

    # ----------------------------------------------------------------------------------------------------
    # what heads read beyond each position's final hidden state: query_layers' states, copy_attention's context

    def decoder_layers(self) -> nn.ModuleList:
        """The base's decoder blocks, in order (``query_layers`` indexes them): the decoder's (``self.base_model``)
        ``layers``, ``h`` or ``blocks`` (Llama's ``model.layers``, GPT-2's ``transformer.h``, ...), else the first
        ``nn.ModuleList`` of ``config.num_hidden_layers`` modules whose class names say they are layers or blocks
        (not, say, a list of per-layer norms registered before the blocks)."""
        depth = self.config.num_hidden_layers

        def blocks(module) -> bool:
            names = [type(m).__name__.lower() for m in module] if isinstance(module, nn.ModuleList) else []
            return len(names) == depth and all("layer" in name or "block" in name for name in names)

        for name in ("layers", "h", "blocks"):
            if blocks(getattr(self.base_model, name, None) or ()):
                return getattr(self.base_model, name)
        for module in self.base_model.modules():
            if isinstance(module, nn.ModuleList) and blocks(module):
                return module
        raise BackattnValueError(
            f"{type(self).__name__}: no list of {depth} decoder blocks (config.num_hidden_layers) found in the base "
            "model, so query_layers cannot name its blocks: use a head without query_layers on this architecture."
        )

    def feature_layers(self) -> list[int]:
        """The decoder blocks whose outputs some resident head reads (``query_layers``), sorted; a feature cache
        built for this model stores them beside the final hidden states."""
        return sorted({k for head in self.heads.values() for k in head.config.query_layers or ()})

    def _reads_context(self) -> bool:
        return any(head.config.query_layers is not None or head.config.copy_attention for head in self.heads.values())

    @contextlib.contextmanager
    def capture_block_outputs(self, layers: list[int]):
        """``with model.capture_block_outputs([k, ...]) as states:`` around a base forward: ``states[k]`` is then
        the output of decoder block ``k`` (batch x sequence x hidden), taken by a forward hook, before the base's
        final norm (which the base applies to its last block's output only). Exact, and costs no extra compute."""
        states: dict[int, torch.Tensor] = {}
        blocks = self.decoder_layers() if layers else []

        def keeper(index: int):
            def keep(module, inputs, output):
                states[index] = output[0] if isinstance(output, tuple) else output

            return keep

        handles = [blocks[k].register_forward_hook(keeper(k)) for k in layers]
        try:
            yield states
        finally:
            for handle in handles:
                handle.remove()

    def _given_layer_states(self, base_layer_states, hidden: torch.Tensor) -> dict[int, torch.Tensor]:
        """``base_layer_states`` checked (block index -> a tensor shaped as ``base_hidden_states``) and cast."""
        if base_layer_states is None:
            return {}
        if not isinstance(base_layer_states, dict):
            raise BackattnTypeError(
                f"base_layer_states must map decoder block indices to their states (batch x sequence x hidden), "
                f"got {_describe(base_layer_states)}."
            )
        states = {}
        for k, value in base_layer_states.items():
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(hidden.shape):
                raise BackattnValueError(
                    f"base_layer_states[{k!r}] must be a tensor of shape {tuple(hidden.shape)} (as "
                    f"base_hidden_states), got {_describe(value)}."
                )
            states[int(k)] = value.to(device=hidden.device, dtype=hidden.dtype)
        return states

    def _sequence_context(
        self, hidden, layer_states, input_ids, attention_mask, cache, past_length, logits_to_keep, heads
    ) -> SequenceContext | None:
        """The :class:`SequenceContext` of this forward, for heads that read it (``None`` when none does).

        ``hidden`` and ``layer_states`` are this call's (all its positions, before ``logits_to_keep``), ``cache``
        the KV cache the base filled and ``past_length`` how many positions it held before this call. For copy
        heads the context is every position so far: the cached ones come from the memory this model keeps on
        the cache object (:func:`_keep_context`), and this call's are added to that memory.
        """
        if not self._reads_context():
            return None
        batch, length = hidden.shape[:2]
        copying = any(head.config.copy_attention for head in self.heads.values())
        kept = getattr(cache, "_backattn_context", None) if copying and past_length else None
        if kept is not None and (kept.hidden.shape[1] < past_length or not set(layer_states) <= set(kept.layer_states)):
            kept = None  # shorter than the cache, or without a block a head added since reads
        if copying and past_length and kept is None:
            if self._copy_serves(heads):
                raise BackattnValueError(
                    f"This head copies from earlier positions (copy_attention), but the KV cache holds {past_length} "
                    "positions whose states this model did not keep: fill the cache through this model (generate, "
                    "or forward with use_cache=True) with its heads resident, not through the base alone."
                )
            copying = False
        start = past_length if kept is not None else 0
        if attention_mask is None:
            mask = torch.ones(batch, length, dtype=torch.bool, device=hidden.device)
        else:
            mask = attention_mask.to(device=hidden.device, dtype=torch.bool)
            if mask.dim() != 2 or mask.shape[1] not in (past_length + length, length):
                raise BackattnValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}; a head that reads the sequence "
                    f"(query_layers, copy_attention) needs a 2-D mask over the {past_length + length} positions so "
                    "far (or over this call's positions)."
                )
            mask = mask[:, mask.shape[1] - length :]  # this call's positions
        if kept is not None:
            kept = kept.map(lambda t: t[:, :past_length])  # a cropped cache: drop what it no longer holds
            hidden = torch.cat([kept.hidden.to(hidden.dtype), hidden], dim=1)
            layer_states = {k: torch.cat([kept.layer_states[k].to(v.dtype), v], 1) for k, v in layer_states.items()}
            mask = torch.cat([kept.attention_mask.to(mask.device), mask], dim=1)
            if input_ids is not None:
                input_ids = torch.cat([kept.input_ids.to(input_ids.device), input_ids], dim=1)
        if copying and cache is not None and input_ids is not None and hasattr(cache, "get_seq_length"):
            states = {k: v.detach() for k, v in layer_states.items()}
            _keep_context(cache, _ContextMemory(hidden.detach(), states, input_ids, mask))
        if isinstance(logits_to_keep, int):
            kept_positions = torch.arange(length - logits_to_keep if logits_to_keep else 0, length)
        else:
            kept_positions = logits_to_keep.reshape(-1).to(torch.long) % length
        positions = (start + kept_positions.to(hidden.device))[None].expand(batch, -1)
        return SequenceContext(hidden, layer_states, input_ids, mask, positions)

    def _copy_serves(self, heads) -> bool:
        """Whether a copy head serves this call (the active one, or one that ``heads=`` names)."""
        if not self.heads.enabled:
            return False
        names = self.heads.names()
        serving = [self.active_head()] if heads is None else [names[i] for i in set(self.heads.route(heads).tolist())
                                                               if i >= 0]  # fmt: skip
        return any(name is not None and self.heads[name].config.copy_attention for name in serving)

    # ----------------------------------------------------------------------------------------------------
    # the head API: the heads container and the head files do the work

    def list_heads(self) -> list[str]:
        """Names of the resident heads, in the order they were added."""
        return self.heads.names()

    def active_head(self) -> str | None:
        """The head that scores the next token, or ``None`` (no head active, or heads disabled)."""
        return self.heads.active

    def add_head(
        self,
        head_config: BackwardAttentionConfig | dict | str | None = None,
        head_name: str = "default",
        freeze_others: bool = True,
    ) -> None:
        """Attach a fresh, trainable head and make it the active one (as ``add_adapter`` does).

        As with Transformers' ``add_adapter`` (and PEFT's ``set_adapter``), only the new head trains: the
        heads already resident are frozen, unless ``freeze_others=False`` leaves them as they were.
        """
        self.heads.add(head_name, self.build_head(BackwardAttentionConfig.coerce(head_config)))
        self.heads.set_active(head_name)
        self.heads.set_trainable(head_name, others=False if freeze_others else None)

    def set_head(self, head_name: str) -> None:
        """Make a resident head the active one; no weights are copied, and no head's trainable setting changes.

        Takes one head name: ``None`` or a list are refused (:class:`~backattn.errors.BackattnTypeError`);
        the base's own logits come from ``disable_heads()``, and ``heads=`` in forward or generate serves
        several heads in one batch.
        """
        self.heads.set_active(head_name)

    def set_trainable_heads(self, head_names: str | list[str], others: bool | None = False) -> None:
        """Make the heads ``head_names`` train (``requires_grad``); the other heads are frozen
        (``others=False``), made to train (``True``) or left as they are (``None``)."""
        self.heads.set_trainable(head_names, others)

    def disable_heads(self) -> HeadsDisabled:
        """Give the base model's own logits, exactly, until ``enable_heads``; or, as ``with
        model.disable_heads(): ...`` (as PEFT's ``disable_adapter``), until the block ends."""
        return self.heads.disable()

    def enable_heads(self) -> None:
        self.heads.enable()

    def delete_head(self, head_name: str) -> None:
        """Remove a resident head; if it was active, no head is active afterwards."""
        self.heads.remove(head_name)

    def embedding_fingerprint(self) -> str:
        """A fingerprint of the base's input-embedding table, recorded in head files to refuse the wrong base."""
        embeddings = self.get_input_embeddings().weight
        key = (local_tensor(embeddings).data_ptr(), embeddings._version, embeddings.shape)
        if self._fingerprint_cache is None or self._fingerprint_cache[0] != key:
            # A sharded table is gathered (a collective): a sharded run calls this on every process first.
            self._fingerprint_cache = (key, embedding_fingerprint(full_tensor(embeddings)))
        return self._fingerprint_cache[1]

    # The head files: each function of head_files.py takes the model first, so it serves as the method itself.
    save_head = save_head
    load_head = load_head
    push_head_to_hub = push_head_to_hub

    # ----------------------------------------------------------------------------------------------------
    # saving, and LoRA on the base through Transformers' PEFT integration (the *_adapter methods)

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        """``PreTrainedModel.save_pretrained``, with each head's trainable setting recorded in the config.

        With a LoRA (or other PEFT) adapter attached through ``add_adapter`` / ``load_adapter``, Transformers
        saves the adapter alone (``adapter_config.json``, ``adapter_model.safetensors``); every resident head
        is then saved beside it too, in ``heads/<name>`` (as ``save_head`` does) with ``heads/heads.json``
        (their order, the active head, the enabled state, what is frozen). ``load_adapter`` and
        ``from_pretrained`` of that directory put both back.
        """
        self.heads.record_trainable()
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if getattr(self, "_hf_peft_config_loaded", False) and kwargs.get("is_main_process", True) and len(self.heads):
            directory = Path(save_directory) / HEADS_DIRNAME
            for name in self.list_heads():
                self.save_head(directory / name, head_name=name, overwrite_model_card=True)
            state = {key: getattr(self.config, key) for key in HEADS_STATE_KEYS}
            (directory / HEADS_STATE_NAME).write_text(json.dumps(state, indent=2) + "\n")
        return result

    @contextlib.contextmanager
    def _heads_kept_trainable(self):
        """PEFT freezes every parameter outside the adapter it injects; the heads are not PEFT's to freeze."""
        flags = [(parameter, parameter.requires_grad) for parameter in self.heads.parameters()]
        try:
            yield
        finally:
            for parameter, trains in flags:
                parameter.requires_grad_(trains)

    def add_adapter(self, adapter_config, adapter_name: str | None = None) -> None:
        """Transformers' ``add_adapter`` (LoRA and other PEFT adapters on the base's layers), the heads
        left training as they were: a LoRA on the base and a head on top train together. Adapter names
        and head names are separate: a LoRA ``"default"`` and a head ``"default"`` do not meet."""
        with self._heads_kept_trainable():
            super().add_adapter(adapter_config, adapter_name)

    def load_adapter(self, peft_model_id: str | None = None, *args, **kwargs):
        """Transformers' ``load_adapter``, the heads left training as they were; when the directory also holds
        heads saved by ``save_pretrained`` (``heads/``), they are loaded too, in their order, the saved
        active head, enabled state and trainable settings restored (a resident head of the same name and
        options takes the saved weights in place)."""
        with self._heads_kept_trainable():
            result = super().load_adapter(peft_model_id, *args, **kwargs)
        directory = Path(peft_model_id) / HEADS_DIRNAME if peft_model_id is not None else None
        if directory is not None and (directory / HEADS_STATE_NAME).is_file():
            self._load_saved_heads(directory)
        return result

    def _load_saved_heads(self, directory: Path) -> None:
        """Load the heads ``save_pretrained`` wrote beside an adapter, with their saved state."""
        state = json.loads((directory / HEADS_STATE_NAME).read_text())
        order = list(state.get("head_order") or [])
        for name in order:
            self.load_head(directory / name, head_name=name, hotswap=name in self.heads)
        frozen = list(state.get("frozen_heads") or [])
        for name in order:
            for parameter_name, parameter in self.heads[name].named_parameters():
                parameter.requires_grad_(name not in frozen and f"{name}.{parameter_name}" not in frozen)
        kept = [entry for entry in self.config.frozen_heads or [] if entry.split(".")[0] not in order]
        self.config.frozen_heads = kept + frozen
        if state.get("active_head") is not None:
            self.heads.set_active(state["active_head"])
        self.heads.enabled = state.get("heads_enabled", True)

    # ----------------------------------------------------------------------------------------------------
    # patches of forward by training libraries

    def __setattr__(self, name: str, value) -> None:
        """Assigning ``model.forward`` (as TRL's trainers and Liger-Kernel do) must not bypass the head.

        TRL's ``add_fused_lm_head`` (which ``SFTTrainer`` and TRL's other trainers apply) replaces
        ``forward`` with one that runs the base and its output layer directly, so a head would never run
        and nothing would train: it is not installed, as this model's own ``forward`` answers the same
        ``fused_lm_head=True`` calls through the head (its temperature is kept). Liger-Kernel's fused
        linear cross-entropy, which also skips the head, is refused with an error naming the setting.
        """
        if name == "forward" and callable(value) and not isinstance(value, nn.Module):
            function = getattr(value, "__func__", value)
            # Where the function was written (functools.wraps copies __module__ and __qualname__ from ours).
            module = str(getattr(function, "__globals__", {}).get("__name__", ""))
            code = getattr(function, "__code__", None)
            qualname = getattr(code, "co_qualname", getattr(code, "co_name", ""))
            if module.startswith("trl.") and getattr(code, "co_name", "") == "_fused_forward":
                cells = (cell.cell_contents for cell in function.__closure__ or ())
                closure = dict(zip(function.__code__.co_freevars, cells))
                self._fused_lm_head_options = {"temperature": float(closure.get("temperature", 1.0))}
                return  # forward(..., fused_lm_head=True) is served by the head itself
            if module.startswith(("trl.", "liger_kernel.")):
                raise BackattnValueError(
                    f"{module}.{qualname} replaces this model's forward with one that runs the base model and its "
                    "output layer directly, so the backward-attention head would never run and nothing would "
                    "train. With Liger-Kernel, turn its fused loss off: liger_kernel_config={'fused_linear_cross_"
                    "entropy': False} (TrainingArguments / SFTConfig); backattn's own chunked loss does the same "
                    "job through the head (config.loss_chunk_size)."
                )
        super().__setattr__(name, value)

    # ----------------------------------------------------------------------------------------------------
    # forward

    #: The base's post-processing of its output layer's result, read from the stock class's forward
    #: (``modeling_auto.logit_steps``): ``(operation, config attribute)`` pairs; empty for GPT-2 and Llama.
    logit_steps: tuple[tuple[str, str | None], ...] = ()

    def base_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The stock model's logits for final hidden states ``h_t``: ``self.lm_head(h_t)``, then the base's own
        post-processing (:meth:`transform_logits`)."""
        return self.transform_logits(self.lm_head(hidden))

    def transform_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The stock forward's steps after its output layer, in its order and with its operations (so the result is
        the stock ``.logits`` bit for bit): soft-capping ``c tanh(l / c)`` (Gemma's ``final_logit_softcapping``),
        ``l * s`` (Cohere's ``logit_scale``), ``l / s`` (Granite's ``logits_scaling``), a cast to float32; a step
        whose config value is ``None`` is skipped, as the stock forward skips it."""
        for operation, attribute in self.logit_steps:
            if operation == "float":
                logits = logits.float()
                continue
            value = getattr(self.config, attribute, None)
            if value is None:
                continue
            if operation == "softcap":
                logits = torch.tanh(logits / value) * value
            elif operation == "multiply":
                logits = logits * value
            else:
                logits = logits / value
        return logits

    def _transforms_logits(self) -> bool:
        return any(attribute and getattr(self.config, attribute, None) is not None for _, attribute in self.logit_steps)

    def _linear_output_layer(self) -> nn.Linear | None:
        """The output layer when it is exactly ``nn.Linear`` (a PEFT- or quantisation-wrapped layer exposes a
        ``.weight`` that is not what it applies), else ``None``."""
        return self.lm_head if type(self.lm_head) is nn.Linear else None

    def _output_weight(self) -> torch.Tensor | None:
        """The output layer ``W`` when the logits are exactly ``h_t W^T`` (no bias, no post-processing), else
        ``None``: the head then takes its exact path (no ``W^T Vv`` shortcut)."""
        layer = self._linear_output_layer()
        plain = layer is not None and layer.bias is None and not self._transforms_logits()
        return layer.weight if plain else None

    def _rerank_top_k(self, rerank_top_k: int | None) -> int | None:
        """The ``k`` of top-k re-ranking for one call: the argument, else ``config.rerank_top_k``; 0 means off."""
        return self.config.rerank_top_k if rerank_top_k is None else rerank_top_k

    def _chunked_loss_applies(self, labels, heads, logits_to_keep, hidden, rerank_top_k) -> bool:
        """Whether ``forward`` takes the head's loss chunk by chunk (see ``forward``).

        Only the head may need gradients there: the base's hidden states, output layer and embedding table
        must be frozen (no LoRA on the base, no trainable output layer), as the chunked loss gives them none.
        Under ``torch.compile`` the straightforward loss is taken (the chunks' count depends on the labels).
        """
        layer = self._linear_output_layer()  # a bias and the base's post-processing are applied in each chunk
        weight = None if layer is None else layer.weight
        return (
            labels is not None
            and not torch.compiler.is_compiling()  # its number of labelled positions is data-dependent
            and self.training
            and torch.is_grad_enabled()
            and heads is None
            and self.active_head() is not None
            and bool(self.config.loss_chunk_size)
            and not self._rerank_top_k(rerank_top_k)
            and isinstance(logits_to_keep, int)
            and logits_to_keep == 0
            and weight is not None
            and not (hidden.requires_grad or weight.requires_grad or self.get_input_embeddings().weight.requires_grad)
        )

    def generate(self, *args, heads: str | list | torch.Tensor | None = None, fan_out: list | None = None, **kwargs):
        """``GenerationMixin.generate``; ``heads=`` (one head name or ``None`` per row) mixes heads in a batch,
        and one head name alone serves every row. Refused while heads are disabled (it would be ignored).

        ``fan_out=[name, ...]`` (``None``: the base) decodes the same inputs under each of those heads and returns
        a dict name -> what ``generate(..., heads=name)`` returns, equal to it token for token: the prompt's
        prefill runs once, as one fan-out forward (every head's first-token logits from one base pass), and each
        head then decodes from its own deep copy of that prefill's KV cache. The heads decode one after another
        rather than as one batch of ``rows x heads``: each then gets exactly its own ``generate`` (same batch shape,
        stopping when its own rows finish, its own output object), and holds one head's batch at a time; after the
        first token the sequences differ, so every later step needs a base forward per head either way. Without a
        KV cache (``use_cache=False``) the first step is still shared. Not with ``past_key_values`` or ``heads=``.
        """
        if fan_out is not None:
            return self._generate_fan_out(args, heads, fan_out, kwargs)
        self.heads.check_enabled_for(heads)
        if isinstance(heads, str):
            self.heads.route(heads)  # the name is checked; forward gives it to every row (beams included)
            kwargs["heads"] = heads
        elif heads is not None:
            # As a tensor, generate repeats it along with the batch for beams and multiple return sequences.
            kwargs["heads"] = self.heads.route(heads)
        return super().generate(*args, **kwargs)

    def _generate_fan_out(self, args, heads, fan_out, kwargs) -> dict:
        """``generate(..., fan_out=[...])``: each head's ``generate``, its prefill served by :class:`_SharedPrefill`."""
        names = self.heads.check_fan_out(fan_out)
        if heads is not None:
            raise BackattnValueError(
                "generate() got both heads= (one head per row) and fan_out= (every row under each head): pass one."
            )
        if kwargs.get("past_key_values") is not None:
            raise BackattnValueError(
                "fan_out= shares generate's own prefill between the heads, so it cannot start from a past_key_values "
                "you pass (every head would extend that one cache): drop past_key_values, or call generate once "
                "per head with a copy of it (copy.deepcopy)."
            )
        given = (*args[:1], *map(kwargs.get, ("inputs", "input_ids", "inputs_embeds")))
        prompt = next((x for x in given if x is not None), None)
        if None in names and not isinstance(prompt, torch.Tensor):
            raise BackattnValueError("fan_out= with None (the base) needs the prompt as a tensor (input_ids).")
        state, results = _SharedPrefill(names), {}
        self._shared_prefill = state
        try:
            for name in names:
                state.serving = name
                route = name if name is not None else torch.full((prompt.shape[0],), -1, dtype=torch.long)
                results[name] = self.generate(*args, heads=route, **kwargs)
        finally:
            self._shared_prefill = None
        return results

    def _prefill(self, input_ids, generation_config, model_kwargs, *args, **kwargs):
        """``GenerationMixin._prefill`` (Transformers 5), served once for every head while ``generate(fan_out=...)``
        runs: the first head's call runs it as a fan-out forward with generate's own inputs, the others take its
        logits and a copy of its KV cache (see :class:`_SharedPrefill`)."""
        state = getattr(self, "_shared_prefill", None)
        if state is None:
            return super()._prefill(input_ids, generation_config, model_kwargs, *args, **kwargs)
        if state.outputs is None:
            inputs = {key: value for key, value in model_kwargs.items() if key != "heads"}
            inputs["fan_out"] = state.names
            state.keep(super()._prefill(input_ids, generation_config, inputs, *args, **kwargs), input_ids)
        elif not (state.input_ids.shape == input_ids.shape and torch.equal(state.input_ids, input_ids)):
            raise BackattnValueError("generate(fan_out=...): the heads' prefills differ; this is a bug in backattn.")
        return state.served()

    # ----------------------------------------------------------------------------------------------------
    # checks of forward's inputs: shapes and dtypes first (free), then value ranges in one device sync

    def _check_forward_inputs(
        self, input_ids, inputs_embeds, labels, base_hidden_states, past_key_values, position_ids, rerank_top_k, kwargs
    ) -> None:
        """Refuse inputs the model cannot use, each error naming the argument, the value and the fix."""
        config, vocab_size = self.config, self.config.vocab_size
        if kwargs and not torch.compiler.is_compiling():
            unknown = sorted(set(kwargs) - _accepted_keywords(type(self)))
            if unknown:
                hint = ""
                if "adapter_names" in unknown:
                    hint = (
                        " adapter_names= is PEFT's per-row choice of LoRA adapters (a PeftModel takes it before "
                        "the call reaches this model); "
                    )
                raise BackattnTypeError(
                    f"forward() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}, which would be "
                    f"ignored.{hint} To choose task heads per batch row, pass heads= (one head name, or None for the "
                    "base, per row, e.g. heads=['math', None]), or set_head(name) for every row."
                )
        k = rerank_top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise BackattnValueError(f"rerank_top_k must be a positive integer (or 0 / None: off), got {k!r}.")
        shape = None
        if input_ids is not None:
            _check_token_tensor("input_ids", input_ids)
            if input_ids.dim() != 2:
                fix = "add a batch dimension with input_ids.unsqueeze(0)" if input_ids.dim() < 2 else "flatten it"
                raise BackattnValueError(
                    f"input_ids must be 2-D (batch x sequence), got shape {tuple(input_ids.shape)}: {fix}, or "
                    "tokenize with return_tensors='pt'."
                )
            if not input_ids.numel() and inputs_embeds is None:
                raise BackattnValueError(
                    f"input_ids is empty (shape {tuple(input_ids.shape)}): give at least one row of at least one "
                    "token (an empty prompt needs a BOS token)."
                )
            shape = tuple(input_ids.shape)
        if inputs_embeds is not None:
            if not isinstance(inputs_embeds, torch.Tensor) or not inputs_embeds.is_floating_point():
                raise BackattnTypeError(
                    f"inputs_embeds must be a floating-point tensor (batch x sequence x {config.hidden_size}), got "
                    f"{_describe(inputs_embeds)}; pass token ids as input_ids instead."
                )
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size:
                raise BackattnValueError(
                    f"inputs_embeds must be batch x sequence x {config.hidden_size} (the base's hidden_size), got "
                    f"shape {tuple(inputs_embeds.shape)}."
                )
            shape = shape or tuple(inputs_embeds.shape[:2])
        if base_hidden_states is not None:
            if not isinstance(base_hidden_states, torch.Tensor) or not base_hidden_states.is_floating_point():
                raise BackattnTypeError(
                    f"base_hidden_states must be a floating-point tensor, got {_describe(base_hidden_states)}."
                )
            expected = (*(shape or tuple(base_hidden_states.shape[:2])), config.hidden_size)
            if tuple(base_hidden_states.shape) != expected:
                raise BackattnValueError(
                    f"base_hidden_states has shape {tuple(base_hidden_states.shape)}, but these inputs need "
                    f"{expected} (batch x sequence of the input_ids x the base's hidden_size): cache the features "
                    "of these very input_ids with the same base model."
                )
            shape = shape or tuple(base_hidden_states.shape[:2])
        window = getattr(config, "max_position_embeddings", None) if base_hidden_states is None else None
        fix_length = (
            f"truncate the input to at most {window} tokens (tokenizer(..., truncation=True, max_length={window})), "
            "or lower max_new_tokens when generating (prompt and new tokens must fit together)."
        )
        if window and shape is not None and position_ids is None:
            past = past_key_values.get_seq_length() if hasattr(past_key_values, "get_seq_length") else 0
            if past + shape[1] > window:
                cached = f" ({past} cached + {shape[1]} new)" if past else ""
                raise BackattnValueError(
                    f"The input is {past + shape[1]} tokens long{cached}, longer than the base model's context "
                    f"window of {window} positions (config.max_position_embeddings): {fix_length}"
                )
        ignore_index = kwargs.get("ignore_index", -100)
        targets = []
        for name in ("labels", "shift_labels"):
            tensor = labels if name == "labels" else kwargs.get("shift_labels")
            if tensor is None:
                continue
            _check_token_tensor(name, tensor)
            if shape is not None and tuple(tensor.shape) != shape:
                raise BackattnValueError(
                    f"{name} has shape {tuple(tensor.shape)} but the input has shape {shape} (batch x sequence): "
                    f"give one label per input token, {ignore_index} where no loss is wanted"
                    + (" (the model shifts labels by one position itself)." if name == "labels" else ".")
                )
            targets.append((name, tensor))
        if torch.compiler.is_compiling():
            return
        # every value check below reads its numbers in one device sync
        stats: dict[str, torch.Tensor] = {}
        if input_ids is not None and input_ids.numel():
            stats["ids_min"], stats["ids_max"] = torch.aminmax(input_ids)
        if window and isinstance(position_ids, torch.Tensor) and position_ids.numel():
            stats["position_max"] = position_ids.max()
        for name, tensor in targets:
            used = tensor != ignore_index
            stats[f"{name}_bad"] = (used & ((tensor < 0) | (tensor >= vocab_size))).sum()
            stats[f"{name}_count"] = (used[..., 1:] if name == "labels" else used).sum()
        if not stats:
            return
        device = next(iter(stats.values())).device
        values = dict(zip(stats, torch.stack([v.to(device=device, dtype=torch.long) for v in stats.values()]).tolist()))
        if "ids_min" in values and (values["ids_min"] < 0 or values["ids_max"] >= vocab_size):
            low, high = values["ids_min"], values["ids_max"]
            raise BackattnValueError(
                f"input_ids holds token id {low if low < 0 else high}, outside this model's vocabulary "
                f"[0, {vocab_size}): use the tokenizer that belongs to the base model."
            )
        if "position_max" in values and values["position_max"] >= window:
            raise BackattnValueError(
                f"position_ids reach position {values['position_max']}, beyond the base model's context window of "
                f"{window} positions (config.max_position_embeddings, positions 0-{window - 1}): {fix_length}"
            )
        for name, tensor in targets:
            if values[f"{name}_bad"]:
                wrong = tensor[(tensor != ignore_index) & ((tensor < 0) | (tensor >= vocab_size))]
                raise BackattnValueError(
                    f"{name} holds {values[f'{name}_bad']} id(s) outside [0, {vocab_size}) that are not "
                    f"{ignore_index} (the ignore index), e.g. {wrong[0].item()}: labels are token ids of the base's "
                    f"vocabulary, or {ignore_index} where no loss is wanted."
                )
        if targets and values[f"{targets[-1][0]}_count"] == 0:  # the last of labels / shift_labels: what the loss reads
            num_items = kwargs.get("num_items_in_batch")
            if num_items is None or int(num_items) == 0:
                raise BackattnValueError(
                    f"No target tokens in this batch: every {targets[-1][0]} entry that the loss reads is "
                    f"{ignore_index}, so the loss is undefined (0/0). Drop the batch, check the collator and "
                    "max_length (prompts may fill the whole sequence), or pass labels=None for logits alone."
                )

    def _check_finite_head_inputs(self, hidden, inputs_embeds, base_hidden_states, heads) -> None:
        """One ``isfinite`` over the hidden states a head reads (its logits are made from them); see
        ``config.check_finite_inputs``."""
        if not self.config.check_finite_inputs or torch.compiler.is_compiling():
            return
        if not self.heads.enabled or (heads is None and self.active_head() is None):
            return  # no head reads them: the base model's own logits, exactly
        if bool(torch.isfinite(hidden).all()):
            return
        if inputs_embeds is not None and not bool(torch.isfinite(inputs_embeds).all()):
            cause = "inputs_embeds holds NaN or inf values"
        elif base_hidden_states is not None:
            cause = f"base_hidden_states holds NaN or inf values (in {hidden.dtype}; a damaged feature cache?)"
        else:
            cause = (
                "the base model's final hidden states hold NaN or inf values (damaged base weights, or an "
                f"overflow in {hidden.dtype})"
            )
        raise BackattnValueError(
            f"{cause}, and the head would turn them into NaN logits. Fix that input, or turn this check off with "
            "model.config.check_finite_inputs = False."
        )

    def _check_loss_trains(self, loss: torch.Tensor | None, heads) -> None:
        if loss is not None and self.training and torch.is_grad_enabled() and not loss.requires_grad:
            if not torch.compiler.is_compiling():
                problem = self.heads.training_problem(heads) or "no parameter of the model requires grad"
                raise BackattnValueError(f"Training with labels, but nothing trainable produces the loss: {problem}.")

    def _fused_lm_head(self, hidden, labels, heads, rerank_top_k, kwargs, context=None) -> FusedHeadOutput:
        """``forward(..., fused_lm_head=True)``: per-token log-probabilities of the labels through the head."""
        shift_labels = kwargs.get("shift_labels")
        if labels is None and shift_labels is None:
            raise BackattnValueError(
                "fused_lm_head=True (TRL's fused loss) scores the labels, but no labels were given: pass labels=, "
                "or drop fused_lm_head=True for the logits."
            )
        if self.training and torch.is_grad_enabled():
            self.heads.check_no_training_terms(heads, "fused_lm_head=True (TRL's fused loss)")
        embeddings, weight = self.get_input_embeddings().weight, self._output_weight()
        rerank_top_k = self._rerank_top_k(rerank_top_k)
        active = self.active_head()
        extras: tuple[torch.Tensor, ...] = ()
        reads_context = active is not None and self.heads[active].config.copy_attention
        reads_context = reads_context or (active is not None and self.heads[active].config.query_layers is not None)
        if heads is None and active is not None and (not rerank_top_k or reads_context):
            head = self.heads[active]
            tables = weight_tables(head, embeddings, weight)  # once per batch, with autograd
            layer_states, copy = head.context_inputs(context) if reads_context else (None, None)
            extras = tuple(t for t in (layer_states, *(copy or ())) if t is not None)

            def score(h: torch.Tensor, rows: torch.Tensor, *chunk_extras: torch.Tensor) -> torch.Tensor:
                given = iter(chunk_extras)
                states = next(given) if layer_states is not None else None
                copied = CopyInputs(next(given), next(given)) if copy is not None else None
                logits = self.base_logits(h)
                return head_logits(
                    head, logits, h, embeddings, weight, rerank_top_k, tables, layer_states=states, copy=copied
                )

        else:
            self.heads.check_enabled_for(heads)
            if heads is not None and self._reads_context():
                raise BackattnValueError(
                    "fused_lm_head=True with heads= (one head per row) is not supported when a head reads the sequence "
                    "around each position (query_layers, copy_attention): serve one active head instead."
                )
            row_heads = None if heads is None else self.heads.route(heads, rows=hidden.shape[0]).to(hidden.device)

            def score(h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
                chosen = None if row_heads is None else row_heads[rows]  # each position as a row of its own
                base = self.base_logits(h)[:, None]
                return self.heads(base, h[:, None], embeddings, weight, chosen, rerank_top_k)[:, 0]

        return head_token_log_probs(
            score, hidden, labels, self.config.loss_chunk_size or 256, shift_labels, kwargs.get("ignore_index", -100),
            self._fused_lm_head_options["temperature"], kwargs.get("num_items_in_batch"), extras,
        )  # fmt: skip

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        heads: list | torch.Tensor | None = None,
        base_hidden_states: torch.Tensor | None = None,
        rerank_top_k: int | None = None,
        fused_lm_head: bool = False,
        base_layer_states: dict[int, torch.Tensor] | None = None,
        fan_out: list | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | FusedHeadOutput | FanOutOutput:
        r"""The base model's forward, then the active head on the positions kept.

        ``logits`` are the active head's next-token logits (the base model's own when no head is active or
        heads are disabled); ``loss`` is the usual shifted cross-entropy over labels that are not ``-100`` (in
        training, plus the head's KL-to-base term and over its label words alone, with ``base_kl_weight`` and
        ``label_word_ids``; fan-out and ``fused_lm_head=True`` refuse to train heads with those options).
        ``heads`` (one head name, or ``None`` for the base, per batch row) serves different heads to the rows
        of one batch; each row gets what it would get alone with its head active. ``base_hidden_states``
        (batch x sequence x hidden) are the frozen base's final hidden states for ``input_ids``, precomputed
        (for example by :mod:`backattn.data.feature_cache`): the base is then not run at all. ``rerank_top_k``
        lets the head re-rank only the base's ``k`` most likely tokens per position, leaving the other
        logits as they are (cheaper, and an approximation; ``generate`` passes it through too); it overrides
        ``config.rerank_top_k`` for this call, and ``0`` scores the whole vocabulary. ``base_layer_states``
        (decoder block index -> batch x sequence x hidden) go with ``base_hidden_states`` for heads with
        ``query_layers``: the outputs of those blocks (before the base's final norm), as a feature cache stores them.

        ``fan_out`` (a list of distinct head names, ``None`` for the base) scores every row under each of those
        heads from one base forward and returns a :class:`~backattn.heads.FanOutOutput` whose ``logits`` (and
        ``loss``, with ``labels``) map each name to what this forward gives with that head active; the base, its
        block hooks and the sequence context run once, and so does whatever the heads share (see
        ``BackwardAttentionHeads.fan_out``). Not with ``heads=`` or ``fused_lm_head=True``.

        Heads with ``query_layers`` or ``copy_attention`` read more of the base than the final hidden state: the
        model takes the outputs of the named decoder blocks by forward hooks while the base runs, and for
        ``copy_attention`` the states and ids of every earlier position. While decoding with a KV cache it keeps
        those of the cached positions on the cache object (reordered with it for beam search), so a copy head
        gives the same tokens with or without ``use_cache``.

        While training a head with ``labels`` (``model.train()``, gradients on, one active head), the loss
        is computed chunk by chunk over the labelled positions (``config.loss_chunk_size``, see
        :mod:`backattn.head_loss`) and ``logits`` is ``None``, as in Liger-Kernel's fused losses.

        Bad inputs raise :class:`~backattn.errors.BackattnValueError` / ``BackattnTypeError`` before the base
        runs: ``input_ids`` that are not a 2-D, non-empty integer tensor of this vocabulary's ids; ``labels`` of
        another shape or dtype, with ids outside ``[0, V)`` other than ``-100``, or (without
        ``num_items_in_batch``) no target token at all; a sequence longer than the base's context window
        (``config.max_position_embeddings``); ``base_hidden_states`` of the wrong shape. With
        ``config.check_finite_inputs`` (the default), NaN or inf in the hidden states a head reads is refused
        too, and in training (``model.train()``, gradients on, labels) a loss that no trainable parameter
        produces (no active head, heads disabled, a frozen head) is refused instead of failing at backward.
        A keyword argument the model does not take (such as PEFT's ``adapter_names=``) is refused too, rather
        than ignored.

        ``fused_lm_head=True`` (with ``labels``) is the protocol of TRL's fused LM head (``SFTTrainer`` and
        TRL's other trainers call the model so): instead of logits, the per-token log-probabilities of the
        labels, their entropy and top-1 hits, as a :class:`~backattn.head_loss.FusedHeadOutput`, computed
        through the head chunk by chunk (:func:`~backattn.head_loss.head_token_log_probs`).
        """
        vocab_size = self.config.vocab_size
        self._check_forward_inputs(
            input_ids, inputs_embeds, labels, base_hidden_states, past_key_values, position_ids, rerank_top_k, kwargs
        )
        past_length = past_key_values.get_seq_length() if hasattr(past_key_values, "get_seq_length") else 0
        if fan_out is not None:
            fan_out = self.heads.check_fan_out(fan_out)
            if heads is not None or fused_lm_head:
                given = "heads= (one head per row)" if heads is not None else "fused_lm_head=True"
                raise BackattnValueError(
                    f"forward() got both fan_out= (every row under each head) and {given}: pass one of them."
                )
        serving = heads if fan_out is None else fan_out
        gather_output_tables(self)  # a base sharded at load time: the head reads E and W_out whole
        if base_hidden_states is not None:
            outputs, hidden = None, base_hidden_states.to(self.lm_head.weight.dtype)
            layer_states = self._given_layer_states(base_layer_states, hidden)
        else:
            with self.capture_block_outputs(self.feature_layers()) as layer_states:
                outputs = self.base_model(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    past_key_values=past_key_values,
                    inputs_embeds=inputs_embeds,
                    use_cache=use_cache,
                    **kwargs,
                )
            hidden = outputs.last_hidden_state
        cache = getattr(outputs, "past_key_values", None)
        cache = past_key_values if cache is None else cache
        context = self._sequence_context(
            hidden, layer_states, input_ids, attention_mask, cache, past_length, logits_to_keep, serving
        )
        hidden = slice_logits_to_keep(hidden, logits_to_keep)
        self._check_finite_head_inputs(hidden, inputs_embeds, base_hidden_states, serving)
        embeddings, weight = self.get_input_embeddings().weight, self._output_weight()
        loss = logits = None
        if fan_out is not None:
            logits = self.heads.fan_out(
                self.base_logits(hidden), hidden, embeddings, weight, fan_out, self._rerank_top_k(rerank_top_k), context
            )
            if labels is not None:
                if self.training and torch.is_grad_enabled():
                    self.heads.check_no_training_terms([n for n in fan_out if n is not None], "fan_out=")
                loss = {
                    name: self.loss_function(logits=z, labels=labels, vocab_size=vocab_size, **kwargs)
                    for name, z in logits.items()
                }
            return FanOutOutput(
                loss=loss,
                logits=logits,
                past_key_values=getattr(outputs, "past_key_values", None),
                hidden_states=getattr(outputs, "hidden_states", None),
                attentions=getattr(outputs, "attentions", None),
            )
        if fused_lm_head:
            fused = self._fused_lm_head(hidden, labels, heads, rerank_top_k, kwargs, context)
            self._check_loss_trains(fused.loss, heads)
            return fused
        if self._chunked_loss_applies(labels, heads, logits_to_keep, hidden, rerank_top_k):
            loss = head_cross_entropy(
                self.heads[self.config.active_head], hidden, labels, self.lm_head.weight, embeddings,
                self.config.loss_chunk_size, kwargs.get("num_items_in_batch"), kwargs.get("ignore_index", -100),
                kwargs.get("shift_labels"), context, output_bias=self.lm_head.bias,
                transform_logits=self.transform_logits if self._transforms_logits() else None,
            )  # fmt: skip
        else:
            base = self.base_logits(hidden)
            logits = self.heads(base, hidden, embeddings, weight, heads, self._rerank_top_k(rerank_top_k), context)
            words = self.heads.label_word_ids(heads) if self.training and labels is not None else None
            if words is not None:
                loss = label_word_loss(
                    logits, labels, words, kwargs.get("shift_labels"), kwargs.get("num_items_in_batch"),
                    kwargs.get("ignore_index", -100),
                )  # fmt: skip
            elif labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=vocab_size, **kwargs)
            if labels is not None:
                kl_weights = self.heads.base_kl_weights(heads, logits.shape[0]) if self.training else None
                if kl_weights is not None:
                    loss = loss + base_kl_penalty(
                        logits, base, kl_weights, labels, kwargs.get("shift_labels"),
                        kwargs.get("num_items_in_batch"), kwargs.get("ignore_index", -100),
                    )  # fmt: skip
                copy_term = None if not self.training else self.heads.copy_supervision(
                    heads, context, labels, kwargs.get("shift_labels"), kwargs.get("num_items_in_batch"),
                    kwargs.get("ignore_index", -100),
                )  # fmt: skip
                if copy_term is not None:
                    loss = loss + copy_term
        self._check_loss_trains(loss, heads)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=getattr(outputs, "past_key_values", None),
            hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None),
        )


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r}"[:200]


def _check_token_tensor(name: str, value) -> None:
    """``BackattnTypeError`` unless ``value`` is an integer tensor (token ids or labels)."""
    if not isinstance(value, torch.Tensor):
        raise BackattnTypeError(
            f"{name} must be a torch.LongTensor (batch x sequence), got {_describe(value)}: tokenize with "
            "return_tensors='pt', or wrap the ids in torch.tensor([...])."
        )
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise BackattnTypeError(
            f"{name} must hold integer token ids (torch.long), got dtype {value.dtype}: convert with {name}.long()"
            + (", or pass vectors as inputs_embeds." if name == "input_ids" else ".")
        )


class _PlainBaseCheckpointFilter(logging.Filter):
    """Drop Transformers' warning about loading a plain base checkpoint (model_type ``t``) into our family of it
    (``t_backattn``): that is the point."""

    EXPECTED = re.compile(r"You are using a model of type `([\w-]+)` to instantiate a model of type `\1_backattn`")

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.EXPECTED.match(record.getMessage())


transformers_logging.get_logger("transformers.configuration_utils").addFilter(_PlainBaseCheckpointFilter())


class _ContextMemory(NamedTuple):
    """What a model keeps on a KV cache object for copy heads: the cached positions' states and ids."""

    hidden: torch.Tensor  # B x P x d
    layer_states: dict[int, torch.Tensor]  # block -> B x P x d
    input_ids: torch.Tensor  # B x P
    attention_mask: torch.Tensor  # B x P (bool)

    def map(self, fn) -> _ContextMemory:
        """The memory with ``fn`` applied to each of its tensors (all batch-first)."""
        states = {k: fn(v) for k, v in self.layer_states.items()}
        return _ContextMemory(fn(self.hidden), states, fn(self.input_ids), fn(self.attention_mask))


def _select(t: torch.Tensor, indices) -> torch.Tensor:
    return t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices]


#: The cache methods that change the batch dimension (beam search, contrastive search), and what each does to it.
_BATCH_METHODS = {
    "reorder_cache": lambda t, beam_idx: t.index_select(0, beam_idx.to(t.device)),
    "batch_repeat_interleave": lambda t, repeats: t.repeat_interleave(repeats, dim=0),
    "batch_select_indices": lambda t, indices: t[
        indices.to(t.device) if isinstance(indices, torch.Tensor) else indices
    ],
}


def _keep_context(cache, memory: _ContextMemory) -> None:
    """Keep ``memory`` on a KV cache object (``cache._backattn_context``); the first time, wrap the cache's own
    methods that reorder or resize its batch so that they do the same to the memory. Positions it holds beyond
    the cache's length (a cache cropped by assisted decoding) are dropped when it is read."""
    if not hasattr(cache, "_backattn_context"):
        for name, apply in _BATCH_METHODS.items():
            original = getattr(cache, name, None)
            if original is None:
                continue

            def wrapped(argument, _original=original, _apply=apply):
                _original(argument)
                kept = getattr(cache, "_backattn_context", None)
                if kept is not None:
                    cache._backattn_context = kept.map(lambda t: _apply(t, argument))

            setattr(cache, name, wrapped)
    cache._backattn_context = memory


def _copied_cache(cache):
    """A deep copy of a KV cache, independent of the original: the copy heads' memory on it is copied too, and
    the batch methods :func:`_keep_context` wrapped on the original are wrapped afresh on the copy."""
    clone = copy.deepcopy(cache)
    for name in _BATCH_METHODS:
        clone.__dict__.pop(name, None)  # the original's wrappers, which would reorder the original's memory
    memory = clone.__dict__.pop("_backattn_context", None)
    if memory is not None:
        _keep_context(clone, memory)
    return clone


class _SharedPrefill:
    """One ``generate(fan_out=names)``: the prefill the first head's ``generate`` ran (as a fan-out forward), served
    to each head in turn (``serving``) with that head's logits and a KV cache of its own: the first head takes the
    prefill's cache, the others deep copies of a copy kept before any head decoded."""

    def __init__(self, names: list[str | None]):
        self.names, self.serving = names, None
        self.outputs = self.input_ids = self.pristine = None

    def keep(self, outputs: FanOutOutput, input_ids: torch.Tensor) -> None:
        self.outputs, self.input_ids = outputs, input_ids
        cache = outputs.past_key_values
        self.pristine = _copied_cache(cache) if cache is not None and len(self.names) > 1 else None

    def served(self) -> CausalLMOutputWithPast:
        index, cache = self.names.index(self.serving), self.outputs.past_key_values
        if index and cache is not None:
            cache = self.pristine if index == len(self.names) - 1 else _copied_cache(self.pristine)
        return CausalLMOutputWithPast(
            logits=self.outputs.logits[self.serving],
            past_key_values=cache,
            hidden_states=self.outputs.hidden_states,
            attentions=self.outputs.attentions,
        )


class GPT2BackwardAttentionForCausalLM(BackwardAttentionForCausalLMMixin, GPT2LMHeadModel):
    """GPT-2 (frozen) with backward-attention heads on its logits."""

    config_class = GPT2BackwardAttentionConfig


class LlamaBackwardAttentionForCausalLM(BackwardAttentionForCausalLMMixin, LlamaForCausalLM):
    """A Llama-family model such as SmolLM2 (frozen) with backward-attention heads on its logits."""

    config_class = LlamaBackwardAttentionConfig


GPT2BackwardAttentionForCausalLM.register_for_auto_class("AutoModelForCausalLM")
LlamaBackwardAttentionForCausalLM.register_for_auto_class("AutoModelForCausalLM")


def family_for(model_type: str) -> type:
    """The backattn model class for a base of this ``model_type`` (plain, or ``"..._backattn"``): GPT-2's and
    Llama's named classes, and for every other causal-LM architecture the class ``modeling_auto.py`` makes;
    ``ValueError`` for an architecture that cannot carry a head."""
    from .modeling_auto import backward_attention_class

    return backward_attention_class(model_type)


def __getattr__(name: str):
    """``FAMILIES`` (model_type -> class, for every architecture) lives in ``modeling_auto.py``, which imports this
    module."""
    if name == "FAMILIES":
        from .modeling_auto import FAMILIES

        return FAMILIES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BackwardAttentionForCausalLMMixin",
    "GPT2BackwardAttentionForCausalLM",
    "LlamaBackwardAttentionForCausalLM",
    "family_for",
]
