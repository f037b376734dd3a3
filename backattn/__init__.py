"""backattn: trainable backward-attention heads on a frozen Transformers causal LM.

Importing the package registers the model families with ``AutoConfig`` and ``AutoModelForCausalLM``.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_backattn import (
    DEFAULT_PRESET,
    PRESETS,
    BackwardAttentionConfig,
    GPT2BackwardAttentionConfig,
    LlamaBackwardAttentionConfig,
)
from .heads import BackwardAttentionHeads
from .modeling_backattn import BackwardAttentionHead, BackwardAttentionLayer
from .modeling_families import FAMILIES, GPT2BackwardAttentionForCausalLM, LlamaBackwardAttentionForCausalLM, family_for

__version__ = "0.1.0"

for _config_class, _model_class in (
    (GPT2BackwardAttentionConfig, GPT2BackwardAttentionForCausalLM),
    (LlamaBackwardAttentionConfig, LlamaBackwardAttentionForCausalLM),
):
    AutoConfig.register(_config_class.model_type, _config_class, exist_ok=True)
    AutoModelForCausalLM.register(_config_class, _model_class, exist_ok=True)

__all__ = [
    "DEFAULT_PRESET",
    "FAMILIES",
    "PRESETS",
    "BackwardAttentionConfig",
    "BackwardAttentionHead",
    "BackwardAttentionHeads",
    "BackwardAttentionLayer",
    "GPT2BackwardAttentionConfig",
    "GPT2BackwardAttentionForCausalLM",
    "LlamaBackwardAttentionConfig",
    "LlamaBackwardAttentionForCausalLM",
    "__version__",
    "family_for",
]
